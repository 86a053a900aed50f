"""Tests for selfsight.data: readers, BatchStream, augmentation. Tiny files written in tmp_path."""

from __future__ import annotations

import gzip
import io
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsight.data import BatchStream, InMemoryImages, LazyFolderImages, iterate_in_order, open_images
from selfsight.data.augment import (
    crop_and_resize,
    hflip_where,
    normalize,
    random_hflip,
    random_resized_crop,
    sample_crop_boxes,
    sample_flips,
    to_float,
)
from selfsight.data.sources import parse_spec
from selfsight.errors import DataError

# ---------------------------------------------------------------- helpers


def save_image(path: Path, mode: str, size: tuple[int, int], color, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def save_array(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> Path:
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as stream:
            stream.write(payload)
    else:
        path.write_bytes(payload)
    return path


def write_pickle(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(content, protocol=2))


@pytest.fixture
def labeled_folder(tmp_path: Path) -> Path:
    """cats: 2 images (one nested two levels deep), dogs: 3 images; distinct gray values."""
    root = tmp_path / "pets"
    save_image(root / "dogs" / "d0.png", "L", (8, 8), 10)
    save_image(root / "dogs" / "d1.jpg", "L", (8, 8), 20)
    save_image(root / "dogs" / "d2.bmp", "L", (8, 8), 30)
    save_image(root / "cats" / "c0.png", "L", (8, 8), 40)
    save_image(root / "cats" / "deep" / "er" / "c1.PNG", "L", (8, 8), 50)
    (root / "cats" / "notes.txt").write_text("not an image")
    return root


def random_folder(root: Path, count: int, size: int = 8, seed: int = 0) -> Path:
    """`count` random RGB PNGs in two class folders."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        save_array(root / f"class{i % 2}" / f"img{i:03d}.png", pixels)
    return root


# ---------------------------------------------------------------- image folders


def test_folder_labels_from_first_level_subfolders_recursive(labeled_folder: Path) -> None:
    images = open_images(str(labeled_folder), 1, 8, progress=False)
    assert isinstance(images, InMemoryImages)
    assert images.num_images == 5 and images.classes == ["cats", "dogs"]
    # sorted relative paths: cats/c0, cats/deep/er/c1, dogs/d0, dogs/d1, dogs/d2
    assert images.labels.tolist() == [0, 0, 1, 1, 1]
    batch = images.get_batch(torch.arange(5))
    assert batch.shape == (5, 1, 8, 8) and batch.dtype == torch.uint8
    assert batch[:, 0, 4, 4].tolist() == [40, 50, 10, 20, 30]
    assert images.summary()["num_classes"] == 2 and images.skipped == []


def test_flat_or_mixed_folder_is_unlabeled(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png", "RGB", (8, 8), (1, 2, 3))
    save_image(tmp_path / "sub" / "b.png", "RGB", (8, 8), (4, 5, 6))
    images = open_images(str(tmp_path), 3, 4, progress=False)
    assert images.labels is None and images.classes == [] and images.num_images == 2
    assert images.get_batch(torch.tensor([1]))[0, :, 0, 0].tolist() == [4, 5, 6]


def test_modes_are_converted_to_in_chans(tmp_path: Path) -> None:
    save_image(tmp_path / "0_red_rgba.png", "RGBA", (6, 6), (255, 0, 0, 255))
    save_image(tmp_path / "1_gray.png", "L", (6, 6), 100)
    save_image(tmp_path / "2_gray_alpha.png", "LA", (6, 6), (200, 128))
    palette = Image.new("P", (6, 6), 0)
    palette.putpalette([0, 0, 255] + [0] * 765)
    palette.save(tmp_path / "3_palette_blue.gif")
    Image.fromarray(np.full((6, 6), 65535, dtype=np.uint16)).save(tmp_path / "4_white16.png")
    save_image(tmp_path / "5_cmyk.tif", "CMYK", (6, 6), (0, 0, 0, 0))  # CMYK white
    gray = open_images(str(tmp_path), 1, 6, progress=False).get_batch(torch.arange(6))
    assert gray.shape == (6, 1, 6, 6)
    # ITU-R 601 luma: red 255 -> 76, blue 255 -> 29
    assert gray[:, 0, 3, 3].tolist() == [76, 100, 200, 29, 255, 255]
    rgb = open_images(str(tmp_path), 3, 6, progress=False).get_batch(torch.arange(6))
    assert rgb.shape == (6, 3, 6, 6)
    assert rgb[:, :, 3, 3].tolist() == [
        [255, 0, 0], [100, 100, 100], [200, 200, 200], [0, 0, 255], [255, 255, 255], [255, 255, 255]
    ]


def test_small_images_are_upscaled_and_center_cropped(tmp_path: Path) -> None:
    save_image(tmp_path / "small" / "tiny.png", "RGB", (5, 3), (9, 99, 199))
    upscaled = open_images(str(tmp_path / "small"), 3, 16, progress=False).get_batch(torch.tensor([0]))
    assert upscaled.shape == (1, 3, 16, 16)
    assert (upscaled[0] == torch.tensor([9, 99, 199]).view(3, 1, 1)).all()
    wide = np.zeros((10, 30), dtype=np.uint8)
    wide[:, 10:20] = 255  # the centered 10 x 10 square is white, the sides black
    save_array(tmp_path / "wide" / "wide.png", wide)
    cropped = open_images(str(tmp_path / "wide"), 1, 10, progress=False).get_batch(torch.tensor([0]))
    assert cropped.shape == (1, 1, 10, 10) and (cropped == 255).all()


def test_corrupt_and_truncated_files_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    random_folder(tmp_path, 6)
    (tmp_path / "class0" / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    buffer = io.BytesIO()
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, "PNG")
    (tmp_path / "class1" / "half.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with caplog.at_level(logging.WARNING, logger="selfsight.data"):
        images = open_images(str(tmp_path), 3, 8, max_bad_fraction=0.5, progress=False)
    assert images.num_images == 6 and len(images.labels) == 6
    assert sorted(path for path, _ in images.skipped) == ["class0/garbage.jpg", "class1/half.png"]
    assert all(reason for _, reason in images.skipped)
    assert images.summary()["num_skipped"] == 2
    assert any("2 of 8 images" in record.getMessage() for record in caplog.records)


def test_too_many_bad_files_raise_naming_a_file(tmp_path: Path) -> None:
    random_folder(tmp_path, 3)
    (tmp_path / "class0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError) as info:
        open_images(str(tmp_path), 3, 8, progress=False)
    message = str(info.value)
    assert "1 of 4 images" in message and str(tmp_path) in message and "broken.png" in message
    assert "\n" not in message


@pytest.mark.parametrize("case", ["missing", "empty", "text_only", "bad_split"])
def test_bad_paths_raise_data_error_naming_the_path(tmp_path: Path, case: str) -> None:
    target = tmp_path / "data"
    spec = str(target)
    if case in ("empty", "text_only", "bad_split"):
        target.mkdir()
    if case == "text_only":
        (target / "readme.txt").write_text("hello")
    if case == "bad_split":
        save_image(target / "a.png", "L", (4, 4), 0)
        spec += ":test"
    with pytest.raises(DataError, match=str(target)) as info:
        open_images(spec, 3, 8, progress=False)
    assert "\n" not in str(info.value)


def test_parse_spec_only_splits_on_a_train_or_test_suffix() -> None:
    assert parse_spec("/data/mnist:test") == ("/data/mnist", "test")
    assert parse_spec("/odd:name/mnist:train") == ("/odd:name/mnist", "train")
    assert parse_spec("C:\\data\\mnist") == ("C:\\data\\mnist", None)
    assert parse_spec("/data/x:val") == ("/data/x:val", None)


# ---------------------------------------------------------------- IDX and CIFAR


@pytest.fixture
def idx_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "train_x": rng.integers(0, 256, (7, 6, 6), dtype=np.uint8),
        "train_y": rng.integers(0, 10, 7, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (3, 6, 6), dtype=np.uint8),
        "test_y": np.array([9, 0, 4], dtype=np.uint8),
    }


@pytest.mark.parametrize("suffix", [".gz", ""])
def test_idx_folder_train_and_test(tmp_path: Path, idx_arrays: dict, suffix: str) -> None:
    root = tmp_path / "fashion-mnist"
    write_idx(root / f"train-images-idx3-ubyte{suffix}", idx_arrays["train_x"])
    write_idx(root / f"train-labels-idx1-ubyte{suffix}", idx_arrays["train_y"])
    write_idx(root / f"t10k-images-idx3-ubyte{suffix}", idx_arrays["test_x"])
    write_idx(root / f"t10k-labels-idx1-ubyte{suffix}", idx_arrays["test_y"])
    train = open_images(str(root), 1, 6, progress=False)  # no split: train
    assert train.num_images == 7 and train.description.startswith("fashion-mnist train (IDX, 7 images)")
    assert torch.equal(train.get_batch(torch.arange(7))[:, 0], torch.from_numpy(idx_arrays["train_x"]))
    assert train.labels.tolist() == idx_arrays["train_y"].tolist() and train.labels.dtype == torch.int64
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    test = open_images(f"{root}:test", 3, 8, progress=False)
    assert test.get_batch(torch.arange(3)).shape == (3, 3, 8, 8)
    assert test.labels.tolist() == [9, 0, 4]


def test_idx_single_file_digit_classes_and_errors(tmp_path: Path, idx_arrays: dict) -> None:
    root = tmp_path / "mnist"
    images_file = write_idx(root / "test-images-idx3-ubyte.gz", idx_arrays["test_x"])
    single = open_images(str(images_file), 1, 6, progress=False)
    assert single.labels is None and single.num_images == 3
    write_idx(root / "test-labels-idx1-ubyte.gz", idx_arrays["test_y"])
    labeled = open_images(str(images_file), 1, 6, progress=False)
    assert labeled.labels.tolist() == [9, 0, 4] and labeled.classes == [str(d) for d in range(10)]
    assert open_images(f"{root}:test", 1, 6, progress=False).labels.tolist() == [9, 0, 4]  # test- prefix
    with pytest.raises(DataError, match=f"{root}.*train"):
        open_images(f"{root}:train", 1, 6, progress=False)
    bad = root.parent / "broken" / "train-images-idx3-ubyte"
    write_idx(bad, idx_arrays["train_x"])
    bad.write_bytes(bad.read_bytes()[:-5])  # data shorter than the header says
    with pytest.raises(DataError, match="malformed IDX"):
        open_images(str(bad.parent), 1, 6, progress=False)


def test_cifar10_pickles(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    rng = np.random.default_rng(5)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = (rng.integers(0, 256, (2, 3072), dtype=np.uint8), rng.integers(0, 10, 2).tolist())
        write_pickle(root / name, {b"data": batches[name][0], b"labels": batches[name][1]})
    write_pickle(root / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    train = open_images(f"{root}:train", 3, 32, progress=False)
    assert train.num_images == 10 and train.classes[3] == "c3"
    expected = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(10, 3, 32, 32)
    assert torch.equal(train.get_batch(torch.arange(10)), torch.from_numpy(expected))
    assert train.labels.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    test = open_images(f"{root}:test", 1, 16, progress=False)
    assert test.get_batch(torch.arange(2)).shape == (2, 1, 16, 16)
    assert test.labels.tolist() == batches["test_batch"][1]
    (root / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch"):
        open_images(f"{root}:test", 3, 32, progress=False)


def test_cifar100_pickles_use_fine_labels(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-python"
    pixels = np.zeros((3, 3072), dtype=np.uint8)
    pixels[:, :1024] = 255  # red plane
    write_pickle(root / "train", {"data": pixels, "fine_labels": [5, 1, 99], "coarse_labels": [0, 0, 0]})
    write_pickle(root / "meta", {"fine_label_names": [f"f{i}" for i in range(100)]})
    images = open_images(str(root), 1, 32, progress=False)
    assert images.labels.tolist() == [5, 1, 99] and len(images.classes) == 100
    assert (images.get_batch(torch.arange(3)) == 76).all()  # red -> luma 76
    with pytest.raises(DataError, match=f"{root}.*test"):
        open_images(f"{root}:test", 3, 32, progress=False)


# ---------------------------------------------------------------- BatchStream


def in_memory_set(count: int) -> InMemoryImages:
    pixels = torch.arange(count, dtype=torch.int64).view(count, 1, 1, 1).expand(count, 1, 2, 2)
    return InMemoryImages(description="numbers", num_images=count, labels=torch.arange(count) * 10,
                          classes=[], skipped=[], in_chans=1, img_size=2, pixels=pixels.to(torch.uint8))


def take(stream: BatchStream, count: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    iterator = iter(stream)
    return [next(iterator) for _ in range(count)]


def test_batch_stream_is_a_pure_function_of_seed_and_batch() -> None:
    images = in_memory_set(23)
    stream = BatchStream(images, batch_size=5, seed=7)
    assert stream.batches_per_epoch == 4
    fresh = take(stream, 12)
    again = take(BatchStream(images, batch_size=5, seed=7), 12)
    resumed = take(BatchStream(images, batch_size=5, seed=7, start_batch=6), 6)
    other_seed = take(BatchStream(images, batch_size=5, seed=8), 4)
    for (x1, y1), (x2, y2) in zip(fresh, again):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    for (x1, y1), (x2, y2) in zip(fresh[6:], resumed):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(fresh, other_seed))
    for epoch in range(3):
        ids = torch.cat([x[:, 0, 0, 0] for x, _ in fresh[epoch * 4:(epoch + 1) * 4]]).long()
        assert ids.unique().numel() == 20  # a permutation: no index twice, 3 dropped
        expected = torch.randperm(23, generator=torch.Generator().manual_seed(7 * 1_000_003 + epoch))[:20]
        assert torch.equal(ids, expected)
    for x, y in fresh:
        assert torch.equal(y, x[:, 0, 0, 0].long() * 10)  # labels follow their images


def test_batch_stream_rejects_batch_larger_than_data() -> None:
    with pytest.raises(DataError, match="batch size 30 .* 23 images of numbers"):
        BatchStream(in_memory_set(23), batch_size=30, seed=0)


def test_iterate_in_order_keeps_last_batch() -> None:
    batches = list(iterate_in_order(in_memory_set(11), 4))
    assert [len(x) for x, _ in batches] == [4, 4, 3]
    assert torch.cat([y for _, y in batches]).tolist() == [i * 10 for i in range(11)]


def test_lazy_folder_matches_in_memory_and_workers(tmp_path: Path) -> None:
    random_folder(tmp_path, 12)
    eager = open_images(str(tmp_path), 3, 6, progress=False)
    lazy = open_images(str(tmp_path), 3, 6, in_memory_limit=4, progress=False)
    assert isinstance(lazy, LazyFolderImages) and lazy.num_images == 12
    assert lazy.classes == ["class0", "class1"] and torch.equal(lazy.labels, eager.labels)
    assert torch.equal(lazy.get_batch(torch.arange(12)), eager.get_batch(torch.arange(12)))
    (lazy_mean, lazy_std), (eager_mean, eager_std) = lazy.mean_std(), eager.mean_std()
    assert lazy_mean == pytest.approx(eager_mean) and lazy_std == pytest.approx(eager_std)
    expected = take(BatchStream(eager, batch_size=4, seed=3, start_batch=1), 5)
    serial = take(BatchStream(lazy, batch_size=4, seed=3, start_batch=1), 5)
    parallel = take(BatchStream(lazy, batch_size=4, seed=3, start_batch=1, num_workers=2), 5)
    for (x1, y1), (x2, y2), (x3, y3) in zip(expected, serial, parallel):
        assert torch.equal(x1, x2) and torch.equal(x1, x3)
        assert torch.equal(y1, y2) and torch.equal(y1, y3)


def test_lazy_bad_file_is_replaced_by_next_good_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save_image(tmp_path / "a" / "0.png", "L", (4, 4), 10)
    save_image(tmp_path / "a" / "1.png", "L", (4, 4), 20)
    save_image(tmp_path / "b" / "2.png", "L", (4, 4), 30)
    save_image(tmp_path / "b" / "3.png", "L", (4, 4), 40)
    lazy = open_images(str(tmp_path), 1, 4, in_memory_limit=1, progress=False)
    (tmp_path / "a" / "1.png").write_bytes(b"corrupted after open")
    with caplog.at_level(logging.WARNING, logger="selfsight.data"):
        images, sources = lazy.load_batch(torch.tensor([1, 3, 0]))
    assert images[:, 0, 0, 0].tolist() == [30, 40, 10] and sources.tolist() == [2, 3, 0]
    assert lazy.batch_labels(sources).tolist() == [1, 1, 0]
    assert any("1.png" in record.getMessage() for record in caplog.records)


def test_mean_std_matches_direct_computation() -> None:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (9, 3, 4, 4), generator=generator, dtype=torch.uint8)
    images = InMemoryImages(description="random", num_images=9, labels=None, classes=[], skipped=[],
                            in_chans=3, img_size=4, pixels=pixels)
    mean, std = images.mean_std()
    values = pixels.double() / 255
    assert mean == pytest.approx(values.mean(dim=(0, 2, 3)).tolist())
    assert std == pytest.approx(values.std(dim=(0, 2, 3), unbiased=False).tolist())
    assert images.mean_std(max_images=4) == images.mean_std(max_images=4)  # fixed sample


# ---------------------------------------------------------------- augmentation


def test_to_float_and_normalize() -> None:
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    floats = to_float(x)
    assert floats.dtype == torch.float32 and floats.flatten().tolist() == pytest.approx([0.0, 0.2, 1.0])
    assert normalize(floats, [0.0, 0.2, 0.5], [1.0, 0.5, 0.25]).flatten().tolist() == pytest.approx([0, 0, 2])


def test_random_resized_crop_shapes_identity_and_determinism() -> None:
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    out = random_resized_crop(x, 7, generator=torch.Generator().manual_seed(1))
    assert out.shape == (4, 3, 7, 7)
    same = random_resized_crop(x, 7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, same)
    assert not torch.equal(out, random_resized_crop(x, 7, generator=torch.Generator().manual_seed(2)))
    generator = torch.Generator().manual_seed(3)
    identity = random_resized_crop(x, 12, scale=(1, 1), ratio=(1, 1), generator=generator)
    assert torch.allclose(identity, x, atol=1e-5)


def test_crop_boxes_fit_and_follow_scale() -> None:
    boxes = sample_crop_boxes(500, 20, 30, (0.2, 0.6), (0.5, 2.0), generator=torch.Generator().manual_seed(0))
    left, top, width, height = boxes.unbind(1)
    assert (left >= 0).all() and (top >= 0).all()
    assert (left + width <= 30 + 1e-4).all() and (top + height <= 20 + 1e-4).all()
    area = width * height / 600
    assert (area >= 0.2 - 1e-4).all() and (area <= 0.6 + 1e-4).all()  # every box here fits at once
    aspect = width / height
    assert (aspect >= 0.5 - 1e-4).all() and (aspect <= 2.0 + 1e-4).all()


def test_crop_and_resize_of_integer_box_is_a_slice() -> None:
    x = torch.arange(2 * 1 * 10 * 10, dtype=torch.float32).view(2, 1, 10, 10)
    boxes = torch.tensor([[2.0, 3.0, 4.0, 4.0], [0.0, 6.0, 4.0, 4.0]])
    out = crop_and_resize(x, boxes, 4)
    assert torch.allclose(out[0], x[0, :, 3:7, 2:6], atol=1e-4)
    assert torch.allclose(out[1], x[1, :, 6:10, 0:4], atol=1e-4)


def test_hflip_flips_exactly_the_chosen_samples() -> None:
    x = torch.rand(16, 2, 3, 5, generator=torch.Generator().manual_seed(0))
    flipped = random_hflip(x, p=0.5, generator=torch.Generator().manual_seed(4))
    chosen = sample_flips(16, 0.5, generator=torch.Generator().manual_seed(4))
    assert 0 < chosen.sum() < 16
    assert torch.equal(flipped[chosen], x[chosen].flip(-1))
    assert torch.equal(flipped[~chosen], x[~chosen])
    assert torch.equal(hflip_where(x, torch.ones(16, dtype=torch.bool)), x.flip(-1))
