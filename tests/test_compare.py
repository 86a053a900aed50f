"""``eval compare``: every row on the same draws, the strongest baseline and the gains over it."""

from __future__ import annotations

import json

import pytest
import torch
from test_eval import TINY_OPTS, TINY_VIT, tiny_backbone, tiny_images

from selfsight.cli import main
from selfsight.eval import api
from selfsight.eval.compare import ROWS, CompareConfig, compare, format_compare, summarize_rows

SMALL_CNN = {"channels": (8, 8, 16, 16), "layers": (1, 1, 1, 1)}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_run(monkeypatch, tmp_path):
    """A 'pre-trained run' (a tiny ViT) reading in-memory 'train' / 'test' sets."""
    sets = {"train": tiny_images(seed=0), "test": tiny_images(per_class=4, seed=1)}
    monkeypatch.setattr(api, "open_images", lambda spec, in_chans, img_size, **kw: sets[spec])
    info = {"mean": [0.4], "std": [0.25], "method": "simmim", "checkpoint": "fake.pt"}
    monkeypatch.setattr("selfsight.checkpoint.load_run_backbone", lambda run_dir: (tiny_backbone(seed=3), info))
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"backbone": {"name": TINY_VIT, "opts": TINY_OPTS}}))
    return run


def test_compare_runs_every_row_on_the_same_draws(tiny_run, capsys):
    cfg = CompareConfig(run=str(tiny_run), train_data="train", test_data="test", labels_per_class=3, draws=2,
                        tune=False, epochs=1, device="cpu", cnn_opts=SMALL_CNN, progress=False)
    result = compare(cfg)
    keys = [row["key"] for row in result["rows"]]
    assert keys == list(ROWS) and result["draws"] == 2 and result["seeds"] == [0, 1]
    baselines = [row for row in result["rows"] if row["baseline"]]
    strongest = max(baselines, key=lambda row: row["top1"])
    assert result["strongest_baseline"] == strongest["key"]
    for row in result["rows"]:
        assert len(row["top1_draws"]) == 2 and row["num_labels"] == 12
        assert row["top1"] == pytest.approx(sum(row["top1_draws"]) / 2)
        if not row["baseline"]:
            assert result["gains"][row["key"]] == pytest.approx(100 * (row["top1"] - strongest["top1"]))
    by_key = {row["key"]: row for row in result["rows"]}
    assert by_key["scratch_cnn"]["backbone"] == "resnet18" and by_key["raw_logreg"]["backbone"] == "pixels"
    names = {row["key"]: row["file"].rsplit("/", 1)[-1] for row in result["rows"]}
    assert names["scratch_same"] == "eval_finetune_scratch_12.json"
    assert names["scratch_cnn"] == "eval_finetune_scratch_resnet18_12.json"
    assert names["raw_knn"] == "eval_knn_pixels_12.json" and names["finetune"] == "eval_finetune_12.json"
    saved = json.loads((tiny_run / "compare_12.json").read_text())
    assert saved["strongest_baseline"] == result["strongest_baseline"] and len(saved["rows"]) == 7
    assert "<- strongest baseline" in capsys.readouterr().out


def test_summarize_rows_and_table_by_hand():
    rows = [
        {"key": "finetune", "label": "fine-tune", "baseline": False, "top1": 0.80, "top1_std": 0.01},
        {"key": "raw_logreg", "label": "raw LR", "baseline": True, "top1": 0.78, "top1_std": 0.005},
        {"key": "scratch_cnn", "label": "CNN", "baseline": True, "top1": 0.77, "top1_std": 0.02},
    ]
    result = {**summarize_rows(rows), "num_labels": 600, "draws": 3}
    assert result["strongest_baseline"] == "raw_logreg"
    assert result["gains"] == {"finetune": pytest.approx(2.0)}
    text = format_compare(result)
    assert "80.00 ± 1.00%" in text and "+2.00" in text and "raw LR" in text.splitlines()[-1]


def test_compare_from_the_command_line_rejects_row_options(tmp_path, capsys):
    code = main(["eval", "compare", "--run", str(tmp_path), "--lr", "1e-3"])
    assert code == 2 and "--lr" in capsys.readouterr().err
    assert main(["eval", "compare"]) == 2


def test_demo_summary_keeps_the_old_keys_and_adds_draws_and_baselines(tmp_path):
    from types import SimpleNamespace

    from selfsight.demo import build_summary, format_table

    record = tmp_path / "eval_finetune_600.json"
    record.write_text(json.dumps({"num_test": 10000}))
    keys = ("knn", "linear", "finetune", "raw_logreg", "raw_knn", "scratch_same", "scratch_cnn")
    tops = (0.5, 0.68, 0.74, 0.777, 0.726, 0.60, 0.78)
    rows = [{"key": k, "label": ROWS[k][0], "baseline": ROWS[k][2], "top1": t, "top1_std": 0.01,
             "top1_draws": [t - 0.01, t, t + 0.01], "minutes": 1.0, "file": str(record)} for k, t in zip(keys, tops)]
    result = {**summarize_rows(rows), "num_labels": 600, "draws": 3, "seeds": [0, 1, 2]}
    cfg = SimpleNamespace(method="simmim", backbone="vit_tiny_patch16_224", backbone_opts={"img_size": 28})
    pretrained = {"minutes": 8.0, "steps": 1000, "images_seen": 128000, "img_per_s": 266.0}
    summary = build_summary(cfg, pretrained, tmp_path / "pretrain", result)
    e = summary["eval"]
    for key in ("labels", "test_images", "knn_top1", "linear_top1", "finetune_top1", "scratch_finetune_top1",
                "finetune_minutes"):  # the keys of the old summary
        assert key in e
    assert e["draws"] == 3 and e["finetune_top1_std"] == 0.01 and e["test_images"] == 10000
    assert summary["baselines"] == {"raw_logreg_top1": 0.777, "raw_knn_top1": 0.726, "scratch_same_top1": 0.60,
                                    "scratch_cnn_top1": 0.78}
    assert e["strongest_baseline"] == "scratch_cnn" and e["gain_over_strongest_points"] == pytest.approx(-4.0)
    summary["eval"]["finetune_epochs"] = 20
    text = format_table(summary, result)
    assert "1000 steps" in text and "<- strongest baseline" in text and "20 epochs" in text


def test_eval_compare_end_to_end_from_the_command_line(idx_dir, tmp_path, capsys):
    """A real (tiny) pre-training run and IDX data on disk, through `selfsight eval compare`."""
    from conftest import TINY_VIT_OPTS

    run = tmp_path / "run"
    args = ["pretrain", "--backbone", "vit_tiny_patch16_224", "--data", f"{idx_dir}:train", "--out", str(run),
            "--steps", "2", "--batch-size", "32", "--no-progress", "--device", "cpu"]
    for opt in TINY_VIT_OPTS:
        args += ["--backbone-opt", opt]
    assert main(args) == 0
    capsys.readouterr()
    code = main(["eval", "compare", "--run", str(run), "--train-data", f"{idx_dir}:train", "--test-data",
                 f"{idx_dir}:test", "--labels-per-class", "4", "--draws", "2", "--no-tune", "--epochs", "1",
                 "--device", "cpu", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "<- strongest baseline" in out and "scratch, resnet18" in out
    saved = json.loads((run / "compare_16.json").read_text())
    assert saved["draws"] == 2 and len(saved["rows"]) == len(ROWS)
    assert all(len(row["top1_draws"]) == 2 for row in saved["rows"])
    cnn = json.loads((run / "eval_finetune_scratch_resnet18_16.json").read_text())
    assert cnn["backbone_opts"]["in_chans"] == 1 and cnn["img_size"] == 16 and not cnn["tuned"]


def test_demo_presets_build_and_match_the_command_line():
    """Every `selfsight demo --method` choice is a preset (the first the default) whose method accepts its backbone,
    and the default SparK preset masks a grid finer than one cell (the dilated narrow ResNet-18 at 32 px)."""
    import torch

    from selfsight.backbones import Backbone
    from selfsight.cli import DEMO_METHODS
    from selfsight.demo import DEMO_METHOD, DEMO_PRESETS
    from selfsight.methods.spark import SparK

    assert DEMO_METHODS == list(DEMO_PRESETS) and DEMO_METHODS[0] == DEMO_METHOD == "spark"
    preset = DEMO_PRESETS["spark"]
    backbone = Backbone(preset.backbone, preset.backbone_opts)
    method = SparK(backbone, SparK.Config(), [0.5], [0.25])
    assert backbone.encoder_stride == 8 and method.grid == (4, 4) and method.num_kept == 6  # round(16 * 0.4)
    out = method.training_step(torch.rand(2, 1, 32, 32), torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)


def test_demo_seed_reaches_the_pre_training_and_the_label_draws(idx_dir, tmp_path, monkeypatch):
    """`selfsight demo --seed 3` pre-trains with seed 3 and draws labels 3, 4, 5: an independent repeat (the
    pre-training, comparison, diagnostics and report are stubbed; only what the demo hands them is checked)."""
    import selfsight.demo as demo
    from selfsight.cli import main

    seen = {}

    def fake_pretrain(cfg, resume=False):
        seen["pretrain_seed"] = cfg.seed
        return {"steps": 1, "minutes": 0.0, "images_per_sec": 1.0}

    def fake_compare(cfg):
        seen["compare_seed"] = cfg.seed
        raise RuntimeError("stop after the comparison's config")

    monkeypatch.setattr(demo, "pretrain", fake_pretrain)
    monkeypatch.setattr(demo, "compare", fake_compare)
    with pytest.raises(RuntimeError, match="stop after"):
        main(["demo", "--out", str(tmp_path / "d"), "--data-dir", str(idx_dir), "--seed", "3", "--steps", "1"])
    assert seen == {"pretrain_seed": 3, "compare_seed": 3}
    with pytest.raises(RuntimeError, match="stop after"):
        main(["demo", "--out", str(tmp_path / "e"), "--data-dir", str(idx_dir), "--steps", "1"])
    assert seen == {"pretrain_seed": 0, "compare_seed": 0}
