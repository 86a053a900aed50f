"""Tests for tar shards: `pack_folder` / `selfsight data pack`, `ShardImages` and `ShardStream`."""

from __future__ import annotations

import itertools
import json
import os
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import selfsight.data.pack as pack_module
from selfsight.cli import main
from selfsight.data import BatchStream, ShardImages, ShardStream, make_batch_stream, open_images
from selfsight.data.pack import pack_folder
from selfsight.data.shards import buffer_shuffle, shard_epoch_order
from selfsight.errors import DataError

NUM_IMAGES = 640  # the streamed data set: 10 x the shuffle buffer used below
BUFFER = 64
SHARD_SIZE = 50


def write_folder(root: Path, count: int, size: int = 8, seed: int = 0, classes: int = 3) -> Path:
    """`count` random RGB images (PNG, every fourth one JPEG) in `classes` class folders."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size + 2, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:04d}.{'jpg' if i % 4 == 0 else 'png'}")
    return root


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """NUM_IMAGES 32 x 34 images in 3 classes, packed SHARD_SIZE per shard."""
    root = tmp_path_factory.mktemp("stream")
    write_folder(root / "images", NUM_IMAGES, size=32)
    pack_folder(str(root / "images"), str(root / "shards"), shard_size=SHARD_SIZE, progress=False)
    return root / "shards"


def open_packed(packed: Path, img_size: int = 8) -> ShardImages:
    images = open_images(str(packed), 3, img_size)
    assert isinstance(images, ShardImages)
    return images


def take(stream, count: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    return list(itertools.islice(iter(stream), count))


def ids_of(stream: ShardStream, batches: range) -> list[list[int]]:
    return [stream.batch_indices(b).tolist() for b in batches]


# ---------------------------------------------------------------- pack


def test_pack_gives_the_folders_pixels_and_labels_and_skips_bad_files(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "images", 40)
    (folder / "class1" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = (folder / "class0" / "img0003.png").read_bytes()
    (folder / "class2" / "truncated.png").write_bytes(good[: len(good) // 2])
    result = pack_folder(str(folder), str(tmp_path / "shards"), shard_size=7, progress=False)
    assert result.num_samples == 40 and result.num_shards == 6
    assert sorted(path for path, _ in result.skipped) == ["class1/bad.jpg", "class2/truncated.png"]
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["num_skipped"] == 2 and index["classes"] == ["class0", "class1", "class2"]
    assert index["image_formats"] == ["jpg", "png"] and index["num_samples"] == 40

    for in_chans, img_size in ((3, 8), (1, 5)):
        direct = open_images(str(folder), in_chans, img_size, max_bad_fraction=0.1)
        shards = open_images(str(tmp_path / "shards"), in_chans, img_size)
        assert isinstance(shards, ShardImages) and shards.skipped == []
        assert (shards.num_images, shards.in_chans, shards.img_size) == (40, in_chans, img_size)
        assert torch.equal(shards.get_batch(torch.arange(40)), direct.pixels)
        assert torch.equal(shards.labels, direct.labels) and shards.classes == direct.classes
        assert shards.mean_std() == direct.mean_std()


def test_shards_are_standard_tars_whose_offsets_match_the_index(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "images", 12)
    pack_folder(str(folder), str(tmp_path / "shards"), shard_size=5, progress=False)
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.*"))
    sample = 0
    for shard in index["shards"]:
        with tarfile.open(tmp_path / "shards" / shard["name"]) as tar:
            members = tar.getmembers()
            keys = range(sample, sample + len(members) // 2)
            assert [m.name for m in members[1::2]] == [f"{i:09d}.cls" for i in keys]
            for position, member in enumerate(members[::2]):
                assert member.name == f"{sample:09d}.{shard['exts'][position]}"
                assert member.offset_data == shard["offsets"][position] and member.size == shard["sizes"][position]
                assert tar.extractfile(member).read() == (folder / files[sample]).read_bytes()
                label = tar.extractfile(members[2 * position + 1]).read().decode()
                assert label == str(shard["labels"][position]) == files[sample][len("class")]
                sample += 1
        assert os.path.getsize(tmp_path / "shards" / shard["name"]) == shard["num_bytes"]
    assert sample == 12


def test_unlabeled_folder_packs_without_cls(tmp_path: Path) -> None:
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(6):
        Image.new("L", (9, 7), i * 30).save(folder / f"{i}.png")
    pack_folder(str(folder), str(tmp_path / "shards"), progress=False)
    with tarfile.open(tmp_path / "shards" / "shard-000000.tar") as tar:
        assert all(name.endswith(".png") for name in tar.getnames())
    shards = open_images(str(tmp_path / "shards"), 1, 4)
    assert shards.labels is None and shards.classes == []
    assert torch.equal(shards.get_batch(torch.arange(6)), open_images(str(folder), 1, 4).pixels)


def test_max_shard_mb_bounds_the_shard_files(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "images", 30, size=32)
    result = pack_folder(str(folder), str(tmp_path / "shards"), max_shard_mb=0.04, progress=False)
    sizes = [os.path.getsize(path) for path in sorted((tmp_path / "shards").glob("shard-*.tar"))]
    assert result.num_shards == len(sizes) > 2 and max(sizes) <= 40_000
    assert open_images(str(tmp_path / "shards"), 3, 8).num_images == 30


def test_pack_errors_name_the_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=str(empty)):
        pack_folder(str(empty), str(tmp_path / "out"), progress=False)
    with pytest.raises(DataError, match=f"{tmp_path / 'missing'} does not exist"):
        pack_folder(str(tmp_path / "missing"), str(tmp_path / "out"), progress=False)
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="is not a folder"):
        pack_folder(str(tmp_path / "file.png"), str(tmp_path / "out"), progress=False)
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "a.png").write_bytes(b"no png")
    with pytest.raises(DataError, match=f"none of the 1 images in {unreadable}"):
        pack_folder(str(unreadable), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out" / "index.json").exists()
    folder = write_folder(tmp_path / "images", 4)
    pack_folder(str(folder), str(tmp_path / "shards"), progress=False)
    with pytest.raises(DataError, match="already holds shards"):
        pack_folder(str(folder), str(tmp_path / "shards"), progress=False)


def test_a_failure_mid_pack_leaves_no_half_written_shard_and_no_index(tmp_path: Path, monkeypatch) -> None:
    folder = write_folder(tmp_path / "images", 40)
    read_sample = pack_module._read_sample
    calls = itertools.count()

    def failing_read(root: str, name: str, label: int | None):
        if next(calls) == 25:
            raise RuntimeError("disk on fire")
        return read_sample(root, name, label)

    monkeypatch.setattr(pack_module, "_read_sample", failing_read)
    out = tmp_path / "shards"
    with pytest.raises(RuntimeError, match="disk on fire"):
        pack_folder(str(folder), str(out), shard_size=10, progress=False)
    assert sorted(os.listdir(out)) == ["shard-000000.tar", "shard-000001.tar"]  # no index, no temp file
    for name in ("shard-000000.tar", "shard-000001.tar"):
        with tarfile.open(out / name) as tar:
            assert len(tar.getnames()) == 20  # 10 complete samples, image + label
    with pytest.raises(DataError):
        open_images(str(out), 3, 8)


def test_index_and_shard_problems_are_one_line_errors(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "images", 10)
    shards = tmp_path / "shards"
    pack_folder(str(folder), str(shards), shard_size=4, progress=False)
    last = shards / "shard-000002.tar"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(DataError, match=f"{last} is 1000 bytes.*incomplete"):
        open_images(str(shards), 3, 8)
    (shards / "index.json").write_text('{"format": "something else"}')
    with pytest.raises(DataError, match="not a selfsight shard index"):
        open_images(str(shards), 3, 8)


# ---------------------------------------------------------------- epoch order


def test_buffer_shuffle_emits_every_id_once() -> None:
    generator = torch.Generator().manual_seed(0)
    assert buffer_shuffle(range(10), 10, 1, generator) == list(range(10))  # a one-sample buffer keeps order
    order = buffer_shuffle(range(100), 100, 8, generator)
    assert sorted(order) == list(range(100)) and order != list(range(100))
    # an item leaves a buffer of 8 no earlier than 7 places before it arrives
    assert all(position >= item - 8 for position, item in enumerate(order))
    full = buffer_shuffle(range(20), 20, 50, generator)
    assert sorted(full) == list(range(20))


def test_epoch_order_permutes_shards_and_is_a_function_of_seed_and_epoch() -> None:
    starts = [0, 5, 10, 15, 20]
    first = shard_epoch_order(starts, seed=3, epoch=0, buffer_size=2)
    assert torch.equal(first, shard_epoch_order(starts, seed=3, epoch=0, buffer_size=2))
    assert not torch.equal(first, shard_epoch_order(starts, seed=3, epoch=1, buffer_size=2))
    assert not torch.equal(first, shard_epoch_order(starts, seed=4, epoch=0, buffer_size=2))
    assert sorted(first.tolist()) == list(range(20))
    assert torch.equal(shard_epoch_order(starts, 3, 0, 2, shuffle=False), torch.arange(20))


# ---------------------------------------------------------------- streaming


def test_streaming_sees_every_sample_once_per_epoch_with_bounded_memory(packed: Path, monkeypatch) -> None:
    """3 epochs of 10 x the shuffle buffer: each epoch holds every sample once, and at no time are
    more than one batch of samples decoded but not yet handed out (a reader that decodes the data
    set, or a buffer of decoded images, up front fails this)."""
    images = open_packed(packed, img_size=32)
    batch_size = 16
    assert batch_size < BUFFER and 5 * BUFFER <= images.num_images
    decoded = itertools.count(1)
    state = {"decoded": 0, "handed_out": 0, "most_held": 0}
    try_decode = ShardImages.try_decode

    def counting_decode(self: ShardImages, index: int):
        state["decoded"] = next(decoded)
        state["most_held"] = max(state["most_held"], state["decoded"] - state["handed_out"])
        return try_decode(self, index)

    take(ShardStream(images, batch_size, seed=1, shuffle_buffer=BUFFER), 1)  # one-time imports, not measured
    monkeypatch.setattr(ShardImages, "try_decode", counting_decode)
    stream = ShardStream(images, batch_size, seed=0, shuffle_buffer=BUFFER)
    epochs = 3
    seen: list[list[int]] = [[] for _ in range(epochs)]
    sample_bytes = 3 * 32 * 32
    tracemalloc.start()
    for batch, (pixels, labels) in enumerate(itertools.islice(stream, epochs * stream.batches_per_epoch)):
        state["handed_out"] += len(pixels)
        seen[batch // stream.batches_per_epoch].extend(stream.batch_indices(batch).tolist())
        assert pixels.shape == (batch_size, 3, 32, 32) and labels.shape == (batch_size,)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert stream.batches_per_epoch == NUM_IMAGES // batch_size
    for order in seen:
        assert sorted(order) == list(range(NUM_IMAGES))
    assert state["decoded"] == epochs * NUM_IMAGES
    assert state["most_held"] <= batch_size
    # python-side memory (encoded bytes, decoded arrays, IDs) stays far below one copy of the data
    # (about 130 kB here, against 2 MB for the data set decoded or encoded)
    assert peak < NUM_IMAGES * sample_bytes / 8, peak


def test_shuffle_changes_the_order_per_epoch_and_follows_the_seed(packed: Path) -> None:
    images = open_packed(packed)
    stream = ShardStream(images, 32, seed=5, shuffle_buffer=BUFFER)
    per_epoch = stream.batches_per_epoch
    epoch0 = sum(ids_of(stream, range(per_epoch)), [])
    epoch1 = sum(ids_of(stream, range(per_epoch, 2 * per_epoch)), [])
    assert epoch0 != epoch1 and epoch0 != list(range(NUM_IMAGES))
    first_shards = {i // SHARD_SIZE for i in epoch0[:BUFFER]}
    assert len(first_shards) <= 3  # reads stay local: the start of the epoch comes from few shards
    assert ids_of(ShardStream(images, 32, seed=5, shuffle_buffer=BUFFER), range(3)) == ids_of(stream, range(3))
    assert ids_of(ShardStream(images, 32, seed=6, shuffle_buffer=BUFFER), range(3)) != ids_of(stream, range(3))
    in_order = ShardStream(images, 32, seed=5, shuffle=False)
    assert sum(ids_of(in_order, range(per_epoch)), []) == list(range(NUM_IMAGES))
    pixels, labels = take(stream, 1)[0]
    chosen = stream.batch_indices(0)
    assert torch.equal(pixels, images.get_batch(chosen)) and torch.equal(labels, images.labels[chosen])


def test_resumed_stream_continues_the_uninterrupted_one(packed: Path) -> None:
    images = open_packed(packed)
    batch_size = 48  # 13 batches per epoch, 16 samples dropped per epoch
    whole = take(ShardStream(images, batch_size, seed=1, shuffle_buffer=BUFFER), 30)
    resumed = take(ShardStream(images, batch_size, seed=1, start_batch=11, shuffle_buffer=BUFFER), 19)
    for (a_pixels, a_labels), (b_pixels, b_labels) in zip(whole[11:], resumed, strict=True):
        assert torch.equal(a_pixels, b_pixels) and torch.equal(a_labels, b_labels)


def test_two_ranks_split_each_epoch_disjointly_with_equal_batch_counts(packed: Path) -> None:
    images = open_packed(packed)
    batch_size, world_size = 24, 2  # global batches of 48: 13 per epoch, the last 16 samples dropped
    ranks = [ShardStream(images, batch_size, seed=2, rank=r, world_size=world_size, shuffle_buffer=BUFFER)
             for r in range(world_size)]
    per_epoch = ranks[0].batches_per_epoch
    assert per_epoch == ranks[1].batches_per_epoch == NUM_IMAGES // (batch_size * world_size) == 13
    for epoch in range(2):
        batches = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        shares = [sum(ids_of(stream, batches), []) for stream in ranks]
        assert not set(shares[0]) & set(shares[1])
        assert len(shares[0]) == len(shares[1]) == per_epoch * batch_size
        order = shard_epoch_order(images.shards.starts, 2, epoch, BUFFER).tolist()
        assert set(shares[0]) | set(shares[1]) == set(order[: per_epoch * batch_size * world_size])
        assert len(order) - per_epoch * batch_size * world_size == NUM_IMAGES % (batch_size * world_size)
    single = ShardStream(images, batch_size * world_size, seed=2, shuffle_buffer=BUFFER)
    assert ids_of(single, range(1))[0] == ids_of(ranks[0], range(1))[0] + ids_of(ranks[1], range(1))[0]
    with pytest.raises(DataError, match="rank"):
        ShardStream(images, batch_size, seed=2, rank=2, world_size=2)
    with pytest.raises(DataError, match="larger than the 640 images"):
        ShardStream(images, 400, seed=2, world_size=2)


def test_workers_give_the_same_batches(packed: Path) -> None:
    images = open_packed(packed)
    serial = take(ShardStream(images, 64, seed=4, start_batch=8, shuffle_buffer=BUFFER), 5)
    parallel = take(ShardStream(images, 64, seed=4, start_batch=8, num_workers=2, shuffle_buffer=BUFFER), 5)
    for (a_pixels, a_labels), (b_pixels, b_labels) in zip(serial, parallel, strict=True):
        assert torch.equal(a_pixels, b_pixels) and torch.equal(a_labels, b_labels)


def test_workers_build_the_views_the_training_process_would(packed: Path) -> None:
    """With a WorkerViews, ShardStream's workers yield PreparedViews: the views and the generator state
    after them equal what the training process draws from the uint8 batch (here rank 1 of 2)."""
    from functools import partial

    from selfsight.data.views import ViewSpec
    from selfsight.data.worker_views import PreparedViews, SpecViews, WorkerViews
    from selfsight.distributed import rank_share_of_draws
    from selfsight.engine import step_generator

    images = open_packed(packed)
    maker = SpecViews((ViewSpec(size=6, blur_p=0.5), ViewSpec(size=8, solarize_p=0.5)),
                      torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25))
    views = WorkerViews(maker, partial(step_generator, 9))
    arguments = dict(seed=4, start_batch=3, shuffle_buffer=BUFFER, rank=1, world_size=2, views=views)
    serial = take(ShardStream(images, 16, **arguments), 3)
    parallel = take(ShardStream(images, 16, num_workers=2, **arguments), 3)
    for batch, ((pixels, labels), (prepared, worker_labels)) in enumerate(zip(serial, parallel, strict=True), 3):
        assert isinstance(prepared, PreparedViews) and prepared.batch == batch and prepared.shape == pixels.shape
        generator = step_generator(9, batch)
        with rank_share_of_draws(1, 2):
            expected = maker(pixels, generator)
        assert all(torch.equal(a, b) for a, b in zip(expected, prepared.restore(step_generator(9, batch))))
        assert torch.equal(prepared.generator_state, generator.get_state()) and torch.equal(labels, worker_labels)


def test_make_batch_stream_picks_the_reader_s_stream(packed: Path, tmp_path: Path) -> None:
    shards = open_packed(packed)
    stream = make_batch_stream(shards, 16, seed=0, rank=1, world_size=2)
    assert isinstance(stream, ShardStream) and (stream.rank, stream.world_size) == (1, 2)
    folder = open_images(str(write_folder(tmp_path / "images", 20)), 3, 8)
    assert isinstance(make_batch_stream(folder, 4, seed=0), BatchStream)


# ---------------------------------------------------------------- command line


def test_data_pack_command(tmp_path: Path, capsys) -> None:
    folder = write_folder(tmp_path / "images", 25)
    (folder / "class0" / "bad.png").write_bytes(b"nope")
    out = tmp_path / "shards"
    code = main(["data", "pack", str(folder), "--out", str(out), "--shard-size", "10", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and "packed 25 images into 3 shards" in printed and "bad.png" in printed
    assert sorted(os.listdir(out)) == ["index.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert open_images(str(out), 3, 8).num_images == 25
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["data", "pack", str(empty), "--out", str(tmp_path / "other")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("selfsight: error:")]
    assert code == 2 and len(errors) == 1 and str(empty) in errors[0] and "Traceback" not in err


def test_pretrain_streams_shards_and_resumes_exactly(packed: Path, tmp_path: Path, monkeypatch) -> None:
    """The engine trains from a shards folder through ShardStream, and a run resumed from its step-2
    checkpoint repeats the uninterrupted run's losses exactly (the stream's position is restored)."""
    import shutil

    import selfsight.engine as engine
    from selfsight.checkpoint import list_checkpoints
    from selfsight.config import build_config
    from selfsight.engine import pretrain

    streams = []
    original = engine.make_batch_stream

    def spy(*args, **kwargs):
        streams.append(original(*args, **kwargs))
        return streams[-1]

    monkeypatch.setattr(engine, "make_batch_stream", spy)
    straight = tmp_path / "straight"
    cfg = build_config(None, None, method="simclr", backbone="resnet18", data=str(packed), out=str(straight),
                       backbone_opts={"in_chans": 3, "img_size": 16, "channels": [8, 8, 8, 8]}, steps=4,
                       batch_size=16, log_every=1, ckpt_every=2, keep_checkpoints=2, device="cpu", num_workers=0)
    pretrain(cfg, progress=False)
    assert streams and all(isinstance(s, ShardStream) for s in streams)
    run = json.loads((straight / "run.json").read_text())
    assert run["data"]["num_images"] == NUM_IMAGES

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    newest = list_checkpoints(resumed)[0]
    assert newest.name == "step-00000004.pt"
    newest.unlink()
    assert [p.name for p in list_checkpoints(resumed)] == ["step-00000002.pt"]
    cfg.out = str(resumed)
    pretrain(cfg, resume=True, progress=False)

    def losses(folder: Path) -> list[float]:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if "loss" in r]

    assert len(losses(straight)) == 4
    assert losses(resumed) == losses(straight)


def test_a_method_with_its_own_data_order_is_refused_on_shards(packed: Path) -> None:
    """PIC's labels are positions in its sliding-window order, which shards (streamed in their own order) cannot
    follow: a clear error naming the shards, not wrong labels."""
    from selfsight.data.windows import WindowBatchIndexer

    images = open_images(str(packed), 3, 8)
    window = WindowBatchIndexer(images.num_images, 4, 0, 8, 4)
    with pytest.raises(DataError, match="own order"):
        make_batch_stream(images, 4, 0, indexer=window)
