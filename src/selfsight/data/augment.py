"""Batched augmentation on image tensors, on any device.

Each random op is split in two: `sample_*` draws per-sample parameters from an explicit CPU
`torch.Generator` (so a seed gives the same parameters on CPU and CUDA), and a deterministic
`apply`-style function uses them in one batched op on the tensor's device. The `random_*`
functions chain both. No Python loop over images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from selfsight.distributed import draw_rows

# Candidate boxes drawn per sample before falling back to clamping (as torchvision tries 10 times).
_CROP_ATTEMPTS = 10


def to_float(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x: uint8 [B, C, H, W] -> float [B, C, H, W] in [0, 1]."""
    return x.to(dtype).div_(255.0)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel. x: float [B, C, H, W]; mean, std: C values each."""
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def sample_crop_boxes(
    batch_size: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """Crop boxes as torchvision's RandomResizedCrop samples them, for a whole batch at once.

    Per sample, up to 10 candidates: area = H * W * U(scale), aspect w/h log-uniform in ratio;
    the first candidate that fits is kept, else the first one clamped to the image. The position
    is uniform over where the box fits. Boxes are continuous (sub-pixel), in pixel-edge units.
    generator: a CPU generator. Returns float32 [B, 4] = (left, top, width, height) on the CPU.
    Under data parallelism, draws for the global batch and keeps this rank's rows (see ``draw_rows``).
    """
    rows, mine = draw_rows(batch_size)
    area = height * width * torch.empty(rows, _CROP_ATTEMPTS).uniform_(*scale, generator=generator)[mine]
    log_ratio = torch.empty(rows, _CROP_ATTEMPTS).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator
    )[mine]
    aspect = log_ratio.exp()
    box_w = (area * aspect).sqrt()
    box_h = (area / aspect).sqrt()
    fits = (box_w <= width) & (box_h <= height)
    first_fit = torch.where(fits.any(dim=1), fits.to(torch.int8).argmax(dim=1), 0).unsqueeze(1)
    box_w = box_w.gather(1, first_fit).squeeze(1).clamp(max=width)
    box_h = box_h.gather(1, first_fit).squeeze(1).clamp(max=height)
    position = torch.rand(rows, 2, generator=generator)[mine]
    left = position[:, 0] * (width - box_w)
    top = position[:, 1] * (height - box_h)
    return torch.stack([left, top, box_w, box_h], dim=1)


def crop_and_resize(x: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Resamples box i of image i to size x size (bilinear, align_corners=False, border padding),
    mirrored left-right where ``flip`` (bool [B]) is True.

    x: float [B, C, H, W]; boxes: [B, 4] (left, top, width, height) in pixels -> [B, C, size, size].
    One grid_sample; no antialiasing, so shrinking a box a lot aliases. The flip is a
    negative horizontal scale of the sampling grid (the output grid is symmetric about the box's
    centre), so it costs nothing, unlike flipping and blending the whole batch afterwards.
    """
    _, _, height, width = x.shape
    boxes = boxes.to(device=x.device, dtype=x.dtype)
    left, top, box_w, box_h = boxes.unbind(dim=1)
    # Normalized coordinates: -1 and +1 are the outer edges of the image (align_corners=False). The box is
    # an axis-aligned scale and shift, so the grid is an outer sum of a row of x and a column of y
    # coordinates: what affine_grid computes, without its [B, size * size, 3] x [B, 3, 2] product.
    centres = torch.linspace(-1, 1, size, dtype=x.dtype, device=x.device) * ((size - 1) / size)  # output pixels
    scale_x = box_w / width
    if flip is not None:
        scale_x = scale_x * (1 - 2 * flip.to(device=x.device, dtype=x.dtype))
    grid_x = scale_x.unsqueeze(1) * centres + ((2 * left + box_w) / width - 1).unsqueeze(1)  # [B, size]
    grid_y = (box_h / height).unsqueeze(1) * centres + ((2 * top + box_h) / height - 1).unsqueeze(1)
    grid = torch.stack([grid_x.unsqueeze(1).expand(-1, size, -1), grid_y.unsqueeze(2).expand(-1, -1, size)], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.67, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """x: float [B, C, H, W] -> [B, C, size, size], one random box per sample (see sample_crop_boxes).

    generator: a CPU torch.Generator; x may be on any device.
    """
    if not x.is_floating_point():
        raise TypeError(f"random_resized_crop needs a float tensor, got {x.dtype} (use to_float first)")
    boxes = sample_crop_boxes(x.shape[0], x.shape[2], x.shape[3], scale, ratio, generator=generator)
    return crop_and_resize(x, boxes, size)


def sample_flips(batch_size: int, p: float, *, generator: torch.Generator) -> torch.Tensor:
    """bool [B]: True where a sample is flipped, i.e. torch.rand(B, generator=generator) < p (CPU).
    Under data parallelism, drawn for the global batch; this rank's rows are kept (see ``draw_rows``)."""
    rows, mine = draw_rows(batch_size)
    return torch.rand(rows, generator=generator)[mine] < p


def hflip_where(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirrors left-right the samples where flip is True. x: [B, C, H, W]; flip: bool [B]."""
    flip = flip.to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


def random_hflip(x: torch.Tensor, p: float = 0.5, *, generator: torch.Generator) -> torch.Tensor:
    """x: [B, C, H, W] -> [B, C, H, W], each sample mirrored with probability p.

    generator: a CPU torch.Generator; x may be on any device.
    """
    return hflip_where(x, sample_flips(x.shape[0], p, generator=generator))
