"""``selfsight views``: a picture of what a method trains on."""

from __future__ import annotations

from pathlib import Path

import torch

from selfsight.backbones import Backbone
from selfsight.config import PretrainConfig
from selfsight.data import open_images
from selfsight.data.views import save_view_grid
from selfsight.registry import create_method


def preview_views(cfg: PretrainConfig, out: str | Path, num_images: int = 8, progress: bool = True) -> Path:
    """Writes a PNG grid: per row one image of ``cfg.data`` (drawn with ``cfg.seed``), then every view that
    ``cfg.method`` (with its options, on ``cfg.backbone``'s input size and channels) makes of it."""
    backbone = Backbone(cfg.backbone, cfg.backbone_opts)
    images = open_images(cfg.data, backbone.in_chans, backbone.img_size, progress=progress)
    mean, std = images.mean_std()
    method = create_method(cfg.method, backbone, cfg.method_config, mean, std)
    generator = torch.Generator().manual_seed(cfg.seed)
    count = min(num_images, images.num_images)
    chosen = torch.randperm(images.num_images, generator=generator)[:count].sort().values
    pixels = images.get_batch(chosen)
    with torch.no_grad():
        views = method.views(pixels, generator)
    return save_view_grid(pixels, views, mean, std, out, max_images=count)
