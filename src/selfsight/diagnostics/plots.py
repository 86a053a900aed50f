"""PNG figures of the diagnostics (matplotlib's object API on the Agg canvas; pyplot's global state is
never touched, so this works headless and inside other programs)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from selfsight.diagnostics.reconstruct import Reconstruction

DPI = 100


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


def _per_head_plot(
    layers: Sequence[dict[str, Any]], key: str, mean_key: str | None, ylabel: str, title: str, path: str | Path
) -> Path:
    """One point per head and layer (x = layer), and the mean over heads as a line."""
    figure = _figure(max(5.0, 0.45 * len(layers) + 2.0), 3.6)
    axes = figure.add_subplot()
    for index, layer in enumerate(layers):
        values = layer[key]
        axes.scatter([index] * len(values), values, s=14, color="tab:blue", alpha=0.6,
                     label="head" if index == 0 else None)
    if mean_key is not None:
        axes.plot(range(len(layers)), [layer[mean_key] for layer in layers], color="tab:red", marker="o",
                  markersize=3, label="mean over heads")
    _layer_axis(axes, layers)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    return _save(figure, path)


def _layer_axis(axes: Any, layers: Sequence[dict[str, Any]]) -> None:
    axes.set_xticks(range(len(layers)))
    axes.set_xticklabels([layer["name"] for layer in layers], rotation=90 if len(layers) > 12 else 0, fontsize=7)
    axes.set_xlabel("layer")
    axes.grid(alpha=0.3)
    axes.set_xlim(-0.5, len(layers) - 0.5)
    top = axes.get_ylim()[1]  # distances, entropies and divergences are >= 0: a zero baseline reads honestly
    axes.set_ylim(0.0, 1.08 * top if math.isfinite(top) and top > 0 else 1.0)
    axes.ticklabel_format(axis="y", useOffset=False)


def plot_attention_distance(layers: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Average attention distance (px) of every head per layer, as in Xie et al. 2022, fig. 2."""
    return _per_head_plot(layers, "distance_px", "mean_distance_px", "attention distance (px)",
                          title or "attention distance per head", path)


def plot_attention_entropy(layers: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Attention entropy (nats) of every head per layer."""
    return _per_head_plot(layers, "entropy", "mean_entropy", "attention entropy (nats)",
                          title or "attention entropy per head", path)


def plot_head_diversity(layers: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Mean KL divergence between the heads of each layer (Xie et al. 2022, fig. 3)."""
    figure = _figure(max(5.0, 0.45 * len(layers) + 2.0), 3.6)
    axes = figure.add_subplot()
    values = [layer["head_diversity"] if layer["head_diversity"] is not None else float("nan") for layer in layers]
    axes.plot(range(len(layers)), values, marker="o", color="tab:green")
    _layer_axis(axes, layers)
    axes.set_ylabel("KL between heads (nats)")
    axes.set_title(title or "attention head diversity", fontsize=9)
    return _save(figure, path)


def plot_cka(
    matrix: Sequence[Sequence[float]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: str | Path,
    title: str = "linear CKA",
    row_name: str = "",
    col_name: str = "",
) -> Path:
    """Heatmap of a CKA matrix (rows x columns = layers), values in [0, 1], row 0 at the bottom."""
    data = torch.tensor(matrix, dtype=torch.float64).numpy()
    figure = _figure(max(4.5, 0.35 * len(col_labels) + 2.4), max(4.0, 0.35 * len(row_labels) + 2.0))
    axes = figure.add_subplot()
    image = axes.imshow(data, origin="lower", vmin=0.0, vmax=1.0, cmap="magma", aspect="auto")
    axes.set_xticks(range(len(col_labels)))
    axes.set_xticklabels(col_labels, rotation=90, fontsize=7)
    axes.set_yticks(range(len(row_labels)))
    axes.set_yticklabels(row_labels, fontsize=7)
    axes.set_xlabel(col_name)
    axes.set_ylabel(row_name)
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, shrink=0.8)
    return _save(figure, path)


def plot_embedding(
    points: torch.Tensor,
    labels: torch.Tensor | None,
    classes: Sequence[str],
    path: str | Path,
    title: str = "pooled features, first two principal components",
    explained: Sequence[float] = (),
) -> Path:
    """Scatter of points [N, 2]; coloured by label with a legend of class names when labels exist."""
    figure = _figure(5.0, 4.2)
    axes = figure.add_subplot()
    xy = points.double().numpy()
    if labels is None:
        axes.scatter(xy[:, 0], xy[:, 1], s=8, alpha=0.7, color="tab:blue")
    else:
        cmap = matplotlib.colormaps["tab10" if labels.numel() == 0 or int(labels.max()) < 10 else "tab20"]
        for value in sorted(set(labels.tolist())):
            chosen = (labels == value).numpy()
            name = classes[value] if 0 <= value < len(classes) else str(value)
            axes.scatter(xy[chosen, 0], xy[chosen, 1], s=8, alpha=0.7, color=cmap(value % cmap.N), label=name)
        axes.legend(fontsize=7, markerscale=1.5, loc="best", ncols=1 if len(set(labels.tolist())) <= 10 else 2)
    suffix = [f" ({100 * v:.0f}% var.)" for v in explained] if len(explained) == 2 else ["", ""]
    axes.set_xlabel("PC 1" + suffix[0])
    axes.set_ylabel("PC 2" + suffix[1])
    axes.set_title(title, fontsize=9)
    return _save(figure, path)


def plot_reconstructions(result: Reconstruction, path: str | Path, title: str = "") -> Path:
    """Rows = images; columns = original | masked input (masked patches grey) | reconstruction (the
    prediction in the masked patches, visible pixels kept)."""
    columns = [("original", result.original), ("masked input", result.masked),
               ("reconstruction", result.reconstruction)]
    rows = result.original.shape[0]
    figure = _figure(1.3 * len(columns) + 0.2, 1.3 * rows + (0.6 if title else 0.2))
    grid = figure.subplots(rows, len(columns), squeeze=False)
    for row in range(rows):
        for col, (name, images) in enumerate(columns):
            axes = grid[row][col]
            image = images[row].permute(1, 2, 0).numpy()
            if image.shape[-1] == 1:
                axes.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                axes.imshow(image, interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            if row == 0:
                axes.set_title(name, fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    return _save(figure, path)
