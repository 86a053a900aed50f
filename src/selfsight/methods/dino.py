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

The teacher's parameters follow the student's (``ema_update``); its BatchNorm running statistics (CNN
backbones) are its own, updated by its train-mode forward on the global crops, as in the official code
(facebookresearch/dino ``main_dino.py``: the EMA loop runs over ``parameters()`` only and the teacher is
never put in eval mode). The exported teacher therefore carries its own statistics.

``freeze_last_layer``: during the first epoch (``freeze_last_layer_epochs``, or ``freeze_last_layer_steps``
optimiser steps) the head's weight-normalised last layer is not updated, as official DINO's
``cancel_gradients_last_layer`` does by setting its gradients to None before the optimiser step, so the
optimiser skips it (no weight decay, no moment or step-count update). Here a post-accumulate gradient
hook drops those gradients as soon as they are accumulated (so they do not count in gradient clipping
either). Under DistributedDataParallel, DDP writes a zero gradient back after its all-reduce, so while the
freeze lasts an optimiser step pre-hook sets it to None again: the optimiser skips the layer in every
process, as in the official code.

Data parallelism: the centre moves with the mean teacher output of the global batch (all-reduced).

Local crops need a backbone that takes smaller inputs (CNNs; ViTs built with ``dynamic_img_size=True``);
on other backbones they are rendered at the full input size, which costs as much as a global crop.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

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
    #: optimiser steps per epoch, set by the engine before training. None (unknown): only
    #: ``freeze_last_layer_steps`` can freeze the last layer; ``freeze_last_layer_epochs`` is ignored
    steps_per_epoch: int | None = None

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
        #: epochs at the start during which the head's last layer is not updated (official DINO's
        #: ``freeze_last_layer``); converted to steps with ``DINO.steps_per_epoch``, which the engine sets
        freeze_last_layer_epochs: float = 1.0
        #: the same in optimiser steps; when given, it wins over ``freeze_last_layer_epochs``
        freeze_last_layer_steps: int | None = None

    def __init__(self, backbone: Backbone, config: DINO.Config, mean: list[float], std: list[float]) -> None:
        super().__init__(backbone, config, mean, std)
        if config.num_local_crops < 0:
            raise ConfigError(f"num_local_crops must be >= 0, got {config.num_local_crops}")
        if config.freeze_last_layer_epochs < 0 or (config.freeze_last_layer_steps or 0) < 0:
            raise ConfigError("freeze_last_layer_epochs and freeze_last_layer_steps must be >= 0")
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
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))  # optimiser steps ended
        self._freeze_now = False  # read by the gradient hook: is this step's last layer frozen?
        self._optimizer_hook: RemovableHandle | None = None  # under DDP, while frozen: see _drop_ddp_grads
        self._warned_unknown_epoch = False
        for param in self._last_layer_params():
            param.register_post_accumulate_grad_hook(self._drop_grad_when_frozen)

    def _last_layer_params(self) -> list[torch.Tensor]:
        """The trainable parameters of the student head's last layer (``v``, and ``g`` unless normalised)."""
        return [p for p in self.head.last_layer.parameters() if p.requires_grad]

    def freeze_steps(self) -> int:
        """Optimiser steps at the start during which the last layer is frozen (0 when the epoch is unknown)."""
        c = self.config
        if c.freeze_last_layer_steps is not None:
            return c.freeze_last_layer_steps
        if self.steps_per_epoch is None:
            if c.freeze_last_layer_epochs > 0 and not self._warned_unknown_epoch:
                log.info("DINO: steps per epoch unknown: freeze_last_layer_epochs ignored")
                self._warned_unknown_epoch = True
            return 0
        return round(c.freeze_last_layer_epochs * self.steps_per_epoch)

    def _drop_grad_when_frozen(self, param: torch.Tensor) -> None:
        """Post-accumulate-grad hook: while frozen, the optimiser must see no gradient (official DINO)."""
        if self._freeze_now:
            param.grad = None

    def _drop_ddp_grads_before_optimizer_steps(self) -> None:
        """Under DDP: an optimiser step pre-hook (for every optimiser; it touches only this method's last
        layer) that drops the zero gradients DDP writes back for the frozen layer. Removed when the freeze
        ends or the method is garbage-collected."""
        if self._optimizer_hook is not None:
            return
        method = weakref.ref(self)

        def drop(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
            alive = method()
            if alive is not None and alive._freeze_now:
                for param in alive._last_layer_params():
                    param.grad = None

        self._optimizer_hook = register_optimizer_step_pre_hook(drop)
        weakref.finalize(self, self._optimizer_hook.remove)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # a checkpoint from before freeze_last_layer existed: its run goes on without the freeze
        state_dict.setdefault(prefix + "steps_done", torch.tensor(torch.iinfo(torch.long).max))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def training_step(self, images: torch.Tensor, generator: torch.Generator) -> StepOutput:
        self._freeze_now = int(self.steps_done) < self.freeze_steps()
        if self._freeze_now and distributed.world() > 1:
            self._drop_ddp_grads_before_optimizer_steps()
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
        if self._optimizer_hook is not None and step + 1 >= self.freeze_steps():
            self._optimizer_hook.remove()
            self._optimizer_hook = None
        self.steps_done.clamp_(min=step + 1)  # = step + 1; stays past the freeze for pre-freeze checkpoints
        momentum = cosine_momentum(step + 1, total_steps, self.config.base_momentum)
        ema_update(self.teacher_backbone, self.backbone, momentum)
        ema_update(self.teacher_head, self.head, momentum)
        for batch_mean in self._pending_teacher:
            # the mean over ranks of equal-sized batch means: the mean of the global batch
            global_mean = distributed.all_reduce_mean(batch_mean)
            self.center.copy_(update_center(self.center, global_mean, self.config.center_momentum))
        self._pending_teacher.clear()
        self.progress.fill_((step + 1) / total_steps)

    def on_step_skipped(self) -> None:
        self._pending_teacher.clear()  # a skipped step's teacher outputs do not move the centre
