import contextlib
import json
import logging
import os
import signal
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_VIT

from selfsight.checkpoint import (
    export_run,
    list_checkpoints,
    load_latest_checkpoint,
    load_run_backbone,
    save_checkpoint,
)
from selfsight.config import build_config, load_config
from selfsight.engine import Interrupted, Trainer, lr_factor, pretrain
from selfsight.errors import CheckpointError, ConfigError, TrainingError
from selfsight.methods.simmim import SimMIM


def config(idx_dir: Path, out: Path, **kw):
    base = dict(
        backbone=TINY_VIT[0],
        backbone_opts=TINY_VIT[1],
        data=f"{idx_dir}:train",
        out=str(out),
        steps=6,
        batch_size=32,
        log_every=1,
        ckpt_every=3,
        device="cpu",
        num_workers=0,
        precision="fp32",  # not auto: its timed probe could pick bf16 for one run and fp32 for another
    )
    base.update(kw)
    return build_config(None, None, **base)


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_interrupted_and_resumed_run_repeats_losses_bit_for_bit(idx_dir, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    pretrain(config(idx_dir, straight, ckpt_every=100), progress=False)

    broken = tmp_path / "broken"
    calls = {"n": 0}
    original = SimMIM.on_step_end

    def interrupt_after_4(self, step, total):
        original(self, step, total)
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the run

    monkeypatch.setattr(SimMIM, "on_step_end", interrupt_after_4)
    with pytest.raises(Interrupted) as info:
        pretrain(config(idx_dir, broken), progress=False)
    assert info.value.step == 4  # the step under way is finished, then saved
    assert [p.name for p in list_checkpoints(broken)] == ["step-00000004.pt", "step-00000003.pt"]
    monkeypatch.setattr(SimMIM, "on_step_end", original)

    pretrain(config(idx_dir, broken), resume=True, progress=False)
    assert losses(broken) == losses(straight)  # exact float equality, every step
    assert len(losses(straight)) == 6
    a = load_latest_checkpoint(straight)[0]["model"]
    b = load_latest_checkpoint(broken)[0]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_checkpoint_and_rerun_into_used_dir(idx_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        pretrain(config(idx_dir, tmp_path / "empty"), resume=True, progress=False)
    run = tmp_path / "run"
    pretrain(config(idx_dir, run, steps=3), progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        pretrain(config(idx_dir, run, steps=3), progress=False)


def test_damaged_newest_checkpoint_falls_back_and_says_so(idx_dir, tmp_path, caplog):
    run = tmp_path / "run"
    pretrain(config(idx_dir, run, steps=6, ckpt_every=3, keep_checkpoints=3), progress=False)
    newest, older = list_checkpoints(run)[:2]
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a half-written file, as after a crash without atomic writes
    with caplog.at_level(logging.WARNING, logger="selfsight"):
        state, path = load_latest_checkpoint(run)
    assert path == older and state["step"] == 3
    assert "damaged" in caplog.text and str(newest) in caplog.text and str(older) in caplog.text
    summary = pretrain(load_config(run / "config.yaml"), resume=True, progress=False)
    assert summary["steps"] == 6


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    save_checkpoint({"step": 1, "model": {"w": torch.ones(2)}}, tmp_path, 1)

    def fail(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError):
        save_checkpoint({"step": 2, "model": {}}, tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001.pt"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(idx_dir, tmp_path, monkeypatch):
    original = SimMIM.training_step
    calls = {"n": 0}

    def nan_at_5(self, images, generator):
        out = original(self, images, generator)
        calls["n"] += 1
        if calls["n"] == 5:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(SimMIM, "training_step", nan_at_5)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="at step 4.*step-00000003.pt"):
        pretrain(config(idx_dir, run), progress=False)
    assert [p.name for p in list_checkpoints(run)] == ["step-00000003.pt"]


def test_budgets_epochs_minutes_and_accumulation(idx_dir, tmp_path):
    # 256 images, batch 32 x accum 2 -> 4 optimiser steps per epoch
    cfg = config(idx_dir, tmp_path / "ep", steps=None, epochs=1.5)
    cfg.optim.accum_steps = 2
    summary = pretrain(cfg, progress=False)
    assert summary["steps"] == 6 and summary["images_seen"] == 6 * 64
    cfg = config(idx_dir, tmp_path / "min", steps=None, minutes=0.05)
    trainer = Trainer(cfg, progress=False)
    assert trainer.total_steps >= 1
    summary = trainer.fit()
    assert summary["minutes"] < 0.05 * 1.5 + 0.1


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 100, 10, 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_config_overrides_and_saved_config(idx_dir, tmp_path):
    cfg = build_config(
        None, ["lr=0.002", "mask_ratio=0.5", "optim.warmup_fraction=0.1", "method.hflip=false"], out=str(tmp_path / "r")
    )
    assert cfg.optim.lr == 0.002 and cfg.method_config.mask_ratio == 0.5
    assert cfg.optim.warmup_fraction == 0.1 and cfg.method_config.hflip is False
    assert build_config(None, ["lr=1e-3"]).optim.lr == 0.001  # YAML 1.1 reads 1e-3 as a string
    with pytest.raises(ConfigError, match="unknown option 'lrr'"):
        build_config(None, ["lrr=1"])
    with pytest.raises(ConfigError, match="must be float"):
        build_config(None, ["lr=fast"])
    run = tmp_path / "saved"
    pretrain(config(idx_dir, run, steps=2), progress=False)
    saved = load_config(run / "config.yaml")
    assert saved.backbone_opts == TINY_VIT[1] and saved.steps == 2 and saved.method_config == SimMIM.Config()


def test_export_loads_in_timm_with_same_features(idx_dir, tmp_path):
    run = tmp_path / "run"
    pretrain(config(idx_dir, run, steps=3), progress=False)
    info = export_run(run, tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["architecture"] == TINY_VIT[0] and exported["model_args"] == TINY_VIT[1]
    model = timm.create_model(
        TINY_VIT[0], pretrained=True, num_classes=0, **TINY_VIT[1], pretrained_cfg_overlay=dict(file=info["weights"])
    )
    backbone, _ = load_run_backbone(run)
    ours, theirs = backbone.model.state_dict(), model.state_dict()
    assert set(ours) == set(theirs)  # no missing or unexpected keys
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    model.eval()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), backbone(x), atol=1e-6)
    # the run's weights are really the trained ones, not a fresh init
    fresh = timm.create_model(TINY_VIT[0], num_classes=0, **TINY_VIT[1])
    assert not torch.equal(fresh.state_dict()["blocks.0.attn.qkv.weight"], ours["blocks.0.attn.qkv.weight"])


def test_bf16_autocast_runs_on_cpu(idx_dir, tmp_path):
    summary = pretrain(config(idx_dir, tmp_path / "bf16", steps=2, precision="bf16"), progress=False)
    assert summary["steps"] == 2 and summary["final_loss"] == summary["final_loss"]  # finite, not NaN
    with pytest.raises(ConfigError, match="precision"):
        config(idx_dir, tmp_path / "x", precision="fp16")


def test_compile_keeps_losses_and_checkpoint_keys(idx_dir, tmp_path, monkeypatch):
    # inductor takes about a minute to compile even this tiny ViT on 2 cores; dynamo's "eager" backend
    # traces the same graphs without generating code, which checks the wiring (inductor was run by hand)
    original = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: original(model, **{**kw, "backend": "eager"}))
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    pretrain(config(idx_dir, plain, steps=2), progress=False)
    trainer = Trainer(config(idx_dir, compiled, steps=2, compile=True), progress=False)
    assert trainer.method.backbone._compiled_call_impl is not None  # compiled in place
    trainer.fit()
    assert losses(compiled) == losses(plain)
    assert load_latest_checkpoint(compiled)[0]["model"].keys() == load_latest_checkpoint(plain)[0]["model"].keys()


def _inf_gradient_at(monkeypatch, calls_with_inf: set[int]) -> dict:
    """Patch SimMIM.training_step so that in the given calls (1-based) a tensor hook turns the gradient of
    the patch embedding's weight into +inf; records a copy of the parameters at every call."""
    original = SimMIM.training_step
    seen: dict = {"n": 0, "params": []}

    def step(self, images, generator):
        seen["n"] += 1
        seen["params"].append({k: v.detach().clone() for k, v in self.named_parameters()})
        if "handle" in seen:  # the hook of the previous call is spent
            seen.pop("handle").remove()
        if seen["n"] in calls_with_inf:
            weight = self.backbone.model.patch_embed.proj.weight
            seen["handle"] = weight.register_hook(lambda g: torch.full_like(g, float("inf")))
        return original(self, images, generator)

    monkeypatch.setattr(SimMIM, "training_step", step)
    return seen


def test_nonfinite_gradient_skips_the_step_and_counts_it(idx_dir, tmp_path, monkeypatch, caplog):
    seen = _inf_gradient_at(monkeypatch, {3})  # the third step, step index 2
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="selfsight"):
        summary = pretrain(config(idx_dir, run, steps=6, ckpt_every=3), progress=False)
    assert summary["steps"] == 6 and summary["skipped_steps"] == 1
    assert "step 2:" in caplog.text and "skipped" in caplog.text
    # the skipped step changed no parameter; the steps around it did
    before, after, next_after = seen["params"][2], seen["params"][3], seen["params"][4]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(after[k], next_after[k]) for k in after)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert "grad_norm" not in records[2] and all("grad_norm" in r for i, r in enumerate(records) if i != 2)
    state = load_latest_checkpoint(run)[0]
    assert state["skipped_steps"] == 1
    adam_steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert adam_steps == {5.0}  # 6 steps, one skipped: AdamW stepped 5 times


def test_consecutive_nonfinite_gradients_stop_the_run(idx_dir, tmp_path, monkeypatch):
    _inf_gradient_at(monkeypatch, {2, 3, 4, 5, 6})
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"3 steps in a row.*at step 3\).*step-00000003\.pt"):
        pretrain(config(idx_dir, run, steps=6, ckpt_every=1, max_consecutive_skips=3), progress=False)


def test_skipped_step_resumes_exactly(idx_dir, tmp_path, monkeypatch):
    _inf_gradient_at(monkeypatch, {2})
    straight = tmp_path / "straight"
    pretrain(config(idx_dir, straight, ckpt_every=100), progress=False)
    cut = tmp_path / "cut"
    trainer = Trainer(config(idx_dir, cut))
    _inf_gradient_at(monkeypatch, {2})
    original_save = trainer.save

    def save_then_stop():
        path = original_save()
        if trainer.step == 3:
            raise KeyboardInterrupt
        return path

    trainer.save = save_then_stop
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    summary = pretrain(config(idx_dir, cut), resume=True, progress=False)
    assert losses(cut) == losses(straight) and summary["skipped_steps"] == 1


def test_precision_auto_resolves_and_is_saved(idx_dir, tmp_path, monkeypatch):
    from selfsight import precision

    def timings(fp32: float, bf16: float):
        return lambda p: {"fp32": fp32, "bf16": bf16}[p]

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_precision("auto", cpu, timings(1.0, 0.1))[0] == "fp32"  # no probe without native bf16
    assert "slower" in precision.resolve_precision("bf16", cpu, timings(1.0, 2.0))[1]
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_precision("auto", cpu, timings(1.0, 0.5))[0] == "bf16"
    assert precision.resolve_precision("auto", cpu, timings(1.0, 0.95))[0] == "fp32"  # 1.05x: not worth it
    assert precision.resolve_precision("fp32", cpu, timings(1.0, 0.1))[0] == "fp32"
    # a run with auto writes its choice into config.yaml, and a resumed run keeps it
    from selfsight import engine

    asked = []

    def resolve(requested, device, time_step):
        asked.append(requested)
        return ("bf16" if requested == "auto" else requested), "test"

    monkeypatch.setattr(engine, "resolve_precision", resolve)
    run = tmp_path / "auto"
    pretrain(config(idx_dir, run, steps=2, precision="auto"), progress=False)
    assert load_config(run / "config.yaml").precision == "bf16"
    assert load_latest_checkpoint(run)[0]["config"]["precision"] == "bf16"
    trainer = Trainer(config(idx_dir, run, steps=2, precision="auto"), resume=True)
    assert asked == ["auto", "bf16"] and trainer.cfg.precision == "bf16"


def test_precision_probe_times_both_formats(idx_dir, tmp_path, monkeypatch):
    """On a CPU with native bf16, auto times a step in each format on the run's own model."""
    from selfsight import engine, precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    asked = []
    original = engine.Trainer._time_one_step

    def timed(self, precision=None, warm=2, timed=5):
        asked.append(precision)
        return original(self, precision, warm=1, timed=1)

    monkeypatch.setattr(engine.Trainer, "_time_one_step", timed)
    trainer = Trainer(config(idx_dir, tmp_path / "probe", steps=2, precision="auto"))
    assert asked == ["fp32", "bf16"] and trainer.cfg.precision in ("fp32", "bf16")
    # a --minutes budget plans from the probe's timing of the chosen format: no third timing
    asked.clear()
    trainer = Trainer(config(idx_dir, tmp_path / "probe_minutes", steps=None, minutes=0.5, precision="auto"))
    assert asked == ["fp32", "bf16"] and trainer.total_steps >= 1


def test_gradients_are_clipped_to_clip_grad(idx_dir, tmp_path):
    trainer = Trainer(config(idx_dir, tmp_path / "clip", optim={"clip_grad": 0.01}))
    trainer.method.train()
    trainer._forward_backward(trainer._batches(0), contextlib.nullcontext())
    norm, finite = trainer._grad_norm()
    grads = [p.grad for p in trainer.method.parameters() if p.grad is not None]
    clipped = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    assert finite and norm > 0.01  # the gradient was larger than the limit ...
    assert clipped == pytest.approx(0.01, rel=1e-3)  # ... and is clipped to it
