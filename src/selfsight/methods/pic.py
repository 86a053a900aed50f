"""PIC (Cao et al. 2020, "Parametric Instance Classification for Unsupervised Visual Feature Learning").

Every training image is its own class: the backbone's pooled features go through an MLP head
(Linear 2048 - ReLU - Linear 128, no BatchNorm, as the official ``bl0/PIC`` ResNet's ``mlp_head``), are
L2-normalised, and a cosine-softmax classifier with one weight row per image (N x 128, L2-normalised
rows, initialised N(0, 0.01)) scores them at temperature 0.2. The label of a view is its image's index
in the data set. Multi-crop: one large crop (scale 0.14-1) and three small crops (scale 0.08-0.14, 96/160
of the large crop's side); the small crops' logits use the classifier weights detached, so only the
large crops train the classifier. Views: SimCLR's jitter (0.8, 0.8, 0.8, 0.2) with p 0.8, grayscale 0.2,
blur 0.5 (the official ``MultiCrop`` transform). Small crops of one size go through the network together
(the official code runs each crop separately: BatchNorm then sees B images, not 3B).

Image identity: ``training_step(images, generator)`` reads the data-set indices of this rank's images
from ``self.batch_indices`` (int64 [B]), to be set by the engine before every micro-step; the step
consumes it, so a batch without indices is refused instead of silently trained on stale labels. The
engine sets them (in the order ``batch_indexer`` asks for) and fills ``Config.num_images`` (the
classifier's rows) from the data set unless it is given. Tar shards stream in their own order and are
refused for PIC: train it on the image folder itself.

The sliding-window data scheduler is ``selfsight.data.windows``; ``batch_indexer`` gives the data stream
the order PIC wants (window 131,072 images, stride 16,384: each image comes back in 8 consecutive
windows, so its classifier row is updated often). The official sampler's modulus is the window size, so
its window never slides (see ``selfsight.data.windows``); this one slides as the paper says.

Memory: the classifier costs 16 N D bytes in training (weights, gradient, AdamW's two moments), and the
logits 4 N bytes per view in each of their forward and backward tensors. Both are logged when the method
is built; a classifier above ``max_classifier_gib`` or above the training device's memory (the CUDA
device's, else the machine's RAM) is refused with the numbers.

Not implemented (never released in the official code): the paper's negative-class sampling and
classification-weight update correction (section 3.2); every step scores against all N classes. The
classifier gets the run's weight decay like any weight matrix (the official SGD decays it too).

Data parallelism: each rank scores its own views against all N classes (the classifier is replicated
like any parameter); the mean of the ranks' losses is the global-batch loss and DDP's mean of the
gradients its gradient, so no gather is needed.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsight.backbones import Backbone
from selfsight.data.windows import WindowBatchIndexer
from selfsight.errors import ConfigError, TrainingError
from selfsight.heads import MLPHead
from selfsight.methods.base import Method, StepOutput
from selfsight.methods.common import TwoViewOptions, embedding_std, full_precision
from selfsight.registry import register_method

log = logging.getLogger("selfsight")

GIB = 2**30


def instance_logits(features: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cosine-softmax logits: ``normalize(features) @ normalize(weight).T / temperature``.

    features: [M, D]; weight: [N, D], one row per image. Returns [M, N].
    """
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    return F.normalize(features, dim=1) @ F.normalize(weight, dim=1).t() / temperature


def device_memory_gib() -> float:
    """GiB of the memory a run trains in by default: the current CUDA device's when there is one, else the
    machine's RAM (inf when unknown)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (AttributeError, ValueError, OSError):
        return math.inf


def classifier_memory(num_images: int, dim: int, views: int) -> dict[str, float]:
    """GiB the classifier needs in training (weights, gradient, AdamW's 2 moments: 16 N D bytes) and GiB
    per image of a batch for its logits (fp32 [views, N], forward and backward: 8 N views bytes)."""
    return {
        "classifier_gib": 16 * num_images * dim / GIB,
        "logits_gib_per_image": 8 * num_images * views / GIB,
    }


@register_method("pic")
class PIC(Method):
    """PIC on any timm backbone (features: the backbone's pooled output)."""

    @dataclass
    class Config(TwoViewOptions):
        """PIC's defaults (Cao et al. 2020; official ``bl0/PIC`` ``scripts/PIC.sh``)."""

        #: the large crops' scale (``--crop2 0.14`` up to 1)
        crop_scale: tuple[float, float] = (0.14, 1.0)
        brightness: float = 0.8
        contrast: float = 0.8
        saturation: float = 0.8
        hue: float = 0.2
        blur_p: tuple[float, float] = (0.5, 0.5)
        solarize_p: tuple[float, float] = (0.0, 0.0)
        num_large_crops: int = 1
        num_small_crops: int = 3
        small_crop_scale: tuple[float, float] = (0.08, 0.14)
        #: side of the small crops in px; None = 96/160 of the input size (the paper's 160 px / 96 px)
        small_size: int | None = None
        hidden_dim: int = 2048
        feature_dim: int = 128
        temperature: float = 0.2
        #: images in the training set (one classifier row each); None: the engine sets it from the data
        num_images: int | None = None
        #: refuse a classifier whose training state (16 N D bytes) exceeds this many GiB
        max_classifier_gib: float = 16.0
        #: train in the sliding-window order (``batch_indexer``); false: the engine's epoch order
        sliding_window: bool = True
        #: the sliding-window scheduler's window W and stride S in images (paper: 131,072 and 16,384;
        #: both are cut to the data set's size on smaller sets)
        window_size: int = 131072
        window_stride: int = 16384

    def __init__(self, backbone: Backbone, config: PIC.Config, mean: list[float], std: list[float]) -> None:
        super().__init__(backbone, config, mean, std)
        c = config
        if c.num_images is None or c.num_images < 1:
            raise ConfigError(
                "PIC needs the number of training images (one classifier row per image): the engine fills in "
                f"num_images from the data set, or give num_images=N; got {c.num_images}"
            )
        if c.num_large_crops < 1 or c.num_small_crops < 0:
            raise ConfigError("PIC needs num_large_crops >= 1 and num_small_crops >= 0")
        views = c.num_large_crops + c.num_small_crops
        memory = classifier_memory(c.num_images, c.feature_dim, views)
        log.info(
            "PIC classifier: %d images x %d dims = %.2f GiB in training (weights, gradient, AdamW); logits "
            "%.2f MiB per image of a batch",
            c.num_images, c.feature_dim, memory["classifier_gib"], memory["logits_gib_per_image"] * 1024,
        )
        available = device_memory_gib()
        if memory["classifier_gib"] > min(c.max_classifier_gib, available):
            limit = (f"max_classifier_gib={c.max_classifier_gib}" if c.max_classifier_gib <= available
                     else f"the {available:.1f} GiB of the training device")
            raise ConfigError(
                f"PIC's classifier for {c.num_images} images x {c.feature_dim} dims needs "
                f"{memory['classifier_gib']:.1f} GiB in training (weights, gradient, AdamW moments), above "
                f"{limit}; it does not fit: lower feature_dim, train on fewer images, or raise "
                "max_classifier_gib if the device holds it"
            )
        self.head = MLPHead(backbone.num_features, c.hidden_dim, c.feature_dim, batch_norm=False)
        self.classifier = nn.Parameter(torch.empty(c.num_images, c.feature_dim).normal_(0.0, 0.01))
        #: int64 [B]: the data-set indices of the next training_step's images, set by the engine
        self.batch_indices: torch.Tensor | None = None
        size = backbone.img_size
        small = c.small_size or max(8, round(size * 96 / 160))
        if not backbone.accepts_any_size and small != size:
            log.info("%s takes %d-px inputs only: PIC's small crops are rendered at %d px", backbone.name, size, size)
            small = size
        large_spec = c.view_spec(0, size, backbone.in_chans)
        small_spec = c.view_spec(1, small, backbone.in_chans, crop_scale=c.small_crop_scale)
        self.view_specs = [large_spec] * c.num_large_crops + [small_spec] * c.num_small_crops

    def batch_indexer(
        self, num_images: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> WindowBatchIndexer | None:
        """The order the training data should come in: the sliding-window scheduler over ``num_images``
        images (``batch_size`` per rank), or None for the engine's usual epochs (``sliding_window=false``).
        A window or stride larger than the data set is cut to its size."""
        c = self.config
        if not c.sliding_window:
            return None
        window = min(c.window_size, num_images)
        stride = min(c.window_stride, window)
        return WindowBatchIndexer(num_images, batch_size, seed, window, stride, rank, world_size)

    def _take_indices(self, batch: int, device: torch.device) -> torch.Tensor:
        """The labels of this step's images (int64 [B]), taken from ``batch_indices`` (then cleared)."""
        indices, self.batch_indices = self.batch_indices, None
        if indices is None:
            raise TrainingError(
                "PIC needs the data-set index of every image of a batch, set on method.batch_indices before each "
                "training_step (selfsight's engine does; a custom loop must too)"
            )
        if indices.shape != (batch,):
            raise TrainingError(f"batch_indices must be [{batch}], got {tuple(indices.shape)}")
        if int(indices.min()) < 0 or int(indices.max()) >= self.config.num_images:
            raise TrainingError(
                f"an image index is outside 0..{self.config.num_images - 1}: num_images does not match the data"
            )
        return indices.to(device=device, dtype=torch.long)

    def training_step(self, images: torch.Tensor, generator: torch.Generator) -> StepOutput:
        views = self.views(images, generator)
        batch = views[0].shape[0]
        labels = self._take_indices(batch, views[0].device)
        n_large = self.config.num_large_crops
        large = self.head(self.backbone(torch.cat(views[:n_large])))  # [L*B, D]
        small = self.head(self.backbone(torch.cat(views[n_large:]))) if len(views) > n_large else None
        with full_precision(large.device):
            logits = [instance_logits(large.float(), self.classifier, self.config.temperature)]
            if small is not None:  # the small crops do not train the classifier
                logits.append(instance_logits(small.float(), self.classifier.detach(), self.config.temperature))
            loss = F.cross_entropy(torch.cat(logits), labels.repeat(len(views)))
        return StepOutput(loss=loss, metrics=embedding_std(large))
