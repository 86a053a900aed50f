import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT

from selfsight.backbones import Backbone
from selfsight.config import build_config
from selfsight.diagnostics import (
    attention_distance,
    attention_entropy,
    attention_stats,
    capture_attention,
    cka_matrix,
    diagnose,
    head_diversity,
    linear_cka,
    patch_attention,
    patch_coords,
    pca_2d,
)
from selfsight.diagnostics.attention import attention_sites, hooked_attention, window_geometry
from selfsight.engine import pretrain
from selfsight.errors import ConfigError

TINY_SWIN = (
    "swin_tiny_patch4_window7_224",
    {"img_size": 16, "patch_size": 2, "window_size": 2, "embed_dim": 16, "depths": (2, 2), "num_heads": (1, 2),
     "in_chans": 1},
)
TINY_CNN = ("resnet18", {"in_chans": 1, "img_size": 24, "channels": (8, 16, 16, 32)})


def uniform(batch: int, heads: int, n: int) -> torch.Tensor:
    return torch.full((batch, heads, n, n), 1.0 / n)


def random_attention(batch: int, heads: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, heads, n, n, generator=torch.Generator().manual_seed(seed)).mul(2).softmax(-1)


# --- attention: pure functions ---------------------------------------------------------------------
def test_patch_coords_are_patch_centres_in_pixels():
    coords = patch_coords(2, 3, 4)
    assert coords.tolist() == [[2, 2], [2, 6], [2, 10], [6, 2], [6, 6], [6, 10]]


def test_attention_distance_is_zero_for_attention_on_own_patch():
    attn = torch.eye(9).expand(2, 3, 9, 9)
    assert attention_distance(attn, patch_coords(3, 3, 16)).tolist() == [0.0, 0.0, 0.0]


def test_attention_distance_of_uniform_attention_matches_hand_computed_values():
    # 2x2 grid of 4-px patches: every query sees distances 0, 4, 4 and 4*sqrt(2) -> mean 2 + sqrt(2)
    distance = attention_distance(uniform(1, 2, 4), patch_coords(2, 2, 4))
    assert distance.tolist() == pytest.approx([2 + math.sqrt(2)] * 2)
    # 3x3 grid of 1-px patches: corner (4 queries), edge (4) and centre (1) queries, each averaged over 9 keys
    corner = (2 * 1 + 2 * 2 + 1 * math.sqrt(2) + 2 * math.sqrt(5) + math.sqrt(8)) / 9
    edge = (3 * 1 + 2 * math.sqrt(2) + 1 * 2 + 2 * math.sqrt(5)) / 9
    centre = (4 * 1 + 4 * math.sqrt(2)) / 9
    distance = attention_distance(uniform(3, 1, 9), patch_coords(3, 3, 1))
    assert distance.item() == pytest.approx((4 * corner + 4 * edge + centre) / 9)


def test_attention_distance_of_attention_on_a_neighbour_is_one_patch():
    attn = torch.zeros(1, 1, 4, 4)
    attn[0, 0, [0, 1, 2, 3], [1, 0, 3, 2]] = 1.0  # each query looks at its horizontal neighbour
    assert attention_distance(attn, patch_coords(2, 2, 8)).item() == pytest.approx(8.0)


def test_attention_entropy_is_log_n_for_uniform_and_zero_for_one_hot():
    assert attention_entropy(uniform(2, 3, 16)).tolist() == pytest.approx([math.log(16)] * 3)
    assert attention_entropy(torch.eye(5).expand(1, 2, 5, 5)).tolist() == [0.0, 0.0]


def test_head_diversity_is_zero_for_identical_heads_and_the_mean_kl_otherwise():
    one_head = random_attention(2, 1, 6)
    assert head_diversity(one_head.expand(2, 4, 6, 6)) == pytest.approx(0.0, abs=1e-9)
    p = torch.tensor([0.9, 0.1])
    q = torch.tensor([0.3, 0.7])
    attn = torch.stack([p.expand(2, 2), q.expand(2, 2)]).unsqueeze(0)  # [1, 2 heads, 2 queries, 2 keys]
    kl = lambda a, b: float((a * (a / b).log()).sum())
    assert head_diversity(attn) == pytest.approx((kl(p, q) + kl(q, p)) / 2, rel=1e-6)
    assert head_diversity(random_attention(2, 4, 6)) > 0.01


def test_invalid_tokens_are_dropped_as_keys_and_queries():
    attn = random_attention(2, 2, 4, seed=1)
    coords = patch_coords(2, 2, 4)
    valid = torch.tensor([[True, True, False, True]] * 2)
    keep = [0, 1, 3]
    subset = attn[:, :, keep][:, :, :, keep]
    subset = subset / subset.sum(-1, keepdim=True)
    expected = attention_distance(subset, coords[keep])
    assert torch.allclose(attention_distance(attn, coords, valid), expected)
    assert torch.allclose(attention_entropy(attn, valid), attention_entropy(subset))
    assert head_diversity(attn, valid) == pytest.approx(head_diversity(subset))


def test_patch_attention_drops_prefix_tokens_and_renormalises():
    attn = random_attention(1, 2, 5)
    patches = patch_attention(attn, 1)
    assert patches.shape == (1, 2, 4, 4)
    assert torch.allclose(patches.sum(-1), torch.ones(1, 2, 4))
    assert torch.allclose(patches, attn[:, :, 1:, 1:] / attn[:, :, 1:, 1:].sum(-1, keepdim=True))


# --- CKA -------------------------------------------------------------------------------------------
def reference_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """HSIC form with Gram matrices and the centring matrix (Kornblith et al. 2019, eq. 3)."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l_ = x.double() @ x.double().T, y.double() @ y.double().T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)
    return float(hsic(k, l_) / torch.sqrt(hsic(k, k) * hsic(l_, l_)))


def test_linear_cka_properties():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=gen)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    orthogonal, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen))
    assert linear_cka(x, x @ orthogonal) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, 7.5 * x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x + 3.0) == pytest.approx(1.0, abs=1e-12)  # columns are centred
    assert linear_cka(x, torch.randn(400, 12, generator=gen)) < 0.08
    anisotropic = x * torch.linspace(0.1, 10, 12)
    assert linear_cka(x, anisotropic) < 0.9  # not invariant to non-isotropic scaling
    y = torch.randn(400, 5, generator=gen) + x[:, :5] @ torch.randn(5, 5, generator=gen)
    assert linear_cka(x, y) == pytest.approx(reference_cka(x, y), rel=1e-9)
    assert linear_cka(x, torch.ones(400, 3)) == 0.0


def test_cka_matrix_shape_and_diagonal():
    gen = torch.Generator().manual_seed(1)
    feats = [torch.randn(50, d, generator=gen) for d in (4, 6, 8)]
    matrix = cka_matrix(feats, feats[:2])
    assert len(matrix) == 3 and all(len(row) == 2 for row in matrix)
    assert matrix[0][0] == pytest.approx(1.0) and matrix[1][1] == pytest.approx(1.0)
    assert matrix[0][1] == pytest.approx(matrix[1][0])


def test_pca_2d_finds_the_main_directions():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(200, 2, generator=gen) * torch.tensor([5.0, 2.0])
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen))
    feats = torch.cat([base, 0.01 * torch.randn(200, 4, generator=gen)], dim=1) @ rotation
    points, explained = pca_2d(feats)
    assert points.shape == (200, 2)
    assert sum(explained) > 0.99 and explained[0] > explained[1]
    assert abs(torch.corrcoef(torch.stack([points[:, 0], base[:, 0]]))[0, 1]) > 0.999


# --- hooks on timm models ---------------------------------------------------------------------------
def tokens_before_block0(backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
    m = backbone.model
    return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))


def test_vit_hooks_capture_the_softmax_and_restore_fused_attention():
    torch.manual_seed(0)
    backbone = Backbone(*TINY_VIT)
    modules = [block.attn for block in backbone.model.blocks]
    for module, value in zip(modules, (True, False)):  # one on, one off: both must come back as they were
        module.fused_attn = value
    x = torch.randn(3, 1, 16, 16)
    captured = capture_attention(backbone, x)
    assert [c["name"] for c in captured] == ["block 0", "block 1"]
    for c in captured:
        assert c["attn"].shape == (3, 2, 17, 17)  # 16 patches + the class token
        assert torch.allclose(c["attn"].sum(-1), torch.ones(3, 2, 17), atol=1e-5)
    assert [m.fused_attn for m in modules] == [True, False]
    assert all(not m.attn_drop._forward_hooks for m in modules)

    # reference: block 0's attention computed from its own qkv weights
    block = backbone.model.blocks[0]
    with torch.no_grad():
        h = block.norm1(tokens_before_block0(backbone, x))
        qkv = block.attn.qkv(h).reshape(3, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        expected = ((q @ k.transpose(-2, -1)) / math.sqrt(16)).softmax(-1)
    assert torch.allclose(captured[0]["attn"], expected, atol=1e-5)


def test_hooks_are_removed_and_fused_attention_restored_on_error():
    backbone = Backbone(*TINY_VIT)
    module = backbone.model.blocks[0].attn
    module.fused_attn = True

    def fail(site, attn):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"), hooked_attention(backbone, fail):
        assert module.fused_attn is False
        backbone.model.forward_features(torch.randn(1, 1, 16, 16))
    assert module.fused_attn is True
    assert not module.attn_drop._forward_hooks


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256"])
def test_swin_hooks_capture_window_attention(name):
    torch.manual_seed(0)
    backbone = Backbone(name, TINY_SWIN[1])
    captured = capture_attention(backbone, torch.randn(2, 1, 16, 16))
    # stage 0: 8x8 tokens in 16 windows of 2x2, 1 head; stage 1: 4x4 tokens in 4 windows, 2 heads
    assert [tuple(c["attn"].shape) for c in captured] == [(32, 1, 4, 4)] * 2 + [(8, 2, 4, 4)] * 2
    assert [(c["stage"], c["block"]) for c in captured] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for c in captured:
        assert torch.allclose(c["attn"].sum(-1), torch.ones(c["attn"].shape[:-1]), atol=1e-5)
    # shifted windows: pairs from different regions are masked out (weight ~ exp(-100))
    shifted = captured[3]["attn"].view(2, 4, 2, 4, 4)[:, 3]  # the bottom-right (wrapped) window
    assert float(shifted.min()) < 1e-20
    stats = attention_stats(backbone, torch.randn(3, 1, 16, 16), batch_size=2)
    assert [s["token_px"] for s in stats] == [2, 2, 4, 4] and stats[0]["window"] == [2, 2]
    assert stats[0]["head_diversity"] is None and stats[2]["head_diversity"] > 0
    assert all(0 < s["mean_distance_px"] < 16 for s in stats)


def test_swin_window_geometry_handles_clamped_and_padded_windows():
    # 12 px at 2 px patches: a 6x6 stage-0 map padded to 8x8 for 4x4 windows; stage 1 (3x3) clamps the window
    opts = {**TINY_SWIN[1], "img_size": 12, "window_size": 4}
    backbone = Backbone(TINY_SWIN[0], opts)
    sites = attention_sites(backbone)
    coords, valid, window = window_geometry(sites[0], 2 * 4, 16)
    assert window == (4, 4) and coords[-1].tolist() == [7.0, 7.0]
    assert valid.shape == (8, 16) and valid[:4].sum(1).tolist() == [16, 8, 8, 4]
    coords, valid, window = window_geometry(sites[2], 2, 9)
    assert window == (3, 3) and valid is None and coords[-1].tolist() == [10.0, 10.0]
    stats = attention_stats(backbone, torch.randn(2, 1, 12, 12))
    assert [s["window"] for s in stats] == [[4, 4], [4, 4], [3, 3], [3, 3]]


def test_attention_of_a_cnn_is_refused_clearly():
    backbone = Backbone(*TINY_CNN)
    with pytest.raises(ConfigError, match="ViT and Swin"):
        capture_attention(backbone, torch.randn(1, 1, 24, 24))


# --- end to end --------------------------------------------------------------------------------------
def make_run(idx_dir: Path, out: Path, method: str, spec, overrides=()) -> Path:
    cfg = build_config(None, list(overrides), method=method, backbone=spec[0], backbone_opts=spec[1],
                       data=f"{idx_dir}:train", out=str(out), steps=2, batch_size=16, log_every=1, ckpt_every=2,
                       device="cpu", num_workers=0)
    pretrain(cfg, progress=False)
    return out


@pytest.fixture(scope="module")
def runs(idx_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    vit = make_run(idx_dir, root / "vit", "simmim", TINY_VIT)
    cnn = make_run(idx_dir, root / "cnn", "simclr", TINY_CNN, ["method.proj_hidden_dim=32", "method.proj_dim=16"])
    return vit, cnn


def test_diagnose_simmim_vit_run_with_compare(runs):
    vit, cnn = runs
    result = diagnose(vit, compare=[str(cnn)], num_images=24, device="cpu", progress=False)
    saved = json.loads((vit / "diagnostics" / "diagnostics.json").read_text())
    assert result["path"] == str(vit / "diagnostics" / "diagnostics.json")
    assert {k: v for k, v in result.items() if k != "path"} == saved
    assert saved["family"] == "vit" and saved["layers"] == ["block 0", "block 1"]
    assert saved["sample"]["num_images"] == 24 and saved["sample"]["labelled"]
    assert [layer["name"] for layer in saved["attention"]] == ["block 0", "block 1"]
    for layer in saved["attention"]:
        assert len(layer["distance_px"]) == 2 and len(layer["entropy"]) == 2
        assert 0 < layer["mean_distance_px"] < 16 * math.sqrt(2)
        assert 0 < layer["mean_entropy"] <= math.log(16) + 1e-6
        assert layer["head_diversity"] >= 0 and 0 < layer["prefix_attention"] < 1
    assert saved["attention_note"] is None
    assert len(saved["cka"]) == 2 and saved["cka"][0][0] == pytest.approx(1.0)
    (compared,) = saved["compare"]
    assert compared["backbone"] == "resnet18" and compared["resized"] and compared["img_size"] == 24
    assert len(compared["cka"]) == 2 and all(len(row) == len(compared["layers"]) == 5 for row in compared["cka"])
    assert saved["reconstruction"]["num_images"] == 8 and 0 < saved["reconstruction"]["mask_ratio"] < 1
    assert len(saved["embedding"]["points"]) == 24 and len(saved["embedding"]["labels"]) == 24
    assert set(saved["plots"]) == {"attention_distance", "attention_entropy", "head_diversity", "cka", "cka_vs_0",
                                   "embedding", "reconstructions"}
    for name in saved["plots"].values():
        path = vit / "diagnostics" / name
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diagnose_cnn_run_notes_that_attention_does_not_apply(runs):
    vit, cnn = runs
    result = diagnose(cnn, compare=[str(vit)], num_images=16, seed=3, device="cpu", progress=False)
    assert result["attention"] is None
    assert result["attention_note"] == "attention views apply to ViT and Swin backbones; resnet18 is a CNN"
    assert result["reconstruction"] is None and "simclr" in result["reconstruction_note"]
    assert len(result["cka"]) == 5 and len(result["compare"][0]["cka"][0]) == 2
    assert set(result["plots"]) == {"cka", "cka_vs_0", "embedding"}
    assert all((cnn / "diagnostics" / name).is_file() for name in result["plots"].values())
