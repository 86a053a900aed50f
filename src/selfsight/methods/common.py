"""Pieces the contrastive and self-distillation methods share: their augmentation options and the
collapse statistic of their embeddings."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selfsight.data.views import ViewSpec, adapt_spec


@dataclass
class TwoViewOptions:
    """The augmentation of the two views (BYOL's asymmetric recipe by default).

    ``blur_p`` and ``solarize_p`` give one probability per view. Colour options act as torchvision's
    ColorJitter(brightness, contrast, saturation, hue) applied with probability ``jitter_p``; on
    1-channel images saturation, hue and grayscale do nothing and are skipped, and on small images
    blur sigmas are scaled from 224 px and tiny crops are avoided (see ``selfsight.data.views.adapt_spec``).
    """

    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: tuple[float, float] = (1.0, 0.1)
    solarize_p: tuple[float, float] = (0.0, 0.2)

    def view_spec(self, index: int, size: int, in_chans: int, **changes) -> ViewSpec:
        """The ViewSpec of view ``index`` (0 or 1) at ``size`` px, adapted to ``in_chans`` channels."""
        spec = ViewSpec(
            size=size,
            crop_scale=self.crop_scale,
            hflip_p=self.hflip_p,
            jitter_p=self.jitter_p,
            brightness=self.brightness,
            contrast=self.contrast,
            saturation=self.saturation,
            hue=self.hue,
            grayscale_p=self.grayscale_p,
            blur_p=self.blur_p[index],
            solarize_p=self.solarize_p[index],
        )
        return adapt_spec(dataclasses.replace(spec, **changes), in_chans, size)

    def two_view_specs(self, size: int, in_chans: int) -> list[ViewSpec]:
        return [self.view_spec(0, size, in_chans), self.view_spec(1, size, in_chans)]


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> dict[str, float]:
    """Collapse statistic (SimSiam, Chen & He 2021): the per-dimension standard deviation over the batch
    of the L2-normalised embeddings, averaged over dimensions.

    A healthy D-dimensional embedding spread over the sphere has ``embed_std ~ 1 / sqrt(D)``; a collapsed
    one (every image mapped to the same point) has 0. ``embed_std_norm = embed_std * sqrt(D)`` puts that on
    a scale where 1 is healthy and 0 is collapse, whatever D is. z: [N, D].
    """
    unit = F.normalize(z.detach().float(), dim=1)
    std = unit.std(dim=0).mean().item()
    return {"embed_std": std, "embed_std_norm": std * math.sqrt(z.shape[1])}


def full_precision(device: torch.device) -> torch.autocast:
    """A context that turns autocast off: losses (softmax over many logits, cosines) are computed in fp32."""
    return torch.autocast(device.type, enabled=False)
