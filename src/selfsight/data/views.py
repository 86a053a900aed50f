"""Multi-view augmentation of the contrastive methods (SimCLR, MoCo, BYOL, MoBY, DINO), batched.

A `ViewSpec` is one view's recipe: random resized crop -> horizontal flip -> color jitter ->
grayscale -> gaussian blur -> solarize, each with a per-sample probability. As in `augment.py`,
every random step is split in two: `sample_*` draws the per-sample parameters from an explicit
CPU `torch.Generator` (the same seed gives the same views on CPU and CUDA, and the global torch
RNG is never used), and a deterministic function applies them in batched ops on the tensor's
device. Ops with a coin run only on the samples whose coin came up (`apply_where`). Under data
parallelism every `sample_*` draws for the global batch and keeps this rank's rows
(`selfsight.distributed.draw_rows`), so each rank gets its slice of a 1-process run's views.

Cost on the CPU (where DataLoader workers run this, see `worker_views.py`): the hue step is a rotation in
YIQ space, one 3x3 matrix per image (`adjust_hue`; torchvision rotates in HSV), the jitter runs in place
on the whole batch with neutral factors for the samples whose coin did not come up, and `make_views`
goes through the batch in chunks of `CPU_CHUNK` images. No op fuses a multiply and an add, so the views
are the same bits whatever the number of threads (1 in a worker, several in the training process).
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

from selfsight.data.augment import crop_and_resize, sample_crop_boxes, sample_flips, to_float
from selfsight.distributed import draw_rows

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma weights of R, G, B (torchvision uses 0.2989 for R)
_MIN_SIGMA = 1e-4  # smaller blur sigmas are treated as this: the kernel is then exactly [0, ..., 1, ..., 0]
_GRID_GAP = 2  # pixels between the cells of save_view_grid, and around them
#: images per chunk when make_views runs on the CPU (16 RGB 224-px float images: 9.6 MB per temporary)
CPU_CHUNK = 16


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


def apply_where(
    x: torch.Tensor, chosen: torch.Tensor, op: Callable[[torch.Tensor], torch.Tensor], *, in_place: bool = False
) -> torch.Tensor:
    """op on the samples where chosen is True, the others unchanged. x: [B, ...]; chosen: bool [B] (CPU).

    op gets only the chosen samples, [N, ...] in batch order, and returns that shape.
    No device sync when chosen is on the CPU.
    ``in_place``: write the chosen samples back into x (which the caller owns), no copy of the others.
    """
    chosen = chosen.cpu()
    if not bool(chosen.any()):
        return x
    if bool(chosen.all()):
        return op(x)
    index = chosen.nonzero().squeeze(1).to(x.device)
    copy = x.index_copy_ if in_place else x.index_copy
    return copy(0, index, op(x.index_select(0, index)))


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


def _luma_of(x: torch.Tensor) -> torch.Tensor:
    """The gray image [B, 1, H, W] of x [B, C, H, W]: the luma of 3 channels, x itself for 1."""
    return _luma(x) if x.shape[1] == 3 else x


# In-place forms of the jitter ops: x [B, C, H, W] in [0, 1], owned by the caller, is overwritten (the
# result is returned). Each multiplication and addition is its own op (no fused multiply-add), so the
# result does not depend on how the work is split between threads or vector lanes.


def _brightness_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x.mul_(_per_sample(factor, x)).clamp_(0, 1)


def _contrast_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = _per_sample(factor, x)
    mean = _luma_of(x).mean(dim=(1, 2, 3), keepdim=True)
    return x.mul_(factor).add_((1 - factor) * mean).clamp_(0, 1)


def _saturation_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    factor = _per_sample(factor, x)
    gray = _luma(x).mul_(1 - factor)
    return x.mul_(factor).add_(gray).clamp_(0, 1)


def _hue_(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return apply_color_matrices(x, hue_matrices(shift)).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x * factor, clamped. x: [B, C, H, W] in [0, 1]; factor: [B]."""
    return _brightness_(x.clone(), factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the per-image mean of the gray image (of all channels when C != 3), clamped. factor: [B]."""
    return _contrast_(x.clone(), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the gray image, clamped. x: [B, 3, H, W] (1 channel: returned as is); factor: [B]."""
    return _saturation_(x.clone(), factor)


# RGB -> YIQ (FCC NTSC): Y is the luma of `_LUMA`; the I and Q rows sum to 0, so a gray pixel has I = Q = 0.
_RGB_TO_YIQ = (_LUMA, (0.5959, -0.2746, -0.3213), (0.2115, -0.5227, 0.3112))


def hue_matrices(shift: torch.Tensor) -> torch.Tensor:
    """The RGB -> RGB hue rotations for shifts of `shift` turns: float32 [B, 3, 3] on shift's device.

    M = T^-1 R T with T RGB -> YIQ and R the rotation of the (I, Q) plane by -2 pi shift (the sign makes a
    positive shift turn red towards yellow, as HSV's hue shift does), written as
    M = Id + (cos - 1) (Id - 1 w^T) + sin T^-1 J T (w: the luma weights, J: the 90-degree turn of (I, Q)),
    so a shift of 0 gives exactly the identity. Computed in float64, returned as float32.
    """
    yiq = torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)
    turn = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    chroma = torch.eye(3, dtype=torch.float64) - torch.ones(3, 1, dtype=torch.float64) * yiq[:1]  # Id - 1 w^T
    quarter = torch.linalg.inv(yiq) @ turn @ yiq
    angle = -2 * math.pi * shift.detach().to("cpu", torch.float64).view(-1, 1, 1)
    matrices = torch.eye(3, dtype=torch.float64) + (angle.cos() - 1) * chroma + angle.sin() * quarter
    return matrices.to(device=shift.device, dtype=torch.float32)


def apply_color_matrices(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Per-image linear colour map: out[b, i] = sum_j matrices[b, i, j] x[b, j]. x: [B, 3, H, W];
    matrices: [B, 3, 3] -> new [B, 3, H, W]. Plain multiplications and additions (no fused multiply-add),
    summed over j in order, so an identity matrix gives x exactly."""
    m = matrices.to(device=x.device, dtype=x.dtype).view(-1, 3, 3, 1, 1)
    out = x[:, 0:1] * m[:, :, 0]
    term = torch.empty_like(out)
    for j in (1, 2):
        out.add_(torch.mul(x[:, j : j + 1], m[:, :, j], out=term))
    return out


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotates the hue by shift turns (in [-0.5, 0.5]) in YIQ space, then clamps to [0, 1].
    x: [B, 3, H, W] in [0, 1] (1 channel: as is); shift: [B].

    Not torchvision's HSV hue: a rotation of the chroma plane (I, Q) keeps the luma and the chroma's size and
    costs one 3x3 matrix per image (`hue_matrices`) instead of an RGB -> HSV -> RGB round trip (about 10x
    faster on CPU). The HSV hue of a pixel moves the same way as with torchvision's, by about 0.75 to 1.5
    times as far depending on the colour (YIQ angles are not HSV hues), so pixel values differ by up to a
    few tenths at strong shifts; the YIQ result can leave the RGB cube (then clamped). A shift of 0
    returns x exactly.
    """
    return _hue_(x.clone(), shift)


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

    def _map(self, fn: Callable[[torch.Tensor, float], torch.Tensor]) -> JitterFactors:
        neutral = (1.0, 1.0, 1.0, 0.0)
        values = (self.brightness, self.contrast, self.saturation, self.hue)
        return JitterFactors(*(None if v is None else fn(v, n) for v, n in zip(values, neutral)), self.order)

    def select(self, chosen: torch.Tensor) -> JitterFactors:
        """The factors of the samples where chosen (bool [B]) is True."""
        return self._map(lambda values, _: values[chosen])

    def rows(self, part: slice) -> JitterFactors:
        """The factors of samples part.start .. part.stop - 1."""
        return self._map(lambda values, _: values[part])

    def only(self, chosen: torch.Tensor) -> JitterFactors:
        """These factors where chosen (bool [B]) is True and the neutral ones (1, 1, 1, hue 0), which leave an
        image in [0, 1] unchanged, elsewhere: every sample can then go through the same batched ops."""
        return self._map(lambda values, neutral: torch.where(chosen, values, torch.full_like(values, neutral)))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """color_jitter with these factors and order. x: [B, C, H, W] -> [B, C, H, W]."""
        return color_jitter(x, self.brightness, self.contrast, self.saturation, self.hue, self.order)

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """Like `apply`, overwriting x (which the caller owns); returns the result."""
        return _color_jitter_(x, (self.brightness, self.contrast, self.saturation, self.hue), self.order)


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


def _color_jitter_(x: torch.Tensor, factors: Sequence[torch.Tensor | None], order: Sequence[int]) -> torch.Tensor:
    adjusts = (_brightness_, _contrast_, _saturation_, _hue_)
    for index in order:
        if factors[index] is not None:
            x = adjusts[index](x, factors[index])
    return x


def color_jitter(
    x: torch.Tensor,
    brightness: torch.Tensor | None = None,
    contrast: torch.Tensor | None = None,
    saturation: torch.Tensor | None = None,
    hue: torch.Tensor | None = None,
    order: Sequence[int] = (0, 1, 2, 3),
) -> torch.Tensor:
    """torchvision's ColorJitter on float images with per-sample factors, in the given op order, except
    that the hue step is a rotation in YIQ space (see `adjust_hue`).

    x: [B, C, H, W] in [0, 1] (not modified); factors: [B] each or None (skipped); order: indices into
    (brightness, contrast, saturation, hue). Saturation and hue are skipped on 1-channel images.
    Returns a new [B, C, H, W] in [0, 1].
    """
    return _color_jitter_(x.clone(), (brightness, contrast, saturation, hue), order)


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

    def rows(self, start: int, stop: int) -> ViewParams:
        """The parameters of samples start .. stop - 1."""
        part = slice(start, stop)
        return ViewParams(self.boxes[part], self.flip[part], self.jitter_on[part], self.jitter.rows(part),
                          self.grayscale_on[part], self.blur_on[part], self.blur_sigma[part], self.solarize_on[part])


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
    """x: float [B, C, H, W] in [0, 1] (not modified) -> new [B, C, spec.size, spec.size] in [0, 1]: crop ->
    hflip -> color jitter -> grayscale -> blur (kernel size from spec.blur_sigma[1]) -> solarize.

    The jitter runs on the whole batch with neutral factors for the samples whose coin did not come up
    (`JitterFactors.only`), in place on the crop: no gather and scatter of the chosen samples.
    """
    view = crop_and_resize(x, params.boxes, spec.size, params.flip)
    if bool(params.jitter_on.any()):
        view = params.jitter.only(params.jitter_on).apply_(view)
    if view.shape[1] != 1:
        view = apply_where(view, params.grayscale_on, grayscale, in_place=True)
    kernel_size = blur_kernel_size(spec.blur_sigma[1], spec.size, spec.size)
    sigma = params.blur_sigma[params.blur_on]
    view = apply_where(
        view, params.blur_on, lambda chosen: gaussian_blur(chosen, sigma, kernel_size).clamp_(0, 1), in_place=True
    )
    return apply_where(
        view, params.solarize_on, lambda chosen: solarize(chosen, spec.solarize_threshold), in_place=True
    )


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
    out: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """images: uint8 [B, C, H, W] (or float in [0, 1]), any device -> one normalised float32 view
    [B, C, s, s] per spec, in order. mean, std: C values or [1, C, 1, 1]; generator: CPU, used spec by spec
    (all of a view's parameters, then the next view's). out: optional float32 [B, C, s, s] per spec to
    write the views into (e.g. in shared memory); returned then.

    On the CPU the images go through in chunks of `CPU_CHUNK` (the temporaries stay in cache and the
    allocator reuses them); on other devices as one batch. Autocast is off: the views are float32
    whatever the training precision, so they do not depend on where (which process) they are built.
    """
    batch = images.shape[0]
    params = [sample_view(batch, images.shape[2], images.shape[3], spec, generator=generator) for spec in specs]
    views = list(out) if out is not None else [
        torch.empty((batch, images.shape[1], spec.size, spec.size), dtype=torch.float32, device=images.device)
        for spec in specs
    ]
    chunk = CPU_CHUNK if images.device.type == "cpu" else max(1, batch)
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    with torch.autocast(images.device.type, enabled=False):
        for start in range(0, batch, chunk):
            stop = min(batch, start + chunk)
            part = images[start:stop]
            x = to_float(part) if part.dtype == torch.uint8 else part.float()
            for spec, spec_params, view in zip(specs, params, views):
                rendered = apply_view(x, spec_params.rows(start, stop), spec)
                torch.div(rendered.sub_(mean), std, out=view[start:stop])
    return views


def make_views_with_params(
    images: torch.Tensor,
    specs: Sequence[ViewSpec],
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    *,
    generator: torch.Generator,
) -> tuple[list[torch.Tensor], list[ViewParams]]:
    """`make_views` that also returns each view's `ViewParams` (crop boxes [B, 4] as (left, top, width, height)
    in source pixels, flips bool [B], ...), for methods that match positions across views (PixPro).

    The views are `make_views`'s, bit for bit, and ``generator`` ends in the same state: the parameters are
    drawn again from a copy of the generator's state before the views, in `make_views`'s order.
    """
    replay = torch.Generator()
    replay.set_state(generator.get_state())
    views = make_views(images, specs, mean, std, generator=generator)
    params = [sample_view(images.shape[0], images.shape[2], images.shape[3], spec, generator=replay) for spec in specs]
    return views, params


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
