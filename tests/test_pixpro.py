"""PixPro: hand-computed losses and propagation, the positive pairs against the official formula, views that
carry their crop boxes, the momentum encoder, and the method in the engine (resume, bf16, export, eval,
diagnose, report). Reference: zdaxie/PixPro ``contrast/models/PixPro.py`` (``regression_loss``, ``featprop``)
and ``contrast/data/transform_coord.py`` (a flip swaps x1 and x2)."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT, stop_after_checkpoint
from test_methods import SMALL, TINY_CNN, cnn_config

from selfsight import distributed
from selfsight.backbones import Backbone
from selfsight.checkpoint import export_run, load_run_backbone
from selfsight.data.views import ViewSpec, make_views, make_views_with_params, sample_view
from selfsight.data.worker_views import PreparedViews, worker_views_for
from selfsight.ema import cosine_momentum
from selfsight.engine import Trainer, pretrain, step_generator
from selfsight.errors import ConfigError
from selfsight.methods.pixpro import (
    PixelPropagation,
    PixPro,
    bin_centres,
    pixpro_loss,
    positive_pairs,
    view_geometry,
)
from selfsight.registry import create_method

CNN64 = (TINY_CNN[0], {**TINY_CNN[1], "img_size": 64})  # a 2x2 feature map at stride 32
SWIN = ("swin_tiny_patch4_window7_224", {"img_size": 32, "patch_size": 2, "window_size": 4, "in_chans": 1,
                                         "embed_dim": 16, "depths": (1, 1, 2), "num_heads": (1, 2, 4)})


def params(boxes, flip) -> torch.Tensor:
    """A view's geometry [B, 5] (left, top, width, height, flip), what positive_pairs reads."""
    boxes = torch.tensor(boxes, dtype=torch.float32).view(-1, 4)
    return torch.cat([boxes, torch.tensor(flip, dtype=torch.float32).view(-1, 1)], dim=1)


def make(backbone_spec=CNN64, **changes) -> PixPro:
    torch.manual_seed(0)
    backbone = Backbone(*backbone_spec)
    return create_method("pixpro", backbone, PixPro.Config(**{**SMALL["pixpro"], **changes}), [0.5], [0.25])


def images(size: int = 64, batch: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 1, size, size), generator=torch.Generator().manual_seed(0)).to(torch.uint8)


# ---------------------------------------------------------------- the loss, by hand


def test_loss_of_identical_boxes_is_minus_two_per_direction():
    # 2x2 maps, the same box (0, 0, 64, 64) in both views: bins of 32 px, diagonal 45.25 px; neighbouring cells
    # are 32 px apart, 0.707 diagonals > 0.7, so only cell i of view 1 and cell i of view 2 are positive
    same = params([0, 0, 64, 64], [False])
    pos = positive_pairs(same, same, 2, 2)
    assert torch.equal(pos[0], torch.eye(4))
    q = torch.randn(1, 8, 2, 2, generator=torch.Generator().manual_seed(1))
    assert pixpro_loss(q, q.clone(), pos).item() == pytest.approx(-2.0, abs=1e-5)  # one direction
    symmetric = pixpro_loss(q, q, pos) + pixpro_loss(q, q, pos.transpose(1, 2))  # what training_step sums
    assert symmetric.item() == pytest.approx(-4.0, abs=1e-5)
    assert pixpro_loss(q, -q, pos).item() == pytest.approx(2.0, abs=1e-5)  # the other end of [-2, 2]


def test_flipped_view_pairs_mirrored_cells():
    # view 2: the same box, mirrored; its feature map is view 1's mirrored: cell (r, c) of view 2 shows what
    # cell (r, 1 - c) of view 1 shows, and the positive pairs say so
    pos = positive_pairs(params([0, 0, 64, 64], [False]), params([0, 0, 64, 64], [True]), 2, 2)
    assert torch.equal(pos[0], torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]))
    # left column a, right column b, cos(a, b) = 0.01
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.01, math.sqrt(1 - 0.01**2)])
    q = torch.stack([torch.stack([a, b]), torch.stack([a, b])]).permute(2, 0, 1).unsqueeze(0)  # [1, 2, 2, 2]
    assert pixpro_loss(q, q.flip(-1), pos).item() == pytest.approx(-2.0, abs=1e-5)  # k really mirrored
    # k flagged as flipped but its map not mirrored: every positive pair is an (a, b) pair, -2 * 0.01
    assert pixpro_loss(q, q, pos).item() == pytest.approx(-0.02, abs=1e-6)


def test_no_positive_pair_gives_zero_and_the_mean_is_over_images():
    far = positive_pairs(params([0, 0, 16, 16], [False]), params([40, 40, 16, 16], [False]), 2, 2)
    assert far.sum() == 0
    q = torch.randn(1, 4, 2, 2)
    assert pixpro_loss(q, q, far).item() == 0.0
    same = positive_pairs(params([0, 0, 64, 64], [False]), params([0, 0, 64, 64], [False]), 2, 2)
    both = torch.cat([same, far])
    assert pixpro_loss(torch.cat([q, q]), torch.cat([q, q]), both).item() == pytest.approx(-1.0, abs=1e-5)


def official_positives(box_q, flip_q, box_k, flip_k, size, pos_ratio):
    """The official ``regression_loss`` mask, written from its coordinates (x1, y1, x2, y2): a flip swaps x1
    and x2; bin width (x2 - x1) / W; centre (i + 0.5) * bin + x1; distance over the larger bin diagonal."""
    def coords(box, flip):
        left, top, w, h = box
        x1, x2 = (left + w, left) if flip else (left, left + w)
        return x1, top, x2, top + h

    q, k = coords(box_q, flip_q), coords(box_k, flip_k)
    bw_q, bh_q, bw_k, bh_k = (q[2] - q[0]) / size, (q[3] - q[1]) / size, (k[2] - k[0]) / size, (k[3] - k[1]) / size
    diag = max(math.hypot(bw_q, bh_q), math.hypot(bw_k, bh_k))
    mask = torch.zeros(size * size, size * size)
    for i in range(size * size):
        for j in range(size * size):
            cq = ((i % size + 0.5) * bw_q + q[0], (i // size + 0.5) * bh_q + q[1])
            ck = ((j % size + 0.5) * bw_k + k[0], (j // size + 0.5) * bh_k + k[1])
            mask[i, j] = float(math.dist(cq, ck) / diag < pos_ratio)
    return mask


def test_positive_pairs_match_the_official_formula_on_random_boxes():
    generator = torch.Generator().manual_seed(0)
    spec = ViewSpec(size=32, crop_scale=(0.08, 1.0), hflip_p=0.5)
    view_q = sample_view(16, 100, 100, spec, generator=generator)
    view_k = sample_view(16, 100, 100, spec, generator=generator)
    mask = positive_pairs(view_geometry(view_q), view_geometry(view_k), 3, 3, pos_ratio=0.7)
    assert mask.shape == (16, 9, 9) and 0 < mask.sum() < mask.numel()
    for b in range(16):
        expected = official_positives(view_q.boxes[b].double().tolist(), bool(view_q.flip[b]),
                                      view_k.boxes[b].double().tolist(), bool(view_k.flip[b]), 3, 0.7)
        assert torch.equal(mask[b], expected), b


def test_bin_centres_are_where_the_view_samples_the_image():
    # a 2-channel ramp image (x and y coordinates of the pixel centres) seen through views without colour
    # changes: pixel (r, c) of a size-s view holds the centre of bin (r, c) of an s x s map (minus the half
    # pixel from pixel-edge to pixel-centre units), flipped or not
    side, size = 64, 16
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                            indexing="ij")
    ramp = (torch.stack([xs, ys]) / 255).expand(6, -1, -1, -1)
    spec = ViewSpec(size=size, crop_scale=(0.5, 1.0), hflip_p=0.5, jitter_p=0.0, grayscale_p=0.0)
    generator = torch.Generator().manual_seed(3)
    (view,), (geometry,) = make_views_with_params(ramp, [spec], [0.0, 0.0], [1.0, 1.0], generator=generator)
    assert 0 < int(geometry.flip.sum()) < 6
    centres = bin_centres(geometry.boxes, geometry.flip, size, size).view(6, size, size, 2).permute(0, 3, 1, 2)
    assert torch.allclose(view * 255, (centres - 0.5).float(), atol=2e-3)


def test_views_with_params_are_make_views_and_leave_the_generator_as_it_does():
    specs = [ViewSpec(size=16), ViewSpec(size=16, blur_p=1.0)]
    one, two = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    views, geometry = make_views_with_params(images(32), specs, [0.5], [0.25], generator=one)
    expected = make_views(images(32), specs, [0.5], [0.25], generator=two)
    assert all(torch.equal(a, b) for a, b in zip(views, expected, strict=True))
    assert torch.equal(one.get_state(), two.get_state())
    replay = torch.Generator().manual_seed(5)
    first = sample_view(8, 32, 32, specs[0], generator=replay)
    assert torch.equal(geometry[0].boxes, first.boxes) and torch.equal(geometry[0].flip, first.flip)


# ---------------------------------------------------------------- the pixel propagation module


def test_propagation_of_orthogonal_features_is_the_transform():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 2)  # pixels a = [1, 0], b = [0, 1]
    identity = PixelPropagation(2, gamma=2.0, layers=0)
    assert torch.equal(identity(x), x)  # s = identity, g = identity: the input
    conv = PixelPropagation(2, gamma=2.0, layers=1)
    assert torch.allclose(conv(x), F.normalize(conv.transform(x), dim=1), atol=1e-6)  # g(x) / |g(x)|
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]]).T.reshape(1, 2, 1, 2)  # cos -1, clamped to 0
    assert torch.equal(identity(opposite), opposite)


def test_propagation_weights_are_clamped_cosines_squared_without_normalisation():
    # a = [1, 0], b = [1, 1] / sqrt 2: cos 1/sqrt 2, s = 1/2; y_a = a + b / 2, y_b = a / 2 + b
    root = 1 / math.sqrt(2)
    x = torch.tensor([[1.0, 0.0], [root, root]]).T.reshape(1, 2, 1, 2)
    y = PixelPropagation(2, gamma=2.0, layers=0)(x).reshape(2, 2).T
    assert torch.allclose(y, torch.tensor([[1 + root / 2, root / 2], [0.5 + root, root]]), atol=1e-6)
    y1 = PixelPropagation(2, gamma=1.0, layers=0)(x).reshape(2, 2).T  # gamma 1: s = 1/sqrt 2
    assert torch.allclose(y1[0], torch.tensor([1 + root * root, root * root]), atol=1e-6)
    with pytest.raises(ConfigError, match="transform_layers"):
        PixelPropagation(2, layers=3)


# ---------------------------------------------------------------- the method


@pytest.mark.parametrize("backbone_spec", [CNN64, TINY_VIT, SWIN], ids=["cnn", "vit", "swin"])
def test_step_trains_the_online_network_on_the_feature_map(backbone_spec):
    method = make(backbone_spec, instance_weight=1.0)
    size = backbone_spec[1]["img_size"]
    out = method.training_step(images(size), torch.Generator().manual_seed(0))
    assert math.isfinite(out.loss.item()) and -6 <= out.loss.item() <= 6  # [-4, 4] plus the instance [-4, 4]
    assert out.metrics["positive_pairs"] > 0 and 0 < out.metrics["embed_std_norm"] < 2
    out.loss.backward()
    online = [p for n, p in method.named_parameters() if n.startswith(("backbone.", "propagation.", "instance_"))]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in online)
    assert method.propagation.transform.weight.grad.abs().sum() > 0
    targets = [p for n, p in method.named_parameters() if n.startswith("target_")]
    assert targets and all(not p.requires_grad and p.grad is None for p in targets)


def test_training_step_loss_is_the_two_directions_of_the_hand_checked_loss():
    method = make()
    out = method.training_step(images(), torch.Generator().manual_seed(2))
    (x1, x2), (g1, g2) = method.views_with_geometry(images(), torch.Generator().manual_seed(2))
    with torch.no_grad():
        p1 = method.propagation(method.projector(method.backbone.forward_map(x1)))
        p2 = method.propagation(method.projector(method.backbone.forward_map(x2)))
        k1 = method.target_projector(method.target_backbone.forward_map(x1))
        k2 = method.target_projector(method.target_backbone.forward_map(x2))
    pos = positive_pairs(g1, g2, 2, 2)
    expected = pixpro_loss(p1, k2, pos) + pixpro_loss(p2, k1, pos.transpose(1, 2))
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_momentum_encoder_follows_the_cosine_schedule():
    method = make(instance_weight=0.5)
    online, target = method.projector[0].weight, method.target_projector[0].weight
    assert torch.equal(online, target)
    with torch.no_grad():
        online.add_(1.0)
        method.instance_projector[0].weight.add_(1.0)
    before = target.clone()
    method.on_step_end(step=4, total_steps=10)
    m = cosine_momentum(5, 10, 0.99)
    assert torch.allclose(target, m * before + (1 - m) * online, atol=1e-6)
    assert not torch.equal(method.target_instance_projector[0].weight, method.instance_projector[0].weight)
    assert PixPro.Config().base_momentum == 0.99 and PixPro.Config().pos_ratio == 0.7


@pytest.mark.parametrize("rank", [0, 1])
def test_worker_built_views_carry_their_geometry_bit_for_bit(rank):
    """What a DataLoader worker ships for rank ``rank`` of 2 (``WorkerViews.prepare``, as in
    test_worker_views.py) gives the views, geometry, generator state and loss of the training process."""
    method = make()
    batch = images(batch=8)[rank * 4:(rank + 1) * 4]
    prepared = worker_views_for(method, torch.device("cpu"), partial(step_generator, 7)).prepare(batch, 3, rank, 2)
    assert isinstance(prepared, PreparedViews)
    with distributed.rank_share_of_draws(rank, 2):
        here, there = step_generator(7, 3), step_generator(7, 3)
        views, geometry = method.views_with_geometry(batch, here)
        shipped_views, shipped_geometry = method.views_with_geometry(prepared, there)
        assert all(torch.equal(a, b) for a, b in zip(views + geometry, shipped_views + shipped_geometry, strict=True))
        assert torch.equal(here.get_state(), there.get_state())
        assert geometry[0].shape == (4, 5) and len(views) == 2 and views[0].shape == (4, 1, 64, 64)
        method.eval()  # running statistics: the two steps see the same function
        loss = method.training_step(batch, step_generator(7, 3)).loss
        assert torch.equal(loss, method.training_step(prepared, step_generator(7, 3)).loss)


def test_other_families_are_refused(monkeypatch):
    backbone = Backbone(*CNN64)
    monkeypatch.setattr(backbone, "family", "other")
    with pytest.raises(ConfigError, match="feature map"):
        create_method("pixpro", backbone, PixPro.Config(**SMALL["pixpro"]), [0.5], [0.25])


# ---------------------------------------------------------------- in the engine


def pixpro_config(idx_dir, out, **kw):
    return cnn_config(idx_dir, out, "pixpro", backbone_opts=CNN64[1], **kw)


def losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_resume_repeats_losses_bit_for_bit(idx_dir, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    pretrain(pixpro_config(idx_dir, whole), progress=False)
    trainer = Trainer(pixpro_config(idx_dir, cut), progress=False)
    stop_after_checkpoint(trainer, 3)
    pretrain(pixpro_config(idx_dir, cut), resume=True, progress=False)
    assert len(losses(whole)) == 6 and losses(cut) == losses(whole)
    assert all(-4 <= v <= 4 for v in losses(whole))


def test_bf16_export_eval_diagnose_and_report(idx_dir, tmp_path):
    from safetensors.torch import load_file

    from selfsight.diagnostics.api import diagnose
    from selfsight.eval.api import EvalConfig, evaluate
    from selfsight.report import write_report

    run = tmp_path / "bf16"
    summary = pretrain(pixpro_config(idx_dir, run, steps=2, precision="bf16"), progress=False)
    assert summary["skipped_steps"] == 0 and all(math.isfinite(v) for v in losses(run))
    backbone, info = load_run_backbone(run)
    assert info["method"] == "pixpro"
    weights = load_file(export_run(run, tmp_path / "export")["weights"])
    assert torch.equal(weights["conv1.weight"], backbone.model.conv1.weight)  # the online backbone
    assert not any("projector" in k or "propagation" in k for k in weights)
    record = evaluate(EvalConfig(kind="knn", run=str(run), train_data=f"{idx_dir}:train", test_data=f"{idx_dir}:test",
                                 device="cpu", out=str(tmp_path / "eval"), draws=1, progress=False))
    assert 0.0 <= record["top1"] <= 1.0
    assert diagnose(run, num_images=16, device="cpu", progress=False)["method"] == "pixpro"
    assert "<td>pixpro</td>" in write_report([run], tmp_path / "report.html").read_text()
