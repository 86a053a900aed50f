"""Shared fixtures: tiny data written on the fly and a tiny ViT, so the suite runs on 2 CPU cores."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

# tiny models: one thread is faster than two fighting over small ops (and CI machines are shared)
torch.set_num_threads(1)

TINY_VIT = (
    "vit_tiny_patch16_224",
    {"img_size": 16, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2},
)
TINY_VIT_OPTS = ["img_size=16", "patch_size=4", "in_chans=1", "embed_dim=32", "depth=2", "num_heads=2"]


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def make_pattern_images(count: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four easy classes (horizontal bars, vertical bars, a blob, a ring) plus noise: uint8 [N, S, S]."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 4
    yy, xx = np.mgrid[0:size, 0:size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    patterns = [
        (yy // 2 % 2) * 200.0,
        (xx // 2 % 2) * 200.0,
        (r < size / 4) * 220.0,
        ((r > size / 4) & (r < size / 2.5)) * 220.0,
    ]
    images = np.stack([patterns[c] for c in labels]) + rng.normal(0, 25, (count, size, size))
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.uint8)


@pytest.fixture(scope="session")
def idx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MNIST-style IDX folder: 256 train and 64 test images of 16 x 16 px, 4 classes."""
    root = tmp_path_factory.mktemp("idx")
    for split, count, seed in (("train", 256, 0), ("t10k", 64, 1)):
        images, labels = make_pattern_images(count, 16, seed)
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def stop_after_checkpoint(trainer, step: int) -> None:
    """Run ``trainer`` (a ``selfsight.engine.Trainer``) until it has written its checkpoint at ``step``, then
    stop it there, as a crash right after that checkpoint would."""

    class Stop(Exception):
        pass

    original_save = trainer.save

    def save_then_stop():
        path = original_save()
        if trainer.step == step:
            raise Stop
        return path

    trainer.save = save_then_stop
    with pytest.raises(Stop):
        trainer.fit()
