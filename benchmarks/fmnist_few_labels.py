"""Few-label fine-tuning on Fashion-MNIST, before and after LP-FT, over several label draws, next to the baselines.

    # pre-train once (or reuse any run), then:
    .venv/bin/python benchmarks/fmnist_few_labels.py --run runs/simmim_demo_1000 --draws 5
    .venv/bin/python benchmarks/fmnist_few_labels.py --run RUN --recipes old lpft --compare

For each recipe (``old``: zero head, lr 1e-3, layer decay 0.75, the default before 2026-11-28;
``lpft``: the current default for a pre-trained backbone) the run's backbone is fine-tuned on
``--draws`` labeled subsets (seeds 0, 1, ...; 60 labels per class by default) and scored on the whole
test set. ``--scratch`` adds the run's architecture fine-tuned from random weights (scratch recipe)
on the same draws; ``--compare`` runs ``selfsight eval compare`` (every baseline). Tuning is off unless
``--tune``: each fine-tune then costs about 3.4 times as much. Writes OUT/results.json and prints a
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

from selfsight.config import DEFAULT_DATA_DIR
from selfsight.eval.api import EvalConfig, evaluate
from selfsight.eval.compare import CompareConfig, compare

RECIPES = {
    "old": {"head_init": "zero", "lr": 1e-3, "layer_decay": 0.75},
    "lpft": {},  # the defaults (FINETUNE_DEFAULTS)
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished pre-training run")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--labels-per-class", type=int, default=60)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's (50)")
    parser.add_argument("--scratch", action="store_true", help="also fine-tune the architecture from scratch")
    parser.add_argument("--compare", action="store_true", help="also run eval compare (all baselines)")
    parser.add_argument("--tune", action="store_true", help="tune the fine-tuning lr on a validation split")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    parser.add_argument("--out", default=None, help="default RUN/few_labels")
    args = parser.parse_args()

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
    if args.scratch:
        results["rows"]["scratch"] = evaluate(EvalConfig(kind="finetune", run=args.run, init="scratch",
                                                         epochs=args.epochs, out=str(out / "scratch"), **data))
    if args.compare:
        results["compare"] = compare(CompareConfig(run=args.run, out=str(out / "compare"), epochs=args.epochs,
                                                   **data))
    results["wall_minutes"] = round((time.time() - started) / 60, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(markdown(results["rows"]))


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
