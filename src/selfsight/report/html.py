"""One self-contained HTML page for one or more runs: every image a data: URI, no network, no external files.

Sections are rows with one cell per run, so several runs line up side by side. A small inline script
records, on window load, how many images decoded (``<body data-images-loaded="9/9">``) and any script
or resource error (``data-errors``), so a headless browser's ``--dump-dom`` can check the page.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path
from typing import Any

import selfsight
from selfsight.errors import ConfigError
from selfsight.report import plots
from selfsight.report.collect import RunFacts, collect_run

IMAGE_TYPES = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF8": "image/gif"}
KIND_ORDER = {"knn": 0, "linear": 1, "finetune": 2}
MAX_MATRIX = 24  # CKA matrices larger than this are shown only as the diagnostics' own plot
MAX_LIST = 12  # list values longer than this are cut in tables

CSS = """
:root { --fg: #1d2330; --muted: #5f6b7a; --line: #d9dee5; --bg: #f6f7f9; --accent: #1f77b4; }
* { box-sizing: border-box; }
body { margin: 0; padding: 24px 32px 48px; font: 14px/1.45 system-ui, "DejaVu Sans", "Segoe UI", Roboto, sans-serif;
       color: var(--fg); background: var(--bg); }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 14px; margin: 14px 0 6px; }
.sub { color: var(--muted); margin: 0 0 8px; }
.row { display: grid; gap: 16px; grid-template-columns: repeat(var(--n), minmax(380px, 1fr)); overflow-x: auto; }
.cell { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; min-width: 0; }
.run-tag { display: inline-block; font-weight: 600; color: #fff; border-radius: 4px; padding: 1px 8px;
           margin-bottom: 6px; }
table { border-collapse: collapse; margin: 4px 0 8px; font-size: 13px; }
th, td { text-align: left; padding: 3px 10px 3px 0; border-bottom: 1px solid #eef0f3; vertical-align: top; }
th { color: var(--muted); font-weight: 600; }
table.kv th { width: 11em; font-weight: 500; }
td.num, th.num { text-align: right; padding-right: 12px; font-variant-numeric: tabular-nums; }
tr.scratch td { color: var(--muted); }
tr.strongest td { color: var(--fg); background: #fef3c7; } .strongest-mark { color: #92400e; font-weight: 600; }
.gain-pos { color: #15803d; font-weight: 600; } .gain-neg { color: #b91c1c; font-weight: 600; }
.blocks { display: flex; flex-wrap: wrap; gap: 0 48px; } .blocks h3 { margin-top: 0; }
.blocks > div { min-width: 0; max-width: 100%; } td { overflow-wrap: anywhere; }
.figs { display: grid; gap: 10px; grid-template-columns: repeat(auto-fill, minmax(280px, 1fr)); }
.missing-fig { aspect-ratio: 44 / 27; display: flex; align-items: center; justify-content: center;
               border: 1px dashed var(--line); border-radius: 4px; color: var(--muted); font-style: italic;
               font-size: 12px; padding: 8px; text-align: center; }
figure { margin: 0; text-align: center; }
figure img { max-width: 100%; height: auto; border: 1px solid #eef0f3; border-radius: 4px; }
figcaption { color: var(--muted); font-size: 12px; text-align: center; }
.note { color: var(--muted); font-style: italic; margin: 4px 0; }
.warn { color: #92400e; background: #fffbeb; border: 1px solid #fde68a; border-radius: 4px; padding: 4px 8px; }
pre { background: #f3f4f6; padding: 8px 10px; border-radius: 4px; overflow-x: auto; font-size: 12px; margin: 6px 0; }
details summary { cursor: pointer; color: var(--accent); }
code { font-size: 12px; background: #f3f4f6; padding: 0 3px; border-radius: 3px; }
table.matrix td { padding: 2px 6px; text-align: center; font-size: 11px; border: 1px solid #fff; }
footer { margin-top: 32px; color: var(--muted); font-size: 12px; }
"""

CHECK_SCRIPT = """
(function () {
  var errors = [];
  function mark() {
    if (!document.body) return;
    document.body.setAttribute("data-errors", String(errors.length));
    var out = document.getElementById("page-errors");
    if (out) out.textContent = errors.join("\\n");
  }
  window.addEventListener("error", function (event) {
    var target = event.target;
    if (target && target !== window && target.tagName) {
      errors.push("failed to load <" + target.tagName.toLowerCase() + ">");
    } else {
      errors.push("script error: " + (event.message || "unknown"));
    }
    mark();
  }, true);
  window.addEventListener("unhandledrejection", function (event) {
    errors.push("unhandled rejection: " + event.reason); mark();
  });
  window.addEventListener("load", function () {
    var images = document.images, loaded = 0;
    for (var i = 0; i < images.length; i++) {
      if (images[i].complete && images[i].naturalWidth > 0) loaded++;
    }
    document.body.setAttribute("data-images-loaded", loaded + "/" + images.length);
    mark();
  });
})();
"""


def esc(value: Any) -> str:
    return escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A value as short escaped text: 4 significant digits, thousands separators, lists cut."""
    if value is None:
        return "&mdash;"
    if isinstance(value, bool):
        return esc(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return esc(f"{value:.4g}")
    if isinstance(value, (list, tuple)):
        shown = ", ".join(fmt(v) for v in value[:MAX_LIST])
        return shown + (f", &hellip; ({len(value)} in all)" if len(value) > MAX_LIST else "")
    if isinstance(value, dict):
        return esc(json.dumps(value, default=str)[:200])
    return esc(value)


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def kv_table(rows: Iterable[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td>{fmt(v)}</td></tr>" for k, v in rows if v is not None and v != "")
    return f'<table class="kv">{body}</table>' if body else ""


def table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = (),
          row_classes: Sequence[str] = ()) -> str:
    """``rows`` are already formatted HTML cells; ``row_classes`` (one per row) style whole rows."""
    cls = lambda i: ' class="num"' if i in numeric else ""
    head = "".join(f"<th{cls(i)}>{esc(h)}</th>" for i, h in enumerate(header))
    body = "".join(
        (f'<tr class="{row_classes[j]}">' if j < len(row_classes) and row_classes[j] else "<tr>")
        + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(r)) + "</tr>"
        for j, r in enumerate(rows)
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def data_uri(content: bytes) -> str | None:
    mime = next((m for magic, m in IMAGE_TYPES.items() if content.startswith(magic)), None)
    return f"data:{mime};base64,{base64.b64encode(content).decode('ascii')}" if mime else None


def figure(content: bytes | None, caption: str, show_caption: bool = True) -> str:
    """An embedded image; ``show_caption=False`` where the image carries its own title."""
    uri = data_uri(content) if content else None
    if uri is None:
        return note(f"{caption}: not an image that can be embedded")
    text = f"<figcaption>{esc(caption)}</figcaption>" if show_caption else ""
    return f'<figure><img src="{uri}" alt="{esc(caption)}">{text}</figure>'


def section(title: str, runs: Sequence[RunFacts], render, intro: str = "") -> str:
    cells = []
    for i, run in enumerate(runs):
        tag = ""
        if len(runs) > 1:
            color = plots.COLORS[i % len(plots.COLORS)]
            tag = f'<div class="run-tag" style="background:{color}">{esc(run.name)}</div>'
        try:
            content = render(run)
        except (AttributeError, KeyError, TypeError, ValueError, OSError) as exc:  # a file of an unexpected shape
            content = f'<p class="warn">could not show this part: {esc(type(exc).__name__)}: {esc(exc)}</p>'
        cells.append(f'<div class="cell">{tag}{content}</div>')
    return f"<h2>{esc(title)}</h2>{intro}" + f'<div class="row">{"".join(cells)}</div>'


# --- the sections ------------------------------------------------------------------------------------------
def overview(run: RunFacts) -> str:
    info, backbone, cfg = run.info, run.info.get("backbone") or {}, run.config
    backbone = backbone if isinstance(backbone, dict) else {"name": backbone}
    optim = cfg.get("optim") or {}
    budget = next((f"{cfg[k]} {k}" for k in ("steps", "epochs", "minutes") if cfg.get(k) is not None), None)
    parts = [f'<p class="sub">run dir <code>{esc(run.path)}</code></p><div class="blocks">']
    parts.append("<div><h3>Model and schedule</h3>" + kv_table([
        ("method", info.get("method")),
        ("backbone", backbone.get("name")),
        ("family", backbone.get("family")),
        ("parameters (M)", backbone.get("params_m")),
        ("input", f"{backbone['img_size']} px, {backbone.get('in_chans')} channel(s)" if "img_size" in backbone
         else None),
        ("patch / stride", backbone.get("patch_size")),
        ("features", backbone.get("num_features")),
        ("budget", budget),
        ("batch size", info.get("batch_size")),
        ("planned steps", info.get("total_steps")),
        ("lr / weight decay", f"{optim.get('lr')} / {optim.get('weight_decay')}" if "lr" in optim else None),
        ("precision", cfg.get("precision")),
        ("seed", cfg.get("seed")),
        ("k-NN monitor data", cfg.get("monitor_data")),
    ]) + "</div>")
    if run.pretrain:
        p = run.pretrain
        parts.append("<div><h3>Pre-training result</h3>" + kv_table([
            ("steps", p.get("steps")), ("images seen", p.get("images_seen")), ("minutes", p.get("minutes")),
            ("images / s", p.get("img_per_s")), ("final loss", p.get("final_loss")),
            ("checkpoint", Path(str(p["checkpoint"])).name if p.get("checkpoint") else None),
        ]) + "</div>")
    parts.append(f"<div><h3>Data</h3>{data_summary(run)}</div></div>")
    if run.log_problems:
        lines = "\n".join(line[:300] for line in run.log_problems)
        parts.append(f'<h3>Warnings in train.log</h3><pre class="warn">{esc(lines)}</pre>')
    parts += [note(text) for text in run.notes]
    return "".join(parts)


def data_summary(run: RunFacts) -> str:
    data = run.info.get("data")
    if not isinstance(data, dict):
        return note("run.json holds no data summary")
    classes = data.get("classes") or []
    parts = [kv_table([
        ("data", data.get("description")), ("images", data.get("num_images")),
        ("image size", f"{data.get('img_size')} px, {data.get('in_chans')} channel(s)"),
        ("classes", f"{data.get('num_classes', len(classes))} (labels unused in pre-training)" if classes else None),
        ("class names", classes or None), ("skipped files", data.get("num_skipped", 0)),
    ])]
    skipped = data.get("skipped") or []
    if skipped:
        rows = [(esc(s.get("path", "?")), esc(s.get("reason", ""))) for s in skipped if isinstance(s, dict)]
        more = data.get("num_skipped", len(skipped)) - len(skipped)
        parts.append(table(["skipped file", "reason"], rows) + (note(f"and {more} more") if more > 0 else ""))
    return "".join(parts)


def curves(run: RunFacts, keys: Sequence[str]) -> str:
    """The curves named in ``keys``; a placeholder of the same size where this run lacks one, so runs align."""
    if not run.metrics:
        return note("no metrics.jsonl records to draw")
    figs = []
    for key, title, _, _ in plots.CURVES:
        png = plots.curve_png(run.metrics, key) if key in keys else None
        if png is not None:
            figs.append(figure(png, title, show_caption=False))
        elif key in keys:
            figs.append(f'<div class="missing-fig">no {esc(title)} in this run</div>')
    missing = "" if any("knn_monitor" in r for r in run.metrics) else note(
        "no k-NN monitor in this run (pre-train with --monitor-data to get one)")
    return f'<div class="figs">{"".join(figs)}</div>{missing}'


BASELINE_INITS = ("scratch", "pixels")


def _is_baseline(e: dict[str, Any]) -> bool:
    return e.get("init") in BASELINE_INITS


def _eval_label(e: dict[str, Any]) -> str:
    if e.get("init") == "pixels":
        return f"raw pixels, {'logistic regression' if e.get('kind') == 'linear' else e.get('kind')}"
    return f"{e.get('kind')}, {e.get('init', 'pretrained')} {e.get('backbone') or ''}".strip()


def _top1_cell(e: dict[str, Any]) -> str:
    draws = e.get("draws") or 1
    if draws > 1 and isinstance(e.get("top1_std"), (int, float)):
        return f"{100 * e['top1']:.2f} ± {100 * e['top1_std']:.2f}% <small>({draws} draws)</small>"
    return f"{100 * e['top1']:.2f}%"


def strongest_baselines(evals: Sequence[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """For each number of labels, the baseline row (init scratch or pixels) with the highest mean top-1."""
    best: dict[Any, dict[str, Any]] = {}
    for e in evals:
        if _is_baseline(e) and (e.get("num_labels") not in best or e["top1"] > best[e.get("num_labels")]["top1"]):
            best[e.get("num_labels")] = e
    return best


def evaluation(run: RunFacts) -> str:
    """Every evaluation row with its spread over the label draws, error bars per label count, and each
    pre-trained row's gain over the strongest baseline with the same number of labels (marked)."""
    if not run.evals:
        return note(f"no evaluations yet: run `selfsight eval compare --run {run.path} ...` (or "
                    "`selfsight eval knn|linear|finetune`, with --init scratch|pixels for the baselines)")
    strongest = strongest_baselines(run.evals)
    order = lambda e: (e.get("num_labels") or 0, _is_baseline(e), KIND_ORDER.get(e.get("kind"), 9))
    ordered = sorted(run.evals, key=order)
    rows, classes, figs = [], [], []
    for e in ordered:
        best = strongest.get(e.get("num_labels"))
        gain = ""
        if e is best:
            gain = '<span class="strongest-mark">strongest baseline</span>'
        elif not _is_baseline(e) and best is not None:
            points = 100 * (e["top1"] - best["top1"])
            gain = f'<span class="gain-{"pos" if points >= 0 else "neg"}">{points:+.2f}</span>'
        rows.append((esc(e.get("kind", "?")), esc(e.get("init", "pretrained")), fmt(e.get("backbone")),
                     fmt(e.get("num_labels")), fmt(e.get("num_test")), _top1_cell(e), gain,
                     fmt(e.get("minutes")), f"<code>{esc(e.get('file', ''))}</code>"))
        classes.append(("scratch" + (" strongest" if e is best else "")) if _is_baseline(e) else "")
    for labels in sorted({e.get("num_labels") or 0 for e in ordered})[:3]:
        group = [e for e in ordered if (e.get("num_labels") or 0) == labels]
        bars = [(_eval_label(e), 100 * e["top1"], 100 * float(e.get("top1_std") or 0.0),
                 "strongest" if e is strongest.get(e.get("num_labels")) else
                 "baseline" if _is_baseline(e) else "pretrained") for e in group]
        png = plots.evaluation_png(bars, f"{labels:,} labels (hatched: strongest baseline)")
        if png is not None:
            figs.append(figure(png, f"evaluation with {labels} labels", show_caption=False))
    return "".join(figs) + table(
        ["kind", "init", "backbone", "labels", "test images", "top-1 (mean ± std)", "vs strongest baseline (points)",
         "minutes", "file"], rows, numeric=(3, 4, 5, 6, 7), row_classes=classes)


def matrix(labels_a: Sequence[Any], labels_b: Sequence[Any], values: Sequence[Sequence[float]]) -> str:
    """A similarity matrix with values in [0, 1] as a shaded table (rows labels_a, columns labels_b)."""
    head = "<tr><th></th>" + "".join(f"<th>{esc(b)}</th>" for b in labels_b) + "</tr>"
    body = ""
    for label, row in zip(labels_a, values):
        cells = "".join(
            f'<td style="background:rgba(31,119,180,{min(max(float(v), 0.0), 1.0):.2f});'
            f'color:{"#fff" if float(v) > 0.6 else "#1d2330"}">{float(v):.2f}</td>' for v in row)
        body += f"<tr><th>{esc(label)}</th>{cells}</tr>"
    return f'<table class="matrix">{head}{body}</table>'


def _cka(title: str, labels_a: Any, labels_b: Any, values: Any) -> str:
    try:
        if len(labels_a) > MAX_MATRIX or len(labels_b) > MAX_MATRIX:
            return f"<h3>{esc(title)}</h3>" + note(f"{len(labels_a)} x {len(labels_b)} matrix: see its plot")
        return f"<h3>{esc(title)}</h3>" + matrix(labels_a, labels_b, values)
    except (TypeError, ValueError):
        return f"<h3>{esc(title)}</h3>" + note("matrix not readable")


def diagnostics(run: RunFacts) -> str:
    """``RUN/diagnostics/diagnostics.json`` as ``selfsight diagnose`` writes it (see selfsight.diagnostics.api)."""
    diag = run.diagnostics
    if diag is None:
        return note(f"no diagnostics yet: run `selfsight diagnose {run.path}` to compute attention distance, "
                    "head diversity, CKA and reconstructions")
    known = {"attention", "attention_note", "reconstruction_note", "cka", "compare", "layers", "plots", "notes"}
    scalars = [(k, v) for k, v in diag.items() if k not in known and not isinstance(v, (dict, list))]
    for key in ("sample", "embedding", "reconstruction"):  # their scalar fields (not the point lists)
        if isinstance(diag.get(key), dict):
            scalars += [(f"{key} {k}", v) for k, v in diag[key].items() if not isinstance(v, (dict, list))]
    parts = [kv_table(scalars)]
    for key in ("attention_note", "reconstruction_note"):
        if diag.get(key):
            parts.append(f'<p class="warn">{esc(diag[key])}</p>')
    layers = diag.get("attention") or []
    if isinstance(layers, list) and layers:
        rows = [(esc(la.get("name", la.get("layer"))), fmt(la.get("num_heads")), fmt(la.get("mean_distance_px")),
                 fmt(la.get("mean_entropy")), fmt(la.get("head_diversity"))) for la in layers if isinstance(la, dict)]
        parts.append("<h3>Attention per layer</h3>" + table(
            ["layer", "heads", "mean distance (px)", "mean entropy", "head diversity"], rows, numeric=(1, 2, 3, 4)))
    names = diag.get("layers") or []
    if diag.get("cka"):
        parts.append(_cka("CKA between layers", names, names, diag["cka"]))
    for entry in diag.get("compare") or []:
        if isinstance(entry, dict) and entry.get("cka"):
            parts.append(_cka(f"CKA against {entry.get('run', '?')} (rows: this run)", names,
                              entry.get("layers", []), entry["cka"]))
    figs = []
    for key, name in (diag.get("plots") or {}).items():
        path = run.path / "diagnostics" / str(name)
        caption = str(key).replace("_", " ")
        figs.append(figure(path.read_bytes(), caption) if path.is_file() else note(f"{caption}: {name} is missing"))
    if figs:
        parts.append(f'<div class="figs">{"".join(figs)}</div>')
    return "".join(parts)


def config_block(run: RunFacts) -> str:
    if run.config_text is None:
        return note("no config.yaml")
    return f"<details><summary>config.yaml (repeat the run with --config)</summary><pre>{esc(run.config_text)}</pre>" \
           "</details>"


def compared(runs: Sequence[RunFacts]) -> str:
    pairs = [(run.name, run.metrics) for run in runs]
    figs = [figure(png, f"{key}: runs compared", show_caption=False)
            for key in plots.COMPARED if (png := plots.compare_png(pairs, key))]
    attention = [(run.name, (run.diagnostics or {}).get("attention") or []) for run in runs]
    figs += [figure(png, f"{key.replace('_', ' ')} per layer: runs compared", show_caption=False)
             for key, *_ in plots.LAYER_STATS if (png := plots.layers_png(attention, key))]
    if not figs:
        return ""
    return f'<h2>Runs compared</h2><div class="cell"><div class="figs">{"".join(figs)}</div></div>'


# --- the page ----------------------------------------------------------------------------------------------
def render_page(runs: Sequence[RunFacts], title: str) -> str:
    keys = [key for key, *_ in plots.CURVES if any(key in record for run in runs for record in run.metrics)]
    body = [
        f"<h1>{esc(title)}</h1>",
        f'<p class="sub">{len(runs)} run(s) &middot; written {esc(time.strftime("%Y-%m-%d %H:%M"))} by selfsight '
        f"{esc(selfsight.__version__)}</p>",
        section("Run and data", runs, overview),
        section("Training curves", runs, lambda run: curves(run, keys)),
        compared(runs) if len(runs) > 1 else "",
        section("Evaluation", runs, evaluation,
                note("top-1 on the test split, mean ± std over the label draws; baselines (init scratch: random "
                     "weights, pixels: raw pixels) are grey, the strongest one highlighted; a pre-trained row's gain "
                     "is over that strongest baseline")),
        section("Diagnostics", runs, diagnostics),
        section("Configuration", runs, config_block),
        '<footer>selfsight report: a single offline file. <span id="page-errors" hidden></span></footer>',
    ]
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style><script>{CHECK_SCRIPT}</script></head>\n"
        f'<body style="--n:{len(runs)}">\n' + "\n".join(part for part in body if part) + "\n</body></html>\n"
    )


def write_report(runs: Sequence[str | Path], out: str | Path, title: str | None = None) -> Path:
    """Write one self-contained HTML report of ``runs`` (run dirs, or a demo folder) to ``out``; returns its path.

    Raises ConfigError when a path is not a run dir. Missing optional files (metrics, evaluations,
    diagnostics) become notes in the page.
    """
    if not runs:
        raise ConfigError("report needs at least one run directory")
    facts = [collect_run(run) for run in runs]
    names = [run.name for run in facts]
    for run in facts:
        if names.count(run.name) > 1:  # two runs of the same name: tell them apart by their paths
            run.name = str(run.path)
    title = title or "selfsight report: " + ", ".join(run.name for run in facts)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    temp.write_text(render_page(facts, title), encoding="utf-8")
    os.replace(temp, out)
    return out
