"""What the speed benchmarks (throughput.py, data_throughput.py) share: seeded synthetic images, the machine and
its load, ABAB timing rounds, medians, and the markdown / JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

# --- synthetic images -------------------------------------------------------------------------------------------


def synthetic_image(rng: np.random.Generator, size: int) -> Image.Image:
    """One RGB ``size`` x ``size`` image with some structure (so that JPEG and crops do realistic work): a smooth
    colour field, a few filled shapes, and mild pixel noise."""
    field = rng.integers(0, 256, size=(5, 5, 3), dtype=np.uint8)
    image = Image.fromarray(field, "RGB").resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(size // 8 + 1, size // 2 + 2, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 6, size=(size, size, 3)).round().astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def write_image_folder(root: Path, count: int, size: int, seed: int, fmt: str = "JPEG",
                       classes: int = 2) -> Path:
    """``count`` seeded synthetic images of ``size`` px under ``root/c<k>/`` (``classes`` subfolders, so that
    torchvision's ImageFolder reads it too). Reused when the folder already holds exactly that set (a
    ``done.json`` marker written last records what was made). Returns ``root``."""
    marker = root / "done.json"
    wanted = {"count": count, "size": size, "seed": seed, "format": fmt, "classes": classes}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        return root
    rng = np.random.default_rng(seed)
    suffix = ".jpg" if fmt == "JPEG" else ".png"
    options = {"quality": 90} if fmt == "JPEG" else {}
    for index in range(count):
        folder = root / f"c{index % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        synthetic_image(rng, size).save(folder / f"{index:05d}{suffix}", format=fmt, **options)
    marker.write_text(json.dumps(wanted))
    return root


# --- machine and load -------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name as lscpu / /proc/cpuinfo give it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def machine_info(device: torch.device) -> dict[str, Any]:
    """JSON-able facts about where a benchmark ran."""
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_at_start": load_average(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


# --- rounds and medians -----------------------------------------------------------------------------------------


def alternating_rounds(rounds: int, sides: Sequence[str]) -> list[str]:
    """The order the sides run in: each round runs every side once, and every other round reverses the order
    (A B, B A, A B, ...), so slow drifts of a shared machine hit both sides alike."""
    order: list[str] = []
    for index in range(rounds):
        order.extend(sides if index % 2 == 0 else list(reversed(sides)))
    return order


def run_rounds(rounds: int, measure: dict[str, Callable[[], dict[str, Any]]],
               label: str) -> dict[str, list[dict[str, Any]]]:
    """Calls ``measure[side]()`` for each side in ``alternating_rounds`` order; each call returns a dict with at
    least ``img_per_s``. Prints one line per measurement, with the load average. Returns side -> measurements."""
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in measure}
    for position, side in enumerate(alternating_rounds(rounds, list(measure))):
        measured = measure[side]()
        measured["load_average"] = load_average()
        measured["round"] = position // len(measure)
        results[side].append(measured)
        print(f"  [{label}] round {measured['round'] + 1} {side}: {measured['img_per_s']:.1f} img/s "
              f"(load {' '.join(f'{v:.2f}' for v in measured['load_average'])})", flush=True)
    return results


def median_img_per_s(measurements: list[dict[str, Any]]) -> float:
    return float(statistics.median(m["img_per_s"] for m in measurements))


def write_json(path: Path, content: Any) -> None:
    """Writes ``content`` as indented JSON atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(temp, path)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def save_results(out: Path, command: str, machine: dict[str, Any], results: list[dict[str, Any]], started: float,
                 table: str, setup: str = "") -> None:
    """Writes OUT/results.json and OUT/results.md (the table, the machine and its load, ``setup``, the command)
    and prints the markdown. ``started``: the perf_counter() value when the measurements began."""
    machine["load_average_at_end"] = load_average()
    write_json(out / "results.json", {"command": command, "machine": machine, "results": results,
                                      "minutes": round((time.perf_counter() - started) / 60, 2)})
    gpu = f" ({machine['gpu']})" if machine.get("gpu") else ""
    device = f", device {machine['device']}{gpu}" if "device" in machine else ""
    text = (f"{table}\n\nMachine: {machine['cpu']}, {machine['cpus']} CPUs, torch {machine['torch']}, "
            f"{machine['torch_threads']} threads{device}; {machine['date_utc']}; load average at start "
            f"{machine['load_average_at_start']}, at end {machine['load_average_at_end']}.\n{setup}"
            f"Command: `{command}`\n")
    (out / "results.md").write_text(text)
    print("\n" + text)
