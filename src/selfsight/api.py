"""The Python API: what the ``selfsight`` command line does, as functions with keyword arguments.

>>> import selfsight
>>> summary = selfsight.pretrain("~/photos", out="runs/photos")          # doctest: +SKIP
>>> record = selfsight.evaluate("knn", run="runs/photos", train_data="~/labeled", test_data="~/test",
...                             labels_per_class=20)                       # doctest: +SKIP
>>> selfsight.export("runs/photos", out="exported/photos")               # doctest: +SKIP
>>> model = selfsight.load_backbone("exported/photos")                   # doctest: +SKIP

Keyword arguments mirror the command line's options (``--batch-size`` is ``batch_size``); errors are the
exceptions of :mod:`selfsight.errors` (``DataError``, ``ConfigError``, ``CheckpointError`` ...), which
the command line prints as one line. Everything heavy is imported when a function is called.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfsight.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from torch import nn


#: the backbones each built-in method trains, as ``selfsight methods`` prints them; a method without an
#: entry (one added later) prints "see README"
SUPPORTED_BACKBONES: dict[str, str] = {
    "simmim": "ViT, Swin, SwinV2 (a mask token replaces the embeddings of masked patches)",
    "simclr": "any timm backbone (ResNet, ConvNeXt, ViT, Swin); pooled features",
    "byol": "any timm backbone (ResNet, ConvNeXt, ViT, Swin); pooled features",
    "moby": "any timm backbone: Swin and ViT as in the paper, CNNs as well",
    "mocov2": "any timm backbone (ResNet as in the paper, ConvNeXt, ViT, Swin); pooled features",
    "mocov3": "any timm backbone; fits ViTs (the paper's)",
    "dino": "any timm backbone (ViT as in the paper: class token; CNNs: pooled features)",
    "mae": "timm ViT (class/register tokens; not dynamic_img_size or patch_drop_rate); Swin: simmim, CNNs: spark",
    "spark": "timm ResNet, ConvNeXt (stages from feature_info; img_size a multiple of 32); GroupNorm, SE/ECA refused",
    "fd": "student: timm ViT or Swin; teacher (teacher=PATH): any selfsight run or export directory",
    "pic": "any timm backbone; pooled features",
    "pixpro": "timm CNNs (the paper's ResNet C5), Swin (last stage), ViT (token grid); the last feature map",
}

_PRETRAIN_OPTIONS = (
    "method", "backbone", "backbone_opts", "steps", "epochs", "minutes", "batch_size", "seed", "log_every",
    "ckpt_every", "device", "precision", "num_workers", "monitor_data", "monitor_every", "compile", "logger",
)


def _override_items(overrides: list[str] | dict[str, Any] | None) -> list[str]:
    """``{"lr": 1e-3, "method.crop_scale": [0.5, 1]}`` or ``["lr=1e-3"]`` -> ``["lr=0.001", ...]``."""
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        return [f"{key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in overrides.items()]
    return [str(item) for item in overrides]


def _path(value: str | Path | None) -> str | None:
    """A path or data spec as a string, ``~`` expanded (``"~/photos:train"`` -> ``"/home/me/photos:train"``)."""
    return None if value is None else os.path.expanduser(str(value))


def _backbone_opts(opts: dict[str, Any] | list[str] | None) -> dict[str, Any] | None:
    if opts is None or isinstance(opts, dict):
        return opts
    from selfsight.backbones import parse_backbone_opts

    return parse_backbone_opts(list(opts))


def pretrain(
    data: str | Path | None = None,
    out: str | Path | None = None,
    *,
    method: str | None = None,
    backbone: str | None = None,
    backbone_opts: dict[str, Any] | list[str] | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    minutes: float | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    log_every: int | None = None,
    ckpt_every: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    num_workers: int | None = None,
    monitor_data: str | None = None,
    monitor_every: int | None = None,
    compile: bool | None = None,
    logger: str | None = None,
    config: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = True,
    auto: bool = True,
) -> dict[str, Any]:
    """Pre-train a backbone on unlabeled images (``selfsight pretrain``); returns the run's summary.

    Given ``data`` but no ``backbone``, no ``config`` and no ``resume``, the options not given are chosen
    from the images and the device (:func:`selfsight.autoconfig.choose_defaults`: input channels and size,
    method, backbone, batch size, budget; ``backbone_opts`` without ``backbone`` adjust the chosen
    backbone), printed in two lines and written to the run's ``config.yaml`` like any option;
    ``auto=False`` keeps the plain defaults (SimMIM on a 28-px gray ViT). ``backbone_opts`` takes a dict
    or ``["img_size=32", "in_chans=1"]``; ``overrides`` any config option, as ``["lr=1e-3"]`` or
    ``{"lr": 1e-3, "method.crop_scale": [0.5, 1]}``; ``config`` a YAML file (e.g. a run's
    ``config.yaml``); ``resume`` continues the run in ``out`` from its newest
    checkpoint. Budgets: one of ``steps``, ``epochs``, ``minutes``.

    Returns a dict with method, backbone, steps, planned_steps, images_seen, minutes, img_per_s,
    final_loss, skipped_steps, checkpoint, run_dir, processes and ``auto`` (the printed choice, or []).
    Raises DataError, ConfigError, CheckpointError or TrainingError with a one-line message.

    Example:
        >>> import selfsight
        >>> summary = selfsight.pretrain("~/photos", out="runs/photos", minutes=10)  # doctest: +SKIP
        auto: 3 input channels (16 of 64 sampled images are colour), 128 px (...)
        auto: simclr on a narrow resnet18 (...), batch 256 (the measured recipe's); ...
        >>> summary["run_dir"]  # doctest: +SKIP
        'runs/photos'
    """
    from selfsight.config import PretrainConfig, build_config, parse_override
    from selfsight.distributed import env_rank
    from selfsight.engine import pretrain as run_pretrain

    items = _override_items(overrides)
    data, out, config, monitor_data = _path(data), _path(out), _path(config), _path(monitor_data)
    if resume and out is None:
        raise ConfigError("resume needs out (the run directory to continue)")
    config_file = config
    if resume and config_file is None and (Path(out) / "config.yaml").is_file():
        config_file = Path(out) / "config.yaml"
    values: dict[str, Any] = {
        "method": method, "backbone": backbone, "backbone_opts": _backbone_opts(backbone_opts), "steps": steps,
        "epochs": epochs, "minutes": minutes, "batch_size": batch_size, "seed": seed, "log_every": log_every,
        "ckpt_every": ckpt_every, "device": device, "precision": precision, "num_workers": num_workers,
        "monitor_data": monitor_data, "monitor_every": monitor_every, "compile": compile, "logger": logger,
    }
    if backbone is not None and values["backbone_opts"] is None:
        values["backbone_opts"] = {}  # a named backbone with timm's own options, not the default ViT's
    lines: list[str] = []
    if auto and data is not None and config_file is None and not resume:
        from selfsight.autoconfig import choose_defaults

        top_level = {f.name for f in dataclasses.fields(PretrainConfig)}
        given = {name for name, value in values.items() if value is not None}
        given |= {path[0] for path in (parse_override(item)[0] for item in items) if path[0] in top_level}
        choice = choose_defaults(data, given, device=device, method=method,
                                 backbone_opts=values["backbone_opts"])
        # the chosen backbone options already hold the user's own (theirs win)
        values.update({k: v for k, v in choice.options.items() if values.get(k) is None or k == "backbone_opts"})
        items = [*choice.overrides, *items]
        lines = choice.lines
        if lines and env_rank() == 0:
            for line in lines:
                print(line, flush=True)
    cfg = build_config(
        config_file, items, data=data, out=out,
        **{k: v for k, v in values.items() if k in _PRETRAIN_OPTIONS},
    )
    summary = run_pretrain(cfg, resume=resume, progress=progress)
    summary["auto"] = lines
    return summary


def evaluate(
    kind: str,
    run: str | Path | None = None,
    *,
    train_data: str | None = None,
    test_data: str | None = None,
    labels_per_class: int | None = None,
    label_fraction: float | None = None,
    draws: int | None = None,
    tune: bool | None = None,
    seed: int = 0,
    device: str = "auto",
    out: str | Path | None = None,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Few-label evaluation (``selfsight eval KIND``): ``knn``, ``linear``, ``finetune`` or ``compare``.

    ``knn``/``linear``/``finetune`` run :func:`selfsight.eval.api.evaluate` and take its
    :class:`~selfsight.eval.api.EvalConfig` options as keywords (``init="scratch"``, ``backbone``,
    ``backbone_opts``, ``layer``, ``pool``, ``k``, ``temperature``, ``epochs``, ``lr``, ``weight_decay``,
    ``layer_decay``, ``batch_size`` ...); ``compare`` runs :func:`selfsight.eval.compare.compare` (every
    protocol and every baseline on the same label draws) and takes
    :class:`~selfsight.eval.compare.CompareConfig`'s (``epochs``, ``cnn``, ``rows`` ...). ``train_data``
    and ``test_data`` default to Fashion-MNIST's splits. ``draws`` label subsets (seeds ``seed``,
    ``seed + 1`` ...) and ``tune`` default to 3 draws, tuned, below 5,000 labels.

    Returns the result dict (written as JSON into ``out`` or the run): top1 (the mean over draws, a
    fraction), top1_std, top1_draws, num_labels, path ...; for compare: rows, strongest_baseline, gains.
    An unknown keyword raises ConfigError naming the known ones.

    Example:
        >>> import selfsight
        >>> record = selfsight.evaluate("linear", run="runs/photos", train_data="~/labeled",
        ...                             test_data="~/test", labels_per_class=20)  # doctest: +SKIP
        >>> f"{100 * record['top1']:.1f} ± {100 * record['top1_std']:.1f}%"  # doctest: +SKIP
        '71.3 ± 1.2%'
    """
    from selfsight.config import DEFAULT_DATA, DEFAULT_TEST_DATA

    common = {
        "run": _path(run), "train_data": _path(train_data) or DEFAULT_DATA,
        "test_data": _path(test_data) or DEFAULT_TEST_DATA, "labels_per_class": labels_per_class,
        "label_fraction": label_fraction, "draws": draws, "tune": tune, "seed": seed, "device": device,
        "out": _path(out), "progress": progress,
    }
    if "backbone_opts" in options:
        options["backbone_opts"] = _backbone_opts(options["backbone_opts"]) or {}
    if kind == "compare":
        from selfsight.eval.compare import CompareConfig, compare

        if run is None:
            raise ConfigError("evaluate('compare') needs run (a pre-training run directory)")
        return compare(_dataclass_from(CompareConfig, {**common, **options}, "compare"))
    from selfsight.eval.api import EvalConfig
    from selfsight.eval.api import evaluate as run_evaluate

    return run_evaluate(_dataclass_from(EvalConfig, {"kind": kind, **common, **options}, kind))


def _dataclass_from(cls: type, values: dict[str, Any], what: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) for evaluate({what!r}): {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    return cls(**values)


def export(run: str | Path, out: str | Path) -> dict[str, Any]:
    """Export a run's backbone for timm (``selfsight export RUN --out OUT``).

    Writes ``OUT/model.safetensors`` (the timm model's state dict), ``OUT/config.json`` (timm's layout:
    architecture, model arguments, input size, mean/std) and ``OUT/README.md`` (a model card: method,
    backbone, data, budget, the run's evaluation results, how to load it). Returns a dict with weights,
    config, card (the paths), architecture, model_args and tensors (the count).

    Example:
        >>> import selfsight
        >>> info = selfsight.export("runs/photos", out="exported/photos")  # doctest: +SKIP
        >>> info["architecture"], info["card"]  # doctest: +SKIP
        ('resnet18', 'exported/photos/README.md')
    """
    from selfsight.checkpoint import export_run

    return export_run(_path(run), _path(out))


def _read_export_dir(path: Path) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]:
    from safetensors.torch import load_file

    try:
        config = json.loads((path / "config.json").read_text())
        architecture, model_args, cfg = config["architecture"], config.get("model_args", {}), config["pretrained_cfg"]
        state = load_file(str(path / "model.safetensors"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is not a readable selfsight export ({type(exc).__name__}: {exc})") from None
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in model_args.items()}
    norm = {"input_size": tuple(cfg["input_size"]), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}
    return architecture, args, state, norm


def _read_run_dir(path: Path) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]:
    from selfsight.checkpoint import load_run_backbone

    backbone, info = load_run_backbone(path)
    norm = {"input_size": (backbone.in_chans, backbone.img_size, backbone.img_size),
            "mean": tuple(info["mean"]), "std": tuple(info["std"])}
    return backbone.name, dict(backbone.timm_kwargs), backbone.model.state_dict(), norm


def load_backbone(path: str | Path, *, num_classes: int = 0, device: str = "cpu") -> nn.Module:
    """A ready timm model from a run directory (its newest checkpoint) or an export directory.

    The model is ``timm.create_model(architecture, num_classes=num_classes, **model_args)`` with the
    pre-trained weights, in eval mode on ``device``. ``num_classes=0`` (the default) returns pooled
    features; a positive number adds a freshly initialised classifier. Its normalisation lives where timm
    keeps it, ``model.pretrained_cfg`` (``mean``, ``std``, ``input_size``, ``interpolation``,
    ``crop_pct``), so ``timm.data.resolve_model_data_config(model)`` and ``timm.data.create_transform``
    give the right preprocessing; ``model.pretrained_cfg["mean"]`` is the mean itself.
    Raises CheckpointError when ``path`` is neither kind of directory or its weights do not fit.

    Example:
        >>> import selfsight, timm, torch
        >>> model = selfsight.load_backbone("exported/photos")  # doctest: +SKIP
        >>> cfg = timm.data.resolve_model_data_config(model)  # doctest: +SKIP
        >>> features = model(torch.zeros(1, *cfg["input_size"]))  # doctest: +SKIP
    """
    import timm

    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (path / "run.json").is_file():
        architecture, model_args, state, norm = _read_run_dir(path)
    elif (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        architecture, model_args, state, norm = _read_export_dir(path)
    else:
        raise CheckpointError(f"{path} is neither a selfsight run directory (run.json) nor an export directory "
                              "(config.json and model.safetensors)")
    if num_classes < 0:
        raise ConfigError(f"num_classes must be >= 0, got {num_classes}")
    try:
        model = timm.create_model(architecture, pretrained=False, num_classes=num_classes, **model_args)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: timm cannot build {architecture} with {model_args}: {exc}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    classifier = [id(p) for p in model.get_classifier().parameters()] if num_classes else []
    head = {name for name, param in model.named_parameters() if id(param) in classifier}
    if unexpected or set(missing) - head:
        raise CheckpointError(f"{path}: the weights do not fit {architecture} (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")
    model.pretrained_cfg = {**dict(getattr(model, "pretrained_cfg", {}) or {}), **norm,
                            "interpolation": "bilinear", "crop_pct": 1.0, "num_classes": num_classes}
    return model.eval().to(device)


def describe_methods() -> list[dict[str, Any]]:
    """The pre-training methods (``selfsight methods``): for each, its name, paper (the first paragraph of
    its module's docstring), summary (its class docstring's first line), backbones, and defaults (its
    Config dataclass's fields with their default values).

    Example:
        >>> import selfsight
        >>> simclr = next(m for m in selfsight.describe_methods() if m["name"] == "simclr")
        >>> simclr["defaults"]["temperature"]
        0.2
    """
    import sys

    from selfsight.registry import get_method_class, list_methods

    found = []
    for name in list_methods():
        cls = get_method_class(name)
        module_doc = (sys.modules[cls.__module__].__doc__ or "").strip()
        paper = " ".join(module_doc.split("\n\n")[0].split())
        summary = ((cls.__doc__ or "").strip().splitlines() or [""])[0]
        defaults = {}
        for f in dataclasses.fields(cls.Config):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
        found.append({"name": name, "paper": paper or summary, "summary": summary,
                      "backbones": SUPPORTED_BACKBONES.get(name, "see README"), "defaults": defaults})
    return found
