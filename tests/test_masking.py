import math

import pytest
import torch

from selfsight.errors import ConfigError
from selfsight.masking import random_mask, scaled_mask_patch_size, simmim_mask, upsample_mask


@pytest.mark.parametrize(
    "img_size,patch_size,expected",
    [(192, 4, 32), (224, 4, 32), (192, 16, 32), (96, 4, 16), (28, 4, 4), (32, 4, 4), (32, 2, 4), (64, 4, 8)],
)
def test_mask_patch_size_scales_from_32_at_192(img_size, patch_size, expected):
    # 32 px at 192 px scaled by img_size / 192, rounded to a multiple of patch_size dividing img_size.
    # e.g. 64 px: target 10.67; multiples of 4 dividing 64 are 4, 8, 16, 32, 64 -> 8 is nearest.
    assert scaled_mask_patch_size(img_size, patch_size) == expected


@pytest.mark.parametrize("num_tokens,ratio", [(49, 0.6), (36, 0.6), (16, 0.75), (10, 0.0), (64, 0.5)])
def test_random_mask_masks_exactly_ceil_ratio(num_tokens, ratio):
    gen = torch.Generator().manual_seed(0)
    mask = random_mask(32, num_tokens, ratio, gen)
    assert mask.dtype == torch.bool and mask.shape == (32, num_tokens)
    assert (mask.sum(1) == math.ceil(num_tokens * ratio)).all()
    # positions differ across samples (not one fixed pattern)
    if ratio > 0:
        assert len({tuple(row.tolist()) for row in mask}) > 1


def test_random_mask_is_a_function_of_the_generator():
    a = random_mask(4, 25, 0.6, torch.Generator().manual_seed(3))
    b = random_mask(4, 25, 0.6, torch.Generator().manual_seed(3))
    c = random_mask(4, 25, 0.6, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_simmim_mask_blocks_and_ratio():
    # 192 px, patch 4, mask patch 32 -> a 6 x 6 grid of mask patches, each 8 x 8 on the patch grid
    mask = simmim_mask(5, 192, 4, 32, 0.6, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 48, 48)
    blocks = mask.view(5, 6, 8, 6, 8)
    coarse = blocks[:, :, 0, :, 0]
    assert torch.equal(blocks, coarse[:, :, None, :, None].expand_as(blocks))  # uniform inside each block
    assert (coarse.flatten(1).sum(1) == math.ceil(36 * 0.6)).all()  # 22 of 36 masked, exactly
    assert (mask.flatten(1).float().mean(1) == 22 / 36).all()


def test_simmim_mask_rejects_bad_sizes():
    with pytest.raises(ConfigError):
        simmim_mask(1, 28, 4, 6, 0.6)  # 6 is not a multiple of 4
    with pytest.raises(ConfigError):
        simmim_mask(1, 28, 4, 8, 0.6)  # 8 does not divide 28
    with pytest.raises(ConfigError):
        random_mask(1, 10, 1.0)


def test_upsample_mask():
    mask = torch.tensor([[[True, False], [False, True]]])
    up = upsample_mask(mask, 2)
    assert up.shape == (1, 4, 4)
    assert up[0, :2, :2].all() and not up[0, :2, 2:].any() and up[0, 2:, 2:].all()
