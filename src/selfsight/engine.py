"""The method-agnostic training loop: device, bf16 autocast, gradient accumulation, warm-up + cosine
schedule, clipping, logging, atomic checkpoints, exact resume, Ctrl-C and NaN handling.

Exact resume: the batch of micro-step ``b`` and every random draw of that step (crops, flips, masks)
are pure functions of ``(seed, b)``; the global torch RNG (dropout, drop-path) is saved in the
checkpoint. A run interrupted at step k and resumed therefore repeats the uninterrupted run's
losses bit for bit on CPU.

Data parallelism (``torchrun --nproc-per-node N -m selfsight pretrain ...``): ``batch_size`` is the global
batch; rank r of W trains on the r-th slice of B / W images of the 1-process run's batch, with that
slice of its random draws (``selfsight.distributed``). The method runs inside DistributedDataParallel,
BatchNorm statistics are synchronised, the logged loss is the mean over ranks (the global loss), and
rank 0 alone writes the run directory. Under torchrun's restarts (``--max-restarts``), a restarted
attempt resumes from the newest complete checkpoint by itself.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from selfsight import distributed
from selfsight.backbones import Backbone
from selfsight.checkpoint import (
    atomic_write_bytes,
    checkpoint_path,
    list_checkpoints,
    remove_stale_temp_files,
    save_checkpoint,
    start_state,
)
from selfsight.config import PretrainConfig, save_config, to_dict
from selfsight.data import make_batch_stream, open_images
from selfsight.errors import ConfigError, TrainingError
from selfsight.loggers import RunLogger
from selfsight.methods.base import Method
from selfsight.precision import autocast_context, cpu_has_native_bf16, resolve_precision
from selfsight.registry import create_method

log = logging.getLogger("selfsight")

#: ``embed_std_norm`` (std of the L2-normalised embeddings times sqrt(D): 1 healthy, 0 collapsed) below
#: which a warning says the representation may be collapsing
COLLAPSE_WARNING = 0.1


class Interrupted(Exception):
    """Raised after Ctrl-C once a checkpoint has been saved."""

    def __init__(self, step: int, path: Path) -> None:
        super().__init__(f"interrupted at step {step}; checkpoint saved to {path}; continue with --resume")
        self.step = step
        self.path = path


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; any other name is checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} asked for, but CUDA is not available")
    return device


def training_device(name: str) -> torch.device:
    """``resolve_device``; under torchrun a bare ``cuda`` becomes this process's GPU, ``cuda:LOCAL_RANK``.

    NCCL takes one GPU per process: several processes of one machine on one GPU, or a process whose GPU
    does not exist, are refused here with what to do instead (NCCL itself says "Duplicate GPU detected" or
    "invalid device ordinal")."""
    device = resolve_device(name)
    if device.type != "cuda" or distributed.env_world() <= 1:
        return device
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.index is not None:
        if per_machine > 1:
            raise ConfigError(f"--device {name} puts all {per_machine} processes of this machine on one GPU, and "
                              "NCCL needs one GPU per process: give --device cuda (each process then takes "
                              "cuda:LOCAL_RANK)")
        return device
    device = torch.device("cuda", distributed.local_rank())
    count = torch.cuda.device_count()
    if device.index >= count:
        raise ConfigError(f"process {device.index} of this machine has no GPU of its own: {count} found, "
                          f"{per_machine} processes started; NCCL needs one GPU per process "
                          f"(torchrun --nproc_per_node={count})")
    return device


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay from 1 to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_generator(seed: int, micro_step: int) -> torch.Generator:
    """The (CPU) generator for every random draw of one micro-step: a pure function of (seed, micro_step).

    Random parameters are drawn on the CPU and moved to the training device, so a seed gives the
    same crops and masks on CPU and CUDA.
    """
    gen = torch.Generator()
    gen.manual_seed((seed * 1_000_003 + micro_step * 7919 + 12345) % (2**63))
    return gen


def rng_state() -> dict[str, Any]:
    """The global generators' states as tensors and plain values (checkpoints load with weights_only)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), cached_gaussian]
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed the global torch, Python and NumPy generators."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The global-RNG seed of rank ``rank`` (dropout, drop-path differ across ranks), a pure function."""
    return (seed * 1_000_003 + (rank + 1) * 7_919 + step * 104_729) % (2**31)


def compile_networks(method: Method) -> None:
    """``torch.compile`` in place (``nn.Module.compile``: names and state dict keys unchanged) each
    sub-network of ``method`` that has parameters (backbone, heads, momentum copies), and the method's
    own ``forward`` where it defines one (SimMIM). Compilation happens at the first call."""
    for child in method.children():
        if any(True for _ in child.parameters()):
            child.compile()
    if type(method).forward is not nn.Module.forward:
        method.compile()


class _WarningsOnly(logging.Filter):
    """Ranks other than 0 log warnings and errors only (rank 0 logs the run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def setup_run_logging(run_dir: Path) -> logging.Handler:
    """Log to ``run_dir/train.log`` (and stderr, where the CLI set it up)."""
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("selfsight")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


class StopRequest:
    """Turns the first Ctrl-C (SIGINT) into a flag the loop checks between steps, so the checkpoint
    written on the way out is consistent; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("Ctrl-C: finishing this step, saving a checkpoint, then stopping (Ctrl-C again to abort)")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Trainer:
    """One pre-training run. ``Trainer(cfg, resume).fit()`` returns a summary dict.

    Under torchrun every rank builds a Trainer; the constructor joins the process group if needed
    (``pretrain`` also leaves it at the end; callers of ``Trainer`` call ``distributed.cleanup()``).
    """

    def __init__(self, cfg: PretrainConfig, resume: bool = False, progress: bool = True) -> None:
        self.cfg = cfg = copy.copy(cfg)  # the precision is resolved in place (auto -> fp32 or bf16)
        self.run_dir = Path(cfg.out)
        self.device = training_device(cfg.device)
        distributed.init_from_env(self.device)
        self.rank, self.world, self.main = distributed.rank(), distributed.world(), distributed.is_main()
        self.progress = progress and self.main
        if cfg.batch_size % self.world:
            raise ConfigError(f"batch size {cfg.batch_size} (the global batch) must be divisible by the "
                              f"{self.world} processes")
        self.local_batch = cfg.batch_size // self.world
        resume_state, self.resumed_from = start_state(self.run_dir, resume)
        self.log_handler: logging.Handler | None = None
        self._log_filter: logging.Filter | None = None
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(self.run_dir)
            self.log_handler = setup_run_logging(self.run_dir)
        else:
            self._log_filter = _WarningsOnly()
            log.addFilter(self._log_filter)
        seed_everything(cfg.seed)  # the same on every rank: identical initial weights and queues

        backbone = Backbone(cfg.backbone, cfg.backbone_opts)
        self.images = open_images(cfg.data, backbone.in_chans, backbone.img_size, progress=self.progress)
        if resume_state is not None:
            mean, std = resume_state["norm"]["mean"], resume_state["norm"]["std"]
        else:
            mean, std = self.images.mean_std()
        if getattr(cfg.method_config, "num_images", 0) is None:  # PIC: one classifier row per training image
            cfg.method_config.num_images = self.images.num_images
        self.method: Method = create_method(cfg.method, backbone, cfg.method_config, mean, std).to(self.device)
        channels_last = cfg.channels_last if cfg.channels_last is not None else backbone.family == "cnn"
        if channels_last:
            self.method.to(memory_format=torch.channels_last)
        if self.world > 1:
            seed_everything(rank_seed(cfg.seed, self.rank))  # dropout and drop-path differ across ranks
            if distributed.has_batchnorm(self.method):
                # statistics of the global batch in every BatchNorm: backbone, heads and momentum copies,
                # whose training-mode forward normalises the keys/targets of the same global batch
                self.method = distributed.convert_sync_batchnorm(self.method, self.device)
        self.monitor = None
        if cfg.monitor_data and self.main:  # rank 0 alone measures (the others wait at a barrier)
            from selfsight.monitor import KnnMonitor  # selfsight.eval imports this module

            self.monitor = KnnMonitor(
                cfg.monitor_data, backbone.in_chans, backbone.img_size, cfg.monitor_size, cfg.seed
            )
            log.info("k-NN monitor every %d steps on %s", cfg.monitor_every, self.monitor.description)
        groups = self.method.param_groups(cfg.optim.weight_decay)
        # fused AdamW: one kernel for all parameters, on CUDA and (torch >= 2.4) on the CPU: 3.4x faster
        # optimizer step than the per-tensor loop for a ResNet-18 on this CPU (docs/benchmarks.md)
        fused = {"fused": True} if self.device.type in ("cuda", "cpu") else {}
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, **fused)
        self.accum = cfg.optim.accum_steps
        self._collapse_warned = False
        self.step = 0
        self.elapsed_before = 0.0
        self.skipped_steps = 0  # steps whose gradients were not all finite (nothing was updated)
        self._consecutive_skips = 0
        self.start_time = time.perf_counter()  # reset when fit() starts
        self._speed_mark = (0, self.start_time)  # (step, time) from which a --minutes run measures its speed
        self._probed_seconds: float | None = None  # seconds per step of the precision probe's choice
        self._choose_precision(resume_state)
        if resume_state is not None:
            self._load_state(resume_state)
            log.info("resuming %s from step %d (%s)", self.run_dir, self.step, self.resumed_from.name)
        else:
            self.total_steps = distributed.broadcast_object(self._plan_steps())  # rank 0's plan for all
            if self.main:
                self._trim_metrics(0)  # lines of an earlier attempt that wrote no checkpoint
        self.warmup_steps = (
            cfg.optim.warmup_steps
            if cfg.optim.warmup_steps is not None
            else int(round(cfg.optim.warmup_fraction * self.total_steps))
        )
        if self.main:
            self._write_run_files(mean, std)
        if cfg.compile:
            compile_networks(self.method)
        # methods with schedules in epochs (DINO's freeze_last_layer_epochs) need the optimiser steps per epoch
        self.method.steps_per_epoch = self._steps_per_epoch()
        # what fit() calls: method.training_step, inside DistributedDataParallel when there are ranks
        self.step_module, self.ddp = distributed.wrap_training_step(self.method)

    # --- planning -----------------------------------------------------------------------------
    def _choose_precision(self, resume_state: dict[str, Any] | None) -> None:
        """Resolve ``precision: auto`` to fp32 or bf16 (rank 0's choice for all) and say which and why.
        A resumed run keeps the precision its first attempt chose."""
        requested = self.cfg.precision
        if requested == "auto" and resume_state is not None:
            requested = resume_state.get("config", {}).get("precision", "auto")
        probed: dict[str, float] = {}

        def probe(precision: str) -> float:  # shorter than the --minutes planning's: 1 warm-up, 3 timed steps
            probed[precision] = self._time_one_step(precision, warm=1, timed=3)
            return probed[precision]

        choice, reason = resolve_precision(requested, self.device, probe)
        self._probed_seconds = probed.get(choice)  # a --minutes plan starts from it instead of timing again
        self.cfg.precision = distributed.broadcast_object(choice)
        if self.main:
            slow = choice == "bf16" and self.device.type == "cpu" and not cpu_has_native_bf16()
            (log.warning if slow else log.info)("precision %s (%s)", self.cfg.precision, reason)

    def _steps_per_epoch(self) -> int:
        return max(1, self.images.num_images // (self.cfg.batch_size * self.accum))

    def _plan_steps(self) -> int:
        cfg = self.cfg
        per_epoch = self._steps_per_epoch()
        if cfg.steps is not None:
            return int(cfg.steps)
        if cfg.epochs is not None:
            return max(1, int(round(cfg.epochs * per_epoch)))
        seconds = self._probed_seconds or self._time_one_step()
        steps = max(1, int(cfg.minutes * 60 * 0.97 / seconds))
        if self.main:
            log.info("budget %.1f min: %.3f s per step measured, planning %d steps", cfg.minutes, seconds, steps)
        return steps

    def _time_one_step(self, precision: str | None = None, warm: int = 2, timed: int = 5) -> float:
        """Seconds per optimiser step in ``precision`` (default: the run's), measured on a copy of the model
        (the run itself is untouched).

        Every rank times its own copy in step with the others (gathers and BatchNorm synchronisation
        are collectives); the copy is not wrapped in DDP, so gradients are not averaged.
        """
        saved_rng = rng_state()
        method = copy.deepcopy(self.method)
        optimizer = torch.optim.AdamW(method.param_groups(0.0), lr=0.0)
        batches = self._batches(0)
        autocast = autocast_context(self.device, precision or self.cfg.precision)
        start = 0.0
        for i in range(warm + timed):
            if i == warm:
                self._sync()
                start = time.perf_counter()
            for micro in range(self.accum):
                images, _, indices = next(batches)
                self._give_indices(method, indices)
                with autocast, distributed.rank_share_of_draws():
                    out = method.training_step(images, step_generator(self.cfg.seed, micro))
                (out.loss / self.accum).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self._sync()
        seconds = (time.perf_counter() - start) / timed
        del method, optimizer
        set_rng_state(saved_rng)
        return seconds

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _batches(self, start_batch: int) -> Iterator[tuple[Any, torch.Tensor | None, torch.Tensor | None]]:
        """This rank's share of global batches start_batch, start_batch + 1, ... on the device (streamed
        from tar shards when the data is a shards folder, else indexed). On the CPU, the DataLoader workers
        of a lazily decoded set also build the views (``selfsight.data.worker_views``): the stream then
        yields PreparedViews, which ``Method.views`` hands back. Unreadable files met on the way are added
        to ``self.images.skipped``; rank 0 rewrites run.json's ``data`` summary when that list grows. For methods
        that read their images' data-set indices (int64 [B]; PIC), each batch comes with them, in the order the
        method asks for (``batch_indexer``); for the others, None."""
        from functools import partial

        from selfsight.data.worker_views import worker_views_for

        stream = make_batch_stream(
            self.images,
            self.local_batch,
            self.cfg.seed,
            start_batch=start_batch,
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
            rank=self.rank,
            world_size=self.world,
            views=worker_views_for(self.method, self.device, partial(step_generator, self.cfg.seed)),
            indexer=self._method_indexer(),
        )
        wants_indices = hasattr(self.method, "batch_indices")
        known = len(self.images.skipped)
        for batch, (images, labels) in enumerate(stream, start_batch):
            if len(self.images.skipped) != known and self.main:  # unreadable files met while training
                known = len(self.images.skipped)
                self._update_data_summary()
            indices = stream.batch_indices(batch) if wants_indices else None
            yield images.to(self.device, non_blocking=True), labels, indices

    def _method_indexer(self) -> Any:
        """The data order the method asks for (``method.batch_indexer``: PIC's sliding window), or None for
        the usual shuffled epochs."""
        order = getattr(self.method, "batch_indexer", None)
        if order is None:
            return None
        return order(self.images.num_images, self.local_batch, self.cfg.seed, self.rank, self.world)

    def _give_indices(self, method: Method, indices: torch.Tensor | None) -> None:
        """Methods whose labels are the images' data-set indices (PIC) read them from ``batch_indices``."""
        if indices is not None:
            method.batch_indices = indices.to(self.device, non_blocking=True)

    def _update_data_summary(self) -> None:
        """Rewrite run.json's ``data`` summary (counts and names of skipped files), atomically."""
        run_json = self.run_dir / "run.json"
        if not run_json.exists():  # not written yet: _write_run_files will write the summary with them
            return
        info = json.loads(run_json.read_text())
        info["data"] = self.images.summary()
        atomic_write_bytes(run_json, lambda handle: handle.write(json.dumps(info, indent=2).encode()))

    # --- state --------------------------------------------------------------------------------
    def _replan(self, time_limit: float) -> None:
        """In a --minutes run, re-plan the number of steps from the speed measured so far.

        Done once, at the end of warm-up, where the learning-rate factor is 1 whatever the total, so
        the schedule stays continuous; the timed step before training only gives the first estimate.
        The speed is measured from the third step on, once start-up costs are paid. Every rank takes
        rank 0's plan.
        """
        now = time.perf_counter()
        spent = self.elapsed_before + now - self.start_time
        mark_step, mark_time = self._speed_mark
        per_step = (now - mark_time) / max(1, self.step - mark_step)
        planned = distributed.broadcast_object(self.step + int(max(0.0, time_limit * 0.98 - spent) / per_step))
        if planned != self.total_steps:
            log.info("measured %.3f s per step: re-planning %d -> %d steps", per_step, self.total_steps, planned)
            self.total_steps = max(planned, self.step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": {"total_steps": self.total_steps},
            "data_position": {"next_batch": self.step * self.accum, "seed": self.cfg.seed},
            "rng": rng_state(),
            "norm": {"mean": self.method.mean.flatten().tolist(), "std": self.method.std.flatten().tolist()},
            "elapsed_s": self.elapsed_before + (time.perf_counter() - self.start_time),
            "skipped_steps": self.skipped_steps,
            "config": to_dict(self.cfg),
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.total_steps = int(state["schedule"]["total_steps"])
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        per_rank = state.get("rng_per_rank")
        if self.world > 1 and per_rank is not None and len(per_rank) == self.world:
            set_rng_state(per_rank[self.rank])
        else:
            set_rng_state(state["rng"])
            if self.world > 1:  # saved by another number of processes: fresh per-rank streams
                seed_everything(rank_seed(self.cfg.seed, self.rank, self.step))
        if self.main:
            self._trim_metrics(self.step)

    def _trim_metrics(self, step: int) -> None:
        """Drop metric lines logged after the checkpoint we resume from (they will be logged again)."""
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            path.write_text("".join(ln + "\n" for ln in lines))

    def _write_run_files(self, mean: list[float], std: list[float]) -> None:
        save_config(self.cfg, self.run_dir / "config.yaml")
        info = {
            "method": self.cfg.method,
            "backbone": self.method.backbone.describe(),
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "data": self.images.summary(),
            "total_steps": self.total_steps,
            "batch_size": self.cfg.batch_size * self.accum,
            "processes": self.world,
        }
        (self.run_dir / "run.json").write_text(json.dumps(info, indent=2))

    def _run_monitor(self) -> float:
        method = self.method
        backbone = getattr(method, method.export_backbone)
        accuracy = self.monitor(backbone, method.mean.flatten().tolist(), method.std.flatten().tolist(), self.device)
        log.info("step %d: k-NN monitor %.2f%%", self.step, 100 * accuracy)
        return accuracy

    def _watch_collapse(self, metrics: dict[str, float]) -> None:
        """Warn (once per run) when the embeddings' spread falls towards collapse after warm-up."""
        value = metrics.get("embed_std_norm")
        if value is None or self._collapse_warned or self.step <= self.warmup_steps:
            return
        if value < COLLAPSE_WARNING:
            self._collapse_warned = True
            log.warning(
                "step %d: the embeddings' spread fell to %.3f of a healthy one (embed_std_norm; 1 = spread, 0 = "
                "collapsed): the representation may be collapsing. Try a lower lr, a higher momentum, or "
                "stronger augmentation.",
                self.step,
                value,
            )

    def save(self) -> Path:
        """Every rank calls this; rank 0 writes the checkpoint (atomically) and no rank goes on before it
        is complete. The global RNG state of every rank is saved, for exact resume of dropout."""
        per_rank_rng = distributed.gather_objects(rng_state()) if self.world > 1 else None
        path = checkpoint_path(self.run_dir, self.step)
        if self.main:
            state = self.state_dict()
            if per_rank_rng is not None:
                state["rng_per_rank"] = per_rank_rng
            path = save_checkpoint(state, self.run_dir, self.step, keep=self.cfg.keep_checkpoints)
        distributed.barrier()
        return path

    def _no_sync(self, skip: bool):
        """DDP's ``no_sync`` for the micro-steps whose gradients are only accumulated (all but the last)."""
        return self.ddp.no_sync() if skip and self.ddp is not None else nullcontext()

    def _log_images(self, logger: RunLogger, at_start: bool) -> None:
        """TensorBoard images: at the start the grid of the views the method trains on (also ``RUN/views.png``);
        at the start and the end, for masked-image-modelling methods, reconstructions of 8 fixed images."""
        from PIL import Image

        from selfsight.diagnostics.reconstruct import (
            is_masked_image_modelling,
            reconstruct_with,
            reconstruction_grid,
        )
        from selfsight.preview import write_view_grid

        if at_start:
            path = write_view_grid(self.images, self.method, self.cfg.seed, self.run_dir / "views.png")
            with Image.open(path) as grid:
                logger.image("views", np.asarray(grid), self.step)
        if not is_masked_image_modelling(self.cfg.method):
            return
        chosen = torch.randperm(self.images.num_images, generator=torch.Generator().manual_seed(self.cfg.seed))[:8]
        self.method.eval()
        try:
            result, _ = reconstruct_with(self.method, self.images.get_batch(chosen.sort().values), self.cfg.seed)
        finally:
            self.step_module.train()
        if result is not None:
            logger.image("reconstructions", reconstruction_grid(result).numpy(), self.step)

    # --- one optimiser step -------------------------------------------------------------------
    def _forward_backward(self, batches: Iterator, autocast: Any) -> tuple[float, dict[str, float]]:
        """Forward and backward over the ``accum`` micro-batches of one step; returns (sum of the micro-batch
        losses, the last micro-batch's metrics). A non-finite loss stops the run (every rank sees it)."""
        loss_sum, extra = 0.0, {}
        for micro in range(self.accum):
            images, _, indices = next(batches)
            self._give_indices(self.method, indices)
            generator = step_generator(self.cfg.seed, self.step * self.accum + micro)
            with self._no_sync(micro < self.accum - 1):
                with autocast, distributed.rank_share_of_draws():
                    out = self.step_module(images, generator)
                # the mean over ranks: the global batch's loss, the same number on every rank
                loss_value = float(distributed.all_reduce_mean(out.loss.detach()))
                if not math.isfinite(loss_value):
                    raise TrainingError(
                        f"loss is {loss_value} at step {self.step}; stopping ({self._last_good()}; "
                        "try a lower lr or fp32, then --resume)"
                    )
                (out.loss / self.accum).backward()
            loss_sum += loss_value
            extra = out.metrics
        return loss_sum, extra

    def _grad_norm(self) -> tuple[float, bool]:
        """The total gradient norm (clipped to ``clip_grad`` when set) and whether every gradient is finite,
        decided by all ranks together (DDP has averaged the gradients, so they agree anyway)."""
        params = [p for p in self.method.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True) if params else torch.zeros(())
        (nonfinite,) = distributed.any_rank(not bool(torch.isfinite(norm)))
        if not nonfinite and self.cfg.optim.clip_grad > 0:
            # takes the parameters (it clips their .grad), not the gradients themselves
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.optim.clip_grad, norm, foreach=True)
        return float(norm), not nonfinite

    def _skip_step(self, grad_norm: float) -> None:
        """A step whose gradients are not all finite changes nothing: no optimiser step, no momentum, queue
        or centre update (the step counter and the data position still advance, so resume stays exact).
        After ``max_consecutive_skips`` such steps in a row the run stops."""
        self.skipped_steps += 1
        self._consecutive_skips += 1
        self.method.on_step_skipped()
        log.warning(
            "step %d: gradient norm is %s; step skipped (%d skipped so far)", self.step, grad_norm, self.skipped_steps
        )
        limit = self.cfg.max_consecutive_skips
        if self._consecutive_skips >= limit:
            raise TrainingError(
                f"{limit} steps in a row had non-finite gradients (the last at step {self.step}); stopping "
                f"({self._last_good()}; try a lower lr or fp32, then --resume)"
            )

    def _last_good(self) -> str:
        kept = list_checkpoints(self.run_dir)
        return f"the last good checkpoint is {kept[0]}" if kept else "no checkpoint was written yet"

    # --- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self.start_time = time.perf_counter()
        autocast = autocast_context(self.device, cfg.precision)
        batches = self._batches(self.step * self.accum)
        batch_images = cfg.batch_size * self.accum
        time_limit = cfg.minutes * 60 if cfg.minutes is not None else math.inf
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=f"{cfg.method} {self.method.backbone.name}",
            disable=not self.progress,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        logger = RunLogger(self.run_dir, cfg.logger) if self.main else None

        def write_record(record: dict[str, Any]) -> None:
            if logger is not None:
                logger.log(record)

        if logger is not None and logger.wants_images and self.step == 0:
            self._log_images(logger, at_start=True)
        self.step_module.train()
        window_start, window_steps, start_step = time.perf_counter(), 0, self.step
        last_loss = float("nan")
        with StopRequest() as stop:
            try:
                while self.step < self.total_steps:
                    # decided together: a Ctrl-C or the clock seen by any rank stops every rank at this step
                    out_of_time = self.elapsed_before + time.perf_counter() - self.start_time > time_limit
                    stop_now, out_of_time = distributed.any_rank(stop.requested, out_of_time)
                    if stop_now:
                        bar.close()
                        path = self.save()
                        raise Interrupted(self.step, path)
                    if out_of_time:
                        log.info(
                            "time budget of %.1f min reached at step %d of %d", cfg.minutes, self.step, self.total_steps
                        )
                        break
                    factor = lr_factor(self.step, self.total_steps, self.warmup_steps, cfg.optim.min_lr_ratio)
                    for group in self.optimizer.param_groups:
                        group["lr"] = cfg.optim.lr * factor * group.get("lr_scale", 1.0)
                    loss_sum, extra = self._forward_backward(batches, autocast)
                    distributed.poison_gradient_for_fault_test(self.method, self.step)
                    grad_norm, finite = self._grad_norm()
                    if finite:
                        self._consecutive_skips = 0
                        self.optimizer.step()
                        self.method.on_step_end(self.step, self.total_steps)
                    else:
                        self._skip_step(grad_norm)
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    if self.step - start_step == 3:
                        self._speed_mark = (self.step, time.perf_counter())
                    if cfg.minutes is not None and self.step == max(self.warmup_steps, 10) and start_step == 0:
                        self._replan(time_limit)
                        bar.total = self.total_steps
                        bar.refresh()
                    window_steps += 1
                    last_loss = loss_sum / self.accum
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                        now = time.perf_counter()
                        throughput = window_steps * batch_images / max(now - window_start, 1e-9)
                        record = {
                            "step": self.step,
                            "loss": last_loss,
                            "lr": cfg.optim.lr * factor,
                            "img_per_s": round(throughput, 2),
                            "epoch": round(self.step * batch_images / self.images.num_images, 4),
                            "elapsed_s": round(self.elapsed_before + now - self.start_time, 2),
                            **({"grad_norm": grad_norm} if math.isfinite(grad_norm) else {}),
                            "skipped_steps": self.skipped_steps,
                            **extra,
                        }
                        write_record(record)
                        bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{throughput:.0f}")
                        window_start, window_steps = now, 0
                    if self.main:
                        self._watch_collapse(extra)
                    if cfg.monitor_data and (self.step % cfg.monitor_every == 0 or self.step == self.total_steps):
                        monitor_start = time.perf_counter()
                        if self.monitor is not None:
                            accuracy = self._run_monitor()
                            write_record({"step": self.step, "knn_monitor": accuracy})
                            bar.set_postfix(loss=f"{last_loss:.4f}", knn=f"{100 * accuracy:.1f}%")
                        distributed.barrier()  # the other ranks wait for rank 0's measurement
                        window_start += time.perf_counter() - monitor_start  # img/s counts training only
                    distributed.kill_for_fault_test(self.step)
                    if self.step % cfg.ckpt_every == 0 and self.step < self.total_steps:
                        self.save()
                if logger is not None and logger.wants_images:
                    self._log_images(logger, at_start=False)
            finally:
                bar.close()
                if logger is not None:
                    logger.close()
                if self.log_handler is not None:
                    log.removeHandler(self.log_handler)
                    self.log_handler.close()
                if self._log_filter is not None:
                    log.removeFilter(self._log_filter)
        path = self.save()
        elapsed = self.elapsed_before + time.perf_counter() - self.start_time
        run_seconds = time.perf_counter() - self.start_time
        summary = {
            "method": cfg.method,
            "backbone": self.method.backbone.name,
            "steps": self.step,
            "planned_steps": self.total_steps,
            "images_seen": self.step * batch_images,
            "minutes": round(elapsed / 60, 3),
            "img_per_s": round((self.step - start_step) * batch_images / max(run_seconds, 1e-9), 2),
            "final_loss": last_loss,
            "skipped_steps": self.skipped_steps,
            "checkpoint": str(path),
            "run_dir": str(self.run_dir),
            "processes": self.world,
        }
        if self.main:
            (self.run_dir / "pretrain.json").write_text(json.dumps(summary, indent=2))
        return summary


def pretrain(cfg: PretrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Pre-train ``cfg.backbone`` with ``cfg.method`` on ``cfg.data``; returns a summary dict.

    Under torchrun (``WORLD_SIZE`` > 1) every process calls this; it joins the process group (NCCL on
    CUDA, gloo otherwise) and leaves it at the end when it created it.
    """
    created = distributed.init_from_env(training_device(cfg.device))
    try:
        return Trainer(cfg, resume=resume, progress=progress).fit()
    finally:
        if created:
            distributed.cleanup()
