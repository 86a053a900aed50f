"""Where a run's numbers go: metrics.jsonl always, TensorBoard on request."""

import json
import sys

from conftest import TINY_VIT, TINY_VIT_OPTS

from selfsight.cli import main
from selfsight.config import build_config
from selfsight.engine import pretrain


def test_tensorboard_holds_the_logged_scalars_and_the_views(idx_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = build_config(
        None, None, backbone=TINY_VIT[0], backbone_opts=TINY_VIT[1], data=f"{idx_dir}:train", out=str(run),
        steps=4, batch_size=32, log_every=2, device="cpu", num_workers=0, precision="fp32", logger="tensorboard",
        monitor_data=f"{idx_dir}:test", monitor_every=2, monitor_size=64,
    )
    pretrain(cfg, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = events.Tags()
    for name in ("loss", "lr", "img_per_s", "epoch", "grad_norm", "skipped_steps"):
        logged = [(r["step"], r[name]) for r in records if name in r]
        read = [(e.step, e.value) for e in events.Scalars(f"train/{name}")]
        assert [s for s, _ in read] == [s for s, _ in logged] == [2, 4]
        assert all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for (_, a), (_, b) in zip(read, logged))  # float32 events
    knn = [(r["step"], r["knn_monitor"]) for r in records if "knn_monitor" in r]
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("monitor/knn")] == [(s, round(v, 5)) for s, v in knn]
    assert "views" in tags["images"] and (run / "views.png").is_file()
    # SimMIM reconstructs: 8 images x (original | masked | reconstruction) at the start and at the end
    reconstructions = events.Images("reconstructions")
    assert [e.step for e in reconstructions] == [0, 4]
    assert (reconstructions[0].height, reconstructions[0].width) == (8 * 16, 3 * 16)


def test_missing_tensorboard_is_a_one_line_error(idx_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    args = ["pretrain", "--backbone", TINY_VIT[0], *[a for opt in TINY_VIT_OPTS for a in ("--backbone-opt", opt)],
            "--data", f"{idx_dir}:train", "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "32",
            "--no-progress", "--device", "cpu", "--precision", "fp32", "logger=tensorboard"]
    assert main(args) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("selfsight: error:")]
    assert len(lines) == 1 and "pip install 'selfsight[tensorboard]'" in lines[0]
