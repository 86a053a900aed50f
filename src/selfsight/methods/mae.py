"""MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners"), on any timm ViT.

The timm ViT is wrapped, never subclassed: its patch embedding, position embedding, prefix tokens (class
and register tokens), blocks and final norm encode the *visible* patches only (patch_embed -> + the
patches' position embedding -> keep the visible tokens -> prepend the prefix tokens, with their position
embedding where timm gives them one -> blocks -> norm). A separate decoder (Linear to its own width, a
learnable mask token put back at the masked positions, a fixed 2-D sin-cos position embedding, ViT
blocks, norm, Linear to ``p*p*C``) predicts every patch; the loss is the MSE on the masked patches only,
against each patch normalised by its own mean and unbiased variance (``norm_pix_loss``, on by default).

Masking follows ``models_mae.random_masking``: ``int(L * (1 - mask_ratio))`` patches stay visible, the
ones with the smallest uniform noise (``selfsight.masking.mae_num_kept``): 147 of 196 masked at 224 px /
16 px, 12 of 16 on a 4x4 grid.

Differences from the official code, by design: the encoder keeps timm's learnable position embedding (the
official pre-training uses a fixed sin-cos one); the decoder is smaller by default for small encoders
(below). Parameters MAE never uses (a ViT's ``fc_norm`` or attention pooling, used by the classifier
only) are frozen at their initial values.

Optimiser recipe of the paper (selfsight's optimiser settings are global, so pass them): AdamW with
betas (0.9, 0.95), weight decay 0.05, lr = 1.5e-4 x batch / 256, warm-up then cosine, e.g.
``optim.betas=[0.9,0.95] optim.lr=7.5e-5`` at batch 128. Crops: scale (0.2, 1) and a flip, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from selfsight.backbones import Backbone
from selfsight.errors import ConfigError
from selfsight.masking import keep_mask, mae_num_kept, upsample_mask, visible_order
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

#: encoders at least this wide get the paper's decoder (512 wide, 8 blocks); narrower ones a smaller one
PAPER_DECODER_FROM = 768
#: the small decoder: half the encoder's width, one block. The paper's decoder costs under 10% of ViT-L's
#: per-token compute; a 256-wide, 4-block decoder behind a 192-wide, 6-block encoder costs more than the
#: encoder itself, and MAE then ran at 0.75x SimMIM's img/s (benchmarks/throughput.py, mae-vit pair, 2 CPU
#: cores); half width, 1 block: 3.2x (2 blocks: 2.3x). The paper's Table 1a: a 1-block decoder fine-tunes
#: within 0.1 point of 8 blocks (84.8 vs 84.9 top-1), its linear probe is lower (65.5 vs 73.5).
SMALL_DECODER_DEPTH = 1


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], num_prefix: int = 0) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embedding (``util/pos_embed.get_2d_sincos_pos_embed``).

    Half the channels encode the column, half the row (in that order, as MAE's "w goes first" grid), each
    as ``[sin(pos * omega), cos(pos * omega)]`` with ``omega_i = 10000 ** (-i / (dim / 4))``.
    Returns float32 [1, num_prefix + h*w, dim]; the prefix (class token) rows are zeros.
    """
    if dim % 4:
        raise ConfigError(f"the decoder width {dim} must be a multiple of 4 (sin-cos position embedding)")
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega.view(1, -1)  # [h*w, dim/4]
        return torch.cat([out.sin(), out.cos()], dim=1)

    emb = torch.cat([one_axis(cols), one_axis(rows)], dim=1)
    emb = torch.cat([torch.zeros(num_prefix, dim, dtype=torch.float64), emb], dim=0)
    return emb.float().unsqueeze(0)


def check_mae_backbone(backbone: Backbone) -> None:
    """Refuse, at start, what MAE's token dropping cannot run on (naming the method that can)."""
    if backbone.family == "swin":
        raise ConfigError(
            f"MAE drops the masked tokens, which a hierarchical {backbone.name} (Swin) cannot do: "
            "use --method simmim on Swin, or MAE on a plain ViT"
        )
    if backbone.family == "cnn":
        raise ConfigError(f"MAE needs a timm ViT; {backbone.name} is a CNN: use --method spark for CNNs")
    if backbone.family != "vit":
        raise ConfigError(f"MAE needs a timm VisionTransformer; {backbone.name} is not one")
    m = backbone.model
    if getattr(m, "dynamic_img_size", False):
        raise ConfigError("MAE needs a ViT of fixed input size: build it without dynamic_img_size")
    if not isinstance(getattr(m, "patch_drop", nn.Identity()), nn.Identity):
        raise ConfigError("MAE drops the masked patches itself: build the ViT without patch_drop_rate")
    prefix = (m.cls_token is not None) + (0 if m.reg_token is None else m.reg_token.shape[1])
    if prefix != backbone.num_prefix_tokens:
        raise ConfigError(
            f"{backbone.name} has {backbone.num_prefix_tokens} prefix tokens, of which MAE knows {prefix} "
            "(class and register tokens only)"
        )


@register_method("mae")
class MAE(OneViewMixin, Method):
    """MAE on a timm ViT (class and register tokens handled; Swin: use SimMIM; CNNs: use SparK)."""

    @dataclass
    class Config:
        """He et al. 2022's defaults: mask ratio 0.75, norm_pix_loss, crops (0.2, 1) + flip. The decoder:
        None = the paper's 512 wide, 8 blocks, 16 heads for encoders 768 or more wide; for narrower
        (small) encoders half the encoder's width, 1 block (``SMALL_DECODER_DEPTH``); heads = width / 32."""

        mask_ratio: float = 0.75
        norm_pix_loss: bool = True
        decoder_dim: int | None = None
        decoder_depth: int | None = None
        decoder_heads: int | None = None
        crop_scale: tuple[float, float] = (0.2, 1.0)
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
        hflip: bool = True

    def __init__(self, backbone: Backbone, config: MAE.Config, mean: list[float], std: list[float]) -> None:
        check_mae_backbone(backbone)
        super().__init__(backbone, config, mean, std)
        m = backbone.model
        self.num_patches = backbone.grid_size[0] * backbone.grid_size[1]
        self.num_kept = mae_num_kept(self.num_patches, config.mask_ratio)
        self.num_prefix = backbone.num_prefix_tokens
        paper = backbone.embed_dim >= PAPER_DECODER_FROM
        dim = config.decoder_dim or (512 if paper else max(32, backbone.embed_dim // 2))
        depth = config.decoder_depth or (8 if paper else SMALL_DECODER_DEPTH)
        heads = config.decoder_heads or max(1, dim // 32)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_embed = nn.Linear(backbone.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed_2d(dim, backbone.grid_size, self.num_prefix), persistent=False
        )
        self.decoder_blocks = nn.Sequential(
            *[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)]
        )
        self.decoder_norm = norm(dim)
        self.decoder_pred = nn.Linear(dim, backbone.patch_size**2 * backbone.in_chans)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        for name in ("fc_norm", "attn_pool", "head"):  # the classifier's, never used by MAE
            sub = getattr(m, name, None)
            if isinstance(sub, nn.Module):
                sub.requires_grad_(False)

    # --- masking ------------------------------------------------------------------------------
    def make_mask(self, batch_size: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """bool [B, Gh, Gw] on the patch grid, True = masked, exactly ``L - int(L * (1 - mask_ratio))`` per
        image; drawn on the CPU from ``generator``."""
        mask = keep_mask(batch_size, self.num_patches, self.num_kept, generator)
        return mask.view(batch_size, *self.backbone.grid_size).to(device)

    # --- networks -----------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """The timm ViT on the visible patches only.

        x: normalised images [B, C, H, W]; ids_keep: long [B, K], the visible patches' indices.
        Returns [B, P + K, D]: the P prefix tokens, then the K visible tokens, after the final norm.
        """
        m = self.backbone.model
        tokens = m.patch_embed(x)  # [B, L, D]
        prefix_pos = None
        if m.pos_embed is not None:
            if m.no_embed_class:
                tokens = tokens + m.pos_embed
            else:
                prefix_pos = m.pos_embed[:, : self.num_prefix]
                tokens = tokens + m.pos_embed[:, self.num_prefix :]
        index = ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        tokens = torch.gather(tokens, 1, index)
        b = tokens.shape[0]
        prefix = [t.expand(b, -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
        if prefix:
            prefix_tokens = torch.cat(prefix, dim=1)
            if prefix_pos is not None:
                prefix_tokens = prefix_tokens + prefix_pos
            tokens = torch.cat([prefix_tokens.to(tokens.dtype), tokens], dim=1)
        tokens = m.pos_drop(tokens)
        tokens = m.norm_pre(tokens)
        tokens = m.blocks(tokens)
        return m.norm(tokens)

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, P + K, D], ids_restore long [B, L] -> predicted patches [B, L, p*p*C]."""
        y = self.decoder_embed(latent)
        b, _, dim = y.shape
        p = self.num_prefix
        masked = self.mask_token.to(y.dtype).expand(b, self.num_patches + p - y.shape[1], dim)
        patches = torch.cat([y[:, p:], masked], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))
        y = torch.cat([y[:, :p], patches], dim=1) + self.decoder_pos_embed.to(y.dtype)
        y = self.decoder_norm(self.decoder_blocks(y))
        return self.decoder_pred(y)[:, p:]

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """The loss's target: x [B, C, H, W] -> float32 patches [B, L, p*p*C] (per-patch normalised when
        ``norm_pix_loss``)."""
        t = patchify(x.float(), self.backbone.patch_size)
        return normalise_patches(t) if self.config.norm_pix_loss else t

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: normalised images [B, C, H, W]; mask: bool [B, Gh, Gw], True = masked, ``num_kept`` visible
        patches per image.

        Returns ``(loss, prediction [B, C, H, W] in the target's units, pixel_mask [B, H, W])``.
        """
        flat = mask.flatten(1)
        ids_shuffle, ids_restore = visible_order(flat)
        latent = self.encode(x, ids_shuffle[:, : self.num_kept])
        b = self.backbone
        image = unpatchify(self.decode(latent, ids_restore), b.patch_size, b.in_chans, b.grid_size)
        loss = masked_patch_mse(patchify(image.float(), b.patch_size), self.target(x), flat)
        return loss, image, upsample_mask(mask, b.patch_size)

    def to_pixels(self, x: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """A ``forward`` prediction in the units of x [B, C, H, W]: with ``norm_pix_loss``, each patch
        de-normalised with the mean and std of the same patch of x (the target's own statistics)."""
        if not self.config.norm_pix_loss:
            return prediction
        b = self.backbone
        target = patchify(x.float(), b.patch_size)
        patches = denormalise_patches(patchify(prediction.float(), b.patch_size), target)
        return unpatchify(patches, b.patch_size, b.in_chans, b.grid_size)

    @property
    def reconstruction_label(self) -> str:
        """How ``to_pixels`` shows the prediction (diagnostics)."""
        if self.config.norm_pix_loss:
            return "MAE prediction (norm_pix_loss) de-normalised with each patch's own mean and std"
        return "MAE prediction"

    def training_step(self, images: torch.Tensor, generator: torch.Generator) -> StepOutput:
        # Data parallelism needs nothing more: every image has the same number of masked patches, so the
        # mean of the ranks' losses is the global batch's loss.
        x = self.views(images, generator)[0]
        mask = self.make_mask(x.shape[0], generator, x.device)
        loss, _, _ = self(x, mask)
        return StepOutput(loss=loss)


def _init_weights(module: nn.Module) -> None:
    """MAE's initialisation of the decoder: xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
