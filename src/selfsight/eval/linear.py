"""Linear probe: L2-regularised logistic regression on frozen, standardised features.

The probe is fit full-batch with L-BFGS until it converges, so the result depends on the
features and the weight decay only (not on a learning rate, batch order or epoch budget). On
Fashion-MNIST with 600 labels this reaches 77.2% on raw pixels and 58.7% on a random-init tiny
ViT's features, where a 100-epoch AdamW probe (lr 1e-3) under-fits those features (40.7%).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsight.errors import ConfigError
from selfsight.eval.knn import top1

LINEAR_DEFAULTS = {"weight_decay": 1e-4, "max_iter": 1000}
#: problems (samples x features x classes) below this size are fit on one thread: L-BFGS runs thousands
#: of tiny ops, and OpenMP's synchronisation between threads costs more than the ops on a busy machine
ONE_THREAD_BELOW = 50_000_000


@contextmanager
def threads(count: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)``, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class LinearProbeResult:
    """Test top-1 (fraction), the final regularised training loss, L-BFGS iterations, the classifier."""

    top1: float
    train_loss: float
    iterations: int
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
    weight_decay: float = LINEAR_DEFAULTS["weight_decay"],
    max_iter: int = LINEAR_DEFAULTS["max_iter"],
    label_smoothing: float = 0.0,
) -> tuple[StandardizedLinear, float, int]:
    """Minimise ``mean CE(W z + b, y) + weight_decay / 2 * ||W||^2`` with L-BFGS (strong Wolfe).

    ``z`` are the features standardised with the training mean/std; the bias is not decayed.
    ``label_smoothing`` smooths the targets of CE as ``F.cross_entropy`` does (LP-FT fits the head
    with the fine-tuning loss). Deterministic: full batch, zero initialisation.

    Args:
        train_feats: [N, D]; train_labels: LongTensor [N] in ``[0, num_classes)``.
    Returns:
        the classifier (eval mode), its final training objective and the iterations used.
    """
    if train_feats.shape[0] == 0:
        raise ConfigError("the linear probe needs at least one labeled training feature")
    if weight_decay < 0 or max_iter < 1:
        raise ConfigError(f"linear probe: weight_decay={weight_decay} must be >= 0, max_iter={max_iter} >= 1")
    feats = train_feats.float()
    labels = train_labels.long().to(feats.device)
    mean = feats.mean(dim=0)
    std = feats.std(dim=0, unbiased=False).clamp_min(1e-6)
    probe = StandardizedLinear(mean, std, num_classes).to(feats.device)
    standardized = (feats - mean) / std
    optimizer = torch.optim.LBFGS(
        probe.linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
        tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe",
    )

    def regularized_loss() -> torch.Tensor:
        loss = F.cross_entropy(probe.linear(standardized), labels, label_smoothing=label_smoothing)
        return loss + 0.5 * weight_decay * probe.linear.weight.square().sum()

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = regularized_loss()
        loss.backward()
        return loss

    small = feats.device.type == "cpu" and feats.numel() * num_classes < ONE_THREAD_BELOW
    with torch.enable_grad(), threads(1) if small else nullcontext():
        optimizer.step(closure)
    with torch.no_grad():
        final = regularized_loss().item()
    iterations = int(optimizer.state[probe.linear.weight].get("n_iter", 0))
    return probe.eval(), final, iterations


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    **options: float,
) -> LinearProbeResult:
    """Fit a probe on ``train_feats`` [N, D] and score it on ``test_feats`` [M, D] / ``test_labels`` [M].

    ``options`` are those of :func:`fit_linear_probe` (``weight_decay``, ``max_iter``).
    """
    probe, loss, iterations = fit_linear_probe(train_feats, train_labels, num_classes, **options)
    if len(test_feats) == 0:
        return LinearProbeResult(0.0, loss, iterations, probe)
    with torch.no_grad():
        logits = torch.cat([probe(chunk.float()) for chunk in test_feats.split(4096)])
    return LinearProbeResult(top1(logits, test_labels), loss, iterations, probe)
