"""SparK (Tian et al. 2023, "Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked
Modeling"), on timm ResNets and ConvNeXts (any CNN whose ``feature_info`` gives its stages and whose layers
``selfsight.sparse`` can make sparse).

- Masking on the grid of the downsample ratio R (the last stage's reduction, 32): ``round(h*w*(1 - 0.6))``
  cells stay visible (``selfsight.masking.spark_num_kept``), the input is zeroed elsewhere.
- Sparse encoder: the timm model itself, its modules' classes swapped (``selfsight.sparse``): every conv,
  pool, Linear and LayerNorm output times the mask at its resolution, BatchNorm statistics over visible
  positions only. Its stage outputs at reductions R, R/2, ... down to 4 are read with timm's
  ``forward_intermediates`` (ResNet's stride-2 stem output is not used, as in the official code). Layers
  it cannot make sparse (GroupNorm, SE/ECA attention, ...) are refused at start by name.
- Densify, from the smallest map up: a sparse norm (BatchNorm for BatchNorm encoders, LayerNorm for
  LayerNorm ones such as ConvNeXt), the masked positions filled with a per-level mask token
  [1, C, 1, 1], a projection to the decoder's width at that level (1x1 at the smallest, 3x3 elsewhere).
- Light UNet decoder: per level ConvTranspose(k4, s2, p1) then conv3x3-BN-ReLU6-conv3x3-BN, the width
  halving each level, the densified maps added before the blocks of their resolution, a final 1x1 conv
  to C channels at the input resolution.
- Loss: each R x R patch of the input normalised by its own mean and unbiased variance, the MSE of each
  patch, averaged over the masked patches.

The exported encoder is the plain timm model: the swaps change module classes only, not the state dict.

Optimiser recipe of the official code (``pretrain/utils/arg_util.py``; global in selfsight, so pass it): LAMB
with betas (0.9, 0.95) for ResNets, (0.9, 0.999) for ConvNeXts, lr = 2e-4 x batch / 256, 40 warm-up epochs then
cosine, gradient clipping at 5, weight decay 0.04 -> 0.2 on a cosine schedule, no decay on mask tokens, norms
and biases. selfsight trains with AdamW and a constant weight decay: ``optim.betas=[0.9,0.95] optim.lr=1e-4
optim.weight_decay=0.04`` at batch 128 is the closest. Crops scale (0.67, 1) and a flip. Small models gain
less from SparK than large ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.layers import LayerNorm2d
from torch import nn

from selfsight.backbones import Backbone, param_groups
from selfsight.errors import ConfigError
from selfsight.masking import keep_mask, spark_num_kept, upsample_mask
from selfsight.methods.base import Method, StepOutput
from selfsight.methods.mim import (
    OneViewMixin,
    denormalise_patches,
    masked_patch_mse,
    normalise_patches,
    patchify,
    unpatchify,
)
from selfsight.registry import register_method
from selfsight.sparse import SparseBatchNorm2d, SparseState, sparse_class, sparsify, unsupported_modules

#: the paper's decoder width (ResNet-50, ConvNeXt); encoders whose last stage is narrower get half its width.
#: Why: on a small encoder SparK's decoder, which runs up to the input resolution, costs more than the encoder.
#: Narrow ResNet-18 (last stage 256 wide) at 32 px, output_stride 8, 2 CPU cores: decoder 256 wide (the old
#: default, the last width) 150 img/s fp32 / 304 bf16; 128 wide 339 / 515; fine-tuned with 600 labels after
#: pre-training (2 draws, 50 epochs): 80.29% (256, 700 steps) and 80.19% (128, 1,000 steps), 79.03% scratch.
PAPER_DECODER_WIDTH = 768


class UNetBlock(nn.Module):
    """SparK's decoder block: x [B, cin, h, w] -> [B, cout, 2h, 2w]."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up_sample = nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(
            nn.Conv2d(cin, cin, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(inplace=True),
            nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up_sample(x))


class LightDecoder(nn.Module):
    """SparK's light UNet: ``log2(R)`` UNet blocks of widths ``width / 2**i``, then a 1x1 conv to C channels."""

    def __init__(self, ratio: int, width: int, out_chans: int) -> None:
        super().__init__()
        n = round(math.log2(ratio))
        widths = [width // 2**i for i in range(n + 1)]
        self.blocks = nn.ModuleList([UNetBlock(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)])
        self.proj = nn.Conv2d(widths[-1], out_chans, kernel_size=1)
        for m in self.modules():  # SparK's decoder initialisation (BatchNorm: ones and zeros, torch's own)
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
            elif isinstance(m, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """levels: densified maps from the smallest ([B, width, h, w]) up, level i [B, width / 2**i, h 2**i,
        w 2**i]; fewer levels than blocks is fine. Returns [B, C, h R, w R]."""
        x = levels[0]
        for i, block in enumerate(self.blocks):
            if 0 < i < len(levels):
                x = x + levels[i]
            x = block(x)
        return self.proj(x)


def feature_levels(backbone: Backbone) -> list[int]:
    """Indices into ``feature_info`` of the stages SparK reads, deepest last: reductions 4, 8, ..., R.

    Where several stages share a reduction (a timm ResNet built with ``output_stride=16`` or ``8`` runs its
    last stages dilated, at the same resolution), the deepest of them is read: R is then 16 or 8, so small
    images get a finer mask grid (48 px: 3 x 3 cells at R = 16 instead of 1 x 1 at R = 32)."""
    info = backbone.model.feature_info
    ratio = backbone.encoder_stride
    if ratio & (ratio - 1):
        raise ConfigError(f"SparK needs a power-of-two downsample ratio; {backbone.name} has {ratio}")
    deepest: dict[int, int] = {}
    for i, f in enumerate(info):
        if int(f["reduction"]) >= 4:
            deepest[int(f["reduction"])] = i  # a later stage at the same reduction replaces an earlier one
    reductions = sorted(deepest)
    expected = [4 * 2**k for k in range(max(1, round(math.log2(max(ratio, 4))) - 1))]
    if reductions != expected:
        raise ConfigError(f"SparK needs stages at reductions 4, 8, ..., {ratio}; {backbone.name} has {reductions}")
    return [deepest[r] for r in reductions]


def check_spark_backbone(backbone: Backbone) -> None:
    """Refuse, at start, backbones SparK cannot run on (naming the method that can)."""
    if backbone.family in ("vit", "swin"):
        raise ConfigError(
            f"SparK is masked modelling for CNNs; {backbone.name} is a transformer: use --method mae (ViT) "
            "or --method simmim (ViT, Swin)"
        )
    if backbone.family != "cnn" or not getattr(backbone.model, "feature_info", None):
        raise ConfigError(f"SparK needs a timm CNN whose feature_info gives its stages; {backbone.name} is not one")
    ratio = backbone.encoder_stride
    if backbone.img_size % ratio or backbone.img_size < ratio:
        size = max(ratio, backbone.img_size // ratio * ratio)
        raise ConfigError(
            f"SparK masks on the stride-{ratio} grid of {backbone.name}: the image size {backbone.img_size} "
            f"must be a multiple of {ratio} (e.g. --backbone-opt img_size={size})"
        )


def modules_on_path(backbone: Backbone, indices: list[int]) -> list[tuple[str, nn.Module]]:
    """The (name, module) of the timm model that run in ``forward_intermediates`` up to the last stage,
    found with forward hooks on one all-zero image."""
    model = backbone.model
    ran: set[int] = set()
    handles = [m.register_forward_hook(lambda mod, *_: ran.add(id(mod))) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            x = torch.zeros(1, backbone.in_chans, backbone.img_size, backbone.img_size)
            model.forward_intermediates(x, indices=indices, intermediates_only=True)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return [(name, m) for name, m in model.named_modules() if id(m) in ran]


@register_method("spark")
class SparK(OneViewMixin, Method):
    """SparK on a timm ResNet or ConvNeXt."""

    @dataclass
    class Config:
        """Tian et al. 2023's defaults: mask ratio 0.6 on the stride-32 grid, crops (0.67, 1) + flip.
        decoder_width None = the paper's 768 when the encoder's last stage is at least 768 wide, else half
        the last stage's width (rounded down to a multiple of 2**log2(R) so the halving rule stays whole)."""

        mask_ratio: float = 0.6
        decoder_width: int | None = None
        crop_scale: tuple[float, float] = (0.67, 1.0)
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
        hflip: bool = True

    def __init__(self, backbone: Backbone, config: SparK.Config, mean: list[float], std: list[float]) -> None:
        check_spark_backbone(backbone)
        indices = feature_levels(backbone)
        path = modules_on_path(backbone, indices)
        bad = unsupported_modules(path)
        if bad:
            raise ConfigError(
                f"SparK cannot make these layers of {backbone.name} sparse: {', '.join(bad[:8])}"
                f"{' ...' if len(bad) > 8 else ''} (supported: Conv2d, BatchNorm2d, LayerNorm, max/avg pooling, "
                "Linear on NHWC maps, elementwise activations; ResNet and ConvNeXt blocks)"
            )
        super().__init__(backbone, config, mean, std)
        self.level_indices = indices
        self.ratio = backbone.encoder_stride
        self.grid = (backbone.img_size // self.ratio,) * 2
        self.num_kept = spark_num_kept(self.grid[0] * self.grid[1], config.mask_ratio)
        self.sparse_state = SparseState()
        sparsify([m for _, m in path], self.sparse_state)
        on_path = {id(m) for _, m in path} | {id(backbone.model)}
        for module in backbone.model.modules():  # the classifier's (ConvNeXt's head norm), never used by SparK,
            if id(module) not in on_path:  # stays at its initial values (and DDP finds no unused parameter)
                for param in module.parameters(recurse=False):
                    param.requires_grad_(False)
        layer_norm = not any(isinstance(m, SparseBatchNorm2d) for _, m in path)
        widths = [int(backbone.model.feature_info[i]["num_chs"]) for i in indices][::-1]  # smallest map first
        n = round(math.log2(self.ratio))
        # the paper's 768 for encoders whose last stage is at least that wide, else half the last stage's width
        default = PAPER_DECODER_WIDTH if widths[0] >= PAPER_DECODER_WIDTH else widths[0] // 2
        width = config.decoder_width or max(2**n, default // 2**n * 2**n)
        if width % 2**n:
            raise ConfigError(f"decoder_width {width} must be a multiple of {2**n} (it halves {n} times)")
        self.mask_tokens = nn.ParameterList()
        self.densify_norms = nn.ModuleList()
        self.densify_projs = nn.ModuleList()
        for i, channels in enumerate(widths):
            token = nn.Parameter(torch.zeros(1, channels, 1, 1))
            nn.init.trunc_normal_(token, std=0.02, a=-0.02, b=0.02)
            self.mask_tokens.append(token)
            self.densify_norms.append(self._densify_norm(channels, layer_norm))
            out = width // 2**i
            if i == 0 and channels == out:
                self.densify_projs.append(nn.Identity())
            else:
                k = 1 if i == 0 else 3
                self.densify_projs.append(nn.Conv2d(channels, out, kernel_size=k, padding=k // 2))
        self.decoder = LightDecoder(self.ratio, width, backbone.in_chans)

    def _densify_norm(self, channels: int, layer_norm: bool) -> nn.Module:
        if not layer_norm:
            return SparseBatchNorm2d.create(channels, self.sparse_state)
        norm = LayerNorm2d(channels)
        norm.__class__ = sparse_class(LayerNorm2d)
        norm.sparse_state = self.sparse_state
        return norm

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups (``Method.param_groups``), with the per-level mask tokens in the no-decay group."""
        skip = self.backbone.no_weight_decay_names() | {f"mask_tokens.{i}" for i in range(len(self.mask_tokens))}
        return param_groups(self, weight_decay, skip)

    # --- masking ------------------------------------------------------------------------------
    def make_mask(self, batch_size: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """bool [B, h, w] on the stride-R grid, True = masked; exactly ``round(h*w*(1 - mask_ratio))`` cells
        visible per image; drawn on the CPU from ``generator``."""
        mask = keep_mask(batch_size, self.grid[0] * self.grid[1], self.num_kept, generator)
        return mask.view(batch_size, *self.grid).to(device)

    # --- networks -----------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, active: torch.Tensor) -> list[torch.Tensor]:
        """The sparse encoder. x: [B, C, H, W]; active: bool [B, 1, h, w] (True = visible).
        Returns the stage maps, smallest first, zero at masked positions."""
        with self.sparse_state.use(active):
            x = x * self.sparse_state.at(x.shape[-2], x.shape[-1]).to(x.dtype)
            maps = self.backbone.model.forward_intermediates(x, indices=self.level_indices, intermediates_only=True)
        return maps[::-1]

    def densify(self, maps: list[torch.Tensor], active: torch.Tensor) -> list[torch.Tensor]:
        """Sparse norm, mask tokens at masked positions, projection to the decoder widths (smallest first)."""
        out = []
        with self.sparse_state.use(active):
            for i, fmap in enumerate(maps):
                fmap = self.densify_norms[i](fmap)
                visible = self.sparse_state.at(fmap.shape[-2], fmap.shape[-1])
                fmap = torch.where(visible, fmap, self.mask_tokens[i].to(fmap.dtype))
                out.append(self.densify_projs[i](fmap))
        return out

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: normalised images [B, C, H, W]; mask: bool [B, h, w] on the stride-R grid, True = masked.

        Returns ``(loss, prediction [B, C, H, W] in per-patch normalised units, pixel_mask [B, H, W])``.
        """
        active = ~mask.unsqueeze(1)
        prediction = self.decoder(self.densify(self.encode(x, active), active))
        target = normalise_patches(patchify(x.float(), self.ratio))
        loss = masked_patch_mse(patchify(prediction.float(), self.ratio), target, mask.flatten(1))
        return loss, prediction, upsample_mask(mask, self.ratio)

    def to_pixels(self, x: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """A ``forward`` prediction in the units of x [B, C, H, W]: each R x R patch de-normalised with the
        mean and std of the same patch of x."""
        patches = denormalise_patches(patchify(prediction.float(), self.ratio), patchify(x.float(), self.ratio))
        return unpatchify(patches, self.ratio, x.shape[1], self.grid)

    #: how ``to_pixels`` shows the prediction (diagnostics)
    reconstruction_label = (
        "SparK prediction (per-patch normalised target) de-normalised with each patch's own mean and std"
    )

    def training_step(self, images: torch.Tensor, generator: torch.Generator) -> StepOutput:
        # Data parallelism: every image has the same number of masked patches (the ranks' losses average to
        # the global one) and the sparse BatchNorms gather their statistics over the ranks.
        x = self.views(images, generator)[0]
        mask = self.make_mask(x.shape[0], generator, x.device)
        loss, _, _ = self(x, mask)
        return StepOutput(loss=loss)
