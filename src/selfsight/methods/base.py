"""The small interface every method implements; the engine knows nothing else about methods."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
from torch import nn

from selfsight.backbones import Backbone, param_groups
from selfsight.data.views import ViewSpec, make_views
from selfsight.data.worker_views import PreparedViews


@dataclass
class StepOutput:
    """What one training step returns: the loss to minimise and scalars to log."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class Method(nn.Module, abc.ABC):
    """Base of all methods: holds the backbone and the input normalisation.

    Subclasses define ``Config`` (a dataclass), ``training_step`` and, when they keep momentum
    encoders or schedules, ``on_step_end``.
    """

    Config: type
    method_name: str
    #: the attribute holding the backbone that ``export``/``eval`` use (DINO: its teacher)
    export_backbone: str = "backbone"

    def __init__(self, backbone: Backbone, config, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    @abc.abstractmethod
    def training_step(self, images: torch.Tensor, generator: torch.Generator) -> StepOutput:
        """images: uint8 [B, C, S, S] on the training device; all randomness from ``generator``."""

    #: the recipes of the views a step trains on (set by methods that use ``selfsight.data.views``)
    view_specs: list[ViewSpec]

    def views(self, images: torch.Tensor | PreparedViews, generator: torch.Generator) -> list[torch.Tensor]:
        """The augmented, normalised float views [B, C, s, s] one training step would see (one per view spec).

        images: uint8 [B, C, S, S], or the PreparedViews a DataLoader worker built from them with this
        step's generator: then those views are returned and ``generator`` is set to the state after
        the view draws, so every later draw is the one it would be without workers.
        """
        if isinstance(images, PreparedViews):
            return images.restore(generator)
        return make_views(images, self.view_specs, self.mean, self.std, generator=generator)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups; biases, norms, tokens and position embeddings get no weight decay."""
        return param_groups(self, weight_decay, self.backbone.no_weight_decay_names())

    def on_step_end(self, step: int, total_steps: int) -> None:
        """Called after every optimiser step (momentum updates, schedules). Default: nothing."""

    def on_step_skipped(self) -> None:
        """Called instead of ``on_step_end`` when the engine skips a step whose gradients were not all
        finite: drop whatever ``training_step`` set aside for ``on_step_end`` (keys for a queue, a batch
        mean for a centre), so the skipped step changes nothing. Default: nothing."""
