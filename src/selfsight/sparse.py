"""Masked dense convolution for SparK (Tian et al. 2023): a timm CNN made "sparse" by module class swaps.

While a mask is set (``SparseState.use``), every convolution, pooling, Linear (on NHWC maps) and
LayerNorm output is multiplied by the mask at its own resolution, so masked positions stay exactly zero
through the network and nothing of the masked pixels reaches a visible position; BatchNorm computes its
statistics over the active (visible) positions only, and writes zeros at the masked ones. Without a mask
every swapped module computes exactly what its timm class computes (the k-NN monitor, evaluation).

The swaps (``sparsify``) change ``__class__`` only: parameters, buffers, state dict keys, and so the
exported timm model, are untouched. A module that the swap does not know how to make sparse is refused by
name (``unsupported_modules``): GroupNorm, SE/ECA attention (they average over all positions), ...

The mask at a resolution H x W is the grid mask ``active`` [B, 1, h, w] repeated ``H / h`` times along the
rows and ``W / w`` along the columns (SparK's ``_get_active_ex_or_ii``); H and W must be multiples of h, w.
"""

from __future__ import annotations

import torch
from timm.layers import DropPath, LayerNorm2d, Mlp
from timm.layers import activations as timm_act
from timm.models.convnext import ConvNeXtBlock, ConvNeXtStage
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from selfsight import distributed
from selfsight.errors import ConfigError

#: leaf modules that compute elementwise (f(0) = 0 or dropout): nothing to do
ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Identity, nn.Dropout, DropPath,
    timm_act.GELU, timm_act.GELUTanh, timm_act.QuickGELU, timm_act.Swish, timm_act.HardSwish,
)
#: modules with children whose own computation is a residual sum, a permute or an elementwise scale
CONTAINERS = (nn.Sequential, nn.ModuleList, BasicBlock, Bottleneck, ConvNeXtBlock, ConvNeXtStage, Mlp)
#: leaf modules made sparse by multiplying their output by the mask (NCHW), and those working on NHWC maps
MASK_NCHW = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, LayerNorm2d)
MASK_NHWC = (nn.LayerNorm, nn.Linear)


class SparseState:
    """The current mask, shared by every swapped module of one method: ``active`` bool [B, 1, h, w],
    True = visible, or None (dense)."""

    def __init__(self) -> None:
        self.active: torch.Tensor | None = None

    def use(self, active: torch.Tensor | None) -> _Using:
        """``with state.use(active): ...`` runs the swapped modules sparse on ``active``."""
        return _Using(self, active)

    def at(self, height: int, width: int) -> torch.Tensor:
        """The mask at resolution H x W: bool [B, 1, H, W]."""
        active = self.active
        h, w = active.shape[-2:]
        if height % h or width % w:
            raise ConfigError(f"a {height}x{width} feature map is not a whole multiple of the {h}x{w} mask grid")
        return active.repeat_interleave(height // h, dim=2).repeat_interleave(width // w, dim=3)


class _Using:
    def __init__(self, state: SparseState, active: torch.Tensor | None) -> None:
        self.state, self.active = state, active

    def __enter__(self) -> None:
        self.previous, self.state.active = self.state.active, self.active

    def __exit__(self, *exc) -> None:
        self.state.active = self.previous


class _MaskOutput:
    """Mixin: the host class's output times the mask (NCHW maps)."""

    sparse_state: SparseState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.sparse_state.active is None:
            return out
        return out * self.sparse_state.at(out.shape[-2], out.shape[-1]).to(out.dtype)


class _MaskOutputNHWC:
    """Mixin: the host class's output times the mask, for [B, H, W, C] maps (ConvNeXt's LayerNorm and
    Linear layers between permutes); other shapes pass through."""

    sparse_state: SparseState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.sparse_state.active is None or out.ndim != 4:
            return out
        return out * self.sparse_state.at(out.shape[1], out.shape[2]).permute(0, 2, 3, 1).to(out.dtype)


class SparseBatchNorm2d(nn.Module):
    """BatchNorm2d over the active positions only (SparK's ``SparseBatchNorm2d``), zeros at masked ones.

    Not a ``_BatchNorm`` subclass on purpose: the engine's data-parallel conversion (SyncBatchNorm on CUDA,
    GlobalBatchNorm on the CPU) would replace it by a dense layer; its statistics are already those of the
    global batch's active positions (each rank's moments, gathered with gradients, combined exactly).
    It holds BatchNorm2d's parameters and buffers (same state dict). Without a mask it is BatchNorm2d.
    """

    sparse_state: SparseState
    num_features: int
    eps: float
    momentum: float | None

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> [B, C, H, W], zeros at the masked positions while a mask is set."""
        if self.sparse_state.active is None:
            return nn.BatchNorm2d.forward(self, x)
        weight = self.sparse_state.at(x.shape[-2], x.shape[-1]).float()  # [B, 1, H, W]
        x32 = x.float()
        if self.training or not self.track_running_stats:
            mean, var = self._active_moments(x32, weight)
        else:
            mean, var = self.running_mean.float(), self.running_var.float()
        shape = (1, -1, 1, 1)
        y = (x32 - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
        return (y * weight).to(x.dtype)

    def _active_moments(self, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and biased variance [C] over the active positions of the global batch; updates
        the running statistics (unbiased variance, as BatchNorm) in training mode."""
        count = weight.sum()
        mean = (x * weight).sum(dim=(0, 2, 3)) / count
        var = (((x - mean.view(1, -1, 1, 1)) * weight) ** 2).sum(dim=(0, 2, 3)) / count
        if distributed.world() > 1:
            counts = count.expand_as(mean)
            stats = distributed.gather_with_grad(torch.stack([mean, var, counts]).unsqueeze(0))  # [W, 3, C]
            means, variances, counts = stats.unbind(dim=1)
            count = counts.sum(dim=0)
            share = counts / count
            mean = (share * means).sum(dim=0)
            var = (share * (variances + (means - mean) ** 2)).sum(dim=0)
            count = count[0]
        if self.training and self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count.detach())
        return mean, var

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * count / (count - 1).clamp_min(1.0)
        self.running_mean.mul_(1 - factor).add_(factor * mean.to(self.running_mean.dtype))
        self.running_var.mul_(1 - factor).add_(factor * unbiased.to(self.running_var.dtype))

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, sparse"

    @classmethod
    def create(cls, num_features: int, state: SparseState) -> SparseBatchNorm2d:
        """A new sparse BatchNorm2d (SparK's densify norm)."""
        module = nn.BatchNorm2d(num_features)
        module.__class__ = cls
        module.sparse_state = state
        return module


_SPARSE_CLASSES: dict[type, type] = {}


def sparse_class(cls: type) -> type:
    """The sparse subclass of ``cls`` (cached, so every instance of one class gets the same class)."""
    if cls not in _SPARSE_CLASSES:
        mixin = _MaskOutputNHWC if issubclass(cls, MASK_NHWC) and not issubclass(cls, LayerNorm2d) else _MaskOutput
        name = f"Sparse{cls.__name__}"
        while name in globals():  # another class of the same name (from another module)
            name += "_"
        sparse = type(name, (mixin, cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = sparse  # importable by name: whole-model pickles (torch.save(model)) work
        _SPARSE_CLASSES[cls] = sparse
    return _SPARSE_CLASSES[cls]


def _is_sparse(module: nn.Module) -> bool:
    return isinstance(module, _MaskOutput | _MaskOutputNHWC | SparseBatchNorm2d)


def unsupported_modules(modules: list[tuple[str, nn.Module]]) -> list[str]:
    """``name (ClassName)`` of each module SparK cannot make sparse, among ``modules``."""
    bad = []
    for name, module in modules:
        kind = type(module)
        if _is_sparse(module) or kind is nn.BatchNorm2d or isinstance(module, ELEMENTWISE):
            continue
        if isinstance(module, MASK_NCHW + MASK_NHWC) and not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        if isinstance(module, CONTAINERS):
            continue
        bad.append(f"{name} ({kind.__name__})")
    return bad


def sparsify(modules: list[nn.Module], state: SparseState) -> None:
    """Swap the class of each convolution, pooling, norm and (NHWC) Linear of ``modules`` for its sparse
    version reading ``state`` (in place; parameters and state dict unchanged). Check them with
    ``unsupported_modules`` first."""
    for module in modules:
        if _is_sparse(module):
            module.sparse_state = state
        elif type(module) is nn.BatchNorm2d:
            module.__class__ = SparseBatchNorm2d
            module.sparse_state = state
        elif isinstance(module, MASK_NCHW + MASK_NHWC):
            module.__class__ = sparse_class(type(module))
            module.sparse_state = state

