"""Which number format a run trains in: ``--precision auto|fp32|bf16``.

bf16 autocast pays where the hardware computes in bf16 natively and the model's operations are large
enough to gain from it. Measured on a 2-core Intel Xeon with AVX-512 BF16 and AMX (fwd + bwd + AdamW,
bf16 autocast against fp32; ``benchmarks/precision.py``, docs/benchmarks.md): a narrow ResNet-18 at 42 px
1.45x faster, the demo's 1.2M-parameter ViT at 28 px 0.73x (slower); with oneDNN held to AVX2 (no native
bf16) 0.13x and 0.03x. So ``auto``:

- CUDA: bf16 where the GPU supports it, else fp32;
- a CPU with native bf16 (x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``): a short timed probe of
  both on the run's own model and batch; bf16 when it is at least ``PROBE_MIN_SPEEDUP`` times faster;
- any other CPU: fp32 (bf16 is emulated there and slower).

``--precision bf16`` on a CPU without native bf16 trains as asked, with a warning that it is slower.
"""

from __future__ import annotations

import functools
import logging
import platform
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

log = logging.getLogger("selfsight")

#: bf16 must be at least this much faster than fp32 in the probe to be chosen (timing noise is a few %)
PROBE_MIN_SPEEDUP = 1.1
_NATIVE_FLAGS = {"avx512_bf16", "amx_bf16"}


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs that compute in bf16 natively (x86 AVX-512 BF16 or AMX-BF16, Arm BF16); read from
    /proc/cpuinfo on Linux and from sysctl on macOS. False when it cannot tell."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("flags", "features"):
                flags = set(value.split())
                return bool(flags & _NATIVE_FLAGS) or "bf16" in flags
        return False
    if platform.system() == "Darwin":
        import subprocess

        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True)
        except OSError:
            return False
        return out.stdout.strip() == "1"
    return False


def autocast_context(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast on ``device`` for ``precision == "bf16"``; a context that does nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def resolve_precision(
    requested: str, device: torch.device, time_step: Callable[[str], float]
) -> tuple[str, str]:
    """``(precision, reason)``: ``fp32`` or ``bf16`` for ``requested`` in auto/fp32/bf16 on ``device``.

    ``time_step(precision)`` returns the seconds of one training step in that precision; it is called
    (twice) only for ``auto`` on a CPU with native bf16.
    """
    if requested == "fp32":
        return "fp32", "as asked"
    if requested == "bf16":
        if device.type == "cpu" and not cpu_has_native_bf16():
            return "bf16", (
                "as asked, although this CPU has no native bf16: autocast emulates it and is usually slower "
                "than fp32 (see docs/benchmarks.md); --precision fp32 (or auto) avoids that"
            )
        return "bf16", "as asked"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: a CUDA device with bf16"
        return "fp32", "auto: this CUDA device has no bf16"
    if device.type != "cpu" or not cpu_has_native_bf16():
        return "fp32", "auto: this CPU has no native bf16"
    fp32_s, bf16_s = time_step("fp32"), time_step("bf16")
    speedup = fp32_s / max(bf16_s, 1e-12)
    verdict = "bf16" if speedup >= PROBE_MIN_SPEEDUP else "fp32"
    return verdict, (
        f"auto: this CPU has native bf16; a timed step took {fp32_s:.3f} s in fp32 and {bf16_s:.3f} s in bf16 "
        f"({speedup:.2f}x; bf16 is chosen at {PROBE_MIN_SPEEDUP}x or more)"
    )
