"""lightly's BYOL and SimCLR, trained on everything else selfsight's runs use: the peer of benchmarks/fmnist_knn.py.

lightly is no dependency of selfsight: ``bash benchmarks/setup_peer.sh`` installs it (without its own
dependencies, which its losses, heads and utilities do not import) into ``benchmarks/.peer``, which this module
puts first on ``sys.path``.

What comes from lightly: the heads (``BYOLProjectionHead``/``BYOLPredictionHead``, ``SimCLRProjectionHead``),
the losses (``NegativeCosineSimilarity``, ``NTXentLoss``), the momentum utilities (``deactivate_requires_grad``,
``update_momentum``, ``cosine_schedule``), the weight-decay split (``get_weight_decay_parameters``) and the
training step as lightly's examples write it (one forward pass per view). What is selfsight's, so that only the
implementation of the method differs: the backbone (the same timm model and options, the same seeded
initialisation), the data order (``BatchStream`` with the same seed), the views (a throwaway selfsight method's
``views(images, step_generator(seed, step))``), AdamW with the same lr, betas, weight decay, gradient clipping and
warm-up + cosine schedule (``selfsight.engine.lr_factor``), the head sizes, temperature and momentum of the
selfsight config, and the time budget (steps planned from timed steps, re-planned once after warm-up, and a stop
when the wall clock runs out, as the engine does).

Where lightly's way differs from selfsight's, lightly's is kept: each view goes through its own forward pass
(selfsight's BYOL and SimCLR encode both views in one, so BatchNorm sees 2B images); ``SimCLRProjectionHead`` ends
with a BatchNorm1d (selfsight's projector ends with a plain Linear); ``NegativeCosineSimilarity`` is ``-cos``
(selfsight's ``2 - 2 cos``: the same gradient direction, half the scale, which AdamW mostly absorbs); the momentum
update comes before the step's forward pass and copies no BatchNorm buffers into the target.
"""

from __future__ import annotations

import copy
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from selfsight.backbones import Backbone
from selfsight.config import PretrainConfig
from selfsight.data import BatchStream, ImageSet, open_images
from selfsight.engine import lr_factor, resolve_device, step_generator
from selfsight.errors import ConfigError, TrainingError
from selfsight.registry import create_method

PEER_DIR = Path(__file__).resolve().parent / ".peer"
if PEER_DIR.is_dir() and str(PEER_DIR) not in sys.path:
    sys.path.insert(0, str(PEER_DIR))
try:
    import lightly
    from lightly.loss import NegativeCosineSimilarity, NTXentLoss
    from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead, SimCLRProjectionHead
    from lightly.models.utils import deactivate_requires_grad, get_weight_decay_parameters, update_momentum
    from lightly.utils.scheduler import cosine_schedule
except ImportError as error:  # pragma: no cover - depends on the set-up
    raise SystemExit(f"lightly cannot be imported ({error}): run `bash benchmarks/setup_peer.sh` first") from None

PEER_METHODS = ("byol", "simclr")


def lightly_version() -> str:
    return lightly.__version__


class BYOL(nn.Module):
    """lightly's BYOL model (its examples/pytorch/byol.py) on a selfsight Backbone."""

    def __init__(self, backbone: Backbone, proj_hidden_dim: int, proj_dim: int, pred_hidden_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(backbone.num_features, proj_hidden_dim, proj_dim)
        self.prediction_head = BYOLPredictionHead(proj_dim, pred_hidden_dim, proj_dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, S, S] -> online prediction [B, proj_dim]."""
        y = self.backbone(x).flatten(start_dim=1)
        z = self.projection_head(y)
        return self.prediction_head(z)

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, S, S] -> target projection [B, proj_dim], detached."""
        y = self.backbone_momentum(x).flatten(start_dim=1)
        z = self.projection_head_momentum(y)
        return z.detach()

    def online_modules(self) -> list[nn.Module]:
        return [self.backbone, self.projection_head, self.prediction_head]


class SimCLR(nn.Module):
    """lightly's SimCLR model (its examples/pytorch/simclr.py) on a selfsight Backbone."""

    def __init__(self, backbone: Backbone, proj_hidden_dim: int, proj_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(backbone.num_features, proj_hidden_dim, proj_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, S, S] -> projection [B, proj_dim]."""
        x = self.backbone(x).flatten(start_dim=1)
        return self.projection_head(x)

    def online_modules(self) -> list[nn.Module]:
        return [self.backbone, self.projection_head]


LossFn = Callable[[nn.Module, list[torch.Tensor], int, int], torch.Tensor]


def build_model(method: str, backbone: Backbone, method_config: Any) -> tuple[nn.Module, LossFn]:
    """lightly's model for ``method`` with the head sizes (and temperature, momentum) of selfsight's config, and
    its training loss ``loss_fn(model, views, step, total_steps)`` as lightly's examples compute it."""
    c = method_config
    if method == "byol":
        model = BYOL(backbone, c.proj_hidden_dim, c.proj_dim, c.pred_hidden_dim)
        criterion = NegativeCosineSimilarity()

        def byol_loss(model: BYOL, views: list[torch.Tensor], step: int, total_steps: int) -> torch.Tensor:
            momentum = cosine_schedule(step, total_steps, c.base_momentum, 1.0)
            update_momentum(model.backbone, model.backbone_momentum, m=momentum)
            update_momentum(model.projection_head, model.projection_head_momentum, m=momentum)
            x0, x1 = views
            p0 = model(x0)
            z0 = model.forward_momentum(x0)
            p1 = model(x1)
            z1 = model.forward_momentum(x1)
            return 0.5 * (criterion(p0, z1) + criterion(p1, z0))

        return model, byol_loss
    if method == "simclr":
        model = SimCLR(backbone, c.proj_hidden_dim, c.proj_dim)
        criterion = NTXentLoss(temperature=c.temperature)

        def simclr_loss(model: SimCLR, views: list[torch.Tensor], step: int, total_steps: int) -> torch.Tensor:
            x0, x1 = views
            z0 = model(x0)
            z1 = model(x1)
            return criterion(z0, z1)

        return model, simclr_loss
    raise ConfigError(f"the lightly peer implements {', '.join(PEER_METHODS)}, not {method!r}")


def make_optimizer(model: nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW as selfsight's engine builds it; no weight decay on norms and biases (lightly's split)."""
    decay, no_decay = get_weight_decay_parameters(model.online_modules())
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas)


def _batches(images: ImageSet, cfg: PretrainConfig, device: torch.device) -> Iterator[torch.Tensor]:
    stream = BatchStream(images, cfg.batch_size, cfg.seed, num_workers=cfg.num_workers,
                         pin_memory=device.type == "cuda")
    for batch, _ in stream:
        yield batch.to(device, non_blocking=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(model: nn.Module, loss_fn: LossFn, views: Callable, images: ImageSet, cfg: PretrainConfig,
                     device: torch.device, warm: int = 2, timed: int = 5) -> float:
    """Seconds per optimiser step, timed on a copy of the model (the run itself is untouched), as the engine does."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        trial = copy.deepcopy(model)
        optimizer = torch.optim.AdamW([p for p in trial.parameters() if p.requires_grad], lr=0.0)
        batches = _batches(images, cfg, device)
        start = 0.0
        for i in range(warm + timed):
            if i == warm:
                _sync(device)
                start = time.perf_counter()
            loss = loss_fn(trial, views(next(batches), step_generator(cfg.seed, i)), i, warm + timed)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return (time.perf_counter() - start) / timed


def run_lightly(method: str, cfg: PretrainConfig, minutes: float | None = None, steps: int | None = None,
                progress: bool = True) -> tuple[Backbone, dict]:
    """Train lightly's ``method`` ('byol' or 'simclr') for ``minutes`` of wall time, or for ``steps`` optimiser
    steps, on ``cfg``'s data.

    ``cfg`` is the selfsight config of the same method (backbone, data, seed, batch size, optimizer, head sizes);
    its budget fields are ignored in favour of ``minutes`` / ``steps`` (exactly one of them).
    Returns the trained online backbone (eval mode) and a
    summary: steps, planned_steps, images_seen, minutes, img_per_s, final_loss, mean/std (the normalisation of
    the views, for the evaluation) and lightly_version.
    """
    if method not in PEER_METHODS:
        raise ConfigError(f"the lightly peer implements {', '.join(PEER_METHODS)}, not {method!r}")
    if (minutes is None) == (steps is None):
        raise ConfigError("run_lightly: give exactly one of minutes and steps")
    if cfg.optim.accum_steps != 1:
        raise ConfigError("the lightly peer does not accumulate gradients: use optim.accum_steps=1")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)  # as the engine seeds: the same backbone initialisation
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    backbone = Backbone(cfg.backbone, cfg.backbone_opts)
    images = open_images(cfg.data, backbone.in_chans, backbone.img_size, progress=progress)
    mean, std = images.mean_std()
    with torch.random.fork_rng(devices=[]):  # selfsight's method only makes the views; it draws no weights here
        view_maker = create_method(method, Backbone(cfg.backbone, cfg.backbone_opts), cfg.method_config, mean, std)
    view_maker.to(device)
    model, loss_fn = build_model(method, backbone, cfg.method_config)
    model.to(device)
    optimizer = make_optimizer(model, cfg)

    if steps is None:
        per_step = seconds_per_step(model, loss_fn, view_maker.views, images, cfg, device)
        time_limit = minutes * 60
        total_steps = max(1, int(time_limit * 0.97 / per_step))
    else:  # a fixed number of steps, as selfsight's --steps / --epochs: no time limit, no re-planning
        per_step, time_limit, total_steps = None, math.inf, int(steps)
    warmup_steps = (cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None
                    else int(round(cfg.optim.warmup_fraction * total_steps)))
    replan_at = max(warmup_steps, 10)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()
    batch_images = cfg.batch_size
    batches = _batches(images, cfg, device)
    bar = tqdm(total=total_steps, desc=f"lightly {method} {backbone.name}", disable=not progress, dynamic_ncols=True,
               file=sys.stderr)
    model.train()
    step, loss_value, mark = 0, float("nan"), (0, 0.0)
    start = time.perf_counter()
    while step < total_steps and time.perf_counter() - start <= time_limit:
        factor = lr_factor(step, total_steps, warmup_steps, cfg.optim.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr * factor
        views = view_maker.views(next(batches), step_generator(cfg.seed, step))
        with autocast:
            loss = loss_fn(model, views, step, total_steps)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise TrainingError(f"lightly {method}: loss is {loss_value} at step {step}")
        loss.backward()
        if cfg.optim.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0:
            bar.set_postfix(loss=f"{loss_value:.4f}")
        if step == 3:
            mark = (step, time.perf_counter())
        if step == replan_at and steps is None:  # re-plan from the measured speed once, where the lr factor is 1
            measured = (time.perf_counter() - mark[1]) / max(1, step - mark[0])
            total_steps = max(step, step + int(max(0.0, time_limit * 0.98 - (time.perf_counter() - start)) / measured))
            bar.total = total_steps
            bar.refresh()
    bar.close()
    seconds = time.perf_counter() - start
    summary = {
        "method": method,
        "implementation": "lightly",
        "lightly_version": lightly.__version__,
        "backbone": backbone.name,
        "steps": step,
        "planned_steps": total_steps,
        "images_seen": step * batch_images,
        "minutes": round(seconds / 60, 3),
        "img_per_s": round(step * batch_images / max(seconds, 1e-9), 2),
        "final_loss": loss_value,
        "seconds_per_step_planned": None if per_step is None else round(per_step, 4),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }
    backbone.eval()
    return backbone, summary
