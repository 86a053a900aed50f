"""bf16 autocast against fp32: one training step (forward, backward, AdamW) of a supervised classifier on a
few backbones, alternating the two formats in rounds, on the CPU (or a GPU with --device cuda).

    .venv/bin/python benchmarks/precision.py
    .venv/bin/python benchmarks/precision.py --models demo_vit narrow_resnet18 --rounds 5

To see a CPU without native bf16 on one that has it, oneDNN and ATen can be held to older instruction sets
(an emulation of such a CPU, not the real thing):

    ONEDNN_MAX_CPU_ISA=AVX512_CORE ATEN_CPU_CAPABILITY=avx2 .venv/bin/python benchmarks/precision.py

The ratio bf16/fp32 in images per second is what ``--precision auto`` decides on (selfsight.precision).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch
from bench_report import machine_info, markdown_table, median_img_per_s, run_rounds, save_results

from selfsight.backbones import Backbone
from selfsight.precision import autocast_context, cpu_has_native_bf16

#: name -> (timm name, options, input size, batch)
MODELS = {
    "demo_vit": ("vit_tiny_patch16_224", {"img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 128,
                                          "depth": 6, "num_heads": 4}, 28, 128),
    "narrow_resnet18": ("resnet18", {"in_chans": 1, "channels": (32, 64, 128, 256), "layers": (1, 1, 1, 1)}, 42, 128),
    "resnet50_224": ("resnet50", {}, 224, 16),
    "vit_small_224": ("vit_small_patch16_224", {}, 224, 16),
}


def measure(model_name: str, precision: str, device: torch.device, steps: int, warmup: int) -> dict:
    """Images per second of ``steps`` timed training steps after ``warmup`` untimed ones."""
    timm_name, opts, size, batch = MODELS[model_name]
    torch.manual_seed(0)
    backbone = Backbone(timm_name, {**opts, "img_size": size}).to(device)
    head = torch.nn.Linear(backbone.num_features, 10).to(device)
    model = torch.nn.Sequential(backbone, head)
    if backbone.family == "cnn":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, backbone.in_chans, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        with autocast_context(device, precision):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"img_per_s": steps * batch / (time.perf_counter() - start)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="runs/bench_precision")
    args = parser.parse_args()
    device = torch.device(args.device)
    machine = machine_info(device)
    machine["native_bf16"] = cpu_has_native_bf16()
    machine["emulation"] = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ}
    started = time.perf_counter()
    results, rows = [], []
    for name in args.models:
        rounds = run_rounds(args.rounds, {p: (lambda p=p, name=name: measure(name, p, device, args.steps, args.warmup))
                                          for p in ("fp32", "bf16")}, name)
        fp32, bf16 = median_img_per_s(rounds["fp32"]), median_img_per_s(rounds["bf16"])
        results.append({"model": name, "fp32": rounds["fp32"], "bf16": rounds["bf16"]})
        timm_name, _, size, batch = MODELS[name]
        rows.append([name, f"{timm_name}, {size} px, batch {batch}", f"{fp32:.1f}", f"{bf16:.1f}",
                     f"**{bf16 / fp32:.2f}x**"])
    table = markdown_table(["model", "backbone", "fp32 img/s", "bf16 img/s", "bf16 / fp32"], rows)
    setup = (f"Native bf16 on this CPU: {machine['native_bf16']}; emulation: {machine['emulation'] or 'none'}; "
             f"{args.rounds} alternating rounds of {args.steps} timed steps (after {args.warmup}), medians.\n")
    command = " ".join(f"{k}={v}" for k, v in machine["emulation"].items())
    command = (command + " " if command else "") + " ".join(map(shlex.quote, [".venv/bin/python", *sys.argv]))
    save_results(Path(args.out), command, machine, results, started, table, setup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
