"""Fine-tuning a backbone plus a new linear head on a few labeled images.

The recipe follows the BEiT/MAE fine-tuning protocol, shrunk for small data: AdamW, linear
warmup then cosine decay per step, layer-wise learning-rate decay (timm's
``param_groups_layer_decay``), label smoothing, and batched random-resized-crop + flip on tensors.

A pre-trained backbone is fine-tuned "linear probe, then fine-tune" (LP-FT, Kumar et al. 2022):
the head starts as an L2-regularised logistic regression fit on the frozen features of the
labeled images (``head_init='probe'``), so the first steps do not send a random head's large
gradients into the pre-trained features. A scratch backbone has no features worth keeping: its
head starts at zero and the learning rate is higher (``SCRATCH_DEFAULTS``).
Deterministic for a seed on the CPU; the global RNG state is left as it was.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.optim import param_groups_layer_decay
from torch import nn
from tqdm.auto import tqdm

from selfsight.backbones import Backbone
from selfsight.data import ImageSet
from selfsight.data.augment import normalize, random_hflip, random_resized_crop, to_float
from selfsight.errors import ConfigError, TrainingError
from selfsight.eval.features import pixels_to_input

#: the pre-trained recipe (LP-FT); see docs/evaluation.md and docs/benchmarks.md for the measurements
FINETUNE_DEFAULTS = {
    "epochs": 50,
    "lr": 3e-4,
    "layer_decay": 0.75,
    "weight_decay": 0.05,
    "batch_size": 64,
    "warmup_epochs": 5,
    "label_smoothing": 0.1,
    "crop_scale": (0.85, 1.0),  # measured: 0.5-1 lost 6 points on 28-px Fashion-MNIST (docs/benchmarks.md)
    "head_init": "probe",
    "probe_weight_decay": 1e-2,
}
#: random weights: a zero head (a probe of random features would start it on noise) and a higher lr; the
#: layer decay stays (measured: without it the demo's ViT reached 31.05% from scratch in 20 epochs on draw 0,
#: see docs/benchmarks.md). This is the recipe every fine-tune used before LP-FT (2026-11-28).
SCRATCH_DEFAULTS = {**FINETUNE_DEFAULTS, "lr": 1e-3, "layer_decay": 0.75, "head_init": "zero"}
OLD_DEFAULTS = dict(SCRATCH_DEFAULTS)
#: a CNN from scratch: every stage at the same lr (measured: ResNet-18 lost ~3 points with decay 0.75)
SCRATCH_CNN_LAYER_DECAY = 1.0
#: a pre-trained CNN: LP-FT with the scratch CNN's lr and no layer decay (measured on a SparK-pre-trained
#: narrow ResNet-18, 600 labels, 2 draws, 50 epochs: 81.26% against 79.07% with the transformers' lr 3e-4
#: and decay 0.75, and 80.73% with lr 1e-3 and decay 0.75; docs/benchmarks.md)
PRETRAINED_CNN_OVERRIDES = {"lr": 1e-3, "layer_decay": 1.0}
HEAD_INITS = ("zero", "probe")


class Classifier(nn.Module):
    """A backbone and a linear head on its last-layer features.

    ViT and Swin: mean of the last block's normalised tokens (``features(x, -1, 'avg')``);
    other backbones: timm's own pooled features. The head starts at zero.
    """

    def __init__(self, backbone: Backbone, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> the features the head reads, [B, num_features]."""
        if self.backbone.family in ("vit", "swin"):
            return self.backbone.features(x, layer=-1, pool="avg")
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> logits [B, num_classes]."""
        return self.head(self.features(x))


@torch.no_grad()
def init_head_from_probe(
    classifier: Classifier,
    images: ImageSet,
    indices: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    weight_decay: float,
    *,
    label_smoothing: float = 0.0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> float:
    """Set ``classifier.head`` to a linear probe fit on the frozen features of ``indices`` (LP-FT's LP).

    The probe minimises the fine-tuning loss (cross-entropy with ``label_smoothing``) plus
    ``weight_decay / 2 * ||W||^2``, so fine-tuning starts at its optimum for the frozen features rather
    than at an over-confident head that label smoothing would pull hard on.
    The features are read in eval mode without augmentation; the probe standardises them
    (``W (f - m) / s + b``), which is folded into the head: ``W' = W / s``, ``b' = b - W' m``.

    Args:
        indices: LongTensor [N] of labeled images of ``images``.
    Returns:
        the probe's accuracy on those same images (a fraction).
    """
    from selfsight.eval.linear import fit_linear_probe

    was_training = classifier.training
    classifier.eval()
    chunks, label_chunks = [], []
    try:
        for start in range(0, indices.numel(), batch_size):
            pixels, sources = images.load_batch(indices[start : start + batch_size])
            chunks.append(classifier.features(pixels_to_input(pixels, mean, std, device)).float().cpu())
            label_chunks.append(images.batch_labels(sources))
    finally:
        classifier.train(was_training)
    feats, labels = torch.cat(chunks), torch.cat(label_chunks).long()
    probe, _, _ = fit_linear_probe(feats, labels, classifier.head.out_features, weight_decay=weight_decay,
                                   label_smoothing=label_smoothing)
    weight = probe.linear.weight / probe.std  # [C, D]
    bias = probe.linear.bias - weight @ probe.mean
    classifier.head.weight.copy_(weight.to(classifier.head.weight))
    classifier.head.bias.copy_(bias.to(classifier.head.bias))
    return float((probe(feats).argmax(dim=1) == labels).float().mean())


def layer_decay_param_groups(
    classifier: Classifier, weight_decay: float, layer_decay: float
) -> list[dict]:
    """AdamW groups with an ``lr_scale`` each: layer-wise decay for the backbone, 1 for the head.

    timm's ``param_groups_layer_decay`` numbers the stem 0 and block ``i`` ``i + 1``, and gives the
    deepest group scale 1 (a ``num_classes=0`` model has no head). Its scales are multiplied by
    ``layer_decay`` once more so that the new head is the top layer, as in BEiT/MAE: for a ViT of
    depth ``L`` block ``i`` gets ``layer_decay ** (L - i)``, the patch embedding ``layer_decay ** (L + 1)``.
    Biases, norms and the model's no-weight-decay parameters get no weight decay.
    """
    backbone = classifier.backbone
    groups = param_groups_layer_decay(
        backbone.model,
        weight_decay=weight_decay,
        no_weight_decay_list=sorted(backbone.no_weight_decay_names()),
        layer_decay=layer_decay,
    )
    for group in groups:
        group["lr_scale"] *= layer_decay
    groups.append({"params": [classifier.head.weight], "weight_decay": weight_decay, "lr_scale": 1.0})
    groups.append({"params": [classifier.head.bias], "weight_decay": 0.0, "lr_scale": 1.0})
    return groups


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR factor at ``step``: linear from 1/warmup up to 1, then cosine down to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_positions(num_items: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches [batch_size] of positions in ``[0, num_items)``: consecutive seeded permutations
    cut into equal batches, so every item is seen once per ``num_items`` draws."""
    buffer = torch.zeros(0, dtype=torch.long)
    while True:
        while buffer.numel() < batch_size:
            buffer = torch.cat([buffer, torch.randperm(num_items, generator=generator)])
        yield buffer[:batch_size]
        buffer = buffer[batch_size:]


def augment_batch(
    pixels: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    crop_scale: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """uint8 [B, C, S, S] -> normalised float [B, C, S, S]: random resized crop, then random flip."""
    x = to_float(pixels)
    x = random_resized_crop(x, pixels.shape[-1], scale=crop_scale, generator=generator)
    x = random_hflip(x, generator=generator)
    return normalize(x, mean, std)


@torch.no_grad()
def classifier_top1(
    classifier: nn.Module,
    images: ImageSet,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    indices: torch.Tensor | None = None,
) -> float:
    """Top-1 accuracy (fraction) of ``classifier`` over ``indices`` (LongTensor [M]; default every
    image) of the labeled ``images``, in eval mode."""
    if images.labels is None:
        raise ConfigError(f"{images.description} has no labels to score against")
    indices = torch.arange(images.num_images) if indices is None else torch.as_tensor(indices).long()
    was_training = classifier.training
    classifier.eval()
    correct = 0
    try:
        for start in range(0, indices.numel(), batch_size):
            pixels, sources = images.load_batch(indices[start : start + batch_size])
            logits = classifier(pixels_to_input(pixels, mean, std, device))
            correct += int((logits.argmax(dim=1).cpu() == images.batch_labels(sources)).sum())
    finally:
        classifier.train(was_training)
    return correct / max(1, indices.numel())


@dataclass
class FinetuneResult:
    """Test top-1 (fraction), mean training loss per epoch, optimiser steps, the trained classifier."""

    top1: float
    train_loss: list[float]
    steps: int
    classifier: Classifier = field(repr=False)


def finetune(
    backbone: Backbone,
    train_images: ImageSet,
    train_indices: torch.Tensor,
    test_images: ImageSet,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int,
    *,
    epochs: int = FINETUNE_DEFAULTS["epochs"],
    lr: float = FINETUNE_DEFAULTS["lr"],
    layer_decay: float = FINETUNE_DEFAULTS["layer_decay"],
    weight_decay: float = FINETUNE_DEFAULTS["weight_decay"],
    batch_size: int = FINETUNE_DEFAULTS["batch_size"],
    warmup_epochs: float = FINETUNE_DEFAULTS["warmup_epochs"],
    label_smoothing: float = FINETUNE_DEFAULTS["label_smoothing"],
    crop_scale: tuple[float, float] = FINETUNE_DEFAULTS["crop_scale"],
    head_init: str = FINETUNE_DEFAULTS["head_init"],
    probe_weight_decay: float = FINETUNE_DEFAULTS["probe_weight_decay"],
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    test_indices: torch.Tensor | None = None,
) -> FinetuneResult:
    """Fine-tune ``backbone`` (in place) and a new head on ``train_indices`` of ``train_images``.

    The run lasts ``ceil(epochs * len(train_indices) / batch_size)`` steps of ``batch_size`` images;
    each group's LR is ``lr * lr_scale * warmup_cosine(step)``. ``head_init='probe'`` first fits the
    head on the frozen features (:func:`init_head_from_probe`, L2 penalty ``probe_weight_decay``);
    ``'zero'`` starts it at zero.

    Args:
        train_indices: LongTensor [N] of the labeled images used.
        test_indices: LongTensor [M] of the images of ``test_images`` to score (a validation split
            of the training set when tuning); default every image.
        mean, std: per-channel normalisation in [0, 1] units.
    Returns:
        a :class:`FinetuneResult` scored on ``test_indices`` of ``test_images``.
    """
    train_indices = torch.as_tensor(train_indices).long()
    num_items = train_indices.numel()
    if num_items == 0:
        raise ConfigError("fine-tuning needs at least one labeled training image")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ConfigError(f"fine-tune: epochs={epochs}, batch_size={batch_size}, lr={lr} must be positive")
    if not 0.0 < layer_decay <= 1.0:
        raise ConfigError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if train_images.labels is None:
        raise ConfigError(f"{train_images.description} has no labels to fine-tune on")
    if head_init not in HEAD_INITS:
        raise ConfigError(f"unknown head_init {head_init!r}; choose from {', '.join(HEAD_INITS)}")
    steps_per_epoch = num_items / batch_size
    total_steps = math.ceil(epochs * steps_per_epoch)
    warmup_steps = min(total_steps, round(warmup_epochs * steps_per_epoch))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout / drop-path draws
        classifier = Classifier(backbone, num_classes).to(device)
        if head_init == "probe":
            init_head_from_probe(classifier, train_images, train_indices, mean, std, probe_weight_decay,
                                 label_smoothing=label_smoothing, device=device)
        optimizer = torch.optim.AdamW(layer_decay_param_groups(classifier, weight_decay, layer_decay), lr=lr)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps)
        )
        generator = torch.Generator().manual_seed(seed)
        batches = batch_positions(num_items, batch_size, generator)
        classifier.train()
        losses = []
        bar = tqdm(range(total_steps), desc="fine-tune", disable=not progress, leave=False)
        for _ in bar:
            pixels, sources = train_images.load_batch(train_indices[next(batches)])
            labels = train_images.batch_labels(sources).to(device)
            x = augment_batch(pixels.to(device), mean, std, crop_scale, generator)
            loss = F.cross_entropy(classifier(x), labels, label_smoothing=label_smoothing)
            if not torch.isfinite(loss):
                raise TrainingError(f"fine-tuning diverged (loss {loss.item()}); lower lr (now {lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
    per_epoch = max(1, round(steps_per_epoch))
    chunks = [losses[i : i + per_epoch] for i in range(0, total_steps, per_epoch)]
    curve = [sum(chunk) / len(chunk) for chunk in chunks]
    top1 = classifier_top1(classifier, test_images, mean, std, device=device, indices=test_indices)
    return FinetuneResult(top1=top1, train_loss=curve, steps=total_steps, classifier=classifier)
