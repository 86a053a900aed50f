"""Attention distance, entropy and head diversity (Xie et al. 2022, "Revealing the Dark Secrets of
Masked Image Modeling", sections 3.1-3.2), and the hooks that read attention out of timm models.

Definitions, for one head's attention matrix ``a`` (rows = queries ``i``, columns = keys ``j``, each
row a probability distribution) and patch centres ``c`` in input pixels:

- attention distance of query ``i``: ``d_i = sum_j a_ij * ||c_i - c_j||_2`` (the attention-weighted
  distance in image space, as in the ViT paper's "mean attention distance");
- attention entropy of query ``i``: ``H_i = -sum_j a_ij * log a_ij`` (nats; ``log N`` for uniform attention);
- head diversity of a layer: ``mean_{h != h'} KL(a_h,i || a_h',i)`` averaged over queries, i.e. the mean
  KL divergence between the attention distributions of different heads for the same query.

Each is averaged over queries and images. Reading the attention:

- timm's ViT ``Attention`` and Swin / SwinV2 ``WindowAttention`` compute ``softmax(...)`` and then pass
  it through ``self.attn_drop`` (when ``fused_attn`` is False; SwinV2 has no fused path). A forward hook
  on ``attn_drop`` reads its input: the [B, H, N, N] (ViT) or [B * nW, H, Ws^2, Ws^2] (Swin) softmax.
  ``fused_attn`` is switched off for the duration and restored afterwards, hooks are removed, even on
  error. timm's code is never edited.
- ViT: class / register (prefix) tokens are dropped from queries and keys and every row is renormalised
  over the patch keys, so distances and entropies describe attention among image patches (the mass a
  query puts on prefix tokens is reported separately as ``prefix_attention``).
- Swin: attention lives inside (shifted) windows of ``Ws x Ws`` tokens, a token of stage ``s`` covering
  ``reduction_s`` input pixels (``patch_size * 2**s``). Distances use positions inside the window; these
  equal offsets in the image because the cyclic shift keeps every window contiguous, except at the
  wrapped border where timm's attention mask (-100 before the softmax) removes the pairs that are not
  neighbours. Window sizes are read from each block (timm clamps them to the feature size). Where the
  feature map is padded up to a multiple of the window, padded tokens are dropped as keys (rows
  renormalised) and as queries.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from selfsight.backbones import Backbone
from selfsight.errors import ConfigError

#: added inside logarithms of the head-diversity KL divergence, so zero probabilities stay finite
KL_EPS = 1e-8


# --- pure functions ---------------------------------------------------------------------------
def patch_coords(grid_h: int, grid_w: int, patch_px: float) -> torch.Tensor:
    """Centres of a ``grid_h x grid_w`` patch grid in input pixels, row-major: float64 [grid_h * grid_w, 2] (y, x)."""
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    return (torch.stack([ys.flatten(), xs.flatten()], dim=1) + 0.5) * float(patch_px)


def patch_attention(attn: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Drop prefix tokens from queries and keys and renormalise each row over the patch keys.

    attn: [B, H, P + N, P + N] softmax rows -> [B, H, N, N] rows summing to 1 (P = ``num_prefix_tokens``).
    """
    if num_prefix_tokens == 0:
        return attn
    patches = attn[:, :, num_prefix_tokens:, num_prefix_tokens:]
    return patches / patches.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(patches.dtype).tiny)


def _restrict(attn: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """attn [B, H, N, N], valid bool [B, N] or None -> (attn with invalid keys removed and rows
    renormalised, query weights float [B, 1, N]: 1 for valid queries, 0 otherwise)."""
    weights = torch.ones(attn.shape[0], 1, attn.shape[2], dtype=attn.dtype, device=attn.device)
    if valid is None:
        return attn, weights
    keep = valid.to(attn.dtype)
    attn = attn * keep[:, None, None, :]
    attn = attn / attn.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(attn.dtype).tiny)
    return attn, weights * keep[:, None, :]


def _query_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """values [B, H, N], query weights [B, 1, N] -> weighted mean over images and queries, [H]."""
    return (values * weights).sum(dim=(0, 2)) / weights.sum(dim=(0, 2)).clamp_min(1e-12)


def attention_distance(attn: torch.Tensor, coords: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Average attention distance per head (Xie et al. 2022, fig. 2; Dosovitskiy et al. 2021, fig. 7).

    Args:
        attn: [B, H, N, N] attention, each row (query) a distribution over the N keys.
        coords: [N, 2] token positions in input pixels.
        valid: optional bool [B, N]; False tokens are dropped as keys (rows renormalised) and as queries.
    Returns:
        float64 [H]: ``mean over images and queries i of sum_j a_ij * ||c_i - c_j||``, in pixels.
    """
    attn = attn.double()
    attn, weights = _restrict(attn, valid)
    coords = coords.to(device=attn.device, dtype=torch.float64)
    distances = torch.cdist(coords, coords)  # [N, N]
    per_query = (attn * distances).sum(dim=-1)  # [B, H, N]
    return _query_mean(per_query, weights).cpu()


def attention_entropy(attn: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Average entropy (nats) of each head's attention rows: ``-sum_j a_ij log a_ij``, 0 log 0 = 0.

    attn: [B, H, N, N]; valid: optional bool [B, N] as in :func:`attention_distance`. Returns float64 [H];
    uniform attention over N keys gives ``log N``, attention on one key gives 0.
    """
    attn = attn.double()
    attn, weights = _restrict(attn, valid)
    per_query = -torch.special.xlogy(attn, attn).sum(dim=-1)  # [B, H, N]
    return _query_mean(per_query, weights).cpu()


def head_diversity(attn: torch.Tensor, valid: torch.Tensor | None = None, eps: float = KL_EPS) -> float:
    """Mean KL divergence between the attention distributions of different heads (Xie et al. 2022, fig. 3).

    ``mean over ordered pairs h != h', images and queries i of KL(a_h,i || a_h',i)`` with
    ``KL(p || q) = sum_j p_j (log(p_j + eps) - log(q_j + eps))``.

    attn: [B, H, N, N]; valid: optional bool [B, N]. Returns a float >= 0 (0 for identical heads,
    and 0 for a single head, which has no pair).
    """
    heads = attn.shape[1]
    if heads < 2:
        return 0.0
    attn = attn.double()
    attn, weights = _restrict(attn, valid)
    log_attn = torch.log(attn + eps)
    self_term = (attn * log_attn).sum(dim=-1)  # [B, H, N]: sum_j p_h log p_h
    cross = torch.einsum("bhqk,bgqk->bhgq", attn, log_attn)  # [B, H, H', N]: sum_j p_h log p_h'
    kl = (self_term[:, :, None, :] - cross).clamp_min(0.0)  # [B, H, H', N]
    off_diagonal = ~torch.eye(heads, dtype=torch.bool, device=attn.device)
    kl = kl[:, off_diagonal]  # [B, H * (H - 1), N]
    return float(_query_mean(kl, weights).mean())


# --- where attention lives in timm models ----------------------------------------------------------
@dataclass
class AttentionSite:
    """One attention module of a backbone.

    ``layer`` counts blocks over the whole model; for Swin, ``stage`` and ``block`` locate it and
    ``token_px`` is the size of one token of that stage in input pixels.
    """

    layer: int
    name: str
    module: nn.Module
    block: nn.Module
    stage: int | None = None
    block_in_stage: int | None = None
    token_px: int = 1


def attention_sites(backbone: Backbone) -> list[AttentionSite]:
    """The attention modules of a ViT (``model.blocks[i].attn``) or Swin / SwinV2 backbone
    (``model.layers[s].blocks[j].attn``). Raises ConfigError for other families."""
    model = backbone.model
    sites: list[AttentionSite] = []
    if backbone.family == "vit":
        for index, block in enumerate(model.blocks):
            sites.append(AttentionSite(index, f"block {index}", _attention_module(block, backbone), block,
                                       token_px=backbone.patch_size))
    elif backbone.family == "swin":
        reductions = [int(info["reduction"]) for info in model.feature_info]
        layer = 0
        for stage_index, stage in enumerate(model.layers):
            px = reductions[stage_index] if stage_index < len(reductions) else backbone.patch_size * 2**stage_index
            for block_index, block in enumerate(stage.blocks):
                sites.append(AttentionSite(layer, f"s{stage_index}.b{block_index}", _attention_module(block, backbone),
                                           block, stage_index, block_index, px))
                layer += 1
    else:
        raise ConfigError(f"attention views apply to ViT and Swin backbones; {backbone.name} is a {backbone.family}"
                          " model")
    return sites


def _attention_module(block: nn.Module, backbone: Backbone) -> nn.Module:
    attn = getattr(block, "attn", None)
    if attn is None or not isinstance(getattr(attn, "attn_drop", None), nn.Module):
        raise ConfigError(f"{backbone.name}: block {type(block).__name__} has no attention module with an attn_drop "
                          "step, so its attention cannot be read by hooks")
    return attn


@contextmanager
def hooked_attention(
    backbone: Backbone, on_attention: Callable[[AttentionSite, torch.Tensor], None]
) -> Iterator[list[AttentionSite]]:
    """Within the block, every forward pass calls ``on_attention(site, attn)`` once per attention module,
    with the softmax ``attn`` [B', H, N, N] (detached) read at the input of the module's ``attn_drop``.

    timm's fused attention (``fused_attn``) is turned off for the duration; it is restored and the hooks
    are removed on exit, also on error. Yields the sites.
    """
    sites = attention_sites(backbone)
    saved: list[tuple[nn.Module, bool]] = []
    handles = []
    try:
        for site in sites:
            if hasattr(site.module, "fused_attn"):
                saved.append((site.module, site.module.fused_attn))
                site.module.fused_attn = False

            def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any, site: AttentionSite = site) -> None:
                on_attention(site, inputs[0].detach())

            handles.append(site.module.attn_drop.register_forward_hook(hook))
        yield sites
    finally:
        for handle in handles:
            handle.remove()
        for module, value in saved:
            module.fused_attn = value


@torch.no_grad()
def capture_attention(backbone: Backbone, x: torch.Tensor) -> list[dict[str, Any]]:
    """Run ``x`` (normalised images [B, C, H, W]) through the backbone in eval mode and return, per
    attention module, ``{"layer", "name", "stage", "block", "attn"}`` with ``attn`` the softmax
    [B, H, N, N] (ViT, prefix tokens included) or [B * nW, H, Ws^2, Ws^2] (Swin windows).
    """
    captured: dict[int, list[torch.Tensor]] = {}
    was_training = backbone.training
    backbone.eval()
    try:
        with hooked_attention(backbone, lambda site, attn: captured.setdefault(site.layer, []).append(attn)) as sites:
            backbone.model.forward_features(x)
    finally:
        backbone.train(was_training)
    _check_captured(backbone, sites, captured)
    return [
        {"layer": s.layer, "name": s.name, "stage": s.stage, "block": s.block_in_stage, "attn": captured[s.layer][0]}
        for s in sites
    ]


def _check_captured(backbone: Backbone, sites: list[AttentionSite], captured: dict[int, list[torch.Tensor]]) -> None:
    missing = [s.name for s in sites if len(captured.get(s.layer, ())) != 1]
    if missing:
        raise RuntimeError(f"{backbone.name}: attention of {', '.join(missing)} was not read exactly once per forward "
                           "pass; this timm version may compute attention without its attn_drop step")


# --- geometry -------------------------------------------------------------------------------------
def window_geometry(
    site: AttentionSite, num_windows_total: int, tokens: int
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]:
    """Coordinates and validity of the tokens of a Swin window attention.

    Args:
        site: a Swin site (its block gives ``window_size`` and ``input_resolution``).
        num_windows_total: B * nW, the first dimension of the captured attention.
        tokens: N = Ws_h * Ws_w, the size of the captured matrices.
    Returns:
        coords float64 [N, 2] (window positions times ``token_px``, in input pixels), valid bool
        [B * nW, N] (False for tokens of the padding up to a multiple of the window) or None when nothing
        is padded, and the window size (Ws_h, Ws_w).
    """
    win_h, win_w = (int(v) for v in site.block.window_size)
    if win_h * win_w != tokens:  # the block was resized after construction: trust the matrix, square window
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise RuntimeError(f"{site.name}: cannot read a window size from {tokens} tokens")
        win_h = win_w = side
    coords = patch_coords(win_h, win_w, site.token_px)
    height, width = (int(v) for v in getattr(site.block, "input_resolution", (win_h, win_w)))
    rows, cols = math.ceil(height / win_h), math.ceil(width / win_w)
    if rows * win_h == height and cols * win_w == width:
        return coords, None, (win_h, win_w)
    if num_windows_total % (rows * cols):
        return coords, None, (win_h, win_w)  # the feature size differs from input_resolution: no padding known
    ys = torch.arange(rows * win_h).view(rows, win_h, 1, 1) < height
    xs = torch.arange(cols * win_w).view(1, 1, cols, win_w) < width
    valid = (ys & xs).permute(0, 2, 1, 3).reshape(rows * cols, win_h * win_w)  # window_partition's order
    return coords, valid.repeat(num_windows_total // (rows * cols), 1), (win_h, win_w)


def _site_geometry(
    backbone: Backbone, site: AttentionSite, attn: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float | None, list[int] | None]:
    """-> (patch attention [B', H, N, N], coords [N, 2] px, valid [B', N] or None, mean prefix mass or None,
    Swin window [Ws_h, Ws_w] or None)."""
    if backbone.family == "vit":
        prefix = backbone.num_prefix_tokens
        prefix_mass = float(attn[:, :, prefix:, :prefix].sum(dim=-1).mean()) if prefix else None
        attn = patch_attention(attn, prefix)
        grid_h, grid_w = backbone.grid_size
        if grid_h * grid_w != attn.shape[-1]:
            raise RuntimeError(f"{site.name}: {attn.shape[-1]} patch tokens do not fit the grid {grid_h}x{grid_w}")
        return attn, patch_coords(grid_h, grid_w, site.token_px), None, prefix_mass, None
    coords, valid, window = window_geometry(site, attn.shape[0], attn.shape[-1])
    return attn, coords, None if valid is None else valid.to(attn.device), None, list(window)


# --- per-layer statistics over a sample -----------------------------------------------------------
@torch.no_grad()
def attention_stats(
    backbone: Backbone, images: torch.Tensor, batch_size: int = 16, progress: bool = False
) -> list[dict[str, Any]]:
    """Attention distance, entropy and head diversity of every attention layer, over a sample.

    Args:
        backbone: a ViT or Swin :class:`Backbone` (on the device of ``images``).
        images: normalised images [N, C, H, W]; processed ``batch_size`` at a time, statistics computed in
            the hooks so only one layer's attention is held at once.
    Returns:
        one dict per layer: ``layer``, ``name``, ``stage`` (Swin) / None, ``num_heads``, ``window`` (Swin
        [Ws_h, Ws_w]) / None, ``token_px``, ``distance_px`` [per head], ``entropy`` [per head, nats],
        ``head_diversity`` (None for one head), ``mean_distance_px``, ``mean_entropy`` and
        ``prefix_attention`` (ViT with class/register tokens: mean attention mass on them, before
        renormalising) / None. Every image has the same number of queries, so per-batch means weighted by
        batch size give the mean over the whole sample.
    """
    from tqdm.auto import tqdm

    sums: dict[int, dict[str, Any]] = {}

    def accumulate(site: AttentionSite, attn: torch.Tensor) -> None:
        patch_attn, coords, valid, prefix_mass, window = _site_geometry(backbone, site, attn)
        weight = current["batch"]
        entry = sums.setdefault(site.layer, {"distance": 0.0, "entropy": 0.0, "diversity": 0.0, "prefix": 0.0,
                                             "count": 0, "calls": 0, "heads": attn.shape[1], "window": window})
        entry["distance"] = entry["distance"] + attention_distance(patch_attn, coords, valid) * weight
        entry["entropy"] = entry["entropy"] + attention_entropy(patch_attn, valid) * weight
        entry["diversity"] += head_diversity(patch_attn, valid) * weight
        entry["prefix"] += (prefix_mass or 0.0) * weight
        entry["count"] += weight
        entry["calls"] += 1
        entry["has_prefix"] = prefix_mass is not None

    current = {"batch": 0}
    was_training = backbone.training
    backbone.eval()
    try:
        with hooked_attention(backbone, accumulate) as sites:
            bar = tqdm(total=len(images), desc="attention", unit="img", disable=not progress, leave=False)
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size]
                current["batch"] = len(batch)
                backbone.model.forward_features(batch)
                bar.update(len(batch))
            bar.close()
    finally:
        backbone.train(was_training)
    batches = math.ceil(len(images) / batch_size)
    missing = [s.name for s in sites if sums.get(s.layer, {}).get("calls") != batches]
    if missing:
        raise RuntimeError(f"{backbone.name}: attention of {', '.join(missing)} was not read once per forward pass; "
                           "this timm version may compute attention without its attn_drop step")
    results = []
    for site in sites:
        entry = sums[site.layer]
        count = entry["count"]
        distance = (entry["distance"] / count).tolist()
        entropy = (entry["entropy"] / count).tolist()
        heads = entry["heads"]
        results.append({
            "layer": site.layer,
            "name": site.name,
            "stage": site.stage,
            "num_heads": heads,
            "window": entry["window"],
            "token_px": site.token_px,
            "distance_px": distance,
            "entropy": entropy,
            "head_diversity": entry["diversity"] / count if heads > 1 else None,
            "mean_distance_px": sum(distance) / heads,
            "mean_entropy": sum(entropy) / heads,
            "prefix_attention": entry["prefix"] / count if entry.get("has_prefix") else None,
        })
    return results
