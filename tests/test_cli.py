"""The command line as a user types it: the forms in the README, and bad input as one clear line."""

import json
from pathlib import Path

import pytest
from conftest import TINY_VIT_OPTS
from PIL import Image

from selfsight.cli import main


def backbone_args(name: str = "vit_tiny_patch16_224", opts: list[str] = TINY_VIT_OPTS) -> list[str]:
    args = ["--backbone", name]
    for opt in opts:
        args += ["--backbone-opt", opt]
    return args


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("selfsight: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_pretrain_eval_export_from_the_command_line(idx_dir, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, _ = run_cli(["pretrain", "--method", "simmim", *backbone_args(), "--data", f"{idx_dir}:train",
                            "--out", str(run), "--steps", "4", "--batch-size", "32", "--seed", "1",
                            "--log-every", "2", "--no-progress", "--device", "cpu", "lr=0.001", "mask_ratio=0.5"],
                           capsys)
    assert code == 0 and "done: 4 steps" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all("loss" in r for r in records)
    config = (run / "config.yaml").read_text()
    assert "lr: 0.001" in config and "mask_ratio: 0.5" in config

    code, out, _ = run_cli(["eval", "knn", "--run", str(run), "--train-data", f"{idx_dir}:train",
                            "--test-data", f"{idx_dir}:test", "--labels-per-class", "8", "--device", "cpu"], capsys)
    assert code == 0
    result = json.loads((run / "eval_knn_32.json").read_text())
    assert result["num_labels"] == 32 and 0.0 <= result["top1"] <= 1.0

    code, out, _ = run_cli(["eval", "finetune", "--init", "scratch", *backbone_args(),
                            "--train-data", f"{idx_dir}:train", "--test-data", f"{idx_dir}:test",
                            "--labels-per-class", "8", "--epochs", "1", "--out", str(tmp_path / "scratch"),
                            "--device", "cpu"], capsys)
    assert code == 0 and (tmp_path / "scratch" / "eval_finetune_scratch_32.json").is_file()

    code, out, _ = run_cli(["export", str(run), "--out", str(tmp_path / "export")], capsys)
    assert code == 0 and "timm.create_model" in out
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_missing_data_path(tmp_path, capsys):
    missing = tmp_path / "nope"
    code, _, err = run_cli(["pretrain", "--data", str(missing), "--out", str(tmp_path / "r"), "--steps", "1"], capsys)
    assert_one_line_error(code, err, str(missing))


def test_empty_folder_and_folder_without_images(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(["pretrain", "--data", str(empty), "--out", str(tmp_path / "r"), "--steps", "1"], capsys)
    assert_one_line_error(code, err, str(empty))
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("hello")
    code, _, err = run_cli(["pretrain", "--data", str(texts), "--out", str(tmp_path / "r"), "--steps", "1"], capsys)
    assert_one_line_error(code, err, str(texts))


def test_corrupt_images_are_skipped_counted_and_logged(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(120):
        Image.new("RGBA" if i % 2 else "L", (12, 20), (i * 2) % 255 if i % 2 == 0 else (i, 0, 0, 128)).save(
            folder / f"{i:03d}.png")
    (folder / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = (folder / "000.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    run = tmp_path / "r"
    # 2 bad of 122 is more than 1%: the run stops and names files
    code, _, err = run_cli(["pretrain", *backbone_args(), "--data", str(folder), "--out", str(run),
                            "--steps", "1", "--batch-size", "16", "--no-progress"], capsys)
    assert_one_line_error(code, err, "2 of 122", "bad.jpg")
    (folder / "truncated.png").unlink()
    for i in range(120, 200):
        Image.new("L", (8, 8), i).save(folder / f"{i:03d}.png")  # images smaller than the crop
    code, out, err = run_cli(["pretrain", *backbone_args(), "--data", str(folder), "--out", str(run),
                              "--steps", "2", "--batch-size", "16", "--no-progress", "--device", "cpu"], capsys)
    assert code == 0, err
    data = json.loads((run / "run.json").read_text())["data"]
    assert data["num_images"] == 200
    assert data["num_skipped"] == 1 and [Path(s["path"]).name for s in data["skipped"]] == ["bad.jpg"]
    assert "bad.jpg" in (run / "train.log").read_text()


def test_unknown_backbone_and_simmim_on_cnn(tmp_path, idx_dir, capsys):
    code, _, err = run_cli(["pretrain", "--backbone", "vit_tinyy", "--data", f"{idx_dir}:train",
                            "--out", str(tmp_path / "a"), "--steps", "1"], capsys)
    assert_one_line_error(code, err, "unknown backbone 'vit_tinyy'")
    code, _, err = run_cli(["pretrain", "--backbone", "resnet18", "--backbone-opt", "in_chans=1",
                            "--data", f"{idx_dir}:train", "--out", str(tmp_path / "b"), "--steps", "1"], capsys)
    assert_one_line_error(code, err, "SimMIM needs a ViT, Swin or SwinV2", "resnet18", "--method spark")


def test_resume_without_checkpoint(tmp_path, capsys):
    code, _, err = run_cli(["pretrain", "--out", str(tmp_path / "fresh"), "--resume"], capsys)
    assert_one_line_error(code, err, "no checkpoint", str(tmp_path / "fresh"))


def test_debug_shows_the_traceback(tmp_path):
    from selfsight.errors import DataError

    with pytest.raises(DataError):
        main(["--debug", "pretrain", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])


def test_views_command_writes_a_grid(idx_dir, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "views" / "byol.png"
    code, printed, _ = run_cli(["views", f"{idx_dir}:train", "--method", "dino", "--backbone", "resnet18",
                                "--backbone-opt", "in_chans=1", "--backbone-opt", "img_size=16",
                                "--num-images", "3", "--out", str(out), "num_local_crops=2"], capsys)
    assert code == 0 and "dino views" in printed
    with Image.open(out) as grid:
        # 3 rows; original + 2 global + 2 local columns, every cell 16 px with 2-px gaps around
        assert grid.size == (5 * 16 + 6 * 2, 3 * 16 + 4 * 2)
    code, _, err = run_cli(["views", f"{idx_dir}:train", "--method", "nope", "--out", str(out)], capsys)
    assert code == 2 and "unknown method 'nope'" in err


class _CreatesFileWhenUnpickled:
    """Pickles as ``open(path, "w")``: loading the pickle without restrictions creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_that_runs_code_is_refused_by_every_command(idx_dir, tmp_path, capsys):
    import torch

    from selfsight.checkpoint import list_checkpoints

    run = tmp_path / "run"
    code, _, _ = run_cli(["pretrain", *backbone_args(), "--data", f"{idx_dir}:train", "--out", str(run),
                          "--steps", "2", "--batch-size", "32", "--no-progress", "--device", "cpu",
                          "--precision", "fp32"], capsys)
    assert code == 0
    marker = tmp_path / "pwned"
    (checkpoint,) = list_checkpoints(run)
    state = torch.load(checkpoint, weights_only=True)
    state["payload"] = _CreatesFileWhenUnpickled(marker)
    torch.save(state, checkpoint)
    data = ["--train-data", f"{idx_dir}:train", "--test-data", f"{idx_dir}:test", "--labels-per-class", "4",
            "--device", "cpu"]
    commands = [
        ["pretrain", "--out", str(run), "--resume", "--steps", "4", "--no-progress"],
        ["eval", "knn", "--run", str(run), *data],
        ["eval", "linear", "--run", str(run), *data],
        ["eval", "finetune", "--run", str(run), *data, "--epochs", "1"],
        ["export", str(run), "--out", str(tmp_path / "export")],
        ["diagnose", str(run), "--data", f"{idx_dir}:test", "--num-images", "8"],
    ]
    for command in commands:
        code, _, err = run_cli(command, capsys)
        assert_one_line_error(code, err, "refusing to load", checkpoint.name)
        assert not marker.exists(), command
    # the same file loaded without the restriction would have run the payload: the test's payload is real
    torch.load(checkpoint, weights_only=False)
    assert marker.exists()
