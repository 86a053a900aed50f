"""Multi-view augmentation: shapes, determinism, the CPU-generator contract, and each op against a reference."""

from __future__ import annotations

import colorsys
import dataclasses
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from selfsight.data.views import (
    ViewSpec,
    adapt_spec,
    apply_view,
    apply_where,
    blur_kernel_size,
    color_jitter,
    gaussian_blur,
    grayscale,
    hue_matrices,
    make_view,
    make_views,
    sample_coins,
    sample_view,
    save_view_grid,
    solarize,
)

# A view that changes nothing: the whole image at its own size, every op off.
IDENTITY = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_p=0.0, jitter_p=0.0, grayscale_p=0.0)
STRONG = ViewSpec(size=12, jitter_p=1.0, grayscale_p=0.5, blur_p=1.0, solarize_p=1.0, hflip_p=0.5)


def rand_images(batch: int = 6, channels: int = 3, side: int = 16, seed: int = 0) -> torch.Tensor:
    """uint8 [B, C, side, side]."""
    return torch.randint(0, 256, (batch, channels, side, side), generator=torch.Generator().manual_seed(seed)).to(
        torch.uint8
    )


def rand_float(batch: int = 6, channels: int = 3, side: int = 16, seed: int = 0) -> torch.Tensor:
    """float [B, C, side, side] in [0, 1]."""
    return torch.rand(batch, channels, side, side, generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("channels", [1, 3])
def test_make_view_shape_dtype_and_range(channels: int) -> None:
    x = rand_float(channels=channels, side=20)
    view = make_view(x, STRONG, generator=gen())
    assert view.shape == (6, channels, 12, 12)
    assert view.dtype == torch.float32
    assert view.min() >= 0 and view.max() <= 1
    with pytest.raises(TypeError):
        make_view(rand_images(), STRONG, generator=gen())


def test_make_views_normalises_each_spec_in_order() -> None:
    images = rand_images(channels=3, side=16)
    specs = [ViewSpec(size=16, **IDENTITY), ViewSpec(size=8)]
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 0.1)
    views = make_views(images, specs, mean, std, generator=gen())
    assert [v.shape for v in views] == [(6, 3, 16, 16), (6, 3, 8, 8)]
    assert all(v.dtype == torch.float32 for v in views)
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(views[0], expected, atol=1e-5, rtol=0)
    as_tensors = make_views(
        images, specs, torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1), generator=gen()
    )
    for got, want in zip(as_tensors, views):
        torch.testing.assert_close(got, want)
    assert not torch.equal(views[0], expected.flip(-1))  # the identity view really is unflipped


def test_same_seed_same_views_other_seed_other_views() -> None:
    images = rand_images()
    specs = [STRONG, ViewSpec(size=8, blur_p=0.5)]
    first = make_views(images, specs, [0.5] * 3, [0.5] * 3, generator=gen(3))
    again = make_views(images, specs, [0.5] * 3, [0.5] * 3, generator=gen(3))
    other = make_views(images, specs, [0.5] * 3, [0.5] * 3, generator=gen(4))
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
    assert not torch.equal(first[0][:, :, :8, :8], first[1])  # two views of one call differ too


def test_views_ignore_and_keep_the_global_rng() -> None:
    images = rand_images()
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = make_views(images, [STRONG], [0.5] * 3, [0.5] * 3, generator=gen(7))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(12345)
    second = make_views(images, [STRONG], [0.5] * 3, [0.5] * 3, generator=gen(7))
    assert torch.equal(first[0], second[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_give_the_same_views() -> None:
    images = rand_images(batch=16, side=32)
    specs = [ViewSpec(size=24, blur_p=0.5, solarize_p=0.3), ViewSpec(size=12)]
    cpu = make_views(images, specs, [0.5] * 3, [0.5] * 3, generator=gen(5))
    cuda = make_views(images.cuda(), specs, [0.5] * 3, [0.5] * 3, generator=gen(5))
    for a, b in zip(cpu, cuda):
        assert b.is_cuda
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=0)


def test_grayscale_is_the_luma_formula() -> None:
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.2, 0.4, 0.6]]).T.reshape(1, 3, 2, 2)
    luma = torch.tensor([0.299, 0.587, 0.114, 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6]).reshape(1, 1, 2, 2)
    torch.testing.assert_close(grayscale(x), luma.expand(1, 3, 2, 2))
    gray = rand_float(channels=1)
    assert torch.equal(grayscale(gray), gray)


def test_solarize_by_hand() -> None:
    x = torch.tensor([0.0, 0.2, 0.5, 0.7, 1.0]).view(1, 1, 1, 5)
    torch.testing.assert_close(solarize(x, 0.5), torch.tensor([0.0, 0.2, 0.5, 0.3, 0.0]).view(1, 1, 1, 5))
    torch.testing.assert_close(solarize(x, 0.2), torch.tensor([0.0, 0.8, 0.5, 0.3, 0.0]).view(1, 1, 1, 5))  # >=
    torch.testing.assert_close(solarize(x, 0.8), x.clone().index_fill_(-1, torch.tensor([4]), 0.0))


def test_gaussian_blur_matches_torchvision_per_sample() -> None:
    x = rand_float(batch=4, channels=3, side=20)
    sigma = torch.tensor([0.3, 0.8, 1.5, 2.5])
    kernel_size = blur_kernel_size(2.5, 20, 20)
    assert kernel_size == 17
    blurred = gaussian_blur(x, sigma, kernel_size)
    for i, s in enumerate(sigma.tolist()):
        reference = TF.gaussian_blur(x[i : i + 1], [kernel_size, kernel_size], [s, s])
        torch.testing.assert_close(blurred[i : i + 1], reference, atol=1e-5, rtol=0)
    assert (blurred[3] - x[3]).abs().mean() > 0.1  # it does blur


def test_gaussian_blur_keeps_constants_and_means() -> None:
    constant = torch.full((3, 2, 12, 12), 0.37)
    torch.testing.assert_close(gaussian_blur(constant, torch.tensor([0.5, 1.0, 3.0])), constant)
    x = rand_float(batch=3, side=32)
    blurred = gaussian_blur(x, torch.tensor([0.5, 1.0, 2.0]))
    torch.testing.assert_close(blurred.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=5e-3, rtol=0)
    assert blurred.std() < x.std() * 0.7
    tiny = gaussian_blur(x, torch.tensor([1e-3, 0.0, 0.01]), 3)  # tiny sigmas: (nearly) the identity
    torch.testing.assert_close(tiny, x)


def test_blur_kernel_size_rule() -> None:
    assert blur_kernel_size(2.0, 224, 224) == 13  # 2 * ceil(6) + 1
    assert blur_kernel_size(0.01, 32, 32) == 3
    assert blur_kernel_size(0.0, 32, 32) == 3  # at least 3
    assert blur_kernel_size(10.0, 16, 20) == 15  # at most the largest odd side
    assert blur_kernel_size(10.0, 17, 20) == 17
    assert blur_kernel_size(1.0, 2, 2) == 1  # too small to blur


@pytest.mark.parametrize("factors", [(0.3, 1.6), (1.8, 0.0)])
@pytest.mark.parametrize(
    "name, reference",
    [("brightness", TF.adjust_brightness), ("contrast", TF.adjust_contrast), ("saturation", TF.adjust_saturation)],
)
def test_jitter_factors_match_torchvision(name: str, reference, factors: tuple[float, float]) -> None:
    x = rand_float(batch=2, side=10)
    out = color_jitter(x, **{name: torch.tensor(factors)})
    for i, factor in enumerate(factors):
        torch.testing.assert_close(out[i], reference(x[i], factor), atol=1e-3, rtol=0)
    assert not torch.allclose(out[0], x[0], atol=1e-2)


def test_contrast_on_one_channel_matches_torchvision() -> None:
    x = rand_float(batch=2, channels=1, side=10)
    out = color_jitter(x, contrast=torch.tensor([0.5, 1.5]), saturation=torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(out[0], TF.adjust_contrast(x[0], 0.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], TF.adjust_contrast(x[1], 1.5), atol=1e-6, rtol=0)


# NTSC RGB -> YIQ, written here independently of selfsight.data.views.
YIQ = np.array([[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]])


def yiq_hue_reference(rgb: np.ndarray, shift: float) -> np.ndarray:
    """float64 [3, H, W] -> [3, H, W]: to YIQ, rotate (I, Q) by -2 pi shift, back to RGB, clip to [0, 1]."""
    y, i, q = np.einsum("ij,jhw->ihw", YIQ, rgb)
    angle = -2 * math.pi * shift
    rotated = np.stack([y, i * math.cos(angle) - q * math.sin(angle), i * math.sin(angle) + q * math.cos(angle)])
    return np.clip(np.einsum("ij,jhw->ihw", np.linalg.inv(YIQ), rotated), 0, 1)


def test_hue_is_a_yiq_rotation_and_zero_is_the_identity() -> None:
    x = rand_float(batch=5, side=10)
    shifts = [-0.5, -0.1, 0.0, 0.2, 0.5]
    out = color_jitter(x, hue=torch.tensor(shifts))
    for i, shift in enumerate(shifts):
        expected = yiq_hue_reference(x[i].double().numpy(), shift)
        np.testing.assert_allclose(out[i].numpy(), expected, atol=1e-5, rtol=0)
    assert torch.equal(out[2], x[2])  # shift 0: exactly the identity, bit for bit
    assert torch.equal(hue_matrices(torch.zeros(2)), torch.eye(3).expand(2, 3, 3))
    assert (out[3] - x[3]).abs().max() > 0.05  # a real shift changes the image
    # the luma stays where nothing was clamped; the hue of a colour moves the way torchvision's does
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    muted = 0.4 + 0.2 * x[:1]  # muted colours stay inside the RGB cube
    turned = color_jitter(muted, hue=torch.tensor([0.3]))
    torch.testing.assert_close((turned * luma).sum(1), (muted * luma).sum(1), atol=1e-5, rtol=0)
    for colour in [(0.8, 0.3, 0.3), (0.3, 0.7, 0.4), (0.2, 0.3, 0.9)]:
        pixel = torch.tensor(colour).view(1, 3, 1, 1)
        for shift in (0.05, -0.05):
            ours = color_jitter(pixel, hue=torch.tensor([shift])).flatten().tolist()
            theirs = TF.adjust_hue(pixel[0], shift).flatten().tolist()
            moved = [((colorsys.rgb_to_hsv(*c)[0] - colorsys.rgb_to_hsv(*colour)[0] + 0.5) % 1) - 0.5
                     for c in (ours, theirs)]
            assert moved[0] * moved[1] > 0 and 0.5 < moved[0] / moved[1] < 2, (colour, shift, moved)


def test_views_do_not_depend_on_the_number_of_threads() -> None:
    """DataLoader workers build views with 1 thread, the training process with several: same bits."""
    images = rand_images(batch=20, side=72)  # chunks of 16 x 3 x 64 x 64 values: split between threads
    specs = [ViewSpec(size=64, blur_p=0.5, solarize_p=0.3), ViewSpec(size=48, jitter_p=1.0)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = make_views(images, specs, [0.5] * 3, [0.25] * 3, generator=gen(3))
        torch.set_num_threads(max(2, threads))
        several = make_views(images, specs, [0.5] * 3, [0.25] * 3, generator=gen(3))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, several))


def test_jitter_runs_in_the_given_order() -> None:
    x = rand_float(batch=1, side=10)
    factors = dict(brightness=torch.tensor([1.8]), contrast=torch.tensor([1.9]), saturation=torch.tensor([0.2]))
    factors["hue"] = torch.tensor([0.3])
    order = (3, 1, 0, 2)
    expected = x[0]
    yiq_hue = lambda image, shift: torch.from_numpy(yiq_hue_reference(image.double().numpy(), shift)).float()
    for index in order:
        name = ("brightness", "contrast", "saturation", "hue")[index]
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, yiq_hue)[index]
        expected = adjust(expected, float(factors[name][0]))
    torch.testing.assert_close(color_jitter(x, **factors, order=order)[0], expected, atol=1e-3, rtol=0)
    other_order = color_jitter(x, **factors, order=(0, 1, 2, 3))[0]
    assert (other_order - expected).abs().max() > 1e-2  # the order matters, so the test above can fail


def test_apply_where_changes_only_chosen_samples() -> None:
    x = rand_float(batch=5)
    chosen = torch.tensor([True, False, True, False, False])
    out = apply_where(x, chosen, lambda sub: sub * 0 + sub.shape[0])
    assert torch.equal(out[~chosen], x[~chosen])
    assert torch.equal(out[chosen], torch.full_like(x[chosen], 2.0))
    assert apply_where(x, torch.zeros(5, dtype=torch.bool), lambda sub: sub + 1) is x
    assert torch.equal(apply_where(x, torch.ones(5, dtype=torch.bool), lambda sub: sub + 1), x + 1)


def test_coins_at_zero_and_one() -> None:
    assert not sample_coins(1000, 0.0, generator=gen()).any()
    assert sample_coins(1000, 1.0, generator=gen()).all()
    half = sample_coins(1000, 0.5, generator=gen()).float().mean()
    assert 0.4 < half < 0.6


OPS = {
    "jitter": dict(jitter_p=1.0),
    "grayscale": dict(grayscale_p=1.0),
    "blur": dict(blur_p=1.0, blur_sigma=(1.0, 2.0)),
    "solarize": dict(solarize_p=1.0, solarize_threshold=0.3),
    "hflip": dict(hflip_p=1.0),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_probability_one_applies_to_every_sample_and_zero_to_none(op: str) -> None:
    x = rand_float(batch=8, side=16)
    off = make_view(x, ViewSpec(size=16, **IDENTITY), generator=gen())
    torch.testing.assert_close(off, x, atol=1e-5, rtol=0)
    on = make_view(x, ViewSpec(size=16, **{**IDENTITY, **OPS[op]}), generator=gen())
    changed = (on - x).abs().amax(dim=(1, 2, 3)) > 1e-3
    assert changed.all(), f"{op} with p=1 left samples unchanged: {changed}"


def test_ops_apply_exactly_to_the_samples_whose_coin_came_up() -> None:
    x = rand_float(batch=32, side=16)
    spec = ViewSpec(size=16, **{**IDENTITY, "grayscale_p": 0.5, "solarize_p": 0.5, "blur_p": 0.5})
    params = sample_view(32, 16, 16, spec, generator=gen(2))
    gray, blur, solar = params.grayscale_on, params.blur_on, params.solarize_on
    assert all(0 < coins.sum() < 32 for coins in (gray, blur, solar))
    expected = x.clone()
    expected[gray] = grayscale(x[gray])
    expected[blur] = gaussian_blur(
        expected[blur], params.blur_sigma[blur], blur_kernel_size(spec.blur_sigma[1], 16, 16)
    )
    expected[solar] = solarize(expected[solar], 0.5)
    torch.testing.assert_close(apply_view(x, params, spec), expected, atol=1e-5, rtol=0)
    untouched = ~(gray | blur | solar)
    torch.testing.assert_close(apply_view(x, params, spec)[untouched], x[untouched], atol=1e-5, rtol=0)


def test_jitter_with_p_one_uses_the_sampled_factors() -> None:
    x = rand_float(batch=4, side=16)
    spec = ViewSpec(size=16, **{**IDENTITY, "jitter_p": 1.0})
    params = sample_view(4, 16, 16, spec, generator=gen(9))
    jitter = params.jitter
    expected = color_jitter(x, jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue, jitter.order)
    torch.testing.assert_close(apply_view(x, params, spec), expected, atol=1e-5, rtol=0)
    assert sorted(jitter.order) == [0, 1, 2, 3]
    assert jitter.brightness.min() >= 0.6 and jitter.brightness.max() <= 1.4
    assert jitter.hue.abs().max() <= 0.1


def test_adapt_spec_for_one_channel() -> None:
    spec = ViewSpec(size=224, blur_p=1.0)
    gray = adapt_spec(spec, in_chans=1, source_size=256)
    assert (gray.saturation, gray.hue, gray.grayscale_p) == (0.0, 0.0, 0.0)
    assert (gray.brightness, gray.contrast, gray.crop_scale) == (0.4, 0.4, (0.08, 1.0))
    color = adapt_spec(spec, in_chans=3, source_size=256)
    assert (color.saturation, color.hue, color.grayscale_p) == (0.4, 0.1, 0.2)
    assert spec.saturation == 0.4  # the input is unchanged


def test_adapt_spec_for_small_images() -> None:
    small = adapt_spec(ViewSpec(size=32, blur_p=1.0), in_chans=3, source_size=32)
    assert small.crop_scale == (0.2, 1.0)
    np.testing.assert_allclose(small.blur_sigma, (0.1 * 32 / 224, 2.0 * 32 / 224))
    big = adapt_spec(ViewSpec(size=224), in_chans=3, source_size=256)
    assert big.crop_scale == (0.08, 1.0) and big.blur_sigma == pytest.approx((0.1, 2.0))
    assert adapt_spec(ViewSpec(size=96), 3, source_size=32).crop_scale == (0.2, 1.0)  # small source
    assert adapt_spec(ViewSpec(size=32, crop_scale=(0.3, 1.0)), 3, 32).crop_scale == (0.3, 1.0)
    assert adapt_spec(ViewSpec(size=32, crop_scale=(0.05, 0.14)), 3, 32).crop_scale == (0.2, 0.2)
    half = adapt_spec(ViewSpec(size=112), 3, 224)
    assert half.blur_sigma == pytest.approx((0.05, 1.0)) and half.crop_scale == (0.08, 1.0)
    # the small variant still makes valid views
    view = make_view(rand_float(side=32), dataclasses.replace(small, solarize_p=1.0), generator=gen())
    assert view.shape == (6, 3, 32, 32)


@pytest.mark.parametrize("channels, mode", [(3, "RGB"), (1, "L")])
def test_save_view_grid_writes_an_aligned_png(tmp_path, channels: int, mode: str) -> None:
    images = rand_images(batch=3, channels=channels, side=10)
    mean, std = [0.5] * channels, [0.25] * channels
    views = make_views(images, [ViewSpec(size=10, **IDENTITY), ViewSpec(size=14)], mean, std, generator=gen())
    path = save_view_grid(images, views, mean, std, tmp_path / "deep" / "grid.png")
    assert path == tmp_path / "deep" / "grid.png"
    with Image.open(path) as png:
        assert png.mode == mode
        assert png.size == (3 * (14 + 2) + 2, 3 * (14 + 2) + 2)  # 3 columns and 3 rows of 14 px cells, 2 px gaps
    small = save_view_grid(images, views[:1], mean, std, tmp_path / "small.png", max_images=2)
    with Image.open(small) as png:
        pixels = np.asarray(png)
        assert png.size == (2 * 12 + 2, 2 * 12 + 2)
    first_cell = pixels[2:12, 2:12]
    original = images[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(first_cell, original[:, :, 0] if channels == 1 else original)
    np.testing.assert_allclose(pixels[2:12, 14:24].astype(float), first_cell.astype(float), atol=1)  # identity view
    assert (pixels[:2] == 255).all() and (pixels[12:14] == 255).all()  # white gaps


def test_crop_and_resize_flip_equals_mirroring_the_crop():
    """The flip folded into the sampling grid gives the mirrored crop, sample by sample."""
    from selfsight.data.augment import crop_and_resize, hflip_where

    x = torch.rand(6, 3, 40, 50, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[3.0, 5.0, 30.0, 20.0], [0.0, 0.0, 50.0, 40.0], [10.5, 2.25, 17.0, 33.0]] * 2)
    flip = torch.tensor([True, False, True, True, False, True])
    folded = crop_and_resize(x, boxes, 24, flip)
    torch.testing.assert_close(folded, hflip_where(crop_and_resize(x, boxes, 24), flip), rtol=0, atol=1e-6)
    torch.testing.assert_close(folded[1], crop_and_resize(x, boxes, 24)[1], rtol=0, atol=0)
    assert not torch.allclose(folded[0], crop_and_resize(x, boxes, 24)[0])
