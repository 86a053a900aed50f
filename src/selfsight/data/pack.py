"""`selfsight data pack`: an image folder -> WebDataset-style tar shards + index.json.

The folder is scanned as the folder reader scans it (same files, same order, labels from
first-level subfolders). Every image is decoded once as a check; unreadable ones are skipped and
counted. The readable ones go into the shards as their original encoded bytes (see
`selfsight.data.shards` for the layout). Each shard is written to a hidden temporary file and
renamed when complete; index.json is written last, the same way, so a folder with an index.json
is always complete, and a shard file with its final name is never half-written.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from selfsight.checkpoint import atomic_write_bytes
from selfsight.data.decode import decode_files
from selfsight.data.folder import FolderListing, scan_folder
from selfsight.data.shards import INDEX_FORMAT, INDEX_NAME, INDEX_VERSION, sample_key, shard_name
from selfsight.errors import ConfigError, DataError

logger = logging.getLogger("selfsight.data")

DEFAULT_SHARD_SIZE = 10000
_CHECK_CHANS = 3  # the readability check decodes as RGB at a small size (fast, same failures)
_CHECK_SIZE = 32
_CHECK_CHUNK = 256  # files decoded per thread-pool round
_SHARD_FILE = re.compile(r"^shard-\d{6}\.tar$")
_END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE + tarfile.RECORDSIZE  # closing blocks + the largest record padding
_SKIPPED_IN_INDEX = 1000


@dataclass(frozen=True)
class _Sample:
    name: str  # path relative to the folder
    label: int | None
    data: bytes  # the encoded image, as in the file

    @property
    def ext(self) -> str:
        return os.path.splitext(self.name)[1][1:].lower()


@dataclass(frozen=True)
class PackResult:
    """What `pack_folder` wrote."""

    out: str
    num_samples: int
    num_shards: int
    num_bytes: int
    skipped: list[tuple[str, str]]  # (path relative to the folder, reason)


def _unreadable_reasons(paths: list[str]) -> list[str | None]:
    """For each path: None when it decodes, else a one-line reason."""
    reasons: list[str | None] = [None] * len(paths)

    def record(i: int, pixels: object, reason: str) -> None:
        reasons[i] = None if pixels is not None else reason

    decode_files(paths, _CHECK_CHANS, _CHECK_SIZE, on_result=record)
    return reasons


def _read_sample(root: str, name: str, label: int | None) -> _Sample:
    return _Sample(name=name, label=label, data=Path(root, name).read_bytes())


def _readable_samples(
    root: str, listing: FolderListing, skipped: list[tuple[str, str]], bar: tqdm
) -> Iterator[_Sample]:
    """The readable images of the listing, in order; unreadable ones are appended to `skipped`."""
    for start in range(0, len(listing.files), _CHECK_CHUNK):
        names = listing.files[start:start + _CHECK_CHUNK]
        reasons = _unreadable_reasons([os.path.join(root, name) for name in names])
        for position, (name, reason) in enumerate(zip(names, reasons)):
            bar.update(1)
            if reason is not None:
                skipped.append((name, reason))
                continue
            label = None if listing.labels is None else listing.labels[start + position]
            try:
                yield _read_sample(root, name, label)
            except OSError as err:
                skipped.append((name, f"{type(err).__name__}: {err}"))


def _add_member(tar: tarfile.TarFile, handle: IO[bytes], name: str, data: bytes) -> int:
    """Appends member `name` holding `data`; returns the byte offset of the data in the tar."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
    padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return handle.tell() - padded


def _member_bytes(sample: _Sample) -> int:
    """Bytes a sample adds to a shard: headers and data, padded to tar blocks."""
    padded = -(-len(sample.data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return tarfile.BLOCKSIZE + padded + (0 if sample.label is None else 2 * tarfile.BLOCKSIZE)


def _write_shard(
    handle: IO[bytes], first: _Sample, rest: Iterator[_Sample], first_index: int, max_samples: int,
    max_bytes: int | None,
) -> tuple[dict[str, Any], _Sample | None]:
    """Writes `first`, then samples from `rest`, as one tar into `handle`, until it holds
    `max_samples` or the next sample would take it past `max_bytes` (a lone sample always fits).

    Returns (the shard's index entry without its name, the next sample or None when `rest` ran out).
    """
    entry: dict[str, Any] = {"num_samples": 0, "num_bytes": 0, "offsets": [], "sizes": [], "exts": []}
    labels: list[int] = []
    sample: _Sample | None = first
    with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        while sample is not None:
            key = sample_key(first_index + entry["num_samples"])
            entry["offsets"].append(_add_member(tar, handle, f"{key}.{sample.ext}", sample.data))
            entry["sizes"].append(len(sample.data))
            entry["exts"].append(sample.ext)
            if sample.label is not None:
                _add_member(tar, handle, f"{key}.cls", str(sample.label).encode())
                labels.append(sample.label)
            entry["num_samples"] += 1
            sample = next(rest, None)
            if sample is None or entry["num_samples"] == max_samples:
                break
            if max_bytes is not None and handle.tell() + _member_bytes(sample) + _END_OF_ARCHIVE > max_bytes:
                break
    entry["num_bytes"] = handle.tell()
    if labels:
        entry["labels"] = labels
    return entry, sample


def _write_shard_file(
    path: Path, first: _Sample, rest: Iterator[_Sample], first_index: int, max_samples: int,
    max_bytes: int | None,
) -> tuple[dict[str, Any], _Sample | None]:
    """`_write_shard` into a temporary file renamed to `path` once complete; the entry gets its name."""
    written: list[tuple[dict[str, Any], _Sample | None]] = []
    atomic_write_bytes(path, lambda handle: written.append(
        _write_shard(handle, first, rest, first_index, max_samples, max_bytes)))
    entry, following = written[0]
    return {"name": path.name, **entry}, following


def _check_out(out: str) -> None:
    """DataError when `out` is a file or already holds shards or an index (never overwritten)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"{out} exists and is not a folder")
    if os.path.isdir(out):
        found = sorted(name for name in os.listdir(out) if name == INDEX_NAME or _SHARD_FILE.match(name))
        if found:
            raise DataError(f"{out} already holds shards ({found[0]}...); remove them or choose another --out")


def _index_content(
    folder: str, listing: FolderListing, shards: list[dict[str, Any]], skipped: list[tuple[str, str]]
) -> dict[str, Any]:
    return {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "source": os.path.abspath(folder),
        "num_samples": sum(shard["num_samples"] for shard in shards),
        "classes": listing.classes,
        "image_formats": sorted({ext for shard in shards for ext in shard["exts"]}),
        "num_skipped": len(skipped),
        "skipped": [{"path": path, "reason": reason} for path, reason in skipped[:_SKIPPED_IN_INDEX]],
        "shards": shards,
    }


def pack_folder(
    folder: str,
    out: str,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    max_shard_mb: float | None = None,
    progress: bool = True,
) -> PackResult:
    """Packs the images of `folder` into OUT/shard-000000.tar ... and OUT/index.json.

    shard_size: most samples per shard; max_shard_mb: most megabytes (10^6 bytes) per shard (a
    single larger image gets a shard of its own). Unreadable images are skipped and listed in the
    result and the index. DataError (one line, naming the path) for an empty folder, a folder
    without readable images, or an `out` that already holds shards.
    """
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be positive, got {shard_size}")
    if max_shard_mb is not None and max_shard_mb <= 0:
        raise ConfigError(f"--max-shard-mb must be positive, got {max_shard_mb}")
    max_bytes = None if max_shard_mb is None else int(max_shard_mb * 1e6)
    if not os.path.isdir(folder):
        raise DataError(f"{folder} {'is not a folder' if os.path.exists(folder) else 'does not exist'}")
    listing = scan_folder(folder)
    _check_out(out)
    skipped: list[tuple[str, str]] = []
    shards: list[dict[str, Any]] = []
    with tqdm(total=len(listing.files), desc=f"packing {folder}", unit="img", disable=not progress) as bar:
        samples = _readable_samples(folder, listing, skipped, bar)
        pending = next(samples, None)
        while pending is not None:
            first_index = sum(shard["num_samples"] for shard in shards)
            entry, pending = _write_shard_file(Path(out, shard_name(len(shards))), pending, samples,
                                               first_index, shard_size, max_bytes)
            shards.append(entry)
    if not shards:
        raise DataError(f"none of the {len(listing.files)} images in {folder} could be read, "
                        f"e.g. {skipped[0][0]} ({skipped[0][1]})")
    content = _index_content(folder, listing, shards, skipped)
    atomic_write_bytes(Path(out, INDEX_NAME), lambda handle: handle.write(json.dumps(content).encode()))
    if skipped:
        logger.warning("%d of %d images in %s could not be read and were not packed, e.g. %s (%s)",
                       len(skipped), len(listing.files), folder, skipped[0][0], skipped[0][1])
    return PackResult(out=out, num_samples=content["num_samples"], num_shards=len(shards),
                      num_bytes=sum(shard["num_bytes"] for shard in shards), skipped=skipped)
