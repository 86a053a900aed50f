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


def mae_num_kept(num_tokens: int, mask_ratio: float) -> int:
    """MAE's rule (``models_mae.random_masking``): ``int(num_tokens * (1 - mask_ratio))`` tokens stay visible.

    It can differ by one from ``random_mask``'s ``ceil(num_tokens * mask_ratio)`` masked: 15 tokens at
    ratio 0.8 keep int(2.9999999999999996) = 2 here (13 masked), where ``random_mask`` masks ceil(12.0) = 12.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ConfigError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    kept = int(num_tokens * (1 - mask_ratio))
    if kept < 1:
        raise ConfigError(f"mask_ratio {mask_ratio} leaves no visible token of {num_tokens}")
    return kept


def spark_num_kept(num_cells: int, mask_ratio: float) -> int:
    """SparK's rule (``pretrain/spark.py``): ``round(num_cells * (1 - mask_ratio))`` cells stay visible
    (Python's round: halves go to the even neighbour). 4 cells at 0.6 keep round(1.6) = 2."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ConfigError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    kept = round(num_cells * (1 - mask_ratio))
    if kept < 1:
        raise ConfigError(f"mask_ratio {mask_ratio} leaves no visible cell of {num_cells}")
    return kept


def keep_mask(
    batch_size: int,
    num_tokens: int,
    num_kept: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Exactly ``num_kept`` visible positions per sample, the ones with the smallest uniform noise (MAE's
    argsort of ``rand(N, L)``; SparK's likewise). Returns bool [B, num_tokens], True = masked. Under data
    parallelism the noise is drawn for the global batch and this rank's rows are kept."""
    rows, mine = draw_rows(batch_size)
    noise = torch.rand(rows, num_tokens, generator=generator, device=device)[mine]
    ranks = noise.argsort(dim=1, stable=True).argsort(dim=1)
    return ranks >= num_kept


def visible_order(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's ``ids_shuffle`` and ``ids_restore`` from a mask with the same number of visible tokens per row.

    mask: bool [B, L], True = masked. Returns ``(ids_shuffle, ids_restore)``, long [B, L] each:
    ``ids_shuffle[:, :K]`` are the K visible positions in increasing order, then the masked ones;
    ``ids_restore`` is its inverse permutation (``gather(cat(visible, masked), ids_restore)`` is in
    image order).
    """
    ids_shuffle = mask.to(torch.int8).argsort(dim=1, stable=True)
    ids_restore = ids_shuffle.argsort(dim=1, stable=True)
    return ids_shuffle, ids_restore
