"""Command line: argument parsing only. Parse -> config -> call the API."""

from __future__ import annotations

import argparse
import logging
import sys

from selfsight import __version__
from selfsight.cli_data import add_data_parser, run_data_command
from selfsight.errors import SelfsightError

#: ``selfsight demo --method`` (selfsight.demo.DEMO_PRESETS, the first the default; a test keeps them equal)
DEMO_METHODS = ["spark", "simmim"]

EPILOG = "Run `selfsight COMMAND --help` for a command's options."


def _add_backbone_args(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument("--backbone", help=f"timm model name ({default_help})")
    p.add_argument(
        "--backbone-opt",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="timm.create_model option, repeatable: img_size=32, patch_size=4, in_chans=1, depths=2,2,6,2",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfsight", description="Self-supervised pre-training of timm backbones.", epilog=EPILOG
    )
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "pretrain", help="pre-train a backbone on unlabeled images",
        description="Pre-train a backbone on unlabeled images. With --data and no --backbone (nor --config, "
        "--resume), the options you do not give are chosen from the images and the device (channels, input "
        "size, method, backbone, batch size, budget) and printed at start; --backbone-opt adjusts the chosen "
        "backbone (e.g. img_size=64).",
    )
    p.add_argument("--method", help="pre-training method (default: simclr with --data, else simmim); "
                   "see `selfsight methods`")
    _add_backbone_args(p, "default with --data: chosen from the images and the device; "
                       "without: a 1.2M-parameter ViT for 28-px gray images")
    p.add_argument(
        "--data",
        help="image folder, IDX folder[:train|:test] or CIFAR folder[:train|:test] (default: Debian's Fashion-MNIST)",
    )
    p.add_argument("--out", help="run directory (default runs/pretrain)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="optimiser steps (default 1000; with --data, a minutes "
                        "budget from the data size)")
    budget.add_argument("--epochs", type=float, help="passes over the data")
    budget.add_argument("--minutes", type=float, help="wall-clock budget; steps are planned from a timed step")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--log-every", type=int, help="steps between metrics.jsonl records")
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"], help="auto (default): bf16 where it pays, else fp32"
    )
    p.add_argument("--num-workers", type=int, help="DataLoader workers for large image folders")
    p.add_argument("--monitor-data", help="labeled held-out data for an online k-NN monitor (e.g. FOLDER or IDX:test)")
    p.add_argument("--monitor-every", type=int, help="steps between k-NN monitor measurements (default 200)")
    p.add_argument("--config", help="YAML file with options (e.g. a run's config.yaml)")
    p.add_argument(
        "--resume", action="store_true",
        help="continue the run in --out from its last checkpoint (a torchrun restart does so by itself)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the networks")
    p.add_argument("--logger", choices=["jsonl", "tensorboard"],
                   help="where metrics go (default: jsonl, metrics.jsonl)")
    p.add_argument("--teacher", help="fd: the teacher, a selfsight run or export directory")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="any config option: lr=1e-3, optim.warmup_fraction=0.1, mask_ratio=0.5",
    )

    e = sub.add_parser(
        "eval", help="k-NN, linear probe or fine-tuning with few labels; compare: all of them and every baseline"
    )
    e.add_argument("kind", choices=["knn", "linear", "finetune", "compare"])
    e.add_argument("--run", help="pre-trained run directory")
    e.add_argument(
        "--init",
        choices=["pretrained", "scratch", "pixels"],
        default="pretrained",
        help="scratch: the same protocol from random weights (--backbone or the run's); "
        "pixels: knn/linear on the resized raw pixels",
    )
    _add_backbone_args(e, "for --init scratch")
    e.add_argument("--train-data", help="labeled training data (default: Fashion-MNIST train)")
    e.add_argument("--test-data", help="labeled test data (default: Fashion-MNIST test)")
    few = e.add_mutually_exclusive_group()
    few.add_argument("--labels-per-class", type=int, help="use N labeled images per class (fixed seed)")
    few.add_argument("--label-fraction", type=float, help="use this fraction of the labels (fixed seed)")
    e.add_argument("--draws", type=int, help="labeled subsets drawn (seeds SEED, SEED+1, ...; default 3 below "
                   "5,000 labels, else 1); each value, the mean and the std are reported")
    e.add_argument("--tune", action=argparse.BooleanOptionalAction, default=None,
                   help="choose lr (finetune), L2 penalty (linear) or k (knn) on a validation split of the "
                   "labeled subset, then retrain on all of it (default: on below 5,000 labels)")
    e.add_argument("--layer", type=int, default=-1, help="block/stage to read features from (knn, linear)")
    e.add_argument("--pool", default="avg", choices=["avg", "cls", "default"], help="feature pooling")
    e.add_argument("--k", type=int, help="neighbours for knn (default 20, or tuned)")
    e.add_argument("--temperature", type=float, default=0.07, help="knn vote temperature")
    e.add_argument("--epochs", type=int, help="finetune epochs (default 50)")
    e.add_argument("--lr", type=float, help="finetune learning rate (default: 3e-4 for a pre-trained "
                   "ViT/Swin, else 1e-3; or tuned)")
    e.add_argument("--weight-decay", type=float, help="finetune AdamW decay (0.05) / linear L2 penalty (1e-4)")
    e.add_argument("--layer-decay", type=float, help="finetune layer-wise lr decay (default: 0.75 for "
                   "ViT/Swin, 1 = none for CNNs)")
    e.add_argument("--head-init", choices=["probe", "zero"], help="finetune head: probe = linear probe first "
                   "(LP-FT, default pre-trained), zero (default scratch; the recipe before 2026-11-28)")
    e.add_argument("--batch-size", type=int)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto")
    e.add_argument("--out", help="where to write the result JSON (default: the run directory)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")

    x = sub.add_parser("export", help="write model.safetensors + config.json that timm loads")
    x.add_argument("run", help="run directory")
    x.add_argument("--out", required=True, help="output directory")

    d = sub.add_parser("demo", help="pre-train on Fashion-MNIST, then compare with scratch on 600 labels")
    d.add_argument("--out", default="runs/demo")
    demo_budget = d.add_mutually_exclusive_group()
    d.add_argument("--method", choices=DEMO_METHODS, default=DEMO_METHODS[0],
                   help="spark (default): SparK on a narrow ResNet-18 at 32 px, the measured winner; simmim: "
                   "SimMIM on a 1.2M-parameter ViT (the earlier demo)")
    demo_budget.add_argument("--steps", type=int, help="pre-training steps (default 1000 for both methods)")
    demo_budget.add_argument("--minutes", type=float, help="pre-training budget in minutes instead of steps")
    d.add_argument("--labels-per-class", type=int, default=60)
    d.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder")
    d.add_argument("--device", default="auto")
    d.add_argument("--seed", type=int, default=0,
                   help="seeds the pre-training and the label draws (seed, seed+1, ...): another seed repeats the "
                   "whole demo independently")

    v = sub.add_parser("views", help="write a grid of the views a method trains on")
    v.add_argument("data", help="images: folder, IDX folder[:train|:test] or CIFAR folder")
    v.add_argument("--method", default="simclr", help="pre-training method (default simclr)")
    _add_backbone_args(v, "sets the input size and channels; default: the pretrain default")
    v.add_argument("--out", default="views.png", help="PNG to write (default views.png)")
    v.add_argument("--num-images", type=int, default=8, help="rows of the grid")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("overrides", nargs="*", metavar="key=value", help="method options: crop_scale=[0.2,1] ...")

    g = sub.add_parser("diagnose", help="attention distance, head diversity, CKA, reconstructions, embedding map")
    g.add_argument("run", help="run directory")
    g.add_argument("--data", help="images to diagnose on (default: the run's own data)")
    g.add_argument("--compare", nargs="+", default=[], metavar="RUN2", help="runs to compare layer by layer (CKA)")
    g.add_argument("--num-images", type=int, default=256, help="size of the fixed image sample (default 256)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")

    r = sub.add_parser("report", help="one self-contained HTML report of one or more runs, side by side")
    r.add_argument("runs", nargs="+", metavar="RUN", help="run directories (or a demo folder)")
    r.add_argument("--out", required=True, help="HTML file to write")
    r.add_argument("--title", help="page title")

    add_data_parser(sub)
    sub.add_parser("methods", help="list the pre-training methods: paper, backbones, defaults")
    return parser


def _pretrain(args: argparse.Namespace) -> int:
    from selfsight.api import pretrain
    from selfsight.backbones import parse_backbone_opts
    from selfsight.distributed import env_rank

    if args.resume and not args.out:
        raise SystemExit("selfsight: error: --resume needs --out RUN (the run to continue)")
    backbone_opts = None
    if args.backbone is not None or args.backbone_opt is not None:
        backbone_opts = parse_backbone_opts(args.backbone_opt)
    summary = pretrain(
        args.data,
        args.out,
        method=args.method,
        backbone=args.backbone,
        backbone_opts=backbone_opts,
        steps=args.steps,
        epochs=args.epochs,
        minutes=args.minutes,
        batch_size=args.batch_size,
        seed=args.seed,
        log_every=args.log_every,
        ckpt_every=args.ckpt_every,
        device=args.device,
        precision=args.precision,
        num_workers=args.num_workers,
        monitor_data=args.monitor_data,
        monitor_every=args.monitor_every,
        compile=args.compile,
        logger=args.logger,
        config=args.config,
        overrides=[*args.overrides, *([f"method.teacher={args.teacher}"] if args.teacher else [])],
        resume=args.resume,
        progress=not args.no_progress,
    )
    if env_rank() != 0:  # under torchrun, rank 0 reports
        return 0
    print(
        f"done: {summary['steps']} steps, {summary['images_seen']} images in {summary['minutes']:.1f} min "
        f"({summary['img_per_s']:.0f} img/s), final loss {summary['final_loss']:.4f}; run in {summary['run_dir']}"
    )
    if summary.get("skipped_steps"):
        print(f"{summary['skipped_steps']} steps had non-finite gradients and were skipped (see train.log)")
    run = summary["run_dir"]
    print(f"next: selfsight eval compare --run {run} --train-data LABELED --test-data TEST --labels-per-class N; "
          f"selfsight export {run} --out DIR")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from selfsight.backbones import parse_backbone_opts
    from selfsight.config import DEFAULT_DATA, DEFAULT_TEST_DATA
    from selfsight.eval.api import EvalConfig, evaluate

    train_data, test_data = args.train_data or DEFAULT_DATA, args.test_data or DEFAULT_TEST_DATA
    if args.kind == "compare":
        return _eval_compare(args, train_data, test_data)
    cfg = EvalConfig(
        kind=args.kind,
        run=args.run,
        init=args.init,
        backbone=args.backbone,
        backbone_opts=parse_backbone_opts(args.backbone_opt),
        train_data=train_data,
        test_data=test_data,
        labels_per_class=args.labels_per_class,
        label_fraction=args.label_fraction,
        layer=args.layer,
        pool=args.pool,
        k=args.k,
        temperature=args.temperature,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        layer_decay=args.layer_decay,
        head_init=args.head_init,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        out=args.out,
        draws=args.draws,
        tune=args.tune,
        progress=not args.no_progress,
    )
    evaluate(cfg)
    return 0


def _eval_compare(args: argparse.Namespace, train_data: str, test_data: str) -> int:
    from selfsight.errors import ConfigError
    from selfsight.eval.compare import CompareConfig, compare

    if not args.run:
        raise ConfigError("eval compare needs --run (a pre-training run directory)")
    ignored = [f"--{name.replace('_', '-')}" for name in ("backbone", "lr", "k", "weight_decay", "layer_decay",
                                                          "head_init", "batch_size") if getattr(args, name) is not None]
    ignored += ["--init"] if args.init != "pretrained" else []
    if ignored:
        raise ConfigError(f"{', '.join(ignored)} do not apply to eval compare (every row uses its protocol)")
    compare(CompareConfig(run=args.run, train_data=train_data, test_data=test_data,
                          labels_per_class=args.labels_per_class, label_fraction=args.label_fraction,
                          draws=args.draws, tune=args.tune, epochs=args.epochs, seed=args.seed,
                          device=args.device, out=args.out, progress=not args.no_progress))
    return 0


def _export(args: argparse.Namespace) -> int:
    from selfsight.api import export

    info = export(args.run, args.out)
    opts = ", ".join(f"{k}={v!r}" for k, v in info["model_args"].items())
    print(f"wrote {info['weights']} ({info['tensors']} tensors), {info['config']} and the model card {info['card']}")
    print(
        f"load it: timm.create_model({info['architecture']!r}, pretrained=True, num_classes=0, {opts}, "
        f"pretrained_cfg_overlay=dict(file={info['weights']!r})), or selfsight.load_backbone({args.out!r})"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from selfsight.demo import run_demo

    run_demo(
        args.out,
        minutes=args.minutes,
        steps=args.steps,
        labels_per_class=args.labels_per_class,
        data_dir=args.data_dir,
        device=args.device,
        method=args.method,
        seed=args.seed,
    )
    return 0


def _views(args: argparse.Namespace) -> int:
    from selfsight.backbones import parse_backbone_opts
    from selfsight.config import build_config
    from selfsight.preview import preview_views

    backbone_opts = None
    if args.backbone is not None or args.backbone_opt is not None:
        backbone_opts = parse_backbone_opts(args.backbone_opt)
    cfg = build_config(
        None, args.overrides, method=args.method, backbone=args.backbone, backbone_opts=backbone_opts,
        data=args.data, seed=args.seed,
    )
    path = preview_views(cfg, args.out, num_images=args.num_images)
    print(f"wrote {path}: each row an image, then the {cfg.method} views of it")
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    from selfsight.diagnostics import diagnose

    result = diagnose(
        args.run, data=args.data, compare=args.compare, num_images=args.num_images, seed=args.seed, device=args.device
    )
    for layer in result.get("attention") or []:
        diversity = layer["head_diversity"]
        print(
            f"{layer['name']:>8s}: attention distance {layer['mean_distance_px']:6.2f} px, "
            f"entropy {layer['mean_entropy']:.3f}, head diversity "
            + ("-" if diversity is None else f"{diversity:.3f}")
        )
    if result.get("attention_note"):
        print(result["attention_note"])
    print(f"wrote {result['path']} and {len(result['plots'])} plots")
    return 0


def _report(args: argparse.Namespace) -> int:
    from selfsight.report import write_report

    path = write_report(args.runs, args.out, title=args.title)
    print(f"wrote {path}: open it in a browser (self-contained, works offline)")
    return 0


def _methods(_: argparse.Namespace) -> int:
    import textwrap

    from selfsight.api import describe_methods

    for info in describe_methods():
        print(info["name"])
        for label, text in (("paper", info["paper"]), ("backbones", info["backbones"]),
                            ("defaults", ", ".join(f"{k}={_plain(v)}" for k, v in info["defaults"].items()))):
            print(textwrap.fill(text, width=110, initial_indent=f"  {label + ':':11s}", subsequent_indent=" " * 13))
    return 0


def _plain(value: object) -> str:
    if isinstance(value, list | tuple):
        return "[" + ",".join(_plain(v) for v in value) + "]"
    return str(value)


COMMANDS = {
    "pretrain": _pretrain,
    "eval": _eval,
    "export": _export,
    "demo": _demo,
    "views": _views,
    "diagnose": _diagnose,
    "report": _report,
    "data": run_data_command,
    "methods": _methods,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `views DATA --out X key=value`: overrides after options land here
        if args.command != "views" or not all("=" in item and not item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    from selfsight.engine import Interrupted

    try:
        return COMMANDS[args.command](args)
    except Interrupted as exc:
        print(f"selfsight: {exc}", file=sys.stderr)
        return 130
    except SelfsightError as exc:
        if args.debug:
            raise
        print(f"selfsight: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("selfsight: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
