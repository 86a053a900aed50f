"""The Python API: the same runs as the command line, keyword arguments, the same clear exceptions."""

import subprocess
import sys

import pytest
import torch
from conftest import TINY_VIT, TINY_VIT_OPTS

import selfsight
from selfsight.cli import main
from selfsight.errors import CheckpointError, ConfigError, DataError


@pytest.fixture(scope="module")
def tiny_run(idx_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("api") / "run"
    summary = selfsight.pretrain(f"{idx_dir}:train", run, method="simmim", backbone=TINY_VIT[0],
                                 backbone_opts=TINY_VIT_OPTS, steps=3, batch_size=32, device="cpu",
                                 precision="fp32", progress=False, overrides={"lr": 1e-3, "mask_ratio": 0.5})
    return run, summary


def test_import_is_lazy():
    code = "import sys, selfsight; print('torch' in sys.modules, callable(selfsight.load_backbone))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]


def test_pretrain_returns_the_summary_and_records_the_options(tiny_run):
    run, summary = tiny_run
    assert summary["steps"] == 3 and summary["auto"] == []  # a named backbone: nothing chosen
    config = (run / "config.yaml").read_text()
    assert "lr: 0.001" in config and "mask_ratio: 0.5" in config and "embed_dim: 32" in config


def test_evaluate_wraps_every_protocol(tiny_run, idx_dir):
    run, _ = tiny_run
    data = {"train_data": f"{idx_dir}:train", "test_data": f"{idx_dir}:test", "labels_per_class": 8, "device": "cpu"}
    record = selfsight.evaluate("knn", run, draws=2, tune=False, progress=False, k=5, **data)
    assert record["kind"] == "knn" and len(record["top1_draws"]) == 2 and 0.0 <= record["top1"] <= 1.0
    assert (run / "eval_knn_32.json").is_file()
    scratch = selfsight.evaluate("finetune", init="scratch", backbone=TINY_VIT[0], backbone_opts=TINY_VIT_OPTS,
                                 epochs=1, draws=1, tune=False, out=run.parent / "scratch", progress=False, **data)
    assert scratch["init"] == "scratch" and scratch["backbone_opts"]["embed_dim"] == 32
    with pytest.raises(ConfigError, match="unknown option.*no_such_option"):
        selfsight.evaluate("knn", run, no_such_option=1, **data)
    with pytest.raises(ConfigError, match="needs run"):
        selfsight.evaluate("compare", **data)


def test_export_and_load_backbone_agree(tiny_run, tmp_path):
    run, _ = tiny_run
    info = selfsight.export(run, tmp_path / "export")
    assert info["architecture"] == TINY_VIT[0] and (tmp_path / "export" / "README.md").is_file()
    from_run, from_export = selfsight.load_backbone(run), selfsight.load_backbone(tmp_path / "export")
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(from_run(x), from_export(x)) and from_run(x).shape == (2, 32)
    assert from_export.pretrained_cfg["input_size"] == (1, 16, 16)
    assert from_export.pretrained_cfg["mean"] == from_run.pretrained_cfg["mean"] and not from_export.training
    import timm

    assert timm.data.resolve_model_data_config(from_export)["std"] == from_export.pretrained_cfg["std"]
    classifier = selfsight.load_backbone(tmp_path / "export", num_classes=5)
    assert classifier(x).shape == (2, 5)
    with pytest.raises(CheckpointError, match="neither a selfsight run directory"):
        selfsight.load_backbone(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        selfsight.load_backbone(tmp_path / "nope")


def test_errors_are_the_clear_exceptions(tmp_path):
    with pytest.raises(DataError, match="nope"):
        selfsight.pretrain(tmp_path / "nope", tmp_path / "run", steps=1)
    with pytest.raises(ConfigError, match="give one budget"):
        selfsight.pretrain(tmp_path, tmp_path / "run", backbone="resnet18", steps=1, minutes=1.0)
    with pytest.raises(ConfigError, match="resume needs out"):
        selfsight.pretrain(resume=True)


def test_methods_lists_papers_backbones_and_defaults(capsys):
    found = {m["name"]: m for m in selfsight.describe_methods()}
    assert "Chen et al. 2020" in found["simclr"]["paper"] and found["simclr"]["defaults"]["temperature"] == 0.2
    assert found["simmim"]["backbones"].startswith("ViT, Swin, SwinV2")
    assert all(m["backbones"] == "see README" for name, m in found.items() if name not in
               selfsight.api.SUPPORTED_BACKBONES)
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "simclr\n  paper:     SimCLR (Chen et al. 2020" in out and "temperature=0.2" in out
    assert out.count("backbones:") == len(found)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"selfsight {selfsight.__version__}"


def test_paths_with_a_tilde_are_expanded(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "images").mkdir()
    for i in range(8):
        Image.new("L", (20, 20), 30 * i).save(tmp_path / "images" / f"{i}.png")
    summary = selfsight.pretrain("~/images", "~/run", steps=1, device="cpu", precision="fp32", progress=False)
    assert summary["run_dir"] == str(tmp_path / "run") and "1 input channel" in summary["auto"][0]
    info = selfsight.export("~/run", "~/exported")
    assert info["card"] == str(tmp_path / "exported" / "README.md")
    assert selfsight.load_backbone("~/exported").pretrained_cfg["input_size"] == (1, 32, 32)
