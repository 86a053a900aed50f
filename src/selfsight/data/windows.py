"""PIC's sliding-window data scheduler (Cao et al. 2020, "Parametric Instance Classification for
Unsupervised Visual Feature Learning", section 3.2), as the paper describes it.

One random permutation ``perm`` of the N images is drawn from the seed. Window k holds the W images
``perm[(k * S + 0 ... W - 1) mod N]``: consecutive windows overlap by W - S images, so an image comes
back after at most W / S windows and its classifier weight is never long without an update. Inside a
window the images are shuffled (a generator seeded from (seed, k)) and cut into batches.

The official sampler (``bl0/PIC``, ``contrast/data/sampler.py``) takes the modulus with ``len(self)``,
which is W, not N: its window never leaves the first W images of the permutation (only rotates inside
them), and with ``--shuffle-per-epoch`` (which reshuffles all N whenever its start index is not 0) each of
its "epochs" is a fresh random W-image subset, unrelated to the last, except every (W / S)-th, which
repeats the one before. Here the modulus is N, so the window slides through the whole data set as the
paper intends. Not ported: reshuffling the permutation between passes (one permutation, drawn once).

Everything here is a pure function of (seed, window, batch), like ``selfsight.data.loader.BatchIndexer``,
so a resumed run sees exactly the same data. ``WindowBatchIndexer`` has BatchIndexer's interface
(``indices(batch)``, ``batches_per_epoch``), so a stream can take it in BatchIndexer's place.
"""

from __future__ import annotations

import torch

from selfsight.errors import ConfigError

#: the seed stride between windows (as the loader's between epochs), so two windows never share a generator
WINDOW_SEED_STRIDE = 1_000_003


def sliding_window(perm: torch.Tensor, window: int, stride: int, k: int) -> torch.Tensor:
    """int64 [W]: the images of window ``k``, ``perm[(k * stride + arange(window)) mod N]``.

    perm: int64 [N], a permutation of the image indices. Example: N = 10, W = 4, S = 2: window 4 is
    ``perm[[8, 9, 0, 1]]``.
    """
    n = perm.numel()
    if not 0 < window <= n:
        raise ConfigError(f"the window must hold between 1 and {n} images (the data set), got {window}")
    if stride < 1:
        raise ConfigError(f"the window stride must be at least 1, got {stride}")
    if k < 0:
        raise ConfigError(f"window index must be >= 0, got {k}")
    positions = (k * stride + torch.arange(window, dtype=torch.int64)) % n
    return perm[positions]


def window_permutation(num_images: int, seed: int) -> torch.Tensor:
    """int64 [N]: the one permutation the windows slide along (drawn from ``seed``)."""
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed * WINDOW_SEED_STRIDE + 7))


class WindowBatchIndexer:
    """Maps a global batch index to this rank's image indices under the sliding-window scheduler.

    Global batch b belongs to window k = b // batches_per_window (batches_per_window = W // (B * world));
    the window's images are shuffled by a generator seeded from (seed, k) and batch b takes the slice
    ``(b % batches_per_window) * B * world ...``; rank r holds the r-th contiguous B of it (as BatchIndexer).
    The last incomplete batch of a window is dropped. ``batch_size`` is per rank.
    """

    def __init__(
        self, num_images: int, batch_size: int, seed: int, window: int, stride: int, rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size * world_size > window:
            raise ConfigError(f"the window of {window} images is smaller than the global batch of "
                              f"{batch_size * world_size}")
        if window > num_images:
            raise ConfigError(f"the window of {window} images is larger than the data set ({num_images} images)")
        self.num_images = num_images
        self.batch_size = batch_size
        self.seed = seed
        self.window = window
        self.stride = stride
        self.rank = rank
        self.world_size = world_size
        self.batches_per_window = window // (batch_size * world_size)
        #: what the engine counts as an epoch (N images seen), as BatchIndexer
        self.batches_per_epoch = num_images // (batch_size * world_size)
        self._perm = window_permutation(num_images, seed)
        self._k = -1
        self._order = torch.empty(0, dtype=torch.int64)

    def window_order(self, k: int) -> torch.Tensor:
        """int64 [W]: the images of window k in the order its batches take them."""
        images = sliding_window(self._perm, self.window, self.stride, k)
        generator = torch.Generator().manual_seed((self.seed * WINDOW_SEED_STRIDE + k) % (2**63))
        return images[torch.randperm(self.window, generator=generator)]

    def indices(self, batch: int) -> torch.Tensor:
        """int64 [batch_size]: rank ``rank``'s image indices of global batch ``batch``."""
        k, position = divmod(batch, self.batches_per_window)
        if k != self._k:
            self._order = self.window_order(k)
            self._k = k
        start = (position * self.world_size + self.rank) * self.batch_size
        return self._order[start:start + self.batch_size]
