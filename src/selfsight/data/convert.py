"""Batched conversions of in-memory uint8 image tensors: channels and size.

Used once at open time for IDX and CIFAR data (already decoded arrays), never per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# ITU-R 601-2 luma in 16-bit fixed point, exactly as Pillow's RGB -> 'L' conversion.
_LUMA_WEIGHTS_Q16 = (19595, 38470, 7471)

# Float elements per resize chunk (~256 MB of float32), so huge sets do not need a huge float copy.
_RESIZE_CHUNK_ELEMENTS = 1 << 26


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, rounded as Pillow does. x: uint8 [B, 3, H, W] -> uint8 [B, 1, H, W]."""
    weights = torch.tensor(_LUMA_WEIGHTS_Q16, dtype=torch.int32, device=x.device).view(1, 3, 1, 1)
    luma = (x.to(torch.int32) * weights).sum(dim=1, keepdim=True) + 0x8000
    return (luma >> 16).to(torch.uint8)


def convert_channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """x: uint8 [B, C, H, W] with C in {1, 3} -> uint8 [B, in_chans, H, W].

    Gray -> RGB repeats the channel; RGB -> gray uses `rgb_to_gray`.
    """
    channels = x.shape[1]
    if channels == in_chans:
        return x
    if channels == 1 and in_chans == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if channels == 3 and in_chans == 1:
        return rgb_to_gray(x)
    raise ValueError(f"cannot convert {channels} channels to {in_chans}")


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Center square crop of side min(H, W), resized to size x size (bilinear, antialiased).

    x: uint8 [B, C, H, W] -> uint8 [B, C, size, size]. Batched in chunks, no per-image Python.
    """
    height, width = x.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    x = x[..., top:top + side, left:left + side]
    if side == size:
        return x.contiguous()
    per_image = x.shape[1] * max(side, size) ** 2
    chunk = max(1, _RESIZE_CHUNK_ELEMENTS // per_image)
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8, device=x.device)
    for start in range(0, x.shape[0], chunk):
        part = x[start:start + chunk].float()
        resized = F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start:start + chunk] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def prepare_pixels(x: torch.Tensor, in_chans: int, img_size: int) -> torch.Tensor:
    """Channels then size, doing the cheaper order: x: uint8 [B, C, H, W] -> uint8 [B, in_chans, S, S]."""
    if x.shape[1] > in_chans:
        return resize_center_crop(convert_channels(x, in_chans), img_size)
    return convert_channels(resize_center_crop(x, img_size), in_chans)
