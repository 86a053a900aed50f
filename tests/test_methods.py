"""The contrastive and self-distillation methods: one file per method, checked through the registry.

Loss formulas are checked against naive references in test_losses.py; here: each method's wiring
(which views go where, momentum targets, queues, centring, temperature schedule), its place in the
engine (resume, export, bf16, monitor) and the collapse statistic.
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY_VIT, stop_after_checkpoint

from selfsight.backbones import Backbone
from selfsight.checkpoint import export_run, load_run_backbone
from selfsight.config import build_config
from selfsight.ema import cosine_momentum
from selfsight.engine import COLLAPSE_WARNING, Trainer, pretrain
from selfsight.errors import ConfigError
from selfsight.methods.common import embedding_std
from selfsight.methods.dino import teacher_temperature
from selfsight.queues import KeyQueue
from selfsight.registry import create_method, get_method_class, list_methods

CONTRASTIVE = ["byol", "dino", "moby", "mocov2", "mocov3", "simclr"]
TINY_CNN = ("resnet18", {"in_chans": 1, "img_size": 16, "channels": (8, 16, 16, 32)})
# small heads and queues so a step takes milliseconds
SMALL = {
    "byol": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32},
    "simclr": {"proj_hidden_dim": 32, "proj_dim": 16},
    "mocov2": {"proj_hidden_dim": 32, "proj_dim": 16, "queue_size": 48},
    "mocov3": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32},
    "moby": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32, "queue_size": 48},
    # DINO: the last layer frozen for the first 3 steps of a run (engine tests run 6)
    "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "num_local_crops": 2, "freeze_last_layer_steps": 3},
    "pic": {"hidden_dim": 32, "feature_dim": 16, "num_small_crops": 2, "window_size": 128, "window_stride": 32},
    "pixpro": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32},
}


def make(name: str, backbone_spec=TINY_CNN, **changes):
    backbone = Backbone(backbone_spec[0], backbone_spec[1])
    config = get_method_class(name).Config(**{**SMALL[name], **changes})
    return create_method(name, backbone, config, [0.5], [0.25])


def images(batch: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 1, size, size), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_all_methods_are_registered():
    assert set(CONTRASTIVE) | {"simmim"} <= set(list_methods())


@pytest.mark.parametrize("name", CONTRASTIVE)
@pytest.mark.parametrize("backbone_spec", [TINY_CNN, TINY_VIT], ids=["cnn", "vit"])
def test_step_trains_online_network_only(name, backbone_spec):
    method = make(name, backbone_spec)
    out = method.training_step(images(), gen())
    assert out.loss.ndim == 0 and math.isfinite(out.loss.item())
    assert 0 < out.metrics["embed_std_norm"] < 2
    out.loss.backward()
    online = [p for n, p in method.named_parameters() if n.startswith("backbone.")]
    assert all(p.grad is not None for p in online if p.requires_grad)
    assert any(p.grad.abs().sum() > 0 for p in online if p.grad is not None)
    targets = [p for n, p in method.named_parameters() if n.startswith(("target_", "teacher_"))]
    assert bool(targets) == (name != "simclr")  # SimCLR alone has no momentum target
    assert all(not p.requires_grad and p.grad is None for p in targets)
    groups = method.param_groups(0.05)
    trained = {id(p) for g in groups for p in g["params"]}
    assert not trained & {id(p) for p in targets}


@pytest.mark.parametrize("name", CONTRASTIVE)
def test_views_are_deterministic_and_two_views_differ(name):
    method = make(name)
    first = method.views(images(), gen(3))
    again = method.views(images(), gen(3))
    other = method.views(images(), gen(4))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], first[1])
    assert len(first) == (4 if name == "dino" else 2)


@pytest.mark.parametrize("name", ["byol", "mocov3", "moby", "dino"])
def test_target_follows_cosine_momentum(name):
    method = make(name)
    online = method.backbone.model.conv1.weight
    target_module = method.teacher_backbone if name == "dino" else method.target_backbone
    target = target_module.model.conv1.weight
    assert torch.equal(online, target)  # the target starts as a copy
    with torch.no_grad():
        online.add_(1.0)
    before = target.clone()
    method.on_step_end(step=4, total_steps=10)
    m = cosine_momentum(5, 10, method.config.base_momentum)
    assert torch.allclose(target, m * before + (1 - m) * online, atol=1e-6)


def test_mocov2_momentum_is_constant_and_queue_fills_after_the_step():
    method = make("mocov2")
    before = method.queue.keys.clone()
    out = method.training_step(images(), gen())
    assert torch.equal(method.queue.keys, before)  # the queue is in the graph: unchanged until the step ends
    out.loss.backward()
    method.on_step_end(0, 100)
    with torch.no_grad():
        keys = F.normalize(method.target_projector(method.target_backbone(method.views(images(), gen())[1])), dim=1)
    assert torch.allclose(method.queue.keys[:8], keys, atol=1e-5)
    assert torch.equal(method.queue.keys[8:], before[8:])
    assert int(method.queue.position) == 8


@pytest.mark.parametrize("name", ["mocov2", "moby", "dino"])
def test_skipped_step_leaves_queues_and_centre_alone(name):
    torch.manual_seed(0)
    method = make(name)
    method.training_step(images(seed=1), gen(1))  # its gradients were not finite: the engine skips it
    method.on_step_skipped()
    method.training_step(images(), gen()).loss.backward()
    method.on_step_end(0, 100)
    torch.manual_seed(0)
    reference = make(name)  # the same method without the skipped step
    reference.training_step(images(), gen()).loss.backward()
    reference.on_step_end(0, 100)
    for key, value in reference.state_dict().items():
        if key.startswith(("queue", "center")):
            assert torch.equal(method.state_dict()[key], value), key


def test_moby_two_queues_get_keys_of_their_view():
    method = make("moby")
    method.training_step(images(), gen()).loss.backward()
    x1, x2 = method.views(images(), gen())
    with torch.no_grad():  # keys before the momentum update of on_step_end
        k1 = F.normalize(method.target_projector(method.target_backbone(x1)), dim=1)
        k2 = F.normalize(method.target_projector(method.target_backbone(x2)), dim=1)
    method.on_step_end(0, 100)
    assert torch.allclose(method.queue1.keys[:8], k1, atol=1e-5)
    assert torch.allclose(method.queue2.keys[:8], k2, atol=1e-5)


def test_key_queue_wraps_and_keeps_the_newest():
    queue = KeyQueue(size=5, dim=3)
    first = torch.randn(3, 3)
    queue.push(first)
    second = torch.randn(4, 3)
    queue.push(second)  # 2 fit at the end, 2 wrap to the front
    assert int(queue.position) == 2
    unit = F.normalize(second, dim=1)
    assert torch.allclose(queue.keys[3:5], unit[:2]) and torch.allclose(queue.keys[0:2], unit[2:])
    assert torch.allclose(queue.keys[2], F.normalize(first, dim=1)[2])
    queue.push(torch.randn(12, 3))  # more than the queue holds: the last 5 are kept
    assert torch.allclose(queue.keys.norm(dim=1), torch.ones(5))
    assert "keys" in queue.state_dict() and "position" in queue.state_dict()


def test_byol_loss_is_minimal_when_prediction_equals_target():
    method = make("byol")
    method.predictor = torch.nn.Identity()  # online projection == target projection at init
    method.eval()  # BatchNorm in running-stat mode: both branches compute the same function
    out = method.training_step(images(), gen())
    # 2 - 2 cos between a view's projection and the other view's: 0 only if the two views agree
    x1, x2 = method.views(images(), gen())
    with torch.no_grad():
        z1, z2 = method.projector(method.backbone(x1)), method.projector(method.backbone(x2))
    expected = 2 * (2 - 2 * F.cosine_similarity(z1, z2)).mean()
    assert torch.allclose(out.loss, expected, atol=1e-5)


def test_dino_teacher_temperature_warms_up_and_center_moves_after_step():
    assert teacher_temperature(0.0, 0.04, 0.07, 0.3) == pytest.approx(0.04)
    assert teacher_temperature(0.15, 0.04, 0.07, 0.3) == pytest.approx(0.055)
    assert teacher_temperature(0.3, 0.04, 0.07, 0.3) == pytest.approx(0.07)
    assert teacher_temperature(0.9, 0.04, 0.07, 0.3) == pytest.approx(0.07)
    method = make("dino")
    out = method.training_step(images(), gen())
    assert out.metrics["teacher_temp"] == pytest.approx(0.04)
    assert torch.equal(method.center, torch.zeros_like(method.center))
    with torch.no_grad():
        teacher = method.teacher_head(method.teacher_backbone(torch.cat(method.views(images(), gen())[:2])))
    out.loss.backward()
    method.on_step_end(2, 10)
    assert torch.allclose(method.center, 0.1 * teacher.mean(dim=0, keepdim=True), atol=1e-5)
    assert float(method.progress) == pytest.approx(0.3)


def _last_layer(method) -> list[torch.Tensor]:
    return list(method.head.last_layer.parameters())  # weight norm's g [K, 1] (frozen at 1) and v [K, d]


@pytest.mark.parametrize("ddp_zero_grads", [False, True], ids=["one_process", "ddp_writes_zeros"])
def test_dino_freezes_the_last_layer_then_trains_it(monkeypatch, ddp_zero_grads):
    method = make("dino", freeze_last_layer_steps=2)
    if ddp_zero_grads:  # what DDP does after its all-reduce: a zero gradient where the hook left None
        monkeypatch.setattr("selfsight.distributed.world", lambda: 2)
    optimizer = torch.optim.AdamW(method.param_groups(0.05), lr=1e-2)
    start = [p.detach().clone() for p in _last_layer(method)]
    mlp_start = [p.detach().clone() for p in method.head.mlp.parameters()]
    v = method.head.last_layer.parametrizations.weight.original1
    for step in range(3):
        method.training_step(images(seed=step), gen(step)).loss.backward()
        assert (v.grad is None) == (step < 2)  # dropped while frozen (before clipping and the step)
        if ddp_zero_grads and step < 2:
            v.grad = torch.zeros_like(v)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.on_step_end(step, 10)
        if step == 1:  # after the 2 frozen steps: the optimiser skipped the layer, as official DINO's grad = None
            assert all(torch.equal(p, s) for p, s in zip(_last_layer(method), start, strict=True))
            assert v not in optimizer.state  # no weight decay, no moments, no step count
            assert all(not torch.equal(p, s) for p, s in zip(method.head.mlp.parameters(), mlp_start, strict=True))
    assert not torch.equal(v, start[1])  # trained from step 2 on
    assert int(optimizer.state[v]["step"]) == 1
    assert int(method.steps_done) == 3


def test_dino_freeze_length_in_steps_or_epochs():
    method = make("dino", freeze_last_layer_epochs=1.5, freeze_last_layer_steps=None)
    assert method.freeze_steps() == 0  # steps per epoch unknown: no freeze from epochs
    method.steps_per_epoch = 8
    assert method.freeze_steps() == 12
    assert make("dino", freeze_last_layer_steps=3, freeze_last_layer_epochs=2.0).freeze_steps() == 3
    with pytest.raises(ConfigError):
        make("dino", freeze_last_layer_steps=-1)
    # a checkpoint from before the option (no steps_done) resumes without the freeze
    state = {k: v for k, v in method.state_dict().items() if k != "steps_done"}
    method.load_state_dict(state)
    assert int(method.steps_done) >= method.freeze_steps()
    method.on_step_end(0, 10)
    assert int(method.steps_done) >= method.freeze_steps()


def test_dino_local_crops_are_small_on_cnns_and_full_size_on_fixed_vits():
    cnn = make("dino", num_local_crops=3)
    views = cnn.views(images(), gen())
    assert [v.shape[-1] for v in views] == [16, 16, 8, 8, 8]  # max(8, 16 * 96 / 224)
    vit = make("dino", TINY_VIT, num_local_crops=1)
    assert [v.shape[-1] for v in vit.views(images(), gen())] == [16, 16, 16]
    dynamic = make("dino", (TINY_VIT[0], {**TINY_VIT[1], "dynamic_img_size": True}), num_local_crops=1, local_size=8)
    assert [v.shape[-1] for v in dynamic.views(images(), gen())] == [16, 16, 8]
    assert math.isfinite(dynamic.training_step(images(), gen()).loss.item())


def test_embedding_std_limits():
    collapsed = torch.ones(64, 32) + 1e-7 * torch.randn(64, 32)
    assert embedding_std(collapsed)["embed_std_norm"] < 1e-3
    spread = torch.randn(4096, 32, generator=torch.Generator().manual_seed(0))
    stats = embedding_std(spread)
    assert stats["embed_std_norm"] == pytest.approx(1.0, abs=0.05)
    assert stats["embed_std"] == pytest.approx(1 / math.sqrt(32), rel=0.05)


def cnn_config(idx_dir, out, method, **kw):
    base = dict(
        method=method,
        backbone=TINY_CNN[0],
        backbone_opts=TINY_CNN[1],
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
    overrides = [f"method.{k}={json.dumps(v)}" for k, v in SMALL[method].items()]
    return build_config(None, overrides, **base)


@pytest.mark.parametrize("name", ["moby", "dino"])
def test_resume_repeats_losses_with_queues_and_centres(idx_dir, tmp_path, name):
    whole = tmp_path / "whole"
    pretrain(cnn_config(idx_dir, whole, name), progress=False)
    # a run stopped after step 3 (its checkpoint) and resumed must repeat the last 3 losses exactly
    cut = tmp_path / "cut"
    trainer = Trainer(cnn_config(idx_dir, cut, name))
    trainer.total_steps = 6
    stop_after_checkpoint(trainer, 3)
    pretrain(cnn_config(idx_dir, cut, name), resume=True, progress=False)

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert losses(cut) == losses(whole)


def test_dino_exports_the_teacher_and_timm_loads_a_cnn(idx_dir, tmp_path):
    run = tmp_path / "dino"
    pretrain(cnn_config(idx_dir, run, "dino", steps=2), progress=False)
    backbone, info = load_run_backbone(run)
    state = torch.load(info["checkpoint"], map_location="cpu", weights_only=False)["model"]
    teacher = state["teacher_backbone.model.conv1.weight"]
    assert torch.equal(backbone.model.conv1.weight, teacher)
    assert not torch.equal(teacher, state["backbone.model.conv1.weight"])
    # the teacher's own BatchNorm statistics (from its forward passes), not the student's
    teacher_mean = state["teacher_backbone.model.bn1.running_mean"]
    assert torch.equal(backbone.model.bn1.running_mean, teacher_mean)
    assert not torch.allclose(teacher_mean, state["backbone.model.bn1.running_mean"])
    assert int(state["teacher_backbone.model.bn1.num_batches_tracked"]) == 2
    exported = export_run(run, tmp_path / "export")
    assert "img_size" not in exported["model_args"]  # timm's ResNet takes any size; img_size is selfsight's
    model = timm.create_model(
        TINY_CNN[0], pretrained=True, num_classes=0, **exported["model_args"],
        pretrained_cfg_overlay=dict(file=exported["weights"]),
    )
    assert torch.equal(model.conv1.weight, teacher)
    assert torch.equal(model.bn1.running_mean, teacher_mean)


def test_monitor_logs_knn_and_bf16_runs(idx_dir, tmp_path):
    run = tmp_path / "monitored"
    cfg = cnn_config(
        idx_dir, run, "simclr", steps=4, precision="bf16", monitor_data=f"{idx_dir}:test", monitor_every=2,
        monitor_size=64,
    )
    pretrain(cfg, progress=False)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    monitor = [r for r in records if "knn_monitor" in r]
    assert [r["step"] for r in monitor] == [2, 4]
    assert all(0.0 <= r["knn_monitor"] <= 1.0 for r in monitor)
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)


def test_monitor_accuracy_matches_an_independent_knn(idx_dir):
    from selfsight.monitor import KnnMonitor

    monitor = KnnMonitor(f"{idx_dir}:test", 1, 16, size=64, seed=0)
    backbone = Backbone(*TINY_CNN)
    accuracy = monitor(backbone, [0.5], [0.25], torch.device("cpu"))
    with torch.no_grad():
        backbone.eval()
        feats = F.normalize(backbone.features((monitor.pixels.float() / 255 - 0.5) / 0.25), dim=1)
    bank, queries = feats[:32], feats[32:]
    sims = queries @ bank.T
    top = sims.topk(20, dim=1)
    votes = torch.zeros(32, 4).scatter_add_(1, monitor.labels[:32][top.indices], (top.values / 0.07).exp())
    expected = (votes.argmax(1) == monitor.labels[32:]).float().mean().item()
    assert accuracy == pytest.approx(expected)


def test_monitor_needs_labels(tmp_path):
    from PIL import Image

    from selfsight.errors import ConfigError
    from selfsight.monitor import KnnMonitor

    for i in range(4):
        Image.new("L", (16, 16), color=i * 40).save(tmp_path / f"{i}.png")
    with pytest.raises(ConfigError, match="no labels"):
        KnnMonitor(str(tmp_path), 1, 16, size=8, seed=0)


def test_collapse_warning_once_after_warmup(idx_dir, tmp_path, caplog):
    trainer = Trainer(cnn_config(idx_dir, tmp_path / "c", "byol", steps=10))
    trainer.warmup_steps = 2
    trainer.step = 1
    with caplog.at_level(logging.WARNING, logger="selfsight"):
        trainer._watch_collapse({"embed_std_norm": 0.0})  # during warm-up: silent
        trainer.step = 5
        trainer._watch_collapse({"embed_std_norm": COLLAPSE_WARNING * 2})  # healthy: silent
        trainer._watch_collapse({"embed_std_norm": COLLAPSE_WARNING / 2})
        trainer._watch_collapse({"embed_std_norm": COLLAPSE_WARNING / 3})
    warnings = [r for r in caplog.records if "collapsing" in r.getMessage()]
    assert len(warnings) == 1 and "step 5" in warnings[0].getMessage()


def test_engine_tells_dino_its_epoch_so_the_last_layer_is_frozen_for_one(idx_dir, tmp_path):
    """256 images at batch 32: 8 steps an epoch; with the default freeze_last_layer_epochs=1 the last layer of
    the student head stays as it was for 8 steps, then trains."""
    cfg = cnn_config(idx_dir, tmp_path / "dino", "dino", steps=10, ckpt_every=100)
    cfg.method_config.freeze_last_layer_steps = None  # the default: one epoch
    trainer = Trainer(cfg, progress=False)
    assert trainer.method.steps_per_epoch == 8 and trainer.method.freeze_steps() == 8
    last = trainer.method.head.last_layer.parametrizations.weight.original1
    start = last.detach().clone()
    seen = []
    original = trainer.method.on_step_end

    def record(step, total):
        original(step, total)
        seen.append(torch.equal(last, start))

    trainer.method.on_step_end = record
    trainer.fit()
    assert seen == [True] * 8 + [False] * 2
