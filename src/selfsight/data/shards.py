"""WebDataset-style tar shards: a streaming image set and a resumable, DDP-aware batch stream.

A shards folder (written by `selfsight data pack`, see `selfsight.data.pack`) holds::

    shard-000000.tar, shard-000001.tar, ...   plain tar files; sample i is the member
                                              `{i:09d}.{ext}` (the original encoded bytes) and,
                                              when labeled, `{i:09d}.cls` (the label as text)
    index.json                                per shard: name, size, and each sample's data offset,
                                              byte count, extension and label; the class names

Any WebDataset reader can read the tars. Here a sample is read with one seek using the index, so
`ShardImages` is an ordinary lazy `ImageSet` (random access for evaluation and statistics), and
`ShardStream` streams it for training:

- Epoch e's order is a pure function of (seed, e): the shards in an order permuted from
  (seed, e), their samples in order, passed through a shuffle buffer of `shuffle_buffer`
  sample IDs. The buffer runs over IDs, not images (cheap), so any position is reached by
  replaying IDs and only emitted samples are decoded; a resumed stream (start_batch=k) yields
  exactly batches k, k+1, ... of an uninterrupted one. Reads stay local: a batch draws from the
  ~`shuffle_buffer` samples around the current read position, not from all shards.
- DDP: the epoch order is cut into global batches of batch_size * world_size samples; rank r
  takes the r-th contiguous slice of batch_size from each. Every sample arrives once per epoch
  across ranks, except the N mod (batch_size * world_size) last ones of the epoch order, which
  are dropped so that every rank has the same number of batches per epoch.
- Memory: only the batch being decoded (and the DataLoader's prefetched batches) holds images;
  each process also holds the index and the epoch's order of IDs (a few int64 per sample; the
  order of 1M samples takes about 0.6 s to compute, once per epoch and worker).
"""

from __future__ import annotations

import bisect
import io
import itertools
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from selfsight.data.decode import try_decode_image_file
from selfsight.data.imageset import ImageSet, LazyImages
from selfsight.data.loader import EPOCH_SEED_STRIDE, BatchIndexer, BatchStream
from selfsight.data.worker_views import WorkerViews
from selfsight.errors import DataError

INDEX_NAME = "index.json"
INDEX_FORMAT = "selfsight-shards"
INDEX_VERSION = 1
DEFAULT_SHUFFLE_BUFFER = 4096


def shard_name(shard: int) -> str:
    """File name of shard number `shard`: shard-000000.tar, ..."""
    return f"shard-{shard:06d}.tar"


def sample_key(index: int) -> str:
    """The WebDataset key of sample `index` (its members are KEY.jpg, KEY.cls ...)."""
    return f"{index:09d}"


def is_shard_dir(path: str) -> bool:
    """True for a folder holding index.json and the first shard."""
    return os.path.isfile(os.path.join(path, INDEX_NAME)) and os.path.isfile(os.path.join(path, shard_name(0)))


# ---------------------------------------------------------------- the index


@dataclass(frozen=True)
class ShardIndex:
    """Where every sample lies: sample i is in shard bisect(starts, i) - 1, at byte offsets[i]."""

    names: list[str]  # shard file names
    starts: list[int]  # [num_shards + 1]: first sample of each shard, then the total
    offsets: np.ndarray = field(repr=False)  # int64 [N]: byte offset of the image data in its shard
    sizes: np.ndarray = field(repr=False)  # int64 [N]: byte count of the encoded image
    ext_codes: np.ndarray = field(repr=False)  # uint8 [N]: index into `extensions`
    extensions: list[str]  # e.g. ["jpg", "png"]
    labels: torch.Tensor | None  # int64 [N], or None when unlabeled
    classes: list[str]

    @property
    def num_samples(self) -> int:
        return self.starts[-1]

    def shard_of(self, index: int) -> int:
        """The shard holding sample `index`."""
        return bisect.bisect_right(self.starts, index) - 1


def _column(shards: list[dict[str, Any]], key: str, dtype: type) -> np.ndarray:
    return np.concatenate([np.asarray(shard[key], dtype=dtype) for shard in shards])


def _parse_index(content: dict[str, Any]) -> ShardIndex:
    """The index.json content -> ShardIndex (KeyError/ValueError/TypeError on a malformed index)."""
    shards = content["shards"]
    if not shards:
        raise ValueError("no shards listed")
    counts = [int(shard["num_samples"]) for shard in shards]
    for shard, count in zip(shards, counts):
        if not len(shard["offsets"]) == len(shard["sizes"]) == len(shard["exts"]) == count:
            raise ValueError(f"{shard['name']}: column lengths differ from num_samples {count}")
    all_exts = [ext for shard in shards for ext in shard["exts"]]
    extensions = sorted(set(all_exts))
    code_of = {ext: code for code, ext in enumerate(extensions)}
    classes = [str(name) for name in content["classes"]]
    labels = None
    if classes:
        labels = torch.from_numpy(_column(shards, "labels", np.int64))
    return ShardIndex(
        names=[str(shard["name"]) for shard in shards],
        starts=[0, *itertools.accumulate(counts)],
        offsets=_column(shards, "offsets", np.int64),
        sizes=_column(shards, "sizes", np.int64),
        ext_codes=np.asarray([code_of[ext] for ext in all_exts], dtype=np.uint8),
        extensions=extensions,
        labels=labels,
        classes=classes,
    )


def read_shard_index(root: str) -> ShardIndex:
    """Reads and checks ROOT/index.json; DataError (one line, naming the file) when it is unusable
    or a shard is missing or of another size than the index says (an incomplete copy)."""
    path = os.path.join(root, INDEX_NAME)
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except (OSError, ValueError) as err:
        raise DataError(f"{path} cannot be read ({type(err).__name__}: {err})") from err
    if not isinstance(content, dict) or content.get("format") != INDEX_FORMAT:
        raise DataError(f"{path} is not a selfsight shard index (written by `selfsight data pack`)")
    if content.get("version") != INDEX_VERSION:
        raise DataError(f"{path} has index version {content.get('version')}; this selfsight reads {INDEX_VERSION}")
    try:
        index = _parse_index(content)
    except (KeyError, ValueError, TypeError) as err:
        raise DataError(f"{path} is malformed ({type(err).__name__}: {err})") from err
    if index.num_samples == 0:
        raise DataError(f"{path} lists no samples")
    for name, shard in zip(index.names, content["shards"]):
        shard_path = os.path.join(root, name)
        size = os.path.getsize(shard_path) if os.path.isfile(shard_path) else None
        if size != shard["num_bytes"]:
            found = "missing" if size is None else f"{size} bytes"
            raise DataError(f"{shard_path} is {found}, {path} says {shard['num_bytes']} bytes (incomplete copy?)")
    return index


# ---------------------------------------------------------------- the image set


@dataclass
class ShardImages(LazyImages):
    """A shards folder read lazily: sample i is decoded from its shard with one seek.

    Images are uint8 [B, C, S, S] decoded exactly as an image folder's (same bytes, same decoder).
    Train on it with `ShardStream` (or `make_batch_stream`); random access (`load_batch`) serves
    evaluation and `mean_std`, which decodes a fixed sample of at most `max_images` images.
    """

    shard_index: ShardIndex | None = field(default=None, repr=False)

    @property
    def shards(self) -> ShardIndex:
        """The index (where each sample lies)."""
        if self.shard_index is None:
            raise ValueError("ShardImages needs a shard_index")
        return self.shard_index

    def name_of(self, index: int) -> str:
        """"shard-000003.tar/000031415.jpg": the shard and member holding sample `index`."""
        shards = self.shards
        extension = shards.extensions[shards.ext_codes[index]]
        return f"{shards.names[shards.shard_of(index)]}/{sample_key(index)}.{extension}"

    def read_bytes(self, index: int) -> bytes:
        """The encoded image of sample `index`, read with one seek (OSError when unreadable)."""
        shards = self.shards
        size = int(shards.sizes[index])
        with open(os.path.join(self.root, shards.names[shards.shard_of(index)]), "rb") as handle:
            handle.seek(int(shards.offsets[index]))
            data = handle.read(size)
        if len(data) != size:
            raise OSError(f"shard ends {size - len(data)} bytes early")
        return data

    def try_decode(self, index: int) -> tuple[np.ndarray | None, str]:
        """Sample `index` as uint8 [C, S, S], or (None, reason)."""
        try:
            data = self.read_bytes(index)
        except OSError as err:
            return None, f"{type(err).__name__}: {err}"
        return try_decode_image_file(io.BytesIO(data), self.in_chans, self.img_size)


def open_shards(root: str, in_chans: int, img_size: int) -> ShardImages:
    """Opens a shards folder as uint8 [N, in_chans, img_size, img_size] images (nothing decoded yet)."""
    index = read_shard_index(root)
    labels = f"{len(index.classes)} classes" if index.classes else "unlabeled"
    return ShardImages(
        description=f"shards {root} ({index.num_samples} images in {len(index.names)} shards, {labels})",
        num_images=index.num_samples,
        labels=index.labels,
        classes=index.classes,
        skipped=[],
        in_chans=in_chans,
        img_size=img_size,
        root=root,
        shard_index=index,
    )


# ---------------------------------------------------------------- epoch order


def buffer_shuffle(ids: Iterable[int], count: int, buffer_size: int, generator: torch.Generator) -> list[int]:
    """Passes the `count` IDs of `ids` through a shuffle buffer: once `buffer_size` are held, each
    new ID takes the place of a uniformly drawn held one, which is emitted; the rest leave in random
    order. Returns all `count` IDs, each once."""
    stream = iter(ids)
    held = list(itertools.islice(stream, min(buffer_size, count)))
    picks = torch.randint(0, max(1, len(held)), (count - len(held),), generator=generator).tolist()
    order: list[int] = []
    for new_id, pick in zip(stream, picks):
        order.append(held[pick])
        held[pick] = new_id
    order.extend(held[i] for i in torch.randperm(len(held), generator=generator).tolist())
    return order


def shard_epoch_order(
    starts: Sequence[int], seed: int, epoch: int, buffer_size: int, shuffle: bool = True
) -> torch.Tensor:
    """int64 [N]: the sample IDs of epoch `epoch` in stream order (range(N) when not shuffling).

    starts: [num_shards + 1] first sample of each shard, then N. The shard order is a permutation
    drawn from torch.Generator().manual_seed(seed * 1_000_003 + epoch); the same generator then
    drives the shuffle buffer.
    """
    total = starts[-1]
    if not shuffle:
        return torch.arange(total)
    generator = torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
    shard_order = torch.randperm(len(starts) - 1, generator=generator).tolist()
    ids = itertools.chain.from_iterable(range(starts[s], starts[s + 1]) for s in shard_order)
    return torch.tensor(buffer_shuffle(ids, total, buffer_size, generator), dtype=torch.int64)


class ShardBatchIndexer(BatchIndexer):
    """A `BatchIndexer` whose epoch order is `shard_epoch_order`: maps a global batch index to this
    rank's sample IDs; caches the current epoch's order."""

    def __init__(self, starts: Sequence[int], batch_size: int, seed: int, *, shuffle: bool,
                 buffer_size: int, rank: int, world_size: int) -> None:
        super().__init__(starts[-1], batch_size, seed, shuffle, rank, world_size)
        self.starts = list(starts)
        self.buffer_size = buffer_size

    def indices(self, batch: int) -> torch.Tensor:
        """int64 [batch_size]: rank `rank`'s sample IDs of global batch `batch`."""
        epoch, position = divmod(batch, self.batches_per_epoch)
        if epoch != self._epoch:
            self._order = shard_epoch_order(self.starts, self.seed, epoch, self.buffer_size, self.shuffle)
            self._epoch = epoch
        start = (position * self.world_size + self.rank) * self.batch_size
        return self._order[start:start + self.batch_size]


# ---------------------------------------------------------------- the batch stream


class ShardStream(BatchStream):
    """Yields (images uint8 [B, C, S, S], labels int64 [B] or None) for this rank's share of global
    batches start_batch, start_batch + 1, ... forever (epochs roll over): a `BatchStream` (same
    arguments, same contract) whose epoch order streams through the shards.

    Batch b belongs to epoch b // batches_per_epoch, batches_per_epoch = N // (B * world_size); its
    content is a pure function of (seed, b, rank, world_size) (see the module docstring), so a
    resumed run sees exactly the same data. Batches are decoded by a DataLoader with `num_workers`
    workers, each building whole batches; the order does not depend on `num_workers`.
    """

    def __init__(
        self,
        images: ShardImages,
        batch_size: int,
        seed: int,
        start_batch: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        shuffle: bool = True,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        views: WorkerViews | None = None,
        indexer: Any = None,
    ) -> None:
        if indexer is not None:  # e.g. PIC's sliding window: its labels are positions in that order
            raise DataError(
                f"{images.description}: tar shards stream in their own order, and this method needs its own data "
                "order (PIC's sliding window); train it on the image folder itself"
            )
        if shuffle_buffer < 1:
            raise DataError(f"the shuffle buffer must hold at least one sample, got {shuffle_buffer}")
        super().__init__(images, batch_size, seed, start_batch, num_workers, pin_memory, shuffle,
                         rank=rank, world_size=world_size, views=views)
        self.starts = images.shards.starts
        self.shuffle_buffer = shuffle_buffer

    def _indexer(self) -> ShardBatchIndexer:
        return ShardBatchIndexer(self.starts, self.batch_size, self.seed, shuffle=self.shuffle,
                                 buffer_size=self.shuffle_buffer, rank=self.rank, world_size=self.world_size)


def make_batch_stream(images: ImageSet, *args: Any, **kwargs: Any) -> BatchStream:
    """The training stream for `images`, this rank's share: a `ShardStream` for shards, else a
    `BatchStream`, built with `BatchStream`'s arguments (batch_size, seed, start_batch, num_workers,
    pin_memory, shuffle, rank=, world_size=, views=). Both yield (uint8 [B, C, S, S], int64 [B] or None)
    for batches start_batch, start_batch + 1, ... (or PreparedViews in place of the uint8 images, when
    their workers build the views, see `BatchStream`)."""
    stream_class = ShardStream if isinstance(images, ShardImages) else BatchStream
    return stream_class(images, *args, **kwargs)
