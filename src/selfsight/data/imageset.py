"""ImageSet: a data set of fixed-size uint8 images, held in memory or decoded lazily (folders, tar shards)."""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from selfsight.data.decode import default_decode_threads, try_decode_image_file
from selfsight.errors import DataError

logger = logging.getLogger("selfsight.data")

_STATS_SEED = 0
_STATS_CHUNK = 256
_SUMMARY_SKIPPED = 20

BadFile = tuple[int, str, str]  # (image index, path relative to the root, one-line reason)


@dataclass
class ImageSet(abc.ABC):
    """Decoded images in memory, or a lazy folder.

    Images are always returned as uint8 [B, C, S, S] with C = in_chans (1 = grayscale 'L', 3 = RGB;
    RGBA/LA/P/CMYK/16-bit converted) and S = img_size. Subclasses implement `load_batch`.
    """

    description: str  # e.g. "fashion-mnist train (IDX, 60000 images)"
    num_images: int
    labels: torch.Tensor | None  # int64 [N], or None when unlabeled
    classes: list[str]  # class names, [] when unlabeled
    skipped: list[tuple[str, str]]  # (path, reason) of files that could not be decoded
    in_chans: int
    img_size: int

    @abc.abstractmethod
    def load_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """indices: int64 [B] -> (images uint8 [B, C, S, S], source indices int64 [B]).

        The source index differs from the asked one only where a lazy file turned out unreadable
        and was replaced; use it to look up labels.
        """

    def get_batch(self, indices: torch.Tensor) -> torch.Tensor:
        """indices: int64 [B] -> images uint8 [B, C, S, S]."""
        return self.load_batch(indices)[0]

    def batch_labels(self, source_indices: torch.Tensor) -> torch.Tensor | None:
        """Labels int64 [B] for the source indices from `load_batch`, or None when unlabeled."""
        return None if self.labels is None else self.labels[source_indices]

    def _stats_batches(self, index_chunks: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Yields images uint8 [b, C, S, S] for each chunk, in order."""
        for chunk in index_chunks:
            yield self.get_batch(chunk)

    def mean_std(self, max_images: int = 10000) -> tuple[list[float], list[float]]:
        """Per-channel mean and std in [0, 1] units over all images, or over a fixed seeded sample
        of `max_images` of them (the same sample every call)."""
        if self.num_images <= max_images:
            sample = torch.arange(self.num_images)
        else:
            generator = torch.Generator().manual_seed(_STATS_SEED)
            sample = torch.randperm(self.num_images, generator=generator)[:max_images].sort().values
        total = torch.zeros(self.in_chans, dtype=torch.float64)
        total_sq = torch.zeros(self.in_chans, dtype=torch.float64)
        for images in self._stats_batches(list(sample.split(_STATS_CHUNK))):
            values = images.to(torch.float64).div_(255.0)
            total += values.sum(dim=(0, 2, 3))
            total_sq += values.square().sum(dim=(0, 2, 3))
        count = sample.numel() * self.img_size * self.img_size
        mean = total / count
        std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
        return mean.tolist(), std.tolist()

    def summary(self) -> dict[str, Any]:
        """JSON-able facts: description, sizes, classes, and the first skipped files with reasons."""
        return {
            "description": self.description,
            "num_images": self.num_images,
            "in_chans": self.in_chans,
            "img_size": self.img_size,
            "num_classes": len(self.classes),
            "classes": list(self.classes),
            "num_skipped": len(self.skipped),
            "skipped": [{"path": path, "reason": reason} for path, reason in self.skipped[:_SUMMARY_SKIPPED]],
        }


@dataclass
class InMemoryImages(ImageSet):
    """All images decoded once and held as one tensor `pixels`: uint8 [N, C, S, S]."""

    pixels: torch.Tensor = field(repr=False, default_factory=lambda: torch.empty(0, dtype=torch.uint8))

    def __post_init__(self) -> None:
        expected = (self.num_images, self.in_chans, self.img_size, self.img_size)
        if tuple(self.pixels.shape) != expected or self.pixels.dtype != torch.uint8:
            found = f"{self.pixels.dtype} {list(self.pixels.shape)}"
            raise ValueError(f"pixels must be uint8 {list(expected)}, got {found}")

    @classmethod
    def from_pixels(
        cls, description: str, pixels: torch.Tensor, labels: torch.Tensor | None, classes: list[str]
    ) -> InMemoryImages:
        """A decoded array reader's result: pixels uint8 [N, C, S, S], nothing skipped."""
        return cls(
            description=description,
            num_images=len(pixels),
            labels=labels,
            classes=classes,
            skipped=[],
            in_chans=pixels.shape[1],
            img_size=pixels.shape[-1],
            pixels=pixels,
        )

    def load_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """indices: int64 [B] -> (uint8 [B, C, S, S], the same indices)."""
        return self.pixels[indices], indices


@dataclass
class LazyImages(ImageSet):
    """Images decoded on demand in `load_batch` (in DataLoader workers during training).

    Picklable. An unreadable image is replaced by the nearest following readable one (wrapping
    around), so a run never stops on one bad file; each bad image is logged once per process and
    added to `skipped` of that process's copy. `take_new_bad_files` hands over those met since the last
    call (a DataLoader worker returns them with its batch; the training process records them in its
    copy with `note_bad_file`, see `BatchStream.bad_files`).
    Subclasses say where image `index` lives (`name_of`) and how to decode it (`try_decode`).
    """

    root: str = ""
    bad_files: set[int] = field(default_factory=set, repr=False)  # indices known to be unreadable
    new_bad_files: list[BadFile] = field(default_factory=list, repr=False)  # met since take_new_bad_files

    @abc.abstractmethod
    def name_of(self, index: int) -> str:
        """Where image `index` lives, relative to `root` (used in messages and `skipped`)."""

    @abc.abstractmethod
    def try_decode(self, index: int) -> tuple[np.ndarray | None, str]:
        """Image `index` as uint8 [C, S, S], or (None, one-line reason) when it cannot be read."""

    def path_of(self, index: int) -> str:
        """Full location of image `index`."""
        return os.path.join(self.root, self.name_of(index))

    def _decode_or_replace(self, index: int) -> tuple[np.ndarray, int]:
        """Decodes image `index`, or the nearest following readable one. Returns (uint8 [C,S,S], source)."""
        for step in range(self.num_images):
            source = (index + step) % self.num_images
            if source in self.bad_files:
                continue
            pixels, reason = self.try_decode(source)
            if pixels is not None:
                return pixels, source
            self.bad_files.add(source)
            self.skipped.append((self.name_of(source), reason))
            self.new_bad_files.append((source, self.name_of(source), reason))
            logger.warning("could not read %s (%s); using the next readable image instead",
                           self.path_of(source), reason)
        raise DataError(f"no image in {self.root} could be read (last tried {self.path_of(index)})")

    def take_new_bad_files(self) -> list[BadFile]:
        """The unreadable images this copy met since the last call, in order: (index, name, reason)."""
        met, self.new_bad_files = self.new_bad_files, []
        return met

    def note_bad_file(self, index: int, name: str, reason: str) -> bool:
        """Records image `index` as unreadable (met by another copy, e.g. a worker's): it is added to
        `bad_files` and `skipped` unless already known. Returns whether it was new."""
        if index in self.bad_files:
            return False
        self.bad_files.add(index)
        self.skipped.append((name, reason))
        return True

    def load_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """indices: int64 [B] -> (uint8 [B, C, S, S], source indices int64 [B])."""
        images = torch.empty((len(indices), self.in_chans, self.img_size, self.img_size), dtype=torch.uint8)
        sources = torch.empty(len(indices), dtype=torch.int64)
        for row, index in enumerate(indices.tolist()):
            pixels, sources[row] = self._decode_or_replace(index)
            images[row] = torch.from_numpy(pixels)
        return images, sources

    def _stats_batches(self, index_chunks: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """Decodes the chunks with a thread pool (statistics run in the main process)."""
        with ThreadPoolExecutor(max_workers=default_decode_threads()) as pool:
            yield from pool.map(self.get_batch, index_chunks)


@dataclass
class LazyFolderImages(LazyImages):
    """A large folder whose files are decoded lazily (see `LazyImages`)."""

    files: list[str] = field(default_factory=list, repr=False)  # relative paths, sorted

    def name_of(self, index: int) -> str:
        """Path of image `index` relative to the folder."""
        return self.files[index]

    def try_decode(self, index: int) -> tuple[np.ndarray | None, str]:
        """Decodes file `index`: uint8 [C, S, S], or (None, reason)."""
        return try_decode_image_file(self.path_of(index), self.in_chans, self.img_size)
