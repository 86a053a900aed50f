"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations").

Both views of a batch go through one encoder and a projector (Linear-BN-ReLU-Linear, 2048 hidden,
128 out); NT-Xent treats each of the 2N projections as an anchor whose positive is its pair and whose
negatives are the other 2N-2. The paper's temperature is 0.1 at batch 4096; the default here is 0.2,
which works better at the small batches (128-512) one trains with on a workstation. Views: random
resized crop, flip, colour jitter of strength 1 (0.8, 0.8, 0.8, 0.2) with p 0.8, grayscale 0.2,
blur 0.5 on both views.

Data parallelism: the projections of every rank are gathered with their gradient, so each rank's
anchors see the negatives of the whole global batch and the loss is the global-batch NT-Xent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from selfsight import distributed
from selfsight.backbones import Backbone
from selfsight.heads import MLPHead
from selfsight.losses import nt_xent
from selfsight.methods.base import Method, StepOutput
from selfsight.methods.common import TwoViewOptions, embedding_std, full_precision
from selfsight.registry import register_method


@register_method("simclr")
class SimCLR(Method):
    """SimCLR on any timm backbone (features: the backbone's pooled output)."""

    @dataclass
    class Config(TwoViewOptions):
        brightness: float = 0.8
        contrast: float = 0.8
        saturation: float = 0.8
        hue: float = 0.2
        blur_p: tuple[float, float] = (0.5, 0.5)
        solarize_p: tuple[float, float] = (0.0, 0.0)
        proj_hidden_dim: int = 2048
        proj_dim: int = 128
        temperature: float = 0.2

    def __init__(self, backbone: Backbone, config: SimCLR.Config, mean: list[float], std: list[float]) -> None:
        super().__init__(backbone, config, mean, std)
        self.projector = MLPHead(backbone.num_features, config.proj_hidden_dim, config.proj_dim)
        self.view_specs = config.two_view_specs(backbone.img_size, backbone.in_chans)

    def training_step(self, images: torch.Tensor, generator: torch.Generator) -> StepOutput:
        x = torch.cat(self.views(images, generator))  # [2B, C, S, S]
        z = self.projector(self.backbone(x))
        with full_precision(x.device):
            z1, z2 = z.float().chunk(2)
            if distributed.world() > 1:
                loss = self._global_nt_xent(z1, z2)
            else:
                loss = nt_xent(z1, z2, self.config.temperature)
        return StepOutput(loss=loss, metrics=embedding_std(z))

    def _global_nt_xent(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """NT-Xent of this rank's 2N anchors against the 2M = 2 W N views of the global batch.

        z1, z2: [N, D] this rank's projections. Rank r's loss L_r is the mean of the anchor terms l_a
        over its own 2N anchors, so (1/W) sum_r L_r = (1/2M) sum_a l_a, the 1-process loss of the global
        batch. Every L_r depends on every rank's projections through the gathered candidates; the gather's
        backward sums those contributions back to the rank that owns each projection, and DDP's average
        of the parameter gradients then equals the gradient of the global loss.
        """
        n, world = z1.shape[0], distributed.world()
        gathered = distributed.gather_with_grad(torch.cat([z1, z2])).view(world, 2, n, -1)  # [W, 2, N, D]
        all_z1 = gathered[:, 0].reshape(world * n, -1)
        all_z2 = gathered[:, 1].reshape(world * n, -1)
        return nt_xent(z1, z2, self.config.temperature, all_z1, all_z2, offset=distributed.rank() * n)
