"""Multi-view augmentation of the contrastive methods (SimCLR, MoCo, BYOL, MoBY, DINO), batched.

A `ViewSpec` is one view's recipe: random resized crop -> horizontal flip -> color jitter ->
grayscale -> gaussian blur -> solarize, each with a per-sample probability. As in `augment.py`,
every random step is split in two: `sample_*` draws the per-sample parameters from an explicit
CPU `torch.Generator` (the same seed gives the same views on CPU and CUDA, and the global torch
RNG is never used), and a deterministic function applies them in batched ops on the tensor's
device. Ops with a coin run only on the samples whose coin came up (`apply_where`). Under data
parallelism every `sample_*` draws for the global batch and keeps this rank's rows
(`selfsight.distributed.draw_rows`), so each rank gets its slice of a 1-process run's views.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from selfsight.data.augment import crop_and_resize, normalize, sample_crop_boxes, sample_flips, to_float
from selfsight.distributed import draw_rows

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma weights of R, G, B (torchvision uses 0.2989 for R)
_MIN_SIGMA = 1e-4  # smaller blur sigmas are treated as this: the kernel is then exactly [0, ..., 1, ..., 0]
_GRID_GAP = 2  # pixels between the cells of save_view_grid, and around them


@dataclass(frozen=True)
class ViewSpec:
    """One view's recipe; probabilities are per sample."""

    size: int  # output side in pixels
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    jitter_p: float = 0.8  # probability of applying color jitter
    brightness: float = 0.4  # factor drawn from U[max(0,1-b), 1+b], as torchvision
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1  # hue shift drawn from U[-h, h] (fraction of a turn)
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels AT 224 px; scaled by size/224 by adapt_spec
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5  # on [0, 1] images


def adapt_spec(spec: ViewSpec, in_chans: int, source_size: int) -> ViewSpec:
    """The variant of a paper recipe for `in_chans`-channel images of side `source_size`. Call it once per spec.

    Rules:
    - in_chans == 1: saturation, hue and grayscale_p become 0 (no-ops on gray images; skipping saves work).
    - blur_sigma is multiplied by spec.size / 224: the papers' sigmas are in pixels of 224 px views.
      A tiny sigma still works (the kernel tends to the identity).
    - when min(spec.size, source_size) <= 64 and crop_scale[0] < 0.2, crop_scale becomes
      (0.2, max(0.2, crop_scale[1])): tiny crops of tiny images (or of tiny views) are noise.
    Returns a new ViewSpec; `spec` is unchanged.
    """
    if in_chans < 1 or source_size < 1:
        raise ValueError(f"adapt_spec needs in_chans >= 1 and source_size >= 1, got {in_chans} and {source_size}")
    changes: dict[str, object] = {}
    if in_chans == 1:
        changes.update(saturation=0.0, hue=0.0, grayscale_p=0.0)
    scale = spec.size / 224
    changes["blur_sigma"] = (spec.blur_sigma[0] * scale, spec.blur_sigma[1] * scale)
    if min(spec.size, source_size) <= 64 and spec.crop_scale[0] < 0.2:
        changes["crop_scale"] = (0.2, max(0.2, spec.crop_scale[1]))
    return dataclasses.replace(spec, **changes)


def sample_coins(batch_size: int, p: float, *, generator: torch.Generator) -> torch.Tensor:
    """bool [B] on the CPU: True with probability p (rand < p, so p=0 never and p=1 always)."""
    rows, mine = draw_rows(batch_size)
    return torch.rand(rows, generator=generator)[mine] < p


def apply_where(x: torch.Tensor, chosen: torch.Tensor, op: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """op on the samples where chosen is True, the others unchanged. x: [B, ...]; chosen: bool [B] (CPU).

    op gets only the chosen samples, [N, ...] in batch order, and returns that shape.
    No device sync when chosen is on the CPU.
    """
    chosen = chosen.cpu()
    if not bool(chosen.any()):
        return x
    if bool(chosen.all()):
        return op(x)
    index = chosen.nonzero().squeeze(1).to(x.device)
    return x.index_copy(0, index, op(x.index_select(0, index)))


def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, 1] with x's device and dtype."""
    return values.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma 0.299 R + 0.587 G + 0.114 B on every channel. x: [B, 3, H, W] -> [B, 3, H, W] (1 ch: as is)."""
    if x.shape[1] == 1:
        return x
    return _luma(x).repeat(1, x.shape[1], 1, 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        raise ValueError(f"grayscale needs 1 or 3 channels, got {x.shape[1]}")
    red, green, blue = x.unbind(dim=1)
    return (_LUMA[0] * red + _LUMA[1] * green + _LUMA[2] * blue).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1]; factor: [B]."""
    factor = _per_sample(factor, x)
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x * factor, clamped. x: [B, C, H, W] in [0, 1]; factor: [B]."""
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the per-image mean of the gray image (of all channels when C != 3), clamped. factor: [B]."""
    gray = _luma(x) if x.shape[1] == 3 else x
    return _blend(x, gray.mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the gray image, clamped. x: [B, 3, H, W] (1 channel: returned as is); factor: [B]."""
    if x.shape[1] == 1:
        return x
    return _blend(x, _luma(x), factor)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """x: RGB [B, 3, H, W] in [0, 1] -> HSV [B, 3, H, W], hue in [0, 1) (0 where the pixel is gray)."""
    red, green, blue = x.unbind(dim=1)
    value = x.amax(dim=1)
    delta = value - x.amin(dim=1)
    saturation = delta / torch.where(value > 0, value, torch.ones_like(value))
    safe_delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(
        value == red,
        ((green - blue) / safe_delta) % 6,
        torch.where(value == green, (blue - red) / safe_delta + 2, (red - green) / safe_delta + 4),
    )
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue)) % 1
    return torch.stack([hue, saturation, value], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """x: HSV [B, 3, H, W] (hue in [0, 1)) -> RGB [B, 3, H, W] in [0, 1].

    R, G, B = V - V S clamp(min(k, 4 - k), 0, 1) with k = (m + 6 H) mod 6 for m = 5, 3, 1."""
    hue, saturation, value = x.unbind(dim=1)
    offsets = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = (offsets + 6 * hue.unsqueeze(1)) % 6
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return value.unsqueeze(1) * (1 - saturation.unsqueeze(1) * ramp)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotates the hue by shift turns (in [-0.5, 0.5]). x: [B, 3, H, W] (1 channel: as is); shift: [B]."""
    if x.shape[1] == 1:
        return x
    hsv = rgb_to_hsv(x)
    hue = (hsv[:, :1] + _per_sample(shift, x)) % 1
    return hsv_to_rgb(torch.cat([hue, hsv[:, 1:]], dim=1))


@dataclass(frozen=True)
class JitterFactors:
    """Per-sample color-jitter parameters: float32 [B] each on the CPU, None where that op is off.

    order: the order in which the ops run (0 brightness, 1 contrast, 2 saturation, 3 hue), ONE
    permutation per batch (torchvision's ColorJitter draws one per call; here a call is a batch).
    """

    brightness: torch.Tensor | None
    contrast: torch.Tensor | None
    saturation: torch.Tensor | None
    hue: torch.Tensor | None
    order: tuple[int, ...]

    def select(self, chosen: torch.Tensor) -> JitterFactors:
        """The factors of the samples where chosen (bool [B]) is True."""
        pick = lambda values: None if values is None else values[chosen]
        return JitterFactors(
            *(pick(f) for f in (self.brightness, self.contrast, self.saturation, self.hue)), self.order
        )

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """color_jitter with these factors and order. x: [B, C, H, W] -> [B, C, H, W]."""
        return color_jitter(x, self.brightness, self.contrast, self.saturation, self.hue, self.order)


def sample_jitter(batch_size: int, spec: ViewSpec, *, generator: torch.Generator) -> JitterFactors:
    """Factors as torchvision's ColorJitter draws them, per sample: brightness, contrast and saturation
    from U[max(0, 1 - s), 1 + s], hue from U[-h, h]; an op whose strength is 0 is off (None).

    Always draws B x 4 uniforms and one permutation of 4 from the CPU generator, whatever the spec.
    """
    if not 0 <= spec.hue <= 0.5:
        raise ValueError(f"hue must be in [0, 0.5], got {spec.hue}")
    rows, mine = draw_rows(batch_size)
    uniform = torch.rand(rows, 4, generator=generator)[mine]
    order = tuple(torch.randperm(4, generator=generator).tolist())

    def factor(column: int, strength: float) -> torch.Tensor | None:
        low = max(0.0, 1.0 - strength)
        return low + (1.0 + strength - low) * uniform[:, column] if strength > 0 else None

    hue = (2 * uniform[:, 3] - 1) * spec.hue if spec.hue > 0 else None
    return JitterFactors(factor(0, spec.brightness), factor(1, spec.contrast), factor(2, spec.saturation), hue, order)


def color_jitter(
    x: torch.Tensor,
    brightness: torch.Tensor | None = None,
    contrast: torch.Tensor | None = None,
    saturation: torch.Tensor | None = None,
    hue: torch.Tensor | None = None,
    order: Sequence[int] = (0, 1, 2, 3),
) -> torch.Tensor:
    """torchvision's ColorJitter on float images with per-sample factors, in the given op order.

    x: [B, C, H, W] in [0, 1]; factors: [B] each or None (skipped); order: indices into
    (brightness, contrast, saturation, hue). Saturation and hue are skipped on 1-channel images.
    Returns [B, C, H, W] in [0, 1].
    """
    factors = (brightness, contrast, saturation, hue)
    adjusts = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for index in order:
        if factors[index] is not None:
            x = adjusts[index](x, factors[index])
    return x


def blur_kernel_size(sigma_max: float, height: int, width: int) -> int:
    """Odd kernel side covering 3 sigma each way: 2 ceil(3 sigma_max) + 1, at least 3, at most the
    largest odd number <= min(height, width) (1, the identity, for images under 3 px)."""
    largest = min(height, width)
    largest -= 1 - largest % 2
    return max(1, min(max(3, 2 * math.ceil(3 * sigma_max) + 1), largest))


def sample_blur_sigma(batch_size: int, sigma: tuple[float, float], *, generator: torch.Generator) -> torch.Tensor:
    """float32 [B] on the CPU, uniform in [sigma[0], sigma[1]] (as torchvision's GaussianBlur)."""
    rows, mine = draw_rows(batch_size)
    return torch.empty(rows).uniform_(sigma[0], sigma[1], generator=generator)[mine]


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """sigma: [B] -> normalised 1-D gaussian kernels [B, kernel_size] centred on kernel_size // 2."""
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sigma.device)
    weights = torch.exp(-0.5 * (offsets / sigma.float().clamp(min=_MIN_SIGMA).unsqueeze(1)) ** 2)
    return weights / weights.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int | None = None) -> torch.Tensor:
    """Separable gaussian blur with one sigma per sample, reflect padding (as torchvision).

    x: float [B, C, H, W]; sigma: [B] in pixels; kernel_size: odd, < 2 min(H, W); default
    blur_kernel_size(max sigma, H, W). One grouped conv per axis over the flattened [1, B*C, H, W].
    """
    batch, channels, height, width = x.shape
    if kernel_size is None:
        kernel_size = blur_kernel_size(float(sigma.max()), height, width)
    if kernel_size % 2 == 0 or kernel_size // 2 >= min(height, width):
        raise ValueError(f"kernel_size must be odd and < 2 * min(H, W), got {kernel_size} for {height}x{width}")
    if kernel_size == 1 or batch == 0:
        return x
    radius = kernel_size // 2
    weights = gaussian_kernels(sigma, kernel_size).to(device=x.device, dtype=x.dtype)
    weights = weights.repeat_interleave(channels, dim=0)  # [B*C, k]
    groups = batch * channels
    flat = F.pad(x.reshape(1, groups, height, width), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, weights.view(groups, 1, 1, kernel_size), groups=groups)
    flat = F.conv2d(flat, weights.view(groups, 1, kernel_size, 1), groups=groups)
    return flat.view(batch, channels, height, width)


def solarize(x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """1 - x where x >= threshold, else x. x: [B, C, H, W] in [0, 1]."""
    return torch.where(x >= threshold, 1 - x, x)


@dataclass(frozen=True)
class ViewParams:
    """Everything random about one view of a batch, on the CPU: boxes float32 [B, 4]
    (left, top, width, height); the coins bool [B]; blur_sigma float32 [B] in output pixels."""

    boxes: torch.Tensor
    flip: torch.Tensor
    jitter_on: torch.Tensor
    jitter: JitterFactors
    grayscale_on: torch.Tensor
    blur_on: torch.Tensor
    blur_sigma: torch.Tensor
    solarize_on: torch.Tensor


def sample_view(batch_size: int, height: int, width: int, spec: ViewSpec, *, generator: torch.Generator) -> ViewParams:
    """One view's parameters for B images of height x width, drawn from a CPU generator, always in the
    same order and number whatever the probabilities."""
    boxes = sample_crop_boxes(batch_size, height, width, spec.crop_scale, spec.crop_ratio, generator=generator)
    flip = sample_flips(batch_size, spec.hflip_p, generator=generator)
    jitter_on = sample_coins(batch_size, spec.jitter_p, generator=generator)
    jitter = sample_jitter(batch_size, spec, generator=generator)
    grayscale_on = sample_coins(batch_size, spec.grayscale_p, generator=generator)
    blur_on = sample_coins(batch_size, spec.blur_p, generator=generator)
    blur_sigma = sample_blur_sigma(batch_size, spec.blur_sigma, generator=generator)
    solarize_on = sample_coins(batch_size, spec.solarize_p, generator=generator)
    return ViewParams(boxes, flip, jitter_on, jitter, grayscale_on, blur_on, blur_sigma, solarize_on)


def apply_view(x: torch.Tensor, params: ViewParams, spec: ViewSpec) -> torch.Tensor:
    """x: float [B, C, H, W] in [0, 1] -> [B, C, spec.size, spec.size] in [0, 1]: crop -> hflip -> color jitter
    -> grayscale -> blur (kernel size from spec.blur_sigma[1]) -> solarize."""
    view = crop_and_resize(x, params.boxes, spec.size, params.flip)
    view = apply_where(view, params.jitter_on, params.jitter.select(params.jitter_on).apply)
    if view.shape[1] != 1:
        view = apply_where(view, params.grayscale_on, grayscale)
    kernel_size = blur_kernel_size(spec.blur_sigma[1], spec.size, spec.size)
    sigma = params.blur_sigma[params.blur_on]
    view = apply_where(view, params.blur_on, lambda chosen: gaussian_blur(chosen, sigma, kernel_size).clamp(0, 1))
    return apply_where(view, params.solarize_on, lambda chosen: solarize(chosen, spec.solarize_threshold))


def make_view(x: torch.Tensor, spec: ViewSpec, *, generator: torch.Generator) -> torch.Tensor:
    """x: float [B, C, H, W] in [0, 1] (any device) -> float [B, C, spec.size, spec.size] in [0, 1].
    generator: a CPU torch.Generator, the only source of randomness (see sample_view, apply_view)."""
    if not x.is_floating_point():
        raise TypeError(f"make_view needs a float tensor in [0, 1], got {x.dtype} (use to_float first)")
    params = sample_view(x.shape[0], x.shape[2], x.shape[3], spec, generator=generator)
    return apply_view(x, params, spec)


def make_views(
    images: torch.Tensor,
    specs: Sequence[ViewSpec],
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    *,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """images: uint8 [B, C, H, W] (or float in [0, 1]), any device -> one normalised float32 view
    [B, C, s, s] per spec, in order. mean, std: C values or [1, C, 1, 1]; generator: CPU, used spec by spec."""
    x = to_float(images) if images.dtype == torch.uint8 else images.float()
    return [normalize(make_view(x, spec, generator=generator), mean, std) for spec in specs]


def save_view_grid(
    images: torch.Tensor,
    views: Sequence[torch.Tensor],
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    path: str | Path,
    max_images: int = 8,
) -> Path:
    """Writes a PNG grid: one row per image (the first max_images), the original uint8 [B, C, H, W]
    then each normalised view [B, C, s, s] un-normalised to [0, 1]. Cells are square, of side the
    largest side of all of them (smaller ones resized, nearest), with 2 px of white between and
    around them. 1 channel: gray PNG; 3: RGB; other counts: the channel mean as gray. Returns the path.
    """
    rows = min(images.shape[0], max_images)
    original = images[:rows].detach().cpu()
    original = original.float() / 255 if original.dtype == torch.uint8 else original.float().clamp(0, 1)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device="cpu").reshape(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device="cpu").reshape(1, -1, 1, 1)
    cells = [original] + [(view[:rows].detach().cpu().float() * std_t + mean_t).clamp(0, 1) for view in views]
    side = max(max(cell.shape[-2:]) for cell in cells)
    cells = [cell if cell.shape[-2:] == (side, side) else F.interpolate(cell, size=(side, side)) for cell in cells]
    channels, pitch = original.shape[1], side + _GRID_GAP
    grid = torch.stack([F.pad(cell, (0, _GRID_GAP, 0, _GRID_GAP), value=1.0) for cell in cells], dim=1)
    grid = grid.permute(2, 0, 3, 1, 4).reshape(channels, rows * pitch, len(cells) * pitch)  # [C, rows, s, cols, s]
    grid = F.pad(grid, (_GRID_GAP, 0, _GRID_GAP, 0), value=1.0)
    if channels != 3:
        grid = grid.mean(dim=0, keepdim=True)
    pixels = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels[:, :, 0] if channels != 3 else pixels).save(path, format="PNG")
    return path
