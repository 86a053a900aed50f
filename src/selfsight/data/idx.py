"""IDX files (MNIST, Fashion-MNIST), gzipped or raw, parsed with numpy from their header."""

from __future__ import annotations

import gzip
import os
import re

import numpy as np
import torch

from selfsight.data.convert import prepare_pixels
from selfsight.data.imageset import InMemoryImages, logger
from selfsight.errors import DataError

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

# IDX type code (third header byte) -> big-endian numpy dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# "train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte", "train-images.idx3-ubyte" (original MNIST names).
IDX_NAME = re.compile(r"^(?P<prefix>train|t10k|test)-(?P<kind>images|labels)[-.]idx[13]-ubyte(\.gz)?$")
_SPLIT_PREFIXES = {"train": ("train",), "test": ("t10k", "test")}


def read_idx(path: str) -> np.ndarray:
    """Reads one IDX file (gzipped when the name ends in .gz) into an array of the header's shape.

    DataError when the header is not IDX or the data size does not match the header dimensions.
    """
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as stream:
                raw = stream.read()
        else:
            with open(path, "rb") as stream:
                raw = stream.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path} could not be read as an IDX file ({type(err).__name__}: {err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex() or 'none'})")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header_size:
        raise DataError(f"{path} is a malformed IDX file (header for {ndim} dimensions is cut short)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header_size != expected:
        raise DataError(
            f"{path} is a malformed IDX file (header says {'x'.join(map(str, dims))} {dtype.name} = "
            f"{expected} bytes of data, file has {len(raw) - header_size})"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(dims).astype(dtype.newbyteorder("="))


def find_idx_files(folder: str) -> dict[tuple[str, str], str]:
    """IDX files in `folder` (not recursive), keyed by (prefix, kind), e.g. ("t10k", "images")."""
    found: dict[tuple[str, str], str] = {}
    for name in sorted(os.listdir(folder)):
        match = IDX_NAME.match(name)
        if match and os.path.isfile(os.path.join(folder, name)):
            found.setdefault((match["prefix"], match["kind"]), os.path.join(folder, name))
    return found


def idx_class_names(folder: str, labels: np.ndarray) -> list[str]:
    """Fashion-MNIST names when the folder name says "fashion", else the label values as strings."""
    count = int(labels.max()) + 1 if labels.size else 0
    name = os.path.basename(os.path.normpath(os.path.abspath(folder))).lower()
    if "fashion" in name and count <= len(FASHION_MNIST_CLASSES):
        return list(FASHION_MNIST_CLASSES)
    return [str(value) for value in range(max(count, 10))]


def _images_tensor(path: str, images: np.ndarray, in_chans: int, img_size: int) -> torch.Tensor:
    """images: [N, H, W] (or [N, H, W, C] with C in {1, 3}) of 8-bit values -> uint8 [N, in_chans, S, S]."""
    channels_ok = images.ndim == 3 or (images.ndim == 4 and images.shape[3] in (1, 3))
    if images.dtype != np.uint8 or not channels_ok:
        raise DataError(f"{path} does not hold 8-bit images (found {images.dtype.name} {images.shape})")
    pixels = torch.from_numpy(np.ascontiguousarray(images))
    pixels = pixels.unsqueeze(1) if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)
    return prepare_pixels(pixels, in_chans, img_size)


def _labels_tensor(path: str, labels: np.ndarray, count: int) -> torch.Tensor:
    if labels.ndim != 1 or labels.shape[0] != count or not np.issubdtype(labels.dtype, np.integer):
        found = f"{labels.dtype.name} {labels.shape}"
        raise DataError(f"{path} does not hold {count} integer labels (found {found})")
    if labels.size and labels.min() < 0:
        raise DataError(f"{path} holds negative labels")
    return torch.from_numpy(labels.astype(np.int64))


def _build(images_path: str, labels_path: str | None, folder: str, description: str,
           in_chans: int, img_size: int) -> InMemoryImages:
    images = read_idx(images_path)
    pixels = _images_tensor(images_path, images, in_chans, img_size)
    labels, classes = None, []
    if labels_path is not None:
        raw_labels = read_idx(labels_path)
        labels = _labels_tensor(labels_path, raw_labels, len(pixels))
        classes = idx_class_names(folder, raw_labels)
    return InMemoryImages.from_pixels(f"{description} (IDX, {len(pixels)} images)", pixels, labels, classes)


def open_idx_folder(folder: str, split: str, in_chans: int, img_size: int) -> InMemoryImages:
    """`folder` holds `train-*` and/or `t10k-*` (or `test-*`) IDX files; split is "train" or "test"."""
    found = find_idx_files(folder)
    prefix = next((p for p in _SPLIT_PREFIXES[split] if (p, "images") in found), None)
    if prefix is None:
        expected = " or ".join(f"{p}-images-idx3-ubyte[.gz]" for p in _SPLIT_PREFIXES[split])
        raise DataError(f"{folder} has no IDX images for split '{split}' (expected {expected})")
    labels_path = found.get((prefix, "labels"))
    if labels_path is None:
        logger.warning("%s has no %s-labels-idx1-ubyte[.gz]; the '%s' split is unlabeled",
                       folder, prefix, split)
    name = os.path.basename(os.path.normpath(os.path.abspath(folder))).lower()
    return _build(found[(prefix, "images")], labels_path, folder, f"{name} {split}", in_chans, img_size)


def _matching_labels_file(images_path: str) -> str | None:
    """The labels file beside an images IDX file ("images-idx3" -> "labels-idx1", .gz or raw)."""
    folder, name = os.path.split(images_path)
    stem = name[:-3] if name.endswith(".gz") else name
    if "images" not in stem:
        return None
    labels_stem = stem.replace("images", "labels").replace("idx3", "idx1")
    for candidate in (labels_stem, labels_stem + ".gz"):
        if os.path.isfile(os.path.join(folder, candidate)):
            return os.path.join(folder, candidate)
    return None


def is_idx_file(path: str) -> bool:
    """True when `path` is named like an IDX file (…idx3-ubyte[.gz], …idx1-ubyte[.gz], .idx[.gz])."""
    name = os.path.basename(path).lower()
    name = name[:-3] if name.endswith(".gz") else name
    return re.search(r"idx\d-ubyte$", name) is not None or name.endswith(".idx")


def open_idx_file(path: str, in_chans: int, img_size: int) -> InMemoryImages:
    """One images IDX file; labeled when the matching labels file sits beside it."""
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    return _build(path, _matching_labels_file(path), folder, name, in_chans, img_size)
