"""Projection / prediction heads shared by the contrastive and self-distillation methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOHead", "MLPHead"]


class MLPHead(nn.Module):
    """An MLP of ``num_layers`` Linear layers: (Linear-BN-ReLU) x (num_layers - 1), then a Linear.

    The projector / predictor of SimCLR, BYOL, MoCo v2/v3 and MoBY. With ``batch_norm`` the hidden
    Linears have no bias (the BN that follows has one). ``last_bn`` appends a BatchNorm1d without
    affine parameters after the final Linear (MoCo v3 projector, SimCLR v2); that Linear then has no
    bias either. ``num_layers=1`` is a single Linear (plus the optional final BN).

    Input [N, in_dim] -> output [N, out_dim].
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        batch_norm: bool = True,
        last_bn: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(width, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            width = hidden_dim
        layers.append(nn.Linear(width, out_dim, bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, in_dim] -> [N, out_dim]."""
        return self.layers(x)


class DINOHead(nn.Module):
    """DINO's projection head: MLP with GELU -> L2-normalised bottleneck -> weight-normalised Linear.

    The MLP has ``num_layers`` Linears (in_dim -> hidden_dim ... -> bottleneck_dim, GELU between them;
    ``num_layers=1`` is one Linear in_dim -> bottleneck_dim). The last layer is
    ``Linear(bottleneck_dim, out_dim, bias=False)`` reparametrised with ``weight_norm`` (dim 0, so each
    of the ``out_dim`` weight rows is ``g * v / ||v||``). The magnitudes ``g`` start at 1; with
    ``norm_last_layer`` they stay frozen at 1, so the output is a cosine similarity to ``out_dim``
    prototypes.

    Input [N, in_dim] -> logits [N, out_dim].
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if num_layers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(num_layers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(self._init_linear)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False), name="weight", dim=0)
        magnitude = self.last_layer.parametrizations.weight.original0  # g: [out_dim, 1]
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, in_dim] -> logits [N, out_dim]."""
        bottleneck = F.normalize(self.mlp(x), dim=-1)  # [N, bottleneck_dim], unit norm
        return self.last_layer(bottleneck)
