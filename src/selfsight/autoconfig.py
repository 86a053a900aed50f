"""Sensible pre-training options for a data set nobody described: ``selfsight pretrain --data FOLDER --out RUN``.

:func:`choose_defaults` looks at a sample of the images and chooses, for the options the user did not
give, what the measurements in docs/benchmarks.md support:

- **input channels**: 1 when every sampled file is grayscale (a gray mode, or colour channels that are
  all equal), else 3;
- **input size**: the median shorter side of the sample; for a CNN, images under 64 px are read 1.5x
  larger (the stride-4 stem otherwise leaves too few positions: 28-px Fashion-MNIST read at 42 px gave
  +1.0 k-NN point over 28 px); then rounded to the nearest multiple of 16, at least 32 and at most
  128 px on CPU (224 on CUDA);
- **method and backbone**: on CPU, SimCLR on a narrow ResNet-18 (one block per stage, 32-256 channels,
  1.24M parameters: 86.4% k-NN on Fashion-MNIST in 30 minutes on 2 cores, above raw pixels, where the
  ViT and the other methods were weaker); on CUDA, SimCLR on a standard ResNet-50. A method given
  without a backbone gets the CNN, or for a masked-image method (SimMIM) a ViT;
- **batch size**: 256 on CPU (the measured recipe), on CUDA 256 from 40 GB of GPU memory, 128 below
  (64 below 12 GB); never more than the data holds (the largest power of two up to the image count);
- **budget**: ``minutes`` = one minute per 2,000 images, 5 to 60 on CPU (60,000 images -> 30 minutes,
  about 10 epochs at 42 px); one minute per 1,000 images, 10 to 240, on CUDA.

The choice is only a set of ordinary options: the CLI and :func:`selfsight.pretrain` pass them to
``build_config`` like flags, so the run's ``config.yaml`` records them and ``--config RUN/config.yaml``
repeats the run. Nothing is chosen when the user named a backbone (``--backbone``/``--backbone-opt``),
gave a ``--config`` file or resumes a run.
"""

from __future__ import annotations

import gzip
import io
import os
import statistics
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from selfsight.errors import DataError

#: files whose size and mode are read (evenly spaced over the folder's sorted listing)
SAMPLE_FILES = 64
#: of those, files of a colour mode whose pixels are checked (colour, or gray stored as RGB?)
PIXEL_CHECKS = 16
#: largest difference between channels of a pixel that still counts as gray (JPEG chroma noise)
GRAY_TOLERANCE = 3
SIZE_MULTIPLE = 16
MIN_SIZE = 32
MAX_SIZE = {"cpu": 128, "cuda": 224}
#: CNNs read images smaller than this SMALL_IMAGE_SCALE times larger
SMALL_IMAGE = 64
SMALL_IMAGE_SCALE = 1.5
#: minutes of budget per image, and the bounds, per device type
IMAGES_PER_MINUTE = {"cpu": 2000, "cuda": 1000}
MINUTES_RANGE = {"cpu": (5, 60), "cuda": (10, 240)}

NARROW_RESNET18 = {"channels": (32, 64, 128, 256), "layers": (1, 1, 1, 1)}
#: methods that need a backbone with patch embeddings (a mask token); they get a ViT
MASKED_IMAGE_METHODS = ("simmim", "mae")
#: SimCLR's options in the measured CPU recipe (docs/benchmarks.md, fmnist_knn.py): weaker crops on
#: small images, a projector sized for a 256-feature backbone
CPU_SIMCLR_RECIPE = ("method.proj_hidden_dim=1024",)
SMALL_IMAGE_SIMCLR_RECIPE = ("method.crop_scale=[0.5,1]",)
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
BUDGET_NAMES = ("steps", "epochs", "minutes")


@dataclass(frozen=True)
class DataFacts:
    """What a look at a data set found: ``in_chans`` (1 or 3), the median shorter side of the sample
    (``short_side``, px), the number of images and how the channels were decided (``channels_reason``)."""

    kind: str
    num_images: int
    in_chans: int
    short_side: int
    sampled: int
    channels_reason: str


@dataclass
class AutoChoice:
    """Options chosen for a run: ``options`` are ``build_config`` keywords (method, backbone, backbone_opts,
    batch_size, minutes), ``overrides`` are ``key=value`` method options to apply before the user's own,
    ``lines`` say what was chosen and why (empty when nothing was)."""

    options: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    facts: DataFacts | None = None


def device_type(device: str | None) -> str:
    """``"cuda"`` or ``"cpu"``: the kind of device a run with ``device`` (``auto``, ``cpu``, ``cuda:1``...) trains on.

    Example:
        >>> device_type("cpu")
        'cpu'
    """
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if str(device).startswith("cuda") else "cpu"


# ------------------------------------------------------------------------- looking at the data


def _is_colour(img: Image.Image) -> bool:
    """True when a decoded image holds colour: a colour mode whose channels are not all equal."""
    if img.mode in _GRAY_MODES:
        return False
    img.draft("RGB", (64, 64))  # JPEG: decode at a reduced size
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids Pillow's warning on palette transparency
    img.thumbnail((64, 64))
    rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
    spread = rgb.max(axis=2) - rgb.min(axis=2)
    return bool(spread.max(initial=0) > GRAY_TOLERANCE)


def _facts_from_images(kind: str, num_images: int, opened: list[tuple[str, Any]]) -> DataFacts:
    """Facts from ``(name, opener)`` pairs, an opener returning a PIL image (unreadable ones are ignored)."""
    sides: list[int] = []
    colour = gray = checked = 0
    for _, opener in opened:
        try:
            with opener() as img:
                sides.append(min(img.size))
                if img.mode in _GRAY_MODES:
                    gray += 1
                elif checked < PIXEL_CHECKS:
                    checked += 1
                    if _is_colour(img):
                        colour += 1
                    else:
                        gray += 1
        except Exception:  # noqa: BLE001 - a bad file is the reader's business (skipped, counted, named)
            continue
    if not sides:
        raise DataError(f"none of the {len(opened)} sampled images of the {kind} could be read")
    if colour:
        reason = f"{colour} of the {checked} colour-mode images checked hold colour"
    elif checked:
        reason = f"{gray} sampled images, all gray ({checked} stored as colour, with equal channels)"
    else:
        reason = f"all {gray} sampled images are grayscale"
    return DataFacts(kind=kind, num_images=num_images, in_chans=3 if colour else 1,
                     short_side=int(statistics.median(sides)), sampled=len(sides), channels_reason=reason)


def _even_sample(items: list[Any], count: int) -> list[Any]:
    if len(items) <= count:
        return list(items)
    picks = np.unique(np.linspace(0, len(items) - 1, num=count).round().astype(np.int64))
    return [items[i] for i in picks]


def _idx_header(path: str) -> tuple[int, ...]:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            head = stream.read(4)
            dims = stream.read(4 * head[3]) if len(head) == 4 else b""
    except (OSError, EOFError) as err:
        raise DataError(f"{path} could not be read as an IDX file ({type(err).__name__}: {err})") from err
    if len(head) < 4 or head[:2] != b"\0\0" or len(dims) != 4 * head[3]:
        raise DataError(f"{path} is not an IDX file")
    return tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))


def _idx_facts(path: str) -> DataFacts:
    dims = _idx_header(path)
    side = min(dims[1:3]) if len(dims) >= 3 else 1
    return DataFacts(kind="IDX file", num_images=dims[0], in_chans=1, short_side=side, sampled=dims[0],
                     channels_reason="IDX images are grayscale")


def _shard_facts(root: str) -> DataFacts:
    """Facts from up to SAMPLE_FILES images evenly spaced over all shards (read at the index's offsets)."""
    from selfsight.data.shards import read_shard_index

    index = read_shard_index(root)
    members: list[tuple[str, Any]] = []
    for i in _even_sample(list(range(index.num_samples)), SAMPLE_FILES):
        name = index.names[index.shard_of(i)]
        with open(os.path.join(root, name), "rb") as handle:
            handle.seek(int(index.offsets[i]))
            data = handle.read(int(index.sizes[i]))
        members.append((f"{name}[{i}]", lambda data=data: Image.open(io.BytesIO(data))))
    return _facts_from_images(f"shards in {root}", index.num_samples, members)


def inspect_data(spec: str) -> DataFacts:
    """Look at a data set as ``--data`` names it: channels, the median shorter side of a sample and the count.

    Folders: up to 64 files, evenly spaced over the sorted listing, are opened (sizes and modes from the
    headers; up to 16 files of a colour mode are decoded small to tell colour from gray stored as RGB).
    IDX data is grayscale at its own size; CIFAR is colour at 32 px; tar shards are sampled over all
    their shards. Raises DataError (one line, naming the path) where ``open_images`` would.

    Example:
        >>> facts = inspect_data("~/photos")  # doctest: +SKIP
        >>> facts.in_chans, facts.short_side
        (3, 375)
    """
    from selfsight.data.cifar import cifar_kind
    from selfsight.data.folder import scan_folder
    from selfsight.data.idx import find_idx_files, is_idx_file
    from selfsight.data.shards import is_shard_dir
    from selfsight.data.sources import parse_spec

    path, split = parse_spec(os.path.expanduser(spec))
    if not os.path.exists(path):
        raise DataError(f"{path} does not exist")
    if os.path.isfile(path):
        if not is_idx_file(path):
            raise DataError(f"{path} is a file; expected an image, IDX or CIFAR folder, or an IDX file")
        return _idx_facts(path)
    if not os.path.isdir(path):
        raise DataError(f"{path} is neither a file nor a folder")
    idx_files = find_idx_files(path)
    if idx_files:
        prefixes = ("train",) if (split or "train") == "train" else ("t10k", "test")
        images = next((idx_files[(p, "images")] for p in prefixes if (p, "images") in idx_files), None)
        if images is None:
            raise DataError(f"{path} holds no IDX images file for the {split or 'train'} split")
        return _idx_facts(images)
    kind = cifar_kind(path)
    if kind is not None:
        count = 50000 if (split or "train") == "train" else 10000
        return DataFacts(kind=kind, num_images=count, in_chans=3, short_side=32, sampled=count,
                         channels_reason="CIFAR images are colour")
    if split is not None:
        path = os.path.join(path, split)
        if not os.path.isdir(path):
            raise DataError(f"{path} does not exist (an image folder's split names its subfolder)")
    if is_shard_dir(path):
        return _shard_facts(path)
    files = scan_folder(path).files
    opened = [(name, lambda name=name: Image.open(os.path.join(path, name)))
              for name in _even_sample(files, SAMPLE_FILES)]
    return _facts_from_images(f"image folder {path}", len(files), opened)


# ------------------------------------------------------------------------- choosing


def input_size(short_side: int, cnn: bool, device: str) -> int:
    """The size images are read at: the median shorter side (x1.5 below 64 px for a CNN), to the nearest
    multiple of 16, within 32 and the device's cap (128 px on CPU, 224 on CUDA).

    Example:
        >>> input_size(28, cnn=True, device="cpu"), input_size(500, cnn=True, device="cpu")
        (48, 128)
    """
    size = short_side * SMALL_IMAGE_SCALE if cnn and short_side < SMALL_IMAGE else short_side
    size = int(round(size / SIZE_MULTIPLE)) * SIZE_MULTIPLE
    return max(MIN_SIZE, min(MAX_SIZE[device], size))


def budget_minutes(num_images: int, device: str) -> int:
    """The default budget: one minute per 2,000 images within 5-60 on CPU (60,000 -> 30 minutes, about 10
    epochs at the narrow ResNet-18's measured 42-px speed), one per 1,000 within 10-240 on CUDA.

    Example:
        >>> budget_minutes(60000, "cpu"), budget_minutes(100, "cpu"), budget_minutes(10**6, "cuda")
        (30, 5, 240)
    """
    low, high = MINUTES_RANGE[device]
    return max(low, min(high, round(num_images / IMAGES_PER_MINUTE[device])))


def _vit_for(size: int, in_chans: int, device: str) -> tuple[str, dict[str, Any], str]:
    """A ViT for masked-image methods: the demo's 1.2M-parameter ViT on CPU, ViT-Small on CUDA; patches of
    4 px up to 48-px inputs, 8 px up to 96, 16 above."""
    patch = 4 if size <= 48 else 8 if size <= 96 else 16
    opts: dict[str, Any] = {"img_size": size, "patch_size": patch, "in_chans": in_chans}
    if device == "cpu":
        opts.update(embed_dim=128, depth=6, num_heads=4)
        return "vit_tiny_patch16_224", opts, f"a 1.2M-parameter ViT ({patch}-px patches, 6 blocks of width 128)"
    return "vit_small_patch16_224", opts, f"ViT-Small ({patch}-px patches)"


def _cuda_batch(device: str | None) -> tuple[int, str]:
    import torch

    index = torch.device(device).index if device and str(device).startswith("cuda") else None
    index = torch.cuda.current_device() if index is None and torch.cuda.is_available() else index or 0
    memory_gb = torch.cuda.get_device_properties(index).total_memory / 2**30 if torch.cuda.is_available() else 0.0
    batch = 256 if memory_gb >= 40 else 128 if memory_gb >= 12 else 64
    return batch, f"{memory_gb:.0f} GB of GPU memory"


def _power_of_two_at_most(count: int) -> int:
    return 1 << max(0, int(count).bit_length() - 1)


def choose_defaults(data: str | None, given: Collection[str] = (), device: str | None = "auto",
                    method: str | None = None, backbone_opts: dict[str, Any] | None = None) -> AutoChoice:
    """Options for a run on ``data`` that the user did not give (``given``: the option names they set).

    ``given`` holds PretrainConfig names (``method``, ``backbone``, ``backbone_opts``, ``batch_size``,
    ``steps``, ``epochs``, ``minutes``, ...) and ``config`` when a configuration file was given. Nothing
    is chosen (an empty AutoChoice) without ``data``, or when the user named the ``backbone`` or gave a
    ``config`` file. ``method`` is the user's method, if given; ``backbone_opts`` the user's backbone
    options (``--backbone-opt`` without ``--backbone``), which win over the chosen ones (``img_size=64``
    keeps the chosen backbone at 64 px).

    Example:
        >>> choice = choose_defaults("~/photos", given={"steps"}, device="cpu")  # doctest: +SKIP
        >>> choice.options["backbone"], choice.options["backbone_opts"]["in_chans"]
        ('resnet18', 3)
        >>> print("\\n".join(choice.lines))  # doctest: +SKIP
    """
    given = set(given)
    if data is None or given & {"backbone", "config"}:
        return AutoChoice()
    user_opts = dict(backbone_opts or {})
    dev = device_type(device)
    facts = inspect_data(data)
    chosen_method = method if "method" in given and method else "simclr"
    masked = chosen_method in MASKED_IMAGE_METHODS
    in_chans = int(user_opts.get("in_chans", facts.in_chans))
    channels = f"{in_chans} input channel{'s' if in_chans > 1 else ''} " + (
        "(given)" if "in_chans" in user_opts else f"({facts.channels_reason})")
    if "img_size" in user_opts:
        size, rule = int(user_opts["img_size"]), "given"
    else:
        size = input_size(facts.short_side, cnn=not masked, device=dev)
        rule = (f"median shorter side {facts.short_side} px"
                + (f" x{SMALL_IMAGE_SCALE:g} for the CNN's stride-4 stem"
                   if not masked and facts.short_side < SMALL_IMAGE else "")
                + f", to a multiple of {SIZE_MULTIPLE} within {MIN_SIZE}-{MAX_SIZE[dev]} px on {dev.upper()}")
    options: dict[str, Any] = {}
    overrides: list[str] = []
    if masked:
        backbone, opts, described = _vit_for(size, in_chans, dev)
        described, why = described[:-1], f"; {chosen_method} needs patch embeddings)"
    elif dev == "cpu":
        backbone, opts = "resnet18", {"in_chans": in_chans, "img_size": size, **NARROW_RESNET18}
        described = "a narrow resnet18 (1 block per stage, 32-256 channels, 1.2M parameters"
        why = ("; best measured on CPU: 86.4% k-NN on Fashion-MNIST in 30 min)"
               if chosen_method == "simclr" else "; the best measured at small CPU budgets)")
    else:
        backbone, opts = "resnet50", {"in_chans": in_chans, "img_size": size}
        described, why = "resnet50", " (a standard backbone; a GPU trains it in minutes)"
    extra = {k: v for k, v in user_opts.items() if k not in ("in_chans", "img_size")}
    if extra:
        why += " with " + ", ".join(f"{k}={v}" for k, v in extra.items()) + " (given)"
    options.update(backbone=backbone, backbone_opts={**opts, **user_opts})
    if "method" not in given:
        options["method"] = chosen_method
        if dev == "cpu":
            overrides += list(CPU_SIMCLR_RECIPE)
        if size <= SMALL_IMAGE:
            overrides += list(SMALL_IMAGE_SIMCLR_RECIPE)
    parts = [f"{chosen_method} on {described}{why}"]
    if "batch_size" not in given:
        if masked and dev == "cpu":
            batch, batch_why = 128, "the demo's"
        elif dev == "cpu":
            batch, batch_why = 256, "the measured recipe's"
        else:
            batch, memory = _cuda_batch(device)
            batch_why = f"for {memory}"
        if batch > facts.num_images:
            batch, batch_why = _power_of_two_at_most(facts.num_images), f"at most the {facts.num_images} images"
        options["batch_size"] = batch
        parts.append(f"batch {batch} ({batch_why})")
    if not given & set(BUDGET_NAMES):
        low, high = MINUTES_RANGE[dev]
        minutes = budget_minutes(facts.num_images, dev)
        options["minutes"] = float(minutes)
        parts.append(f"{minutes} min (1 min per {IMAGES_PER_MINUTE[dev]:,} images, {low}-{high})")
    if overrides:
        parts.append(" ".join(overrides))
    lines = [
        f"auto: {channels}, {size} px ({rule}); {facts.num_images} images",
        "auto: " + ", ".join(parts) + "; any option you give overrides these",
    ]
    return AutoChoice(options=options, overrides=overrides, lines=lines, facts=facts)
