"""Data-path throughput: decoding and augmenting a folder of JPEGs, selfsight's loader against torchvision's
ImageFolder with its transforms, with the same DataLoader workers, batch size and output views.

    .venv/bin/python benchmarks/data_throughput.py
    .venv/bin/python benchmarks/data_throughput.py --sizes 256 --images 1024 --workers 1 --rounds 5

For each source size (default 64, 256 and 512 px) a folder of seeded synthetic JPEGs is written once (under
--out/images), then both sides produce, batch after batch, SimCLR's two augmented views of every image at the
same output size (``min(source size, 224)`` unless --out-size):

- selfsight: ``open_images(folder, in_memory_limit=0)`` (the lazy path, as for a folder too large for memory),
  ``BatchStream`` with W workers, each decoding a whole batch (Pillow, JPEG draft mode, centre square resized to
  the output size) and building its batched views as the engine does on the CPU (``worker_views_for``:
  ``make_views`` with ``SimCLR.Config().two_view_specs`` from the step's generator: crop, flip, colour jitter
  with the YIQ hue, grayscale, blur); the main process takes them back as SimCLR's ``Method.views`` does
  (``PreparedViews.restore``). ``--views-in main`` builds the views in the main process instead (the path
  before 2026-11-28, and still the GPU's).
- torchvision: ``ImageFolder`` + ``transforms`` per image in the W workers (RandomResizedCrop from the full
  image, flip, ColorJitter(0.8, 0.8, 0.8, 0.2) p 0.8, RandomGrayscale 0.2, GaussianBlur p 0.5 with selfsight's
  kernel size and sigmas, ToTensor, Normalize), twice per image, batched by a DataLoader (shuffled).

Images/s is timed over the batches after the first ``--warmup`` (worker start-up excluded). The two sides
alternate (A B, B A, ...) for --rounds rounds; the table gives the median of each and the ratio.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms as T
from bench_report import (
    machine_info,
    markdown_table,
    median_img_per_s,
    run_rounds,
    save_results,
    write_image_folder,
)
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from selfsight.data import BatchStream, open_images
from selfsight.data.views import ViewSpec, blur_kernel_size, make_views
from selfsight.data.worker_views import SpecViews, WorkerViews
from selfsight.engine import step_generator
from selfsight.methods.simclr import SimCLR

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # any fixed normalisation; both sides use it
SEED = 0


def view_specs(out_size: int) -> list[ViewSpec]:
    """SimCLR's two view recipes at ``out_size`` px on RGB images (selfsight's defaults, adapted to the size)."""
    return SimCLR.Config().two_view_specs(out_size, 3)


# --- selfsight --------------------------------------------------------------------------------------------------


def selfsight_batches(folder: Path, out_size: int, batch_size: int, workers: int,
                      views_in: str = "workers") -> Iterator[list[torch.Tensor]]:
    """selfsight's path: lazy folder -> BatchStream whose workers decode whole batches and (views_in
    "workers") build their SimCLR views, or (views_in "main") batched SimCLR views in this process."""
    images = open_images(str(folder), 3, out_size, in_memory_limit=0, progress=False)
    specs = view_specs(out_size)
    if views_in == "main":
        for step, (pixels, _) in enumerate(BatchStream(images, batch_size, SEED, num_workers=workers)):
            yield make_views(pixels, specs, MEAN, STD, generator=step_generator(SEED, step))
        return
    maker = SpecViews(tuple(specs), torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1))
    stream = BatchStream(images, batch_size, SEED, num_workers=workers,
                         views=WorkerViews(maker, partial(step_generator, SEED)))
    for step, (prepared, _) in enumerate(stream):
        yield prepared.restore(step_generator(SEED, step))  # what Method.views does with them


# --- torchvision ------------------------------------------------------------------------------------------------


class TwoViews:
    """Applies a per-image transform twice: PIL image -> [view 1, view 2]."""

    def __init__(self, transform: Callable[[Any], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> list[torch.Tensor]:
        return [self.transform(image), self.transform(image)]


def torchvision_transform(spec: ViewSpec) -> T.Compose:
    """torchvision's per-image equivalent of one selfsight view recipe (SimCLR's: no solarisation)."""
    kernel = blur_kernel_size(spec.blur_sigma[1], spec.size, spec.size)
    return T.Compose([
        T.RandomResizedCrop(spec.size, scale=spec.crop_scale, ratio=spec.crop_ratio),
        T.RandomHorizontalFlip(spec.hflip_p),
        T.RandomApply([T.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)], p=spec.jitter_p),
        T.RandomGrayscale(spec.grayscale_p),
        T.RandomApply([T.GaussianBlur(kernel, sigma=spec.blur_sigma)], p=spec.blur_p),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def torchvision_batches(folder: Path, out_size: int, batch_size: int, workers: int) -> Iterator[list[torch.Tensor]]:
    """torchvision's path: ImageFolder with the two-view transform in a DataLoader, epoch after epoch."""
    dataset = ImageFolder(str(folder), transform=TwoViews(torchvision_transform(view_specs(out_size)[0])))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                        persistent_workers=workers > 0)
    while True:
        for views, _ in loader:
            yield views


# --- timing -----------------------------------------------------------------------------------------------------


def time_batches(batches: Iterator[list[torch.Tensor]], batch_size: int, warmup: int, timed: int,
                 out_size: int) -> dict[str, Any]:
    """Images/s of ``timed`` batches after ``warmup`` ones; checks that each batch is two [B, 3, S, S] views."""
    start = 0.0
    for index in range(warmup + timed):
        if index == warmup:
            start = time.perf_counter()
        views = next(batches)
        if len(views) != 2 or tuple(views[0].shape) != (batch_size, 3, out_size, out_size):
            raise SystemExit(f"unexpected views: {[tuple(v.shape) for v in views]}")
    seconds = time.perf_counter() - start
    batches.close()  # stops the workers
    return {"img_per_s": timed * batch_size / seconds, "timed_batches": timed, "seconds": round(seconds, 3)}


def measure_size(size: int, args: argparse.Namespace) -> dict[str, Any]:
    """Both sides on the folder of ``size``-px JPEGs, alternating, for ``args.rounds`` rounds."""
    folder = write_image_folder(Path(args.out) / "images" / f"jpeg{size}_{args.images}", args.images, size, SEED)
    out_size = args.out_size or min(size, 224)
    timed = args.batches or max(1, args.images // args.batch_size - args.warmup)
    print(f"[{size} px] {args.images} JPEGs -> two {out_size}-px views each, batch {args.batch_size}, "
          f"{args.workers} workers, {args.warmup} + {timed} batches, {args.rounds} rounds", flush=True)
    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "selfsight": lambda: time_batches(
            selfsight_batches(folder, out_size, args.batch_size, args.workers, args.views_in),
            args.batch_size, args.warmup, timed, out_size),
        "torchvision": lambda: time_batches(torchvision_batches(folder, out_size, args.batch_size, args.workers),
                                            args.batch_size, args.warmup, timed, out_size),
    }
    measurements = run_rounds(args.rounds, runs, f"{size} px")
    ours, theirs = median_img_per_s(measurements["selfsight"]), median_img_per_s(measurements["torchvision"])
    return {"source_size": size, "out_size": out_size, "images": args.images, "batch_size": args.batch_size,
            "workers": args.workers, "views_in": args.views_in,
            "selfsight_img_per_s": round(ours, 1), "torchvision_img_per_s": round(theirs, 1),
            "ratio": round(ours / theirs, 3), "measurements": measurements}


# --- main -------------------------------------------------------------------------------------------------------


def results_table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        rounds = lambda side, r=r: ", ".join(f"{m['img_per_s']:.0f}" for m in r["measurements"][side])
        rows.append([f"{r['source_size']} px", f"{r['out_size']} px", str(r["batch_size"]), str(r["workers"]),
                     f"**{r['selfsight_img_per_s']:.0f}** ({rounds('selfsight')})",
                     f"**{r['torchvision_img_per_s']:.0f}** ({rounds('torchvision')})", f"**{r['ratio']:.2f}x**"])
    header = ["JPEG size", "views", "batch", "workers", "selfsight img/s (median; rounds)",
              "torchvision img/s (median; rounds)", "ratio"]
    return markdown_table(header, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 512], help="JPEG sides in pixels")
    parser.add_argument("--images", type=int, default=768, help="JPEGs per size")
    parser.add_argument("--out-size", type=int, default=None, help="view side (default: min(size, 224))")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, both sides")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches at the start of each run")
    parser.add_argument("--batches", type=int, default=None, help="timed batches (default: one epoch's rest)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    parser.add_argument("--views-in", choices=["workers", "main"], default="workers",
                        help="where selfsight builds the views: in the DataLoader workers (the CPU training "
                             "path of lazily decoded data) or batched in the main process (the path before)")
    parser.add_argument("--out", default="runs/bench_data_throughput")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/data_throughput.py", *(sys.argv[1:] if argv is None else argv)])
    machine = machine_info(torch.device("cpu"))
    print(f"machine: {machine['cpu']}, {machine['cpus']} CPUs, torch {machine['torch']} with "
          f"{machine['torch_threads']} threads, load {machine['load_average_at_start']}", flush=True)
    started = time.perf_counter()
    results = [measure_size(size, args) for size in args.sizes]
    save_results(Path(args.out), command, machine, results, started, results_table(results))


if __name__ == "__main__":
    main()
