"""Feature Distillation: the whitened SmoothL1 target (hand-computed), the frozen teacher, teachers from a
run directory and an export directory, grids and families that differ, and FD in the engine (resume,
bf16, export, eval, diagnose, a teacher that changed or vanished).

References: Wei et al. 2022 and the official ``SwinTransformer/Feature-Distillation``
``models/feature_distillation.py`` (LayerNorm without affine on the teacher's normed tokens, SmoothL1Loss(beta=2.0)).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TINY_VIT, stop_after_checkpoint
from safetensors.torch import save_file
from test_methods import TINY_CNN

from selfsight.backbones import Backbone
from selfsight.checkpoint import export_run, list_checkpoints, load_checkpoint, load_run_backbone
from selfsight.config import build_config
from selfsight.engine import Trainer, pretrain
from selfsight.errors import ConfigError
from selfsight.methods.fd import FD, fd_loss, token_map, whiten

#: a teacher that differs from TINY_VIT in width (24), depth (1) and patch size (8: a 2x2 grid)
TEACHER_VIT = ("vit_tiny_patch16_224",
               {"img_size": 16, "patch_size": 8, "in_chans": 1, "embed_dim": 24, "depth": 1, "num_heads": 2})
TINY_SWIN = ("swin_tiny_patch4_window7_224", {"img_size": 16, "patch_size": 2, "window_size": 4, "in_chans": 1,
                                               "embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2)})
TEACHER_MEAN, TEACHER_STD = [0.4], [0.3]


def write_export(folder: Path, spec: tuple[str, dict], seed: int = 0) -> Path:
    """An export directory as ``export_run`` writes it (model.safetensors + timm-style config.json) of a
    seeded, untrained backbone (the global RNG is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone = Backbone(*spec)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in backbone.model.state_dict().items()}, str(folder / "model.safetensors"))
    args = {k: list(v) if isinstance(v, tuple) else v for k, v in backbone.timm_kwargs.items()}
    config = {"architecture": backbone.name, "num_classes": 0, "model_args": args,
              "pretrained_cfg": {"input_size": [backbone.in_chans, backbone.img_size, backbone.img_size],
                                 "mean": TEACHER_MEAN, "std": TEACHER_STD}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def fd_teacher(idx_dir: Path | str) -> Path:
    """The export teacher of the data-parallel test: next to ``idx_dir``, so every process finds it (written
    once, by the test process, before the workers start)."""
    folder = Path(idx_dir).with_name(Path(idx_dir).name + "-fd-teacher")
    if not (folder / "config.json").exists():
        write_export(folder, TEACHER_VIT)
    return folder


def make_fd(teacher: Path, student=TINY_VIT, **changes) -> FD:
    backbone = Backbone(*student)
    return FD(backbone, FD.Config(teacher=str(teacher), **changes), [0.5], [0.25])


def images(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 1, 16, 16), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def teacher_export(tmp_path_factory) -> Path:
    return write_export(tmp_path_factory.mktemp("fd") / "export", TEACHER_VIT)


@pytest.fixture(scope="module")
def cnn_teacher(tmp_path_factory) -> Path:
    """A ResNet teacher (3 channels: the 1-channel student's view is repeated), with BatchNorm statistics."""
    return write_export(tmp_path_factory.mktemp("fd") / "cnn", (TINY_CNN[0], {**TINY_CNN[1], "in_chans": 3}))


@pytest.fixture(scope="module")
def teacher_run(idx_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny SimCLR teacher trained with the engine for 2 steps, and its export."""
    root = tmp_path_factory.mktemp("fd_teacher")
    overrides = ["method.proj_hidden_dim=32", "method.proj_dim=16"]
    cfg = build_config(None, overrides, method="simclr", backbone=TEACHER_VIT[0], backbone_opts=TEACHER_VIT[1],
                       data=f"{idx_dir}:train", out=str(root / "run"), steps=2, batch_size=32, log_every=1,
                       device="cpu", num_workers=0, precision="fp32")
    pretrain(cfg, progress=False)
    export_run(root / "run", root / "export")
    return root / "run", root / "export"


def test_whitening_and_smooth_l1_hand_computed():
    teacher = torch.tensor([[[1.0, 3.0]]])  # one token: mean 2, variance 1
    assert torch.allclose(whiten(teacher), torch.tensor([[[-1.0, 1.0]]]), atol=1e-4)
    # |d| = 1 < beta = 2: 0.5 d^2 / beta = 0.25 per channel
    assert fd_loss(torch.zeros(1, 1, 2), teacher).item() == pytest.approx(0.25, abs=1e-4)
    # |d| = 4 >= 2: |d| - beta / 2 = 3 per channel
    assert fd_loss(torch.tensor([[[3.0, -3.0]]]), teacher).item() == pytest.approx(3.0, abs=1e-4)


def test_teacher_stays_frozen_and_in_eval_mode(cnn_teacher):
    method = make_fd(cnn_teacher)
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    method.train()
    assert method.training and method.backbone.training and not method.teacher.training
    assert all(not p.requires_grad for p in method.teacher.parameters())
    optimizer = torch.optim.AdamW(method.param_groups(0.05), lr=1e-2)
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not trained & {id(p) for p in method.teacher.parameters()}
    student_before = method.backbone.model.patch_embed.proj.weight.detach().clone()
    for step in range(3):
        method.training_step(images(seed=step), gen(step)).loss.backward()
        assert all(p.grad is None for p in method.teacher.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = method.teacher.state_dict()
    # bit-identical, BatchNorm running statistics and their counters included (eval mode: never updated)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not torch.equal(method.backbone.model.patch_embed.proj.weight, student_before)
    assert not any(k.startswith("teacher.") for k in method.state_dict())


def test_targets_are_the_teachers_normed_tokens_resized_and_whitened(teacher_export):
    method = make_fd(teacher_export)
    assert method.teacher_grid == (2, 2) and method.grid == (4, 4) and method.match_prefix
    x = method.views(images(), gen())[0]
    # the teacher's input: the student's view un-normalised (0.5, 0.25), re-normalised with (0.4, 0.3)
    assert torch.allclose(method._teacher_input(x), (x * 0.25 + 0.5 - 0.4) / 0.3, atol=1e-6)
    with torch.no_grad():
        tokens = method.teacher.model.forward_features((x * 0.25 + 0.1) / 0.3)  # [B, 1 + 4, 24] after its norm
    patches = tokens[:, 1:].transpose(1, 2).reshape(4, 24, 2, 2)
    resized = F.interpolate(patches, size=(4, 4), mode="bilinear", align_corners=False)
    expected = torch.cat([tokens[:, :1], resized.flatten(2).transpose(1, 2)], dim=1)  # [B, 1 + 16, 24]
    target = method.targets(x)
    assert target.shape == (4, 17, 24)
    assert torch.allclose(target, expected, atol=1e-5)
    assert method.predictions(x).shape == (4, 17, 24)


def test_student_learns_to_predict_the_teacher(teacher_export):
    """20 AdamW steps on one batch: the loss falls and the prediction turns towards the whitened target
    (measured: loss 0.336 -> 0.156, cosine -0.01 -> 0.61)."""
    torch.manual_seed(0)
    method = make_fd(teacher_export)
    optimizer = torch.optim.AdamW(method.param_groups(0.05), lr=2e-3)
    outs = []
    for _ in range(20):
        out = method.training_step(images(16), gen())
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        outs.append((out.loss.item(), out.metrics["target_cosine"]))
    assert outs[-1][0] < 0.7 * outs[0][0]
    assert abs(outs[0][1]) < 0.2 and outs[-1][1] > 0.4


def test_grids_that_differ_are_refused_when_resizing_is_off(teacher_export):
    with pytest.raises(ConfigError, match="grid"):
        make_fd(teacher_export, resize_teacher_map=False)
    same = make_fd(teacher_export, student=(TINY_VIT[0], {**TINY_VIT[1], "patch_size": 8}), resize_teacher_map=False)
    assert same.grid == same.teacher_grid == (2, 2)


@pytest.mark.parametrize(("student", "teacher"), [("vit", "cnn"), ("swin", "vit")])
def test_other_families_train(student, teacher, teacher_export, cnn_teacher):
    spec = TINY_VIT if student == "vit" else TINY_SWIN
    method = make_fd(cnn_teacher if teacher == "cnn" else teacher_export, student=spec)
    x = method.views(images(), gen())[0]
    _, grid = token_map(method.backbone, x)
    assert method.grid == tuple(grid.shape[-2:])
    assert method.match_prefix == (student == "vit" and teacher == "vit")
    out = method.training_step(images(), gen())
    assert math.isfinite(out.loss.item())
    out.loss.backward()
    assert all(p.grad is not None for p in method.backbone.parameters() if p.requires_grad)
    assert method.projector.weight.grad.abs().sum() > 0


def test_teacher_from_a_run_directory_or_its_export(teacher_run):
    run, export = teacher_run
    from_run, from_export = make_fd(run), make_fd(export)
    trained, _ = load_run_backbone(run)
    assert torch.equal(from_run.teacher.model.pos_embed, trained.model.pos_embed)
    assert from_run.teacher_mean.flatten().tolist() == pytest.approx(json.loads((run / "run.json").read_text())["mean"])
    x = from_run.views(images(), gen())[0]
    assert torch.equal(from_run.targets(x), from_export.targets(x))
    assert torch.equal(from_run.teacher_digest, from_export.teacher_digest)


def test_missing_or_unusable_teacher_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="needs a teacher"):
        FD(Backbone(*TINY_VIT), FD.Config(), [0.5], [0.25])
    with pytest.raises(ConfigError, match="not found"):
        make_fd(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="neither"):
        make_fd(tmp_path)


# ---------------------------------------------------------------- in the engine


def fd_config(idx_dir, out, teacher, **kw):
    base = dict(method="fd", backbone=TINY_VIT[0], backbone_opts=TINY_VIT[1], data=f"{idx_dir}:train", out=str(out),
                steps=6, batch_size=32, log_every=1, ckpt_every=3, device="cpu", num_workers=0, precision="fp32")
    base.update(kw)
    return build_config(None, [f"method.teacher={teacher}"], **base)


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def run_cut_at_3(cfg) -> None:
    trainer = Trainer(cfg, progress=False)
    stop_after_checkpoint(trainer, 3)


def test_resume_repeats_losses_and_checkpoints_hold_no_teacher(idx_dir, tmp_path, teacher_export):
    whole = tmp_path / "whole"
    pretrain(fd_config(idx_dir, whole, teacher_export), progress=False)
    cut = tmp_path / "cut"
    run_cut_at_3(fd_config(idx_dir, cut, teacher_export))
    pretrain(fd_config(idx_dir, cut, teacher_export), resume=True, progress=False)
    assert losses(cut) == losses(whole)
    saved = yaml.safe_load((whole / "config.yaml").read_text())
    assert saved["method_config"]["teacher"] == str(teacher_export.resolve())  # absolute: found from anywhere
    state = load_checkpoint(list_checkpoints(whole)[0])["model"]
    assert not any(k.startswith("teacher.") for k in state) and "teacher_digest" in state
    student, _ = load_run_backbone(whole)  # export, eval and diagnose read the student
    assert torch.equal(student.model.pos_embed, state["backbone.model.pos_embed"])


def test_resume_refuses_a_teacher_that_changed_or_vanished(idx_dir, tmp_path):
    teacher = write_export(tmp_path / "teacher", TEACHER_VIT)
    run = tmp_path / "run"
    pretrain(fd_config(idx_dir, run, teacher, steps=2), progress=False)
    write_export(teacher, TEACHER_VIT, seed=1)  # other weights at the same path
    with pytest.raises(ConfigError, match="not the one this run was trained with"):
        pretrain(fd_config(idx_dir, run, teacher, steps=4), resume=True, progress=False)
    for path in teacher.iterdir():
        path.unlink()
    teacher.rmdir()
    with pytest.raises(ConfigError, match="not found"):
        pretrain(fd_config(idx_dir, run, teacher, steps=4), resume=True, progress=False)


def test_bf16_export_eval_and_diagnose(idx_dir, tmp_path, teacher_export):
    from selfsight.diagnostics.api import diagnose
    from selfsight.eval.api import EvalConfig, evaluate
    from selfsight.report import write_report

    run = tmp_path / "bf16"
    summary = pretrain(fd_config(idx_dir, run, teacher_export, steps=2, precision="bf16"), progress=False)
    assert summary["skipped_steps"] == 0 and all(math.isfinite(v) for v in losses(run))
    exported = export_run(run, tmp_path / "export")
    from safetensors.torch import load_file

    weights = load_file(exported["weights"])
    assert weights["pos_embed"].shape == (1, 17, 32)  # the student (width 32), not the teacher (24)
    record = evaluate(EvalConfig(kind="knn", run=str(run), train_data=f"{idx_dir}:train", test_data=f"{idx_dir}:test",
                                 device="cpu", out=str(tmp_path / "eval"), draws=1, progress=False))
    assert 0.0 <= record["top1"] <= 1.0
    result = diagnose(run, num_images=16, device="cpu", progress=False)
    assert result["method"] == "fd"
    page = write_report([run], tmp_path / "report.html").read_text()
    assert "<td>fd</td>" in page  # the run's method in its facts table


def test_teacher_flag_on_the_command_line(idx_dir, tmp_path, teacher_export, capsys):
    from conftest import TINY_VIT_OPTS

    from selfsight.cli import main
    from selfsight.config import load_config

    run = tmp_path / "cli"
    args = ["pretrain", "--method", "fd", "--teacher", str(teacher_export), "--backbone", TINY_VIT[0],
            *[a for opt in TINY_VIT_OPTS for a in ("--backbone-opt", opt)], "--data", f"{idx_dir}:train",
            "--out", str(run), "--steps", "1", "--batch-size", "32", "--no-progress", "--device", "cpu",
            "--precision", "fp32"]
    assert main(args) == 0 and "done: 1 steps" in capsys.readouterr().out
    assert load_config(run / "config.yaml").method_config.teacher == str(teacher_export.resolve())
