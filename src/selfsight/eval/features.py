"""Frozen features of a whole image set, read batch by batch in order."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from selfsight.backbones import Backbone
from selfsight.data import ImageSet
from selfsight.data.augment import normalize, to_float


def pixels_to_input(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], device: str | torch.device = "cpu"
) -> torch.Tensor:
    """uint8 images [B, C, S, S] -> normalised float32 [B, C, S, S] on ``device``.

    ``mean`` and ``std`` hold one value per channel, in [0, 1] units.
    """
    return normalize(to_float(images.to(device)), mean, std)


@torch.no_grad()
def extract_features(
    backbone: Backbone,
    images: ImageSet,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    layer: int = -1,
    pool: str = "avg",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    indices: torch.Tensor | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features of every image (or of ``indices``) of an ``ImageSet``, in order.

    The backbone runs in eval mode without gradients; its previous train/eval mode is restored.

    Args:
        backbone: the frozen :class:`~selfsight.backbones.Backbone`, already on ``device``.
        images: a :class:`~selfsight.data.ImageSet` giving uint8 [B, C, S, S] batches.
        mean, std: per-channel normalisation in [0, 1] units.
        layer, pool: which block and pooling, as in :meth:`Backbone.features`.
        indices: LongTensor [N] of images to read; default all of them.
    Returns:
        features float32 [N, D] on the CPU, and the labels LongTensor [N] (None when unlabeled).
    """
    if indices is None:
        indices = torch.arange(images.num_images)
    indices = torch.as_tensor(indices).long()
    was_training = backbone.training
    backbone.eval()
    chunks, label_chunks = [], []
    try:
        bar = tqdm(total=indices.numel(), desc=f"features {images.description}"[:60], unit="img",
                   disable=not progress, leave=False)
        for start in range(0, indices.numel(), batch_size):
            batch = indices[start : start + batch_size]
            pixels, sources = images.load_batch(batch)
            x = pixels_to_input(pixels, mean, std, device)
            chunks.append(backbone.features(x, layer=layer, pool=pool).float().cpu())
            label_chunks.append(images.batch_labels(sources))
            bar.update(batch.numel())
        bar.close()
    finally:
        backbone.train(was_training)
    feats = torch.cat(chunks) if chunks else torch.zeros(0, backbone.num_features)
    if images.labels is None:
        labels = None
    elif label_chunks:  # source indices: a lazy set replaces an unreadable file by a readable one
        labels = torch.cat(label_chunks).long()
    else:
        labels = torch.zeros(0, dtype=torch.long)
    return feats, labels
