"""Few-label fine-tuning on Fashion-MNIST, before and after LP-FT, over several label draws, next to the baselines.

    # pre-train once (or reuse any run), then:
    .venv/bin/python benchmarks/fmnist_few_labels.py --run runs/simmim_demo_1000 --draws 5
    .venv/bin/python benchmarks/fmnist_few_labels.py --run RUN --recipes old lpft --compare
    # or pre-train here first: 30 minutes of masked image modeling on Fashion-MNIST train (no labels), then
    # the LP-FT fine-tunes and every baseline (the issue "Masked modeling that pays off on small compute")
    .venv/bin/python benchmarks/fmnist_few_labels.py --method spark --minutes 30 --recipes lpft --compare

``--method``: ``simmim`` and ``mae`` pre-train the demo's ViT (1.2M parameters, 28 px, 4-px patches), ``spark``
the demo's narrow ResNet-18 (32 px, output_stride 8; ``selfsight.demo.DEMO_PRESETS``), each with its
method's defaults, into ``--run`` (default runs/fewlabel_METHOD_MINUTESmin), resumed when it exists.

For each recipe (``old``: zero head, lr 1e-3, layer decay 0.75, the default before 2026-11-28;
``lpft``: the current default for a pre-trained backbone) the run's backbone is fine-tuned on
``--draws`` labeled subsets (seeds 0, 1, ...; 60 labels per class by default) and scored on the whole
test set. ``--scratch`` adds the run's architecture fine-tuned from random weights (scratch recipe)
on the same draws; ``--compare`` runs ``selfsight eval compare`` (every baseline; k-NN, linear probes and
the raw-pixel rows tuned, as in the demo). ``--reuse-scratch OUT`` takes the from-scratch rows from an
earlier OUT of this script instead of fine-tuning them again, each only where it was measured the same
way (the same backbone, or for the scratch CNN the same input; the same data, draws, labels per class,
epochs and tuning): they do not depend on the pre-training, so SimMIM and MAE on the same ViT share them.
Fine-tunes are not tuned unless ``--tune``: each then costs
about 3.4 times as much. Writes OUT/results.json and prints a
markdown table with each draw, mean ± std, and the train-loss curve of each recipe's worst draw.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from selfsight.checkpoint import list_checkpoints
from selfsight.config import DEFAULT_DATA_DIR, build_config
from selfsight.demo import DEMO_PRESETS
from selfsight.engine import pretrain
from selfsight.eval.api import EvalConfig, evaluate
from selfsight.eval.compare import ROWS, CompareConfig, compare, format_compare, summarize_rows

RECIPES = {
    "old": {"head_init": "zero", "lr": 1e-3, "layer_decay": 0.75},
    "lpft": {},  # the defaults (FINETUNE_DEFAULTS)
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="a finished pre-training run (or where --method trains one)")
    parser.add_argument("--method", choices=["simmim", "mae", "spark"], default=None,
                        help="pre-train with this method first (see above)")
    parser.add_argument("--minutes", type=float, default=30.0, help="--method's pre-training budget")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--labels-per-class", type=int, default=60)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's (50)")
    parser.add_argument("--scratch", action="store_true", help="also fine-tune the architecture from scratch")
    parser.add_argument("--compare", action="store_true", help="also run eval compare (all baselines)")
    parser.add_argument("--tune", action="store_true", help="tune the fine-tuning lr on a validation split")
    parser.add_argument("--reuse-scratch", metavar="OUT", default=None,
                        help="take the from-scratch rows (same backbone; the scratch CNN) from an earlier OUT of this "
                             "script where they were measured the same way (see above)")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--out", default=None, help="default RUN/few_labels")
    args = parser.parse_args()
    if args.method:
        args.run = args.run or f"runs/fewlabel_{args.method}_{args.minutes:g}min"
        pretrain_first(args)
    elif not args.run:
        parser.error("give --run RUN (a finished pre-training) or --method M (pre-train here first)")

    out = Path(args.out or Path(args.run) / "few_labels")
    data = dict(train_data=f"{args.data_dir}:train", test_data=f"{args.data_dir}:test",
                labels_per_class=args.labels_per_class, draws=args.draws, tune=args.tune, progress=False)
    started = time.time()
    results: dict = {"command": "python benchmarks/fmnist_few_labels.py " + " ".join(sys.argv[1:]),
                     "machine": {"platform": platform.platform(), "cpu": platform.processor(),
                                 "torch": torch.__version__, "threads": torch.get_num_threads()},
                     "rows": {}}
    for name in args.recipes:
        record = evaluate(EvalConfig(kind="finetune", run=args.run, epochs=args.epochs, out=str(out / name),
                                     **RECIPES[name], **data))
        results["rows"][name] = record
    earlier = earlier_scratch(args.reuse_scratch, results["rows"]["lpft"]) if args.reuse_scratch else {}
    for key, record in earlier.items():
        print(f"reusing {key} from {record['path']} (same architecture, input, draws, labels, epochs)")
    if "scratch" in earlier and args.scratch:
        results["rows"]["scratch"] = earlier["scratch"]
    elif args.scratch:
        results["rows"]["scratch"] = evaluate(EvalConfig(kind="finetune", run=args.run, init="scratch",
                                                         epochs=args.epochs, out=str(out / "scratch"), **data))
    if args.compare:  # the fine-tunes above are compare's rows "finetune" (lpft) and "scratch_same": not twice
        reuse = {"finetune": results["rows"].get("lpft"), "scratch_same": results["rows"].get("scratch"),
                 "scratch_cnn": earlier.get("scratch_cnn")}
        rows = tuple(key for key in ROWS if reuse.get(key) is None)
        # the cheap rows (k-NN, probes, raw pixels) tuned as in the demo; the fine-tunes tuned only with --tune
        result = compare(CompareConfig(run=args.run, out=str(out / "compare"), epochs=args.epochs, rows=rows,
                                       **{**data, "tune": True}, tune_finetune=args.tune))
        merged = []
        for key in ROWS:
            if reuse.get(key) is not None:
                record = reuse[key]
                label = ROWS[key][0].format(cnn=record["backbone"])
                merged.append({"key": key, "label": label, "baseline": ROWS[key][2], "top1": record["top1"],
                               "top1_std": record["top1_std"], "top1_draws": record["top1_draws"],
                               "minutes": record["minutes"], "file": record.get("path")})
            else:
                merged.append(next(row for row in result["rows"] if row["key"] == key))
        results["compare"] = {**result, **summarize_rows(merged)}
        print(format_compare(results["compare"]))
    results["wall_minutes"] = round((time.time() - started) / 60, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(markdown(results["rows"]))


def earlier_scratch(out: str, like: dict) -> dict[str, dict]:
    """The from-scratch records of an earlier OUT that were measured as this run's would be: ``scratch``
    when its architecture equals ``like``'s (this run's LP-FT record), ``scratch_cnn`` when its input does;
    both only with the same data, label draws, labels per class, epochs and tuning. Scratch fine-tunes do
    not depend on the pre-training, so two runs of the same architecture share them."""
    earlier = json.loads((Path(out) / "results.json").read_text())
    protocol = ("train_data", "test_data", "labels_per_class", "seeds", "img_size", "tuned")

    def same_protocol(record: dict) -> bool:
        return (all(record.get(k) == like.get(k) for k in protocol)
                and record["hparams"]["epochs"] == like["hparams"]["epochs"]
                and record["backbone_opts"].get("in_chans") == like["backbone_opts"].get("in_chans"))

    found = {}
    scratch = earlier["rows"].get("scratch")
    if scratch and same_protocol(scratch) and (scratch["backbone"], scratch["backbone_opts"]) == (
            like["backbone"], like["backbone_opts"]):
        found["scratch"] = scratch
    cnn_row = next((row for row in earlier.get("compare", {}).get("rows", []) if row["key"] == "scratch_cnn"), None)
    if cnn_row and cnn_row.get("file") and Path(cnn_row["file"]).is_file():
        cnn = json.loads(Path(cnn_row["file"]).read_text())
        if same_protocol(cnn):
            found["scratch_cnn"] = {**cnn, "path": cnn_row["file"]}
    return found


def pretrain_first(args: argparse.Namespace) -> None:
    """``--minutes`` of ``--method`` on Fashion-MNIST train (labels unused) into ``--run``; resumes an
    interrupted run and reuses a finished one."""
    if (Path(args.run) / "pretrain.json").is_file():
        print(f"reusing the finished pre-training in {args.run}")
        return
    preset = DEMO_PRESETS["spark"] if args.method == "spark" else None
    backbone = {"backbone": preset.backbone, "backbone_opts": dict(preset.backbone_opts)} if preset else {}
    cfg = build_config(None, None, method=args.method, **backbone, data=f"{args.data_dir}:train", out=args.run,
                       minutes=args.minutes, monitor_data=f"{args.data_dir}:test")
    print(f"{args.method} on {cfg.backbone} for {args.minutes:g} min into {args.run}", flush=True)
    pretrain(cfg, resume=bool(list_checkpoints(args.run)), progress=False)


def markdown(rows: dict) -> str:
    """Each draw, mean ± std per row; then each row's worst draw's train loss per epoch."""
    names = list(rows)
    seeds = rows[names[0]]["seeds"]
    lines = ["| draw (seed) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, seed in enumerate(seeds):
        lines.append(f"| {seed} | " + " | ".join(f"{100 * rows[n]['top1_draws'][i]:.2f}%" for n in names) + " |")
    lines.append("| mean ± std | " + " | ".join(
        f"**{100 * rows[n]['top1']:.2f} ± {100 * rows[n]['top1_std']:.2f}%**" for n in names) + " |")
    lines.append("| minutes (all draws) | " + " | ".join(f"{rows[n]['minutes']:.1f}" for n in names) + " |")
    for n in names:
        worst = min(rows[n]["per_draw"], key=lambda d: d["top1"])
        curve = ", ".join(f"{x:.2f}" for x in worst.get("train_loss", []))
        lines.append(f"\n{n}: worst draw seed {worst['seed']} ({100 * worst['top1']:.2f}%), train loss per epoch: "
                     f"{curve}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
