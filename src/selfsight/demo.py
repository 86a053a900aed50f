"""``selfsight demo``: SimMIM pre-training on Fashion-MNIST without labels, then the few-label
comparison a user wants to see: fine-tuning from the pre-trained backbone against the identical
fine-tuning from random weights, plus k-NN and a linear probe, all with 60 labels per class.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selfsight.checkpoint import list_checkpoints
from selfsight.config import DEFAULT_DATA_DIR, build_config
from selfsight.data.idx import find_idx_files
from selfsight.diagnostics import diagnose
from selfsight.engine import pretrain
from selfsight.errors import DataError
from selfsight.eval.api import EvalConfig, evaluate
from selfsight.report import write_report

MISSING_DATA = (
    "Fashion-MNIST not found in {path}: install Debian's package (sudo apt-get install dataset-fashion-mnist), "
    "or pass --data-dir to a folder holding the four *-ubyte.gz files"
)


#: pre-training steps of the demo (about 8 minutes at 290 img/s; 921 steps gave +8.6 points over scratch)
DEMO_STEPS = 1000


def run_demo(
    out: str | Path = "runs/demo",
    minutes: float | None = None,
    steps: int | None = None,
    labels_per_class: int = 60,
    data_dir: str | None = None,
    device: str = "auto",
    finetune_epochs: int | None = None,
) -> dict[str, Any]:
    """Pre-train (or resume/reuse ``out/pretrain``), evaluate, print a table, write ``out/summary.json``."""
    data_dir = data_dir or DEFAULT_DATA_DIR
    if not Path(data_dir).is_dir() or not find_idx_files(data_dir):
        raise DataError(MISSING_DATA.format(path=data_dir))
    out = Path(out)
    run = out / "pretrain"
    cfg = build_config(
        None, None, data=f"{data_dir}:train", out=str(run), device=device,
        # a step budget, not minutes: on a slow or busy machine 8 minutes gave 433 steps, too few to beat scratch
        **({"minutes": minutes} if minutes is not None else {"steps": steps or DEMO_STEPS}),
        monitor_data=f"{data_dir}:test",
    )
    if (run / "pretrain.json").is_file():
        print(f"reusing the finished pre-training in {run} (delete it to train again)")
        pretrained = json.loads((run / "pretrain.json").read_text())
    else:
        resume = bool(list_checkpoints(run))
        budget = f"{minutes:g} min" if minutes is not None else f"{cfg.steps} steps"
        print(f"SimMIM pre-training of {cfg.backbone} for {budget} on {cfg.data} (labels unused)")
        pretrained = pretrain(cfg, resume=resume)

    common = dict(
        train_data=f"{data_dir}:train",
        test_data=f"{data_dir}:test",
        labels_per_class=labels_per_class,
        device=device,
        out=str(out),
    )
    results = {
        "knn": evaluate(EvalConfig(kind="knn", run=str(run), **common)),
        "linear": evaluate(EvalConfig(kind="linear", run=str(run), **common)),
        "finetune": evaluate(EvalConfig(kind="finetune", run=str(run), epochs=finetune_epochs, **common)),
        "scratch": evaluate(
            EvalConfig(
                kind="finetune",
                init="scratch",
                backbone=cfg.backbone,
                backbone_opts=cfg.backbone_opts,
                epochs=finetune_epochs,
                **common,
            )
        ),
    }
    summary = {
        "pretrain": {
            "method": cfg.method,
            "backbone": cfg.backbone,
            "backbone_opts": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.backbone_opts.items()},
            "minutes": pretrained["minutes"],
            "steps": pretrained["steps"],
            "images_seen": pretrained["images_seen"],
            "img_per_s": pretrained["img_per_s"],
            "run": str(run),
        },
        "eval": {
            "labels": results["finetune"]["num_labels"],
            "test_images": results["finetune"]["num_test"],
            "knn_top1": results["knn"]["top1"],
            "linear_top1": results["linear"]["top1"],
            "finetune_top1": results["finetune"]["top1"],
            "scratch_finetune_top1": results["scratch"]["top1"],
            "finetune_minutes": results["finetune"]["minutes"],
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("diagnostics: attention distance, head diversity, CKA, reconstructions, embedding map")
    diagnose(run, data=f"{data_dir}:test", device=device)
    report = write_report([out], out / "report.html", title="selfsight demo: SimMIM on Fashion-MNIST")
    print(format_table(summary))
    print(f"summary written to {out / 'summary.json'}")
    print(f"report written to {report} (open it in a browser)")
    return summary


def format_table(summary: dict[str, Any]) -> str:
    p, e = summary["pretrain"], summary["eval"]
    gain = 100 * (e["finetune_top1"] - e["scratch_finetune_top1"])
    rows = [
        ("k-NN (k=20), pre-trained features", e["knn_top1"]),
        ("linear probe, pre-trained features", e["linear_top1"]),
        ("fine-tune from random weights (scratch)", e["scratch_finetune_top1"]),
        ("fine-tune from SimMIM pre-training", e["finetune_top1"]),
    ]
    lines = [
        "",
        f"{p['method']} on {p['backbone']}: {p['steps']} steps, {p['images_seen']} images, {p['minutes']:.1f} min "
        f"({p['img_per_s']:.0f} img/s)",
        f"Fashion-MNIST test ({e['test_images']} images), {e['labels']} labels:",
    ]
    lines += [f"  {name:<42s} {100 * acc:6.2f}%" for name, acc in rows]
    lines.append(f"  {'pre-training gain over scratch':<42s} {gain:+6.2f} points")
    lines.append("  (raw pixels with the same 600 labels, measured here: logistic regression 78.6%, k-NN 72.8%)")
    return "\n".join(lines)
