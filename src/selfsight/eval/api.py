"""``evaluate(EvalConfig)``: a few-label evaluation (k-NN, linear probe or fine-tune) over several label draws.

The backbone comes from a pre-training run (``init='pretrained'``), is freshly initialised
(``init='scratch'``, the baseline a pre-training has to beat), or is no network at all
(``init='pixels'``: k-NN or logistic regression on the resized pixels). Each of ``draws`` fixed-seed,
class-balanced labeled subsets is evaluated on the whole test set; with ``tune`` the protocol's
hyper-parameters (fine-tuning lr, the probe's L2 penalty, k) are chosen on a validation split carved
from that labeled subset, then the model is retrained on the whole subset. The result (each draw, the
mean and the standard deviation) is printed and written as JSON
(``eval_{kind}[_scratch|_scratch_{backbone}|_pixels]_{num_labels}.json``) into the run dir or ``out``.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from selfsight.backbones import POOLINGS, Backbone
from selfsight.data import ImageSet, open_images
from selfsight.engine import resolve_device
from selfsight.errors import ConfigError
from selfsight.eval.baselines import pixel_features
from selfsight.eval.features import extract_features
from selfsight.eval.finetune import (
    FINETUNE_DEFAULTS,
    PRETRAINED_CNN_OVERRIDES,
    SCRATCH_CNN_LAYER_DECAY,
    SCRATCH_DEFAULTS,
    finetune,
)
from selfsight.eval.knn import knn_scores, top1
from selfsight.eval.linear import LINEAR_DEFAULTS, linear_probe
from selfsight.eval.splits import draw_seeds, few_label_indices, validation_split

KINDS = ("knn", "linear", "finetune")
INITS = ("pretrained", "scratch", "pixels")
FEATURE_BATCH_SIZE = 256
#: below this many labels, draws default to 3 and tune to on (above: 1 draw, no tuning)
FEW_LABELS = 5000
FEW_LABEL_DRAWS = 3
#: the searches of --tune; the fine-tuning lr is the recipe's default times each factor
LR_FACTORS = (1 / 3, 1.0, 3.0)
WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)
KNN_KS = (5, 10, 20)


@dataclass
class EvalConfig:
    """One evaluation. ``None`` hyper-parameters take the protocol's defaults.

    ``layer``, ``pool`` choose the frozen features (knn, linear); ``k``, ``temperature`` are k-NN's;
    ``epochs``, ``lr``, ``layer_decay``, ``head_init`` (``probe``: LP-FT, ``zero``) are fine-tuning's;
    ``weight_decay`` is the linear probe's L2
    penalty or fine-tuning's AdamW decay; ``batch_size`` is fine-tuning's training batch, else the
    feature-extraction batch. ``backbone``/``backbone_opts`` name the architecture for
    ``init='scratch'`` (default: the run's) and the image size for ``init='pixels'``.
    ``draws`` (default 3 below 5,000 labels, else 1) labeled subsets use seeds ``seed, seed + 1, ...``;
    ``tune`` (default on below 5,000 labels) picks the hyper-parameters not given on a
    ``val_fraction`` validation split of each labeled subset.
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
    k: int | None = None
    temperature: float = 0.07
    epochs: int | None = None
    lr: float | None = None
    layer_decay: float | None = None
    batch_size: int | None = None
    weight_decay: float | None = None
    head_init: str | None = None
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    draws: int | None = None
    tune: bool | None = None
    val_fraction: float = 0.2
    progress: bool = True


def check_config(cfg: EvalConfig) -> None:
    """Raise ConfigError on options that cannot work, before anything is loaded."""
    if cfg.kind not in KINDS:
        raise ConfigError(f"unknown evaluation kind {cfg.kind!r}; choose from {', '.join(KINDS)}")
    if cfg.init not in INITS:
        raise ConfigError(f"unknown init {cfg.init!r}; choose from {', '.join(INITS)}")
    if cfg.init == "pretrained" and not cfg.run:
        raise ConfigError("init=pretrained needs run (a pre-training run directory); or use init=scratch")
    if cfg.init != "pretrained" and not cfg.backbone and not cfg.run:
        raise ConfigError(f"init={cfg.init} needs backbone (a timm model name) or run (to copy its architecture)")
    if cfg.init == "pixels" and cfg.kind == "finetune":
        raise ConfigError("init=pixels applies to knn and linear (raw-pixel baselines), not finetune")
    if not cfg.train_data or not cfg.test_data:
        raise ConfigError("evaluation needs both train_data and test_data")
    if cfg.labels_per_class is not None and cfg.label_fraction is not None:
        raise ConfigError("give labels_per_class or label_fraction, not both")
    if cfg.pool not in POOLINGS:
        raise ConfigError(f"unknown pooling {cfg.pool!r}; choose from {', '.join(POOLINGS)}")
    if cfg.kind == "finetune" and (cfg.layer != -1 or cfg.pool != "avg"):
        raise ConfigError("layer and pool apply to knn and linear; fine-tuning reads the last layer")
    if cfg.kind != "finetune":
        given = [name for name in ("epochs", "lr", "layer_decay", "head_init") if getattr(cfg, name) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to finetune only (the linear probe runs L-BFGS to the end)")
    if cfg.weight_decay is not None and cfg.weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {cfg.weight_decay}")
    for name in ("epochs", "batch_size", "k", "draws"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if cfg.lr is not None and cfg.lr <= 0:
        raise ConfigError(f"lr must be positive, got {cfg.lr}")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {cfg.val_fraction}")


def run_architecture(run: str) -> tuple[str, dict[str, Any]]:
    from selfsight.checkpoint import read_run_info

    arch = read_run_info(run)["backbone"]
    return arch["name"], {k: tuple(v) if isinstance(v, list) else v for k, v in arch.get("opts", {}).items()}


def build_scratch(name: str, opts: dict[str, Any], seed: int) -> Backbone:
    """``Backbone(name, opts)`` initialised from ``seed``; the global RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Backbone(name, opts)


def load_backbone(cfg: EvalConfig) -> tuple[Backbone, dict[str, Any]]:
    """The backbone to evaluate and facts about it (``mean``/``std`` only for a pre-trained run).

    ``facts['suffix']`` tells the result files apart: ``''`` (pre-trained), ``'_scratch'`` (the run's
    architecture), ``'_scratch_{name}'`` (another one), ``'_pixels'``.
    """
    if cfg.init == "pretrained":
        from selfsight.checkpoint import load_run_backbone

        backbone, info = load_run_backbone(cfg.run)
        if cfg.backbone and cfg.backbone != backbone.name:
            raise ConfigError(
                f"backbone {cfg.backbone} differs from the run's {backbone.name}; drop it or use init=scratch"
            )
        return backbone, {"method": info.get("method"), "checkpoint": info.get("checkpoint"), "suffix": "",
                          "mean": list(info["mean"]), "std": list(info["std"])}
    name, opts = cfg.backbone, dict(cfg.backbone_opts)
    suffix = "_scratch"
    if not name:  # the run's architecture, freshly initialised
        name, opts = run_architecture(cfg.run)
    elif cfg.run and name != run_architecture(cfg.run)[0]:
        suffix = f"_scratch_{name}"
    if cfg.init == "pixels":
        suffix = "_pixels"
    return build_scratch(name, opts, cfg.seed), {"method": None, "checkpoint": None, "suffix": suffix,
                                                 "name": name, "opts": opts}


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


def write_json(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(temp, path)


def summarize(values: list[float]) -> dict[str, float]:
    """``{'mean', 'std'}`` of per-draw accuracies; ``std`` is the sample standard deviation (0 for one)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


@dataclass
class _Setting:
    """What every draw of one evaluation shares: data, backbone, normalisation, options."""

    cfg: EvalConfig
    backbone: Backbone
    facts: dict[str, Any]
    train: ImageSet
    test: ImageSet
    mean: list[float]
    std: list[float]
    num_classes: int
    device: torch.device
    tune: bool
    test_cache: dict[str, Any] = field(default_factory=dict)


def _open_setting(cfg: EvalConfig) -> _Setting:
    device = resolve_device(cfg.device)
    backbone, facts = load_backbone(cfg)
    train = open_images(cfg.train_data, backbone.in_chans, backbone.img_size)
    test = open_images(cfg.test_data, backbone.in_chans, backbone.img_size)
    for images, role in ((train, "train_data"), (test, "test_data")):
        if images.labels is None:
            raise ConfigError(f"{role} {images.description} has no labels (put images in class subfolders)")
    mean, std = (facts["mean"], facts["std"]) if cfg.init == "pretrained" else train.mean_std()
    return _Setting(cfg, backbone.to(device), facts, train, test, list(mean), list(std),
                    _num_classes(train, test), device, tune=False)


# --- fine-tuning -------------------------------------------------------------------------------
def finetune_hparams(cfg: EvalConfig, family: str = "vit") -> dict[str, Any]:
    """The recipe for ``cfg.init`` (LP-FT for a pre-trained backbone, see finetune.py) plus the options given.

    A CNN from scratch gets no layer decay (``SCRATCH_CNN_LAYER_DECAY``): measured on Fashion-MNIST,
    ResNet-18 lost about 3 points with 0.75, where the ViT from scratch needs it (docs/benchmarks.md).
    A pre-trained CNN keeps LP-FT's head but takes lr 1e-3 and no layer decay
    (``PRETRAINED_CNN_OVERRIDES``, measured the same way).
    """
    hparams = dict(FINETUNE_DEFAULTS if cfg.init == "pretrained" else SCRATCH_DEFAULTS)
    if family == "cnn":
        hparams.update(PRETRAINED_CNN_OVERRIDES if cfg.init == "pretrained"
                       else {"layer_decay": SCRATCH_CNN_LAYER_DECAY})
    chosen = {"epochs": cfg.epochs, "lr": cfg.lr, "layer_decay": cfg.layer_decay, "head_init": cfg.head_init,
              "batch_size": cfg.batch_size, "weight_decay": cfg.weight_decay}
    hparams.update({k: v for k, v in chosen.items() if v is not None})
    return hparams


def _fresh_backbone(s: _Setting, seed: int) -> Backbone:
    """A pre-trained backbone's copy, or a new random one from ``seed``, on the device."""
    if s.cfg.init == "pretrained":
        return copy.deepcopy(s.backbone)
    return build_scratch(s.facts["name"], s.facts["opts"], seed).to(s.device)


def _finetune_draw(s: _Setting, indices: torch.Tensor, seed: int) -> dict[str, Any]:
    hparams = finetune_hparams(s.cfg, s.backbone.family)
    common = dict(mean=s.mean, std=s.std, num_classes=s.num_classes, seed=seed, device=s.device,
                  progress=s.cfg.progress)
    tuning = []
    if s.tune and s.cfg.lr is None:
        fit, val = validation_split(s.train.labels, indices, s.cfg.val_fraction, seed)
        for factor in LR_FACTORS:
            trial = {**hparams, "lr": hparams["lr"] * factor}
            result = finetune(_fresh_backbone(s, seed), s.train, fit, s.train, test_indices=val,
                              **common, **trial)
            tuning.append({"lr": trial["lr"], "val_top1": result.top1})
        hparams["lr"] = _best(tuning, "lr")
    result = finetune(_fresh_backbone(s, seed), s.train, indices, s.test, **common, **hparams)
    hparams["crop_scale"] = list(hparams["crop_scale"])
    return {"top1": result.top1, "hparams": hparams, "tuning": tuning,
            "train_loss": [round(x, 5) for x in result.train_loss], "steps": result.steps}


def _best(trials: list[dict[str, Any]], key: str) -> Any:
    """The ``key`` of the trial with the highest ``val_top1``; ties go to the earliest trial."""
    return max(trials, key=lambda t: (t["val_top1"], -trials.index(t)))[key]


# --- frozen features: k-NN and linear probe ------------------------------------------------------
def _features(s: _Setting, images: ImageSet, indices: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if s.cfg.init == "pixels":
        return pixel_features(images, indices, progress=s.cfg.progress)
    options = {"layer": s.cfg.layer, "pool": s.cfg.pool, "device": s.device, "progress": s.cfg.progress,
               "batch_size": s.cfg.batch_size or FEATURE_BATCH_SIZE}
    return extract_features(s.backbone, images, s.mean, s.std, indices=indices, **options)


def _knn_top1(train: tuple, test: tuple, num_classes: int, k: int, temperature: float) -> float:
    k = min(k, len(train[1]))
    return top1(knn_scores(train[0], train[1], test[0], num_classes, k=k, temperature=temperature), test[1])


def _linear_top1(train: tuple, test: tuple, num_classes: int, weight_decay: float) -> tuple[float, Any]:
    probe = linear_probe(train[0], train[1], test[0], test[1], num_classes, weight_decay=weight_decay,
                         max_iter=LINEAR_DEFAULTS["max_iter"])
    return probe.top1, probe


def _frozen_draw(s: _Setting, indices: torch.Tensor, seed: int) -> dict[str, Any]:
    cfg = s.cfg
    if "test" not in s.test_cache:  # the frozen test features are the same for every draw
        s.test_cache["test"] = _features(s, s.test, None)
    train_feats, train_labels = _features(s, s.train, indices)
    position = {int(i): row for row, i in enumerate(indices.tolist())}
    tuning: list[dict[str, Any]] = []
    if cfg.kind == "knn":
        hparams = {"k": cfg.k or 20, "temperature": cfg.temperature}
        if s.tune and cfg.k is None:
            fit, val = _split_rows(s, indices, seed, position)
            for k in KNN_KS:
                got = _knn_top1((train_feats[fit], train_labels[fit]), (train_feats[val], train_labels[val]),
                                s.num_classes, k, cfg.temperature)
                tuning.append({"k": k, "val_top1": got})
            hparams["k"] = _best(tuning, "k")
        hparams["k"] = min(hparams["k"], len(indices))
        accuracy = _knn_top1((train_feats, train_labels), s.test_cache["test"], s.num_classes, **hparams)
        return {"top1": accuracy, "hparams": hparams, "tuning": tuning}
    hparams = {"weight_decay": LINEAR_DEFAULTS["weight_decay"] if cfg.weight_decay is None else cfg.weight_decay,
               "max_iter": LINEAR_DEFAULTS["max_iter"]}
    if s.tune and cfg.weight_decay is None:
        fit, val = _split_rows(s, indices, seed, position)
        for decay in WEIGHT_DECAYS:
            got, _ = _linear_top1((train_feats[fit], train_labels[fit]), (train_feats[val], train_labels[val]),
                                  s.num_classes, decay)
            tuning.append({"weight_decay": decay, "val_top1": got})
        hparams["weight_decay"] = _best(tuning, "weight_decay")
    accuracy, probe = _linear_top1((train_feats, train_labels), s.test_cache["test"], s.num_classes,
                                   hparams["weight_decay"])
    return {"top1": accuracy, "hparams": hparams, "tuning": tuning,
            "train_loss": round(probe.train_loss, 5), "iterations": probe.iterations}


def _split_rows(s: _Setting, indices: torch.Tensor, seed: int, position: dict[int, int]) -> tuple[list, list]:
    """The validation split of ``indices`` as rows of the features extracted for ``indices``."""
    fit, val = validation_split(s.train.labels, indices, s.cfg.val_fraction, seed)
    return [position[int(i)] for i in fit], [position[int(i)] for i in val]


# --- the evaluation ------------------------------------------------------------------------------
def plan_draws(cfg: EvalConfig, labels: torch.Tensor) -> tuple[list[torch.Tensor], list[int], bool]:
    """The labeled subsets (one LongTensor [M] per draw), their seeds, and whether to tune.

    Defaults: 3 draws and tuning below ``FEW_LABELS`` labels, else 1 draw and no tuning.
    """
    first = few_label_indices(labels, cfg.labels_per_class, cfg.label_fraction, seed=cfg.seed)
    few = first.numel() < FEW_LABELS
    draws = cfg.draws if cfg.draws is not None else (FEW_LABEL_DRAWS if few else 1)
    tune = cfg.tune if cfg.tune is not None else few
    seeds = draw_seeds(cfg.seed, draws)
    subsets = [first] + [few_label_indices(labels, cfg.labels_per_class, cfg.label_fraction, seed=seed)
                         for seed in seeds[1:]]
    return subsets, seeds, tune


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run one evaluation over its label draws, print a result line, write the JSON result and return it.

    Returns a dict with kind, init, backbone, run, data specs, num_labels, layer, pool, top1 (the mean
    over draws, a fraction in [0, 1]), top1_std, top1_draws (one value per draw), seeds, per_draw
    (each draw's top1, hyper-parameters and tuning trials), minutes, device and the first draw's
    hyper-parameters.
    """
    start = time.perf_counter()
    check_config(cfg)
    s = _open_setting(cfg)
    subsets, seeds, s.tune = plan_draws(cfg, s.train.labels)
    run_draw: Callable = _finetune_draw if cfg.kind == "finetune" else _frozen_draw
    per_draw = []
    for number, (indices, seed) in enumerate(zip(subsets, seeds)):
        outcome = run_draw(s, indices, seed)
        per_draw.append({"seed": seed, "num_labels": int(indices.numel()), **outcome})
        if len(seeds) > 1:
            print(f"  draw {number + 1}/{len(seeds)} (seed {seed}): top-1 {100 * outcome['top1']:.2f}%"
                  + _tuning_note(outcome["tuning"]))
    record = _record(cfg, s, per_draw, (time.perf_counter() - start) / 60)
    name = s.backbone.name if cfg.init != "pixels" else "pixels"
    path = default_out_dir(cfg, s.backbone.name) / f"eval_{cfg.kind}{s.facts['suffix']}_{record['num_labels']}.json"
    write_json(path, record)
    record["path"] = str(path)
    spread = f" ± {100 * record['top1_std']:.2f}" if len(seeds) > 1 else ""
    print(f"{cfg.kind} ({cfg.init}) {name}: top-1 {100 * record['top1']:.2f}%{spread} with {record['num_labels']} "
          f"labels ({len(seeds)} draw{'s' if len(seeds) > 1 else ''}{', tuned' if s.tune else ''}), "
          f"{s.test.num_images} test images, {record['minutes']:.1f} min -> {path}")
    return record


def _tuning_note(tuning: list[dict[str, Any]]) -> str:
    if not tuning:
        return ""
    key = next(k for k in tuning[0] if k != "val_top1")
    return " (validation: " + ", ".join(f"{key} {t[key]:g} {100 * t['val_top1']:.1f}%" for t in tuning) + ")"


def _record(cfg: EvalConfig, s: _Setting, per_draw: list[dict[str, Any]], minutes: float) -> dict[str, Any]:
    values = [d["top1"] for d in per_draw]
    stats = summarize(values)
    layer, pool = (-1, "avg") if cfg.kind == "finetune" else (cfg.layer, cfg.pool)
    first = per_draw[0]
    record: dict[str, Any] = {
        "kind": cfg.kind,
        "init": cfg.init,
        "backbone": "pixels" if cfg.init == "pixels" else s.backbone.name,
        "backbone_opts": {} if cfg.init == "pixels" else s.backbone.describe()["opts"],
        "run": cfg.run,
        "method": s.facts["method"],
        "checkpoint": s.facts["checkpoint"],
        "train_data": cfg.train_data,
        "test_data": cfg.test_data,
        "num_labels": first["num_labels"],
        "labels_per_class": cfg.labels_per_class,
        "label_fraction": cfg.label_fraction,
        "num_classes": s.num_classes,
        "num_test": s.test.num_images,
        "img_size": s.backbone.img_size,
        "layer": layer,
        "pool": pool,
        "top1": stats["mean"],
        "top1_std": stats["std"],
        "top1_draws": values,
        "draws": len(per_draw),
        "seeds": [d["seed"] for d in per_draw],
        "tuned": s.tune,
        "minutes": round(minutes, 3),
        "seed": cfg.seed,
        "device": str(s.device),
        "mean": list(s.mean),
        "std": list(s.std),
        "hparams": first["hparams"],
        "per_draw": per_draw,
    }
    for key in ("train_loss", "steps", "iterations"):  # the first draw's, as before draws existed
        if key in first:
            record[key] = first[key]
    return record
