"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent").

An online network (backbone + projector + predictor) regresses the projection that a target network
(an exponential moving average of backbone + projector, momentum 0.996 rising to 1 on a cosine
schedule) gives for the other view of the same image. The loss is the negative cosine
``2 - 2 cos(p, z')``, symmetrised over the two views; there are no negatives. Heads: 2-layer MLPs
(Linear-BN-ReLU-Linear), 4096 hidden, 256 out. Views: BYOL's asymmetric recipe (blur 1.0 / 0.1,
solarize 0 / 0.2).

The target's parameters follow the online network's (``ema_update``); its BatchNorm running statistics
are its own, updated by its train-mode forward on the views, as in the official code
(deepmind-research ``byol/byol_experiment.py``: ``target_params`` is a moving average, ``target_state``
comes from the target's own forward with ``is_training=True``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfsight.backbones import Backbone
from selfsight.ema import cosine_momentum, ema_update, make_momentum_copy
from selfsight.heads import MLPHead
from selfsight.losses import negative_cosine
from selfsight.methods.base import Method, StepOutput
from selfsight.methods.common import TwoViewOptions, embedding_std, full_precision
from selfsight.registry import register_method


@register_method("byol")
class BYOL(Method):
    """BYOL on any timm backbone (features: the backbone's pooled output)."""

    @dataclass
    class Config(TwoViewOptions):
        proj_hidden_dim: int = 4096
        proj_dim: int = 256
        pred_hidden_dim: int = 4096
        #: target momentum at step 0; rises to 1 on a cosine schedule
        base_momentum: float = 0.996

    def __init__(self, backbone: Backbone, config: BYOL.Config, mean: list[float], std: list[float]) -> None:
        super().__init__(backbone, config, mean, std)
        self.projector = MLPHead(backbone.num_features, config.proj_hidden_dim, config.proj_dim)
        self.predictor = MLPHead(config.proj_dim, config.pred_hidden_dim, config.proj_dim)
        self.target_backbone = make_momentum_copy(backbone)
        self.target_projector = make_momentum_copy(self.projector)
        self.view_specs = config.two_view_specs(backbone.img_size, backbone.in_chans)

    def training_step(self, images: torch.Tensor, generator: torch.Generator) -> StepOutput:
        x = torch.cat(self.views(images, generator))  # [2B, C, S, S]: both views in one pass
        z = self.projector(self.backbone(x))
        p = self.predictor(z)
        with torch.no_grad():
            target = self.target_projector(self.target_backbone(x))
        with full_precision(x.device):
            p1, p2 = p.float().chunk(2)
            t1, t2 = target.float().chunk(2)
            loss = negative_cosine(p1, t2) + negative_cosine(p2, t1)
        return StepOutput(loss=loss, metrics=embedding_std(z))

    def on_step_end(self, step: int, total_steps: int) -> None:
        momentum = cosine_momentum(step + 1, total_steps, self.config.base_momentum)
        ema_update(self.target_backbone, self.backbone, momentum)
        ema_update(self.target_projector, self.projector, momentum)
