"""selfsight's momentum targets against the official update rule, written out by hand.

For BYOL, MoCo v2, MoBY and DINO on a tiny timm ResNet (BatchNorm in the backbone, and in the heads of
BYOL and MoBY), N training steps of selfsight's method (``training_step``, AdamW, ``on_step_end``) run on
seeded random uint8 images. Alongside, a reference target starts as a copy of selfsight's and follows
the official code (MoCo ``_momentum_update_key_encoder``, BYOL ``target_params``/``target_state``, MoBY
``_momentum_update_key_encoder``, DINO ``main_dino.py``): before each step it encodes the same views in
train mode under ``no_grad`` (so its BatchNorm running statistics move on their own), and after the
optimiser step its parameters, only, are lerped towards the online network's
(``p_t.mul_(m).add_(p_o, alpha=1 - m)``, with the momentum schedule written out).

Reported: the largest absolute difference between selfsight's target and the reference in BatchNorm
running statistics and in parameters; how far the target's statistics are from the online network's
(what the former buffer copying gave the target); and the loss of a fixed held-out batch computed with
selfsight's target and with the reference target, in eval mode (where the running statistics are used;
also with the online network's statistics in the target, the former rule) and in train mode (batch
statistics, where running statistics play no part).

    .venv/bin/python benchmarks/ema_reference_check.py            # 20 steps, batch 32
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from torch import nn

from selfsight.backbones import Backbone
from selfsight.methods.base import Method
from selfsight.registry import create_method, get_method_class

BACKBONE = ("resnet18", {"in_chans": 1, "img_size": 16, "channels": (8, 16, 16, 32), "layers": (1, 1, 1, 1)})
SMALL = {
    "byol": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32},
    "mocov2": {"proj_hidden_dim": 32, "proj_dim": 16, "queue_size": 128},
    "moby": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32, "queue_size": 128},
    "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "num_local_crops": 2, "freeze_last_layer_steps": 5},
}
#: momentum at step 0; low, so that 20 steps move the target visibly
MOMENTUM = {"byol": ("base_momentum", 0.9), "mocov2": ("momentum", 0.9), "moby": ("base_momentum", 0.9),
            "dino": ("base_momentum", 0.9)}


def parts(method: Method, name: str) -> tuple[nn.Sequential, nn.Sequential]:
    """(target, online) as backbone + head, sharing the method's modules."""
    if name == "dino":
        target, online = (method.teacher_backbone, method.teacher_head), (method.backbone, method.head)
    else:
        target, online = (method.target_backbone, method.target_projector), (method.backbone, method.projector)
    return nn.Sequential(*target), nn.Sequential(*online)


def target_inputs(name: str, views: list[torch.Tensor]) -> list[torch.Tensor]:
    """The batches the target encodes in one step, one forward pass each (as selfsight's training_step)."""
    if name == "mocov2":
        return [views[1]]
    if name == "moby":
        return [views[0], views[1]]
    return [torch.cat(views[:2])]  # BYOL: both views in one pass; DINO: the two global crops


def official_momentum(name: str, base: float, step: int, total: int) -> float:
    """Momentum applied after optimiser step ``step`` (0-based): MoCo v2 constant; the others cosine from
    ``base`` to 1 (BYOL, MoBY, DINO: ``1 - (1 - base) * (cos(pi * k / K) + 1) / 2`` at k = step + 1)."""
    if name == "mocov2":
        return base
    return 1 - (1 - base) * (math.cos(math.pi * (step + 1) / total) + 1) / 2


def uint8_images(batch: int, seed: int) -> torch.Tensor:
    """Seeded random uint8 images [batch, 1, 16, 16]."""
    return torch.randint(0, 256, (batch, 1, 16, 16), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


def held_out_loss(method: Method, target_state: dict[str, torch.Tensor] | None, name: str, train: bool) -> float:
    """The loss of the fixed held-out batch (seed 10,000, view seed 10,000) on a copy of ``method`` whose
    target holds ``target_state`` (None: as is); eval mode uses the running statistics."""
    probe = copy.deepcopy(method)
    if target_state is not None:
        parts(probe, name)[0].load_state_dict(target_state)
    probe.train(train)
    with torch.no_grad():
        return float(probe.training_step(uint8_images(64, 10_000), torch.Generator().manual_seed(10_000)).loss)


def check(name: str, steps: int, batch: int, lr: float) -> dict[str, float]:
    torch.manual_seed(0)
    key, base = MOMENTUM[name]
    config = get_method_class(name).Config(**{**SMALL[name], key: base})
    method = create_method(name, Backbone(*BACKBONE), config, [0.5], [0.25])
    method.train()  # as the engine: the targets run in train mode too
    target, online = parts(method, name)
    reference = copy.deepcopy(target)
    optimizer = torch.optim.AdamW(method.param_groups(0.05), lr=lr)
    for step in range(steps):
        images = uint8_images(batch, step)
        with torch.no_grad():  # the official target forward: train mode, no gradients
            for x in target_inputs(name, method.views(images, torch.Generator().manual_seed(step))):
                reference(x)
        method.training_step(images, torch.Generator().manual_seed(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        method.on_step_end(step, steps)
        m = official_momentum(name, base, step, steps)
        with torch.no_grad():  # the official EMA: parameters only
            for p_t, p_o in zip(reference.parameters(), online.parameters(), strict=True):
                p_t.mul_(m).add_(p_o, alpha=1 - m)
    got, want, live = target.state_dict(), reference.state_dict(), online.state_dict()
    stats = [k for k in got if k.endswith(("running_mean", "running_var"))]
    params = [k for k, _ in target.named_parameters()]
    counters = [k for k in got if k.endswith("num_batches_tracked")]
    ref_state = {k: v.clone() for k, v in want.items()}
    copied = {**got, **{k: v for k, v in live.items() if k not in params}}  # the former rule: online's buffers
    return {
        "stats": max(float((got[k] - want[k]).abs().max()) for k in stats),
        "params": max(float((got[k] - want[k]).abs().max()) for k in params),
        "tracked": (int(got[counters[0]]), int(want[counters[0]])),
        "vs_online": max(float((got[k] - live[k]).abs().max()) for k in stats),
        "eval": (held_out_loss(method, None, name, False), held_out_loss(method, ref_state, name, False)),
        "eval_copied": held_out_loss(method, {k: v.clone() for k, v in copied.items()}, name, False),
        "train": (held_out_loss(method, None, name, True), held_out_loss(method, ref_state, name, True)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--methods", nargs="+", default=["byol", "mocov2", "moby", "dino"])
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    print(f"{args.steps} steps, batch {args.batch}, AdamW lr {args.lr}, momentum from 0.9; torch {torch.__version__}\n")
    print("| method | BN running stats: max abs diff to reference | parameters: max abs diff | "
          "BN batches tracked (selfsight / reference) | target vs online BN stats: max abs diff | "
          "held-out loss, eval mode (selfsight / reference / online's BN statistics) | "
          "held-out loss, train mode (selfsight / reference) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.methods:
        r = check(name, args.steps, args.batch, args.lr)
        print(f"| {name} | {r['stats']:.1e} | {r['params']:.1e} | {r['tracked'][0]} / {r['tracked'][1]} | "
              f"{r['vs_online']:.3f} | {r['eval'][0]:.6f} / {r['eval'][1]:.6f} / {r['eval_copied']:.6f} | "
              f"{r['train'][0]:.6f} / {r['train'][1]:.6f} |")
    print(f"\n{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
