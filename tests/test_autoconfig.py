"""`selfsight pretrain --data FOLDER --out RUN` with nothing else: options chosen from the images, printed,
recorded in config.yaml, overridden by every flag given."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import selfsight
from selfsight.autoconfig import budget_minutes, choose_defaults, input_size, inspect_data
from selfsight.cli import main
from selfsight.errors import DataError


def write_folder(root: Path, count: int, mode: str, size: tuple[int, int] = (24, 20), seed: int = 0) -> Path:
    """``count`` random images of ``size`` (width, height) px: mode RGB, L, or "rgb-gray" (RGB, equal channels)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    width, height = size
    for i in range(count):
        if mode == "RGB":
            image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
        else:
            gray = rng.integers(0, 256, (height, width), dtype=np.uint8)
            image = Image.fromarray(gray, "L")
            if mode == "rgb-gray":
                image = image.convert("RGB")
        image.save(root / f"{i:03d}.png")
    return root


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(("mode", "channels"), [("RGB", 3), ("L", 1)])
def test_one_line_on_a_folder_chooses_from_the_images_and_trains(tmp_path, capsys, mode, channels):
    folder = write_folder(tmp_path / "images", 40, mode)
    run = tmp_path / "run"
    code, out, err = run_cli(["pretrain", "--data", str(folder), "--out", str(run), "--steps", "2",
                              "--no-progress", "--device", "cpu", "--precision", "fp32"], capsys)
    assert code == 0, err
    auto = [line for line in out.splitlines() if line.startswith("auto: ")]
    assert len(auto) == 2, out
    assert f"{channels} input channel" in auto[0] and "32 px" in auto[0] and "median shorter side 20 px" in auto[0]
    assert "simclr on a narrow resnet18" in auto[1] and "batch 32" in auto[1]
    assert "done: 2 steps" in out
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["method"] == "simclr" and config["backbone"] == "resnet18"
    assert config["backbone_opts"]["in_chans"] == channels and config["backbone_opts"]["img_size"] == 32
    assert config["backbone_opts"]["layers"] == [1, 1, 1, 1]
    assert config["batch_size"] == 32 and config["steps"] == 2 and config["minutes"] is None
    assert config["method_config"]["crop_scale"] == [0.5, 1.0]

    code, out, err = run_cli(["export", str(run), "--out", str(tmp_path / "exported")], capsys)
    assert code == 0, err
    import torch

    for source in (run, tmp_path / "exported"):
        model = selfsight.load_backbone(source)
        assert model.pretrained_cfg["input_size"] == (channels, 32, 32)
        assert len(model.pretrained_cfg["mean"]) == channels
        assert model(torch.zeros(2, channels, 32, 32)).shape == (2, 256)


def test_the_recorded_choice_repeats_the_run(tmp_path, capsys):
    folder = write_folder(tmp_path / "images", 40, "RGB")
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--no-progress", "--device", "cpu", "--precision", "fp32"]
    code, out, _ = run_cli(["pretrain", "--data", str(folder), "--out", str(first), "--steps", "2", *common], capsys)
    assert code == 0
    code, out, _ = run_cli(["pretrain", "--config", str(first / "config.yaml"), "--out", str(second), *common], capsys)
    assert code == 0 and "auto:" not in out  # a config file is explicit: nothing chosen again
    one, two = (yaml.safe_load((run / "config.yaml").read_text()) for run in (first, second))
    assert {**one, "out": None} == {**two, "out": None}
    import json

    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (first, second)]
    assert losses[0] == losses[1]


def test_flags_given_are_kept_and_only_the_rest_is_chosen(tmp_path):
    folder = write_folder(tmp_path / "images", 40, "L")
    choice = choose_defaults(str(folder), {"method", "batch_size", "steps"}, device="cpu", method="byol")
    assert "method" not in choice.options and "batch_size" not in choice.options and "minutes" not in choice.options
    assert choice.options["backbone"] == "resnet18" and choice.overrides == []  # SimCLR's recipe is SimCLR's
    masked = choose_defaults(str(folder), {"method"}, device="cpu", method="simmim")
    assert masked.options["backbone"].startswith("vit_")
    assert masked.options["backbone_opts"]["in_chans"] == 1 and masked.options["backbone_opts"]["img_size"] == 32
    assert masked.options["minutes"] == 5.0 and masked.options["batch_size"] == 32
    # a named backbone or a configuration file: the user chose the architecture, nothing is chosen
    assert choose_defaults(str(folder), {"backbone"}, device="cpu").options == {}
    assert choose_defaults(str(folder), {"config"}, device="cpu").lines == []
    assert choose_defaults(None, (), device="cpu").options == {}


def test_explicit_flags_override_on_the_command_line(tmp_path, capsys):
    folder = write_folder(tmp_path / "images", 20, "RGB")
    run = tmp_path / "run"
    code, out, err = run_cli(["pretrain", "--data", str(folder), "--out", str(run), "--steps", "1", "--method", "byol",
                              "--batch-size", "8", "--no-progress", "--device", "cpu", "--precision", "fp32",
                              "method.proj_hidden_dim=64", "method.pred_hidden_dim=64"], capsys)
    assert code == 0, err
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["method"] == "byol" and config["batch_size"] == 8 and config["backbone"] == "resnet18"
    assert config["method_config"]["proj_hidden_dim"] == 64 and config["backbone_opts"]["in_chans"] == 3

    # --backbone-opt without --backbone adjusts the chosen backbone
    code, out, err = run_cli(["pretrain", "--data", str(folder), "--out", str(tmp_path / "opt"), "--steps", "1",
                              "--backbone-opt", "img_size=16", "--no-progress", "--device", "cpu",
                              "--precision", "fp32"], capsys)
    assert code == 0, err
    assert "16 px (given)" in out
    config = yaml.safe_load((tmp_path / "opt" / "config.yaml").read_text())
    assert config["backbone"] == "resnet18" and config["backbone_opts"]["img_size"] == 16
    assert config["backbone_opts"]["layers"] == [1, 1, 1, 1] and config["method"] == "simclr"


def test_gray_stored_as_rgb_counts_as_gray_and_sizes_follow_the_images(tmp_path, idx_dir):
    facts = inspect_data(str(write_folder(tmp_path / "scans", 10, "rgb-gray", size=(100, 80))))
    assert facts.in_chans == 1 and facts.short_side == 80 and facts.num_images == 10
    mixed = write_folder(tmp_path / "mixed", 10, "L")
    Image.new("RGB", (30, 30), (200, 10, 10)).save(mixed / "red.png")
    assert inspect_data(str(mixed)).in_chans == 3
    from selfsight.data.pack import pack_folder

    pack_folder(str(mixed), str(tmp_path / "shards"), shard_size=4, progress=False)
    shards = inspect_data(str(tmp_path / "shards"))  # sampled over every shard, as the folder is
    assert (shards.num_images, shards.in_chans, shards.sampled, shards.short_side) == (11, 3, 11, 20)
    idx = inspect_data(f"{idx_dir}:train")
    assert (idx.in_chans, idx.short_side, idx.num_images) == (1, 16, 256)
    with pytest.raises(DataError, match="nope"):
        inspect_data(str(tmp_path / "nope"))


def test_size_and_budget_rules():
    assert input_size(28, cnn=True, device="cpu") == 48  # x1.5 below 64 px, to a multiple of 16
    assert input_size(20, cnn=True, device="cpu") == 32
    assert input_size(28, cnn=False, device="cpu") == 32  # ViTs: no upscaling, at least 32
    assert input_size(96, cnn=True, device="cpu") == 96
    assert input_size(500, cnn=True, device="cpu") == 128 and input_size(500, cnn=True, device="cuda") == 224
    assert budget_minutes(60000, "cpu") == 30 and budget_minutes(40, "cpu") == 5 and budget_minutes(10**7, "cpu") == 60
    assert budget_minutes(100, "cuda") == 10 and budget_minutes(10**7, "cuda") == 240


def test_the_cuda_choice(tmp_path, monkeypatch):
    """On CUDA (faked here: the choice only reads the device's memory): ResNet-50, batch by memory, 224-px cap."""
    import types

    import torch

    from selfsight import autoconfig

    memory = {"gb": 80}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: types.SimpleNamespace(total_memory=memory["gb"] * 2**30))
    choice = choose_defaults(str(write_folder(tmp_path / "photos", 12, "RGB", size=(300, 260))), (), device="auto")
    assert choice.options["backbone"] == "resnet50" and choice.options["method"] == "simclr"
    assert choice.options["backbone_opts"] == {"in_chans": 3, "img_size": 224}
    assert choice.options["minutes"] == 10.0 and choice.options["batch_size"] == 8  # 12 images
    assert choice.overrides == []  # the CPU recipe's projector and small-image crops do not apply
    assert "224 px" in choice.lines[0] and "within 32-224 px on CUDA" in choice.lines[0]
    for gb, batch in ((80, 256), (40, 256), (24, 128), (8, 64)):
        memory["gb"] = gb
        assert autoconfig._cuda_batch("cuda:0")[0] == batch
