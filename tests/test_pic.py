"""PIC: the cosine-softmax instance classifier (hand-computed), the small crops' detached classifier, image
indices as labels, the classifier's memory check, the sliding-window scheduler (hand-computed, and that it
slides through the whole data set, unlike the official sampler), and PIC in the engine.

In the engine (the engine sets each micro-step's image indices on ``method.batch_indices`` and draws the
batches in ``method.batch_indexer``'s order): resume, bf16 and export.

References: Cao et al. 2020 and the official ``bl0/PIC`` (``contrast/models/PIC.py``: logits
``normalize(f) @ normalize(W).T / T``, the small crops against ``W.detach()``; ``contrast/data/sampler.py``).
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT, stop_after_checkpoint
from test_methods import TINY_CNN

from selfsight.backbones import Backbone
from selfsight.checkpoint import export_run, list_checkpoints, load_checkpoint, load_run_backbone
from selfsight.config import build_config
from selfsight.data.windows import WindowBatchIndexer, sliding_window
from selfsight.engine import Trainer
from selfsight.errors import ConfigError, TrainingError
from selfsight.methods.pic import PIC, classifier_memory, instance_logits

SMALL = {"hidden_dim": 32, "feature_dim": 16, "num_small_crops": 2, "window_size": 128, "window_stride": 32}


def make_pic(backbone_spec=TINY_CNN, num_images: int = 64, **changes) -> PIC:
    backbone = Backbone(*backbone_spec)
    return PIC(backbone, PIC.Config(**{**SMALL, "num_images": num_images, **changes}), [0.5], [0.25])


def images(batch: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 1, 16, 16), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_cosine_softmax_hand_computed():
    logits = instance_logits(torch.tensor([[1.0, 0.0]]), torch.eye(2), 0.2)
    assert torch.allclose(logits, torch.tensor([[5.0, 0.0]]))
    loss = F.cross_entropy(logits, torch.tensor([0]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-5)), rel=1e-5)
    assert loss.item() == pytest.approx(0.0067153, abs=1e-7)
    # cosine: the scales of features and weights do not matter
    assert torch.allclose(instance_logits(torch.tensor([[3.0, 0.0]]), 2 * torch.eye(2), 0.2), logits)


@pytest.mark.parametrize("backbone_spec", [TINY_VIT, TINY_CNN], ids=["vit", "cnn"])
def test_small_crops_leave_the_classifier_gradient_zero(backbone_spec):
    """The classifier's gradient is that of the large crop's term alone; the backbone's is not."""
    method = make_pic(backbone_spec)
    method.eval()  # BatchNorm on running statistics: a second forward computes the same features
    labels = torch.arange(8) * 7 % 64
    method.batch_indices = labels
    method.training_step(images(), gen()).loss.backward()
    full_classifier = method.classifier.grad.clone()
    full_backbone = [p.grad.clone() for p in method.backbone.parameters()]
    method.zero_grad(set_to_none=True)
    views = method.views(images(), gen())
    large = method.head(method.backbone(views[0]))
    # the loss is the mean over 3 views x 8 images: the large crop's term has weight 1/3
    (F.cross_entropy(instance_logits(large, method.classifier, 0.2), labels) / 3).backward()
    assert torch.allclose(method.classifier.grad, full_classifier, atol=1e-7)
    assert method.classifier.grad.abs().sum() > 0
    assert any(not torch.allclose(p.grad, g, atol=1e-7) for p, g in zip(method.backbone.parameters(), full_backbone))


def test_classifier_learns_the_instances():
    """30 AdamW steps on the same 16 images and views: the loss falls well below chance, ln 16 = 2.77
    (measured: 3.72 -> 2.26)."""
    torch.manual_seed(0)
    method = make_pic(TINY_VIT, num_images=16)
    optimizer = torch.optim.AdamW(method.param_groups(0.0), lr=5e-3)
    losses = []
    for _ in range(30):
        method.batch_indices = torch.arange(16)
        out = method.training_step(images(16), gen())
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.8 and losses[-1] < math.log(16) - 0.2


def test_small_crops_are_small_on_cnns():
    method = make_pic(TINY_CNN)
    assert [v.shape[-1] for v in method.views(images(), gen())] == [16, 10, 10]  # 16 * 96 / 160
    assert [v.shape[-1] for v in make_pic(TINY_VIT).views(images(), gen())] == [16, 16, 16]  # fixed-size ViT


def test_labels_are_the_batch_indices_and_are_consumed():
    method = make_pic()
    with pytest.raises(TrainingError, match="batch_indices"):
        method.training_step(images(), gen())
    method.batch_indices = torch.arange(8)
    loss = method.training_step(images(), gen()).loss
    assert method.batch_indices is None  # a next step without new indices is refused, not trained on stale labels
    method.batch_indices = torch.arange(8) + 8  # other images' classes: another loss
    assert not torch.isclose(method.training_step(images(), gen()).loss, loss)
    method.batch_indices = torch.tensor([0, 1, 2, 3, 4, 5, 6, 64])
    with pytest.raises(TrainingError, match="outside"):
        method.training_step(images(), gen())
    with pytest.raises(ConfigError, match="num_images"):
        make_pic(num_images=None)


def test_ranks_mean_loss_and_gradient_are_the_global_ones():
    """Why PIC needs no gather under data parallelism: rank r scores its slice of the views (its share of the
    draws) against all N classes; the mean of the 2 ranks' losses and gradients is the 1-process one."""
    from selfsight import distributed

    torch.manual_seed(0)
    method = make_pic(TINY_VIT)  # no BatchNorm: the engine synchronises it across ranks, here there are none
    labels = torch.arange(8) * 5 % 64
    method.batch_indices = labels
    whole = method.training_step(images(), gen(2)).loss
    whole.backward()
    expected = [p.grad.clone() for p in method.parameters() if p.grad is not None]
    method.zero_grad(set_to_none=True)
    halves = []
    for r in range(2):
        with distributed.rank_share_of_draws(r, 2):
            method.batch_indices = labels[r * 4:(r + 1) * 4]
            halves.append(method.training_step(images()[r * 4:(r + 1) * 4], gen(2)).loss)
    mean = torch.stack(halves).mean()
    mean.backward()
    assert torch.allclose(mean, whole, atol=1e-6)
    got = [p.grad for p in method.parameters() if p.grad is not None]
    assert len(got) == len(expected)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(got, expected, strict=True))


def test_classifier_memory_is_reported_and_refused_when_too_large(caplog, monkeypatch):
    memory = classifier_memory(1_281_167, 128, 4)  # ImageNet-1k
    assert memory["classifier_gib"] == pytest.approx(16 * 1_281_167 * 128 / 2**30)  # about 2.4 GiB
    with caplog.at_level(logging.INFO, logger="selfsight"):
        make_pic(num_images=1000)
    assert any("PIC classifier: 1000 images x 16 dims" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr("selfsight.methods.pic.device_memory_gib", lambda: 64.0)
    with pytest.raises(ConfigError, match=r"needs 7\.6 GiB .*max_classifier_gib=4"):
        make_pic(num_images=4_000_000, feature_dim=128, max_classifier_gib=4.0)
    monkeypatch.setattr("selfsight.methods.pic.device_memory_gib", lambda: 2.0)  # a small device
    with pytest.raises(ConfigError, match=r"needs 7\.6 GiB .*above the 2\.0 GiB of the training device"):
        make_pic(num_images=4_000_000, feature_dim=128)
    assert make_pic(num_images=100_000, feature_dim=128).classifier.shape == (100_000, 128)  # 0.19 GiB fits


def test_sliding_window_hand_computed():
    perm = torch.tensor([3, 7, 1, 9, 0, 5, 2, 8, 6, 4])
    assert sliding_window(perm, 4, 2, 4).tolist() == perm[[8, 9, 0, 1]].tolist()
    assert sliding_window(perm, 4, 2, 0).tolist() == perm[[0, 1, 2, 3]].tolist()
    assert sliding_window(perm, 4, 2, 5).tolist() == perm[[0, 1, 2, 3]].tolist()  # 10 / 2 windows: back at the start
    with pytest.raises(ConfigError):
        sliding_window(perm, 11, 2, 0)


def official_window(perm: torch.Tensor, window: int, stride: int, k: int) -> torch.Tensor:
    """The official sampler's window k (without shuffle_per_epoch): its modulus is len(self) = window."""
    start = (k * stride) % window
    return perm[(torch.arange(window) + start) % window]


def test_window_slides_through_the_whole_data_set_unlike_the_official_sampler():
    indexer = WindowBatchIndexer(num_images=40, batch_size=4, seed=3, window=16, stride=8)
    assert indexer.batches_per_window == 4
    perm = indexer._perm
    seen: set[int] = set()
    for k in range(5):  # 40 / 8 windows
        batches = [indexer.indices(k * 4 + b) for b in range(4)]
        window = torch.cat(batches)
        assert sorted(window.tolist()) == sorted(sliding_window(perm, 16, 8, k).tolist())  # each image once
        seen |= set(window.tolist())
    assert seen == set(range(40))
    official = set().union(*(official_window(perm, 16, 8, k).tolist() for k in range(5)))
    assert len(official) == 16  # never leaves the first window
    # a pure function of (seed, batch); rank r takes its slice of the global batch, as BatchIndexer
    again = WindowBatchIndexer(num_images=40, batch_size=4, seed=3, window=16, stride=8)
    assert torch.equal(again.indices(13), indexer.indices(13))
    ranks = [WindowBatchIndexer(40, 2, 3, 16, 8, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([r.indices(13) for r in ranks]), indexer.indices(13))


def test_pic_asks_for_the_window_order_cut_to_the_data():
    method = make_pic(window_size=131072, window_stride=16384)
    indexer = method.batch_indexer(256, 32, seed=0)
    assert (indexer.window, indexer.stride) == (256, 256)
    assert make_pic(sliding_window=False).batch_indexer(256, 32, seed=0) is None


# ---------------------------------------------------------------- in the engine


def pic_config(idx_dir, out, **kw):
    base = dict(method="pic", backbone=TINY_CNN[0], backbone_opts=TINY_CNN[1], data=f"{idx_dir}:train", out=str(out),
                steps=6, batch_size=32, log_every=1, ckpt_every=3, device="cpu", num_workers=0, precision="fp32")
    base.update(kw)
    overrides = [f"method.{k}={v}" for k, v in SMALL.items()] + ["method.num_images=256"]
    return build_config(None, overrides, **base)


def losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_resume_repeats_losses(idx_dir, tmp_path):
    whole = tmp_path / "whole"
    Trainer(pic_config(idx_dir, whole), progress=False).fit()
    cut = tmp_path / "cut"
    trainer = Trainer(pic_config(idx_dir, cut), progress=False)
    stop_after_checkpoint(trainer, 3)
    Trainer(pic_config(idx_dir, cut), resume=True, progress=False).fit()
    assert losses(cut) == losses(whole)
    assert all(math.isfinite(v) for v in losses(whole))
    state = load_checkpoint(list_checkpoints(whole)[0])["model"]
    assert state["classifier"].shape == (256, 16)


def test_bf16_export_and_report(idx_dir, tmp_path):
    run = tmp_path / "bf16"
    summary = Trainer(pic_config(idx_dir, run, steps=2, precision="bf16"), progress=False).fit()
    assert summary["skipped_steps"] == 0 and all(math.isfinite(v) for v in losses(run))
    backbone, info = load_run_backbone(run)
    assert info["method"] == "pic"
    exported = export_run(run, tmp_path / "export")
    from safetensors.torch import load_file

    weights = load_file(exported["weights"])
    assert torch.equal(weights["conv1.weight"], backbone.model.conv1.weight)
    assert not any("classifier" in k for k in weights)
    from selfsight.report import write_report

    assert "<td>pic</td>" in write_report([run], tmp_path / "report.html").read_text()
