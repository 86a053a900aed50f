"""Is the CPU's bf16 weight gradient of a strided convolution right? A check of the oneDNN behaviour that
``selfsight.backbones.StridedConvBf16Guard`` works around.

    .venv/bin/python benchmarks/bf16_conv_check.py

For each input shape, kernel and memory format: ``--trials`` random convolutions (batch 128, 16 -> 32
channels, stride 2, padding kernel // 2) under bf16 autocast, backward from a random upstream gradient.
The reference is the same convolution in fp32 on the bf16-rounded input and weight, so the two differ only by
bf16's rounding of the products; a gradient counts as wrong when it is not within rtol 0.05 / atol 0.5 of it.
The last column runs the same trials through the guard.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from bench_report import cpu_model, markdown_table

from selfsight.backbones import StridedConvBf16Guard


def trial(shape: tuple[int, int], kernel: int, channels_last: bool, guarded: bool, generator: torch.Generator) -> str:
    """'nonfinite', 'wrong' or 'ok' for one random convolution's weight gradient."""
    x = torch.randn(128, 16, *shape, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(16, 32, kernel, stride=2, padding=kernel // 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.1)
    if guarded:
        conv.__class__ = StridedConvBf16Guard
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    upstream = torch.randn(y.shape, generator=generator)
    y.float().backward(upstream)
    weight = conv.weight.detach().bfloat16().float().requires_grad_()
    if guarded and shape[1] == 1:  # the guard computes these in fp32: compare with fp32 itself
        weight = conv.weight.detach().clone().requires_grad_()
        F.conv2d(x, weight, stride=2, padding=kernel // 2).backward(upstream)
    else:
        F.conv2d(x.bfloat16().float(), weight, stride=2, padding=kernel // 2).backward(upstream)
    if not torch.isfinite(conv.weight.grad).all():
        return "nonfinite"
    return "ok" if torch.allclose(conv.weight.grad, weight.grad, rtol=0.05, atol=0.5) else "wrong"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=40)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for shape in ((1, 1), (4, 1), (1, 4), (2, 2), (3, 3)):
        for kernel in (1, 3):
            for channels_last in (False, True):
                counts = {"nonfinite": 0, "wrong": 0, "ok": 0}
                for _ in range(args.trials):
                    counts[trial(shape, kernel, channels_last, False, generator)] += 1
                guarded = [trial(shape, kernel, channels_last, True, generator) for _ in range(args.trials)]
                rows.append([f"{shape[0]}x{shape[1]}", f"{kernel}x{kernel}", "yes" if channels_last else "no",
                             str(counts["nonfinite"]), str(counts["wrong"]),
                             str(sum(r != "ok" for r in guarded))])
    header = ["input H x W", "kernel", "channels_last", "non-finite", "finite but wrong", "not ok with the guard"]
    print(markdown_table(header, rows))
    print(f"\n{args.trials} trials each; {cpu_model()}; torch {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
