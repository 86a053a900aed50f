"""Data-parallel training across processes started by ``torchrun``: the process group, collectives,
batch-norm statistics over all ranks, and each rank's share of a step's random draws.

Every function here is a no-op in a single process (no process group): ``world() == 1``,
``is_main()`` is True, gathers return their input, reductions return it unchanged. A 1-process run
therefore computes bit for bit what it computed before data parallelism existed.

Global batch semantics: a step's global batch of B images is the same set of images as in a
1-process run; rank r of W takes the r-th contiguous slice of B / W images. Random parameters (crops,
flips, colour jitter, masks) are drawn for the global batch from the step's shared generator and each
rank keeps its slice (``rank_share_of_draws``), so W processes see exactly the views one process would.
"""

from __future__ import annotations

import inspect
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

if TYPE_CHECKING:
    from selfsight.methods.base import Method, StepOutput

log = logging.getLogger("selfsight")

__all__ = [
    "GlobalBatchNorm",
    "TrainingStep",
    "all_reduce_mean",
    "any_rank",
    "barrier",
    "broadcast_object",
    "cleanup",
    "convert_sync_batchnorm",
    "draw_rows",
    "env_rank",
    "env_world",
    "gather",
    "gather_objects",
    "gather_with_grad",
    "has_batchnorm",
    "init_from_env",
    "is_main",
    "kill_for_fault_test",
    "poison_gradient_for_fault_test",
    "launched_by_torchrun",
    "local_rank",
    "rank",
    "rank_share_of_draws",
    "restart_count",
    "world",
    "wrap_training_step",
]


# --- the process group ------------------------------------------------------------------------
def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    """Number of processes training together (1 without a process group)."""
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    """This process's rank in [0, world()) (0 without a process group)."""
    return dist.get_rank() if _active() else 0


def is_main() -> bool:
    """True on the process that writes logs, checkpoints and reports (rank 0, or the only process)."""
    return rank() == 0


def local_rank() -> int:
    """This process's index on its machine, as torchrun sets it (``LOCAL_RANK``; 0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def env_world() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``; 1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """The rank torchrun gave this process (``RANK``; 0 when not launched by torchrun). Unlike ``rank()``,
    valid before the process group exists and after it is gone."""
    return int(os.environ.get("RANK", "0"))


def restart_count() -> int:
    """How many times torchrun has restarted this job's workers (``TORCHELASTIC_RESTART_COUNT``; 0 when unset)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RESTART_COUNT" in os.environ


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).

    Backend: NCCL for CUDA devices, gloo otherwise. Does nothing when there is one process or a group
    already exists. Returns True when this call created the group (the caller then calls ``cleanup``).
    """
    if env_world() <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    options: dict[str, Any] = {"backend": "gloo"}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        options = {"backend": "nccl", "device_id": device}
    store = _attempt_store()
    if store is not None:
        options.update(store=store, rank=env_rank(), world_size=env_world())
    dist.init_process_group(**options)  # without a store: env://
    log.debug("rank %d of %d joined the process group (%s)", dist.get_rank(), dist.get_world_size(), device)
    return True


def _attempt_store() -> dist.Store | None:
    """A store of this attempt's own keys when torchrun restarted the workers on one machine, else None.

    torchrun's agent hosts the store the workers meet in (``TORCHELASTIC_USE_AGENT_STORE``) and keeps it
    across restarts, with the keys the failed attempt wrote (pytorch#135712): a restarted worker can
    read its peer's old address and fail to connect, or hang. Prefixing the keys with the restart count
    isolates the attempts. Only on one machine, where every worker has the same count; across machines
    the counts can differ (a healthy node restarts without counting), so there the fix is torchrun's own:
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in the launch environment (a fresh store per attempt).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or restart_count() == 0:
        return None
    if int(os.environ.get("LOCAL_WORLD_SIZE", "0")) != env_world():
        log.warning(
            "torchrun restart across machines: if the workers fail to connect, relaunch with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (the shared store keeps the failed attempt's keys)"
        )
        return None
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env_world(), is_master=False
    )
    return dist.PrefixStore(f"selfsight/attempt-{restart_count()}", agent_store)


def cleanup() -> None:
    """Leave the process group, if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here."""
    if _active():
        dist.barrier()


# --- collectives ------------------------------------------------------------------------------
def _device_for_collectives() -> torch.device:
    """NCCL moves CUDA tensors only; gloo moves CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over ranks (a new tensor; no gradient). x: any shape, the same on every rank."""
    if not _active():
        return x
    out = x.detach().clone()
    dist.all_reduce(out)
    return out / world()


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """For each flag, True when it is True on at least one rank: a decision every rank takes together."""
    if not _active():
        return tuple(bool(f) for f in flags)
    votes = torch.tensor([float(f) for f in flags], device=_device_for_collectives())
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return tuple(bool(v > 0) for v in votes.tolist())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (any picklable object)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list in a single process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenation of every rank's ``x`` along dim 0, in rank order; no gradient (queue keys).

    x: [N, ...], the same shape on every rank -> [world * N, ...]. Returns ``x`` itself in one process.
    """
    if not _active():
        return x
    parts = [torch.empty_like(x) for _ in range(world())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank's gradient for a slice back to the rank that owns it.

    Forward: x_r [N, ...] on each rank r -> X = cat(x_0, ..., x_{W-1}) [W N, ...] on every rank.
    The objective DDP minimises is the mean over ranks of the per-rank losses, (1/W) sum_r L_r, and
    every L_r depends on every x_s through X. So dx_s must collect sum_r dL_r/dX[slice s]: the backward
    all-reduces (sums) the [W N, ...] gradient of X and keeps this rank's slice. DDP then divides the
    parameter gradients by W, giving the gradient of (1/W) sum_r L_r. An all-reduce rather than a
    reduce-scatter, because gloo has no reduce-scatter; the gradients gathered here are small.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenation of every rank's ``x`` along dim 0 that gradients flow back through to every rank.

    x: [N, ...], the same shape on every rank -> [world * N, ...]; rank r's rows are [r N, (r + 1) N).
    Returns ``x`` itself in one process.
    """
    if not _active():
        return x
    return _GatherWithGrad.apply(x)


# --- random draws for the global batch --------------------------------------------------------
#: (rank, world) whose share of per-sample random draws the draw sites keep; (0, 1): draw what is asked
_DRAW_SHARE: ContextVar[tuple[int, int]] = ContextVar("selfsight_draw_share", default=(0, 1))


@contextmanager
def rank_share_of_draws(share_rank: int | None = None, share_world: int | None = None) -> Iterator[None]:
    """Within this context, per-sample random draws (crops, flips, jitter, blur, masks) are made for the
    global batch (``world`` times the local batch) and each rank keeps its own contiguous slice.

    So with the same generator every rank draws the same numbers, and rank r's samples get exactly the
    parameters that the samples at the same place of a 1-process run's batch get. Defaults to this
    process's rank and world; a no-op in one process.
    """
    share = (rank() if share_rank is None else share_rank, world() if share_world is None else share_world)
    token = _DRAW_SHARE.set(share)
    try:
        yield
    finally:
        _DRAW_SHARE.reset(token)


def draw_rows(batch_size: int) -> tuple[int, slice]:
    """For a draw of per-sample parameters of ``batch_size`` local samples: how many rows to draw and
    which of them are this rank's (``(batch_size, slice(0, batch_size))`` outside ``rank_share_of_draws``).

    Draw sites draw ``rows`` and index the result with ``mine`` straight away::

        rows, mine = draw_rows(batch_size)
        coins = torch.rand(rows, generator=generator)[mine]
    """
    share_rank, share_world = _DRAW_SHARE.get()
    return batch_size * share_world, slice(share_rank * batch_size, (share_rank + 1) * batch_size)


# --- batch norm over all ranks ----------------------------------------------------------------
class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, on any device and backend.

    ``torch.nn.SyncBatchNorm`` refuses CPU tensors, so CPU (gloo) training uses this layer. Each rank
    computes its per-channel mean and biased variance; the ranks exchange (mean, variance, count) with
    a differentiable gather and combine them with the parallel-variance formula

        mean = sum_r n_r m_r / n,    var = sum_r n_r (v_r + (m_r - mean)^2) / n,

    which is exact and avoids the cancellation of E[x^2] - E[x]^2. Gradients flow through the gather
    to every rank (see ``_GatherWithGrad``). Running statistics get the unbiased variance, as BatchNorm's.
    Statistics are computed in float32. In eval mode, or in one process, this is plain BatchNorm.
    Input: [N, C] or [N, C, ...].
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input [N, C, ...], got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _active()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        x32 = x.float()
        var, mean = torch.var_mean(x32, dim=dims, unbiased=False)  # [C] each
        count = torch.full_like(mean, x.numel() / x.shape[1])
        stats = gather_with_grad(torch.stack([mean, var, count]).unsqueeze(0))  # [W, 3, C]
        means, variances, counts = stats.unbind(dim=1)  # [W, C] each
        total = counts.sum(dim=0)
        weights = counts / total
        global_mean = (weights * means).sum(dim=0)
        global_var = (weights * (variances + (means - global_mean) ** 2)).sum(dim=0)
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(global_mean.detach(), global_var.detach(), float(total.detach()[0]))
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x32 - global_mean.view(shape)) * torch.rsqrt(global_var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.float().view(shape) + self.bias.float().view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (count / max(count - 1.0, 1.0))
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


_PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _to_global_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every plain BatchNorm{1,2,3}d replaced by a GlobalBatchNorm sharing its parameters
    and buffers (so an optimiser built before still holds the right tensors and state dict keys stay)."""
    if type(module) in _PLAIN_BATCHNORMS:
        converted = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        log.warning(
            "%s keeps per-rank batch statistics on CPU (only plain BatchNorm layers are synchronised there)",
            type(module).__name__,
        )
    for name, child in module.named_children():
        module.add_module(name, _to_global_batchnorm(child))
    return module


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Batch statistics over all ranks for every BatchNorm of ``module`` (backbone, heads, momentum copies).

    CUDA: timm's converter (``torch.nn.SyncBatchNorm``, plus timm's BatchNormAct layers, which torch's
    own converter would strip of their activation). Other devices: ``GlobalBatchNorm``. Parameters and
    buffers are shared with the layers they replace, so state dict keys and checkpoints do not change.
    """
    if device.type == "cuda":
        from selfsight.backbones import sync_batchnorm  # the only module that knows timm

        return sync_batchnorm(module)
    return _to_global_batchnorm(module)



# --- the training step under DistributedDataParallel -------------------------------------------
class TrainingStep(nn.Module):
    """``forward(images, generator) = method.training_step(images, generator)``. DistributedDataParallel
    synchronises the gradients of what runs inside its module's ``forward``, and a method's training
    step is not its ``forward`` (SimMIM's ``forward`` is the masked reconstruction)."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> StepOutput:
        return self.method.training_step(images, generator)


def wrap_training_step(method: Method) -> tuple[nn.Module, DistributedDataParallel | None]:
    """``(module to call for a step, the DDP wrapper or None)``; in one process, no wrapper.

    No buffer broadcast before every forward (``broadcast_buffers=False``): the buffers stay equal on
    all ranks by construction (BatchNorm statistics synchronised, queue keys gathered before they are
    enqueued, DINO's centre all-reduced, momentum copies following identical online weights), and
    copying a 65,536-key queue every step would cost more than the step. DDP still copies rank 0's
    parameters and buffers once, when it wraps. ``find_unused_parameters=False``: every method uses every
    trainable parameter in every step (checked on CNN, ViT and Swin backbones); the momentum copies have
    ``requires_grad=False``, so DDP leaves them to ``on_step_end``, which updates them alike on every rank.
    """
    step = TrainingStep(method)
    if not _active():
        return step, None
    # torch 2.14 renamed broadcast_buffers to forward_sync_buffers (same meaning for False)
    no_forward_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
        else {"broadcast_buffers": False}
    )
    ddp = DistributedDataParallel(step, device_ids=None, find_unused_parameters=False, **no_forward_sync)
    return ddp, ddp


def kill_for_fault_test(step: int) -> None:
    """Hook of the fault-tolerance test: SIGKILL this process right after optimiser step
    ``SELFSIGHT_TEST_KILL_AT_STEP`` on rank ``SELFSIGHT_TEST_KILL_RANK`` (default 0), in torchrun's first
    attempt only (``TORCHELASTIC_RESTART_COUNT`` 0 or unset). Does nothing when the variable is unset."""
    at = os.environ.get("SELFSIGHT_TEST_KILL_AT_STEP")
    if at is None or int(at) != step or restart_count() > 0:
        return
    if rank() == int(os.environ.get("SELFSIGHT_TEST_KILL_RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)


def poison_gradient_for_fault_test(module: nn.Module, step: int) -> None:
    """Hook of the non-finite-gradient test: after the backward of step ``SELFSIGHT_TEST_INF_GRAD_AT_STEP``
    (comma-separated steps allowed), set the first gradient of ``module`` to +inf on rank
    ``SELFSIGHT_TEST_INF_GRAD_RANK`` only (default 0), after DDP has averaged the gradients, so the ranks
    disagree unless they decide together. Does nothing when the variable is unset."""
    at = os.environ.get("SELFSIGHT_TEST_INF_GRAD_AT_STEP")
    if at is None or step not in {int(s) for s in at.split(",")}:
        return
    if rank() == int(os.environ.get("SELFSIGHT_TEST_INF_GRAD_RANK", "0")):
        grad = next(p.grad for p in module.parameters() if p.grad is not None)
        grad.fill_(float("inf"))
