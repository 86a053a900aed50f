"""The HTML report: self-contained (every image a data: URI, nothing fetched), complete, and clean in a browser.

The browser checks open the page in headless Chromium (Debian's ``chromium``; ``scripts/ensure_chromium.sh``
installs it): no console message at all, no script or resource error recorded by the page itself, every
image decoded, and a screenshot saved. Without Chromium they are skipped, unless SELFSIGHT_REQUIRE_CHROMIUM=1.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import TINY_VIT
from PIL import Image

from selfsight.config import build_config
from selfsight.diagnostics import diagnose
from selfsight.engine import pretrain
from selfsight.errors import ConfigError
from selfsight.eval.api import EvalConfig, evaluate
from selfsight.report import write_report
from selfsight.report.html import CHECK_SCRIPT

CHROMIUM_TIMEOUT_S = 60
IMG_SRC = re.compile(r"<img\b[^>]*?\bsrc=\"([^\"]*)\"", re.IGNORECASE)
EXTERNAL_REF = re.compile(r"""\b(?:src|href|action|poster)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)
#: how this Chromium prints a page's console messages with --enable-logging=stderr:
#: [pid:tid:date:INFO:CONSOLE:4] "Uncaught ReferenceError: ...", source: file:///... (4)
CONSOLE_LINE = re.compile(r"CONSOLE[:(]")


def tiny_run(idx_dir: Path, out: Path, **kw) -> Path:
    options = dict(backbone=TINY_VIT[0], backbone_opts=TINY_VIT[1], data=f"{idx_dir}:train", out=str(out), steps=4,
                   batch_size=32, log_every=1, ckpt_every=100, device="cpu", num_workers=0)
    options.update(kw)
    pretrain(build_config(None, None, **options), progress=False)
    return out


@pytest.fixture(scope="module")
def runs(idx_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A monitored run with real k-NN evaluations (pre-trained and scratch) and diagnostics, and a demo folder."""
    root = tmp_path_factory.mktemp("report_runs")
    monitored = tiny_run(idx_dir, root / "monitored", monitor_data=f"{idx_dir}:test", monitor_every=2,
                         monitor_size=64)
    data = dict(train_data=f"{idx_dir}:train", test_data=f"{idx_dir}:test", labels_per_class=4, device="cpu")
    evaluate(EvalConfig(kind="knn", run=str(monitored), **data))
    evaluate(EvalConfig(kind="knn", run=str(monitored), init="scratch", out=str(monitored), **data))

    demo = root / "demo"  # the layout `selfsight demo --out demo` leaves: evaluations next to demo/pretrain
    tiny_run(idx_dir, demo / "pretrain", steps=3, seed=1)
    # real diagnostics (what `selfsight diagnose RUN --compare RUN2` writes), so the report follows their schema
    diagnose(monitored, data=f"{idx_dir}:test", compare=[demo / "pretrain"], num_images=16, device="cpu",
             progress=False)
    for name, init, top1 in (("eval_finetune_16.json", "pretrained", 0.75), ("eval_finetune_scratch_16.json",
                                                                              "scratch", 0.5)):
        record = {"kind": "finetune", "init": init, "backbone": TINY_VIT[0], "num_labels": 16, "num_test": 64,
                  "top1": top1, "minutes": 0.01}
        (demo / name).write_text(json.dumps(record))
    summary = {"pretrain": {"run": str(demo / "pretrain")}, "eval": {"labels": 16, "finetune_top1": 0.75}}
    (demo / "summary.json").write_text(json.dumps(summary))
    return {"monitored": monitored, "demo": demo}


# --- static checks ------------------------------------------------------------------------------------------
def check_self_contained(html: str) -> list[str]:
    """Every <img> src decoded from its data: URI; nothing that a browser would fetch."""
    assert not EXTERNAL_REF.search(html), EXTERNAL_REF.search(html).group(0)
    assert "<link" not in html.lower() and "url(" not in html and "@import" not in html
    assert not re.search(r"<script\b[^>]*\bsrc=", html, re.IGNORECASE)
    sources = IMG_SRC.findall(html)
    assert sources and html.count("<img") == len(sources)
    for src in sources:
        assert src.startswith("data:image/png;base64,"), src[:60]
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
            image.verify()
    return sources


def test_report_of_one_run_holds_every_section(runs, tmp_path):
    out = write_report([runs["monitored"]], tmp_path / "sub" / "report.html")
    assert out == tmp_path / "sub" / "report.html"
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # written atomically
    html = out.read_text()
    sources = check_self_contained(html)
    for section in ("<h2>Run and data</h2>", "<h3>Data</h3>", "<h2>Training curves</h2>", "<h2>Evaluation</h2>",
                    "<h2>Diagnostics</h2>", "<h2>Configuration</h2>"):
        assert section in html
    for alt in ("training loss", "learning rate", "throughput", "k-NN monitor (held-out top-1)"):
        assert f'alt="{alt}"' in html
    assert "<details><summary>config.yaml" in html and "monitor_every: 2" in html
    assert "256" in html and "skipped files" in html  # the data summary: 256 training images, 0 skipped
    # the evaluation table: a pre-trained and a scratch k-NN row (the strongest, and only, baseline), each the
    # mean ± std over the default 3 label draws, the gain in points between them, and a chart with error bars
    assert re.search(r"<tr><td>knn</td><td>pretrained</td>", html)
    assert re.search(r'<tr class="scratch strongest"><td>knn</td><td>scratch</td>', html)
    assert "vs strongest baseline (points)" in html and re.search(r'class="gain-(pos|neg)">[+-]\d+\.\d\d<', html)
    assert re.search(r"\d+\.\d\d ± \d+\.\d\d% <small>\(3 draws\)</small>", html)
    assert 'alt="evaluation with 16 labels"' in html
    # the diagnostics: per-layer attention table, CKA matrices, sample facts, every plot diagnose listed
    diag = json.loads((runs["monitored"] / "diagnostics" / "diagnostics.json").read_text())
    assert "Attention per layer" in html and "head diversity" in html
    assert f"{diag['attention'][1]['mean_distance_px']:.4g}" in html
    assert "CKA between layers" in html and f"CKA against {runs['demo'] / 'pretrain'}" in html
    assert "sample num_images" in html
    for key in diag["plots"]:
        caption = key.replace("_", " ")
        assert f'alt="{caption}"' in html and f"<figcaption>{caption}</figcaption>" in html
    # loss, k-NN monitor, lr, throughput, grad norm, the evaluation chart + diagnostics
    assert len(sources) == 6 + len(diag["plots"])
    assert "Runs compared" not in html


def test_two_runs_side_by_side_with_a_demo_folder(runs, tmp_path):
    out = write_report([runs["monitored"], runs["demo"]], tmp_path / "two.html", title="two <runs>")
    html = out.read_text()
    check_self_contained(html)
    assert "<title>two &lt;runs&gt;</title>" in html and 'style="--n:2"' in html
    assert html.count('class="run-tag"') == 5 * 2  # each of the five sections has one cell per run
    assert "no k-NN monitor (held-out top-1) in this run" in html  # a placeholder keeps the curves aligned
    assert "monitored" in html and "demo/pretrain" in html  # the demo folder resolves to its pre-training run
    assert "Runs compared" in html and 'alt="loss: runs compared"' in html
    # the demo's evaluations, written next to its pretrain/ folder, show in that run's column
    assert re.search(r'<tr class="scratch strongest"><td>finetune</td><td>scratch</td>', html)
    assert '<span class="gain-pos">+25.00</span>' in html
    assert f"selfsight diagnose {runs['demo'] / 'pretrain'}" in html  # no diagnostics there: how to make them


def test_missing_files_are_notes_and_a_non_run_dir_is_an_error(runs, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(runs["monitored"] / "run.json", bare / "run.json")
    html = write_report([bare], tmp_path / "bare.html").read_text()
    for text in ("no config.yaml", "no pretrain.json", "no metrics", "no evaluations yet", "no diagnostics yet"):
        assert text in html
    assert "<img" not in html

    # diagnostics of an unexpected shape spoil only their own cell
    (bare / "diagnostics").mkdir()
    (bare / "diagnostics" / "diagnostics.json").write_text(json.dumps({"plots": ["a.png"], "attention": "n/a"}))
    html = write_report([bare], tmp_path / "bare.html").read_text()
    assert "could not show this part: AttributeError" in html and "<h2>Configuration</h2>" in html

    # a demo folder whose eval_*.json files are gone: the rows come from its summary.json
    demo = tmp_path / "demo"
    (demo / "pretrain").mkdir(parents=True)
    shutil.copy(runs["monitored"] / "run.json", demo / "pretrain" / "run.json")
    summary = {"pretrain": {"run": "runs/demo/pretrain"},
               "eval": {"labels": 600, "test_images": 10000, "finetune_top1": 0.759, "scratch_finetune_top1": 0.578}}
    (demo / "summary.json").write_text(json.dumps(summary))
    html = write_report([demo], tmp_path / "demo.html").read_text()
    assert re.search(r'<tr class="scratch strongest"><td>finetune</td><td>scratch</td>.*57\.80%', html)
    assert '<span class="gain-pos">+18.10</span>' in html
    # a newer summary.json also holds the baselines and the fine-tuning spread: the strongest is marked
    summary["eval"].update({"draws": 3, "finetune_top1_std": 0.004})
    summary["baselines"] = {"raw_logreg_top1": 0.78, "raw_knn_top1": 0.73, "scratch_same_top1": 0.578,
                            "scratch_cnn_top1": 0.77}
    (demo / "summary.json").write_text(json.dumps(summary))
    html = write_report([demo], tmp_path / "demo.html").read_text()
    assert re.search(r'<tr class="scratch strongest"><td>linear</td><td>pixels</td>.*78\.00%', html)
    assert "75.90 ± 0.40% <small>(3 draws)</small>" in html and '<span class="gain-neg">-2.10</span>' in html

    for path, why in ((tmp_path / "empty", "no run.json"), (tmp_path / "nowhere", "does not exist")):
        path.mkdir() if why == "no run.json" else None
        with pytest.raises(ConfigError, match=why) as info:
            write_report([path], tmp_path / "x.html")
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "x.html").exists()


# --- in a browser ---------------------------------------------------------------------------------------------
def chromium_or_skip() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        reason = "chromium is not installed (scripts/ensure_chromium.sh installs Debian's package)"
        if os.environ.get("SELFSIGHT_REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"{reason}, and SELFSIGHT_REQUIRE_CHROMIUM=1 asks for the browser test")
        pytest.skip(reason)
    return binary


def open_in_chromium(page: Path, screenshot: Path, profile: Path) -> dict:
    """Load ``page`` twice in headless Chromium: dump the DOM after the load event, then take a screenshot.

    Returns the page's own load marks (``data-images-loaded``, ``data-errors``) and every console line.
    """
    binary = chromium_or_skip()
    common = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
              "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}"]
    runs = [
        subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                       timeout=CHROMIUM_TIMEOUT_S),
        subprocess.run([*common, f"--screenshot={screenshot}", "--window-size=1400,2000", page.as_uri()],
                       capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S),
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    dom = runs[0].stdout
    images = re.search(r'<body[^>]*\bdata-images-loaded="(\d+)/(\d+)"', dom)
    errors = re.search(r'<body[^>]*\bdata-errors="(\d+)"', dom)
    assert images and errors, "the page's load check did not run: " + dom[:300]
    console = [line for run in runs for line in run.stderr.splitlines() if CONSOLE_LINE.search(line)]
    return {"loaded": int(images.group(1)), "images": int(images.group(2)), "errors": int(errors.group(1)),
            "console": console, "dom": dom}


def test_report_opens_in_chromium_without_errors(runs, tmp_path):
    single = write_report([runs["monitored"]], tmp_path / "single.html")
    double = write_report([runs["monitored"], runs["demo"]], tmp_path / "double.html")
    for page in (single, double):
        screenshot = tmp_path / f"{page.stem}.png"
        seen = open_in_chromium(page, screenshot, tmp_path / "profile")
        assert seen["console"] == [], seen["console"]
        assert seen["errors"] == 0, re.search(r'id="page-errors"[^>]*>([^<]*)', seen["dom"])
        assert seen["images"] == page.read_text().count("<img") > 0
        assert seen["loaded"] == seen["images"]
        with Image.open(screenshot) as image:
            assert image.size == (1400, 2000)
            assert len(image.convert("L").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50  # not blank
        if os.environ.get("SELFSIGHT_KEEP_SCREENSHOT"):
            keep = Path("runs") / ("test_report_screenshot.png" if page == single else
                                   "test_report_screenshot_two_runs.png")
            keep.parent.mkdir(exist_ok=True)
            shutil.copy(screenshot, keep)


def test_browser_check_catches_a_broken_page(tmp_path):
    """The checks above are not vacuous: a script error, a console error and a missing image are all seen."""
    page = tmp_path / "broken.html"
    page.write_text(f"<!DOCTYPE html><html><head><script>{CHECK_SCRIPT}</script></head><body>"
                    '<img src="missing.png"><script>console.error("boom"); notDefined();</script></body></html>')
    seen = open_in_chromium(page, tmp_path / "broken.png", tmp_path / "profile")
    assert (seen["loaded"], seen["images"]) == (0, 1)
    assert seen["errors"] == 2  # the missing image and the uncaught ReferenceError
    assert any('"boom"' in line for line in seen["console"])
    assert any("Uncaught ReferenceError" in line for line in seen["console"])


def test_attention_per_layer_overlaid_when_two_runs_have_it(runs, tmp_path):
    twin = tmp_path / "twin"
    shutil.copytree(runs["monitored"], twin)
    html = write_report([runs["monitored"], twin], tmp_path / "pair.html").read_text()
    check_self_contained(html)
    for key in ("mean distance px", "head diversity", "mean entropy"):
        assert f'alt="{key} per layer: runs compared"' in html
    alone = write_report([runs["monitored"], runs["demo"]], tmp_path / "alone.html").read_text()
    assert "per layer: runs compared" not in alone  # one run with attention: nothing to overlay
