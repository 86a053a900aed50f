"""``diagnose(RUN)``: what a pre-trained backbone learned, written to ``RUN/diagnostics/``.

On a fixed seeded sample of images (the run's own data unless another is given):

- attention distance, entropy and head diversity per layer and head (ViT and Swin backbones);
- linear CKA between the layers of the model, and between its layers and those of ``compare`` runs;
- reconstructions (masked image modelling runs);
- a 2-D PCA map of the last layer's pooled features, coloured by label when the data has labels.

Everything goes into ``diagnostics.json`` (written to a temporary file, then renamed) and PNG files next
to it; the json's ``plots`` maps each figure to its file name, relative to that folder.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from selfsight.backbones import Backbone
from selfsight.checkpoint import atomic_write_bytes, load_run_backbone
from selfsight.config import load_config
from selfsight.data import open_images
from selfsight.diagnostics import plots
from selfsight.diagnostics.attention import attention_stats
from selfsight.diagnostics.cka import cka_matrix, layer_features
from selfsight.diagnostics.embedding import pca_2d
from selfsight.diagnostics.reconstruct import is_masked_image_modelling, reconstruct
from selfsight.engine import resolve_device
from selfsight.errors import ConfigError, DataError
from selfsight.eval.features import pixels_to_input

log = logging.getLogger("selfsight")

OUT_DIR = "diagnostics"
JSON_NAME = "diagnostics.json"
#: images shown in the reconstruction figure
NUM_RECONSTRUCTIONS = 8
ATTENTION_BATCH = 16
FEATURE_BATCH = 64


def layer_names(backbone: Backbone) -> list[str]:
    """Names of the layers ``backbone.features(layer=i)`` reads: ``block i`` (ViT), else timm's stage module."""
    if backbone.family == "vit":
        return [f"block {i}" for i in range(backbone.num_blocks())]
    info = backbone.model.feature_info
    return [str(info[i].get("module", f"stage {i}")) if i < len(info) else f"stage {i}"
            for i in range(backbone.num_blocks())]


def resize_images(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, C, S, S] -> uint8 [N, C, size, size] (bilinear, antialiased); unchanged when S == size."""
    if pixels.shape[-1] == size and pixels.shape[-2] == size:
        return pixels
    resized = F.interpolate(pixels.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


def _rounded(value: Any, digits: int = 6) -> Any:
    """Floats to ``digits`` significant digits, recursively (a readable json; small KLs keep their precision)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v, digits) for v in value]
    return value


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:40] or "run"


def diagnose(
    run_dir: str | Path,
    data: str | None = None,
    compare: Sequence[str | Path] = (),
    num_images: int = 256,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Compute the diagnostics of a pre-training run and write them to ``RUN/diagnostics/``.

    Args:
        run_dir: a pre-training run directory (``config.yaml``, ``run.json``, a checkpoint).
        data: image data spec (as ``open_images`` reads it); default: the run's own ``data``.
        compare: other run directories; each backbone sees the same images (resized to its own input
            size where that differs; the channel counts must match) and is compared layer by layer with CKA.
        num_images: size of the fixed sample (fewer when the data holds fewer).
        seed: draws the sample and the reconstruction masks.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
    Returns:
        the content of ``diagnostics.json`` plus ``path`` (of that file).
    """
    if num_images < 2:
        raise ConfigError(f"num_images must be at least 2 (CKA and PCA compare images), got {num_images}")
    start = time.perf_counter()
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    backbone, info = load_run_backbone(run_dir)
    backbone.to(dev)
    spec = data or load_config(run_dir / "config.yaml").data
    try:
        images = open_images(spec, backbone.in_chans, backbone.img_size, progress=progress)
    except DataError as exc:
        if data is not None:
            raise
        raise DataError(f"{exc} (the run's training data; give other images with data=...)") from None
    count = min(num_images, images.num_images)
    if count < 2:
        raise ConfigError(f"{images.description} holds {images.num_images} image(s); diagnostics need at least 2")
    order = torch.randperm(images.num_images, generator=torch.Generator().manual_seed(seed))[:count]
    pixels, sources = images.load_batch(order)
    labels = images.batch_labels(sources)
    x = pixels_to_input(pixels, info["mean"], info["std"], dev)
    out_dir = run_dir / OUT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("cka_vs_*.png"):
        stale.unlink()
    names = layer_names(backbone)
    title = f"{run_dir.name}: {info['method']}, step {info['step']}\n{backbone.name}"
    figures: dict[str, str] = {}
    log.info("diagnosing %s (%s, %s) on %d images of %s", run_dir, backbone.name, info["method"], count,
             images.description)

    attention, attention_note = None, None
    if backbone.family in ("vit", "swin"):
        attention = attention_stats(backbone, x, batch_size=ATTENTION_BATCH, progress=progress)
        for key, draw in (("attention_distance", plots.plot_attention_distance),
                          ("attention_entropy", plots.plot_attention_entropy),
                          ("head_diversity", plots.plot_head_diversity)):
            figures[key] = draw(attention, out_dir / f"{key}.png", title=f"{title}\n{key.replace('_', ' ')}").name
    else:
        kind = "CNN" if backbone.family == "cnn" else f"{backbone.family} model"
        attention_note = f"attention views apply to ViT and Swin backbones; {backbone.name} is a {kind}"
        log.info(attention_note)

    log.info("CKA between the %d layers", len(names))
    feats = layer_features(backbone, x, batch_size=FEATURE_BATCH)
    cka = cka_matrix(feats, feats)
    figures["cka"] = plots.plot_cka(cka, names, names, out_dir / "cka.png", title=f"{title}\nlinear CKA").name

    comparisons = []
    for index, other_dir in enumerate(compare):
        comparisons.append(_compare(index, Path(other_dir), backbone, names, feats, pixels, dev, out_dir, run_dir))
        figures[f"cka_vs_{index}"] = comparisons[-1]["plot"]

    points, explained = pca_2d(feats[-1])
    figures["embedding"] = plots.plot_embedding(
        points, labels, images.classes, out_dir / "embedding.png", explained=explained,
        title=f"{title}\n{names[-1]} pooled features (PCA)",
    ).name
    embedding = {
        "layer": names[-1],
        "explained_variance": explained,
        "points": points.tolist(),
        "labels": None if labels is None else labels.tolist(),
        "classes": list(images.classes),
    }

    reconstruction, reconstruction_note = None, None
    if is_masked_image_modelling(info["method"]):
        shown = min(NUM_RECONSTRUCTIONS, count)
        result, reconstruction_note = reconstruct(run_dir, pixels[:shown], seed=seed, device=dev)
        if result is not None:
            figures["reconstructions"] = plots.plot_reconstructions(
                result, out_dir / "reconstructions.png", title=f"{title}\n{result.label}"
            ).name
            reconstruction = {
                "num_images": shown,
                "mask_ratio": result.mask_ratio,
                "masked_l1": result.masked_l1,
                "loss": result.loss,
                "prediction": result.label,
                "columns": ["original", "masked input", "reconstruction"],
                "shown": "prediction inside the masked patches, the original's visible pixels elsewhere",
            }
    else:
        reconstruction_note = f"reconstructions apply to masked image modelling runs; this run's method is " \
                              f"{info['method']}"

    notes = [n for n in (attention_note, reconstruction_note) if n]
    record = {
        "run": str(run_dir),
        "method": info["method"],
        "checkpoint": info["checkpoint"],
        "step": info["step"],
        "backbone": backbone.describe(),
        "family": backbone.family,
        "sample": {
            "data": spec,
            "description": images.description,
            "num_images": count,
            "seed": seed,
            "labelled": labels is not None,
        },
        "device": str(dev),
        "layers": names,
        "attention": attention,
        "attention_note": attention_note,
        "cka": cka,
        "compare": comparisons,
        "embedding": embedding,
        "reconstruction": reconstruction,
        "reconstruction_note": reconstruction_note,
        "notes": notes,
        "plots": figures,
        "minutes": (time.perf_counter() - start) / 60,
    }
    record = _rounded(record)
    path = out_dir / JSON_NAME
    atomic_write_bytes(path, lambda handle: handle.write((json.dumps(record, indent=1) + "\n").encode()))
    log.info("diagnostics of %s written to %s (%.1f min)", run_dir, path, record["minutes"])
    return {**record, "path": str(path)}


def _compare(
    index: int,
    other_dir: Path,
    backbone: Backbone,
    names: list[str],
    feats: list[torch.Tensor],
    pixels: torch.Tensor,
    dev: torch.device,
    out_dir: Path,
    run_dir: Path,
) -> dict[str, Any]:
    """CKA between this run's layers (rows) and another run's (columns), on the same images."""
    other, other_info = load_run_backbone(other_dir)
    if other.in_chans != backbone.in_chans:
        raise ConfigError(f"cannot compare {run_dir} ({backbone.in_chans} channels) with {other_dir} "
                          f"({other.in_chans} channels): the same images cannot feed both")
    other.to(dev)
    other_pixels = resize_images(pixels, other.img_size)
    x = pixels_to_input(other_pixels, other_info["mean"], other_info["std"], dev)
    log.info("CKA against %s (%s)", other_dir, other.name)
    other_feats = layer_features(other, x, batch_size=FEATURE_BATCH)
    other_names = layer_names(other)
    matrix = cka_matrix(feats, other_feats)
    plot = plots.plot_cka(
        matrix, names, other_names, out_dir / f"cka_vs_{index}_{_slug(other_dir.resolve().name)}.png",
        title=f"linear CKA\n{run_dir.name} ({backbone.name})\nvs {other_dir.name} ({other.name})",
        row_name=run_dir.name, col_name=other_dir.name,
    ).name
    return {
        "run": str(other_dir),
        "method": other_info["method"],
        "step": other_info["step"],
        "backbone": other.name,
        "img_size": other.img_size,
        "resized": other.img_size != backbone.img_size,
        "layers": other_names,
        "cka": matrix,
        "plot": plot,
    }
