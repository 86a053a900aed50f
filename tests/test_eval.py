"""Few-label evaluation: splits, k-NN, linear probe, fine-tuning and the evaluate() API.

Tiny ViTs (16 px, 2 blocks, width 32) and tiny in-memory image sets keep this file fast on 2 CPUs.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from selfsight.backbones import Backbone
from selfsight.data import InMemoryImages
from selfsight.errors import ConfigError
from selfsight.eval import api
from selfsight.eval.api import EvalConfig, evaluate
from selfsight.eval.baselines import pixel_features
from selfsight.eval.features import extract_features
from selfsight.eval.finetune import (
    Classifier,
    finetune,
    init_head_from_probe,
    layer_decay_param_groups,
    warmup_cosine,
)
from selfsight.eval.knn import knn_scores, top1
from selfsight.eval.linear import linear_probe
from selfsight.eval.splits import few_label_indices, validation_split

TINY_VIT = "vit_tiny_patch16_224"
TINY_OPTS = {"img_size": 16, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_backbone(seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    return Backbone(TINY_VIT, TINY_OPTS)


def tiny_images(per_class: int = 8, num_classes: int = 4, seed: int = 0, labeled: bool = True):
    """uint8 [N, 1, 16, 16]: noise plus a bright horizontal stripe whose row band encodes the class."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    pixels = torch.randint(0, 80, (labels.numel(), 1, 16, 16), generator=generator)
    for row, label in enumerate(labels.tolist()):
        pixels[row, :, 4 * label : 4 * label + 4, :] += 150
    return InMemoryImages(
        description=f"tiny set {seed}",
        num_images=labels.numel(),
        labels=labels if labeled else None,
        classes=[f"c{i}" for i in range(num_classes)] if labeled else [],
        skipped=[],
        in_chans=1,
        img_size=16,
        pixels=pixels.to(torch.uint8),
    )


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops on a shared 2-core machine run ~100x faster without OpenMP threads fighting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fake_data(monkeypatch):
    """evaluate() reads 'train' / 'test' / 'unlabeled' from memory instead of the disk."""
    sets = {"train": tiny_images(seed=0), "test": tiny_images(per_class=4, seed=1),
            "unlabeled": tiny_images(seed=2, labeled=False)}
    monkeypatch.setattr(api, "open_images", lambda spec, in_chans, img_size, **kw: sets[spec])
    return sets


@pytest.fixture
def fake_run(monkeypatch):
    """A 'pre-trained run' whose backbone is a tiny ViT the test can inspect."""
    backbone = tiny_backbone(seed=3)
    info = {"mean": [0.4], "std": [0.25], "img_size": 16, "in_chans": 1, "method": "simmim",
            "checkpoint": "fake.pt"}
    monkeypatch.setattr("selfsight.checkpoint.load_run_backbone", lambda run_dir: (backbone, info))
    return backbone


# --- splits ------------------------------------------------------------------------------------
def test_few_label_indices_balanced_and_reproducible():
    shuffle = torch.randperm(100, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0] * 30 + [1] * 20 + [2] * 50)[shuffle]
    chosen = few_label_indices(labels, labels_per_class=5, seed=7)
    assert chosen.numel() == 15 and torch.equal(chosen, chosen.sort().values)
    assert torch.bincount(labels[chosen]).tolist() == [5, 5, 5]
    assert torch.equal(chosen, few_label_indices(labels, labels_per_class=5, seed=7))
    assert not torch.equal(chosen, few_label_indices(labels, labels_per_class=5, seed=8))
    larger = few_label_indices(labels, labels_per_class=10, seed=7)
    assert set(chosen.tolist()) <= set(larger.tolist())  # first N of one permutation per class


def test_few_label_indices_fraction_and_all():
    labels = torch.tensor([0] * 30 + [1] * 20 + [2] * 3)
    chosen = few_label_indices(labels, label_fraction=0.1, seed=0)
    assert torch.bincount(labels[chosen]).tolist() == [3, 2, 1]  # round(0.3) -> at least 1
    assert torch.equal(few_label_indices(labels), torch.arange(53))
    assert few_label_indices(labels, label_fraction=1.0).numel() == 53


@pytest.mark.parametrize(
    "options", [{"labels_per_class": 4}, {"labels_per_class": 2, "label_fraction": 0.5},
                {"label_fraction": 0.0}, {"label_fraction": 1.5}, {"labels_per_class": 0}]
)
def test_few_label_indices_errors(options):
    with pytest.raises(ConfigError):
        few_label_indices(torch.tensor([0, 0, 0, 1, 1, 1, 1]), **options)


# --- k-NN --------------------------------------------------------------------------------------
def naive_knn_scores(train, train_labels, test, num_classes, k, temperature):
    """Double loop over test and train rows, in float64 numpy."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    scores = np.zeros((len(test), num_classes))
    for i, query in enumerate(test):
        sims = np.array([float(np.dot(query, row)) for row in train])
        for j in np.argsort(-sims)[:k]:
            scores[i, train_labels[j]] += math.exp(sims[j] / temperature)
    return scores


def test_knn_matches_naive_reference():
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(50, 8, generator=generator)
    labels = torch.randint(0, 4, (50,), generator=generator)
    test = torch.randn(13, 8, generator=generator)
    got = knn_scores(train, labels, test, num_classes=4, k=7, temperature=0.1, chunk=5)
    want = naive_knn_scores(train.double().numpy(), labels.numpy(), test.double().numpy(), 4, 7, 0.1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4)


def test_knn_hand_computed_case():
    train = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [3.0, 3.0]])  # labels 0, 1, 1, 1
    labels = torch.tensor([0, 1, 1, 1])
    test = torch.tensor([[1.0, 0.0]])  # cosine similarities 1, 0, -1, 1/sqrt(2)
    two = knn_scores(train, labels, test, num_classes=2, k=2, temperature=0.5)
    torch.testing.assert_close(two, torch.tensor([[math.exp(2.0), math.exp(2 * 0.5**0.5)]]))
    three = knn_scores(train, labels, test, num_classes=2, k=3, temperature=0.5)
    torch.testing.assert_close(three, torch.tensor([[math.exp(2.0), math.exp(2 * 0.5**0.5) + 1.0]]))
    assert top1(three, torch.tensor([0])) == 1.0
    assert knn_scores(train, labels, test, 2, k=100).shape == (1, 2)  # k clipped to N


# --- linear probe --------------------------------------------------------------------------------
def test_linear_probe_separates_separable_data():
    generator = torch.Generator().manual_seed(0)
    centers = 4.0 * torch.randn(3, 16, generator=generator)
    labels = torch.randint(0, 3, (300,), generator=generator)
    feats = centers[labels] + 0.5 * torch.randn(300, 16, generator=generator) + 10.0  # offset: removed
    result = linear_probe(feats[:200], labels[:200], feats[200:], labels[200:], num_classes=3)
    assert result.top1 >= 0.99
    assert result.train_loss < 0.05 and 0 < result.iterations < 1000
    again = linear_probe(feats[:200], labels[:200], feats[200:], labels[200:], num_classes=3)
    assert torch.equal(again.classifier.linear.weight, result.classifier.linear.weight)  # deterministic


def test_linear_probe_minimises_the_regularised_objective():
    """At the optimum the gradient of CE + wd/2 ||W||^2 vanishes: CE's gradient equals -wd * W."""
    generator = torch.Generator().manual_seed(1)
    feats, labels = torch.randn(60, 5, generator=generator), torch.randint(0, 3, (60,), generator=generator)
    probe = linear_probe(feats, labels, feats, labels, num_classes=3, weight_decay=0.1).classifier
    weight = probe.linear.weight.detach().clone().requires_grad_(True)
    standardized = (feats - probe.mean) / probe.std
    loss = torch.nn.functional.cross_entropy(standardized @ weight.T + probe.linear.bias.detach(), labels)
    (grad,) = torch.autograd.grad(loss, weight)
    torch.testing.assert_close(grad, -0.1 * weight.detach(), atol=1e-4, rtol=0)


# --- features ----------------------------------------------------------------------------------
def test_extract_features_in_order_and_restores_mode():
    backbone = tiny_backbone().train()
    images = tiny_images(per_class=3)
    feats, labels = extract_features(backbone, images, [0.5], [0.25], batch_size=5, progress=False)
    assert feats.shape == (12, 32) and torch.equal(labels, images.labels)
    assert backbone.training
    with torch.no_grad():
        whole = backbone.eval().features((images.pixels.float() / 255 - 0.5) / 0.25)
    torch.testing.assert_close(feats, whole, rtol=1e-4, atol=1e-5)
    some, some_labels = extract_features(backbone, images, [0.5], [0.25], indices=torch.tensor([11, 2]),
                                         progress=False)
    torch.testing.assert_close(some, whole[[11, 2]], rtol=1e-4, atol=1e-5)
    assert some_labels.tolist() == [3, 0]


# --- fine-tuning ---------------------------------------------------------------------------------
def run_finetune(backbone: Backbone, seed: int = 0, layer_decay: float = 0.75):
    train, test = tiny_images(seed=0), tiny_images(per_class=2, seed=1)
    return finetune(backbone, train, torch.arange(train.num_images), test, [0.4], [0.3], 4, epochs=2,
                    batch_size=8, warmup_epochs=1, lr=1e-3, layer_decay=layer_decay,
                    seed=seed, progress=False)


def test_finetune_changes_weights_and_is_deterministic():
    start = tiny_backbone()
    first, second = copy.deepcopy(start), copy.deepcopy(start)
    result_a, result_b = run_finetune(first, seed=5), run_finetune(second, seed=5)
    assert result_a.steps == 8 and len(result_a.train_loss) == 2 and 0.0 <= result_a.top1 <= 1.0
    assert result_a.train_loss == result_b.train_loss and result_a.top1 == result_b.top1
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(first.model.blocks[0].attn.qkv.weight, start.model.blocks[0].attn.qkv.weight)
    assert not torch.equal(first.model.patch_embed.proj.weight, start.model.patch_embed.proj.weight)


def test_layer_decay_scales_early_blocks_down():
    classifier = Classifier(tiny_backbone(), num_classes=4)
    groups = layer_decay_param_groups(classifier, weight_decay=0.05, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    model = classifier.backbone.model
    patch, block0, block1 = (scale_of[id(p)] for p in (model.patch_embed.proj.weight,
                                                        model.blocks[0].mlp.fc1.weight,
                                                        model.blocks[1].mlp.fc1.weight))
    assert (patch, block0, block1) == (0.125, 0.25, 0.5)  # BEiT/MAE: 0.5 ** (depth - i), head 1
    assert scale_of[id(classifier.head.weight)] == scale_of[id(classifier.head.bias)] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(list(classifier.parameters()))
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(model.pos_embed)] == 0.0 and decay[id(model.blocks[0].mlp.fc1.bias)] == 0.0
    assert decay[id(model.blocks[0].mlp.fc1.weight)] == 0.05


def test_layer_decay_reaches_the_optimiser():
    start = tiny_backbone()
    decayed, flat = copy.deepcopy(start), copy.deepcopy(start)
    run_finetune(decayed, layer_decay=0.1)  # patch embedding lr x 0.1 ** 3
    run_finetune(flat, layer_decay=1.0)
    moved = lambda b: (b.model.patch_embed.proj.weight - start.model.patch_embed.proj.weight).abs().sum()
    assert moved(decayed) < 0.05 * moved(flat)


def test_warmup_cosine_schedule():
    factors = [warmup_cosine(step, 2, 10) for step in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == 1.0
    assert all(a >= b for a, b in zip(factors[2:], factors[3:])) and factors[-1] < 0.05


# --- evaluate() --------------------------------------------------------------------------------
def test_linear_probe_leaves_backbone_bit_identical(fake_data, fake_run, tmp_path):
    before = {k: v.clone() for k, v in fake_run.state_dict().items()}
    cfg = EvalConfig(kind="linear", run=str(tmp_path), train_data="train", test_data="test",
                     labels_per_class=4, weight_decay=0.01, device="cpu")
    record = evaluate(cfg)
    after = fake_run.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in fake_run.parameters())
    saved = json.loads((tmp_path / "eval_linear_16.json").read_text())
    assert saved["top1"] == record["top1"] and 0.0 <= saved["top1"] <= 1.0
    assert saved["num_labels"] == 16 and saved["init"] == "pretrained" and saved["method"] == "simmim"
    assert saved["hparams"]["weight_decay"] == 0.01 and saved["mean"] == [0.4]


def test_knn_from_scratch(fake_data, tmp_path):
    cfg = EvalConfig(kind="knn", init="scratch", backbone=TINY_VIT, backbone_opts=TINY_OPTS,
                     train_data="train", test_data="test", k=5, device="cpu", out=str(tmp_path))
    record = evaluate(cfg)
    assert (tmp_path / "eval_knn_scratch_32.json").is_file()
    assert record["init"] == "scratch" and record["backbone"] == TINY_VIT and record["run"] is None
    assert record["hparams"]["k"] == 5 and record["num_test"] == 16
    assert record["mean"] == pytest.approx(fake_data["train"].mean_std()[0])
    assert evaluate(cfg)["top1"] == record["top1"]  # seeded scratch init


def test_finetune_through_api_from_scratch(fake_data, tmp_path):
    cfg = EvalConfig(kind="finetune", init="scratch", backbone=TINY_VIT, backbone_opts=TINY_OPTS,
                     train_data="train", test_data="test", labels_per_class=2, epochs=2, batch_size=4,
                     device="cpu", out=str(tmp_path))
    record = evaluate(cfg)
    assert (tmp_path / "eval_finetune_scratch_8.json").is_file()
    # scratch: a zero head (nothing pre-trained to preserve), lr 1e-3; the default 3 draws, tuned
    assert record["hparams"]["layer_decay"] == 0.75 and record["hparams"]["head_init"] == "zero"
    assert record["steps"] == 4 and len(record["train_loss"]) == 2
    assert record["draws"] == 3 and record["tuned"] and len(record["per_draw"][0]["tuning"]) == 3


@pytest.mark.parametrize(
    "options, message",
    [
        ({"kind": "knn"}, "needs run"),
        ({"kind": "knn", "init": "scratch"}, "needs backbone"),
        ({"kind": "svm", "run": "r"}, "unknown evaluation kind"),
        ({"kind": "knn", "run": "r", "init": "random"}, "unknown init"),
        ({"kind": "knn", "run": "r", "labels_per_class": 2, "label_fraction": 0.5}, "not both"),
        ({"kind": "finetune", "run": "r", "layer": 0}, "last layer"),
        ({"kind": "knn", "run": "r", "pool": "max"}, "unknown pooling"),
        ({"kind": "knn", "run": "r", "test_data": ""}, "test_data"),
        ({"kind": "linear", "run": "r", "epochs": 5}, "finetune only"),
    ],
)
def test_eval_config_errors(options, message):
    cfg = EvalConfig(**{"train_data": "train", "test_data": "test", **options})
    with pytest.raises(ConfigError, match=message):
        evaluate(cfg)


def test_unlabeled_data_is_a_config_error(fake_data, tmp_path):
    cfg = EvalConfig(kind="knn", init="scratch", backbone=TINY_VIT, backbone_opts=TINY_OPTS,
                     train_data="unlabeled", test_data="test", device="cpu", out=str(tmp_path))
    with pytest.raises(ConfigError, match="no labels"):
        evaluate(cfg)


def test_pretrained_backbone_mismatch_is_a_config_error(fake_data, fake_run, tmp_path):
    cfg = EvalConfig(kind="knn", run=str(tmp_path), backbone="resnet18", train_data="train", test_data="test")
    with pytest.raises(ConfigError, match="differs"):
        evaluate(cfg)


def write_idx(path, array: np.ndarray) -> None:
    """A raw uint8 IDX file: magic 0x0000 08 ndim, big-endian dimensions, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_evaluate_on_idx_files_from_disk(tmp_path):
    """End to end through the real data reader: an IDX folder with train and t10k splits."""
    folder = tmp_path / "tiny-idx"
    folder.mkdir()
    for prefix, images in (("train", tiny_images(seed=0)), ("t10k", tiny_images(per_class=3, seed=1))):
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images.pixels[:, 0].numpy())
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", images.labels.numpy())
    cfg = EvalConfig(kind="linear", init="scratch", backbone=TINY_VIT, backbone_opts=TINY_OPTS,
                     train_data=f"{folder}:train", test_data=f"{folder}:test", labels_per_class=3,
                     device="cpu", out=str(tmp_path / "out"))
    record = evaluate(cfg)
    assert record["num_labels"] == 12 and record["num_test"] == 12 and record["num_classes"] >= 4
    assert json.loads((tmp_path / "out" / "eval_linear_scratch_12.json").read_text())["top1"] == record["top1"]


def test_scratch_copies_the_runs_architecture(fake_data, tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"backbone": {"name": TINY_VIT, "opts": TINY_OPTS}}))
    cfg = EvalConfig(kind="knn", init="scratch", run=str(tmp_path), train_data="train", test_data="test",
                     device="cpu")
    record = evaluate(cfg)
    assert record["backbone"] == TINY_VIT and record["backbone_opts"]["embed_dim"] == 32
    assert (tmp_path / "eval_knn_scratch_32.json").is_file()  # written into the run dir


# --- draws, validation split, tuning ------------------------------------------------------------
def test_validation_split_is_a_disjoint_class_balanced_part_of_the_labeled_subset():
    labels = torch.arange(5).repeat(40)  # 200 training images, 5 classes
    subset = few_label_indices(labels, labels_per_class=10, seed=3)
    fit, val = validation_split(labels, subset, fraction=0.2, seed=3)
    assert set(fit.tolist()).isdisjoint(val.tolist())
    assert sorted(fit.tolist() + val.tolist()) == subset.tolist()  # nothing outside the labeled subset
    assert torch.bincount(labels[val]).tolist() == [2] * 5
    assert torch.equal(val, validation_split(labels, subset, fraction=0.2, seed=3)[1])
    tiny_fit, tiny_val = validation_split(labels, few_label_indices(labels, labels_per_class=2), 0.5)
    assert tiny_fit.numel() == tiny_val.numel() == 5  # one of two per class held out, never both
    with pytest.raises(ConfigError):
        validation_split(labels, subset, fraction=1.0)


def test_tuning_never_reads_the_test_set(fake_data, fake_run, tmp_path, monkeypatch):
    """Every tuning fine-tune trains on the fit part and scores the validation part of the training set."""
    calls = []
    real = api.finetune

    def spy(backbone, train_images, train_indices, test_images, *args, test_indices=None, **kwargs):
        calls.append((train_images, train_indices.clone(), test_images,
                      None if test_indices is None else test_indices.clone()))
        return real(backbone, train_images, train_indices, test_images, *args, test_indices=test_indices, **kwargs)

    monkeypatch.setattr(api, "finetune", spy)
    cfg = EvalConfig(kind="finetune", run=str(tmp_path), train_data="train", test_data="test",
                     labels_per_class=4, epochs=1, batch_size=8, draws=2, tune=True, device="cpu", progress=False)
    record = evaluate(cfg)
    train, test = fake_data["train"], fake_data["test"]
    assert len(calls) == 2 * (len(api.LR_FACTORS) + 1)
    for draw in range(2):
        subset = set(few_label_indices(train.labels, labels_per_class=4, seed=draw).tolist())
        trials, final = calls[4 * draw : 4 * draw + 3], calls[4 * draw + 3]
        for train_images, fit, scored, val in trials:
            assert train_images is train and scored is train and scored is not test
            assert set(fit.tolist()).isdisjoint(val.tolist())
            assert set(fit.tolist()) | set(val.tolist()) == subset
        assert final[2] is test and final[3] is None and set(final[1].tolist()) == subset
        assert record["per_draw"][draw]["hparams"]["lr"] in [t["lr"] for t in record["per_draw"][draw]["tuning"]]
    lrs = [t["lr"] for t in record["per_draw"][0]["tuning"]]
    assert lrs == pytest.approx([f * api.FINETUNE_DEFAULTS["lr"] for f in api.LR_FACTORS])


def test_draws_are_reproducible_distinct_and_summarised(fake_data, tmp_path):
    cfg = EvalConfig(kind="linear", init="pixels", backbone=TINY_VIT, backbone_opts=TINY_OPTS,
                     train_data="train", test_data="test", labels_per_class=3, draws=4, seed=5,
                     device="cpu", out=str(tmp_path), progress=False)
    subsets, seeds, tune = api.plan_draws(cfg, fake_data["train"].labels)
    assert seeds == [5, 6, 7, 8] and tune  # 12 labels: few, so tuned by default
    assert len({tuple(s.tolist()) for s in subsets}) == 4  # four different labeled subsets
    again, _, _ = api.plan_draws(cfg, fake_data["train"].labels)
    assert all(torch.equal(a, b) for a, b in zip(subsets, again))
    record = evaluate(cfg)
    saved = json.loads((tmp_path / "eval_linear_pixels_12.json").read_text())
    assert saved["top1_draws"] == record["top1_draws"] == [d["top1"] for d in saved["per_draw"]]
    assert saved["seeds"] == [5, 6, 7, 8] and saved["draws"] == 4
    assert saved["top1"] == pytest.approx(float(np.mean(saved["top1_draws"])), abs=1e-12)
    assert saved["top1_std"] == pytest.approx(float(np.std(saved["top1_draws"], ddof=1)), abs=1e-12)
    assert evaluate(cfg)["top1_draws"] == record["top1_draws"]


def test_summarize_single_and_several():
    assert api.summarize([0.5]) == {"mean": 0.5, "std": 0.0}
    got = api.summarize([0.7, 0.8, 0.9])
    assert got["mean"] == pytest.approx(0.8) and got["std"] == pytest.approx(0.1)


# --- raw-pixel baselines ------------------------------------------------------------------------
def reference_logistic_regression(x, y, num_classes, weight_decay, steps=20000, lr=0.5):
    """Independent reference: full-batch gradient descent in float64 numpy on the same objective
    (mean cross-entropy + wd/2 ||W||^2, bias not decayed) over features standardised by hand."""
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
    w, b = np.zeros((num_classes, x.shape[1])), np.zeros(num_classes)
    onehot = np.eye(num_classes)[y]
    for _ in range(steps):
        logits = x @ w.T + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = (p - onehot) / len(x)
        w -= lr * (grad.T @ x + weight_decay * w)
        b -= lr * grad.sum(0)
    return p


def test_pixel_logistic_regression_matches_an_independent_implementation():
    images = tiny_images(per_class=5, num_classes=3, seed=4)
    feats, labels = pixel_features(images, progress=False)
    assert feats.shape == (15, 256) and float(feats.max()) <= 1.0
    probe = linear_probe(feats, labels, feats, labels, num_classes=3, weight_decay=0.1).classifier
    with torch.no_grad():
        got = torch.softmax(probe(feats), dim=1).double().numpy()
    want = reference_logistic_regression(feats.double().numpy(), labels.numpy(), 3, 0.1)
    np.testing.assert_allclose(got, want, atol=2e-3)


def test_pixel_knn_through_api_equals_knn_on_flattened_pixels(fake_data, tmp_path):
    cfg = EvalConfig(kind="knn", init="pixels", backbone=TINY_VIT, backbone_opts=TINY_OPTS, k=3,
                     train_data="train", test_data="test", labels_per_class=2, draws=1, device="cpu",
                     out=str(tmp_path), progress=False)
    record = evaluate(cfg)
    train, test = fake_data["train"], fake_data["test"]
    indices = few_label_indices(train.labels, labels_per_class=2, seed=0)
    flat = lambda px: px.float().flatten(1) / 255
    scores = knn_scores(flat(train.pixels[indices]), train.labels[indices], flat(test.pixels), 4, k=3)
    assert record["top1"] == top1(scores, test.labels) and record["backbone"] == "pixels"
    assert not record["tuned"] or record["hparams"]["k"] == 3
    with pytest.raises(ConfigError, match="pixels"):
        evaluate(EvalConfig(kind="finetune", init="pixels", backbone=TINY_VIT, train_data="train",
                            test_data="test"))


# --- LP-FT --------------------------------------------------------------------------------------
def test_probe_head_reproduces_the_linear_probe():
    """The head set from the probe gives the probe's logits on the frozen features (standardisation folded)."""
    classifier = Classifier(tiny_backbone(), num_classes=4)
    images = tiny_images(per_class=6)
    indices = torch.arange(images.num_images)
    accuracy = init_head_from_probe(classifier, images, indices, [0.4], [0.3], weight_decay=0.01)
    feats, labels = extract_features(classifier.backbone, images, [0.4], [0.3], progress=False)
    probe = linear_probe(feats, labels, feats, labels, num_classes=4, weight_decay=0.01)
    with torch.no_grad():
        torch.testing.assert_close(classifier.head(feats), probe.classifier(feats), rtol=1e-3, atol=1e-3)
    assert accuracy == pytest.approx(probe.top1)


def test_lp_ft_starts_from_the_probe_loss(monkeypatch):
    """With head_init='probe' the first steps' loss is the probe's (low), not log(C) as with a zero head."""
    import importlib

    from selfsight.eval.features import pixels_to_input

    # no augmentation: a random tiny ViT's features are not invariant to flips and crops
    module = importlib.import_module("selfsight.eval.finetune")  # the package re-exports a function of that name
    monkeypatch.setattr(module, "augment_batch", lambda px, mean, std, scale, gen: pixels_to_input(px, mean, std))
    train, test = tiny_images(seed=0), tiny_images(per_class=2, seed=1)
    options = dict(epochs=1, batch_size=32, warmup_epochs=1, lr=1e-4, progress=False, crop_scale=(1.0, 1.0))
    zero = finetune(tiny_backbone(), train, torch.arange(32), test, [0.4], [0.3], 4, head_init="zero", **options)
    probe = finetune(tiny_backbone(), train, torch.arange(32), test, [0.4], [0.3], 4, head_init="probe", **options)
    assert zero.train_loss[0] == pytest.approx(math.log(4), abs=0.05)
    assert probe.train_loss[0] < zero.train_loss[0] - 0.3


def test_scratch_recipes_by_family():
    """Pre-trained ViT: LP-FT; pre-trained CNN: LP-FT at lr 1e-3 without layer decay; scratch ViT: zero head with
    layer decay; scratch CNN: zero head, no layer decay."""
    pretrained = api.finetune_hparams(EvalConfig(kind="finetune", run="r"))
    assert pretrained["head_init"] == "probe" and pretrained["lr"] == 3e-4 and pretrained["layer_decay"] == 0.75
    vit = api.finetune_hparams(EvalConfig(kind="finetune", init="scratch"), "vit")
    assert vit["head_init"] == "zero" and vit["lr"] == 1e-3 and vit["layer_decay"] == 0.75
    cnn = api.finetune_hparams(EvalConfig(kind="finetune", init="scratch"), "cnn")
    assert cnn["head_init"] == "zero" and cnn["layer_decay"] == 1.0
    given = api.finetune_hparams(EvalConfig(kind="finetune", init="scratch", layer_decay=0.5), "cnn")
    assert given["layer_decay"] == 0.5  # an option given is kept
    # a pre-trained CNN: the probe-first head, the scratch CNN's lr and no layer decay
    pre_cnn = api.finetune_hparams(EvalConfig(kind="finetune", run="r"), "cnn")
    assert pre_cnn["head_init"] == "probe" and pre_cnn["lr"] == 1e-3 and pre_cnn["layer_decay"] == 1.0
    pre_cnn_lr = api.finetune_hparams(EvalConfig(kind="finetune", run="r", lr=2e-4), "cnn")
    assert pre_cnn_lr["lr"] == 2e-4 and pre_cnn_lr["layer_decay"] == 1.0
