"""``evaluate(EvalConfig)``: one few-label evaluation (k-NN, linear probe or fine-tune) of a backbone.

The backbone comes from a pre-training run (``init='pretrained'``) or is freshly initialised
(``init='scratch'``, the baseline a pre-training has to beat). The result is printed on one line
and written as JSON (``eval_{kind}[_scratch]_{num_labels}.json``) into the run dir or ``out``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from selfsight.backbones import POOLINGS, Backbone
from selfsight.data import ImageSet, open_images
from selfsight.engine import resolve_device
from selfsight.errors import ConfigError
from selfsight.eval.features import extract_features
from selfsight.eval.finetune import FINETUNE_DEFAULTS, finetune
from selfsight.eval.knn import knn_scores, top1
from selfsight.eval.linear import LINEAR_DEFAULTS, linear_probe
from selfsight.eval.splits import few_label_indices

KINDS = ("knn", "linear", "finetune")
INITS = ("pretrained", "scratch")
FEATURE_BATCH_SIZE = 256


@dataclass
class EvalConfig:
    """One evaluation. ``None`` hyper-parameters take the protocol's defaults.

    ``layer``, ``pool`` choose the frozen features (knn, linear); ``k``, ``temperature`` are k-NN's;
    ``epochs``, ``lr``, ``layer_decay`` are fine-tuning's; ``weight_decay`` is the linear probe's L2
    penalty or fine-tuning's AdamW decay; ``batch_size`` is fine-tuning's training batch, else the
    feature-extraction batch. ``backbone``/``backbone_opts`` name the architecture for
    ``init='scratch'`` (default: the run's).
    """

    kind: str
    run: str | None = None
    init: str = "pretrained"
    backbone: str | None = None
    backbone_opts: dict = field(default_factory=dict)
    train_data: str = ""
    test_data: str = ""
    labels_per_class: int | None = None
    label_fraction: float | None = None
    layer: int = -1
    pool: str = "avg"
    k: int = 20
    temperature: float = 0.07
    epochs: int | None = None
    lr: float | None = None
    layer_decay: float | None = None
    batch_size: int | None = None
    weight_decay: float | None = None
    seed: int = 0
    device: str = "auto"
    out: str | None = None


def check_config(cfg: EvalConfig) -> None:
    """Raise ConfigError on options that cannot work, before anything is loaded."""
    if cfg.kind not in KINDS:
        raise ConfigError(f"unknown evaluation kind {cfg.kind!r}; choose from {', '.join(KINDS)}")
    if cfg.init not in INITS:
        raise ConfigError(f"unknown init {cfg.init!r}; choose from {', '.join(INITS)}")
    if cfg.init == "pretrained" and not cfg.run:
        raise ConfigError("init=pretrained needs run (a pre-training run directory); or use init=scratch")
    if cfg.init == "scratch" and not cfg.backbone and not cfg.run:
        raise ConfigError("init=scratch needs backbone (a timm model name) or run (to copy its architecture)")
    if not cfg.train_data or not cfg.test_data:
        raise ConfigError("evaluation needs both train_data and test_data")
    if cfg.labels_per_class is not None and cfg.label_fraction is not None:
        raise ConfigError("give labels_per_class or label_fraction, not both")
    if cfg.pool not in POOLINGS:
        raise ConfigError(f"unknown pooling {cfg.pool!r}; choose from {', '.join(POOLINGS)}")
    if cfg.kind == "finetune" and (cfg.layer != -1 or cfg.pool != "avg"):
        raise ConfigError("layer and pool apply to knn and linear; fine-tuning reads the last layer")
    if cfg.kind != "finetune":
        given = [name for name in ("epochs", "lr", "layer_decay") if getattr(cfg, name) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to finetune only (the linear probe runs L-BFGS to the end)")
    if cfg.weight_decay is not None and cfg.weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {cfg.weight_decay}")
    for name in ("epochs", "batch_size", "k"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if cfg.lr is not None and cfg.lr <= 0:
        raise ConfigError(f"lr must be positive, got {cfg.lr}")


def load_backbone(cfg: EvalConfig) -> tuple[Backbone, dict[str, Any]]:
    """The backbone to evaluate and facts about it (``mean``/``std`` only for a pre-trained run)."""
    if cfg.init == "pretrained":
        from selfsight.checkpoint import load_run_backbone

        backbone, info = load_run_backbone(cfg.run)
        if cfg.backbone and cfg.backbone != backbone.name:
            raise ConfigError(
                f"backbone {cfg.backbone} differs from the run's {backbone.name}; drop it or use init=scratch"
            )
        return backbone, {"method": info.get("method"), "checkpoint": info.get("checkpoint"),
                          "mean": list(info["mean"]), "std": list(info["std"])}
    name, opts = cfg.backbone, dict(cfg.backbone_opts)
    if not name:  # the run's architecture, freshly initialised
        from selfsight.checkpoint import read_run_info

        arch = read_run_info(cfg.run)["backbone"]
        name = arch["name"]
        opts = {k: tuple(v) if isinstance(v, list) else v for k, v in arch.get("opts", {}).items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        backbone = Backbone(name, opts)
    return backbone, {"method": None, "checkpoint": None}


def _num_classes(train: ImageSet, test: ImageSet) -> int:
    if train.classes and test.classes and list(train.classes) != list(test.classes):
        raise ConfigError(f"{train.description} and {test.description} have different classes")
    top = max(int(images.labels.max()) if images.num_images else -1 for images in (train, test))
    return max(len(train.classes), top + 1)


def default_out_dir(cfg: EvalConfig, backbone_name: str) -> Path:
    """``out``, else the run dir, else ``./runs/eval-scratch-{backbone}``."""
    if cfg.out:
        return Path(cfg.out)
    if cfg.run:
        return Path(cfg.run)
    return Path("runs") / f"eval-scratch-{backbone_name}"


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(temp, path)


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run one evaluation, print a result line, write the JSON result and return it.

    Returns a dict with kind, init, backbone, run, data specs, num_labels, layer, pool,
    top1 (fraction in [0, 1]), minutes, seed, device and the protocol's hyper-parameters.
    """
    start = time.perf_counter()
    check_config(cfg)
    device = resolve_device(cfg.device)
    backbone, facts = load_backbone(cfg)
    train = open_images(cfg.train_data, backbone.in_chans, backbone.img_size)
    test = open_images(cfg.test_data, backbone.in_chans, backbone.img_size)
    for images, role in ((train, "train_data"), (test, "test_data")):
        if images.labels is None:
            raise ConfigError(f"{role} {images.description} has no labels (put images in class subfolders)")
    mean, std = (facts["mean"], facts["std"]) if cfg.init == "pretrained" else train.mean_std()
    indices = few_label_indices(train.labels, cfg.labels_per_class, cfg.label_fraction, seed=cfg.seed)
    num_classes = _num_classes(train, test)
    backbone.to(device)

    extra: dict[str, Any] = {}
    if cfg.kind == "finetune":
        hparams = dict(FINETUNE_DEFAULTS)  # the same recipe for scratch, so the comparison is fair
        chosen = {"epochs": cfg.epochs, "lr": cfg.lr, "layer_decay": cfg.layer_decay,
                  "batch_size": cfg.batch_size, "weight_decay": cfg.weight_decay}
        hparams.update({k: v for k, v in chosen.items() if v is not None})
        result = finetune(backbone, train, indices, test, mean, std, num_classes, seed=cfg.seed,
                          device=device, **hparams)
        accuracy = result.top1
        extra = {"train_loss": [round(x, 5) for x in result.train_loss], "steps": result.steps}
        hparams["crop_scale"] = list(hparams["crop_scale"])
    else:
        feature_batch = cfg.batch_size or FEATURE_BATCH_SIZE
        options = {"layer": cfg.layer, "pool": cfg.pool, "batch_size": feature_batch, "device": device}
        train_feats, train_labels = extract_features(backbone, train, mean, std, indices=indices, **options)
        test_feats, test_labels = extract_features(backbone, test, mean, std, **options)
        if cfg.kind == "knn":
            k = min(cfg.k, len(indices))
            hparams = {"k": k, "temperature": cfg.temperature, "feature_batch_size": feature_batch}
            scores = knn_scores(train_feats, train_labels, test_feats, num_classes, k=k,
                                temperature=cfg.temperature)
            accuracy = top1(scores, test_labels)
        else:
            hparams = dict(LINEAR_DEFAULTS)
            if cfg.weight_decay is not None:
                hparams["weight_decay"] = cfg.weight_decay
            hparams["feature_batch_size"] = feature_batch
            probe = linear_probe(train_feats, train_labels, test_feats, test_labels, num_classes,
                                 weight_decay=hparams["weight_decay"], max_iter=hparams["max_iter"])
            accuracy = probe.top1
            extra = {"train_loss": round(probe.train_loss, 5), "iterations": probe.iterations}

    minutes = (time.perf_counter() - start) / 60
    layer, pool = (-1, "avg") if cfg.kind == "finetune" else (cfg.layer, cfg.pool)
    record: dict[str, Any] = {
        "kind": cfg.kind,
        "init": cfg.init,
        "backbone": backbone.name,
        "backbone_opts": backbone.describe()["opts"],
        "run": cfg.run,
        "method": facts["method"],
        "checkpoint": facts["checkpoint"],
        "train_data": cfg.train_data,
        "test_data": cfg.test_data,
        "num_labels": int(len(indices)),
        "labels_per_class": cfg.labels_per_class,
        "label_fraction": cfg.label_fraction,
        "num_classes": num_classes,
        "num_test": test.num_images,
        "layer": layer,
        "pool": pool,
        "top1": accuracy,
        "minutes": round(minutes, 3),
        "seed": cfg.seed,
        "device": str(device),
        "mean": list(mean),
        "std": list(std),
        "hparams": hparams,
        **extra,
    }
    suffix = "_scratch" if cfg.init == "scratch" else ""
    path = default_out_dir(cfg, backbone.name) / f"eval_{cfg.kind}{suffix}_{len(indices)}.json"
    _write_json(path, record)
    record["path"] = str(path)
    print(f"{cfg.kind} ({cfg.init}) {backbone.name}: top-1 {100 * accuracy:.2f}% with {len(indices)} labels, "
          f"{test.num_images} test images, {minutes:.1f} min -> {path}")
    return record
