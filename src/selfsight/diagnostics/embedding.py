"""A 2-D map of pooled features: their projection on the first two principal components."""

from __future__ import annotations

import torch


def pca_2d(features: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Project features [N, D] on their first two principal components (SVD of the centred features).

    Returns ``(points float32 [N, 2], explained)`` where ``explained`` holds the fraction of the total
    variance along each of the two axes. Each axis's sign is fixed so that its largest-magnitude loading
    is positive (the map does not flip between runs of the same model). Fewer than two non-constant
    directions give zero columns.
    """
    x = features.reshape(features.shape[0], -1).double()
    x = x - x.mean(dim=0, keepdim=True)
    _, singular, vh = torch.linalg.svd(x, full_matrices=False)
    components = vh[:2]  # [k, D], k <= 2
    signs = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)))
    components = components * torch.where(signs == 0, torch.ones_like(signs), signs)
    points = x @ components.T
    variance = singular.square()
    total = float(variance.sum())
    explained = [float(v) / total if total > 0 else 0.0 for v in variance[:2]]
    if points.shape[1] < 2:  # fewer than two examples or one feature
        points = torch.cat([points, points.new_zeros(points.shape[0], 2 - points.shape[1])], dim=1)
        explained += [0.0] * (2 - len(explained))
    return points.float(), explained
