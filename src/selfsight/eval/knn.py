"""Weighted k-nearest-neighbour classification on frozen features (InstDisc / DINO protocol)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsight.errors import ConfigError


def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores of a cosine-similarity k-NN whose votes weigh ``exp(sim / temperature)``.

    For a test feature ``q`` and its ``k`` most similar training features ``x_i`` (cosine
    similarity ``s_i``, labels ``y_i``), ``score[c] = sum_i [y_i == c] * exp(s_i / temperature)``
    (Wu 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination";
    Caron 2021, DINO). ``k`` is clipped to the number of training features.

    Args:
        train_feats: [N, D]; train_labels: LongTensor [N] in ``[0, num_classes)``.
        test_feats: [M, D].
        chunk: test rows handled at once (bounds memory to ``chunk x N`` similarities).
    Returns:
        scores [M, num_classes] (float32).
    """
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if temperature <= 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")
    if train_feats.shape[0] == 0:
        raise ConfigError("k-NN needs at least one training feature")
    train = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.long().to(train.device)
    k = min(k, train.shape[0])
    scores = []
    for start in range(0, test_feats.shape[0], chunk):
        query = F.normalize(test_feats[start : start + chunk].float().to(train.device), dim=1)
        sims, idx = (query @ train.T).topk(k, dim=1)  # [m, k]
        votes = torch.zeros(query.shape[0], num_classes, device=train.device)
        votes.scatter_add_(1, labels[idx], torch.exp(sims / temperature))
        scores.append(votes)
    if not scores:
        return torch.zeros(0, num_classes)
    return torch.cat(scores)


def top1(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose highest score is at the true label. scores: [M, C], labels: [M]."""
    if labels.numel() == 0:
        return 0.0
    correct = int((scores.argmax(dim=1).cpu() == labels.cpu().long()).sum())
    return correct / labels.numel()  # exact fraction, not a float32 mean
