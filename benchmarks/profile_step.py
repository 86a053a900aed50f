"""Where the time of selfsight's training step goes, for the pairs of benchmarks/throughput.py, and of its data
path on a lazy JPEG folder.

    .venv/bin/python benchmarks/profile_step.py                         # every pair, then the data path
    .venv/bin/python benchmarks/profile_step.py --pairs byol-resnet18 --steps 5 --data-size 0

For each pair a ``selfsight.engine.Trainer`` is built exactly as throughput.py builds it (same config, data,
method, optimizer), then its steps are run by a loop that calls what ``Trainer.fit`` calls, in the same order
(lr update, next batch, ``training_step`` under the autocast context, ``loss.item()``, backward, clipping with
``float(norm)``, AdamW step, ``zero_grad``, ``on_step_end``), without the metrics/checkpoint bookkeeping. Each
phase is timed with ``perf_counter`` (exact on the CPU; synchronised on CUDA) and wrapped in a
``record_function``; the views/masks alone (``method.views`` on the same batches) are timed separately.
Then ``torch.profiler`` (top operators by self CPU time) and ``cProfile`` (top Python functions by own time)
run over the same steps. The data path: cProfile of ``load_batch`` of a lazy folder (decode in one process)
and ``torch.profiler`` of the batched SimCLR views at the folder's size.

Everything is printed and written to --out/profile.txt.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from selfsight.engine import Trainer, lr_factor, step_generator

PHASES = ("lr", "data", "training_step", "loss.item", "backward", "clip", "optimizer", "on_step_end")


class PhaseTimer:
    """Accumulates wall seconds per phase name (synchronising CUDA before each reading)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        with record_function(name):
            start = time.perf_counter()
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] += time.perf_counter() - start


def engine_steps(trainer: Trainer, batches: Iterator, first: int, count: int, timer: PhaseTimer | None) -> None:
    """``count`` optimiser steps as ``Trainer.fit`` runs them (accum_steps=1), from global step ``first``."""
    cfg = trainer.cfg
    phase = timer or (lambda name: nullcontext())
    autocast = torch.autocast(trainer.device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    for step in range(first, first + count):
        with phase("lr"):
            factor = lr_factor(step, trainer.total_steps, trainer.warmup_steps, cfg.optim.min_lr_ratio)
            for group in trainer.optimizer.param_groups:
                group["lr"] = cfg.optim.lr * factor * group.get("lr_scale", 1.0)
        with phase("data"):
            images, _, indices = next(batches)
            trainer._give_indices(trainer.method, indices)
        with phase("training_step"), autocast:
            out = trainer.method.training_step(images, step_generator(cfg.seed, step))
        with phase("loss.item"):
            loss_value = out.loss.item()
        if not math.isfinite(loss_value):
            raise SystemExit(f"loss {loss_value} at step {step}")
        with phase("backward"):
            out.loss.backward()
        with phase("clip"):
            if cfg.optim.clip_grad > 0:
                float(torch.nn.utils.clip_grad_norm_(trainer.method.parameters(), cfg.optim.clip_grad))
        with phase("optimizer"):
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
        with phase("on_step_end"):
            trainer.method.on_step_end(step, trainer.total_steps)


def time_views(trainer: Trainer, batches: Iterator, first: int, count: int) -> float:
    """Seconds per step of the method's views (and, for SimMIM, its masks) alone, on ``count`` batches."""
    method = trainer.method
    start = time.perf_counter()
    for step in range(first, first + count):
        images = next(batches)[0]
        generator = step_generator(trainer.cfg.seed, step)
        views = method.views(images, generator)
        if hasattr(method, "make_mask"):
            method.make_mask(views[0].shape[0], generator, views[0].device)
    return (time.perf_counter() - start) / count


def operator_table(run: Callable[[], None], rows: int) -> str:
    """torch.profiler's operators of ``run()`` sorted by self CPU time."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        run()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)


def python_table(run: Callable[[], None], rows: int) -> str:
    """cProfile's functions of ``run()`` by own time, with their callers' totals."""
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).strip_dirs().sort_stats("tottime").print_stats(rows)
    return "\n".join(line for line in text.getvalue().splitlines() if line.strip())


def profile_pair(name: str, args: argparse.Namespace, report: Callable[[str], None]) -> None:
    import throughput

    targs = throughput.parse_args(["--batch-size", str(args.batch_size), "--img-size", str(args.img_size),
                                   "--steps", str(3 * args.steps + args.warmup + 10), "--warmup", "0",
                                   "--num-images", str(args.num_images), "--device", args.device,
                                   "--out", args.out, *args.overrides])
    cfg = throughput.pair_config(name, targs, str(throughput.data_folder(targs)), Path(args.out) / "work" / name)
    shutil.rmtree(cfg.out, ignore_errors=True)
    trainer = Trainer(cfg, progress=False)
    trainer.method.train()
    batches = trainer._batches(0)
    timer = PhaseTimer(trainer.device)
    engine_steps(trainer, batches, 0, args.warmup, None)
    engine_steps(trainer, batches, args.warmup, args.steps, timer)
    per_step = sum(timer.seconds.values()) / args.steps
    views = time_views(trainer, batches, args.warmup + args.steps, args.steps)
    lines = [f"## {name}: {cfg.method} on {cfg.backbone}, batch {cfg.batch_size}, {cfg.backbone_opts['img_size']} px, "
             f"{cfg.precision}, {torch.get_num_threads()} threads",
             f"{per_step:.3f} s per step = {cfg.batch_size / per_step:.1f} img/s over {args.steps} steps",
             "| phase | s per step | share |", "|---|---|---|"]
    for phase in PHASES:
        seconds = timer.seconds.get(phase, 0.0) / args.steps
        lines.append(f"| {phase} | {seconds:.4f} | {100 * seconds / per_step:.1f}% |")
    lines.append(f"| (views/masks alone, inside training_step) | {views:.4f} | {100 * views / per_step:.1f}% |")
    report("\n".join(lines))
    first = args.warmup + 2 * args.steps
    report("torch.profiler, operators by self CPU time:\n" + operator_table(
        lambda: engine_steps(trainer, batches, first, args.steps, PhaseTimer(trainer.device)), args.rows))
    report("cProfile, functions by own time:\n" + python_table(
        lambda: engine_steps(trainer, batches, first + args.steps, args.steps, None), args.rows))
    batches.close()
    shutil.rmtree(cfg.out, ignore_errors=True)


def profile_data_path(args: argparse.Namespace, report: Callable[[str], None]) -> None:
    from bench_report import write_image_folder
    from data_throughput import MEAN, STD, view_specs

    from selfsight.data import open_images
    from selfsight.data.views import make_views

    size = args.data_size
    out_size = min(size, 224)
    folder = write_image_folder(Path(args.out) / "images" / f"jpeg{size}_256", 256, size, seed=0)
    images = open_images(str(folder), 3, out_size, in_memory_limit=0, progress=False)
    batch = torch.arange(64)
    images.load_batch(batch)  # file cache, lazy imports
    start = time.perf_counter()
    pixels, _ = images.load_batch(batch)
    decode = time.perf_counter() - start
    report(f"## data path: {size}-px JPEGs -> {out_size} px, batch 64\n"
           f"load_batch (decode, one process): {decode:.3f} s = {64 / decode:.0f} img/s\n"
           "cProfile of load_batch:\n" + python_table(lambda: images.load_batch(batch + 64), args.rows))
    specs = view_specs(out_size)
    run_views = lambda: make_views(pixels, specs, MEAN, STD, generator=step_generator(0, 0))
    run_views()
    start = time.perf_counter()
    run_views()
    views = time.perf_counter() - start
    report(f"SimCLR's two batched views of the 64 images: {views:.3f} s = {64 / views:.0f} img/s "
           f"({torch.get_num_threads()} threads)\ntorch.profiler of the views:\n"
           + operator_table(run_views, args.rows))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import throughput

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="*", choices=list(throughput.PAIRS), default=list(throughput.PAIRS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--num-images", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="steps per measurement (3 measurements per pair)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-size", type=int, default=256, help="JPEG side for the data path; 0 skips it")
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--out", default="runs/bench_profile")
    parser.add_argument("overrides", nargs="*", help="selfsight config overrides (key=value), as throughput.py")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chunks: list[str] = []

    def report(text: str) -> None:
        print(text + "\n", flush=True)
        chunks.append(text)
        (out / "profile.txt").write_text("\n\n".join(chunks) + "\n")

    for name in args.pairs:
        profile_pair(name, args, report)
    if args.data_size:
        profile_data_path(args, report)


if __name__ == "__main__":
    main()
