"""The baselines of benchmarks/throughput.py: how one trains the same method without selfsight.

- ``lightly``: lightly's own implementation, as its examples write it. BYOL and SimCLR: lightly's heads,
  losses, momentum update and transforms (``BYOLTransform``, ``SimCLRTransform``), via
  benchmarks/peer_lightly.py's models. SimMIM on a ViT: lightly's SimMIM example (examples/pytorch/simmim.py)
  on ``MaskedVisionTransformerTIMM``: random token masking (``random_token_mask``), a linear decoder on the
  masked tokens, L1 against the patchified image, ``MAETransform`` views.
- ``reference``: no library, for SimMIM on a Swin (lightly has no Swin SimMIM): the SimMIM paper's recipe
  written plainly, as its official code does it: per-image torchvision transforms and a per-image numpy mask
  generator in the Dataset, a learnable mask token in place of masked patch embeddings, a 1x1 conv decoder +
  pixel shuffle, and L1 on the masked pixels.

Both read images from a torch ``Dataset`` over an in-memory uint8 array, one PIL image per item (as
torchvision's CIFAR-10 dataset does), batched by a ``DataLoader``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from selfsight.backbones import Backbone
from selfsight.config import PretrainConfig
from selfsight.masking import scaled_mask_patch_size

StepFn = Callable[[nn.Module, Any, int, int, torch.device], torch.Tensor]


@dataclass
class Baseline:
    """A baseline ready to train: its model, its per-image transform (PIL -> what the collate batches), the
    step ``step_fn(model, batch, step, total_steps, device) -> loss`` and the modules AdamW trains."""

    name: str
    model: nn.Module
    transform: Callable[[Image.Image], Any]
    step_fn: StepFn
    trained: list[nn.Module]


class ArrayImages(Dataset):
    """Item i: ``(transform(PIL image i), 0)`` from uint8 ``pixels`` [N, H, W, C] held in memory."""

    def __init__(self, pixels: np.ndarray, transform: Callable[[Image.Image], Any]) -> None:
        self.pixels = pixels
        self.transform = transform
        self.mode = "L" if pixels.shape[-1] == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        array = self.pixels[index]
        image = Image.fromarray(array[..., 0] if self.mode == "L" else array, self.mode)
        return self.transform(image), 0


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device, non_blocking=True)


# --- lightly: BYOL and SimCLR ------------------------------------------------------------------------------------


def _blur_sigmas(size: int) -> tuple[float, float]:
    """selfsight's blur sigmas at ``size`` px (the papers' 0.1-2 px at 224 px, scaled), given to lightly too."""
    return 0.1 * size / 224, 2.0 * size / 224


def lightly_contrastive(method: str, backbone: Backbone, cfg: PretrainConfig, mean: list[float],
                        std: list[float]) -> Baseline:
    """lightly's BYOL or SimCLR (benchmarks/peer_lightly.py's models: lightly's heads, loss and momentum update,
    one forward pass per view) with lightly's transforms set to selfsight's recipe (crop scale, blur and
    solarize probabilities, jitter strengths, normalisation)."""
    import peer_lightly
    from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform, SimCLRTransform

    c = cfg.method_config
    size = backbone.img_size
    spec = c.two_view_specs(size, backbone.in_chans)[0]  # selfsight's adapted recipe (e.g. crop scale at 32 px)
    common = dict(input_size=size, min_scale=spec.crop_scale[0], sigmas=_blur_sigmas(size),
                  normalize={"mean": mean, "std": std}, cj_prob=c.jitter_p, random_gray_scale=c.grayscale_p,
                  hf_prob=c.hflip_p)
    jitter = dict(cj_bright=c.brightness, cj_contrast=c.contrast, cj_sat=c.saturation, cj_hue=c.hue)
    if method == "byol":
        transform = BYOLTransform(
            view_1_transform=BYOLView1Transform(**common, **jitter, gaussian_blur=c.blur_p[0],
                                                solarization_prob=c.solarize_p[0]),
            view_2_transform=BYOLView2Transform(**common, **jitter, gaussian_blur=c.blur_p[1],
                                                solarization_prob=c.solarize_p[1]),
        )
    else:
        transform = SimCLRTransform(**common, **jitter, gaussian_blur=c.blur_p[0])
    model, loss_fn = peer_lightly.build_model(method, backbone, c)

    def step_fn(model: nn.Module, batch: Any, step: int, total_steps: int, device: torch.device) -> torch.Tensor:
        views = [_to_device(view, device) for view in batch[0]]
        return loss_fn(model, views, step, total_steps)

    return Baseline(f"lightly {peer_lightly.lightly_version()}", model, transform, step_fn, model.online_modules())


# --- lightly: SimMIM on a ViT -----------------------------------------------------------------------------------


class LightlySimMIM(nn.Module):
    """lightly's SimMIM example model on a timm ViT: ``MaskedVisionTransformerTIMM`` encodes all tokens with the
    masked ones replaced by its mask token; a linear decoder predicts the pixels of the masked patches."""

    def __init__(self, vit: nn.Module, mask_ratio: float, in_chans: int) -> None:
        from lightly.models.modules.masked_vision_transformer_timm import MaskedVisionTransformerTIMM

        super().__init__()
        self.mask_ratio = mask_ratio
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.sequence_length = int(vit.patch_embed.num_patches + vit.num_prefix_tokens)
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.decoder = nn.Linear(vit.embed_dim, self.patch_size**2 * in_chans)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images: [B, C, H, W] -> (predicted pixels, target pixels), both [B, L_masked, patch**2 * C]."""
        from lightly.models import utils

        idx_keep, idx_mask = utils.random_token_mask(
            size=(images.shape[0], self.sequence_length), mask_ratio=self.mask_ratio, device=images.device
        )
        encoded = self.backbone.encode(images=images, idx_mask=idx_mask)
        predicted = self.decoder(utils.get_at_index(encoded, idx_mask))
        patches = utils.patchify(images, self.patch_size)
        target = utils.get_at_index(patches, idx_mask - 1)  # the patches have no class token
        return predicted, target


def lightly_simmim(backbone: Backbone, cfg: PretrainConfig, mean: list[float], std: list[float]) -> Baseline:
    """lightly's SimMIM example (ViT only) with selfsight's mask ratio and crop scale."""
    import peer_lightly
    from lightly.transforms import MAETransform

    c = cfg.method_config
    model = LightlySimMIM(backbone.model, c.mask_ratio, backbone.in_chans)
    transform = MAETransform(input_size=backbone.img_size, min_scale=c.crop_scale[0],
                             normalize={"mean": mean, "std": std})
    criterion = nn.L1Loss()

    def step_fn(model: nn.Module, batch: Any, step: int, total_steps: int, device: torch.device) -> torch.Tensor:
        images = _to_device(batch[0][0], device)  # MAETransform gives a list of one view
        predicted, target = model(images)
        return criterion(predicted, target)

    return Baseline(f"lightly {peer_lightly.lightly_version()}", model, transform, step_fn, [model])


# --- reference: SimMIM on a Swin --------------------------------------------------------------------------------


class PatchMaskGenerator:
    """SimMIM's mask generator as its official code runs it, per image, with numpy: a random ``mask_ratio``
    of the ``mask_patch_size`` squares, expressed on the ``patch_size`` grid. Returns float32 [Gh, Gw]."""

    def __init__(self, img_size: int, mask_patch_size: int, patch_size: int, mask_ratio: float) -> None:
        self.side = img_size // mask_patch_size
        self.scale = mask_patch_size // patch_size
        self.count = self.side * self.side
        self.masked = int(math.ceil(self.count * mask_ratio))

    def __call__(self) -> np.ndarray:
        chosen = np.random.permutation(self.count)[: self.masked]
        mask = np.zeros(self.count, dtype=np.float32)
        mask[chosen] = 1
        mask = mask.reshape(self.side, self.side)
        return mask.repeat(self.scale, axis=0).repeat(self.scale, axis=1)


class SimMIMTransform:
    """PIL image -> (normalised crop [C, S, S], mask [Gh, Gw]): random resized crop, flip, then a mask."""

    def __init__(self, size: int, crop_scale: tuple[float, float], crop_ratio: tuple[float, float],
                 mean: list[float], std: list[float], masks: PatchMaskGenerator) -> None:
        self.transform = T.Compose([
            T.RandomResizedCrop(size, scale=crop_scale, ratio=crop_ratio),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ])
        self.masks = masks

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, np.ndarray]:
        return self.transform(image), self.masks()


class ReferenceSwinSimMIM(nn.Module):
    """SimMIM on a timm Swin, written plainly: mask token in place of masked patch embeddings, Swin stages,
    1x1 conv to ``stride**2 * C`` channels + pixel shuffle, L1 on masked pixels averaged over channels."""

    def __init__(self, swin: nn.Module, in_chans: int) -> None:
        super().__init__()
        self.encoder = swin
        self.in_chans = in_chans
        self.patch_size = int(swin.patch_embed.patch_size[0])
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, swin.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        stride = int(swin.feature_info[-1]["reduction"])
        self.decoder = nn.Sequential(nn.Conv2d(swin.num_features, stride**2 * in_chans, 1), nn.PixelShuffle(stride))

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """images: [B, C, H, W]; mask: float [B, Gh, Gw], 1 = masked. Returns the scalar loss."""
        tokens = self.encoder.patch_embed(images)  # [B, Gh, Gw, D]
        weight = mask.unsqueeze(-1).type_as(tokens)
        tokens = tokens * (1 - weight) + self.mask_token * weight
        features = self.encoder.norm(self.encoder.layers(tokens))  # [B, h, w, D']
        reconstruction = self.decoder(features.permute(0, 3, 1, 2))
        pixel_mask = mask.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2).unsqueeze(1)
        error = F.l1_loss(images, reconstruction.float(), reduction="none")
        return (error * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / self.in_chans


def reference_swin_simmim(backbone: Backbone, cfg: PretrainConfig, mean: list[float], std: list[float]) -> Baseline:
    """The plain SimMIM loop on a Swin, with selfsight's mask ratio, mask-patch size and crops."""
    if backbone.family != "swin":
        raise SystemExit(f"the reference SimMIM baseline is written for Swin backbones, not {backbone.name}")
    c = cfg.method_config
    mask_patch = c.mask_patch_size or scaled_mask_patch_size(backbone.img_size, backbone.patch_size)
    masks = PatchMaskGenerator(backbone.img_size, mask_patch, backbone.patch_size, c.mask_ratio)
    transform = SimMIMTransform(backbone.img_size, c.crop_scale, c.crop_ratio, mean, std, masks)
    model = ReferenceSwinSimMIM(backbone.model, backbone.in_chans)

    def step_fn(model: nn.Module, batch: Any, step: int, total_steps: int, device: torch.device) -> torch.Tensor:
        (images, mask), _ = batch
        return model(_to_device(images, device), _to_device(mask, device))

    return Baseline("reference loop (torchvision + plain SimMIM)", model, transform, step_fn, [model])


def build_baseline(kind: str, method: str, backbone: Backbone, cfg: PretrainConfig, mean: list[float],
                   std: list[float]) -> Baseline:
    """The baseline ``kind`` ('lightly' or 'reference') of ``method`` on ``backbone``."""
    if kind == "lightly" and method in ("byol", "simclr"):
        return lightly_contrastive(method, backbone, cfg, mean, std)
    if kind == "lightly" and method == "simmim" and backbone.family == "vit":
        return lightly_simmim(backbone, cfg, mean, std)
    if kind == "reference" and method == "simmim":
        return reference_swin_simmim(backbone, cfg, mean, std)
    raise SystemExit(f"no {kind} baseline for {method} on {backbone.name} ({backbone.family})")
