"""``selfsight demo``: masked image modeling on Fashion-MNIST without labels, then the few-label
comparison a user wants to see (``selfsight eval compare``): k-NN, linear probe and LP-FT fine-tuning
of the pre-trained backbone against every baseline (raw-pixel logistic regression and k-NN, the same
backbone and a ResNet-18 fine-tuned from random weights), 60 labels per class, over 3 label draws.

The default is SparK on a narrow ResNet-18 (the measured winner on 2 CPU cores; docs/benchmarks.md);
``--method simmim`` runs the earlier demo, SimMIM on a 1.2M-parameter ViT.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfsight.checkpoint import list_checkpoints
from selfsight.config import DEFAULT_DATA_DIR, build_config
from selfsight.data.idx import find_idx_files
from selfsight.diagnostics import diagnose
from selfsight.engine import pretrain
from selfsight.errors import ConfigError, DataError
from selfsight.eval.compare import CompareConfig, compare, format_compare
from selfsight.report import write_report

MISSING_DATA = (
    "Fashion-MNIST not found in {path}: install Debian's package (sudo apt-get install dataset-fashion-mnist), "
    "or pass --data-dir to a folder holding the four *-ubyte.gz files"
)


@dataclass(frozen=True)
class DemoPreset:
    """What ``selfsight demo --method M`` pre-trains, for how long, and how it fine-tunes."""

    method: str
    steps: int
    finetune_epochs: int
    backbone: str | None = None  # None: the configuration's default (the demo's ViT)
    backbone_opts: dict[str, Any] = field(default_factory=dict)
    why: str = ""


#: the demo's presets; the first is the default. Budgets: a step count (the same pre-training on every
#: machine). SparK: 1,000 steps took 4.1 min in bf16 (515 img/s) and would take 6.3 min in fp32 (339 img/s)
#: on the 2-core Intel Xeon; the comparison (3 draws, 50-epoch fine-tunes) about 7 more minutes.
DEMO_PRESETS: dict[str, DemoPreset] = {
    "spark": DemoPreset(
        method="spark", steps=1000, finetune_epochs=50, backbone="resnet18",
        # the fmnist_knn benchmark's narrow ResNet-18 (one block per stage, 32-256 channels), read at 32 px,
        # its last two stages dilated (output_stride=8) so SparK masks a 4 x 4 grid of 8-px cells
        backbone_opts={"in_chans": 1, "img_size": 32, "channels": (32, 64, 128, 256), "layers": (1, 1, 1, 1),
                       "output_stride": 8},
        why="masked image modeling on a small CNN, the backbone that pays off on a CPU budget",
    ),
    "simmim": DemoPreset(
        method="simmim", steps=1000, finetune_epochs=15,
        why="the flagship on the demo's 1.2M-parameter ViT: far above the same ViT from scratch, "
            "below a ResNet-18 from scratch and raw pixels",
    ),
}
DEMO_METHOD = "spark"
#: label draws of the demo's comparison
DEMO_DRAWS = 3


def run_demo(
    out: str | Path = "runs/demo",
    minutes: float | None = None,
    steps: int | None = None,
    labels_per_class: int = 60,
    data_dir: str | None = None,
    device: str = "auto",
    finetune_epochs: int | None = None,
    draws: int = DEMO_DRAWS,
    method: str = DEMO_METHOD,
    seed: int = 0,
) -> dict[str, Any]:
    """Pre-train (or resume/reuse ``out/pretrain``), evaluate, print a table, write ``out/summary.json``.
    ``seed`` seeds the pre-training and the first label draw (draws ``seed``, ``seed + 1``, ...): a second
    seed is an independent repeat of the whole demo."""
    if method not in DEMO_PRESETS:
        raise ConfigError(f"the demo runs one of {', '.join(DEMO_PRESETS)}, not {method!r}")
    preset = DEMO_PRESETS[method]
    data_dir = data_dir or DEFAULT_DATA_DIR
    if not Path(data_dir).is_dir() or not find_idx_files(data_dir):
        raise DataError(MISSING_DATA.format(path=data_dir))
    out = Path(out)
    run = out / "pretrain"
    backbone = {"backbone": preset.backbone, "backbone_opts": dict(preset.backbone_opts)} if preset.backbone else {}
    cfg = build_config(
        None, None, method=preset.method, **backbone, data=f"{data_dir}:train", out=str(run), device=device,
        # a step budget, not minutes: on a slow or busy machine 8 minutes gave 433 steps, too few to beat scratch
        **({"minutes": minutes} if minutes is not None else {"steps": steps or preset.steps}),
        monitor_data=f"{data_dir}:test", seed=seed,
    )
    if (run / "pretrain.json").is_file():
        print(f"reusing the finished pre-training in {run} (delete it to train again)")
        pretrained = json.loads((run / "pretrain.json").read_text())
    else:
        resume = bool(list_checkpoints(run))
        budget = f"{minutes:g} min" if minutes is not None else f"{cfg.steps} steps"
        print(f"{cfg.method} pre-training of {cfg.backbone} for {budget} on {cfg.data} (labels unused): "
              f"{preset.why}")
        pretrained = pretrain(cfg, resume=resume)

    epochs = finetune_epochs or preset.finetune_epochs
    result = compare(CompareConfig(  # k-NN and the probes tuned (cheap), the fine-tunes at their defaults
        run=str(run), train_data=f"{data_dir}:train", test_data=f"{data_dir}:test",
        labels_per_class=labels_per_class, draws=draws, tune_finetune=False, epochs=epochs,
        device=device, out=str(out), progress=True, seed=seed,
    ))
    summary = build_summary(cfg, pretrained, run, result)
    summary["eval"]["finetune_epochs"] = epochs
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("diagnostics: attention distance, head diversity, CKA, reconstructions, embedding map")
    diagnose(run, data=f"{data_dir}:test", device=device)
    report = write_report([out], out / "report.html", title=f"selfsight demo: {cfg.method} on Fashion-MNIST")
    print(format_table(summary, result))
    print(f"summary written to {out / 'summary.json'}")
    print(f"report written to {report} (open it in a browser)")
    return summary


def build_summary(cfg: Any, pretrained: dict[str, Any], run: Path, result: dict[str, Any]) -> dict[str, Any]:
    """``summary.json``: the pre-training, the pre-trained rows (means over the draws) and the baselines."""
    rows = {row["key"]: row for row in result["rows"]}
    return {
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
            "labels": result["num_labels"],
            "test_images": _num_test(rows["finetune"]["file"]),
            "draws": result["draws"],
            "seeds": result["seeds"],
            "knn_top1": rows["knn"]["top1"],
            "linear_top1": rows["linear"]["top1"],
            "finetune_top1": rows["finetune"]["top1"],
            "finetune_top1_std": rows["finetune"]["top1_std"],
            "finetune_top1_draws": rows["finetune"]["top1_draws"],
            "scratch_finetune_top1": rows["scratch_same"]["top1"],
            "finetune_minutes": rows["finetune"]["minutes"],
            "strongest_baseline": result["strongest_baseline"],
            "gain_over_strongest_points": result["gains"].get("finetune"),
        },
        "baselines": {f"{key}_top1": rows[key]["top1"] for key in ("raw_logreg", "raw_knn", "scratch_same",
                                                                     "scratch_cnn")},
    }


def _num_test(path: str) -> int | None:
    try:
        return json.loads(Path(path).read_text())["num_test"]
    except (OSError, ValueError, KeyError):
        return None


def format_table(summary: dict[str, Any], result: dict[str, Any]) -> str:
    """The pre-training in one line, then the compare table (every row mean ± std over the draws)."""
    p, e = summary["pretrain"], summary["eval"]
    lines = [
        "",
        f"{p['method']} on {p['backbone']}: {p['steps']} steps, {p['images_seen']} images, {p['minutes']:.1f} min "
        f"({p['img_per_s']:.0f} img/s)",
        f"Fashion-MNIST test ({e['test_images']} images), {e['labels']} labels per draw, "
        f"fine-tuning {e.get('finetune_epochs')} epochs, not tuned (tuning costs about 3.4x; docs/evaluation.md has "
        "the full protocol):",
        format_compare(result),
    ]
    return "\n".join(lines)
