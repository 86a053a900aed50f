"""Image folders: recursive scan, labels from first-level subfolders, in-memory or lazy loading."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from selfsight.data.decode import IMAGE_EXTENSIONS, decode_files
from selfsight.data.imageset import ImageSet, InMemoryImages, LazyFolderImages, logger
from selfsight.errors import DataError

# Files decoded at open time to check that a lazy folder holds readable images at all.
_LAZY_PROBE_SIZE = 64
_EXAMPLES_IN_ERROR = 3


@dataclass(frozen=True)
class FolderListing:
    """The image files under a root, relative paths sorted, and their labels (None when unlabeled)."""

    files: list[str]
    labels: list[int] | None
    classes: list[str]


def list_image_files(root: str) -> tuple[list[str], list[str]]:
    """Walks `root` recursively (following links, once per real folder; hidden entries ignored).

    Returns (image files, other files), both as sorted paths relative to root.
    """
    images: list[str] = []
    others: list[str] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        relative_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.startswith("."):
                continue
            relative = name if relative_dir == "." else os.path.join(relative_dir, name)
            is_image = os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
            (images if is_image else others).append(relative)
    return sorted(images), sorted(others)


def label_files(files: list[str]) -> FolderListing:
    """Labels from first-level subfolder names when every file lies inside one, else unlabeled."""
    parts = [path.split(os.sep, 1) for path in files]
    if not files or any(len(part) == 1 for part in parts):
        return FolderListing(files=files, labels=None, classes=[])
    classes = sorted({part[0] for part in parts})
    class_index = {name: i for i, name in enumerate(classes)}
    return FolderListing(files=files, labels=[class_index[part[0]] for part in parts], classes=classes)


def scan_folder(root: str) -> FolderListing:
    """Lists and labels the images under `root`; DataError for an empty folder or one with no images."""
    images, others = list_image_files(root)
    if not images and not others:
        raise DataError(f"{root} is an empty folder (no files found, searched recursively)")
    if not images:
        examples = ", ".join(others[:_EXAMPLES_IN_ERROR])
        raise DataError(
            f"{root} holds no image files ({len(others)} other files, e.g. {examples}; "
            f"looked for {' '.join(IMAGE_EXTENSIONS)})"
        )
    return label_files(images)


def bad_files_error(
    root: str, skipped: list[tuple[str, str]], total: int, max_bad_fraction: float
) -> DataError:
    """The one-line error for a folder with too many unreadable files."""
    examples = ", ".join(path for path, _ in skipped[:_EXAMPLES_IN_ERROR])
    return DataError(
        f"{len(skipped)} of {total} images in {root} could not be read "
        f"(more than {max_bad_fraction * 100:g}%), e.g. {examples}; first error: {skipped[0][1]}"
    )


def _describe(root: str, count: int, classes: list[str], lazy: bool) -> str:
    labels = f"{len(classes)} classes" if classes else "unlabeled"
    return f"image folder {root} ({count} images, {labels}{', decoded lazily' if lazy else ''})"


def open_folder(
    root: str,
    in_chans: int,
    img_size: int,
    *,
    max_bad_fraction: float,
    in_memory_limit: int,
    progress: bool,
) -> ImageSet:
    """Opens an image folder: decoded at once when it has <= in_memory_limit images, else lazily."""
    listing = scan_folder(root)
    if len(listing.files) > in_memory_limit:
        return _open_lazy(root, listing, in_chans, img_size)
    return _open_in_memory(root, listing, in_chans, img_size, max_bad_fraction, progress)


def _open_in_memory(
    root: str, listing: FolderListing, in_chans: int, img_size: int, max_bad_fraction: float, progress: bool
) -> InMemoryImages:
    total = len(listing.files)
    pixels = torch.empty((total, in_chans, img_size, img_size), dtype=torch.uint8)
    readable = torch.ones(total, dtype=torch.bool)
    skipped: list[tuple[str, str]] = []

    def store(i: int, image: np.ndarray | None, reason: str) -> None:
        if image is None:
            readable[i] = False
            skipped.append((listing.files[i], reason))
        else:
            pixels[i] = torch.from_numpy(image)

    paths = [os.path.join(root, name) for name in listing.files]
    decode_files(paths, in_chans, img_size, on_result=store, progress=progress,
                 description=f"decoding {root}")
    if skipped:
        logger.warning("%d of %d images in %s could not be read and are skipped, e.g. %s (%s)",
                       len(skipped), total, root, skipped[0][0], skipped[0][1])
        if len(skipped) > max_bad_fraction * total or len(skipped) == total:
            raise bad_files_error(root, skipped, total, max_bad_fraction)
        pixels = pixels[readable]
    labels = None
    if listing.labels is not None:
        labels = torch.tensor(listing.labels, dtype=torch.int64)[readable]
    return InMemoryImages(
        description=_describe(root, len(pixels), listing.classes, lazy=False),
        num_images=len(pixels),
        labels=labels,
        classes=listing.classes,
        skipped=skipped,
        in_chans=in_chans,
        img_size=img_size,
        pixels=pixels,
    )


def _open_lazy(root: str, listing: FolderListing, in_chans: int, img_size: int) -> LazyFolderImages:
    """A lazy set; a small evenly spaced probe is decoded now so that a folder of unreadable files
    fails at open rather than during training."""
    total = len(listing.files)
    probe = np.unique(np.linspace(0, total - 1, num=min(total, _LAZY_PROBE_SIZE)).round().astype(np.int64))
    skipped: list[tuple[str, str]] = []
    bad: set[int] = set()

    def record(i: int, image: np.ndarray | None, reason: str) -> None:
        if image is None:
            bad.add(int(probe[i]))
            skipped.append((listing.files[probe[i]], reason))

    paths = [os.path.join(root, listing.files[i]) for i in probe]
    decode_files(paths, in_chans, img_size, on_result=record)
    if len(bad) == len(probe):
        examples = ", ".join(path for path, _ in skipped[:_EXAMPLES_IN_ERROR])
        raise DataError(f"none of {len(probe)} sampled images in {root} could be read, e.g. {examples}; "
                        f"first error: {skipped[0][1]}")
    if skipped:
        logger.warning("%d of %d sampled images in %s could not be read; they will be replaced by "
                       "the next readable image", len(skipped), len(probe), root)
    labels = None if listing.labels is None else torch.tensor(listing.labels, dtype=torch.int64)
    return LazyFolderImages(
        description=_describe(root, total, listing.classes, lazy=True),
        num_images=total,
        labels=labels,
        classes=listing.classes,
        skipped=skipped,
        in_chans=in_chans,
        img_size=img_size,
        root=root,
        files=listing.files,
        bad_files=bad,
    )
