"""Fixed-seed, class-balanced labeled subsets for few-label evaluation."""

from __future__ import annotations

import torch

from selfsight.errors import ConfigError


def few_label_indices(
    labels: torch.Tensor,
    labels_per_class: int | None = None,
    label_fraction: float | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Indices of a class-balanced labeled subset, the same for the same ``seed``.

    Every class gets its own seeded permutation (drawn in increasing class order from one
    generator, so it does not depend on how many labels are asked for); the subset takes the
    first ``labels_per_class`` of it, or ``max(1, round(label_fraction * count))``. Hence the subset
    for 10 labels per class is contained in the one for 20.

    Args:
        labels: class ids, LongTensor [N].
        labels_per_class: images kept per class; or
        label_fraction: share of each class kept, in (0, 1]. Give at most one of the two;
            neither keeps every image.
        seed: seed of the permutations.
    Returns:
        LongTensor [M] of indices into ``labels``, sorted increasingly.
    """
    labels = torch.as_tensor(labels).long().reshape(-1)
    if labels_per_class is not None and label_fraction is not None:
        raise ConfigError("give labels_per_class or label_fraction, not both")
    if labels_per_class is None and label_fraction is None:
        return torch.arange(labels.numel())
    if labels_per_class is not None and labels_per_class < 1:
        raise ConfigError(f"labels_per_class must be at least 1, got {labels_per_class}")
    if label_fraction is not None and not 0.0 < label_fraction <= 1.0:
        raise ConfigError(f"label_fraction must be in (0, 1], got {label_fraction}")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for cls in torch.unique(labels).tolist():  # sorted
        members = torch.nonzero(labels == cls).flatten()
        order = members[torch.randperm(members.numel(), generator=generator)]
        if labels_per_class is not None:
            wanted = labels_per_class
            if members.numel() < wanted:
                raise ConfigError(
                    f"class {cls} has {members.numel()} images, fewer than labels_per_class={wanted}"
                )
        else:
            wanted = max(1, round(label_fraction * members.numel()))
        chosen.append(order[:wanted])
    if not chosen:
        return torch.zeros(0, dtype=torch.long)
    return torch.sort(torch.cat(chosen)).values


def draw_seeds(seed: int, draws: int) -> list[int]:
    """The seeds of ``draws`` labeled subsets: ``seed, seed + 1, ...`` (draw 0 is the single-draw subset)."""
    if draws < 1:
        raise ConfigError(f"draws must be at least 1, got {draws}")
    return [seed + i for i in range(draws)]


def validation_split(
    labels: torch.Tensor, indices: torch.Tensor, fraction: float = 0.2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a labeled subset into (fit, validation) parts, class by class; the test set is never read.

    Each class of ``labels[indices]`` puts ``max(1, round(fraction * count))`` of its members (but never
    all of them when it has two or more) into the validation part, chosen by a seeded permutation.

    Args:
        labels: class ids of the whole training set, LongTensor [N].
        indices: the labeled subset, LongTensor [M] of indices into ``labels``.
        fraction: share of each class held out, in (0, 1).
        seed: seed of the permutations.
    Returns:
        (fit, validation): two sorted, disjoint LongTensors whose union is ``indices``.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"validation fraction must be in (0, 1), got {fraction}")
    indices = torch.as_tensor(indices).long().reshape(-1)
    subset_labels = torch.as_tensor(labels).long()[indices]
    generator = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for cls in torch.unique(subset_labels).tolist():
        members = indices[subset_labels == cls]
        order = members[torch.randperm(members.numel(), generator=generator)]
        count = max(1, round(fraction * members.numel()))
        if members.numel() >= 2:
            count = min(count, members.numel() - 1)
        else:
            count = 0  # a lone image trains; its class is then missing from the validation part
        held.append(order[:count])
        fit.append(order[count:])
    empty = torch.zeros(0, dtype=torch.long)
    fit_all = torch.sort(torch.cat(fit)).values if fit else empty
    held_all = torch.sort(torch.cat(held)).values if held else empty
    if held_all.numel() == 0:
        raise ConfigError("the labeled subset is too small for a validation split (need 2+ images in a class)")
    return fit_all, held_all
