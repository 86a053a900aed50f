"""``selfsight eval compare``: a run's evaluations next to every baseline, on the same labels and test set.

Rows (each the mean ± standard deviation over the same label draws, tuned the same way):

* pre-trained: k-NN, linear probe and fine-tuning of the run's backbone;
* baselines: logistic regression and k-NN on the resized raw pixels, the run's architecture
  fine-tuned from random weights (``scratch_same``), and a standard CNN (timm ``resnet18`` at the
  run's image size and channels) fine-tuned from random weights (``scratch_cnn``).

The gain of each pre-trained row is measured against the *strongest* baseline (the highest mean).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfsight.errors import ConfigError
from selfsight.eval.api import EvalConfig, build_scratch, evaluate, run_architecture, write_json
from selfsight.eval.baselines import SCRATCH_CNN

#: row key -> (label, EvalConfig options, baseline?)
ROWS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "knn": ("k-NN, pre-trained features", {"kind": "knn"}, False),
    "linear": ("linear probe, pre-trained features", {"kind": "linear"}, False),
    "finetune": ("fine-tune, pre-trained (LP-FT)", {"kind": "finetune"}, False),
    "raw_logreg": ("raw pixels, logistic regression", {"kind": "linear", "init": "pixels"}, True),
    "raw_knn": ("raw pixels, k-NN", {"kind": "knn", "init": "pixels"}, True),
    "scratch_same": ("scratch, same backbone", {"kind": "finetune", "init": "scratch"}, True),
    "scratch_cnn": ("scratch, {cnn}", {"kind": "finetune", "init": "scratch"}, True),
}


@dataclass
class CompareConfig:
    """One comparison. ``rows`` picks among ``ROWS`` (default all); ``epochs`` applies to every
    fine-tuning row alike (default: the recipes' own); ``tune`` to every row, unless ``tune_finetune``
    is given for the fine-tuning rows (the cheap rows may be tuned and the costly ones not);
    ``cnn``/``cnn_opts`` name the scratch CNN."""

    run: str
    train_data: str
    test_data: str
    labels_per_class: int | None = None
    label_fraction: float | None = None
    draws: int | None = None
    tune: bool | None = None
    tune_finetune: bool | None = None
    epochs: int | None = None
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    cnn: str = SCRATCH_CNN
    cnn_opts: dict = field(default_factory=dict)
    rows: tuple[str, ...] = tuple(ROWS)
    progress: bool = True


def _eval_config(cfg: CompareConfig, key: str) -> EvalConfig:
    options = dict(ROWS[key][1])
    if key == "scratch_cnn":
        arch = build_scratch(*run_architecture(cfg.run), seed=0)  # only its input size and channels
        options["backbone"] = cfg.cnn
        options["backbone_opts"] = {"in_chans": arch.in_chans, "img_size": arch.img_size, **cfg.cnn_opts}
    tune = cfg.tune
    if options["kind"] == "finetune":
        options["epochs"] = cfg.epochs
        tune = cfg.tune if cfg.tune_finetune is None else cfg.tune_finetune
    return EvalConfig(run=cfg.run, train_data=cfg.train_data, test_data=cfg.test_data,
                      labels_per_class=cfg.labels_per_class, label_fraction=cfg.label_fraction,
                      draws=cfg.draws, tune=tune, seed=cfg.seed, device=cfg.device, out=cfg.out,
                      progress=cfg.progress, **options)


def compare(cfg: CompareConfig) -> dict[str, Any]:
    """Run every row, print the table, write ``compare_{num_labels}.json`` (into ``out`` or the run) and return it.

    Returns a dict with ``rows`` (key, label, baseline, top1 mean, top1_std, top1_draws, file),
    ``strongest_baseline`` (a row key), ``gains`` (points of each pre-trained row over it), draws, seeds.
    """
    unknown = [key for key in cfg.rows if key not in ROWS]
    if unknown:
        raise ConfigError(f"unknown compare rows {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    start = time.perf_counter()
    rows = []
    for key in cfg.rows:
        label, _, baseline = ROWS[key]
        print(f"[compare] {label.format(cnn=cfg.cnn)}")
        record = evaluate(_eval_config(cfg, key))
        rows.append({"key": key, "label": label.format(cnn=cfg.cnn), "baseline": baseline, "kind": record["kind"],
                     "init": record["init"], "backbone": record["backbone"], "top1": record["top1"],
                     "top1_std": record["top1_std"], "top1_draws": record["top1_draws"],
                     "num_labels": record["num_labels"], "minutes": record["minutes"], "file": record["path"]})
    result = summarize_rows(rows)
    first = rows[0] if rows else {}
    result.update({"run": cfg.run, "train_data": cfg.train_data, "test_data": cfg.test_data,
                   "num_labels": first.get("num_labels"), "draws": len(first.get("top1_draws", [])),
                   "seeds": [cfg.seed + i for i in range(len(first.get("top1_draws", [])))],
                   "minutes": round((time.perf_counter() - start) / 60, 3)})
    path = Path(cfg.out or cfg.run) / f"compare_{result['num_labels']}.json"
    write_json(path, result)
    result["path"] = str(path)
    print(format_compare(result))
    return result


def summarize_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``rows`` plus the strongest baseline (highest mean top-1) and each pre-trained row's gain over it."""
    baselines = [row for row in rows if row["baseline"]]
    strongest = max(baselines, key=lambda row: row["top1"]) if baselines else None
    gains = {}
    if strongest is not None:
        gains = {row["key"]: 100 * (row["top1"] - strongest["top1"]) for row in rows if not row["baseline"]}
    return {"rows": rows, "strongest_baseline": strongest["key"] if strongest else None, "gains": gains}


def format_compare(result: dict[str, Any]) -> str:
    """The comparison as a plain-text table: mean ± std (points) per row, gains over the strongest baseline."""
    draws = result.get("draws") or 1
    lines = [f"{result.get('num_labels')} labels, {draws} draw{'s' if draws > 1 else ''} "
             f"(mean ± std of top-1 over the draws):"]
    strongest = result.get("strongest_baseline")
    for row in result["rows"]:
        mark = "  <- strongest baseline" if row["key"] == strongest else ""
        gain = result["gains"].get(row["key"])
        gain_text = f"  {gain:+6.2f} vs strongest" if gain is not None else ""
        kind = "baseline" if row["baseline"] else "pre-trained"
        lines.append(f"  {row['label']:<38s} {kind:<11s} {100 * row['top1']:6.2f} ± {100 * row['top1_std']:4.2f}%"
                     f"{gain_text}{mark}")
    if strongest is not None and result["gains"]:
        best = max(result["gains"], key=result["gains"].get)
        name = next(row["label"] for row in result["rows"] if row["key"] == strongest)
        lines.append(f"  gain of the best pre-trained row ({best}) over the strongest baseline ({name}): "
                     f"{result['gains'][best]:+.2f} points")
    return "\n".join(lines)
