"""SparK (Tian et al. 2023): sparse BatchNorm on a hand-computed case, masked dense convolution without
leaks on ResNet and ConvNeXt, the masking rule, refusals by layer name, dense behaviour and export left
untouched, and its place in the engine (resume, bf16, compile, reconstructions)."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from safetensors.torch import load_file
from test_mae import losses, resumed_losses_match, run_config
from torch import nn

from selfsight.backbones import Backbone
from selfsight.checkpoint import export_run, load_run_backbone
from selfsight.errors import ConfigError
from selfsight.masking import spark_num_kept
from selfsight.methods.mim import normalise_patches, patchify
from selfsight.methods.spark import SparK
from selfsight.sparse import SparseBatchNorm2d, SparseState, unsupported_modules

# 64 px: a 2x2 grid at the ResNet's and ConvNeXt's downsample ratio 32
RESNET = ("resnet18", {"in_chans": 1, "img_size": 64, "channels": (8, 16, 16, 32)})
CONVNEXT = ("convnext_atto", {"in_chans": 1, "img_size": 64, "dims": (8, 16, 16, 32), "depths": (1, 1, 1, 1)})
CONVNEXT_LINEAR = ("convnext_atto", {**CONVNEXT[1], "conv_mlp": False})  # LayerNorm and Linear on NHWC maps
# output_stride 8: the last two stages dilated at reduction 8, a 4x4 grid at 32 px (the demo's layout)
RESNET_OS8 = ("resnet18", {"in_chans": 1, "img_size": 32, "channels": (8, 16, 16, 32), "output_stride": 8})
SMALL = {"decoder_width": 32}


def make(spec=RESNET, **changes) -> SparK:
    return SparK(Backbone(*spec), SparK.Config(**{**SMALL, **changes}), [0.5], [0.25])


def test_sparse_batchnorm_matches_the_hand_computed_case():
    state = SparseState()
    bn = SparseBatchNorm2d.create(1, state).train()
    x = torch.tensor([[[[1.0, 3.0], [100.0, 100.0]]]])  # active values 1 and 3; masked cells hold 100
    with state.use(torch.tensor([[[[True, True], [False, False]]]])):
        y = bn(x)
    # mean 2, biased variance 1 over the active cells only
    scale = 1 / math.sqrt(1 + 1e-5)
    assert torch.allclose(y[0, 0, 0], torch.tensor([-scale, scale]), atol=1e-6)
    assert torch.equal(y[0, 0, 1], torch.zeros(2))  # exactly zero at the masked cells
    # running statistics with momentum 0.1: mean 0.1 * 2, variance 0.9 * 1 + 0.1 * 2 (unbiased over 2 values)
    assert bn.running_mean.item() == pytest.approx(0.2)
    assert bn.running_var.item() == pytest.approx(1.1)
    assert int(bn.num_batches_tracked) == 1
    # without a mask it is BatchNorm2d
    reference = nn.BatchNorm2d(1)
    reference.load_state_dict(bn.state_dict())
    assert torch.allclose(bn(x), reference(x)) and torch.allclose(bn.running_var, reference.running_var)


def test_sparse_batchnorm_matches_batchnorm1d_on_the_active_rows():
    """The official formulation (``SparseBatchNorm2d`` of SparK's encoder.py): BatchNorm1d on the [N, C] rows of
    the active positions, scattered back into zeros; outputs, running statistics and gradients agree."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 4, 4, generator=generator) * 2 + 1
    active = torch.rand(4, 1, 2, 2, generator=generator) < 0.5
    active[0, 0, 0, 0] = True
    state = SparseState()
    ours = SparseBatchNorm2d.create(3, state)
    reference = nn.BatchNorm1d(3)
    with torch.no_grad():
        for norm in (ours, reference):
            norm.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            norm.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    with state.use(active):
        y = ours(a)
        ii = state.at(4, 4)[:, 0]  # [B, H, W]
    rows = b.permute(0, 2, 3, 1)[ii]
    out = torch.zeros_like(b.permute(0, 2, 3, 1))
    out[ii] = reference(rows)
    expected = out.permute(0, 3, 1, 2)
    assert torch.allclose(y, expected, atol=1e-5)
    assert torch.allclose(ours.running_mean, reference.running_mean)
    assert torch.allclose(ours.running_var, reference.running_var)
    weights = torch.randn(4, 3, 4, 4, generator=generator)
    (y * weights).sum().backward()
    (expected * weights).sum().backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-5)
    assert torch.allclose(ours.weight.grad, reference.weight.grad, atol=1e-5)


def test_mask_keeps_round_of_the_visible_fraction():
    assert spark_num_kept(4, 0.6) == 2 and spark_num_kept(49, 0.6) == 20 and spark_num_kept(16, 0.6) == 6
    model = make()  # 64 px / 32: a 2x2 grid, round(4 * 0.4) = round(1.6) = 2 visible
    mask = model.make_mask(8, torch.Generator().manual_seed(0), "cpu")
    assert mask.shape == (8, 2, 2) and (mask.flatten(1).sum(1) == 2).all()


@pytest.mark.parametrize("spec", [RESNET, CONVNEXT, CONVNEXT_LINEAR, RESNET_OS8],
                         ids=["resnet", "convnext", "convnext-linear", "resnet-dilated"])
def test_masked_pixels_cannot_leak_into_the_encoder(spec):
    torch.manual_seed(0)
    model = make(spec).train()  # batch statistics: the sparse BatchNorm must ignore masked pixels too
    with torch.no_grad():  # random biases and norm parameters: a layer left dense would write at masked positions
        for param in model.backbone.parameters():
            if param.ndim == 1:
                param.normal_()
    size, ratio, cells = spec[1]["img_size"], model.ratio, model.grid[0]
    x = torch.randn(4, 1, size, size)
    mask = model.make_mask(4, torch.Generator().manual_seed(1), x.device)
    active = ~mask.unsqueeze(1)
    pixel_mask = mask.repeat_interleave(ratio, 1).repeat_interleave(ratio, 2).unsqueeze(1)
    changed = torch.where(pixel_mask, torch.randn_like(x) * 9 + 5, x)
    maps, other = model.encode(x, active), model.encode(changed, active)
    assert [m.shape[-1] for m in maps] == [size // 4 // 2**k for k in range(len(maps))][::-1]  # smallest first
    for a, b in zip(maps, other, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
        hidden = (~active).repeat_interleave(a.shape[-1] // cells, 2).repeat_interleave(a.shape[-1] // cells, 3)
        assert torch.equal(a * hidden, torch.zeros_like(a))  # masked positions stay exactly zero
    visible_changed = torch.where(pixel_mask, x, 3 * x + 1)
    assert not torch.allclose(model.encode(visible_changed, active)[-1], maps[-1], atol=1e-3)


def test_dilated_resnet_reads_the_deepest_stage_of_each_reduction():
    """output_stride 16: layer3 and layer4 both at reduction 16; SparK reads layer1, layer2 and layer4."""
    backbone = Backbone("resnet18", {**RESNET_OS8[1], "img_size": 48, "output_stride": 16})
    model = SparK(backbone, SparK.Config(**SMALL), [0.5], [0.25])
    assert [int(backbone.model.feature_info[i]["reduction"]) for i in model.level_indices] == [4, 8, 16]
    assert backbone.model.feature_info[model.level_indices[-1]]["module"] == "layer4"
    assert model.grid == (3, 3) and model.num_kept == 4  # round(9 * 0.4)


def test_loss_reads_masked_patches_only_and_equals_the_formula():
    torch.manual_seed(0)
    model = make()
    x = torch.randn(3, 1, 64, 64)
    mask = model.make_mask(3, torch.Generator().manual_seed(0), x.device)
    loss, prediction, pixel_mask = model(x, mask)
    assert prediction.shape == x.shape
    grad = torch.autograd.grad(loss, prediction)[0]
    visible = ~pixel_mask.unsqueeze(1)
    assert grad[visible].abs().max() == 0 and grad[~visible].abs().min() > 0
    per_patch = ((patchify(prediction, 32) - normalise_patches(patchify(x, 32))) ** 2).mean(-1)
    assert loss.item() == pytest.approx(per_patch[mask.flatten(1)].mean().item(), rel=1e-5)


@pytest.mark.parametrize("spec", [RESNET, CONVNEXT_LINEAR], ids=["resnet", "convnext"])
def test_without_a_mask_the_backbone_is_the_timm_model(spec):
    torch.manual_seed(0)
    model = make(spec)
    reference = timm.create_model(spec[0], num_classes=0, **{k: v for k, v in spec[1].items() if k != "img_size"})
    reference.load_state_dict(model.backbone.model.state_dict())
    x = torch.randn(4, 1, 64, 64)
    for train in (True, False):
        model.backbone.train(train)
        reference.train(train)
        assert torch.allclose(model.backbone(x), reference(x), atol=1e-5)
    assert model.backbone.model.state_dict().keys() == reference.state_dict().keys()


def test_refuses_layers_it_cannot_make_sparse_by_name():
    with pytest.raises(ConfigError, match=r"layer1\.0\.se \(SEModule\)"):
        SparK(Backbone("seresnet18", {"in_chans": 1, "img_size": 64}), SparK.Config(), [0.5], [0.25])
    layers = [("norm", nn.GroupNorm(2, 4)), ("conv", nn.Conv1d(2, 2, 1)), ("bn", nn.BatchNorm2d(2))]
    assert unsupported_modules(layers) == ["norm (GroupNorm)", "conv (Conv1d)"]
    with pytest.raises(ConfigError, match="--method mae"):
        SparK(Backbone("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "depth": 1}), SparK.Config(), [0.5],
              [0.25])
    with pytest.raises(ConfigError, match="multiple of 32"):
        SparK(Backbone("resnet18", {"in_chans": 1, "img_size": 48}), SparK.Config(), [0.5], [0.25])


def test_unused_classifier_parameters_are_frozen_and_every_other_gets_a_gradient():
    model = make(CONVNEXT)
    no_decay = {id(p) for p in model.param_groups(0.05)[1]["params"]}
    assert all(id(token) in no_decay for token in model.mask_tokens)  # like norms and biases
    assert not any(p.requires_grad for p in model.backbone.model.head.parameters())  # ConvNeXt's head norm
    images = torch.randint(0, 256, (4, 1, 64, 64), dtype=torch.uint8)
    model.training_step(images, torch.Generator().manual_seed(0)).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- in the engine


def spark_config(idx_dir, out, spec=RESNET, **kw):
    return run_config(idx_dir, out, method="spark", backbone=spec, small=SMALL, **kw)


def test_resume_repeats_losses_bit_for_bit(idx_dir, tmp_path):
    resumed_losses_match(lambda out: spark_config(idx_dir, out), tmp_path)


def test_export_is_the_plain_timm_model(idx_dir, tmp_path):
    from selfsight.engine import pretrain

    run = tmp_path / "spark"
    pretrain(spark_config(idx_dir, run, steps=2), progress=False)
    backbone, _ = load_run_backbone(run)
    exported = export_run(run, tmp_path / "export")
    model = timm.create_model(RESNET[0], pretrained=False, num_classes=0, **exported["model_args"])
    result = model.load_state_dict(load_file(exported["weights"]), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    model.eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), backbone(x), atol=1e-5)
    assert int(model.bn1.num_batches_tracked) == 2  # the sparse BatchNorm's running statistics were trained


def test_bf16_and_compile_runs(idx_dir, tmp_path, monkeypatch):
    from selfsight.engine import pretrain

    for name, spec in (("resnet", RESNET), ("convnext", CONVNEXT)):
        bf16 = tmp_path / f"bf16-{name}"
        pretrain(spark_config(idx_dir, bf16, spec=spec, steps=2, precision="bf16"), progress=False)
        assert all(math.isfinite(v) for v in losses(bf16))
    original = torch.compile  # dynamo's eager backend (see test_engine)
    monkeypatch.setattr(torch, "compile", lambda model, **kw: original(model, **{**kw, "backend": "eager"}))
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    pretrain(spark_config(idx_dir, plain, steps=2), progress=False)
    pretrain(spark_config(idx_dir, compiled, steps=2, compile=True), progress=False)
    assert losses(compiled) == pytest.approx(losses(plain), rel=1e-5)


def test_reconstructions(idx_dir, tmp_path):
    from selfsight.diagnostics.reconstruct import reconstruct
    from selfsight.engine import pretrain

    run = tmp_path / "spark"
    pretrain(spark_config(idx_dir, run, steps=1), progress=False)
    images = torch.randint(0, 256, (3, 1, 64, 64), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    result, note = reconstruct(run, images)
    assert note is None and "own mean and std" in result.label
    visible = ~result.pixel_mask.unsqueeze(1)
    assert torch.equal(result.reconstruction[visible], result.original[visible])
    assert result.mask_ratio == pytest.approx(0.5) and math.isfinite(result.loss)
