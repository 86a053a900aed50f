"""``selfsight views``: a picture of what a method trains on."""

from __future__ import annotations

from pathlib import Path

import torch

from selfsight.backbones import Backbone
from selfsight.config import PretrainConfig
from selfsight.data import ImageSet, open_images
from selfsight.data.views import save_view_grid
from selfsight.methods.base import Method
from selfsight.registry import create_method


def preview_views(cfg: PretrainConfig, out: str | Path, num_images: int = 8, progress: bool = True) -> Path:
    """Writes a PNG grid: per row one image of ``cfg.data`` (drawn with ``cfg.seed``), then every view that
    ``cfg.method`` (with its options, on ``cfg.backbone``'s input size and channels) makes of it."""
    backbone = Backbone(cfg.backbone, cfg.backbone_opts)
    images = open_images(cfg.data, backbone.in_chans, backbone.img_size, progress=progress)
    mean, std = images.mean_std()
    method = create_method(cfg.method, backbone, cfg.method_config, mean, std)
    return write_view_grid(images, method, cfg.seed, out, num_images)


@torch.no_grad()
def write_view_grid(images: ImageSet, method: Method, seed: int, out: str | Path, num_images: int = 8) -> Path:
    """The PNG grid of ``preview_views`` for a method that exists already (on any device): ``num_images``
    images of ``images`` drawn with ``seed``, each followed by the method's views of it."""
    generator = torch.Generator().manual_seed(seed)
    count = min(num_images, images.num_images)
    chosen = torch.randperm(images.num_images, generator=generator)[:count].sort().values
    pixels = images.get_batch(chosen)
    views = method.views(pixels.to(method.mean.device), generator)
    return save_view_grid(pixels, views, method.mean.flatten().tolist(), method.std.flatten().tolist(), out,
                          max_images=count)
