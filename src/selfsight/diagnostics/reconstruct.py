"""Reconstructions of a masked-image-modelling run: original, masked input and prediction.

The method is re-created from the run's ``config.yaml`` and ``run.json`` (input normalisation) and
loaded with the newest checkpoint's ``model`` state, so its decoder is the one that was trained. The
mask is drawn by the method itself (``make_mask``) from a fixed seed. Methods whose target is each patch
normalised by its own mean and std (MAE with ``norm_pix_loss``, SparK) give a ``to_pixels``: their prediction
is de-normalised with the statistics of the same patch of the image, and ``label`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from selfsight.backbones import Backbone
from selfsight.checkpoint import load_latest_checkpoint, read_run_info
from selfsight.config import load_config
from selfsight.eval.features import pixels_to_input
from selfsight.methods.base import Method
from selfsight.methods.simmim import masked_l1_loss
from selfsight.registry import create_method, get_method_class

#: the grey (in [0, 1] pixel units) that replaces masked patches in the "masked input" column
MASK_GREY = 0.5


@dataclass
class Reconstruction:
    """Images in [0, 1], float32 [K, C, S, S] each, and the mask.

    ``reconstruction`` is the prediction pasted into the masked patches, with the visible pixels of the
    original elsewhere (what SimMIM's loss trains; its prediction of visible pixels is not trained);
    ``prediction`` is the decoder's full output, in pixels (de-normalised per patch where the method's
    target is per-patch normalised: ``label`` says how it was made viewable).
    """

    original: torch.Tensor
    masked: torch.Tensor
    reconstruction: torch.Tensor
    prediction: torch.Tensor
    pixel_mask: torch.Tensor  # bool [K, S, S], True = masked
    masked_l1: float  # L1 between prediction and image on masked normalised pixels (SimMIM's loss)
    mask_ratio: float  # fraction of pixels masked
    loss: float = float("nan")  # the method's own loss on these images (MAE, SparK: MSE on normalised patches)
    label: str = "prediction"  # what the prediction column shows


def is_masked_image_modelling(method_name: str) -> bool:
    """True for methods that predict pixels of masked patches: ``make_mask`` and ``forward(x, mask)``
    returning ``(loss, prediction [B, C, H, W], pixel_mask [B, H, W])`` (SimMIM, MAE, SparK)."""
    return callable(getattr(get_method_class(method_name), "make_mask", None))


@torch.no_grad()
def reconstruct(
    run_dir: str | Path, images: torch.Tensor, seed: int = 0, device: str | torch.device = "cpu"
) -> tuple[Reconstruction | None, str | None]:
    """Mask ``images`` (uint8 [K, C, S, S] at the run's size) and predict them with the run's method.

    Returns ``(Reconstruction, None)``, or ``(None, note)`` when the run's method does not reconstruct
    pixels.
    """
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if not is_masked_image_modelling(cfg.method):
        return None, f"reconstructions apply to masked image modelling runs; this run's method is {cfg.method}"
    info = read_run_info(run_dir)
    state, _ = load_latest_checkpoint(run_dir)
    arch = info["backbone"]
    opts = {k: tuple(v) if isinstance(v, list) else v for k, v in arch.get("opts", {}).items()}
    method = create_method(cfg.method, Backbone(arch["name"], opts), cfg.method_config, info["mean"], info["std"])
    method.load_state_dict(state["model"])
    method.to(device).eval()
    return reconstruct_with(method, images, seed)


@torch.no_grad()
def reconstruct_with(method: Method, images: torch.Tensor, seed: int = 0) -> tuple[Reconstruction | None, str | None]:
    """``reconstruct`` with a method at hand (in eval mode, on its device; e.g. during training):
    images uint8 [K, C, S, S] at the method's input size, masked with a mask drawn from ``seed``."""
    mean_list, std_list = method.mean.flatten().tolist(), method.std.flatten().tolist()
    x = pixels_to_input(images, mean_list, std_list, method.mean.device)
    mask = method.make_mask(x.shape[0], torch.Generator().manual_seed(seed), x.device)
    loss, prediction, pixel_mask = method(x, mask)
    if prediction.shape != x.shape:
        return None, f"the {method.method_name} prediction has shape {list(prediction.shape)}, not that of the images"
    to_pixels = getattr(method, "to_pixels", None)
    if callable(to_pixels):  # per-patch normalised target: each patch de-normalised with its own mean and std
        prediction = to_pixels(x, prediction)
    label = getattr(method, "reconstruction_label", f"{method.method_name} prediction")
    mean, std = method.mean.to(x.device), method.std.to(x.device)
    pixel_mask = pixel_mask.bool()
    weight = pixel_mask.unsqueeze(1)
    original = (x * std + mean).clamp(0, 1)
    predicted = (prediction.float() * std + mean).clamp(0, 1)
    result = Reconstruction(
        original=original.cpu(),
        masked=torch.where(weight, torch.full_like(original, MASK_GREY), original).cpu(),
        reconstruction=torch.where(weight, predicted, original).cpu(),
        prediction=predicted.cpu(),
        pixel_mask=pixel_mask.cpu(),
        masked_l1=float(masked_l1_loss(x.float(), prediction.float(), pixel_mask)),
        mask_ratio=float(pixel_mask.float().mean()),
        loss=float(loss),
        label=label,
    )
    return result, None


def reconstruction_grid(result: Reconstruction) -> torch.Tensor:
    """uint8 [K * S, 3 * S, C]: one row per image: original | masked input | reconstruction."""
    rows = torch.cat([result.original, result.masked, result.reconstruction], dim=3)  # [K, C, S, 3S]
    grid = torch.cat(list(rows), dim=1)  # [C, K * S, 3S]
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0)
