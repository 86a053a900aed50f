"""MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning") and MoCo v3
(Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers").

MoCo v2: a query encoder (backbone + 2-layer MLP head without BN, hidden = backbone width, 128 out)
and a key encoder that is its momentum copy (0.999, constant). The query of view 1 is contrasted with
the key of view 2 against a queue of 65,536 past keys, temperature 0.2; the keys then enter the queue.
Views: crop scale (0.2, 1), jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2, blur 0.5.

MoCo v3: no queue; a 3-layer projector (BN, last BN) and a 2-layer predictor, hidden 4096, 256 out; the
key encoder's momentum rises from 0.99 to 1 (cosine); the loss is symmetric, in-batch negatives,
``ctr(q1, k2) + ctr(q2, k1)`` each scaled by ``2 * temperature`` (temperature 0.2). Views: BYOL's
asymmetric recipe. Suits ViTs as well as CNNs.

Each view is encoded in its own forward pass (as in both papers), so BatchNorm statistics of queries
and keys come from separate batches. The key encoder's parameters follow the query encoder's
(``ema_update``); its BatchNorm running statistics are its own, updated by its train-mode forward on
the keys, as in the official code (``moco/builder.py``, ``_momentum_update_key_encoder``, in both repos).

BatchNorm instead of MoCo v2's shuffle-BN: the official MoCo v1/v2 code shuffles the key batch across
GPUs (``_batch_shuffle_ddp``) because with per-GPU BatchNorm a query and its positive key are normalised
with the statistics of the same small sub-batch (32 images per GPU), a signature the queue's negatives,
encoded in other batches, lack and the network can learn to exploit. selfsight normalises with the
statistics of the global batch instead: in one process each forward pass is one BatchNorm batch of all N
images (query and key in separate passes, so no pass mixes a query with its key), and under data
parallelism every BatchNorm is converted to global-batch statistics (``distributed.convert_sync_batchnorm``;
the same "global BN" as SimCLR and MoCo v3). Query and key statistics then both come from the N images of
the global batch, in which any one image carries 1/N: the shared batch signature is the sampling noise of
N-image statistics, not that of a 32-image sub-batch. It is smaller the larger N (256 in the paper); with
small batches it is larger, and shuffle-BN, which needs several BatchNorm sub-batches, is not implemented.

Data parallelism: MoCo v2 gathers every rank's keys before they enter the queue, so the queue is
the same on every rank and the same as a 1-process run's. MoCo v3 gathers the keys and contrasts each
rank's queries with the keys of the whole global batch (its paper's ``concat_all_gather``).
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


@register_method("mocov2")
class MoCoV2(Method):
    """MoCo v2 on any timm backbone (features: the backbone's pooled output)."""

    @dataclass
    class Config(TwoViewOptions):
        crop_scale: tuple[float, float] = (0.2, 1.0)
        saturation: float = 0.4
        blur_p: tuple[float, float] = (0.5, 0.5)
        solarize_p: tuple[float, float] = (0.0, 0.0)
        #: head hidden width; None = the backbone's feature width (the paper's choice)
        proj_hidden_dim: int | None = None
        proj_dim: int = 128
        queue_size: int = 65536
        temperature: float = 0.2
        momentum: float = 0.999

    def __init__(self, backbone: Backbone, config: MoCoV2.Config, mean: list[float], std: list[float]) -> None:
        super().__init__(backbone, config, mean, std)
        hidden = config.proj_hidden_dim or backbone.num_features
        self.projector = MLPHead(backbone.num_features, hidden, config.proj_dim, batch_norm=False)
        self.target_backbone = make_momentum_copy(backbone)
        self.target_projector = make_momentum_copy(self.projector)
        self.queue = KeyQueue(config.queue_size, config.proj_dim)
        self.view_specs = config.two_view_specs(backbone.img_size, backbone.in_chans)
        self._pending_keys: list[torch.Tensor] = []

    def training_step(self, images: torch.Tensor, generator: torch.Generator) -> StepOutput:
        x1, x2 = self.views(images, generator)
        q = self.projector(self.backbone(x1))
        with torch.no_grad():
            k = self.target_projector(self.target_backbone(x2))
        with full_precision(x1.device):
            loss = info_nce(q.float(), k.float(), self.config.temperature, negatives=self.queue.keys)
        # every rank's keys, enqueued after the optimiser step (the queue is in the graph)
        self._pending_keys.append(distributed.gather(k.detach()))
        return StepOutput(loss=loss, metrics=embedding_std(q))

    def on_step_end(self, step: int, total_steps: int) -> None:
        ema_update(self.target_backbone, self.backbone, self.config.momentum)
        ema_update(self.target_projector, self.projector, self.config.momentum)
        for keys in self._pending_keys:
            self.queue.push(keys)
        self._pending_keys.clear()

    def on_step_skipped(self) -> None:
        self._pending_keys.clear()  # a skipped step's keys never enter the queue


@register_method("mocov3")
class MoCoV3(Method):
    """MoCo v3 on any timm backbone (features: the backbone's pooled output)."""

    @dataclass
    class Config(TwoViewOptions):
        proj_hidden_dim: int = 4096
        proj_dim: int = 256
        pred_hidden_dim: int = 4096
        temperature: float = 0.2
        #: key-encoder momentum at step 0; rises to 1 on a cosine schedule
        base_momentum: float = 0.99

    def __init__(self, backbone: Backbone, config: MoCoV3.Config, mean: list[float], std: list[float]) -> None:
        super().__init__(backbone, config, mean, std)
        self.projector = MLPHead(
            backbone.num_features, config.proj_hidden_dim, config.proj_dim, num_layers=3, last_bn=True
        )
        self.predictor = MLPHead(config.proj_dim, config.pred_hidden_dim, config.proj_dim)
        self.target_backbone = make_momentum_copy(backbone)
        self.target_projector = make_momentum_copy(self.projector)
        self.view_specs = config.two_view_specs(backbone.img_size, backbone.in_chans)

    def training_step(self, images: torch.Tensor, generator: torch.Generator) -> StepOutput:
        x1, x2 = self.views(images, generator)
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            k1 = self.target_projector(self.target_backbone(x1))
            k2 = self.target_projector(self.target_backbone(x2))
            # negatives from the whole global batch: this rank's positives sit at rows rank * N ...
            k1_all, k2_all = distributed.gather(k1), distributed.gather(k2)
        t = self.config.temperature
        offset = distributed.rank() * x1.shape[0]
        with full_precision(x1.device):
            loss = 2 * t * (
                info_nce(q1.float(), k2_all.float(), t, positive_offset=offset)
                + info_nce(q2.float(), k1_all.float(), t, positive_offset=offset)
            )
        return StepOutput(loss=loss, metrics=embedding_std(z1))

    def on_step_end(self, step: int, total_steps: int) -> None:
        momentum = cosine_momentum(step + 1, total_steps, self.config.base_momentum)
        ema_update(self.target_backbone, self.backbone, momentum)
        ema_update(self.target_projector, self.projector, momentum)
