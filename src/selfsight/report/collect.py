"""Read what a run directory holds into one ``RunFacts``; a missing optional file becomes a note, never an error."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from selfsight.errors import ConfigError

#: run-dir names that say little on their own; the report shows "parent/name" for them
GENERIC_NAMES = {"pretrain", "run", "out", "output"}
LOG_PROBLEMS = (" WARNING ", " ERROR ", " CRITICAL ")
MAX_LOG_LINES = 12


@dataclass
class RunFacts:
    """Everything the report shows about one run; ``notes`` say what was missing or unreadable."""

    path: Path
    name: str
    info: dict[str, Any]
    config_text: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    pretrain: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    diagnostics: dict[str, Any] | None = None
    log_problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def resolve_run_dir(path: str | Path) -> Path:
    """The run dir ``path`` names: itself when it holds run.json, its ``pretrain/`` for a demo folder."""
    path = Path(path)
    if (path / "run.json").is_file():
        return path
    if (path / "summary.json").is_file() and (path / "pretrain" / "run.json").is_file():
        return path / "pretrain"  # `selfsight demo --out DIR` keeps its pre-training run in DIR/pretrain
    why = "it does not exist" if not path.exists() else "no run.json in it"
    raise ConfigError(f"{path} is not a run directory ({why}); give a folder written by `selfsight pretrain --out`")


def read_json(path: Path, notes: list[str]) -> Any:
    """The parsed file, or None (with a note) when it is unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        notes.append(f"could not read {path.name}: {exc}")
        return None


def read_metrics(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """metrics.jsonl records; a torn last line (a run still writing) is skipped."""
    records, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
    if bad:
        notes.append(f"metrics.jsonl: {bad} unreadable line(s) skipped")
    return records


def demo_dir_of(run: Path) -> Path | None:
    """The demo folder whose summary.json names ``run`` as its pre-training run, if any."""
    summary_path = run.parent / "summary.json"
    if not summary_path.is_file():
        return None
    try:
        named = json.loads(summary_path.read_text())["pretrain"]["run"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return run.parent if Path(str(named)).name == run.name else None


def read_evals(run: Path, notes: list[str]) -> list[dict[str, Any]]:
    """Every eval_*.json of the run, plus those the demo wrote next to it (its scratch baseline among them)."""
    folders = [run]
    demo = demo_dir_of(run)
    if demo is not None:
        folders.append(demo)
    seen: set[Path] = set()
    evals = []
    for folder in folders:
        for path in sorted(folder.glob("eval_*.json")):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            record = read_json(path, notes)
            if isinstance(record, dict) and "top1" in record:
                evals.append({**record, "file": str(path.relative_to(run.parent))})
    if not evals and demo is not None:
        evals = demo_summary_evals(read_json(demo / "summary.json", notes) or {})
    return evals


def demo_summary_evals(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Evaluation rows rebuilt from a demo summary.json (when its eval_*.json files are gone)."""
    results = summary.get("eval") or {}
    baselines = summary.get("baselines") or {}
    draws = results.get("draws")
    rows = []
    for source, key, kind, init, backbone in (
        (results, "knn_top1", "knn", "pretrained", None),
        (results, "linear_top1", "linear", "pretrained", None),
        (results, "finetune_top1", "finetune", "pretrained", None),
        (results, "scratch_finetune_top1", "finetune", "scratch", None),
        (baselines, "raw_logreg_top1", "linear", "pixels", "pixels"),
        (baselines, "raw_knn_top1", "knn", "pixels", "pixels"),
        (baselines, "scratch_cnn_top1", "finetune", "scratch", "resnet18"),
    ):
        if isinstance(source.get(key), (int, float)):
            row = {"kind": kind, "init": init, "num_labels": results.get("labels"), "top1": source[key],
                   "num_test": results.get("test_images"), "file": "summary.json", "draws": draws}
            if backbone:
                row["backbone"] = backbone
            if key == "finetune_top1" and isinstance(results.get("finetune_top1_std"), (int, float)):
                row["top1_std"] = results["finetune_top1_std"]
            rows.append(row)
    return rows


def display_name(run: Path) -> str:
    name = run.resolve().name
    return f"{run.resolve().parent.name}/{name}" if name in GENERIC_NAMES else name


def collect_run(path: str | Path) -> RunFacts:
    """Read one run dir; raises ConfigError only when it is not a run dir at all."""
    run = resolve_run_dir(path)
    notes: list[str] = []
    info = read_json(run / "run.json", notes)
    if not isinstance(info, dict):
        raise ConfigError(f"{run / 'run.json'} is not a readable run description: {'; '.join(notes)}")
    facts = RunFacts(path=run, name=display_name(run), info=info, notes=notes)

    config_path = run / "config.yaml"
    if config_path.is_file():
        facts.config_text = config_path.read_text(errors="replace")
        try:
            parsed = yaml.safe_load(facts.config_text)
            facts.config = parsed if isinstance(parsed, dict) else {}
        except yaml.YAMLError as exc:
            notes.append(f"config.yaml does not parse: {exc}")
    else:
        notes.append("no config.yaml in the run dir")

    if (run / "pretrain.json").is_file():
        facts.pretrain = read_json(run / "pretrain.json", notes)
    else:
        notes.append("no pretrain.json: the run is still going, or stopped before its end")

    if (run / "metrics.jsonl").is_file():
        facts.metrics = read_metrics(run / "metrics.jsonl", notes)
    if not facts.metrics:
        notes.append("no metrics logged (metrics.jsonl missing or empty)")

    facts.evals = read_evals(run, notes)

    diagnostics = run / "diagnostics" / "diagnostics.json"
    if diagnostics.is_file():
        loaded = read_json(diagnostics, notes)
        facts.diagnostics = loaded if isinstance(loaded, dict) else None

    log_path = run / "train.log"
    if log_path.is_file():
        lines = log_path.read_text(errors="replace").splitlines()
        problems = [line for line in lines if any(level in line for level in LOG_PROBLEMS)]
        facts.log_problems = problems[-MAX_LOG_LINES:]
    return facts
