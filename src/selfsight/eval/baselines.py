"""Raw-pixel baselines: the resized pixels themselves as features, for k-NN and logistic regression.

A pre-training has to beat what the labels alone give. On raw pixels the linear probe
(:func:`selfsight.eval.linear.fit_linear_probe`: multinomial logistic regression with an L2 penalty,
L-BFGS, standardised inputs) *is* a logistic regression on pixels, and the k-NN is the run's own
cosine k-NN; both see the images at the size the backbone reads them.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from selfsight.data import ImageSet
from selfsight.data.augment import to_float

#: the standard CNN trained from scratch on the labels alone (``selfsight eval compare``); timm's
#: ImageNet ResNet-18 (11.2M parameters), reading the images at the run's size and channels
SCRATCH_CNN = "resnet18"


@torch.no_grad()
def pixel_features(
    images: ImageSet, indices: torch.Tensor | None = None, *, batch_size: int = 1024, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flattened pixels in [0, 1] of ``indices`` (LongTensor [N]; default all) of an ``ImageSet``.

    Returns:
        features float32 [N, C * S * S] and labels LongTensor [N] (None when unlabeled).
    """
    if indices is None:
        indices = torch.arange(images.num_images)
    indices = torch.as_tensor(indices).long()
    chunks, label_chunks = [], []
    bar = tqdm(total=indices.numel(), desc=f"pixels {images.description}"[:60], unit="img",
               disable=not progress, leave=False)
    for start in range(0, indices.numel(), batch_size):
        pixels, sources = images.load_batch(indices[start : start + batch_size])
        chunks.append(to_float(pixels).flatten(1))
        if images.labels is not None:
            label_chunks.append(images.batch_labels(sources))
        bar.update(pixels.shape[0])
    bar.close()
    size = images.in_chans * images.img_size * images.img_size
    feats = torch.cat(chunks) if chunks else torch.zeros(0, size)
    if images.labels is None:
        return feats, None
    labels = torch.cat(label_chunks).long() if label_chunks else torch.zeros(0, dtype=torch.long)
    return feats, labels
