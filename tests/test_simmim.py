import pytest
import torch
from conftest import TINY_VIT

from selfsight.backbones import Backbone, parse_backbone_opts
from selfsight.errors import ConfigError
from selfsight.methods.simmim import SimMIM, masked_l1_loss

SWIN = (
    "swin_tiny_patch4_window7_224",
    "img_size=32 patch_size=2 window_size=4 in_chans=3 embed_dim=16 depths=1,1,2 num_heads=1,2,4",
)
SWINV2 = (
    "swinv2_tiny_window8_256",
    "img_size=32 patch_size=2 window_size=4 in_chans=1 embed_dim=16 depths=1,1 num_heads=1,2",
)


def make(name: str, opts: dict) -> SimMIM:
    backbone = Backbone(name, opts)
    c = backbone.in_chans
    return SimMIM(backbone, SimMIM.Config(), [0.5] * c, [0.25] * c)


def test_masked_l1_matches_hand_computed_case():
    target = torch.zeros(1, 2, 2, 2)
    prediction = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.0], [0.5, 8.0]]]])
    mask = torch.tensor([[[1, 0], [1, 0]]])
    # masked pixels: (0,0) and (1,0) in both channels: |1| + |3| + |-1| + |0.5| = 5.5 over 2 pixels * 2 channels
    assert masked_l1_loss(target, prediction, mask).item() == pytest.approx(5.5 / 4)


@pytest.mark.parametrize("spec", ["vit", SWIN, SWINV2])
def test_shapes_and_loss_ignores_unmasked_pixels(spec):
    name, opts = TINY_VIT if spec == "vit" else (spec[0], parse_backbone_opts(spec[1].split()))
    torch.manual_seed(0)
    model = make(name, opts)
    b = model.backbone
    x = torch.randn(3, b.in_chans, b.img_size, b.img_size)
    mask = model.make_mask(3, torch.Generator().manual_seed(0), x.device)
    assert mask.shape == (3, *b.grid_size)
    loss, prediction, pixel_mask = model(x, mask)
    assert prediction.shape == x.shape
    assert pixel_mask.shape == (3, b.img_size, b.img_size)
    assert torch.equal(pixel_mask, mask.repeat_interleave(b.patch_size, 1).repeat_interleave(b.patch_size, 2))
    grad = torch.autograd.grad(loss, prediction)[0]
    unmasked = ~pixel_mask.unsqueeze(1).expand_as(grad)
    assert grad[unmasked].abs().max() == 0  # predictions on visible pixels do not affect the loss
    assert grad[~unmasked].abs().min() > 0
    # the loss equals the formula on masked pixels written out with boolean indexing
    masked = pixel_mask.unsqueeze(1).expand_as(x)
    assert loss.item() == pytest.approx((x - prediction)[masked].abs().mean().item(), rel=1e-5)


def test_mask_token_replaces_masked_patch_embeddings():
    torch.manual_seed(0)
    model = make(*TINY_VIT)
    x = torch.randn(2, 1, 16, 16)
    mask = model.make_mask(2, torch.Generator().manual_seed(1), x.device)
    # changing the pixels of masked patches changes nothing: they are replaced by the mask token
    x2 = x.clone()
    x2[mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1)] = 5.0
    model.eval()
    assert torch.allclose(
        model.backbone.forward_map(x, mask, model.mask_token),
        model.backbone.forward_map(x2, mask, model.mask_token),
        atol=1e-6,
    )


def test_default_mask_patch_size_and_ratio_on_the_real_batch():
    model = make(*TINY_VIT)  # 16 px, patch 4 -> mask patch 4, 16 mask patches, ceil(9.6) = 10 masked
    assert model.mask_patch_size == 4
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    out = model.training_step(images, torch.Generator().manual_seed(0))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    mask = model.make_mask(4, torch.Generator().manual_seed(0), images.device)
    assert (mask.flatten(1).sum(1) == 10).all()


@pytest.mark.parametrize("name,opts", [("resnet18", {"in_chans": 1}), ("convnext_atto", {})])
def test_simmim_refuses_cnn(name, opts):
    with pytest.raises(ConfigError, match="SimMIM needs a ViT, Swin or SwinV2"):
        make(name, opts)


def test_unknown_backbone_suggests_names():
    with pytest.raises(ConfigError, match="unknown backbone 'vit_tiny_patch16_2244'.*vit_tiny_patch16_224"):
        Backbone("vit_tiny_patch16_2244")
