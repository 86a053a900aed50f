"""The backbone wrapper's own behaviour: the bf16 guard on strided convolutions over one-pixel-wide inputs."""

import pytest
import timm
import torch
import torch.nn.functional as F

from selfsight.backbones import Backbone, StridedConvBf16Guard


def test_strided_convs_are_guarded_and_the_state_dict_is_timms():
    backbone = Backbone("resnet18", {"in_chans": 1, "img_size": 16, "channels": (8, 16, 16, 32)})
    guarded = [n for n, m in backbone.model.named_modules() if isinstance(m, StridedConvBf16Guard)]
    # the stem and the first 3x3 conv of each downsampling stage; 1x1 downsample convs and stride-1 convs are not
    assert guarded == ["conv1", "layer2.0.conv1", "layer3.0.conv1", "layer4.0.conv1"]
    plain = timm.create_model("resnet18", num_classes=0, in_chans=1, channels=(8, 16, 16, 32))
    assert list(backbone.model.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize("width", [1, 4])
def test_guarded_conv_gradient_matches_fp32_under_bf16_autocast(width):
    """On a one-pixel-wide input the guard computes in fp32 (oneDNN's bf16 weight gradient is wrong there);
    elsewhere it is plain bf16 autocast."""
    generator = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
    conv.__class__ = StridedConvBf16Guard
    x = torch.randn(64, 16, 4, width, generator=generator)
    upstream = torch.randn(64, 32, 2, (width + 1) // 2, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
    y.float().backward(upstream)
    weight = conv.weight.detach().clone().requires_grad_()
    F.conv2d(x, weight, stride=2, padding=1).backward(upstream)
    if width == 1:
        assert y.dtype == torch.float32
        assert torch.allclose(conv.weight.grad, weight.grad, rtol=1e-5, atol=1e-4)
    else:  # bf16 as autocast asks: close to fp32 at bf16's precision only
        assert y.dtype == torch.bfloat16
        assert torch.allclose(conv.weight.grad, weight.grad, rtol=0.05, atol=0.5)
