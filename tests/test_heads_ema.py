"""Projection heads and momentum (EMA) targets."""

import copy
import math

import pytest
import torch
from torch import nn

from selfsight.ema import cosine_momentum, ema_update, make_momentum_copy
from selfsight.heads import DINOHead, MLPHead


def _count(module: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("batch_norm,last_bn", [(True, False), (False, False), (True, True)])
def test_mlp_head_shapes_and_layers(num_layers, batch_norm, last_bn):
    head = MLPHead(8, 16, 4, num_layers=num_layers, batch_norm=batch_norm, last_bn=last_bn)
    assert head(torch.randn(5, 8)).shape == (5, 4)
    assert _count(head, nn.Linear) == num_layers
    assert _count(head, nn.ReLU) == num_layers - 1
    expected_bn = (num_layers - 1) * batch_norm + last_bn
    assert _count(head, nn.BatchNorm1d) == expected_bn
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert all((lin.bias is None) == batch_norm for lin in linears[:-1])
    if last_bn:
        final_bn = head.layers[-1]
        assert isinstance(final_bn, nn.BatchNorm1d) and not final_bn.affine
        assert linears[-1].bias is None


def test_mlp_head_last_bn_standardises_output():
    head = MLPHead(8, 16, 4, last_bn=True).train()
    out = head(torch.randn(32, 8))
    assert torch.allclose(out.mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(out.var(0, unbiased=False), torch.ones(4), atol=1e-2)


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_dino_head_shapes(num_layers):
    head = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=6, num_layers=num_layers)
    assert head(torch.randn(3, 8)).shape == (3, 10)
    assert _count(head.mlp, nn.Linear) == num_layers
    assert _count(head.mlp, nn.GELU) == num_layers - 1


def test_dino_head_norm_last_layer_fixes_row_norms():
    head = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=6, norm_last_layer=True)
    magnitude = head.last_layer.parametrizations.weight.original0
    assert not magnitude.requires_grad
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(10), atol=1e-6)
    # unit bottleneck and unit rows -> logits are cosines in [-1, 1]
    logits = head(torch.randn(16, 8) * 100)
    assert logits.abs().max() <= 1 + 1e-5
    # a gradient step on the direction keeps the rows at norm 1
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    head(torch.randn(4, 8)).pow(2).sum().backward()
    optimizer.step()
    assert magnitude.grad is None
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(10), atol=1e-6)


def test_dino_head_free_magnitude_is_trainable():
    head = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=6, norm_last_layer=False)
    magnitude = head.last_layer.parametrizations.weight.original0
    assert magnitude.requires_grad
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(10), atol=1e-6)  # starts at 1
    head(torch.randn(4, 8)).sum().backward()
    assert magnitude.grad is not None


def test_cosine_momentum_endpoints_and_midpoint():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    # a quarter of the way: 1 - 0.01 * (cos(pi/4) + 1) / 2
    assert cosine_momentum(25, 100, 0.99) == pytest.approx(1 - 0.01 * (math.sqrt(0.5) + 1) / 2)
    values = [cosine_momentum(s, 10, 0.996) for s in range(11)]
    assert values == sorted(values)
    assert cosine_momentum(-5, 10, 0.9) == pytest.approx(0.9) and cosine_momentum(20, 10, 0.9) == 1.0


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _perturbed(module: nn.Module) -> nn.Module:
    online = make_momentum_copy(module)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
        online[1].running_mean.fill_(5.0)
        online[1].num_batches_tracked.fill_(7)
    return online


def test_ema_update_momentum_limits_and_average():
    torch.manual_seed(0)
    target = _tiny_net()
    online = _perturbed(target)
    before = {k: v.clone() for k, v in target.state_dict().items()}

    ema_update(target, online, 1.0)  # keep parameters
    for name, p in target.named_parameters():
        assert torch.equal(p, before[name])

    ema_update(target, online, 0.5)  # average
    for name, p in target.named_parameters():
        assert torch.allclose(p, before[name] + 0.5)

    ema_update(target, online, 0.0)  # copy
    for (_, p), (_, q) in zip(target.named_parameters(), online.named_parameters()):
        assert torch.equal(p, q)
    # buffers are never touched: the target keeps its own BatchNorm statistics and counter
    for name, b in target.named_buffers():
        assert torch.equal(b, before[name]), name
    assert not torch.equal(target[1].running_mean, online[1].running_mean)
    assert int(target[1].num_batches_tracked) == 0


def test_momentum_copy_has_no_grad_params_and_is_independent():
    online = _tiny_net()
    target = make_momentum_copy(online)
    assert all(p.requires_grad for p in online.parameters())
    assert not any(p.requires_grad for p in target.parameters())
    with torch.no_grad():
        online[0].weight.add_(1.0)
    assert not torch.equal(online[0].weight, target[0].weight)


def test_ema_update_on_weight_normed_dino_head():
    online = DINOHead(8, 10, hidden_dim=16, bottleneck_dim=6)
    target = make_momentum_copy(online)
    with torch.no_grad():
        online.last_layer.parametrizations.weight.original1.mul_(-1)
    ema_update(target, online, 0.0)
    x = torch.randn(2, 8)
    assert torch.allclose(target(x), online(x))


# ---------------------------------------------------------------- targets against the official rule


def _official_momentum(name: str, method, step: int, total: int) -> float:
    """The momentum after optimiser step ``step`` (0-based), written out: MoCo v2 constant, the others
    ``1 - (1 - base) * (cos(pi * (step + 1) / total) + 1) / 2``."""
    if name == "mocov2":
        return method.config.momentum
    return 1 - (1 - method.config.base_momentum) * (math.cos(math.pi * (step + 1) / total) + 1) / 2


def _target_inputs(name: str, views: list[torch.Tensor]) -> list[torch.Tensor]:
    """The batches the target encodes in one training step, one forward pass each."""
    if name == "mocov2":
        return [views[1]]
    if name == "moby":
        return [views[0], views[1]]
    return [torch.cat(views[:2])]  # BYOL: both views in one pass; DINO: the two global crops


@pytest.mark.parametrize("name", ["byol", "mocov2", "moby", "dino"])
def test_target_keeps_its_own_batchnorm_statistics_as_the_official_code(name):
    from test_methods import gen, images, make

    method = make(name)
    method.train()  # as the engine does: the targets run in train mode too
    target_parts = ("teacher_backbone", "teacher_head") if name == "dino" else ("target_backbone", "target_projector")
    online_parts = ("backbone", "head") if name == "dino" else ("backbone", "projector")
    target = nn.Sequential(*(getattr(method, a) for a in target_parts))
    online = nn.Sequential(*(getattr(method, a) for a in online_parts))
    reference = copy.deepcopy(target)  # the official loop's own target, updated by hand below
    optimizer = torch.optim.AdamW(method.param_groups(0.05), lr=1e-2)
    total = 10
    for step in range(4):
        batch, generator_seed = images(seed=step), 100 + step
        with torch.no_grad():  # the official target forward: train mode, no gradients
            for x in _target_inputs(name, method.views(batch, gen(generator_seed))):
                reference(x)
        method.training_step(batch, gen(generator_seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.on_step_end(step, total)
        m = _official_momentum(name, method, step, total)
        with torch.no_grad():
            for p_t, p_o in zip(reference.parameters(), online.parameters(), strict=True):
                p_t.mul_(m).add_(p_o, alpha=1 - m)
    for (key, got), (_, want) in zip(target.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.allclose(got.double(), want.double(), rtol=1e-4, atol=1e-5), key
    stats = [k for k in target.state_dict() if k.endswith(("running_mean", "running_var"))]
    assert stats  # the tiny ResNet has BatchNorm
    assert int(target.state_dict()[stats[0].replace("running_mean", "num_batches_tracked")]) == 4 * len(
        _target_inputs(name, method.views(images(), gen()))
    )
    # not the online network's statistics (what copying buffers used to give)
    online_state = online.state_dict()
    gap = max(float((target.state_dict()[k] - online_state[k]).abs().max()) for k in stats)
    assert gap > 1e-4
