"""MoBY (Xie et al. 2021, "Self-Supervised Learning with Swin Transformers").

MoCo v2 meets BYOL: an online encoder (backbone + projector + predictor) and a momentum encoder
(backbone + projector; momentum 0.99 rising to 1 on a cosine schedule). Each view's prediction is
contrasted with the momentum key of the other view against a queue of past keys of that other view
(two queues, 4,096 keys each), temperature 0.2; the loss sums both directions. Heads: 2-layer MLPs
with BN, 4096 hidden, 256 out. Views: BYOL's asymmetric recipe. Each view is encoded in its own pass.
Data parallelism: every rank's keys are gathered before they enter the queues (the same on every rank).

The momentum encoder's parameters follow the online encoder's (``ema_update``); its BatchNorm running
statistics are its own, updated by its train-mode forward on the keys, as in the official code
(SwinTransformer/Transformer-SSL ``models/moby.py``, ``_momentum_update_key_encoder``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfsight import distributed
from selfsight.backbones import Backbone
from selfsight.ema import cosine_momentum, ema_update, make_momentum_copy
from selfsight.heads import MLPHead
from selfsight.losses import info_nce
from selfsight.methods.base import Method, StepOutput
from selfsight.methods.common import TwoViewOptions, embedding_std, full_precision
from selfsight.queues import KeyQueue
from selfsight.registry import register_method


@register_method("moby")
class MoBY(Method):
    """MoBY on any timm backbone: Swin and ViT as in the paper, CNNs as well."""

    @dataclass
    class Config(TwoViewOptions):
        proj_hidden_dim: int = 4096
        proj_dim: int = 256
        pred_hidden_dim: int = 4096
        queue_size: int = 4096
        temperature: float = 0.2
        #: momentum at step 0; rises to 1 on a cosine schedule
        base_momentum: float = 0.99

    def __init__(self, backbone: Backbone, config: MoBY.Config, mean: list[float], std: list[float]) -> None:
        super().__init__(backbone, config, mean, std)
        self.projector = MLPHead(backbone.num_features, config.proj_hidden_dim, config.proj_dim)
        self.predictor = MLPHead(config.proj_dim, config.pred_hidden_dim, config.proj_dim)
        self.target_backbone = make_momentum_copy(backbone)
        self.target_projector = make_momentum_copy(self.projector)
        self.queue1 = KeyQueue(config.queue_size, config.proj_dim)  # keys of first views
        self.queue2 = KeyQueue(config.queue_size, config.proj_dim)  # keys of second views
        self.view_specs = config.two_view_specs(backbone.img_size, backbone.in_chans)
        self._pending_keys: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, images: torch.Tensor, generator: torch.Generator) -> StepOutput:
        x1, x2 = self.views(images, generator)
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            k1 = self.target_projector(self.target_backbone(x1))
            k2 = self.target_projector(self.target_backbone(x2))
        t = self.config.temperature
        with full_precision(x1.device):
            loss = info_nce(p1.float(), k2.float(), t, negatives=self.queue2.keys) + info_nce(
                p2.float(), k1.float(), t, negatives=self.queue1.keys
            )
        # every rank's keys, enqueued after the optimiser step
        self._pending_keys.append((distributed.gather(k1.detach()), distributed.gather(k2.detach())))
        return StepOutput(loss=loss, metrics=embedding_std(z1))

    def on_step_end(self, step: int, total_steps: int) -> None:
        momentum = cosine_momentum(step + 1, total_steps, self.config.base_momentum)
        ema_update(self.target_backbone, self.backbone, momentum)
        ema_update(self.target_projector, self.projector, momentum)
        for keys1, keys2 in self._pending_keys:
            self.queue1.push(keys1)
            self.queue2.push(keys2)
        self._pending_keys.clear()

    def on_step_skipped(self) -> None:
        self._pending_keys.clear()  # a skipped step's keys never enter the queues
