"""Where a run's numbers go: ``metrics.jsonl`` always, TensorBoard on request (``--logger tensorboard``).

``metrics.jsonl`` holds one JSON object per logged step (loss, lr, img/s, epoch, grad norm, skipped steps,
the method's own scalars) and one per k-NN monitor measurement; resume trims it to the checkpoint's step.
TensorBoard (an optional extra: ``pip install 'selfsight[tensorboard]'``) gets the same scalars under
``train/...`` and ``monitor/knn``, in ``RUN/tensorboard``, plus images: the views the method trains on at
the start, and reconstructions where the method makes them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from selfsight.errors import ConfigError

LOGGERS = ("jsonl", "tensorboard")


def tensorboard_writer(log_dir: Path) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``log_dir``; a one-line error naming the extra when
    tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "--logger tensorboard needs the tensorboard package: pip install 'selfsight[tensorboard]'"
        ) from None
    return SummaryWriter(log_dir=str(log_dir))


class RunLogger:
    """Writes a run's records: ``metrics.jsonl`` (appended; the default) and, with ``kind="tensorboard"``,
    TensorBoard event files in ``run_dir/tensorboard``. Only the process that writes the run creates one."""

    def __init__(self, run_dir: Path, kind: str = "jsonl") -> None:
        if kind not in LOGGERS:
            raise ConfigError(f"logger must be one of {', '.join(LOGGERS)}, got {kind!r}")
        self._jsonl = open(Path(run_dir) / "metrics.jsonl", "a")
        self._tensorboard = tensorboard_writer(Path(run_dir) / "tensorboard") if kind == "tensorboard" else None

    def log(self, record: dict[str, Any]) -> None:
        """One record with a ``step``: a JSON line, and every finite number as a TensorBoard scalar
        (``knn_monitor`` as ``monitor/knn``, the rest as ``train/NAME``)."""
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tensorboard is None:
            return
        step = int(record["step"])
        for name, value in record.items():
            if name == "step" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                tag = "monitor/knn" if name == "knn_monitor" else f"train/{name}"
                self._tensorboard.add_scalar(tag, value, step)
        self._tensorboard.flush()

    @property
    def wants_images(self) -> bool:
        return self._tensorboard is not None

    def image(self, tag: str, pixels: np.ndarray, step: int) -> None:
        """pixels: uint8 [H, W] (gray) or [H, W, 3] (RGB); a TensorBoard image, when TensorBoard is on."""
        if self._tensorboard is None:
            return
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        self._tensorboard.add_image(tag, pixels, step, dataformats="HWC")
        self._tensorboard.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
