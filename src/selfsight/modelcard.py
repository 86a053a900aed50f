"""The model card ``selfsight export`` writes next to the weights: ``README.md`` in the export directory.

It says what the backbone is and how it was made, from the run directory's own files: the method, its
paper and options (``config.yaml``), the backbone and the data (``run.json``), the budget
(``pretrain.json``), every evaluation found in the run (``eval_*.json``: kind, labels, top-1, mean ± std
over label draws), how to load it (a timm snippet with the options filled in, and
``selfsight.load_backbone``) and the input normalisation.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

CARD_NAME = "README.md"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def _paper(method: str) -> str:
    """The first paragraph of the method module's docstring, e.g. ``SimCLR (Chen et al. 2020, "...")``."""
    from selfsight.registry import get_method_class

    try:
        cls = get_method_class(method)
    except Exception:  # noqa: BLE001 - a run of a method this installation lacks still gets a card
        return method
    doc = (sys.modules[cls.__module__].__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split()) or method


def _options(values: dict[str, Any]) -> str:
    return ", ".join(f"`{key}={_plain(value)}`" for key, value in values.items()) or "none"


def _plain(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ",".join(_plain(v) for v in value) + "]"
    return str(value)


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def eval_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """The evaluations found in a run directory (``eval_*.json``, sorted by name) as table rows: file, kind,
    init, backbone, labels, draws, top1 (mean), top1_std (None for one draw).

    Example:
        >>> [row["kind"] for row in eval_rows("runs/photos")]  # doctest: +SKIP
        ['finetune', 'knn', 'linear']
    """
    rows = []
    for path in sorted(Path(run_dir).glob("eval_*.json")):
        record = _read_json(path)
        if record is None or not isinstance(record.get("top1"), int | float):
            continue
        draws = record.get("top1_draws") or [record["top1"]]
        std = record.get("top1_std")
        if len(draws) > 1 and std is None:
            std = statistics.stdev(draws)
        rows.append({
            "file": path.name, "kind": record.get("kind", "?"), "init": record.get("init", "pretrained"),
            "backbone": record.get("backbone", "?"), "labels": record.get("num_labels"),
            "draws": len(draws), "top1": float(record["top1"]), "top1_std": std if len(draws) > 1 else None,
            "test_data": record.get("test_data"),
        })
    return rows


def timm_snippet(config: dict[str, Any], weights: str) -> str:
    """Python code that loads the export with timm alone: ``weights`` is the model.safetensors path."""
    cfg = config["pretrained_cfg"]
    args = "".join(f"    {key}={value!r},\n" for key, value in config["model_args"].items())
    return (
        "import timm\n\n"
        "model = timm.create_model(\n"
        f"    {config['architecture']!r},\n"
        "    pretrained=True,\n"
        "    num_classes=0,  # pooled features; num_classes=N adds a new classifier\n"
        f"{args}"
        "    pretrained_cfg_overlay=dict(\n"
        f"        file={weights!r},\n"
        "        num_classes=0,\n"
        f"        input_size={tuple(cfg['input_size'])!r},\n"
        f"        mean={tuple(round(v, 6) for v in cfg['mean'])!r},\n"
        f"        std={tuple(round(v, 6) for v in cfg['std'])!r},\n"
        f"        interpolation={cfg.get('interpolation', 'bilinear')!r},\n"
        f"        crop_pct={cfg.get('crop_pct', 1.0)!r},\n"
        "    ),\n"
        ")\n"
        "model.eval()\n"
        "data_config = timm.data.resolve_model_data_config(model)  # input size, mean, std\n"
        "transform = timm.data.create_transform(**data_config)  # PIL image -> normalised tensor\n"
    )


def model_card(run_dir: str | Path, out_dir: str | Path, config: dict[str, Any]) -> str:
    """The card's Markdown text for the export of ``run_dir`` into ``out_dir`` (``config``: its config.json).

    Example:
        >>> config = json.loads(Path("exported/photos/config.json").read_text())  # doctest: +SKIP
        >>> text = model_card("runs/photos", "exported/photos", config)  # doctest: +SKIP
    """
    from selfsight import __version__

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    run = _read_json(run_dir / "run.json") or {}
    summary = _read_json(run_dir / "pretrain.json")
    try:
        run_config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        run_config = {}
    method = config.get("selfsight", {}).get("method") or run.get("method", "?")
    arch = config["architecture"]
    cfg = config["pretrained_cfg"]
    backbone = run.get("backbone", {})
    in_chans, size = cfg["input_size"][0], cfg["input_size"][-1]
    step = config.get("selfsight", {}).get("step")
    lines = [
        f"# {arch} pre-trained with {method} (selfsight)",
        "",
        f"A timm `{arch}` backbone pre-trained without labels by selfsight {__version__}, exported from the run "
        f"`{run_dir}`" + (f" at step {step}" if step is not None else "") + ".",
        "",
        "## Method",
        "",
        f"- {_paper(method)}",
        f"- options: {_options(run_config.get('method_config') or {})}",
    ]
    optim = run_config.get("optim") or {}
    if optim:
        lines.append(f"- optimiser: AdamW, lr {optim.get('lr')}, weight decay {optim.get('weight_decay')}, "
                     f"warm-up {optim.get('warmup_steps') or optim.get('warmup_fraction')}"
                     f"{' steps' if optim.get('warmup_steps') else ' of the steps'}, cosine decay; "
                     f"batch {run.get('batch_size', run_config.get('batch_size'))}, "
                     f"precision {run_config.get('precision', '?')}, seed {run_config.get('seed', '?')}")
    lines += [
        "",
        "## Backbone",
        "",
        f"- timm `{arch}`" + (f", {backbone['params_m']}M parameters" if "params_m" in backbone else "")
        + f", {config.get('num_features', '?')} features (pooled, `num_classes=0`)",
        f"- options: {_options(config['model_args'])}",
        f"- input: {in_chans} channel{'s' if in_chans > 1 else ''} ({'RGB' if in_chans == 3 else 'grayscale'}), "
        f"{size} x {size} px",
        "",
        "## Data",
        "",
    ]
    data = run.get("data") or {}
    if data:
        labels = f"; its {data['num_classes']} classes were not used by pre-training" if data.get("num_classes") else ""
        description = data.get("description", run_config.get("data", "?"))
        lines.append(f"- {description}, read at {data.get('img_size', size)} px "
                     f"with {data.get('in_chans', in_chans)} channel(s){labels}")
        if data.get("num_skipped"):
            names = ", ".join(str(item.get("path")) for item in data.get("skipped", [])[:3])
            lines.append(f"- {data['num_skipped']} unreadable file(s) skipped, e.g. {names}")
    else:
        lines.append(f"- `{run_config.get('data', '?')}` (no data summary in run.json)")
    lines += ["", "## Budget", ""]
    needed = ("steps", "images_seen", "minutes", "img_per_s", "final_loss")
    if summary and all(isinstance(summary.get(key), int | float) for key in needed):
        epochs = ""
        if data.get("num_images"):
            epochs = f", {summary['images_seen'] / data['num_images']:.1f} epochs"
        lines.append(f"- {summary['steps']} steps ({summary['images_seen']:,} images{epochs}) in "
                     f"{summary['minutes']:.1f} min at {summary['img_per_s']:.0f} img/s, "
                     f"{summary.get('processes', 1)} process(es); "
                     f"final loss {summary['final_loss']:.4f}, {summary.get('skipped_steps', 0)} skipped step(s)")
        if step is not None and step != summary["steps"]:
            lines.append(f"- exported from step {step} (the run's summary is of step {summary['steps']})")
    else:
        lines.append(f"- no complete summary (pretrain.json) in the run: unfinished or interrupted; exported "
                     f"from step {step}")
    for key in ("steps", "epochs", "minutes"):
        if run_config.get(key) is not None:
            lines.append(f"- budget asked for: {key} = {run_config[key]}")
            break
    lines += ["", "## Evaluation", ""]
    rows = eval_rows(run_dir)
    if rows:
        lines += ["| file | protocol | init | backbone | labels | top-1 |", "|---|---|---|---|---|---|"]
        for row in rows:
            top1 = _percent(row["top1"])
            if row["top1_std"] is not None:
                top1 = f"{100 * row['top1']:.2f} ± {100 * row['top1_std']:.2f}% ({row['draws']} draws)"
            lines.append(f"| {row['file']} | {row['kind']} | {row['init']} | {row['backbone']} | {row['labels']} "
                         f"| {top1} |")
        tests = sorted({str(row["test_data"]) for row in rows if row.get("test_data")})
        if tests:
            lines += ["", f"Test data: {', '.join(f'`{t}`' for t in tests)}."]
    else:
        lines.append("No evaluation in the run directory (`selfsight eval knn|linear|finetune|compare --run RUN` "
                     "writes one).")
    weights = str(out_dir / "model.safetensors")
    mean = ", ".join(f"{v:.4f}" for v in cfg["mean"])
    std = ", ".join(f"{v:.4f}" for v in cfg["std"])
    lines += [
        "",
        "## Load it",
        "",
        "With timm alone (replace the path if you moved this folder):",
        "",
        "```python",
        timm_snippet(config, weights).rstrip("\n"),
        "```",
        "",
        "With selfsight (the same model, its normalisation in `model.pretrained_cfg`):",
        "",
        "```python",
        "import selfsight",
        "",
        f"model = selfsight.load_backbone({str(out_dir)!r})  # num_classes=N adds a new classifier",
        "```",
        "",
        "## Normalisation",
        "",
        f"Inputs are {in_chans}-channel {'RGB' if in_chans == 3 else 'grayscale'} images resized (shorter side) and "
        f"center-cropped to {size} x {size} px, scaled to [0, 1], then normalised with the pre-training data's own "
        f"statistics: mean ({mean}), std ({std}). "
        + ("Convert gray images with `image.convert('L')` first. " if in_chans == 1 else "")
        + "The timm snippet's `transform` does all of this (bilinear resize, `crop_pct=1.0`).",
        "",
    ]
    return "\n".join(lines)


def write_model_card(run_dir: str | Path, out_dir: str | Path, config: dict[str, Any]) -> Path:
    """Write ``out_dir/README.md`` for the export of ``run_dir``; returns its path.

    Example:
        >>> write_model_card("runs/photos", "exported/photos", config)  # doctest: +SKIP
        PosixPath('exported/photos/README.md')
    """
    path = Path(out_dir) / CARD_NAME
    path.write_text(model_card(run_dir, out_dir, config))
    return path
