"""MAE (He et al. 2022): the loss on hand-computed cases, token dropping without leaks, the masking rule,
backbone refusals, and its place in the engine (resume, bf16, compile, export, reconstructions)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY_VIT, stop_after_checkpoint
from safetensors.torch import load_file

from selfsight.backbones import Backbone
from selfsight.checkpoint import export_run, load_run_backbone
from selfsight.config import build_config
from selfsight.engine import Trainer, pretrain
from selfsight.errors import ConfigError
from selfsight.masking import keep_mask, mae_num_kept, random_mask
from selfsight.methods.mae import MAE, sincos_pos_embed_2d
from selfsight.methods.mim import masked_patch_mse, normalise_patches, patchify

SMALL_DECODER = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}


def make(name: str = TINY_VIT[0], opts: dict | None = None, **changes) -> MAE:
    backbone = Backbone(name, TINY_VIT[1] if opts is None else opts)
    c = backbone.in_chans
    return MAE(backbone, MAE.Config(**{**SMALL_DECODER, **changes}), [0.5] * c, [0.25] * c)


def run_config(idx_dir: Path, out: Path, method: str = "mae", backbone=TINY_VIT, small: dict | None = None, **kw):
    """A tiny engine run of ``method`` (6 steps, batch 32, checkpoints every 3, fp32)."""
    base = dict(
        method=method, backbone=backbone[0], backbone_opts=backbone[1], data=f"{idx_dir}:train", out=str(out),
        steps=6, batch_size=32, log_every=1, ckpt_every=3, device="cpu", num_workers=0, precision="fp32",
    )
    base.update(kw)
    small = SMALL_DECODER if small is None else small
    return build_config(None, [f"method.{k}={json.dumps(v)}" for k, v in small.items()], **base)


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def resumed_losses_match(make_config, tmp_path: Path) -> None:
    """A run stopped after its step-3 checkpoint and resumed repeats the uninterrupted run's losses bit for bit
    (the pattern of test_methods.test_resume_repeats_losses_with_queues_and_centres)."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    pretrain(make_config(whole), progress=False)
    trainer = Trainer(make_config(cut), progress=False)
    stop_after_checkpoint(trainer, 3)
    pretrain(make_config(cut), resume=True, progress=False)
    assert len(losses(whole)) == 6
    assert losses(cut) == losses(whole)


# ---------------------------------------------------------------- the loss


def test_norm_pix_loss_matches_the_hand_computed_case():
    # one image, two 4-value patches: patch 0 = [0, 0, 2, 2] masked, patch 1 = [5, 5, 5, 5] visible, prediction 0
    target = torch.tensor([[[0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 5.0, 5.0]]])
    prediction = torch.zeros_like(target)
    mask = torch.tensor([[1, 0]])
    # unbiased variance 4/3: each value normalised to +-1 / sqrt(4/3 + 1e-6); biased (1) would give 1.0
    expected = 0.75 * (4 / 3) / (4 / 3 + 1e-6)
    assert masked_patch_mse(prediction, normalise_patches(target), mask).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.7499995, abs=1e-7)
    assert masked_patch_mse(prediction, target, mask).item() == pytest.approx(2.0)  # raw pixels: (0+0+4+4) / 4
    # a loss over both patches would see the visible one: (2 + 25) / 2 = 13.5
    assert masked_patch_mse(prediction, target, torch.ones(1, 2)).item() == pytest.approx(13.5)


def test_patchify_puts_each_patch_in_one_row():
    image = torch.tensor([[[[0.0, 0.0, 5.0, 5.0], [2.0, 2.0, 5.0, 5.0]]]])  # [1, 1, 2, 4]: two 2x2 patches
    assert torch.equal(patchify(image, 2), torch.tensor([[[0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 5.0, 5.0]]]))


def test_method_loss_reads_masked_patches_only_and_equals_the_formula():
    torch.manual_seed(0)
    model = make()
    x = torch.randn(3, 1, 16, 16)
    mask = model.make_mask(3, torch.Generator().manual_seed(0), x.device)
    loss, prediction, pixel_mask = model(x, mask)
    assert prediction.shape == x.shape and pixel_mask.shape == (3, 16, 16)
    grad = torch.autograd.grad(loss, prediction)[0]
    visible = ~pixel_mask.unsqueeze(1)
    assert grad[visible].abs().max() == 0 and grad[~visible].abs().min() > 0
    pred, target = patchify(prediction, 4), normalise_patches(patchify(x, 4))
    expected = ((pred - target) ** 2).mean(-1)[mask.flatten(1)].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------- masking and the encoder


def test_mask_count_follows_mae_rule():
    assert mae_num_kept(196, 0.75) == 49 and mae_num_kept(16, 0.75) == 4 and mae_num_kept(49, 0.6) == 19
    # where the rules part: int(15 * (1 - 0.8)) = int(2.9999999999999996) = 2 kept (13 masked), whereas
    # random_mask masks ceil(15 * 0.8) = 12
    assert mae_num_kept(15, 0.8) == 2
    assert int(random_mask(1, 15, 0.8).sum()) == 12
    assert (keep_mask(5, 15, 2, torch.Generator().manual_seed(0)).sum(1) == 13).all()
    model = make()  # 4x4 grid, ratio 0.75: int(16 * 0.25) = 4 visible, 12 masked
    mask = model.make_mask(6, torch.Generator().manual_seed(2), "cpu")
    assert mask.shape == (6, 4, 4) and (mask.flatten(1).sum(1) == 12).all()
    assert not torch.equal(mask[0], mask[1])
    # the visible patches are MAE's: ids_shuffle = argsort(noise), the first len_keep kept
    noise = torch.rand(6, 16, generator=torch.Generator().manual_seed(2))
    kept = noise.argsort(dim=1)[:, :4].sort(dim=1).values
    assert torch.equal((~mask.flatten(1)).nonzero()[:, 1].view(6, 4), kept)
    with pytest.raises(ConfigError, match="no visible"):
        mae_num_kept(4, 0.9)


@pytest.mark.parametrize("extra", [{}, {"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"},
                                   {"no_embed_class": True, "reg_tokens": 1}],
                         ids=["cls", "cls+reg", "no-prefix", "no-embed-class"])
def test_visible_encoding_does_not_see_masked_pixels(extra):
    torch.manual_seed(0)
    model = make(opts={**TINY_VIT[1], **extra}).eval()
    prefix = model.num_prefix
    assert prefix == (0 if extra.get("class_token") is False else 1) + extra.get("reg_tokens", 0)
    x = torch.randn(2, 1, 16, 16)
    mask = model.make_mask(2, torch.Generator().manual_seed(1), x.device)
    pixel_mask = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)
    changed = torch.where(pixel_mask, torch.randn_like(x) * 9, x)
    keep = (~mask.flatten(1)).nonzero()[:, 1].view(2, -1)
    # with every patch kept in order, the wrapped encoder is timm's own forward_features
    every = torch.arange(16).expand(2, -1)
    assert torch.allclose(model.encode(x, every), model.backbone.model.forward_features(x), atol=1e-5)
    a, b = model.encode(x, keep), model.encode(changed, keep)
    assert a.shape == (2, prefix + 4, 32)
    assert torch.allclose(a, b, atol=1e-6)
    # a visible pixel does change the encoding
    visible = torch.where(pixel_mask, x, x + 1)
    assert not torch.allclose(model.encode(visible, keep), a, atol=1e-3)
    loss, _, _ = model(x, mask)
    assert math.isfinite(loss.item())


def test_unused_classifier_parameters_are_frozen_and_every_other_gets_a_gradient():
    model = make(opts={**TINY_VIT[1], "class_token": False, "global_pool": "avg"})  # fc_norm: the classifier's
    assert not any(p.requires_grad for p in model.backbone.model.fc_norm.parameters())
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    model.training_step(images, torch.Generator().manual_seed(0)).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # DDP needs every one


def test_sincos_decoder_embedding_is_fixed_and_follows_mae():
    emb = sincos_pos_embed_2d(8, (2, 3), num_prefix=1)
    assert emb.shape == (1, 7, 8) and torch.equal(emb[0, 0], torch.zeros(8))
    # position (row 1, col 2): [sin(2w), cos(2w)] for the column, then [sin(1w), cos(1w)] for the row, w = [1, 1e-2]
    w = torch.tensor([1.0, 0.01])
    expected = torch.cat([(2 * w).sin(), (2 * w).cos(), w.sin(), w.cos()])
    assert torch.allclose(emb[0, 1 + 5], expected, atol=1e-6)
    model = make()
    assert "decoder_pos_embed" not in dict(model.named_parameters())


def test_decoder_defaults_paper_for_wide_encoders_smaller_otherwise():
    # the tiny test ViT is 32 wide: the decoder's floor of 32 wide, one block, one head
    small = MAE(Backbone(*TINY_VIT), MAE.Config(), [0.5], [0.25])
    assert small.decoder_embed.out_features == 32 and len(small.decoder_blocks) == 1
    assert small.decoder_blocks[0].attn.num_heads == 1
    # a 128-wide ViT (the demo's width): half its width, 64, two heads
    opts = {**TINY_VIT[1], "embed_dim": 128, "num_heads": 4, "depth": 1}
    half = MAE(Backbone(TINY_VIT[0], opts), MAE.Config(), [0.5], [0.25])
    assert half.decoder_embed.out_features == 64 and half.decoder_blocks[0].attn.num_heads == 2
    assert half.decoder_pred.out_features == 4 * 4 * 1


@pytest.mark.parametrize("name,opts,hint", [
    ("swin_tiny_patch4_window7_224", {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 16,
                                      "depths": (1, 1), "num_heads": (1, 2)}, "simmim"),
    ("resnet18", {"in_chans": 1}, "spark"),
    ("convnext_atto", {}, "spark"),
    (TINY_VIT[0], {**TINY_VIT[1], "dynamic_img_size": True}, "dynamic_img_size"),
    (TINY_VIT[0], {**TINY_VIT[1], "patch_drop_rate": 0.5}, "patch_drop_rate"),
])
def test_refuses_what_cannot_drop_tokens(name, opts, hint):
    with pytest.raises(ConfigError, match=hint):
        MAE(Backbone(name, opts), MAE.Config(), [0.5], [0.25])


# ---------------------------------------------------------------- in the engine


def test_resume_repeats_losses_bit_for_bit(idx_dir, tmp_path):
    resumed_losses_match(lambda out: run_config(idx_dir, out), tmp_path)


def test_export_loads_in_timm_with_the_same_features(idx_dir, tmp_path):
    run = tmp_path / "mae"
    pretrain(run_config(idx_dir, run, steps=2), progress=False)
    backbone, _ = load_run_backbone(run)
    exported = export_run(run, tmp_path / "export")
    model = timm.create_model(TINY_VIT[0], pretrained=False, num_classes=0, **exported["model_args"])
    result = model.load_state_dict(load_file(exported["weights"]), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    model.eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), backbone(x), atol=1e-6)
    trained = torch.load(backbone_ckpt(run), weights_only=False)["model"]["backbone.model.pos_embed"]
    assert torch.equal(model.pos_embed, trained)


def backbone_ckpt(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step-*.pt"))[-1]


def test_bf16_and_compile_runs(idx_dir, tmp_path, monkeypatch):
    bf16 = tmp_path / "bf16"
    pretrain(run_config(idx_dir, bf16, steps=2, precision="bf16"), progress=False)
    assert all(math.isfinite(v) for v in losses(bf16))
    original = torch.compile  # dynamo's eager backend: the wiring, not inductor's code generation (see test_engine)
    monkeypatch.setattr(torch, "compile", lambda model, **kw: original(model, **{**kw, "backend": "eager"}))
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    pretrain(run_config(idx_dir, plain, steps=2), progress=False)
    pretrain(run_config(idx_dir, compiled, steps=2, compile=True), progress=False)
    assert losses(compiled) == pytest.approx(losses(plain), rel=1e-5)


def test_reconstructions_are_de_normalised_with_each_patch_statistics(idx_dir, tmp_path):
    from selfsight.diagnostics.reconstruct import reconstruct

    run = tmp_path / "mae"
    pretrain(run_config(idx_dir, run, steps=1), progress=False)
    images = torch.randint(0, 256, (3, 1, 16, 16), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    result, note = reconstruct(run, images)
    assert note is None and "own mean and std" in result.label
    assert result.reconstruction.shape == (3, 1, 16, 16)
    visible = ~result.pixel_mask.unsqueeze(1)
    assert torch.equal(result.reconstruction[visible], result.original[visible])
    assert result.mask_ratio == pytest.approx(12 / 16)
    # to_pixels inverts the norm-pix target exactly: a prediction equal to the target gives the image back
    model = make()
    x = torch.randn(2, 1, 16, 16)
    target = normalise_patches(patchify(x, 4))
    from selfsight.methods.mim import unpatchify

    assert torch.allclose(model.to_pixels(x, unpatchify(target, 4, 1, (4, 4))), x, atol=1e-5)
