"""SimMIM (Xie et al. 2021, "SimMIM: A Simple Framework for Masked Image Modeling").

Random masking of square mask patches (32 px at 192 px input, scaled with the input size), mask
ratio 0.6, a learnable mask token in place of masked patch embeddings, a one-layer prediction
head (1x1 conv to ``stride**2 * C`` channels + pixel shuffle back to the input resolution) and an
L1 loss on the normalised pixels of masked patches only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from selfsight.backbones import Backbone
from selfsight.data.augment import normalize, random_hflip, random_resized_crop, to_float
from selfsight.data.worker_views import PreparedViews
from selfsight.errors import ConfigError
from selfsight.masking import scaled_mask_patch_size, simmim_mask, upsample_mask
from selfsight.methods.base import Method, StepOutput
from selfsight.registry import register_method


def masked_l1_loss(target: torch.Tensor, prediction: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """SimMIM's loss: mean absolute error over masked pixels and channels.

    Args:
        target, prediction: [B, C, H, W]
        pixel_mask: [B, H, W], 1 where the pixel belongs to a masked patch.
    Returns:
        scalar ``sum(|target - prediction| * mask) / (sum(mask) * C)``.
    """
    weight = pixel_mask.unsqueeze(1).to(prediction.dtype)
    error = (target - prediction).abs() * weight
    return error.sum() / (weight.sum() * target.shape[1]).clamp_min(1e-5)


@dataclass(frozen=True)
class MaskedImageView:
    """SimMIM's one view, a picklable recipe (DataLoader workers build it too): uint8 [B, C, S, S] ->
    [normalised float32 [B, C, size, size]]: random resized crop, then a random flip when ``hflip``, drawn
    from the generator in that order. mean, std: float32 [1, C, 1, 1] on the CPU."""

    size: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    hflip: bool
    mean: torch.Tensor
    std: torch.Tensor

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None,
                 out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        with torch.autocast(images.device.type, enabled=False):
            x = to_float(images)
            x = random_resized_crop(x, self.size, scale=self.crop_scale, ratio=self.crop_ratio, generator=generator)
            if self.hflip:
                x = random_hflip(x, generator=generator)
            x = normalize(x, self.mean, self.std)
        if out is None:
            return [x]
        out[0].copy_(x)
        return [out[0]]

    def out_shapes(self, images_shape: Sequence[int]) -> list[tuple[int, ...]]:
        """The shape of the view of images of shape [B, C, S, S]."""
        return [(images_shape[0], images_shape[1], self.size, self.size)]


@register_method("simmim")
class SimMIM(Method):
    """SimMIM on a timm ViT, Swin or SwinV2 backbone."""

    @dataclass
    class Config:
        mask_ratio: float = 0.6
        #: mask-patch size in pixels; None = 32 px at 192 px scaled to the input size
        mask_patch_size: int | None = None
        crop_scale: tuple[float, float] = (0.67, 1.0)
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
        hflip: bool = True

    def __init__(self, backbone: Backbone, config: SimMIM.Config, mean: list[float], std: list[float]) -> None:
        if not backbone.supports_mask_token:
            raise ConfigError(
                f"SimMIM needs a ViT, Swin or SwinV2 backbone (a mask token replaces patch embeddings); "
                f"{backbone.name} is a {backbone.family} model: for a CNN (ResNet, ConvNeXt) use --method spark"
            )
        super().__init__(backbone, config, mean, std)
        self.mask_patch_size = config.mask_patch_size or scaled_mask_patch_size(backbone.img_size, backbone.patch_size)
        # validates divisibility once, at construction
        simmim_mask(1, backbone.img_size, backbone.patch_size, self.mask_patch_size, config.mask_ratio)
        self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        stride = backbone.encoder_stride
        self.decoder = nn.Sequential(
            nn.Conv2d(backbone.num_features, stride**2 * backbone.in_chans, kernel_size=1),
            nn.PixelShuffle(stride),
        )

    def make_mask(self, batch_size: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """bool [B, Gh, Gw] on the backbone's patch grid, drawn on the CPU from ``generator``."""
        b = self.backbone
        mask = simmim_mask(
            batch_size, b.img_size, b.patch_size, self.mask_patch_size, self.config.mask_ratio, generator
        )
        return mask.to(device)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: normalised images [B, C, H, W]; mask: bool [B, Gh, Gw].

        Returns ``(loss, prediction [B, C, H, W], pixel_mask [B, H, W])``.
        """
        features = self.backbone.forward_map(x, mask, self.mask_token)
        prediction = self.decoder(features)
        pixel_mask = upsample_mask(mask, self.backbone.patch_size)
        loss = masked_l1_loss(x.float(), prediction.float(), pixel_mask)
        return loss, prediction, pixel_mask

    def worker_view_maker(self, device: torch.device | str = "cpu") -> MaskedImageView:
        """The recipe of ``augment`` with the normalisation on ``device`` (the CPU: for DataLoader workers)."""
        c = self.config
        mean = self.mean.detach().to(device, torch.float32).clone()
        std = self.std.detach().to(device, torch.float32).clone()
        return MaskedImageView(self.backbone.img_size, c.crop_scale, c.crop_ratio, c.hflip, mean, std)

    def augment(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """uint8 [B, C, S, S] -> normalised, randomly cropped (and flipped) float [B, C, S, S]."""
        return self.worker_view_maker(self.mean.device)(images, generator)[0]

    def views(self, images: torch.Tensor | PreparedViews, generator: torch.Generator) -> list[torch.Tensor]:
        """One view: the augmented image (masking is applied on top of it, on the patch grid). images:
        uint8 [B, C, S, S], or the PreparedViews a worker built (see ``Method.views``)."""
        if isinstance(images, PreparedViews):
            return images.restore(generator)
        return [self.augment(images, generator)]

    def training_step(self, images: torch.Tensor | PreparedViews, generator: torch.Generator) -> StepOutput:
        # Data parallelism needs nothing here: every sample has the same number of masked pixels, so the
        # masked L1 (a sum over masked pixels divided by their count) of a rank's N samples averages over
        # ranks to the global batch's, and DDP's mean of the gradients is the global gradient.
        x = self.views(images, generator)[0]
        mask = self.make_mask(x.shape[0], generator, x.device)
        loss, _, _ = self(x, mask)
        return StepOutput(loss=loss)
