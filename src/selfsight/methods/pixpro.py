"""PixPro (Xie et al. 2021, "Propagate Yourself: Exploring Pixel-Level Consistency for Unsupervised Visual
Representation Learning").

Pixel-level BYOL on the backbone's last feature map (ResNet C5, Swin's last stage, a ViT's token grid). An
online encoder (backbone + 2-layer 1x1-conv projector with BatchNorm) and a momentum encoder (backbone +
projector; momentum 0.99 rising to 1 on a cosine schedule) see two views of each image. The online
projection goes through the pixel propagation module (PPM): ``y_i = sum_j s_ij g(x_j) / |g(x_j)|`` with
``s_ij = max(cos(x_i, x_j), 0) ** gamma``, gamma 2, ``g`` one 1x1 conv (no softmax, no row normalisation).
Positive pixel pairs are the feature-map cells of the two views whose bin centres, in source-image
coordinates (from each view's crop box and flip), lie closer than ``pos_ratio`` (0.7) times the larger bin
diagonal. The loss per direction is ``-2 * mean_b[sum(cos(y_i, k_j) * pos_ij) / (sum(pos_ij) + 1e-6)]``
with ``k`` the momentum projection of the other view, summed over both directions: in [-4, 4], negative
values are normal. An optional BYOL-style instance branch (``instance_weight > 0``) adds ``-2 cos`` of the
pooled predictions and the other view's pooled momentum projections, as the official code does.

Follows the official code (zdaxie/PixPro, ``contrast/models/PixPro.py``): the projector's hidden width is
4096 there (``Proj_Head``), the PPM normalises ``g(x_j)`` before propagating and ``g`` is one 1x1 conv with
a bias (``--pixpro-transform-layer 1``; ``transform_layers`` 0 is the identity, 2 conv-BN-ReLU-conv). Each
view is encoded in its own pass (per-view BatchNorm statistics), as there. The momentum encoder keeps its
own BatchNorm statistics. Departures: AdamW instead of LARS (lr 1.0 x batch / 256, weight decay 1e-5,
100 epochs on ResNet-50); crop boxes in continuous source pixels instead of the official pixel-index
coordinates normalised by (side - 1). The views come with their geometry (crop box and flip): DataLoader
workers that build them (``worker_view_maker``) ship it after the views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from selfsight.backbones import Backbone
from selfsight.data.views import ViewParams, ViewSpec, make_views_with_params
from selfsight.data.worker_views import PreparedViews
from selfsight.ema import cosine_momentum, ema_update, make_momentum_copy
from selfsight.errors import ConfigError
from selfsight.methods.base import Method, StepOutput
from selfsight.methods.common import TwoViewOptions, embedding_std, full_precision
from selfsight.registry import register_method

__all__ = ["ConvMLP", "PixPro", "PixProViews", "PixelPropagation", "bin_centres", "pixpro_loss", "positive_pairs",
           "view_geometry"]


class ConvMLP(nn.Sequential):
    """The official ``MLP2d``: 1x1 conv (bias) -> BatchNorm2d -> ReLU -> 1x1 conv (bias).
    [B, in_dim, H, W] -> [B, out_dim, H, W]."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(nn.Conv2d(in_dim, hidden_dim, 1), nn.BatchNorm2d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden_dim, out_dim, 1))


class PixelPropagation(nn.Module):
    """The pixel propagation module: ``y_i = sum_j max(cos(x_i, x_j), 0) ** gamma * v_j``, ``v_j = g(x_j) / |g(x_j)|``.

    ``g`` (``transform``): ``layers`` 0 the identity, 1 one 1x1 conv (the paper's and the default), 2 a
    ConvMLP of width ``dim``. x: [B, C, H, W] -> y: [B, C, H, W] (not normalised).
    """

    def __init__(self, dim: int, gamma: float = 2.0, layers: int = 1) -> None:
        super().__init__()
        transforms = {0: nn.Identity, 1: lambda: nn.Conv2d(dim, dim, 1), 2: lambda: ConvMLP(dim, dim, dim)}
        if layers not in transforms:
            raise ConfigError(f"transform_layers must be 0, 1 or 2, got {layers}")
        self.transform = transforms[layers]()
        self.gamma = gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        value = F.normalize(self.transform(x), dim=1).flatten(2)  # [B, C, HW]
        unit = F.normalize(x, dim=1).flatten(2)  # [B, C, HW]
        similarity = (unit.transpose(1, 2) @ unit).clamp(min=0) ** self.gamma  # [B, HW, HW], symmetric
        return (value @ similarity.transpose(1, 2)).view(batch, channels, height, width)


def bin_centres(boxes: torch.Tensor, flip: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centres, in source pixels, of the height x width bins a view's crop box is cut into by its feature map.

    boxes: [B, 4] (left, top, width, height) in source pixels; flip: bool [B] (the view is mirrored, so its
    column 0 is the box's right edge: x1 and x2 swap, as in the official ``RandomHorizontalFlipCoord``).
    Returns [B, height * width, 2] (x, y), row-major over the map.
    """
    boxes = boxes.double()
    left, top, box_w, box_h = boxes.unbind(dim=1)
    sign = 1 - 2 * flip.to(boxes)
    start_x = torch.where(flip.bool(), left + box_w, left)
    columns = torch.arange(width, dtype=boxes.dtype) + 0.5
    rows = torch.arange(height, dtype=boxes.dtype) + 0.5
    x = start_x[:, None] + (sign * box_w / width)[:, None] * columns  # [B, W]
    y = top[:, None] + (box_h / height)[:, None] * rows  # [B, H]
    grid = torch.stack([x[:, None, :].expand(-1, height, -1), y[:, :, None].expand(-1, -1, width)], dim=-1)
    return grid.flatten(1, 2)


def view_geometry(params: ViewParams) -> torch.Tensor:
    """A view's crop boxes and flips as one float32 [B, 5] tensor: (left, top, width, height, flip 0 or 1)."""
    return torch.cat([params.boxes.float(), params.flip.float().unsqueeze(1)], dim=1)


def positive_pairs(geometry_q: torch.Tensor, geometry_k: torch.Tensor, height: int, width: int,
                   pos_ratio: float = 0.7) -> torch.Tensor:
    """float32 [B, HW, HW] on the CPU: 1 where cell i of view q and cell j of view k are a positive pair, i.e.
    the distance of their bin centres (``bin_centres``) is below ``pos_ratio`` times the larger of the two
    views' bin diagonals. geometry_q, geometry_k: [B, 5] (``view_geometry``)."""
    geometry_q, geometry_k = geometry_q.detach().cpu(), geometry_k.detach().cpu()
    centre_q = bin_centres(geometry_q[:, :4], geometry_q[:, 4] > 0.5, height, width)
    centre_k = bin_centres(geometry_k[:, :4], geometry_k[:, 4] > 0.5, height, width)

    def diagonal(boxes: torch.Tensor) -> torch.Tensor:
        return torch.hypot(boxes[:, 2].double() / width, boxes[:, 3].double() / height)

    scale = torch.maximum(diagonal(geometry_q), diagonal(geometry_k)).view(-1, 1, 1)
    return (torch.cdist(centre_q, centre_k) / scale < pos_ratio).float()


def pixpro_loss(q: torch.Tensor, k: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """One direction of the PixPro loss: ``-2 * mean_b[sum_ij cos(q_i, k_j) pos_ij / (sum_ij pos_ij + 1e-6)]``.

    q: [B, C, H, W] (propagated online projection), k: [B, C, H, W] (momentum projection of the other view;
    detached by the caller), positives: [B, HW, HW]. In [-2, 2]; 0 for an image without a positive pair.
    """
    q = F.normalize(q.flatten(2), dim=1)
    k = F.normalize(k.flatten(2), dim=1)
    positives = positives.to(q)
    cosine = q.transpose(1, 2) @ k  # [B, HW, HW]
    per_image = (cosine * positives).sum(dim=(1, 2)) / (positives.sum(dim=(1, 2)) + 1e-6)
    return -2 * per_image.mean()


@dataclass(frozen=True)
class PixProViews:
    """PixPro's views as DataLoader workers build them (a picklable ``ViewMaker``): ``make_views_with_params``
    with fixed specs and normalisation (mean, std: float32 [1, C, 1, 1] on the CPU), returning the views
    [B, C, s, s] followed by each view's ``view_geometry`` [B, 5]."""

    specs: tuple[ViewSpec, ...]
    mean: torch.Tensor
    std: torch.Tensor

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        views, params = make_views_with_params(images, self.specs, self.mean, self.std, generator=generator)
        return views + [view_geometry(p) for p in params]


@register_method("pixpro")
class PixPro(Method):
    """PixPro on a feature map: timm CNNs (the paper's ResNet C5), Swin's last stage, a ViT's token grid."""

    @dataclass
    class Config(TwoViewOptions):
        """Defaults of the paper's ResNet-50 recipe (official ``tools/pixpro_base_r50_100ep.sh``)."""

        proj_hidden_dim: int = 4096
        proj_dim: int = 256
        #: bin centres closer than this many (larger) bin diagonals are positive pairs
        pos_ratio: float = 0.7
        #: sharpness of the propagation similarity
        gamma: float = 2.0
        #: the PPM's transform g: 0 identity, 1 one 1x1 conv, 2 conv-BN-ReLU-conv
        transform_layers: int = 1
        #: momentum at step 0; rises to 1 on a cosine schedule
        base_momentum: float = 0.99
        #: weight of the BYOL-style instance branch (0: off, as in the paper's PixPro)
        instance_weight: float = 0.0
        pred_hidden_dim: int = 4096

    def __init__(self, backbone: Backbone, config: PixPro.Config, mean: list[float], std: list[float]) -> None:
        super().__init__(backbone, config, mean, std)
        if backbone.family not in ("cnn", "swin", "vit"):
            raise ConfigError(f"pixpro needs a feature map: a timm CNN, Swin or ViT; {backbone.name} is "
                              f"{backbone.family}")
        if config.pos_ratio <= 0:
            raise ConfigError(f"pos_ratio must be > 0, got {config.pos_ratio}")
        width = backbone.num_features
        self.projector = ConvMLP(width, config.proj_hidden_dim, config.proj_dim)
        self.propagation = PixelPropagation(config.proj_dim, config.gamma, config.transform_layers)
        self.target_backbone = make_momentum_copy(backbone)
        self.target_projector = make_momentum_copy(self.projector)
        if config.instance_weight > 0:
            self.instance_projector = ConvMLP(width, config.proj_hidden_dim, config.proj_dim)
            self.instance_predictor = ConvMLP(config.proj_dim, config.pred_hidden_dim, config.proj_dim)
            self.target_instance_projector = make_momentum_copy(self.instance_projector)
        self.view_specs = config.two_view_specs(backbone.img_size, backbone.in_chans)

    def worker_view_maker(self) -> PixProViews:
        """The recipe DataLoader workers run (see ``selfsight.data.worker_views``): views and their geometry."""
        mean = self.mean.detach().to("cpu", torch.float32).clone()
        std = self.std.detach().to("cpu", torch.float32).clone()
        return PixProViews(tuple(self.view_specs), mean, std)

    def views_with_geometry(self, images: torch.Tensor | PreparedViews, generator: torch.Generator
                            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The two normalised views [B, C, s, s] and their ``view_geometry`` [B, 5] (crop boxes, flips).

        images: uint8 [B, C, S, S], or the PreparedViews a DataLoader worker built with ``worker_view_maker``
        (then ``generator`` is set to the state after the view draws, as ``Method.views`` does)."""
        if isinstance(images, PreparedViews):
            tensors = images.restore(generator)
        else:
            tensors = PixProViews(tuple(self.view_specs), self.mean, self.std)(images, generator)
        count = len(self.view_specs)
        return tensors[:count], tensors[count:]

    def views(self, images: torch.Tensor | PreparedViews, generator: torch.Generator) -> list[torch.Tensor]:
        """The two views [B, C, s, s], as ``Method.views``."""
        return self.views_with_geometry(images, generator)[0]

    def training_step(self, images: torch.Tensor, generator: torch.Generator) -> StepOutput:
        (x1, x2), (geometry1, geometry2) = self.views_with_geometry(images, generator)
        feat1, feat2 = self.backbone.forward_map(x1), self.backbone.forward_map(x2)  # [B, D, h, w]
        proj1, proj2 = self.projector(feat1), self.projector(feat2)
        with torch.no_grad():
            target_feat1, target_feat2 = self.target_backbone.forward_map(x1), self.target_backbone.forward_map(x2)
            key1, key2 = self.target_projector(target_feat1), self.target_projector(target_feat2)
        height, width = proj1.shape[-2:]
        pos12 = positive_pairs(geometry1, geometry2, height, width, self.config.pos_ratio).to(x1.device)
        with full_precision(x1.device):
            pred1, pred2 = self.propagation(proj1.float()), self.propagation(proj2.float())
            loss = pixpro_loss(pred1, key2.float(), pos12) + pixpro_loss(pred2, key1.float(), pos12.transpose(1, 2))
        metrics = embedding_std(proj1.mean(dim=(2, 3)))
        metrics["positive_pairs"] = float(pos12.sum(dim=(1, 2)).mean())
        if self.config.instance_weight > 0:
            instance = self._instance_loss(feat1, feat2, target_feat1, target_feat2)
            metrics["instance_loss"] = float(instance.detach())
            loss = loss + self.config.instance_weight * instance
        return StepOutput(loss=loss, metrics=metrics)

    def _instance_loss(self, feat1: torch.Tensor, feat2: torch.Tensor, target1: torch.Tensor,
                       target2: torch.Tensor) -> torch.Tensor:
        """BYOL on pooled maps, as the official instance branch: ``-2 cos`` of each view's pooled prediction and
        the other view's pooled momentum projection, averaged over the batch and summed over directions."""
        pred1 = self.instance_predictor(self.instance_projector(feat1)).mean(dim=(2, 3))  # [B, proj_dim]
        pred2 = self.instance_predictor(self.instance_projector(feat2)).mean(dim=(2, 3))
        with torch.no_grad():
            key1 = self.target_instance_projector(target1).mean(dim=(2, 3))
            key2 = self.target_instance_projector(target2).mean(dim=(2, 3))
        with full_precision(feat1.device):
            return -2 * (F.cosine_similarity(pred1.float(), key2.float()).mean()
                         + F.cosine_similarity(pred2.float(), key1.float()).mean())

    def on_step_end(self, step: int, total_steps: int) -> None:
        momentum = cosine_momentum(step + 1, total_steps, self.config.base_momentum)
        ema_update(self.target_backbone, self.backbone, momentum)
        ema_update(self.target_projector, self.projector, momentum)
        if self.config.instance_weight > 0:
            ema_update(self.target_instance_projector, self.instance_projector, momentum)
