"""Batched iteration with an exact, resumable position.

The content of global batch b is a pure function of (seed, b): epoch e = b // batches_per_epoch
is a permutation of range(N) drawn from torch.Generator().manual_seed(seed * 1_000_003 + e), and
batch b takes the slice (b % batches_per_epoch) * B ... + B of it (the last incomplete batch of each
epoch is dropped). A run resumed at start_batch=k therefore sees exactly batches k, k+1, ...

Data parallelism: with ``world_size`` W processes each given ``batch_size`` B, global batch b is the
1-process run's batch of W * B images and rank r takes its r-th contiguous slice of B. Every image is
then seen once per epoch across the ranks (DistributedSampler's guarantee), and exact resume still holds.

Lazily decoded sets are decoded in DataLoader workers; given a `WorkerViews`, the workers also build the
views of each batch (`selfsight.data.worker_views`) and the stream yields `PreparedViews` in place of the
uint8 images. Unreadable files a worker meets come back with the batch: the stream lists them in
`BatchStream.bad_files` and adds them to the `skipped` of the training process's ImageSet.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from selfsight.data.imageset import BadFile, ImageSet, InMemoryImages, LazyImages
from selfsight.data.worker_views import PreparedViews, WorkerViews
from selfsight.errors import DataError

EPOCH_SEED_STRIDE = 1_000_003

Batch = tuple[torch.Tensor, torch.Tensor | None]  # (images uint8 [B, C, S, S], labels int64 [B] or None)
#: what the stream yields: (uint8 images [B, C, S, S] or their PreparedViews, labels int64 [B] or None)
StreamBatch = tuple[torch.Tensor | PreparedViews, torch.Tensor | None]


def epoch_permutation(num_images: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """int64 [N]: the order of epoch `epoch` (range(N) itself when not shuffling)."""
    if not shuffle:
        return torch.arange(num_images)
    generator = torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
    return torch.randperm(num_images, generator=generator)


class BatchIndexer:
    """Maps a global batch index to this rank's image indices; caches the current epoch's permutation.

    batch_size is per rank: a global batch holds batch_size * world_size images, of which rank r has
    the r-th contiguous slice.
    """

    def __init__(
        self, num_images: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1
    ) -> None:
        self.num_images = num_images
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = num_images // (batch_size * world_size)
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.int64)

    def indices(self, batch: int) -> torch.Tensor:
        """int64 [batch_size]: rank `rank`'s image indices of global batch `batch`."""
        epoch, position = divmod(batch, self.batches_per_epoch)
        if epoch != self._epoch:
            self._order = epoch_permutation(self.num_images, self.seed, epoch, self.shuffle)
            self._epoch = epoch
        start = (position * self.world_size + self.rank) * self.batch_size
        return self._order[start:start + self.batch_size]


def _load(images: ImageSet, indices: torch.Tensor) -> Batch:
    pixels, sources = images.load_batch(indices)
    return pixels, images.batch_labels(sources)


class _GlobalBatches(Dataset):
    """Map-style data set whose item b is this rank's share of global batch b (built inside a worker):
    (uint8 images, or their views when `views` is given; labels; the unreadable files met meanwhile)."""

    def __init__(self, images: ImageSet, indexer: BatchIndexer, views: WorkerViews | None = None) -> None:
        self.images = images
        self.indexer = indexer
        self.views = views

    def __getitem__(self, batch: int) -> tuple[torch.Tensor | PreparedViews, torch.Tensor | None, list[BadFile]]:
        pixels, labels = _load(self.images, self.indexer.indices(batch))
        met = self.images.take_new_bad_files() if isinstance(self.images, LazyImages) else []
        if self.views is None:
            return pixels, labels, met
        prepared = self.views.prepare(pixels, batch, self.indexer.rank, self.indexer.world_size)
        return prepared, labels, met


class _CountFrom(Sampler[int]):
    """Yields start, start + 1, ... forever."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


class _InOrderChunks(Dataset):
    """Item k is images [k * B, min(N, (k + 1) * B)) in file order."""

    def __init__(self, images: ImageSet, batch_size: int) -> None:
        self.images = images
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-self.images.num_images // self.batch_size)

    def __getitem__(self, chunk: int) -> Batch:
        start = chunk * self.batch_size
        return _load(self.images, torch.arange(start, min(self.images.num_images, start + self.batch_size)))


def _pin(batch: Batch) -> Batch:
    images, labels = batch
    return images.pin_memory(), None if labels is None else labels.pin_memory()


class BatchStream:
    """Yields (images uint8 [B, C, S, S], labels int64 [B] or None) for this rank's share of global
    batch indices start_batch, start_batch + 1, ... forever (epochs roll over); with `views` (a
    `WorkerViews`), lazily decoded sets and `num_workers` > 0, the workers build the views of each batch
    and the stream yields (`PreparedViews`, labels) instead (in-memory sets and num_workers 0: uint8 as ever).

    Batch b belongs to epoch b // batches_per_epoch; each epoch is a permutation of range(N) drawn
    from torch.Generator().manual_seed(seed * 1_000_003 + epoch); the last incomplete batch of an
    epoch is dropped. So the batch content is a pure function of (seed, b): a resumed run sees
    exactly the same data. With `world_size` W > 1, `batch_size` B is the per-rank batch: global batch
    b is the W * B images a 1-process stream of batch size W * B yields, and rank r gets its r-th
    contiguous slice (each image once per epoch across ranks). In-memory sets are indexed in the main
    process; lazy folders are decoded by a DataLoader with `num_workers` workers, each building whole batches.

    `bad_files`: (path relative to the root, reason) of each unreadable image met while streaming, once
    each, in the order met (in a worker or not); they are also added to `images.skipped` of this process.
    """

    def __init__(
        self,
        images: ImageSet,
        batch_size: int,
        seed: int,
        start_batch: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        shuffle: bool = True,
        *,
        rank: int = 0,
        world_size: int = 1,
        views: WorkerViews | None = None,
        indexer: BatchIndexer | None = None,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch size must be positive for {images.description}, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank must lie in [0, world_size), got rank {rank} of world size {world_size}")
        if batch_size * world_size > images.num_images:
            raise DataError(
                f"batch size {batch_size * world_size} is larger than the {images.num_images} images of "
                f"{images.description}"
            )
        if start_batch < 0:
            raise DataError(f"start_batch must be >= 0, got {start_batch}")
        self.images = images
        self.batch_size = batch_size
        self.seed = seed
        self.start_batch = start_batch
        self.num_workers = num_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = images.num_images // (batch_size * world_size)
        self.views = views
        self.indexer = indexer  # another order than epochs (PIC's sliding window), or None
        self._cached_indexer: BatchIndexer | None = None
        self.bad_files: list[tuple[str, str]] = []
        self._bad_seen: set[int] = set()

    @property
    def builds_views(self) -> bool:
        """True when the workers build the views (lazily decoded set, workers, a `WorkerViews`)."""
        return self.views is not None and self.num_workers > 0 and not isinstance(self.images, InMemoryImages)

    def _note_bad_files(self, met: list[BadFile]) -> None:
        for index, name, reason in met:
            if isinstance(self.images, LazyImages):
                self.images.note_bad_file(index, name, reason)
            if index not in self._bad_seen:
                self._bad_seen.add(index)
                self.bad_files.append((name, reason))

    def _indexer(self) -> BatchIndexer:
        if self.indexer is not None:
            return copy.deepcopy(self.indexer)
        return BatchIndexer(
            self.images.num_images, self.batch_size, self.seed, self.shuffle, self.rank, self.world_size
        )

    def batch_indices(self, batch: int) -> torch.Tensor:
        """int64 [B]: this rank's image indices of global batch `batch` (a pure function of seed, batch,
        rank and world size)."""
        if self._cached_indexer is None:  # one indexer: its epoch permutation is drawn once, not every batch
            self._cached_indexer = self._indexer()
        return self._cached_indexer.indices(batch)

    def __iter__(self) -> Iterator[StreamBatch]:
        indexer = self._indexer()
        if isinstance(self.images, InMemoryImages):
            for batch in itertools.count(self.start_batch):
                loaded = _load(self.images, indexer.indices(batch))
                yield _pin(loaded) if self.pin_memory else loaded
            return
        if isinstance(self.images, LazyImages):
            self.images.take_new_bad_files()  # met before this stream (already in `skipped`): not reported
        loader = DataLoader(
            _GlobalBatches(self.images, indexer, self.views if self.builds_views else None),
            batch_size=None,  # items are whole batches already
            sampler=_CountFrom(self.start_batch),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )
        for images, labels, met in loader:
            if met:
                self._note_bad_files(met)
            yield images, labels


def iterate_in_order(images: ImageSet, batch_size: int, num_workers: int = 0) -> Iterator[Batch]:
    """All images once, in order, as (uint8 [b, C, S, S], labels int64 [b] or None); the last batch
    may be smaller. Lazy folders are decoded by `num_workers` DataLoader workers when > 0."""
    if batch_size < 1:
        raise DataError(f"batch size must be positive for {images.description}, got {batch_size}")
    chunks = _InOrderChunks(images, batch_size)
    if isinstance(images, InMemoryImages) or num_workers == 0:
        for chunk in range(len(chunks)):
            yield chunks[chunk]
        return
    yield from DataLoader(chunks, batch_size=None, shuffle=False, num_workers=num_workers)
