"""Training curves drawn with matplotlib's Agg canvas (no pyplot, no display) and returned as PNG bytes."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

#: (metrics key, title, y-axis label, scale applied to the values)
CURVES = (
    ("loss", "training loss", "loss", 1.0),
    ("knn_monitor", "k-NN monitor (held-out top-1)", "top-1 %", 100.0),
    ("lr", "learning rate", "lr", 1.0),
    ("img_per_s", "throughput", "images / s", 1.0),
    ("embed_std_norm", "embedding spread (1 = healthy, 0 = collapsed)", "embed_std_norm", 1.0),
    ("grad_norm", "gradient norm (before clipping)", "grad norm", 1.0),
)
#: curves overlaid across runs when several runs are compared
COMPARED = ("loss", "knn_monitor", "img_per_s")
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
SMOOTH_ABOVE = 60  # points; noisier series also get a moving average
FIGSIZE, DPI = (4.4, 2.7), 150  # inches; drawn at 150 dpi so they stay sharp when the page scales them


def series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that hold a finite number under ``key``, in step order."""
    pairs = sorted(
        (float(r["step"]), float(r[key]))
        for r in records
        if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float)) and np.isfinite(r[key])
    )
    if not pairs:
        return np.empty(0), np.empty(0)
    steps, values = zip(*pairs)
    return np.asarray(steps), np.asarray(values)


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points (shorter at the start): [N] -> [N]."""
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(0, idx - window)
    return (cumsum[idx] - cumsum[start]) / (idx - start)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _figure(title: str, ylabel: str) -> tuple[Figure, object]:
    fig = Figure(figsize=FIGSIZE, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("step", fontsize=10)
    ax.set_ylabel(ylabel, fontsize=10)
    ax.tick_params(labelsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    return fig, ax


def _scaled(values: np.ndarray, ylabel: str, scale: float) -> tuple[np.ndarray, str]:
    """Values times ``scale``; tiny ones (a learning rate) in units of a power of ten named in the label."""
    values = values * scale
    top = float(np.max(np.abs(values))) if len(values) else 0.0
    if 0 < top < 1e-2:
        exponent = math.floor(math.log10(top))
        return values / 10.0**exponent, f"{ylabel} (x 1e{exponent})"
    return values, ylabel


def _percent_limits(ax, values: np.ndarray) -> None:
    lo, hi = float(np.min(values)), float(np.max(values))
    pad = max(2.0, 0.1 * (hi - lo))
    ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad) + 0.5)


def _draw(ax, steps: np.ndarray, values: np.ndarray, color: str, label: str | None = None) -> None:
    if len(values) > SMOOTH_ABOVE:
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, moving_average(values, max(5, len(values) // 30)), color=color, linewidth=1.6, label=label)
    else:
        ax.plot(steps, values, color=color, linewidth=1.6, marker="o" if len(values) <= 20 else None,
                markersize=3, label=label)


def curve_png(records: Sequence[dict], key: str) -> bytes | None:
    """One run's curve of ``key`` (a name in CURVES) as PNG bytes; None when no record holds it."""
    _, title, ylabel, scale = next(c for c in CURVES if c[0] == key)
    steps, values = series(records, key)
    if not len(values):
        return None
    values, ylabel = _scaled(values, ylabel, scale)
    fig, ax = _figure(title, ylabel)
    _draw(ax, steps, values, COLORS[0])
    if key == "knn_monitor":
        _percent_limits(ax, values)
    return _png(fig)


def compare_png(runs: Sequence[tuple[str, Sequence[dict]]], key: str) -> bytes | None:
    """Several runs' curves of ``key`` on one axis, one colour each; None when no run holds it."""
    _, title, ylabel, scale = next(c for c in CURVES if c[0] == key)
    drawn = [(name, *series(records, key)) for name, records in runs]
    if not any(len(values) for _, _, values in drawn):
        return None
    fig, ax = _figure(f"{title}: runs compared", ylabel)
    for i, (name, steps, values) in enumerate(drawn):
        if len(values):
            _draw(ax, steps, values * scale, COLORS[i % len(COLORS)], label=name)
    if key == "knn_monitor":
        _percent_limits(ax, np.concatenate([values * scale for _, _, values in drawn if len(values)]))
    ax.legend(fontsize=8)
    return _png(fig)


#: per-layer attention statistics overlaid across runs: (diagnostics key, title, y-axis label)
LAYER_STATS = (
    ("mean_distance_px", "attention distance per layer", "mean distance (px)"),
    ("head_diversity", "head diversity per layer", "mean KL between heads"),
    ("mean_entropy", "attention entropy per layer", "entropy (nats)"),
)


def layers_png(runs: Sequence[tuple[str, Sequence[dict]]], key: str) -> bytes | None:
    """A per-layer attention statistic (a key of LAYER_STATS) of several runs on one axis; None when fewer than
    two runs have attention layers. runs: (name, the ``attention`` list of its diagnostics.json)."""
    _, title, ylabel = next(s for s in LAYER_STATS if s[0] == key)
    drawn = [(name, [la.get(key) for la in layers]) for name, layers in runs if layers]
    drawn = [(name, values) for name, values in drawn if any(isinstance(v, (int, float)) for v in values)]
    if len(drawn) < 2:
        return None
    fig, ax = _figure(f"{title}: runs compared", ylabel)
    ax.set_xlabel("layer (block or Swin block)", fontsize=10)
    for i, (name, values) in enumerate(drawn):
        points = [(x, v) for x, v in enumerate(values) if isinstance(v, (int, float))]
        ax.plot(*zip(*points), color=COLORS[i % len(COLORS)], linewidth=1.6, marker="o", markersize=3, label=name)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return _png(fig)


def evaluation_png(rows: Sequence[tuple[str, float, float, str]], title: str) -> bytes | None:
    """Horizontal bars of top-1 (%) with error bars of one standard deviation over the label draws.

    rows: (label, mean %, std %, role) with role ``pretrained``, ``baseline`` or ``strongest`` (the
    strongest baseline: hatched, and a dashed line across the chart at its mean). None when empty.
    """
    if not rows:
        return None
    colors = {"pretrained": COLORS[0], "baseline": "#9aa3ad", "strongest": "#6b7280"}
    height = max(1.6, 0.36 * len(rows) + 0.9)
    fig = Figure(figsize=(FIGSIZE[0] + 2.0, height), layout="constrained")
    ax = fig.add_subplot()
    fig.suptitle(title, fontsize=11)  # over the whole figure: the tick labels take much of the width
    positions = np.arange(len(rows))[::-1]
    means = np.array([r[1] for r in rows])
    stds = np.array([r[2] for r in rows])
    bars = ax.barh(positions, means, xerr=stds, color=[colors[r[3]] for r in rows], capsize=3,
                   error_kw={"elinewidth": 1.2, "ecolor": "#1d2330"})
    for bar, row in zip(bars, rows):
        if row[3] == "strongest":
            bar.set_hatch("//")
            ax.axvline(row[1], color="#b91c1c", linestyle="--", linewidth=1.0)
    ax.set_yticks(positions, [r[0] for r in rows], fontsize=8)
    ax.set_xlabel("test top-1 %, mean ± 1 std over the draws", fontsize=9)
    lo = float(np.min(means - stds))
    ax.set_xlim(max(0.0, lo - 5.0), min(100.0, float(np.max(means + stds)) + 2.0))
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    return _png(fig)
