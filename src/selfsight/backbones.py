"""The only module that knows timm.

A :class:`Backbone` wraps a timm model created with ``num_classes=0`` (never subclassed, never
copied) and offers what the methods, the evaluation and the diagnostics need:

- ``forward(x) -> [B, D]``: timm's own pooled features (``forward_head(pre_logits=True)``);
- ``forward_map(x, mask, mask_token) -> [B, D, h, w]``: the last feature map, with an optional
  learnable mask token put in place of masked patch embeddings (ViT, Swin, SwinV2 only);
- ``features(x, layer, pool) -> [B, D_layer]``: pooled features of any block/stage, read with
  timm's ``forward_intermediates``;
- capabilities (``family``, ``supports_mask_token``), geometry (``patch_size``, ``grid_size``,
  ``encoder_stride``) and the timm name and options needed to re-create the model.
"""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch
import yaml
from torch import nn

from selfsight.errors import ConfigError

try:  # timm keeps these classes in stable module paths across 1.x releases
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    from timm.models.vision_transformer import VisionTransformer
except ImportError:  # pragma: no cover - very old timm
    SwinTransformer = SwinTransformerV2 = VisionTransformer = ()  # type: ignore[assignment]

POOLINGS = ("avg", "cls", "default")


def parse_backbone_opts(items: list[str] | None) -> dict[str, Any]:
    """Turn ``["img_size=32", "depths=2,2,6,2", "window_size=4"]`` into typed timm kwargs.

    Values are read as YAML scalars (``32`` -> int, ``0.1`` -> float, ``true`` -> bool); a value
    with commas or in brackets becomes a tuple (timm expects tuples for ``depths``, ``num_heads``).
    """
    opts: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"backbone option {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        raw = raw.strip()
        if "," in raw and not raw.startswith("["):
            raw = f"[{raw}]"
        try:
            value = yaml.safe_load(raw) if raw else raw
        except yaml.YAMLError as exc:
            raise ConfigError(f"backbone option {item!r}: cannot read the value ({exc.problem})") from None
        opts[key] = tuple(value) if isinstance(value, list) else value
    return opts


class StridedConvBf16Guard(nn.Conv2d):
    """``nn.Conv2d`` that computes in fp32 where oneDNN's bf16 weight gradient is wrong.

    Measured with torch 2.14 on an Intel Xeon with AVX-512 BF16/AMX (docs/benchmarks.md): under CPU bf16
    autocast, a convolution with horizontal stride > 1 and kernel width > 1 on an input one pixel wide
    (the last stage of a ResNet on 16-32-px images) gets a weight gradient that is wrong in most steps
    and non-finite in 10-40% of them, in both memory formats. Such inputs are tiny, so computing these
    calls in fp32 costs nothing measurable; everywhere else this is plain ``nn.Conv2d``. Swapped in by
    class (``_guard_strided_convs``): parameters, state dict keys and the exported timm model are unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 1 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def _guard_strided_convs(model: nn.Module) -> None:
    """Give every plain ``nn.Conv2d`` that strides horizontally with a kernel wider than 1 the fp32
    fallback of ``StridedConvBf16Guard`` (in place)."""
    for module in model.modules():
        if type(module) is nn.Conv2d and module.stride[1] > 1 and module.kernel_size[1] > 1:
            module.__class__ = StridedConvBf16Guard


def _family(model: nn.Module) -> str:
    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, SwinTransformer | SwinTransformerV2):
        return "swin"
    if not hasattr(model, "patch_embed"):
        return "cnn"
    return "other"


class Backbone(nn.Module):
    """A timm model (``self.model``) plus the feature and masking API selfsight needs.

    Args:
        name: a timm model name, e.g. ``vit_tiny_patch16_224``.
        opts: keyword options for ``timm.create_model`` (``img_size``, ``patch_size``, ``in_chans``...).
    """

    def __init__(self, name: str, opts: dict[str, Any] | None = None) -> None:
        super().__init__()
        opts = dict(opts or {})
        opts.pop("num_classes", None)
        if name not in timm.list_models():
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else " (see timm.list_models())"
            raise ConfigError(f"unknown backbone {name!r}{hint}")
        # CNNs take any input size and timm's CNN constructors have no img_size: it is then selfsight's alone
        # (the size images are read at), kept in ``opts`` but not passed to timm (see ``timm_kwargs``).
        self.timm_kwargs = dict(opts)
        try:
            try:
                self.model = timm.create_model(name, pretrained=False, num_classes=0, **self.timm_kwargs)
            except TypeError as exc:
                if "img_size" not in opts or "img_size" not in str(exc):
                    raise
                del self.timm_kwargs["img_size"]
                self.model = timm.create_model(name, pretrained=False, num_classes=0, **self.timm_kwargs)
        except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
            raise ConfigError(f"backbone {name} cannot be built with options {opts}: {exc}") from None
        _guard_strided_convs(self.model)
        self.name = name
        self.opts = opts
        self.family = _family(self.model)
        cfg = self.model.pretrained_cfg
        self.in_chans = int(opts.get("in_chans", cfg.get("input_size", (3,))[0]))
        img_size = opts.get("img_size", cfg.get("input_size", (3, 224, 224))[-1])
        self.img_size = int(img_size[-1] if isinstance(img_size, tuple | list) else img_size)
        self.num_features = int(self.model.num_features)
        self.encoder_stride = int(self.model.feature_info[-1]["reduction"]) if self.model.feature_info else 32
        patch_embed = getattr(self.model, "patch_embed", None)
        if patch_embed is not None and hasattr(patch_embed, "patch_size"):
            self.patch_size = int(patch_embed.patch_size[0])
            self.grid_size = tuple(int(g) for g in patch_embed.grid_size)
        else:
            self.patch_size = self.encoder_stride
            self.grid_size = (self.img_size // self.encoder_stride,) * 2
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))

    # --- capabilities -------------------------------------------------------------------------
    @property
    def supports_mask_token(self) -> bool:
        """True where a mask token can replace patch embeddings (timm ViT, Swin, SwinV2)."""
        return self.family in ("vit", "swin")

    @property
    def accepts_any_size(self) -> bool:
        """True where inputs of another size than ``img_size`` work (CNNs; ViTs built with dynamic_img_size)."""
        return self.family == "cnn" or (self.family == "vit" and bool(getattr(self.model, "dynamic_img_size", False)))

    @property
    def embed_dim(self) -> int:
        """Width of the patch embeddings (the mask token's size)."""
        if self.family == "vit":
            return int(self.model.embed_dim)
        if self.family == "swin":
            return int(self.model.layers[0].dim if hasattr(self.model.layers[0], "dim") else self.model.embed_dim)
        raise ConfigError(f"backbone {self.name} has no patch embedding")

    def describe(self) -> dict[str, Any]:
        """A json-able summary: name, options, family, parameter count, geometry."""
        return {
            "name": self.name,
            "opts": {k: list(v) if isinstance(v, tuple) else v for k, v in self.opts.items()},
            "family": self.family,
            "params_m": round(sum(p.numel() for p in self.model.parameters()) / 1e6, 3),
            "img_size": self.img_size,
            "in_chans": self.in_chans,
            "patch_size": self.patch_size,
            "encoder_stride": self.encoder_stride,
            "num_features": self.num_features,
        }

    # --- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> timm's pooled pre-logits features [B, D]."""
        return self.model(x)

    def forward_map(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Last feature map, optionally with masked patch embeddings replaced by ``mask_token``.

        Args:
            x: images [B, C, H, W].
            mask: bool [B, Gh, Gw] on the patch grid, True = masked (ViT/Swin only).
            mask_token: [D] learnable embedding, D = ``embed_dim``.
        Returns:
            features [B, D_out, H / encoder_stride, W / encoder_stride].
        """
        if mask is None:
            feats = self.model.forward_features(x)
            return self._to_map(feats)
        if not self.supports_mask_token:
            raise ConfigError(f"backbone {self.name} ({self.family}) cannot take a mask token")
        m = self.model
        tokens = m.patch_embed(x)  # ViT: [B, L, D] (or [B, h, w, D] with dynamic size); Swin: [B, h, w, D]
        weight = mask.reshape(tokens.shape[:-1]).unsqueeze(-1).to(tokens.dtype)
        tokens = tokens * (1.0 - weight) + mask_token.to(tokens.dtype) * weight
        if self.family == "vit":
            tokens = m._pos_embed(tokens)
            tokens = m.patch_drop(tokens)
            tokens = m.norm_pre(tokens)
            tokens = m.blocks(tokens)
            tokens = m.norm(tokens)
        else:
            tokens = m.layers(tokens)
            tokens = m.norm(tokens)
        return self._to_map(tokens)

    def _to_map(self, feats: torch.Tensor) -> torch.Tensor:
        """timm's forward_features output (NLC with prefix tokens, NHWC or NCHW) -> [B, D, h, w]."""
        if self.family == "vit":
            feats = feats[:, self.num_prefix_tokens :]
            h, w = self.grid_size
            return feats.transpose(1, 2).reshape(feats.shape[0], -1, h, w)
        if self.family == "swin":
            return feats.permute(0, 3, 1, 2)
        return feats

    def num_blocks(self) -> int:
        """How many blocks (ViT) or stages (Swin, CNN) ``features(layer=...)`` can read."""
        if self.family == "vit":
            return len(self.model.blocks)
        return len(self.model.feature_info)

    def features(self, x: torch.Tensor, layer: int = -1, pool: str = "avg") -> torch.Tensor:
        """Pooled features of one block/stage.

        Args:
            x: images [B, C, H, W].
            layer: block (ViT) or stage (Swin, CNN) index; negative counts from the end. The last
                one gets the model's final norm, intermediate ones are read raw.
            pool: ``avg`` (mean over positions), ``cls`` (ViT class token) or ``default``
                (timm's own pooling, last layer only).
        Returns:
            [B, D_layer]
        """
        if pool not in POOLINGS:
            raise ConfigError(f"unknown pooling {pool!r}; choose from {', '.join(POOLINGS)}")
        n = self.num_blocks()
        index = layer + n if layer < 0 else layer
        if not 0 <= index < n:
            raise ConfigError(f"layer {layer} out of range for {self.name}, which has {n} blocks/stages")
        last = index == n - 1
        if pool == "default":
            if not last:
                raise ConfigError("pool=default reads the last layer only; use avg or cls for other layers")
            return self.model(x)
        if pool == "cls" and (self.family != "vit" or self.num_prefix_tokens == 0):
            raise ConfigError(f"pool=cls needs a ViT with a class token; {self.name} has none")
        if self.family == "vit":
            out = self.model.forward_intermediates(
                x, indices=[index], norm=last, intermediates_only=True, return_prefix_tokens=pool == "cls"
            )[0]
            if pool == "cls":
                return out[1][:, 0]
            return out.mean(dim=(2, 3))
        if last:
            return self.forward_map(x).mean(dim=(2, 3))
        out = self.model.forward_intermediates(x, indices=[index], intermediates_only=True)[0]
        return out.mean(dim=(2, 3))

    # --- optimisation helpers -----------------------------------------------------------------
    def no_weight_decay_names(self) -> set[str]:
        """Parameter names (relative to ``self.model``) that timm excludes from weight decay."""
        getter = getattr(self.model, "no_weight_decay", None)
        return set(getter()) if callable(getter) else set()


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with its BatchNorm layers replaced by ``torch.nn.SyncBatchNorm`` (CUDA data parallelism).

    timm's converter: it also converts timm's BatchNormAct layers (norm + activation in one module),
    which ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` would turn into a bare norm. Parameters and
    buffers are shared with the replaced layers.
    """
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(module)


def param_groups(module: nn.Module, weight_decay: float, skip_names: set[str] | None = None) -> list[dict]:
    """Two AdamW groups: weights with decay; biases, norms, tokens and embeddings without.

    A parameter goes to the no-decay group when it has one dimension, or its name ends with one
    of ``skip_names`` (e.g. ``pos_embed``, ``cls_token``, ``mask_token``).
    """
    skip_names = set(skip_names or ()) | {"mask_token", "pos_embed", "cls_token", "absolute_pos_embed"}
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or any(name == s or name.endswith("." + s) for s in skip_names):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
