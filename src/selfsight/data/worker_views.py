"""Views built in the DataLoader workers: on the CPU, a worker that decodes a batch also makes its views.

The views of micro-step b depend only on (seed, b): the engine draws every random number of the step from
``selfsight.engine.step_generator(seed, b)``, views first. A worker that has decoded batch b therefore draws
the views from that same generator (for the global batch, keeping this rank's rows, as
``selfsight.distributed.rank_share_of_draws`` does in the training process), and ships them as a
`PreparedViews` together with the generator's state after the view draws. ``Method.views`` hands those views
back and sets the step's generator to that state, so everything drawn after the views (SimMIM's mask) is
drawn as without workers: the views and every later draw are bit-identical to building the views in the
training process (same code, same machine; the view ops do not depend on the number of threads), and a
resumed run stays exact.

Used for lazily decoded sets (large folders, tar shards) with ``num_workers > 0`` when training on the
CPU (`worker_views_for`); in-memory sets and GPU training keep the batched views in the training process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from selfsight.data.views import ViewSpec, make_views
from selfsight.distributed import rank_share_of_draws


class ViewMaker(Protocol):
    """A picklable recipe: uint8 images [B, C, S, S] and the step's CPU generator -> a method's views
    (float32, one tensor [B, C, s, s] per view), drawing from the generator exactly as the method does."""

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]: ...


@dataclass(frozen=True)
class SpecViews:
    """`make_views` with fixed view specs and normalisation (the contrastive methods' ``Method.views``).

    mean, std: float32 [1, C, 1, 1] on the CPU (copies of the method's buffers, so the normalisation is
    bit-identical to the method's)."""

    specs: tuple[ViewSpec, ...]
    mean: torch.Tensor
    std: torch.Tensor

    def __call__(self, images: torch.Tensor, generator: torch.Generator, *,
                 out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        return make_views(images, self.specs, self.mean, self.std, generator=generator, out=out)

    def out_shapes(self, images_shape: Sequence[int]) -> list[tuple[int, ...]]:
        """The shape of each view of images of shape [B, C, S, S]."""
        return [(images_shape[0], images_shape[1], spec.size, spec.size) for spec in self.specs]


@dataclass
class PreparedViews:
    """The views of one batch, built in a DataLoader worker, in place of the uint8 batch.

    views: float32 [B, C, s, s] per view, normalised; generator_state: uint8 [K], the step generator's
    ``get_state()`` after the view draws; shape: the uint8 batch's shape [B, C, S, S] (so code that reads
    ``images.shape[0]`` works unchanged); batch: the global batch index (micro-step) it belongs to.
    """

    views: list[torch.Tensor]
    generator_state: torch.Tensor
    shape: torch.Size
    batch: int

    @property
    def device(self) -> torch.device:
        return self.views[0].device

    def __len__(self) -> int:
        return self.shape[0]

    def size(self, dim: int | None = None) -> Any:
        """Like ``Tensor.size``: of the uint8 batch."""
        return self.shape if dim is None else self.shape[dim]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PreparedViews:
        """The views moved to ``device`` (the generator state stays on the CPU)."""
        views = [view.to(device, non_blocking=non_blocking) for view in self.views]
        return PreparedViews(views, self.generator_state, self.shape, self.batch)

    def pin_memory(self) -> PreparedViews:
        return PreparedViews([view.pin_memory() for view in self.views], self.generator_state, self.shape, self.batch)

    def restore(self, generator: torch.Generator) -> list[torch.Tensor]:
        """Sets ``generator`` to the state after the view draws and returns the views (a new list)."""
        generator.set_state(self.generator_state)
        return list(self.views)


@dataclass(frozen=True)
class WorkerViews:
    """What a DataLoader worker needs to build the views of batch b: the method's recipe and the step's
    generator. generator_for: b -> a fresh CPU generator (the engine's ``step_generator`` bound to the
    seed; picklable, e.g. ``functools.partial``)."""

    maker: ViewMaker
    generator_for: Callable[[int], torch.Generator]

    def prepare(self, images: torch.Tensor, batch: int, rank: int = 0, world_size: int = 1) -> PreparedViews:
        """images: this rank's uint8 [B, C, S, S] of global batch ``batch`` -> its PreparedViews. The views
        are drawn for the global batch of ``world_size`` * B images, rank ``rank`` keeping its rows.
        Inside a worker, the views are written straight into shared memory (no copy when they are sent)."""
        generator = self.generator_for(batch)
        out = None
        shapes = getattr(self.maker, "out_shapes", None)
        if torch.utils.data.get_worker_info() is not None and shapes is not None:
            out = [_shared_empty(shape) for shape in shapes(images.shape)]
        with rank_share_of_draws(rank, world_size):
            views = self.maker(images, generator, out=out) if out is not None else self.maker(images, generator)
        return PreparedViews(views, generator.get_state(), images.shape, batch)


def _shared_empty(shape: Sequence[int]) -> torch.Tensor:
    """An uninitialised float32 tensor in shared memory (what the DataLoader's collate does for batches)."""
    numel = 1
    for side in shape:
        numel *= side
    try:
        storage = torch.empty(0, dtype=torch.float32)._typed_storage()._new_shared(numel)
        return torch.empty(0, dtype=torch.float32).new(storage).view(*shape)
    except (AttributeError, RuntimeError):  # private API; sending the tensor then copies it into shared memory
        return torch.empty(tuple(shape), dtype=torch.float32)


def worker_views_for(method: Any, device: torch.device, generator_for: Callable[[int], torch.Generator]
                     ) -> WorkerViews | None:
    """The views the DataLoader workers should build for ``method`` training on ``device``, or None.

    None on any device but the CPU (there the views are batched on the device, in the training process)
    and for a method whose views the workers cannot reproduce. A method provides its recipe with a
    ``worker_view_maker()`` method (SimMIM), or uses the base ``Method.views`` with ``view_specs``
    (SimCLR, MoCo, BYOL, MoBY, DINO). The stream uses it only for lazily decoded data with workers.
    """
    if device.type != "cpu":
        return None
    from selfsight.methods.base import Method  # the methods import this package

    own = getattr(method, "worker_view_maker", None)
    if callable(own):
        return WorkerViews(own(), generator_for)
    if type(method).views is Method.views and getattr(method, "view_specs", None):
        mean = method.mean.detach().to("cpu", torch.float32).clone()
        std = method.std.detach().to("cpu", torch.float32).clone()
        return WorkerViews(SpecViews(tuple(method.view_specs), mean, std), generator_for)
    return None
