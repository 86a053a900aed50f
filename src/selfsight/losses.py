"""Losses shared by the contrastive and self-distillation methods (MoCo, MoBY, SimCLR, BYOL, DINO).

Every function is pure: tensors in, a scalar loss out, no state. Which inputs carry gradients is the
caller's choice: target / momentum-encoder outputs (keys, BYOL targets, DINO teacher logits) are
expected to be detached by the method; ``dino_loss`` detaches the teacher itself because its
softmax is never meant to be trained through.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from selfsight.errors import ConfigError

__all__ = ["dino_loss", "info_nce", "negative_cosine", "nt_xent", "update_center"]


def _check_temperature(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must both be [N, D], got {tuple(a.shape)} and {tuple(b.shape)}")


def info_nce(
    query: torch.Tensor,
    keys: torch.Tensor,
    temperature: float,
    negatives: torch.Tensor | None = None,
    positive_offset: int = 0,
) -> torch.Tensor:
    """InfoNCE (contrastive cross-entropy) of each query against its key; mean over the N queries.

    ``query`` and ``keys`` (and ``negatives``) are L2-normalised along D here. Row ``i`` of ``keys``
    is the positive of row ``i`` of ``query``. Two modes:

    - ``negatives is None`` (in-batch, MoCo v3 / CLIP style): the negatives of query ``i`` are the
      other keys. ``logits = q @ k.T / temperature`` is [N, M] and the label of row ``i`` is
      ``positive_offset + i``. Under data parallelism ``keys`` are every rank's keys gathered, [M, D]
      with M = world * N, and ``positive_offset = rank * N`` (as in the MoCo v3 paper's code).
    - ``negatives`` given (queue, MoCo v2 / MoBY style): the negatives are the K queue entries only.
      ``logits = [q_i . k_i, q_i @ queue.T] / temperature`` is [N, 1 + K] and every label is 0.

    Args:
        query: [N, D] online-branch embeddings (carry the gradient).
        keys: [N, D] target-branch embeddings (in-batch mode: [M, D], M >= N); callers detach them
            when the target is a momentum encoder.
        temperature: softmax temperature tau > 0.
        negatives: optional [K, D] queue of past keys (no gradient expected).
        positive_offset: in-batch mode, the row of ``keys`` holding query 0's positive.

    Returns:
        Scalar loss. MoCo v3 additionally multiplies by ``2 * temperature``; that scaling is the method's.
    """
    if negatives is None and keys.shape[0] != query.shape[0]:
        if keys.ndim != 2 or keys.shape[1] != query.shape[1] or not 0 <= positive_offset <= len(keys) - len(query):
            raise ValueError(
                f"keys must be [M, {query.shape[1]}] holding the positives of the {query.shape[0]} queries at "
                f"rows {positive_offset}..., got {tuple(keys.shape)}"
            )
    else:
        _check_pair("query", query, "keys", keys)
    _check_temperature("temperature", temperature)
    query = F.normalize(query, dim=1)
    keys = F.normalize(keys, dim=1)
    if negatives is None:
        logits = query @ keys.t()
        labels = torch.arange(query.shape[0], device=query.device) + positive_offset
    else:
        if negatives.ndim != 2 or negatives.shape[1] != query.shape[1]:
            raise ValueError(f"negatives must be [K, {query.shape[1]}], got {tuple(negatives.shape)}")
        negatives = F.normalize(negatives, dim=1)
        positive = (query * keys).sum(dim=1, keepdim=True)  # [N, 1]
        negative = query @ negatives.t()  # [N, K]
        logits = torch.cat([positive, negative], dim=1)
        labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(logits / temperature, labels)


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float,
    all_z1: torch.Tensor | None = None,
    all_z2: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """SimCLR's NT-Xent loss over the 2N views of a batch.

    ``z1[i]`` and ``z2[i]`` are two views of image ``i``. All 2N embeddings are L2-normalised and
    every one is an anchor: its positive is its pair, the other 2N-2 embeddings are its negatives,
    its similarity with itself is excluded from the softmax. The loss is the mean over the 2N anchors
    of ``-log(exp(s_pos / t) / sum_{k != anchor} exp(s_k / t))``.

    Data parallelism: ``all_z1``, ``all_z2`` [M, D] are the projections of the whole global batch
    (every rank's, gathered with gradient), this rank's ``z1``, ``z2`` being rows ``offset ... offset + N``
    of them. The anchors are then this rank's 2N views and the candidates all 2M: the rows of the
    global [2M, 2M] problem that belong to this rank, so the mean over ranks is the global loss.

    Args:
        z1: [N, D] projections of the first views.
        z2: [N, D] projections of the second views.
        temperature: tau > 0.
        all_z1, all_z2: optional [M, D] projections of the global batch (both or neither).
        offset: row of ``z1[0]`` in ``all_z1``.

    Returns:
        Scalar loss.
    """
    _check_pair("z1", z1, "z2", z2)
    _check_temperature("temperature", temperature)
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)  # [2N, D] anchors
    if all_z1 is None or all_z2 is None:
        if all_z1 is not None or all_z2 is not None:
            raise ValueError("give both all_z1 and all_z2, or neither")
        candidates, m, offset = z, n, 0
    else:
        _check_pair("all_z1", all_z1, "all_z2", all_z2)
        m = all_z1.shape[0]
        if all_z1.shape[1] != z1.shape[1] or not 0 <= offset <= m - n:
            raise ValueError(f"all_z1 [{m}, D] must hold z1 [{n}, D] at rows {offset}...")
        candidates = F.normalize(torch.cat([all_z1, all_z2], dim=0), dim=1)  # [2M, D]
    logits = (z @ candidates.t()) / temperature  # [2N, 2M]
    rows = torch.arange(n, device=z.device) + offset
    own = torch.cat([rows, rows + m])  # each anchor's own column
    self_mask = torch.zeros(2 * n, 2 * m, dtype=torch.bool, device=z.device)
    self_mask[torch.arange(2 * n, device=z.device), own] = True
    logits = logits.masked_fill(self_mask, float("-inf"))
    labels = torch.cat([rows + m, rows])  # the other view of the same image
    return F.cross_entropy(logits, labels)


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression loss ``2 - 2 cos(p, z)``, averaged over the batch.

    Equal to the squared distance of the L2-normalised vectors; 0 when aligned, 2 when orthogonal,
    4 when opposite. ``z`` is used as given: callers pass the detached target projection.

    Args:
        p: [N, D] online predictions.
        z: [N, D] target projections.

    Returns:
        Scalar loss.
    """
    _check_pair("p", p, "z", z)
    return (2 - 2 * F.cosine_similarity(p, z, dim=1)).mean()


def _split_views(
    logits: torch.Tensor | Sequence[torch.Tensor], batch_size: int | None, name: str
) -> list[torch.Tensor]:
    if isinstance(logits, torch.Tensor):
        if batch_size is None:
            raise ValueError(f"batch_size is needed to split {name} given as one [V*N, K] tensor")
        if logits.ndim != 2 or logits.shape[0] % batch_size:
            raise ValueError(f"{name} must be [V*N, K] with N={batch_size}, got {tuple(logits.shape)}")
        return list(logits.split(batch_size, dim=0))
    return list(logits)


def dino_loss(
    student_logits: torch.Tensor | Sequence[torch.Tensor],
    teacher_logits: torch.Tensor | Sequence[torch.Tensor],
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    batch_size: int | None = None,
) -> torch.Tensor:
    """DINO's cross-entropy between the centred, sharpened teacher and the student, over view pairs.

    For teacher view ``t`` and student view ``s``: ``P_t = softmax((teacher_t - center) / teacher_temp)``
    (detached), ``log P_s = log_softmax(student_s / student_temp)`` and the term is
    ``mean_n sum_k -P_t[n, k] log P_s[n, k]``. The loss is the mean of the terms over all pairs with
    ``t != s``: teacher views are the global crops, which are also the first student views, so a
    view is never matched with itself.

    Args:
        student_logits: V_s tensors [N, K], or one [V_s*N, K] tensor (views stacked, then ``batch_size``).
        teacher_logits: V_t tensors [N, K], or one [V_t*N, K] tensor (same convention).
        center: [1, K] running mean of the teacher logits (see ``update_center``).
        student_temp: student temperature (DINO: 0.1).
        teacher_temp: teacher temperature, lower to sharpen (DINO: 0.04 -> 0.07 warm-up).
        batch_size: N; required when either logits argument is a single stacked tensor.

    Returns:
        Scalar loss.
    """
    _check_temperature("student_temp", student_temp)
    _check_temperature("teacher_temp", teacher_temp)
    students = _split_views(student_logits, batch_size, "student_logits")
    teachers = _split_views(teacher_logits, batch_size, "teacher_logits")
    targets = [F.softmax((t.detach() - center) / teacher_temp, dim=-1) for t in teachers]
    log_probs = [F.log_softmax(s / student_temp, dim=-1) for s in students]
    terms = [
        -(target * log_prob).sum(dim=-1).mean()
        for t_index, target in enumerate(targets)
        for s_index, log_prob in enumerate(log_probs)
        if t_index != s_index
    ]
    if not terms:
        raise ValueError("dino_loss needs at least one (teacher view, student view) pair with different indices")
    return torch.stack(terms).mean()


@torch.no_grad()
def update_center(
    center: torch.Tensor, teacher_logits: torch.Tensor | Sequence[torch.Tensor], momentum: float
) -> torch.Tensor:
    """DINO's centre EMA: ``momentum * center + (1 - momentum) * mean(teacher_logits)``.

    Args:
        center: [1, K] current centre.
        teacher_logits: [V_t*N, K] or a sequence of [N, K] tensors; the mean is over all rows.
        momentum: centre momentum (DINO: 0.9).

    Returns:
        The new [1, K] centre (a new tensor; ``center`` is not modified). Under data parallelism
        the caller all-reduces the batch mean first.
    """
    stacked = teacher_logits if isinstance(teacher_logits, torch.Tensor) else torch.cat(list(teacher_logits))
    batch_center = stacked.detach().mean(dim=0, keepdim=True)
    return center * momentum + batch_center * (1 - momentum)
