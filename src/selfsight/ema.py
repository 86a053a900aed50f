"""Momentum (EMA) target networks shared by BYOL, MoCo, MoBY and DINO."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["cosine_momentum", "ema_update", "make_momentum_copy"]


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """BYOL / MoBY / DINO momentum schedule: ``1 - (1 - base) * (cos(pi * step / total_steps) + 1) / 2``.

    ``base`` at step 0, ``(1 + base) / 2`` half-way, 1.0 at ``step == total_steps``; steps outside
    ``[0, total_steps]`` are clamped.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    progress = min(max(step, 0), total_steps) / total_steps
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """In place, parameters only: ``target_param = momentum * target_param + (1 - momentum) * online_param``.

    Parameters are matched by name (the two modules must have the same structure, as a
    ``make_momentum_copy`` does). Buffers (BatchNorm running statistics, counters) are left alone:
    as in the official MoCo v2/v3, BYOL, MoBY and DINO code, the target keeps its own running
    statistics, which its train-mode forward in each training step updates from the batches it sees.
    ``momentum = 1`` keeps the target, ``momentum = 0`` copies the online parameters.
    """
    target_params = dict(target.named_parameters())
    online_params = dict(online.named_parameters())
    if target_params.keys() != online_params.keys():
        raise ValueError("target and online modules have different parameters")
    names = list(target_params)
    torch._foreach_lerp_([target_params[n] for n in names], [online_params[n].detach() for n in names], 1.0 - momentum)


def make_momentum_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters do not require gradients (the momentum target)."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target
