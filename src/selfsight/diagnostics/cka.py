"""Linear centred kernel alignment (Kornblith et al. 2019, "Similarity of Neural Network Representations
Revisited", eq. 5), between the layers of one model and between two models on the same images.

For features ``X`` [N, D1] and ``Y`` [N, D2] of the same N examples, with columns centred::

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F * ||Y^T Y||_F)

It is 1 for ``Y = X``, invariant to orthogonal transforms and isotropic scaling of either side, and
near 0 for independent features when N >> D.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from selfsight.backbones import Backbone


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of x [N, D1] and y [N, D2] (same N examples), computed in float64; in [0, 1].

    Returns 0.0 when either side is constant over the examples (no variance to compare).
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same examples on both sides, got {x.shape[0]} and {y.shape[0]}")
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    x = x - x.mean(dim=0, keepdim=True)
    y = y - y.mean(dim=0, keepdim=True)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norm_x = torch.linalg.matrix_norm(x.T @ x)
    norm_y = torch.linalg.matrix_norm(y.T @ y)
    denominator = norm_x * norm_y
    if denominator <= 0:
        return 0.0
    return float(cross / denominator)


@torch.no_grad()
def layer_features(backbone: Backbone, images: torch.Tensor, batch_size: int = 64) -> list[torch.Tensor]:
    """Average-pooled features of every block (ViT) or stage (Swin, CNN) over a sample.

    images: normalised [N, C, H, W] on the backbone's device. Returns one float32 CPU tensor [N, D_l] per
    layer ``l`` in ``range(backbone.num_blocks())``, read with ``backbone.features(x, layer=l, pool="avg")``
    (the last layer after the model's final norm, the others raw).
    """
    was_training = backbone.training
    backbone.eval()
    try:
        layers = []
        for layer in range(backbone.num_blocks()):
            chunks = [
                backbone.features(images[start : start + batch_size], layer=layer, pool="avg").float().cpu()
                for start in range(0, len(images), batch_size)
            ]
            layers.append(torch.cat(chunks))
    finally:
        backbone.train(was_training)
    return layers


def cka_matrix(feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor]) -> list[list[float]]:
    """CKA of every pair of layers: ``[[linear_cka(a_i, b_j) for j] for i]``, a len(a) x len(b) list."""
    return [[linear_cka(a, b) for b in feats_b] for a in feats_a]
