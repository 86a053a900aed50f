"""Linear probe: a logistic-regression layer trained on frozen, standardised features."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsight.errors import ConfigError

LINEAR_DEFAULTS = {"epochs": 100, "lr": 1e-3, "weight_decay": 1e-4, "batch_size": 64}


@dataclass
class LinearProbeResult:
    """Test top-1 (fraction), the per-epoch mean training loss and the fitted classifier."""

    top1: float
    train_loss: list[float]
    classifier: nn.Module


class StandardizedLinear(nn.Module):
    """``Linear((x - mean) / std)``: BatchNorm without affine, statistics frozen from the train set.

    Args:
        mean, std: [D] feature statistics; num_classes: C.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())
        self.linear = nn.Linear(mean.numel(), num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats: [B, D] -> logits [B, C]."""
        return self.linear((feats - self.mean) / self.std)


def fit_linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = LINEAR_DEFAULTS["epochs"],
    lr: float = LINEAR_DEFAULTS["lr"],
    weight_decay: float = LINEAR_DEFAULTS["weight_decay"],
    batch_size: int = LINEAR_DEFAULTS["batch_size"],
    seed: int = 0,
) -> tuple[StandardizedLinear, list[float]]:
    """Train a :class:`StandardizedLinear` with AdamW, cross-entropy and a cosine LR per step.

    Args:
        train_feats: [N, D]; train_labels: LongTensor [N].
    Returns:
        the classifier (eval mode) and the mean training loss of every epoch.
    """
    if train_feats.shape[0] == 0:
        raise ConfigError("the linear probe needs at least one labeled training feature")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ConfigError(f"linear probe: epochs={epochs}, batch_size={batch_size}, lr={lr} must be positive")
    feats = train_feats.float()
    labels = train_labels.long().to(feats.device)
    mean = feats.mean(dim=0)
    std = feats.std(dim=0, unbiased=False).clamp_min(1e-6)
    probe = StandardizedLinear(mean, std, num_classes).to(feats.device)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    n = feats.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total))
    )
    curve = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator).to(feats.device)
        epoch_loss = 0.0
        for start in range(0, n, batch_size):
            batch = order[start : start + batch_size]
            loss = F.cross_entropy(probe(feats[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            epoch_loss += loss.item() * batch.numel()
        curve.append(epoch_loss / n)
    return probe.eval(), curve


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    **options: float,
) -> LinearProbeResult:
    """Fit a probe on ``train_feats`` [N, D] and score it on ``test_feats`` [M, D].

    ``options`` are those of :func:`fit_linear_probe` (epochs, lr, weight_decay, batch_size, seed).
    """
    probe, curve = fit_linear_probe(train_feats, train_labels, num_classes, **options)
    if len(test_feats) == 0:
        return LinearProbeResult(0.0, curve, probe)
    with torch.no_grad():
        logits = torch.cat([probe(chunk.float()) for chunk in test_feats.split(4096)])
    correct = (logits.argmax(dim=1).cpu() == test_labels.cpu().long()).float().mean().item()
    return LinearProbeResult(correct, curve, probe)
