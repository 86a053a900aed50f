"""Decoding image files with Pillow into fixed-size uint8 arrays.

One file -> one array `[C, S, S]`: full decode (so truncated files are detected), EXIF orientation
applied, mode converted to 'L' (C = 1) or 'RGB' (C = 3), the centered square of side min(H, W)
resized to S x S (bilinear, antialiased; smaller images are upscaled the same way).
A file that cannot be decoded gives a one-line reason instead of an exception.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import IO

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
)

# Modes holding more than 8 bits per sample; converted by scaling 0..65535 to 0..255.
_WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def _convert_mode(img: Image.Image, in_chans: int) -> Image.Image:
    """Converts any Pillow mode to 'L' (in_chans 1) or 'RGB' (in_chans 3). Alpha is dropped."""
    target = "L" if in_chans == 1 else "RGB"
    if img.mode in _WIDE_GRAY_MODES:
        wide = np.asarray(img).astype(np.float32)
        img = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids Pillow's warning on palette transparency
    return img if img.mode == target else img.convert(target)


def decode_image_file(path: str | IO[bytes], in_chans: int, img_size: int) -> np.ndarray:
    """Reads one image file (a path, or a binary file object such as `io.BytesIO(encoded_bytes)`).

    Returns uint8 `[C, S, S]` with C = in_chans, S = img_size. Raises whatever Pillow raises
    on an unreadable file (use `try_decode_image_file` to get a reason string instead).
    """
    with Image.open(path) as img:
        if img.format == "JPEG":
            img.draft(img.mode, (img_size, img_size))  # DCT downscale, keeps both sides >= S
        img.load()  # full decode: a truncated file raises here
        img = ImageOps.exif_transpose(img) or img
        img = _convert_mode(img, in_chans)
        width, height = img.size
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        img = img.resize((img_size, img_size), Image.Resampling.BILINEAR,
                         box=(left, top, left + side, top + side))
        pixels = np.asarray(img, dtype=np.uint8)
    if pixels.ndim == 2:
        return pixels[None].copy()
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def try_decode_image_file(path: str | IO[bytes], in_chans: int, img_size: int) -> tuple[np.ndarray | None, str]:
    """Like `decode_image_file`, but returns `(None, reason)` for a file that cannot be read.

    The reason is one line, e.g. "OSError: image file is truncated (2 bytes not processed)".
    """
    try:
        return decode_image_file(path, in_chans, img_size), ""
    except Exception as err:  # noqa: BLE001 - any decoder failure means "skip this file"
        reason = f"{type(err).__name__}: {err}".replace("\n", " ").strip()
        return None, reason


def default_decode_threads() -> int:
    """Threads for decoding: Pillow releases the GIL while decoding and resizing."""
    return max(1, min(8, os.cpu_count() or 1))


def decode_files(
    paths: Sequence[str],
    in_chans: int,
    img_size: int,
    *,
    on_result: Callable[[int, np.ndarray | None, str], None],
    progress: bool = False,
    description: str = "decoding",
    threads: int | None = None,
) -> None:
    """Decodes `paths` with a thread pool and calls `on_result(i, pixels [C,S,S] or None, reason)`
    for each, in order. Shows a tqdm bar when `progress`."""
    threads = threads or default_decode_threads()
    decode = lambda path: try_decode_image_file(path, in_chans, img_size)
    with ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=len(paths), desc=description, unit="img", disable=not progress))
        if threads > 1 and len(paths) > 1:
            pool = ThreadPoolExecutor(max_workers=threads)
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)  # quick exit on Ctrl-C
            results = pool.map(decode, paths)
        else:
            results = map(decode, paths)
        for i, (pixels, reason) in enumerate(results):
            on_result(i, pixels, reason)
            bar.update(1)
