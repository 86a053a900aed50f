"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Self-distillation without labels: a student (backbone + DINO head: 3-layer MLP with GELU, 2048 hidden,
256 bottleneck, L2-normalised, weight-normalised last layer with 65,536 outputs) is trained to match
the output distribution of a teacher, the student's momentum copy (0.996 rising to 1, cosine). The
teacher's logits are centred (running mean, momentum 0.9) and sharpened (temperature warmed up
linearly from 0.04 to 0.07 over the first 30% of training); the student's temperature is 0.1. The
teacher sees the 2 global crops (scale 0.4-1), the student sees those and ``num_local_crops`` small
local crops (scale 0.05-0.4, 96/224 of the input size); every (teacher view, other student view) pair
is a cross-entropy term. Views: BYOL-style jitter, blur 1.0 / 0.1 / 0.5 (global 1, global 2, local),
solarize 0.2 on the second global crop. The teacher is the network exported and evaluated.

Data parallelism: the centre moves with the mean teacher output of the global batch (all-reduced).

Local crops need a backbone that takes smaller inputs (CNNs; ViTs built with ``dynamic_img_size=True``);
on other backbones they are rendered at the full input size, which costs as much as a global crop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from selfsight import distributed
from selfsight.backbones import Backbone
from selfsight.ema import cosine_momentum, ema_update, make_momentum_copy
from selfsight.errors import ConfigError
from selfsight.heads import DINOHead
from selfsight.losses import dino_loss, update_center
from selfsight.methods.base import Method, StepOutput
from selfsight.methods.common import TwoViewOptions, embedding_std, full_precision
from selfsight.registry import register_method

log = logging.getLogger("selfsight")


def teacher_temperature(progress: float, start: float, end: float, warmup_fraction: float) -> float:
    """Linear warm-up of the teacher temperature from ``start`` to ``end`` over the first ``warmup_fraction``."""
    if warmup_fraction <= 0 or progress >= warmup_fraction:
        return end
    return start + (end - start) * max(progress, 0.0) / warmup_fraction


@register_method("dino")
class DINO(Method):
    """DINO on any timm backbone (features: the backbone's pooled output, the class token for ViTs)."""

    export_backbone = "teacher_backbone"

    @dataclass
    class Config(TwoViewOptions):
        crop_scale: tuple[float, float] = (0.4, 1.0)
        num_local_crops: int = 8
        local_crop_scale: tuple[float, float] = (0.05, 0.4)
        #: side of the local crops in px; None = 96/224 of the input size
        local_size: int | None = None
        local_blur_p: float = 0.5
        out_dim: int = 65536
        hidden_dim: int = 2048
        bottleneck_dim: int = 256
        norm_last_layer: bool = True
        student_temp: float = 0.1
        warmup_teacher_temp: float = 0.04
        teacher_temp: float = 0.07
        #: share of training over which the teacher temperature warms up (30 of 100 epochs in the paper)
        teacher_temp_warmup_fraction: float = 0.3
        center_momentum: float = 0.9
        base_momentum: float = 0.996

    def __init__(self, backbone: Backbone, config: DINO.Config, mean: list[float], std: list[float]) -> None:
        super().__init__(backbone, config, mean, std)
        if config.num_local_crops < 0:
            raise ConfigError(f"num_local_crops must be >= 0, got {config.num_local_crops}")
        self.head = DINOHead(
            backbone.num_features,
            config.out_dim,
            hidden_dim=config.hidden_dim,
            bottleneck_dim=config.bottleneck_dim,
            norm_last_layer=config.norm_last_layer,
        )
        self.teacher_backbone = make_momentum_copy(backbone)
        self.teacher_head = make_momentum_copy(self.head)
        self.register_buffer("center", torch.zeros(1, config.out_dim))
        self.register_buffer("progress", torch.zeros(()))  # share of training done, for the temperature
        size = backbone.img_size
        local_size = config.local_size or max(8, round(size * 96 / 224))
        if not backbone.accepts_any_size and local_size != size:
            log.info("%s takes %d-px inputs only: DINO's local crops are rendered at %d px", backbone.name, size, size)
            local_size = size
        global_specs = config.two_view_specs(size, backbone.in_chans)
        local = config.view_spec(
            0, local_size, backbone.in_chans, crop_scale=config.local_crop_scale, blur_p=config.local_blur_p
        )
        self.view_specs = global_specs + [local] * config.num_local_crops  # 2 global crops, then the local ones
        self._pending_teacher: list[torch.Tensor] = []


    def training_step(self, images: torch.Tensor, generator: torch.Generator) -> StepOutput:
        views = self.views(images, generator)
        batch = images.shape[0]
        global_x = torch.cat(views[:2])
        features = self.backbone(global_x)
        student = [self.head(features)]
        if len(views) > 2:  # crops of one size go through the network together, as in the paper
            student.append(self.head(self.backbone(torch.cat(views[2:]))))
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(global_x))
        c = self.config
        temp = teacher_temperature(
            float(self.progress), c.warmup_teacher_temp, c.teacher_temp, c.teacher_temp_warmup_fraction
        )
        with full_precision(global_x.device):
            student_logits = torch.cat([s.float() for s in student])
            loss = dino_loss(student_logits, teacher.float(), self.center, c.student_temp, temp, batch_size=batch)
        # the batch mean of the teacher logits [1, K]; the centre moves after the optimiser step
        self._pending_teacher.append(teacher.detach().float().mean(dim=0, keepdim=True))
        return StepOutput(loss=loss, metrics={**embedding_std(features), "teacher_temp": temp})

    def on_step_end(self, step: int, total_steps: int) -> None:
        momentum = cosine_momentum(step + 1, total_steps, self.config.base_momentum)
        ema_update(self.teacher_backbone, self.backbone, momentum)
        ema_update(self.teacher_head, self.head, momentum)
        for batch_mean in self._pending_teacher:
            # the mean over ranks of equal-sized batch means: the mean of the global batch
            global_mean = distributed.all_reduce_mean(batch_mean)
            self.center.copy_(update_center(self.center, global_mean, self.config.center_momentum))
        self._pending_teacher.clear()
        self.progress.fill_((step + 1) / total_steps)
