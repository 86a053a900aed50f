"""Views built in the DataLoader workers: bit-identical to the training process's, draws after them too;
each rank's slice; every method's training step on them; bad files met by workers are counted."""

from __future__ import annotations

import copy
import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsight import distributed
from selfsight.backbones import Backbone
from selfsight.config import build_config
from selfsight.data import BatchStream, LazyFolderImages, open_images
from selfsight.data.folder import _LAZY_PROBE_SIZE
from selfsight.data.worker_views import PreparedViews, SpecViews, worker_views_for
from selfsight.engine import pretrain, step_generator
from selfsight.registry import create_method, get_method_class

SEED = 5
SIZE = 16
TINY_CNN = ("resnet18", {"in_chans": 3, "img_size": SIZE, "channels": (8, 16, 16, 32)})
TINY_VIT = ("vit_tiny_patch16_224",
            {"img_size": SIZE, "patch_size": 4, "in_chans": 3, "embed_dim": 32, "depth": 2, "num_heads": 2})
SMALL = {
    "simclr": {"proj_hidden_dim": 32, "proj_dim": 16},
    "byol": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32},
    "mocov2": {"proj_hidden_dim": 32, "proj_dim": 16, "queue_size": 48},
    "mocov3": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32},
    "moby": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32, "queue_size": 48},
    "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "num_local_crops": 2},
    "simmim": {},
    "mae": {},
    "spark": {},
}
# SparK masks on the stride-32 grid: 64 px leaves a visible cell at mask ratio 0.6
SPARK_CNN = ("resnet18", {"in_chans": 3, "img_size": 64, "channels": (8, 16, 16, 32)})


def make(name: str):
    torch.manual_seed(0)
    backbone = Backbone(*{"simmim": TINY_VIT, "mae": TINY_VIT, "spark": SPARK_CNN}.get(name, TINY_CNN))
    config = get_method_class(name).Config(**SMALL[name])
    return create_method(name, backbone, config, [0.45, 0.5, 0.55], [0.2, 0.25, 0.3])


def rgb_folder(root: Path, count: int, seed: int = 0) -> Path:
    """`count` random RGB JPEGs of 20 x 24 px in two class folders (names sort in index order)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        path = root / f"class{i % 2}" / f"img{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path, quality=90)
    return root


@pytest.fixture(scope="module")
def lazy(tmp_path_factory: pytest.TempPathFactory) -> LazyFolderImages:
    root = rgb_folder(tmp_path_factory.mktemp("rgb"), 24)
    images = open_images(str(root), 3, SIZE, in_memory_limit=0, progress=False)
    assert isinstance(images, LazyFolderImages)
    return images


def stream_views(method, images, workers: int, batches: int, batch_size: int = 4, rank: int = 0, world: int = 1):
    """Per batch b: (what the stream yielded, the views, the step generator's state after them, a mask or
    a later draw), as the engine's step b sees them on this rank."""
    views = worker_views_for(method, torch.device("cpu"), partial(step_generator, SEED))
    stream = BatchStream(images, batch_size, SEED, num_workers=workers, rank=rank, world_size=world, views=views)
    seen = []
    for b, (x, _) in zip(range(batches), stream):
        generator = step_generator(SEED, b)
        with distributed.rank_share_of_draws(rank, world):
            out = method.views(x, generator)
            state = generator.get_state()
            if hasattr(method, "make_mask"):
                later = method.make_mask(x.shape[0], generator, torch.device("cpu"))
            else:  # a per-sample draw after the views, as a method would make it
                rows, mine = distributed.draw_rows(x.shape[0])
                later = torch.rand(rows, generator=generator)[mine]
        seen.append((x, out, state, later))
    return seen


@pytest.mark.parametrize("name", ["simclr", "simmim"])
def test_worker_views_equal_the_training_process_views_and_later_draws(lazy, name):
    method = make(name)
    serial = stream_views(method, lazy, workers=0, batches=7)  # 7 batches: the epoch (6) rolls over
    parallel = stream_views(method, lazy, workers=2, batches=7)
    assert all(isinstance(x, torch.Tensor) and x.dtype == torch.uint8 for x, *_ in serial)
    assert all(isinstance(x, PreparedViews) for x, *_ in parallel)
    for (x, views, state, later), (prepared, worker_views, worker_state, worker_later) in zip(serial, parallel):
        assert prepared.shape == x.shape and len(prepared) == x.shape[0]
        assert len(worker_views) == len(views) == (2 if name == "simclr" else 1)
        assert all(torch.equal(a, b) for a, b in zip(views, worker_views))
        assert torch.equal(state, worker_state)
        assert torch.equal(later, worker_later)
    # the views differ from batch to batch (the comparison above can fail)
    assert not torch.equal(serial[0][1][0], serial[1][1][0])


@pytest.mark.parametrize("name", ["simclr", "simmim"])
def test_each_rank_s_worker_views_are_its_rows_of_the_one_process_views(lazy, name):
    method = make(name)
    whole = stream_views(method, lazy, workers=0, batches=3, batch_size=4)
    ranks = [stream_views(method, lazy, workers=2, batches=3, batch_size=2, rank=r, world=2) for r in range(2)]
    for b, (_, views, state, later) in enumerate(whole):
        for r in range(2):
            prepared, rank_views, rank_state, rank_later = ranks[r][b]
            assert isinstance(prepared, PreparedViews)
            rows = slice(2 * r, 2 * r + 2)
            assert all(torch.equal(a[rows], c) for a, c in zip(views, rank_views))
            assert torch.equal(rank_state, state)  # every rank draws for the global batch
            assert torch.equal(rank_later, later[rows])


@pytest.mark.parametrize("name", ["simclr", "byol", "mocov2", "mocov3", "moby", "dino", "simmim", "mae", "spark"])
def test_every_method_trains_on_prepared_views_as_on_images(name):
    """(FD needs a teacher run and PIC image indices from the engine: both call ``self.views`` too.)"""
    method = make(name)
    side = method.backbone.img_size
    images = torch.randint(0, 256, (4, 3, side, side), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    prepared = worker_views_for(method, torch.device("cpu"), partial(step_generator, SEED)).prepare(images, 3)
    twin = copy.deepcopy(method)
    torch.manual_seed(2)
    expected = method.training_step(images, step_generator(SEED, 3))
    torch.manual_seed(2)
    got = twin.training_step(prepared, step_generator(SEED, 3))
    assert torch.equal(got.loss, expected.loss)
    assert worker_views_for(method, torch.device("cuda"), partial(step_generator, SEED)) is None  # GPU: batched


def test_views_are_built_in_workers_only_for_lazy_sets_with_workers(lazy):
    method = make("simclr")
    views = worker_views_for(method, torch.device("cpu"), partial(step_generator, SEED))
    assert isinstance(views.maker, SpecViews)
    assert BatchStream(lazy, 4, SEED, num_workers=2, views=views).builds_views
    assert not BatchStream(lazy, 4, SEED, num_workers=0, views=views).builds_views
    assert not BatchStream(lazy, 4, SEED, num_workers=2).builds_views
    in_memory = open_images(lazy.root, 3, SIZE, progress=False)
    assert not BatchStream(in_memory, 4, SEED, num_workers=2, views=views).builds_views


def corrupt_beyond_probe(root: Path, count: int) -> str:
    """Corrupts a JPEG that the start-up sample of a lazy folder does not decode; returns its name."""
    probe = set(np.linspace(0, count - 1, num=min(count, _LAZY_PROBE_SIZE)).round().astype(int).tolist())
    index = next(i for i in range(count // 2, count) if i not in probe)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    (root / files[index]).write_bytes(b"\xff\xd8 not a jpeg")
    return files[index]


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_met_while_streaming_are_counted(tmp_path, workers):
    root = rgb_folder(tmp_path / "big", 80)
    bad = corrupt_beyond_probe(root, 80)
    images = open_images(str(root), 3, SIZE, in_memory_limit=0, progress=False)
    assert images.summary()["num_skipped"] == 0  # the start-up sample missed it
    views = worker_views_for(make("simclr"), torch.device("cpu"), partial(step_generator, SEED))
    stream = BatchStream(images, 10, SEED, num_workers=workers, views=views)
    for _ in zip(range(2 * stream.batches_per_epoch), stream):  # two epochs: met again, counted once
        pass
    assert [name for name, _ in stream.bad_files] == [bad]
    assert "cannot identify image file" in stream.bad_files[0][1] or "Error" in stream.bad_files[0][1]
    summary = images.summary()
    assert summary["num_skipped"] == 1 and summary["skipped"][0]["path"] == bad
    # this process's copy now knows the file: a later stream's workers skip it without trying, report nothing
    again = BatchStream(images, 10, SEED, num_workers=workers, views=views)
    for _ in zip(range(again.batches_per_epoch), again):
        pass
    assert again.bad_files == [] and images.summary()["num_skipped"] == 1


def test_pretrain_writes_bad_files_met_by_workers_into_run_json(tmp_path, monkeypatch):
    """Trainer._batches rewrites run.json's data summary when the stream reports unreadable files."""
    import selfsight.engine as engine

    root = rgb_folder(tmp_path / "big", 80)
    bad = corrupt_beyond_probe(root, 80)
    monkeypatch.setattr(engine, "open_images", partial(open_images, in_memory_limit=0))  # lazy, as a large folder
    run = tmp_path / "run"
    cfg = build_config(None, None, method="simclr", backbone=TINY_CNN[0], backbone_opts=dict(TINY_CNN[1]),
                       data=str(root), out=str(run), steps=10, batch_size=16, log_every=5, ckpt_every=100,
                       device="cpu", num_workers=2, precision="fp32")
    pretrain(cfg, progress=False)  # 10 steps of 16 = two epochs of 5 batches: every image is decoded
    data = json.loads((run / "run.json").read_text())["data"]
    assert data["description"].endswith("decoded lazily)")
    assert data["num_skipped"] == 1 and data["skipped"][0]["path"] == bad


def test_pretrain_with_worker_views_repeats_the_losses_without_workers(tmp_path, monkeypatch):
    """The engine end to end: SimMIM on a lazy folder, views (and the masks drawn after them) from two
    DataLoader workers or from the training process, the same losses bit for bit."""
    import selfsight.engine as engine

    root = rgb_folder(tmp_path / "rgb", 24)
    monkeypatch.setattr(engine, "open_images", partial(open_images, in_memory_limit=0))
    restored: list[int] = []
    restore = PreparedViews.restore
    monkeypatch.setattr(PreparedViews, "restore", lambda self, g: restored.append(self.batch) or restore(self, g))
    runs = {}
    for workers in (0, 2):
        run = tmp_path / f"workers{workers}"
        cfg = build_config(None, None, method="simmim", backbone=TINY_VIT[0], backbone_opts=dict(TINY_VIT[1]),
                           data=str(root), out=str(run), steps=4, batch_size=8, log_every=1, ckpt_every=100,
                           device="cpu", num_workers=workers, precision="fp32")
        pretrain(cfg, progress=False)
        runs[workers] = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert restored == [0, 1, 2, 3]  # the run with workers trained on their views
    assert len(runs[0]) == 4 and runs[2] == runs[0]
