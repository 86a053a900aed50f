"""Online k-NN monitor: how well the backbone's features separate a labeled held-out set, during training."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from selfsight.backbones import Backbone
from selfsight.data import open_images
from selfsight.errors import ConfigError
from selfsight.eval.features import pixels_to_input
from selfsight.eval.knn import knn_scores, top1

MONITOR_K = 20
MONITOR_TEMPERATURE = 0.07


class KnnMonitor:
    """Weighted k-NN (k=20, temperature 0.07, as ``selfsight eval --kind knn``) on a fixed labeled sample.

    ``size`` images are drawn once (seeded) from ``data``; the first half is the memory bank, the second
    half the queries, so the number is a held-out accuracy that moves with the features and costs one
    forward pass over ``size`` images. The images are kept in memory as uint8.
    """

    def __init__(self, data: str, in_chans: int, img_size: int, size: int, seed: int, progress: bool = False) -> None:
        images = open_images(data, in_chans, img_size, progress=progress)
        if images.labels is None:
            raise ConfigError(
                f"monitor data {data} has no labels: give a labeled set (class subfolders, IDX or CIFAR with labels)"
            )
        count = min(size, images.num_images)
        if count < 4:
            raise ConfigError(f"monitor data {data} has {images.num_images} images; the k-NN monitor needs at least 4")
        order = torch.randperm(images.num_images, generator=torch.Generator().manual_seed(seed))[:count]
        self.pixels, sources = images.load_batch(order.sort().values)
        self.labels = images.batch_labels(sources)
        self.num_classes = max(len(images.classes), int(self.labels.max()) + 1)
        self.bank_size = count // 2
        self.description = f"{images.description}, {count} images"

    @torch.no_grad()
    def __call__(
        self, backbone: Backbone, mean: Sequence[float], std: Sequence[float], device: torch.device, batch: int = 256
    ) -> float:
        """Top-1 of the queries against the bank, with ``backbone``'s pooled features; train mode is restored."""
        was_training = backbone.training
        backbone.eval()
        try:
            features = torch.cat(
                [
                    backbone.features(pixels_to_input(self.pixels[i : i + batch], mean, std, device)).float().cpu()
                    for i in range(0, self.pixels.shape[0], batch)
                ]
            )
        finally:
            backbone.train(was_training)
        bank, queries = features[: self.bank_size], features[self.bank_size :]
        scores = knn_scores(
            bank, self.labels[: self.bank_size], queries, self.num_classes, k=MONITOR_K, temperature=MONITOR_TEMPERATURE
        )
        return top1(scores, self.labels[self.bank_size :])
