"""What MAE and SparK share: patches in MAE's layout, the per-patch normalised target (``norm_pix_loss``),
the MSE on masked patches, and the one-view crop + flip recipe."""

from __future__ import annotations

import torch

from selfsight.data.worker_views import PreparedViews
from selfsight.methods.simmim import MaskedImageView

#: added to each patch's (unbiased) variance before the square root, as in MAE's and SparK's code
NORM_PIX_EPS = 1e-6


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), p*p*C], patches in row-major order, values in (row, col, channel)
    order within a patch (MAE's ``patchify``)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``patchify``: [B, h*w, p*p*C] -> [B, C, h*p, w*p]."""
    b = patches.shape[0]
    h, w = grid
    x = patches.reshape(b, h, w, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, h * patch, w * patch)


def patch_stats(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's mean and ``sqrt(unbiased var + 1e-6)``: target [B, L, N] -> ([B, L, 1], [B, L, 1])."""
    var, mean = torch.var_mean(target, dim=-1, correction=1, keepdim=True)
    return mean, (var + NORM_PIX_EPS).sqrt()


def normalise_patches(target: torch.Tensor) -> torch.Tensor:
    """``norm_pix_loss``'s target: each patch [B, L, N] minus its mean, over sqrt(unbiased var + 1e-6)."""
    mean, scale = patch_stats(target)
    return (target - mean) / scale


def denormalise_patches(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A prediction in ``norm_pix_loss`` units back in the target's units, with each target patch's own mean
    and std (what makes such a reconstruction viewable): both [B, L, N]."""
    mean, scale = patch_stats(target)
    return prediction * scale + mean


def masked_patch_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAE's loss: the MSE of each patch, averaged over the masked patches only.

    Args:
        prediction, target: [B, L, N] (patchified).
        mask: [B, L], 1 = masked (the loss reads these), 0 = visible (ignored).
    Returns:
        scalar ``sum_l mask_l * mean_n (pred - target)^2 / sum_l mask_l``.
    """
    per_patch = ((prediction - target) ** 2).mean(dim=-1)
    weight = mask.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)


class OneViewMixin:
    """One view per step: random resized crop (+ flip), normalised; the masks are drawn on top of it.

    The host defines ``config`` (with ``crop_scale``, ``crop_ratio``, ``hflip``), ``backbone``, ``mean``, ``std``.
    """

    def worker_view_maker(self, device: torch.device | str = "cpu") -> MaskedImageView:
        """The recipe of ``augment`` with the normalisation on ``device`` (the CPU: for DataLoader workers)."""
        c = self.config
        mean = self.mean.detach().to(device, torch.float32).clone()
        std = self.std.detach().to(device, torch.float32).clone()
        return MaskedImageView(self.backbone.img_size, tuple(c.crop_scale), tuple(c.crop_ratio), c.hflip, mean, std)

    def augment(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """uint8 [B, C, S, S] -> normalised, randomly cropped (and flipped) float [B, C, S, S]."""
        return self.worker_view_maker(self.mean.device)(images, generator)[0]

    def views(self, images: torch.Tensor | PreparedViews, generator: torch.Generator) -> list[torch.Tensor]:
        """One view (see ``Method.views``)."""
        if isinstance(images, PreparedViews):
            return images.restore(generator)
        return [self.augment(images, generator)]
