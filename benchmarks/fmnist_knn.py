"""Contrastive and self-distillation methods on Fashion-MNIST: each one pre-trained on the 60,000 training
images (no labels) for the same CPU budget, then k-NN (k=20) with all 60,000 training labels and a linear
probe with 600 of them (60 per class; 5 label draws, mean ± std), both on the 10,000 test images.

    .venv/bin/python benchmarks/fmnist_knn.py --minutes 30
    bash benchmarks/setup_peer.sh   # once: lightly into benchmarks/.peer, outside selfsight's dependencies
    .venv/bin/python benchmarks/fmnist_knn.py --methods byol simclr --peer lightly

With ``--peer lightly``, lightly's BYOL and SimCLR (benchmarks/peer_lightly.py) run right after selfsight's,
with the same backbone, batch size, data order, views, optimizer and time budget.

Every result is written to OUT/<name>/result.json as soon as it is measured, and a name whose result.json
exists is not measured again (``--force`` does), so the benchmark can be split over several invocations;
an interrupted selfsight pre-training resumes from its checkpoints. At the end every result found in OUT is
printed as a markdown table, with the goals evaluated on them, and written to OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from selfsight.backbones import Backbone, parse_backbone_opts
from selfsight.checkpoint import list_checkpoints, load_run_backbone
from selfsight.config import DEFAULT_DATA_DIR, PretrainConfig, build_config, to_dict
from selfsight.data import ImageSet, open_images
from selfsight.engine import Interrupted, pretrain, resolve_device
from selfsight.errors import SelfsightError
from selfsight.eval.api import EvalConfig
from selfsight.eval.features import extract_features, pixels_to_input
from selfsight.eval.knn import knn_scores, top1
from selfsight.eval.linear import LINEAR_DEFAULTS, linear_probe
from selfsight.eval.splits import few_label_indices

METHODS = ("moby", "byol", "mocov2", "simclr", "dino", "pixpro", "pic")
PEER_METHODS = ("byol", "simclr")  # the methods benchmarks/peer_lightly.py implements

# Per-method overrides (key=value, as on the command line), applied before the command line's own.
# Chosen for a short CPU run of a small CNN on 28-px Fashion-MNIST (see docs/benchmarks.md):
# - crops keep 50-100% of the image (crop_scale=[0.5,1]) for every method: Fashion-MNIST's objects are centred
#   and 28 px small; in 5-minute SimCLR probes with the k-NN monitor, (0.5, 1) led (0.2, 1) by 2-3 points;
# - heads of 1,024 hidden units instead of the papers' 2,048-4,096: at 28 px a 4,096-wide MLP costs about
#   as much per image as the backbone itself (lightly's CIFAR-10 benchmarks use 1,024/512 too);
# - momentum 0.99 (not 0.996 / 0.999): a few thousand steps, not hundreds of thousands;
# - MoCo v2 queue 4,096 (not 65,536, more keys than Fashion-MNIST has images);
# - DINO: 4 local crops (not 8) and 4,096 prototypes (not 65,536): the head's cost does not shrink with the
#   crop, so the paper's head and 8 crops would spend the budget on the head; AdamW lr 5e-4, wd 0.04 (paper).
CROPS = "method.crop_scale=[0.5,1]"
RECIPES: dict[str, list[str]] = {
    "moby": [CROPS, "method.proj_hidden_dim=1024", "method.pred_hidden_dim=1024"],
    "byol": [CROPS, "method.proj_hidden_dim=1024", "method.pred_hidden_dim=1024", "method.base_momentum=0.99"],
    "mocov2": [CROPS, "method.queue_size=4096", "method.momentum=0.99"],
    "simclr": [CROPS, "method.proj_hidden_dim=1024"],
    "dino": [CROPS, "lr=5e-4", "optim.weight_decay=0.04", "method.num_local_crops=4", "method.hidden_dim=1024",
             "method.out_dim=4096", "method.base_momentum=0.99"],
    # PixPro reads the last feature map: 2 x 2 cells at 42 px on this backbone (stride 32), so each view has 4
    # pixels and positive pairs are whole quarter-images; the same crops and head width as the others
    "pixpro": [CROPS, "method.proj_hidden_dim=1024", "method.pred_hidden_dim=1024"],
    # PIC: one class per training image (60,000), its multi-crop (1 large, 3 small crops) and sliding window
    "pic": [CROPS, "method.hidden_dim=1024"],
}

DEFAULT_BACKBONE = "resnet18"
# one block per stage, 32-256 channels (1.24M parameters): in the recipe probes of docs/benchmarks.md it beat the
# two-block 32-256 and 16-128 networks at the same number of images. The 28-px images are read at 42 px: the
# stride-4 stem leaves 11 x 11 instead of 7 x 7, which keeps the details that tell pullover, coat and shirt apart
# (docs/benchmarks.md, run 4: SimCLR 86.06% k-NN in 18 minutes at 42 px, 85.05% at 28 px); about 310 img/s here
DEFAULT_BACKBONE_OPTS = ["in_chans=1", "img_size=42", "channels=32,64,128,256", "layers=1,1,1,1"]
NATIVE_SIZE = 28  # Fashion-MNIST's resolution: the raw-pixel baselines use it, whatever the backbone reads

FULL_TRAIN, FULL_TEST = 60000, 10000  # Fashion-MNIST
LABELS_PER_CLASS = 60  # 600 labels for the linear probe
SPLIT_SEED = 0
LINEAR_DRAWS = 5  # label draws of the linear probe (seeds SPLIT_SEED, +1, ...): mean ± std, as the eval API reports
RAW_PIXEL_KNN = 0.858  # k-NN (k=20) on raw pixels, all 60,000 labels, measured on this machine
RAW_PIXEL_LOGREG_600 = 0.786  # logistic regression on raw pixels, the same 600 labels, measured on this machine
GOAL_BEST_KNN = 0.89
GOAL_LINEAR_MARGIN = 0.05  # the best 600-label linear probe beats RAW_PIXEL_LOGREG_600 by 5 points


# --- data and evaluation ----------------------------------------------------------------------------------------


class EvalData:
    """The labeled train and test sets, opened once per (channels, size) and shared by every entry."""

    def __init__(self, data_dir: str, max_images: int | None = None) -> None:
        self.data_dir = data_dir
        self.max_images = max_images  # smoke tests: only the first max_images of each set
        self._sets: dict[tuple[int, int], tuple[ImageSet, ImageSet]] = {}

    def get(self, in_chans: int, img_size: int) -> tuple[ImageSet, ImageSet]:
        key = (in_chans, img_size)
        if key not in self._sets:
            self._sets[key] = tuple(open_images(f"{self.data_dir}:{split}", in_chans, img_size)
                                    for split in ("train", "test"))
        return self._sets[key]

    def subset(self, images: ImageSet) -> torch.Tensor:
        """LongTensor [N]: the images evaluated, all of them unless max_images is set."""
        return torch.arange(min(images.num_images, self.max_images or images.num_images))


KNN_DEFAULTS = EvalConfig(kind="knn")  # the eval API's temperature
KNN_K = 20  # the eval API's k where it is not tuned (EvalConfig.k is None: tuned over KNN_KS, or 20)


def benchmark_knn_scores(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                         num_classes: int) -> torch.Tensor:
    """The benchmark's k-NN (k=20, the eval API's temperature): class scores [M, num_classes] of test_feats [M, D]."""
    return knn_scores(train_feats, train_labels, test_feats, num_classes, k=KNN_K,
                      temperature=KNN_DEFAULTS.temperature)


def probe_features(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                   test_labels: torch.Tensor) -> dict[str, Any]:
    """k-NN with every training label and the linear probe with 600 of them (LINEAR_DRAWS label draws), on frozen
    features [N, D] / [M, D]."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = benchmark_knn_scores(train_feats, train_labels, test_feats, num_classes)
    draws = []
    for seed in range(SPLIT_SEED, SPLIT_SEED + LINEAR_DRAWS):
        labeled = few_label_indices(train_labels, LABELS_PER_CLASS, seed=seed)
        draws.append(linear_probe(train_feats[labeled], train_labels[labeled], test_feats, test_labels, num_classes,
                                  **LINEAR_DEFAULTS).top1)
    return {"knn_top1": top1(scores, test_labels), "linear_top1_600": statistics.fmean(draws),
            "linear_top1_600_std": statistics.stdev(draws) if len(draws) > 1 else 0.0, "linear_top1_600_draws": draws,
            "linear_seeds": list(range(SPLIT_SEED, SPLIT_SEED + LINEAR_DRAWS)), "num_labels_linear": len(labeled),
            "num_train": int(train_labels.numel()), "num_test": int(test_labels.numel()),
            "knn_k": KNN_K, "knn_temperature": KNN_DEFAULTS.temperature, "linear": dict(LINEAR_DEFAULTS),
            "feature_dim": int(train_feats.shape[1])}


def evaluate_backbone(backbone: Backbone, mean: list[float], std: list[float], data: EvalData,
                      device: torch.device) -> dict[str, Any]:
    """The same protocol for every implementation: eval-default features (last layer, avg pool), then probes."""
    start = time.perf_counter()
    train, test = data.get(backbone.in_chans, backbone.img_size)
    backbone.to(device)
    train_feats, train_labels = extract_features(backbone, train, mean, std, device=device,
                                                 indices=data.subset(train))
    test_feats, test_labels = extract_features(backbone, test, mean, std, device=device, indices=data.subset(test))
    result = probe_features(train_feats, train_labels, test_feats, test_labels)
    result["eval_minutes"] = round((time.perf_counter() - start) / 60, 2)
    return result


def raw_pixel_features(images: ImageSet, subset: torch.Tensor, mean: list[float],
                       std: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised pixels of the images ``subset`` [N] as features [N, C*S*S], with their labels [N]."""
    chunks, labels = [], []
    for batch in subset.split(4096):
        pixels, sources = images.load_batch(batch)
        chunks.append(pixels_to_input(pixels, mean, std).flatten(1))
        labels.append(images.batch_labels(sources))
    return torch.cat(chunks), torch.cat(labels).long()


def raw_pixel_sets(data: EvalData, in_chans: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw-pixel features and labels of train and test at Fashion-MNIST's own size, normalised with train's stats."""
    train, test = data.get(in_chans, NATIVE_SIZE)
    mean, std = train.mean_std()
    return (*raw_pixel_features(train, data.subset(train), mean, std),
            *raw_pixel_features(test, data.subset(test), mean, std))


# --- one entry of the table -------------------------------------------------------------------------------------


def write_json(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(temp, path)


def method_config(method: str, args: argparse.Namespace, out: Path) -> PretrainConfig:
    """The pre-training config of one method: defaults -> RECIPES[method] -> the command line's overrides."""
    return build_config(
        None,
        [*RECIPES.get(method, []), *args.overrides],
        method=method,
        data=f"{args.data_dir}:train",
        out=str(out),
        minutes=None if args.epochs else args.minutes,
        epochs=args.epochs,
        backbone=args.backbone,
        backbone_opts=parse_backbone_opts(args.backbone_opts),
        batch_size=args.batch_size,
    )


def pretrain_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """steps, images seen, minutes and img/s as the table shows them (img/s over the whole pre-training)."""
    seconds = 60 * float(summary["minutes"])
    return {"steps": int(summary["steps"]), "images_seen": int(summary["images_seen"]),
            "pretrain_minutes": round(float(summary["minutes"]), 2),
            "img_per_s": round(summary["images_seen"] / seconds, 1) if seconds > 0 else None}


def run_selfsight(method: str, args: argparse.Namespace, data: EvalData, device: torch.device) -> dict[str, Any]:
    """Pre-train (or resume, or reuse a finished run) and evaluate selfsight's ``method``."""
    folder = Path(args.out) / method
    run = folder / "pretrain"
    cfg = method_config(method, args, run)
    if (run / "pretrain.json").is_file():
        print(f"[{method}] pre-training finished earlier: {run}", flush=True)
        summary = json.loads((run / "pretrain.json").read_text())
    else:
        resume = bool(list_checkpoints(run))
        print(f"[{method}] {'resuming' if resume else 'starting'} pre-training in {run}", flush=True)
        summary = pretrain(cfg, resume=resume)
    backbone, info = load_run_backbone(run)
    return {
        "name": method, "method": method, "implementation": "selfsight",
        **pretrain_summary(summary),
        **evaluate_backbone(backbone, info["mean"], info["std"], data, device),
        "backbone": backbone.describe(), "batch_size": cfg.batch_size, "lr": cfg.optim.lr,
        "weight_decay": cfg.optim.weight_decay, "overrides": [*RECIPES.get(method, []), *args.overrides],
        "method_config": to_dict(cfg.method_config), "run_dir": str(run),
    }


def run_peer(method: str, args: argparse.Namespace, data: EvalData, device: torch.device) -> dict[str, Any]:
    """Train (or reuse the saved weights of) lightly's ``method`` and evaluate it like selfsight's."""
    import peer_lightly  # lightly is needed only here

    name = f"{method}-lightly"
    folder = Path(args.out) / name
    cfg = method_config(method, args, folder)
    weights, summary_path = folder / "backbone.pt", folder / "pretrain.json"
    if weights.is_file() and summary_path.is_file():
        print(f"[{name}] training finished earlier: {folder}", flush=True)
        summary = json.loads(summary_path.read_text())
        backbone = Backbone(cfg.backbone, cfg.backbone_opts)
        backbone.model.load_state_dict(torch.load(weights, map_location="cpu"))
    else:
        print(f"[{name}] training lightly {peer_lightly.lightly_version()} {method} in {folder}", flush=True)
        if cfg.epochs:  # the same number of steps as selfsight's engine plans for --epochs
            steps = max(1, round(cfg.epochs * (FULL_TRAIN // cfg.batch_size)))
            backbone, summary = peer_lightly.run_lightly(method, cfg, steps=steps)
        else:
            backbone, summary = peer_lightly.run_lightly(method, cfg, minutes=cfg.minutes)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(backbone.model.state_dict(), weights.with_name("backbone.pt.tmp"))
        os.replace(weights.with_name("backbone.pt.tmp"), weights)
        write_json(summary_path, summary)
    return {
        "name": name, "method": method, "implementation": f"lightly {summary['lightly_version']}",
        **pretrain_summary(summary),
        **evaluate_backbone(backbone, summary["mean"], summary["std"], data, device),
        "backbone": backbone.describe(), "batch_size": cfg.batch_size, "lr": cfg.optim.lr,
        "weight_decay": cfg.optim.weight_decay, "overrides": [*RECIPES.get(method, []), *args.overrides],
        "method_config": to_dict(cfg.method_config), "run_dir": str(folder),
    }


def run_raw_pixels(args: argparse.Namespace, data: EvalData) -> dict[str, Any]:
    """The baselines of the goals, measured with the same probes: normalised raw pixels as features."""
    start = time.perf_counter()
    opts = parse_backbone_opts(args.backbone_opts)
    result = probe_features(*raw_pixel_sets(data, int(opts.get("in_chans", 1))))
    result["eval_minutes"] = round((time.perf_counter() - start) / 60, 2)
    return {"name": "raw-pixels", "method": "raw pixels", "implementation": "-", "steps": 0, "images_seen": 0,
            "pretrain_minutes": 0.0, "img_per_s": None, **result}


# --- the table --------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _order(result: dict[str, Any]) -> tuple:
    method = result["method"]
    rank = METHODS.index(method) if method in METHODS else (-1 if result["name"] == "raw-pixels" else len(METHODS))
    return rank, result["implementation"] != "selfsight", result["name"]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _linear(result: dict[str, Any]) -> str:
    """The linear probe's mean ± std over its draws; a result measured before the draws (seed 0 alone) says so."""
    if "linear_top1_600_draws" not in result:
        return f"{_pct(result['linear_top1_600'])} (seed 0 only)"
    return f"{_pct(result['linear_top1_600'])} ± {100 * result['linear_top1_600_std']:.2f}"


def results_table(out: Path, command: str) -> str:
    """Markdown: every OUT/*/result.json, the goals on what exists, selfsight next to its peer, the machine."""
    results = sorted((json.loads(p.read_text()) for p in out.glob("*/result.json")), key=_order)
    lines = ["| method | implementation | k-NN top-1 (k=20, 60k labels) | linear top-1 (600 labels, mean ± std "
             f"over {LINEAR_DRAWS} draws) | pre-train minutes | images seen | img/s |", "|---|---|---|---|---|---|---|"]
    partial = False
    for r in results:
        ips = "-" if r.get("img_per_s") is None else f"{r['img_per_s']:.0f}"
        mark = "" if (r.get("num_train"), r.get("num_test")) == (FULL_TRAIN, FULL_TEST) else " (smoke)"
        partial = partial or bool(mark)
        lines.append(f"| {r['method']}{mark} | {r['implementation']} | {_pct(r['knn_top1'])} | "
                     f"{_linear(r)} | {r['pretrain_minutes']:.1f} | {r['images_seen']:,} | {ips} |")
    if partial:
        lines.append(f"\n(smoke): a smoke test evaluated on fewer than the {FULL_TRAIN:,} train / {FULL_TEST:,} test "
                     "images (--eval-images); not a result.")
    trained = [r for r in results if r["implementation"] == "selfsight" and r["method"] in METHODS]  # the goals' rows
    lines.append("")
    if trained:
        best_knn = max(trained, key=lambda r: r["knn_top1"])
        best_linear = max(trained, key=lambda r: r["linear_top1_600"])
        beaten = [r for r in trained if r["knn_top1"] <= RAW_PIXEL_KNN]
        missing = [m for m in METHODS if m not in {r["name"] for r in trained}]
        ok = lambda passed: "**met**" if passed else "**not met**"
        lines += [
            f"Goals, on selfsight's {len(trained)} result(s) above" + (" (smoke tests included)" if partial else "")
            + (f" (missing: {', '.join(missing)})" if missing else "") + ":",
            f"- best k-NN >= {100 * GOAL_BEST_KNN:.0f}%: {ok(best_knn['knn_top1'] >= GOAL_BEST_KNN)} "
            f"({best_knn['name']}, {_pct(best_knn['knn_top1'])})",
            f"- every method beats raw pixels' k-NN ({100 * RAW_PIXEL_KNN:.1f}%): {ok(not beaten)}"
            + (f" (not: {', '.join(r['name'] for r in beaten)})" if beaten else ""),
            f"- best 600-label linear probe >= {100 * (RAW_PIXEL_LOGREG_600 + GOAL_LINEAR_MARGIN):.1f}% (raw-pixel "
            f"logistic regression {100 * RAW_PIXEL_LOGREG_600:.1f}% + {100 * GOAL_LINEAR_MARGIN:.0f} points): "
            f"{ok(best_linear['linear_top1_600'] >= RAW_PIXEL_LOGREG_600 + GOAL_LINEAR_MARGIN)} "
            f"({best_linear['name']}, {_pct(best_linear['linear_top1_600'])})",
        ]
    by_name = {r["name"]: r for r in results}
    pairs = [(by_name[m], by_name[f"{m}-lightly"]) for m in PEER_METHODS if m in by_name and f"{m}-lightly" in by_name]
    if pairs:
        lines += ["", "selfsight against lightly (same backbone, batch, views, optimizer and budget):"]
        for ours, peer in pairs:
            same = ours.get("invocation") == peer.get("invocation")
            lines.append(f"- {ours['method']}: k-NN {_pct(ours['knn_top1'])} at {ours['img_per_s']:.0f} img/s "
                         f"(selfsight) vs {_pct(peer['knn_top1'])} at {peer['img_per_s']:.0f} img/s "
                         f"({peer['implementation']}){'' if same else ' - measured in different invocations'}")
    backbones = sorted({f"{r['backbone']['name']} {json.dumps(r['backbone']['opts'])} ({r['backbone']['params_m']}M "
                        "parameters)" for r in results if "backbone" in r})
    machines = sorted({json.dumps(r["machine"]) for r in results if "machine" in r})
    commands = sorted({f"`{r['command']}`" for r in results if "command" in r})
    lines += ["", *(f"Backbone: {b}" for b in backbones), *(f"Machine: {m}" for m in machines),
              *(f"Measured by: {c}" for c in commands)]
    lines += ["", f"This table: `{command}`"]
    return "\n".join(lines) + "\n"


# --- main -------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=list(METHODS),
                        help=f"default: {' '.join(METHODS)}; none with --raw-pixels alone")
    parser.add_argument("--minutes", type=float, default=30.0, help="pre-training budget per method")
    parser.add_argument("--epochs", type=float, default=None,
                        help="pre-train for this many passes over the 60,000 images instead of --minutes (the same "
                        "work whatever else runs on the machine; the minutes taken are reported)")
    parser.add_argument("--peer", choices=["lightly"], default=None,
                        help="also run lightly's BYOL and SimCLR (bash benchmarks/setup_peer.sh first)")
    parser.add_argument("--raw-pixels", action="store_true", help="also measure the raw-pixel baselines")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--out", default="runs/bench_fmnist_knn")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--backbone-opt", action="append", dest="backbone_opts", metavar="KEY=VALUE",
                        help="a timm option, repeatable; given once, it replaces all the defaults "
                        f"({' '.join(DEFAULT_BACKBONE_OPTS)})")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="for the evaluation; pre-training: device=... override")
    parser.add_argument("--eval-images", type=int, default=None, metavar="N",
                        help="smoke tests only: evaluate on the first N train and N test images (marked in the table)")
    parser.add_argument("--force", action="store_true",
                        help="measure again: delete OUT/<name> (pre-training included) of the names run")
    parser.add_argument("--table-only", action="store_true", help="print the table of OUT and stop")
    parser.add_argument("overrides", nargs="*", help="config overrides for every method, key=value")
    args = parser.parse_args(argv)
    # "--methods byol simclr lr=0.002": the key=value items after --methods are overrides, not methods
    args.overrides = [m for m in args.methods if "=" in m] + args.overrides
    args.methods = [m for m in args.methods if "=" not in m]
    if args.backbone_opts is None:
        args.backbone_opts = list(DEFAULT_BACKBONE_OPTS)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    command = shlex.join(["python", "benchmarks/fmnist_knn.py", *(sys.argv[1:] if argv is None else argv)])
    if not args.table_only:
        # every config is built before anything runs: a bad recipe or override fails now, not after an hour
        jobs = []
        for method in args.methods:
            method_config(method, args, out / method)
            jobs.append((method, run_selfsight))
            if args.peer and method in PEER_METHODS:
                jobs.append((f"{method}-lightly", run_peer))
        if args.peer:
            import peer_lightly  # noqa: F401  (fails now, not after the first pre-training, when lightly is missing)
        if args.peer and not any(m in PEER_METHODS for m in args.methods):
            print(f"--peer lightly: lightly runs {' and '.join(PEER_METHODS)} only, none of which is in --methods")
        if args.raw_pixels:
            jobs.insert(0, ("raw-pixels", None))
        data = EvalData(args.data_dir, args.eval_images)
        device = resolve_device(args.device)
        invocation = time.strftime("%Y-%m-%dT%H:%M:%S")
        for name, runner in jobs:
            folder = out / name
            if args.force and folder.exists():
                shutil.rmtree(folder)
            if (folder / "result.json").is_file():
                print(f"[{name}] measured earlier: {folder / 'result.json'} (--force to measure again)", flush=True)
                continue
            started = time.perf_counter()
            if runner is None:
                result = run_raw_pixels(args, data)
            else:
                result = runner(name.removesuffix("-lightly"), args, data, device)
            result.update(command=command, invocation=invocation, machine=machine_info(),
                          wall_minutes=round((time.perf_counter() - started) / 60, 2))
            write_json(folder / "result.json", result)
            print(f"[{name}] k-NN {_pct(result['knn_top1'])}, linear (600 labels) {_pct(result['linear_top1_600'])}, "
                  f"{result['pretrain_minutes']:.1f} min, {result['images_seen']:,} images -> {folder / 'result.json'}",
                  flush=True)
    table = results_table(out, command)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table)
    print("\n" + table)


if __name__ == "__main__":
    try:
        main()
    except (SelfsightError, Interrupted) as error:  # one line, as selfsight's CLI says it; Ctrl-C: how to resume
        sys.exit(f"fmnist_knn.py: {error}")
