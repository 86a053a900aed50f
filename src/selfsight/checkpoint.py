"""Checkpoints that are never half-written, exact resume, and export to timm-loadable weights.

A run directory holds::

    config.yaml          the resolved configuration
    run.json             backbone description, input normalisation, data summary
    metrics.jsonl        one JSON object per logged step
    checkpoints/step-00000500.pt ...   the newest ``keep_checkpoints`` complete checkpoints

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed
over its final name (``os.replace`` is atomic), so a file named ``step-*.pt`` is always complete.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from selfsight import distributed
from selfsight.backbones import Backbone
from selfsight.errors import CheckpointError, ConfigError, UnsafeCheckpointError
from selfsight.registry import get_method_class

log = logging.getLogger("selfsight")

CHECKPOINT_DIR = "checkpoints"
#: written into a run directory when a torchrun job's first attempt refuses to start there (it holds
#: checkpoints and --resume was not given), so that torchrun's restarts refuse too instead of resuming
REFUSED_MARKER = ".refused-start"
_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, newest first (temporary files are never listed)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


_TEMP_NAME = re.compile(r"^\.step-\d{8}\.pt\.\d+\.tmp$")


def remove_stale_temp_files(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files a checkpoint write killed half-way left behind (never loaded, only
    clutter). Call it only while no process of this run is writing a checkpoint. Returns what was deleted."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if _TEMP_NAME.match(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d half-written checkpoint file(s) of an earlier attempt", len(stale))
    return stale


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(state: dict[str, Any], run_dir: str | Path, step: int, keep: int = 2) -> Path:
    """Write ``state`` atomically as ``checkpoints/step-{step}.pt`` and delete all but the newest ``keep``."""
    path = checkpoint_path(run_dir, step)
    atomic_write_bytes(path, lambda handle: torch.save(state, handle))
    for old in list_checkpoints(run_dir)[keep:]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one checkpoint file; raises CheckpointError when it is unreadable or incomplete.

    Read with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists, tuples and dicts only,
    which is all selfsight writes. A file holding anything else (a pickled object, whose loading could run
    code it carries, as a checkpoint someone else sent could) raises UnsafeCheckpointError, and nothing
    of it is executed.
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it holds objects other than tensors and plain values, and loading "
                "it could run code (selfsight's own checkpoints never do; was it written by another program?)"
            ) from None
        raise CheckpointError(f"checkpoint {path} is damaged (UnpicklingError: {exc})") from None
    except Exception as exc:  # a damaged file can fail in many ways inside torch/zipfile/pickle
        raise CheckpointError(f"checkpoint {path} is damaged ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is damaged (missing model or step)")
    return state


def load_latest_checkpoint(
    run_dir: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any], Path]:
    """The newest checkpoint that loads; a damaged newer one is skipped with a warning naming it."""
    candidates = list_checkpoints(run_dir)
    if not candidates:
        raise CheckpointError(f"no checkpoint in {Path(run_dir) / CHECKPOINT_DIR}")
    for path in candidates:
        try:
            state = load_checkpoint(path, map_location)
        except UnsafeCheckpointError:
            raise  # refused, not damaged: never silently replaced by an older file
        except CheckpointError as exc:
            log.warning("%s; falling back to an older checkpoint", exc)
            continue
        if path != candidates[0]:
            log.warning("resuming from %s, the last complete checkpoint", path)
        return state, path
    raise CheckpointError(f"every checkpoint in {Path(run_dir) / CHECKPOINT_DIR} is damaged")


def start_state(run_dir: str | Path, resume: bool) -> tuple[dict[str, Any] | None, Path | None]:
    """The checkpoint a run starts from, the same on every rank: ``(state, path)``, or ``(None, None)``
    for a fresh run.

    ``resume`` loads the newest complete checkpoint (a damaged newer one is skipped with a warning).
    Without it, a run directory that holds checkpoints is refused, except in an attempt that torchrun
    restarted after a failure (``TORCHELASTIC_RESTART_COUNT`` > 0), which resumes by itself. A torchrun
    job whose first attempt was refused leaves ``REFUSED_MARKER`` behind so that its restarts refuse as
    well (the next first attempt removes it). Rank 0 picks the checkpoint; the others load the same file.
    """
    run_dir = Path(run_dir)
    # any rank: across machines only the failed node's agent counts the restart
    (restarted,) = distributed.any_rank(distributed.restart_count() > 0)
    marker = run_dir / REFUSED_MARKER
    has_checkpoints = bool(list_checkpoints(run_dir))
    refusal = f"{run_dir} already holds checkpoints: add --resume to continue that run, or choose another --out"
    if restarted and marker.exists():
        raise ConfigError(refusal)
    if distributed.is_main() and not restarted:
        marker.unlink(missing_ok=True)
    if not resume and not (restarted and has_checkpoints):
        if has_checkpoints:
            if distributed.is_main() and distributed.launched_by_torchrun():
                marker.write_text(refusal + "\n")
            distributed.barrier()  # the marker exists before any rank exits
            raise ConfigError(refusal)
        return None, None
    if not has_checkpoints:
        raise CheckpointError(f"no checkpoint in {run_dir / CHECKPOINT_DIR}")
    state, choice = None, None
    if distributed.is_main():
        try:
            state, path = load_latest_checkpoint(run_dir)
            choice = ("ok", path.name)
        except CheckpointError as exc:
            choice = ("error", str(exc))
    kind, value = distributed.broadcast_object(choice)
    if kind == "error":
        raise CheckpointError(value)
    path = run_dir / CHECKPOINT_DIR / value
    if state is None:
        state = load_checkpoint(path)
    if restarted and not resume and distributed.is_main():
        log.warning("torchrun restart %d: resuming from %s, the newest complete checkpoint",
                    distributed.restart_count(), path)
    return state, path


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a selfsight run directory (no run.json)")
    return json.loads(path.read_text())


def backbone_state(model_state: dict[str, torch.Tensor], attribute: str = "backbone") -> dict[str, torch.Tensor]:
    """The timm model's weights out of a method's state dict (keys ``{attribute}.model.*``).

    ``attribute`` is the method's ``export_backbone``: ``backbone`` for most, ``teacher_backbone`` for DINO.
    """
    prefix = f"{attribute}.model."
    return {k[len(prefix) :]: v for k, v in model_state.items() if k.startswith(prefix)}


def load_run_backbone(run_dir: str | Path) -> tuple[Backbone, dict[str, Any]]:
    """Re-create a run's backbone with the weights of its newest complete checkpoint.

    Returns ``(backbone, info)``; info holds ``mean``, ``std``, ``img_size``, ``in_chans``,
    ``method``, ``backbone`` and ``checkpoint``.
    """
    info = read_run_info(run_dir)
    state, path = load_latest_checkpoint(run_dir)
    backbone = Backbone(info["backbone"]["name"], _opts_from_json(info["backbone"]["opts"]))
    attribute = get_method_class(info["method"]).export_backbone
    backbone.model.load_state_dict(backbone_state(state["model"], attribute))
    backbone.eval()
    out = {
        "mean": info["mean"],
        "std": info["std"],
        "img_size": backbone.img_size,
        "in_chans": backbone.in_chans,
        "method": info["method"],
        "backbone": info["backbone"],
        "checkpoint": str(path),
        "step": state["step"],
    }
    return backbone, out


def _opts_from_json(opts: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}


def export_run(run_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write ``model.safetensors`` (the timm model's state dict), a timm-style ``config.json`` and a model
    card, ``README.md`` (``selfsight.modelcard``: method, backbone, data, budget, the run's evaluations,
    how to load it, the normalisation).

    Load it with::

        timm.create_model(name, pretrained=True, num_classes=0, **model_args,
                          pretrained_cfg_overlay=dict(file="DIR/model.safetensors"))

    Returns weights, config and card (paths), architecture, model_args and tensors (the count).
    """
    from selfsight.modelcard import write_model_card

    backbone, info = load_run_backbone(run_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in backbone.model.state_dict().items()}
    weights = out / "model.safetensors"
    atomic_write_bytes(weights, lambda handle: handle.write(_safetensors_bytes(tensors)))
    model_args = {k: list(v) if isinstance(v, tuple) else v for k, v in backbone.timm_kwargs.items()}
    config = {
        "architecture": backbone.name,
        "num_classes": 0,
        "num_features": backbone.num_features,
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [backbone.in_chans, backbone.img_size, backbone.img_size],
            "mean": info["mean"],
            "std": info["std"],
            "num_classes": 0,
            "interpolation": "bilinear",
            "crop_pct": 1.0,
        },
        "selfsight": {"method": info["method"], "run": str(Path(run_dir).resolve()), "step": info["step"]},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    card = write_model_card(run_dir, out, config)
    return {
        "weights": str(weights),
        "config": str(out / "config.json"),
        "card": str(card),
        "architecture": backbone.name,
        "model_args": model_args,
        "tensors": len(tensors),
    }


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)
