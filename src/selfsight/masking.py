"""Pure mask generators. Every mask is a bool tensor, True = masked, drawn from an explicit generator."""

from __future__ import annotations

import math

import torch

from selfsight.distributed import draw_rows
from selfsight.errors import ConfigError

#: SimMIM masks 32-px squares at 192-px input; the mask-patch size scales with the input size.
SIMMIM_REFERENCE = (32, 192)


def scaled_mask_patch_size(img_size: int, patch_size: int, reference: tuple[int, int] = SIMMIM_REFERENCE) -> int:
    """The SimMIM mask-patch size for ``img_size``: ``32 * img_size / 192`` rounded to the nearest
    multiple of ``patch_size`` that divides ``img_size`` (at least ``patch_size``).

    Ties go to the smaller size. 192 px / patch 4 -> 32; 224 px / patch 4 -> 32; 28 px / patch 4 -> 4.
    """
    target = reference[0] * img_size / reference[1]
    candidates = [m for m in range(patch_size, img_size + 1, patch_size) if img_size % m == 0]
    return min(candidates, key=lambda m: (abs(m - target), m))


def random_mask(
    batch_size: int,
    num_tokens: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Exactly ``ceil(num_tokens * mask_ratio)`` masked positions per sample, chosen uniformly.

    Masking is a pure function of uniform noise: the positions with the smallest noise are masked
    (the argsort trick of MAE). Returns bool [B, num_tokens]. Under data parallelism the noise is
    drawn for the global batch and this rank's rows are kept (see ``selfsight.distributed.draw_rows``).
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ConfigError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    num_masked = math.ceil(num_tokens * mask_ratio)
    rows, mine = draw_rows(batch_size)
    noise = torch.rand(rows, num_tokens, generator=generator, device=device)[mine]
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return ranks < num_masked


def simmim_mask(
    batch_size: int,
    img_size: int,
    patch_size: int,
    mask_patch_size: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """SimMIM's random masking: square mask patches of ``mask_patch_size`` pixels, a fraction
    ``mask_ratio`` of them masked, expressed on the backbone's patch grid.

    Returns:
        bool [B, img_size / patch_size, img_size / patch_size].
    """
    if img_size % mask_patch_size or mask_patch_size % patch_size:
        raise ConfigError(
            f"mask_patch_size {mask_patch_size} must divide img_size {img_size} "
            f"and be a multiple of the patch size {patch_size}"
        )
    side = img_size // mask_patch_size
    coarse = random_mask(batch_size, side * side, mask_ratio, generator, device).view(batch_size, side, side)
    scale = mask_patch_size // patch_size
    return coarse.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """bool [B, h, w] -> [B, h * factor, w * factor] (each grid cell becomes a factor x factor block)."""
    return mask.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
