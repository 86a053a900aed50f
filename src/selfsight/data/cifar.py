"""CIFAR-10 / CIFAR-100 "python version" pickles, read with a restricted unpickler.

cifar-10-batches-py: data_batch_1..5, test_batch, batches.meta (label_names).
cifar-100-python:    train, test, meta (fine_label_names); labels under fine_labels.
Each batch holds `data`: uint8 [n, 3072] (R, G, B planes of 32 x 32, row-major).
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np
import torch

from selfsight.data.convert import prepare_pixels
from selfsight.data.imageset import InMemoryImages
from selfsight.errors import DataError

CIFAR10_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR100_SPLITS = {"train": ["train"], "test": ["test"]}
_CIFAR_SIDE = 32

# Only what a pickled numpy array needs: a CIFAR file cannot run code when loaded.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Refuses every global except the numpy array reconstruction functions."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _text(value: Any) -> Any:
    return value.decode("latin1") if isinstance(value, bytes) else value


def load_cifar_pickle(path: str) -> dict[str, Any]:
    """One CIFAR pickle as a dict with str keys (Python 2 pickles: bytes keys/values decoded)."""
    try:
        with open(path, "rb") as stream:
            content = _ArrayUnpickler(stream, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as err:
        raise DataError(f"{path} is not a readable CIFAR pickle ({type(err).__name__}: {err})") from err
    if not isinstance(content, dict):
        holds = type(content).__name__
        raise DataError(f"{path} is not a readable CIFAR pickle (holds a {holds}, not a dict)")
    return {_text(key): value for key, value in content.items()}


def cifar_kind(folder: str) -> str | None:
    """"cifar-10", "cifar-100" or None, from the file names in `folder`."""
    def has(name: str) -> bool:
        return os.path.isfile(os.path.join(folder, name))

    if has("batches.meta") or any(has(name) for names in CIFAR10_SPLITS.values() for name in names):
        return "cifar-10"
    if has("meta") and (has("train") or has("test")):
        return "cifar-100"
    return None


def _batch_arrays(path: str, content: dict[str, Any], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """-> (images uint8 [n, 3, 32, 32], labels int64 [n]); DataError when the batch is malformed."""
    data = np.asarray(content.get("data"))
    labels = content.get(label_key)
    side_pixels = 3 * _CIFAR_SIDE * _CIFAR_SIDE
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != side_pixels:
        raise DataError(
            f"{path} has no 'data' array of uint8 [n, {side_pixels}] (found {data.dtype} {data.shape})"
        )
    if labels is None or len(labels) != data.shape[0]:
        raise DataError(f"{path} has no '{label_key}' list with one label per image")
    return data.reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE), np.asarray(labels, dtype=np.int64)


def open_cifar_folder(folder: str, split: str, in_chans: int, img_size: int) -> InMemoryImages:
    """Opens the `split` ("train" or "test") of a CIFAR-10 or CIFAR-100 python folder."""
    kind = cifar_kind(folder)
    if kind is None:
        raise DataError(f"{folder} is not a CIFAR python folder (no batches.meta, data_batch_* or meta)")
    if kind == "cifar-10":
        batch_names, meta_name = CIFAR10_SPLITS[split], "batches.meta"
        names_key, label_key = "label_names", "labels"
    else:
        batch_names, meta_name = CIFAR100_SPLITS[split], "meta"
        names_key, label_key = "fine_label_names", "fine_labels"
    missing = [name for name in [*batch_names, meta_name] if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise DataError(f"{folder} lacks the {kind} files for split '{split}': {', '.join(missing)}")
    meta_path = os.path.join(folder, meta_name)
    classes = [str(_text(name)) for name in load_cifar_pickle(meta_path).get(names_key, [])]
    if not classes:
        raise DataError(f"{meta_path} has no '{names_key}' list")
    arrays = [
        _batch_arrays(path, load_cifar_pickle(path), label_key)
        for path in (os.path.join(folder, name) for name in batch_names)
    ]
    labels = torch.from_numpy(np.concatenate([batch_labels for _, batch_labels in arrays]))
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"{folder} has labels outside 0..{len(classes) - 1} for split '{split}'")
    pixels = torch.from_numpy(np.concatenate([images for images, _ in arrays]))
    pixels = prepare_pixels(pixels, in_chans, img_size)
    return InMemoryImages.from_pixels(f"{kind} {split} (CIFAR pickles, {len(pixels)} images)", pixels, labels, classes)
