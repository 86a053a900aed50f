"""A FIFO queue of past keys: the negatives of MoCo v2 and MoBY."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KeyQueue(nn.Module):
    """``size`` L2-normalised keys of dimension ``dim``, the oldest replaced first.

    The queue and its write position are buffers, so they are saved in checkpoints and restored on
    resume. It starts filled with random unit vectors, as in MoCo.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be at least 1, got {size}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("position", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """keys: [N, dim] -> written (normalised, detached) at the write position, wrapping around.

        When N exceeds the queue size only the last ``size`` keys are kept.
        """
        keys = F.normalize(keys.detach().float(), dim=1)[-self.size :]
        n = keys.shape[0]
        slots = (self.position + torch.arange(n, device=keys.device)) % self.size
        self.keys[slots] = keys.to(self.keys.dtype)
        self.position.copy_((self.position + n) % self.size)
