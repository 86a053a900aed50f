"""`open_images`: one entry point from a data spec string to an ImageSet."""

from __future__ import annotations

import os

from selfsight.data.cifar import cifar_kind, open_cifar_folder
from selfsight.data.folder import open_folder
from selfsight.data.idx import find_idx_files, is_idx_file, open_idx_file, open_idx_folder
from selfsight.data.imageset import ImageSet
from selfsight.data.shards import is_shard_dir, open_shards
from selfsight.errors import ConfigError, DataError

SPLITS = ("train", "test")


def parse_spec(spec: str) -> tuple[str, str | None]:
    """"PATH:train" -> ("PATH", "train"). Only a last ':'-suffix of train/test is a split, so
    "C:\\data" or "a:b" stay whole paths; when the whole spec exists as a path, it wins."""
    path, sep, suffix = spec.rpartition(":")
    if sep and suffix in SPLITS and path and not os.path.exists(spec):
        return path, suffix
    return spec, None


def _check_options(in_chans: int, img_size: int, max_bad_fraction: float, in_memory_limit: int) -> None:
    if in_chans not in (1, 3):
        raise ConfigError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
    if img_size < 1:
        raise ConfigError(f"img_size must be positive, got {img_size}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ConfigError(f"max_bad_fraction must lie in [0, 1], got {max_bad_fraction}")
    if in_memory_limit < 0:
        raise ConfigError(f"in_memory_limit must be >= 0, got {in_memory_limit}")


def open_images(
    spec: str,
    in_chans: int,
    img_size: int,
    *,
    max_bad_fraction: float = 0.01,
    in_memory_limit: int = 50000,
    progress: bool = True,
) -> ImageSet:
    """Opens images as uint8 [N, in_chans, img_size, img_size].

    spec: an image folder (searched recursively; labels from first-level subfolders when every
    image lies in one), an IDX folder or file (`PATH[:train|:test]`), or a CIFAR-10/100 python
    folder (`PATH[:train|:test]`); the split defaults to train; or a shards folder written by
    `selfsight data pack` (index.json + shard-*.tar; read lazily, streamed with `ShardStream`). For an
    image or shards folder, a split names the subfolder PATH/split. Raises DataError (one line,
    naming the path) on bad input.
    """
    _check_options(in_chans, img_size, max_bad_fraction, in_memory_limit)
    path, split = parse_spec(spec)
    if not os.path.exists(path):
        raise DataError(f"{path} does not exist")
    if os.path.isfile(path):
        if not is_idx_file(path):
            raise DataError(f"{path} is a file; expected an image, IDX or CIFAR folder, or an IDX file")
        if split is not None:
            raise DataError(f"{spec}: a split applies to an IDX folder, not to the single file {path}")
        return open_idx_file(path, in_chans, img_size)
    if not os.path.isdir(path):
        raise DataError(f"{path} is neither a file nor a folder")
    try:
        has_idx = bool(find_idx_files(path))
    except OSError as err:
        raise DataError(f"{path} cannot be listed ({type(err).__name__}: {err})") from err
    if has_idx:
        return open_idx_folder(path, split or "train", in_chans, img_size)
    if cifar_kind(path) is not None:
        return open_cifar_folder(path, split or "train", in_chans, img_size)
    if split is not None:
        subfolder = os.path.join(path, split)
        if not os.path.isdir(subfolder):
            raise DataError(f"{path} is an image folder without a '{split}' subfolder (splits apply to "
                            f"IDX and CIFAR folders, or name the subfolder PATH/{split})")
        path = subfolder
    if is_shard_dir(path):
        return open_shards(path, in_chans, img_size)
    return open_folder(path, in_chans, img_size, max_bad_fraction=max_bad_fraction,
                       in_memory_limit=in_memory_limit, progress=progress)
