"""Training throughput (images per second) of selfsight against a baseline, for the same method, timm model,
batch size, input size, optimizer (AdamW, the same clipping), precision and thread count.

    bash benchmarks/setup_peer.sh     # once: lightly into benchmarks/.peer (see throughput_baselines.py)
    .venv/bin/python -m pip install --no-deps --target benchmarks/.peer lightning-utilities  # lightly.transforms
    .venv/bin/python benchmarks/throughput.py                      # every pair, on the CPU
    .venv/bin/python benchmarks/throughput.py --pairs byol-resnet18 --rounds 5 --steps 30
    .venv/bin/python benchmarks/throughput.py --device cuda --batch-size 256   # bf16 autocast, channels_last CNNs

Pairs (selfsight against): SimMIM on a ViT (lightly's SimMIM example on MaskedVisionTransformerTIMM), SimMIM on
a Swin (a plain reference loop: torchvision per-image transforms, DataLoader, the SimMIM loss written out),
BYOL and SimCLR on a ResNet-18 (lightly's modules, losses and transforms). Two more pairs measure a method
against another method of selfsight on the same ViT, batch and input: MAE (mask 0.75, only the visible tokens
encoded) against SimMIM (every token encoded), goal MAE >= 2.5x SimMIM's img/s:

    .venv/bin/python benchmarks/throughput.py --pairs mae-vit mae-vit-demo --rounds 3 --steps 10

selfsight's side is its real training loop: ``selfsight.engine.Trainer(cfg).fit()`` with ``steps = warm-up +
timed`` on an in-memory image set (a folder of seeded synthetic PNGs, decoded once by ``open_images``), and the
img/s of the timed steps read back from the run's metrics.jsonl (``log_every=1``: one window per step, so the
warm-up steps are left out exactly). Everything a step of the engine does is in the timed window: batch
indexing, the batched views/masks, forward, loss, ``loss.item()``, backward, gradient clipping, AdamW, EMA
update, metrics line. The checkpoint written at the end of ``fit`` is not.

The baseline's side: the same images (the same uint8 array) in a torch Dataset that hands out PIL images, the
baseline's per-image transforms in a DataLoader (``--peer-workers`` workers), its model on the same timm model
(the same options and seed), AdamW with selfsight's lr, betas, weight decay, warm-up/cosine lr and clipping;
timed over the same number of steps after the same warm-up.

The two sides alternate (A B, B A, A B, ...: ``--rounds`` rounds) because the machine is shared and noisy; the
table gives the median img/s of each side and their ratio (selfsight / baseline). JSON results and the table
go to --out (default runs/bench_throughput, git-ignored). CUDA: untested so far (no GPU was available when
this was written); it uses bf16 autocast, channels_last for CNNs and fused AdamW on both sides.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bench_report import (
    machine_info,
    markdown_table,
    median_img_per_s,
    run_rounds,
    save_results,
    write_image_folder,
    write_json,
)
from torch.utils.data import DataLoader

from selfsight.backbones import Backbone, parse_backbone_opts
from selfsight.config import PretrainConfig, build_config, to_dict
from selfsight.data import ImageSet, open_images
from selfsight.engine import Trainer, lr_factor, resolve_device


@dataclass(frozen=True)
class Pair:
    """One comparison: a selfsight method on a timm backbone, and which baseline it is measured against."""

    method: str
    backbone: str
    backbone_opts: tuple[str, ...]  # key=value, as on selfsight's command line; img_size comes from --img-size
    baseline: str  # "lightly", "reference", or another selfsight method ("simmim") on the same backbone
    goal: float = 1.3  # selfsight / baseline img/s to reach


#: baselines that are selfsight itself, running another method on the same backbone and config
SELFSIGHT_BASELINES = ("simmim",)


PAIRS: dict[str, Pair] = {
    # a ViT-tiny-like ViT: ViT-Tiny's width and heads, 6 blocks, 4-px patches (8 x 8 tokens at 32 px)
    "simmim-vit": Pair("simmim", "vit_tiny_patch16_224",
                       ("patch_size=4", "embed_dim=192", "depth=6", "num_heads=3"), "lightly"),
    # a small Swin: 2-px patches (16 x 16 tokens at 32 px), windows of 4, three stages of 2 blocks
    "simmim-swin": Pair("simmim", "swin_tiny_patch4_window7_224",
                        ("patch_size=2", "window_size=4", "embed_dim=48", "depths=2,2,2", "num_heads=3,6,12"),
                        "reference"),
    "byol-resnet18": Pair("byol", "resnet18", (), "lightly"),
    "simclr-resnet18": Pair("simclr", "resnet18", (), "lightly"),
    # MAE against SimMIM, both selfsight: the ViT-tiny-like ViT above, and the demo's ViT (28 px, 1 channel,
    # 4-px patches: 7 x 7 tokens, width 128, 6 blocks); run the latter with --img-size 28
    "mae-vit": Pair("mae", "vit_tiny_patch16_224",
                    ("patch_size=4", "embed_dim=192", "depth=6", "num_heads=3"), "simmim", goal=2.5),
    "mae-vit-demo": Pair("mae", "vit_tiny_patch16_224",
                         ("in_chans=1", "patch_size=4", "embed_dim=128", "depth=6", "num_heads=4"), "simmim",
                         goal=2.5),
}
PAIRS_NEEDING_LIGHTLY = [name for name, pair in PAIRS.items() if pair.baseline == "lightly"]


# --- configuration ----------------------------------------------------------------------------------------------


def pair_config(name: str, args: argparse.Namespace, data: str, out: Path,
                method: str | None = None) -> PretrainConfig:
    """selfsight's config of pair ``name``: its method's (or ``method``'s) defaults, the pair's backbone, the
    benchmark's batch, input size, device, precision and step count, then the command line's key=value
    overrides (``method.*`` ones only for the pair's own method, not for a selfsight baseline's)."""
    pair = PAIRS[name]
    overrides = [o for o in args.overrides if method is None or not o.startswith(("method.", "method_config."))]
    opts = [f"img_size={args.img_size}", "in_chans=3", *pair.backbone_opts,
            *(o.split(":", 1)[1] for o in args.backbone_opts if o.split(":", 1)[0] == name)]
    return build_config(
        None,
        overrides,
        method=method or pair.method,
        backbone=pair.backbone,
        backbone_opts=parse_backbone_opts(opts),
        data=data,
        out=str(out),
        steps=args.warmup + args.steps,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        log_every=1,
        ckpt_every=args.warmup + args.steps + 1,
        keep_checkpoints=1,
    )


def channels_last_of(cfg: PretrainConfig, backbone: Backbone) -> bool:
    """The memory format selfsight's engine picks (its default: channels_last for CNNs)."""
    return cfg.channels_last if cfg.channels_last is not None else backbone.family == "cnn"


# --- selfsight's side -------------------------------------------------------------------------------------------


def measure_selfsight(cfg: PretrainConfig, warmup: int) -> dict[str, Any]:
    """Runs selfsight's Trainer for ``cfg.steps`` steps; img/s over the steps after ``warmup`` from metrics.jsonl."""
    run_dir = Path(cfg.out)
    shutil.rmtree(run_dir, ignore_errors=True)
    summary = Trainer(cfg, progress=False).fit()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    timed = [r for r in records if "img_per_s" in r and r["step"] > warmup]
    seconds = [cfg.batch_size / r["img_per_s"] for r in timed]
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints of big heads are large
    return {
        "img_per_s": len(timed) * cfg.batch_size / sum(seconds),
        "timed_steps": len(timed),
        "seconds_per_step": [round(s, 4) for s in seconds],
        "final_loss": summary["final_loss"],
    }


# --- the baseline's side ----------------------------------------------------------------------------------------


def endless(loader: DataLoader) -> Iterator[Any]:
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_baseline(name: str, cfg: PretrainConfig, images: ImageSet, mean: list[float], std: list[float],
                     workers: int, warmup: int, memory_format: str = "same") -> dict[str, Any]:
    """Trains the baseline of pair ``name`` for ``cfg.steps`` steps; img/s over the steps after ``warmup``.

    memory_format: ``same`` gives the baseline's model selfsight's memory format (channels_last for CNNs),
    ``contiguous`` leaves it as lightly's examples do."""
    from throughput_baselines import ArrayImages, build_baseline

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)  # the same initialisation of the timm model as selfsight's Trainer draws
    backbone = Backbone(cfg.backbone, cfg.backbone_opts)
    baseline = build_baseline(PAIRS[name].baseline, cfg.method, backbone, cfg, mean, std)
    model = baseline.model.to(device)
    if memory_format == "same" and channels_last_of(cfg, backbone):
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(baseline.trained, cfg, device)
    pixels = images.get_batch(torch.arange(images.num_images)).permute(0, 2, 3, 1).contiguous().numpy()
    loader = DataLoader(ArrayImages(pixels, baseline.transform), batch_size=cfg.batch_size, shuffle=True,
                        drop_last=True, num_workers=workers, persistent_workers=workers > 0,
                        pin_memory=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    total = int(cfg.steps)
    batches = endless(loader)
    model.train()
    start = 0.0
    for step in range(total):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr * lr_factor(step, total, warmup, cfg.optim.min_lr_ratio)
        batch = next(batches)
        with autocast:
            loss = baseline.step_fn(model, batch, step, total, device)
        loss.backward()
        if cfg.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    seconds = time.perf_counter() - start
    final_loss = float(loss.detach())
    del batches, loader  # stops the workers
    timed = total - warmup
    return {"img_per_s": timed * cfg.batch_size / seconds, "timed_steps": timed,
            "seconds_per_step_mean": round(seconds / timed, 4), "final_loss": final_loss,
            "implementation": baseline.name}


def make_optimizer(modules: list[torch.nn.Module], cfg: PretrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with selfsight's lr, betas and weight decay; no decay on norms and biases (lightly's split, which
    every baseline uses); fused on CUDA, torch's default (per-tensor) AdamW on the CPU, as lightly's examples and
    most training scripts use it (selfsight's engine uses the fused AdamW on the CPU too: part of its speed)."""
    from lightly.models.utils import get_weight_decay_parameters

    decay, no_decay = get_weight_decay_parameters(modules)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, **fused)


# --- one pair ---------------------------------------------------------------------------------------------------


def data_folder(args: argparse.Namespace) -> Path:
    """The seeded synthetic RGB images both sides train on (PNG, lossless: both see the same pixels)."""
    root = Path(args.out) / "data" / f"rgb{args.img_size}_{args.num_images}"
    return write_image_folder(root, args.num_images, args.img_size, seed=0, fmt="PNG")


def measure_pair(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """ABAB rounds of selfsight and its baseline on pair ``name``; medians and ratio."""
    folder = data_folder(args)
    cfg = pair_config(name, args, str(folder), Path(args.out) / "work" / name)
    backbone = Backbone(cfg.backbone, cfg.backbone_opts)
    images = open_images(str(folder), backbone.in_chans, backbone.img_size, progress=False)
    mean, std = images.mean_std()
    print(f"[{name}] {cfg.method} on {backbone.name} ({backbone.describe()['params_m']}M parameters), batch "
          f"{cfg.batch_size}, {cfg.backbone_opts['img_size']} px, {cfg.precision}, {args.warmup} warm-up + "
          f"{args.steps} timed steps, {args.rounds} rounds", flush=True)
    pair = PAIRS[name]
    if pair.baseline in SELFSIGHT_BASELINES:  # the same engine, another method, the same backbone and config
        other = pair_config(name, args, str(folder), Path(args.out) / "work" / f"{name}-{pair.baseline}",
                            method=pair.baseline)
        baseline = lambda: {**measure_selfsight(other, args.warmup),  # noqa: E731
                            "implementation": f"selfsight {pair.baseline}"}
    else:
        baseline = lambda: measure_baseline(name, cfg, images, mean, std, args.peer_workers,  # noqa: E731
                                            args.warmup, args.baseline_memory_format)
    measurements = run_rounds(args.rounds, {"selfsight": lambda: measure_selfsight(cfg, args.warmup),
                                            "baseline": baseline}, name)
    ours, theirs = median_img_per_s(measurements["selfsight"]), median_img_per_s(measurements["baseline"])
    return {
        "pair": name,
        "method": cfg.method,
        "backbone": backbone.describe(),
        "baseline": measurements["baseline"][0]["implementation"],
        "batch_size": cfg.batch_size,
        "img_size": backbone.img_size,
        "precision": cfg.precision,
        "channels_last": channels_last_of(cfg, backbone),
        "baseline_memory_format": args.baseline_memory_format,
        "peer_workers": args.peer_workers,
        "method_config": to_dict(cfg.method_config),
        "optim": to_dict(cfg.optim),
        "selfsight_img_per_s": round(ours, 2),
        "baseline_img_per_s": round(theirs, 2),
        "ratio": round(ours / theirs, 3),
        "goal": pair.goal,
        "goal_met": ours / theirs >= pair.goal,
        "measurements": measurements,
    }


# --- output -----------------------------------------------------------------------------------------------------


def results_table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        rounds = lambda side, r=r: ", ".join(f"{m['img_per_s']:.0f}" for m in r["measurements"][side])
        rows.append([r["pair"], f"{r['backbone']['name']} ({r['backbone']['params_m']}M)", r["baseline"],
                     f"{r['batch_size']} x {r['img_size']} px",
                     f"**{r['selfsight_img_per_s']:.1f}** ({rounds('selfsight')})",
                     f"**{r['baseline_img_per_s']:.1f}** ({rounds('baseline')})",
                     f"**{r['ratio']:.2f}x**", f"{r['goal']}x: " + ("met" if r["goal_met"] else "not met")])
    header = ["pair", "backbone", "baseline", "batch", "selfsight img/s (median; rounds)",
              "baseline img/s (median; rounds)", "ratio", "goal"]
    return markdown_table(header, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=list(PAIRS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones, each run")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--num-images", type=int, default=2048, help="synthetic images in the in-memory set")
    parser.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: fp32 on the CPU, bf16 autocast on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--peer-workers", type=int, default=2, help="DataLoader workers of the baseline")
    parser.add_argument("--baseline-memory-format", choices=["same", "contiguous"], default="same",
                        help="same: the baseline's model gets selfsight's memory format (channels_last for CNNs); "
                        "contiguous: PyTorch's default, as lightly's examples leave it")
    parser.add_argument("--backbone-opt", action="append", default=[], dest="backbone_opts",
                        metavar="PAIR:KEY=VALUE", help="change a backbone option of one pair, repeatable")
    parser.add_argument("--out", default="runs/bench_throughput")
    parser.add_argument("overrides", nargs="*", help="selfsight config overrides for every pair (key=value); the "
                        "baseline takes head sizes, mask ratio, crops and optimizer from the same config")
    args = parser.parse_args(argv)
    if args.precision == "auto":
        args.precision = "bf16" if resolve_device(args.device).type == "cuda" else "fp32"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if set(args.pairs) & set(PAIRS_NEEDING_LIGHTLY):
        import peer_lightly  # noqa: F401  (puts benchmarks/.peer on sys.path; fails now when lightly is missing)

    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/throughput.py", *(sys.argv[1:] if argv is None else argv)])
    device = resolve_device(args.device)
    machine = machine_info(device)
    print(f"machine: {machine['cpu']}, {machine['cpus']} CPUs, torch {machine['torch']} with "
          f"{machine['torch_threads']} threads, device {device}{' (' + machine['gpu'] + ')' if machine['gpu'] else ''},"
          f" load {machine['load_average_at_start']}", flush=True)
    out = Path(args.out)
    results = []
    started = time.perf_counter()
    for name in args.pairs:
        result = measure_pair(name, args)
        results.append(result)
        write_json(out / f"{name}.json", {**result, "command": command, "machine": machine})
        print(f"[{name}] selfsight {result['selfsight_img_per_s']:.1f} img/s, baseline "
              f"{result['baseline_img_per_s']:.1f} img/s: {result['ratio']:.2f}x", flush=True)
    table = results_table(results)
    setup = (f"Baseline: {args.peer_workers} DataLoader workers, memory format {args.baseline_memory_format}; "
             "selfsight: in-memory data, its default memory format (channels_last for CNNs).\n")
    save_results(out, command, machine, results, started, table, setup)


if __name__ == "__main__":
    main()
