"""Tests for surgery.data: datasets, subsets, errors, transforms, deterministic loaders."""

from __future__ import annotations

import gzip
import io
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from surgery.data import DataBundle, build_data, eval_transform, make_loader, normalize, read_idx
from surgery.errors import SpecError
from surgery.spec import load_spec

CFG = {
    "input_size": (3, 224, 224),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bilinear",
    "crop_pct": 0.875,
    "crop_mode": "center",
}
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def spec_for(data: dict, num_classes: int | None = 10, seed: int = 0):
    return load_spec(
        {"seed": seed, "model": {"backbone": "torchvision:resnet18", "num_classes": num_classes}, "data": data}
    )


def build(data: dict, **kw) -> DataBundle:
    return build_data(spec_for(data, **kw), CFG)


def labels(dataset) -> list[int]:
    return [dataset[i][1] for i in range(len(dataset))]


def write_idx(path: Path, array: np.ndarray) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}
    data = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def write_mnist_files(folder: Path, n_train: int, n_test: int, gz: bool, side: int = 28) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for stem, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{stem}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, side, side), dtype=np.uint8))
        write_idx(folder / f"{stem}-labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8))


def png_bytes(color: tuple[int, int, int], size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


COLORS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "owl": (30, 30, 200)}


def make_folder(root: Path, per_class: int) -> None:
    for name, color in COLORS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(png_bytes(color))


# --------------------------------------------------------------------------- digits
def test_digits_shapes_labels_and_stratified_split() -> None:
    bundle = build({"name": "digits"})
    assert bundle.classes == [str(i) for i in range(10)]
    assert (len(bundle.train), len(bundle.val)) == (1437, 360)
    assert bundle.describe == "digits: 1437 train / 360 val, 10 classes, 32px"
    image, label = bundle.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and isinstance(label, int)
    counts = Counter(labels(bundle.val))
    assert set(counts) == set(range(10)) and all(35 <= c <= 37 for c in counts.values())
    assert bundle.deterministic_train and bundle.mean == CFG["mean"] and bundle.std == CFG["std"]


def test_digits_split_depends_on_seed_only() -> None:
    first, again, other = build({"name": "digits"}), build({"name": "digits"}), build({"name": "digits"}, seed=1)
    assert torch.equal(first.val[5][0], again.val[5][0])
    assert any(not torch.equal(first.val[i][0], other.val[i][0]) for i in range(20))


@pytest.mark.parametrize("chosen", [["7", "2"], [7, 2], ["7", 2]])
def test_classes_subset_relabels_in_given_order(chosen: list) -> None:
    from sklearn.datasets import load_digits

    total = Counter(load_digits().target.tolist())
    bundle = build({"name": "digits", "classes": chosen})
    assert bundle.classes == ["7", "2"]
    counts = Counter(labels(bundle.train)) + Counter(labels(bundle.val))
    assert counts == {0: total[7], 1: total[2]}


def test_subset_sizes_are_stratified_and_fixed() -> None:
    data = {"name": "digits", "subset": {"train": 100, "val": 50}}
    bundle = build(data)
    assert (len(bundle.train), len(bundle.val)) == (100, 50)
    assert all(9 <= c <= 11 for c in Counter(labels(bundle.train)).values())
    assert all(4 <= c <= 6 for c in Counter(labels(bundle.val)).values())
    again = build(data)
    assert all(torch.equal(bundle.train[i][0], again.train[i][0]) for i in range(0, 100, 7))


def test_subset_larger_than_dataset_keeps_everything() -> None:
    bundle = build({"name": "digits", "classes": [0], "subset": {"train": 10_000}})
    assert len(bundle.train) + len(bundle.val) == 178 and set(labels(bundle.train)) == {0}


# --------------------------------------------------------------------------- fake
def test_fake_sizes_classes_and_determinism() -> None:
    bundle = build({"name": "fake", "image_size": 16}, num_classes=4)
    assert (len(bundle.train), len(bundle.val)) == (256, 64)
    assert bundle.classes == ["class0", "class1", "class2", "class3"]
    assert set(labels(bundle.val)) <= set(range(4))
    assert bundle.train[3][0].shape == (3, 16, 16)
    small = build({"name": "fake", "image_size": 16, "subset": {"train": 20, "val": 8}}, num_classes=4)
    assert (len(small.train), len(small.val)) == (20, 8)
    assert torch.equal(small.train[3][0], bundle.train[3][0])
    assert not torch.equal(bundle.train[0][0], bundle.val[0][0])


# --------------------------------------------------------------------------- imagefolder
def test_imagefolder_single_folder_skips_corrupt_files(tmp_path: Path, caplog) -> None:
    make_folder(tmp_path, per_class=5)
    (tmp_path / "cat" / "garbage.png").write_bytes(b"this is not a png")
    truncated = png_bytes((1, 2, 3), size=40)
    (tmp_path / "dog" / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    bundle = build({"name": "imagefolder", "root": str(tmp_path), "val_split": 0.2})
    assert bundle.classes == ["cat", "dog", "owl"]
    assert len(bundle.train) + len(bundle.val) == 16  # 15 good + the truncated one, found only on load
    assert "1 unreadable files skipped" in bundle.describe
    assert any("garbage.png" in r.getMessage() for r in caplog.records)
    loader = make_loader(bundle.train, batch_size=4, train=True, seed=0, num_workers=0, pin_memory=False)
    seen = [y for _, ys in loader.epoch(0) for y in ys.tolist()]  # must not raise on the truncated file
    assert len(seen) == len(bundle.train)
    for i in range(len(bundle.val)):
        image, label = bundle.val[i]
        assert image.shape == (3, 32, 32)
        # solid colours: the image's strongest channel is its class
        assert int(image.float().mean((1, 2)).argmax()) == label


def test_imagefolder_train_val_layout(tmp_path: Path) -> None:
    make_folder(tmp_path / "train", per_class=4)
    make_folder(tmp_path / "val", per_class=2)
    bundle = build({"name": "imagefolder", "root": str(tmp_path), "classes": ["owl", "cat"]})
    assert bundle.classes == ["owl", "cat"]
    assert (len(bundle.train), len(bundle.val)) == (8, 4)
    assert Counter(labels(bundle.val)) == {0: 2, 1: 2}
    owl = bundle.val[labels(bundle.val).index(0)][0]
    assert int(owl.float().mean((1, 2)).argmax()) == 2  # blue: relabelled, not re-ordered images


def test_imagefolder_val_class_missing_from_train_is_an_error(tmp_path: Path) -> None:
    make_folder(tmp_path / "train", per_class=2)
    make_folder(tmp_path / "val", per_class=1)
    (tmp_path / "val" / "emu").mkdir()
    with pytest.raises(SpecError, match="emu") as err:
        build({"name": "imagefolder", "root": str(tmp_path)})
    assert err.value.key_path == ("data", "root")


@pytest.mark.parametrize(
    "setup, words",
    [
        ("missing", "does not exist"),
        ("empty", "no class folders"),
        ("no-images", "has no images"),
    ],
)
def test_imagefolder_bad_root_names_the_folder(tmp_path: Path, setup: str, words: str) -> None:
    root = tmp_path / "pics"
    if setup != "missing":
        root.mkdir()
    if setup == "no-images":
        (root / "cat").mkdir()
        (root / "cat" / "notes.txt").write_text("no image here")
    with pytest.raises(SpecError, match=words) as err:
        build({"name": "imagefolder", "root": str(root)})
    assert err.value.key_path == ("data", "root")
    assert str(root) in str(err.value)


def test_imagefolder_root_is_relative_to_the_spec_file(tmp_path: Path) -> None:
    make_folder(tmp_path / "pics", per_class=3)
    spec_file = tmp_path / "run.yaml"
    spec_file.write_text("model: {backbone: 'torchvision:resnet18'}\ndata:\n  name: imagefolder\n  root: pics\n")
    bundle = build_data(load_spec(spec_file), CFG)
    assert len(bundle.train) + len(bundle.val) == 9


# --------------------------------------------------------------------------- errors
def test_unknown_class_name_suggests_the_closest(tmp_path: Path) -> None:
    write_mnist_files(tmp_path, 20, 10, gz=False)
    with pytest.raises(SpecError) as err:
        build({"name": "fashion-mnist", "root": str(tmp_path), "classes": ["Bag", "Sneakr"]})
    assert err.value.key_path == ("data", "classes", 1)
    assert "Sneaker" in err.value.hint


@pytest.mark.parametrize("chosen, path", [([10], ("data", "classes", 0)), ([3, "3"], ("data", "classes", 1))])
def test_bad_class_index_or_duplicate(chosen: list, path: tuple) -> None:
    with pytest.raises(SpecError) as err:
        build({"name": "digits", "classes": chosen})
    assert err.value.key_path == path


def test_unknown_dataset_lists_what_is_available() -> None:
    with pytest.raises(SpecError) as err:
        build({"name": "cifar11"})
    assert err.value.key_path == ("data", "name")
    assert "digits" in err.value.expected and "cifar10" in err.value.hint


def test_torchvision_dataset_not_on_disk_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="download: true") as err:
        build({"name": "CIFAR10", "root": str(tmp_path)})
    assert err.value.key_path == ("data", "root")


@pytest.mark.parametrize(
    "augment, path",
    [
        ({"randaugment": "rand-x9"}, ("data", "augment", "randaugment")),
        ({"randaugment": "auto"}, ("data", "augment", "randaugment")),
        ({"crop": False, "scale": [0.5, 1.0]}, ("data", "augment", "scale")),
        ({"scale": [0.9, 0.5]}, ("data", "augment", "scale")),
    ],
)
def test_bad_augment_options(augment: dict, path: tuple) -> None:
    with pytest.raises(SpecError) as err:
        build({"name": "digits", "augment": augment})
    assert err.value.key_path == path


# --------------------------------------------------------------------------- IDX datasets
@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_reader_on_tiny_files(tmp_path: Path, gz: bool) -> None:
    write_mnist_files(tmp_path, 30, 12, gz=gz)
    bundle = build({"name": "fashion-mnist", "root": str(tmp_path), "image_size": 16})
    assert (len(bundle.train), len(bundle.val)) == (30, 12)
    assert bundle.classes[0] == "T-shirt/top" and bundle.classes[9] == "Ankle boot"
    assert labels(bundle.val) == [i % 10 for i in range(12)]
    assert bundle.val[0][0].shape == (3, 16, 16)
    raw = read_idx(tmp_path / ("train-images-idx3-ubyte" + (".gz" if gz else "")))
    assert raw.shape == (30, 28, 28) and raw.dtype == np.uint8


def test_fashion_mnist_without_a_root_is_looked_for_where_the_environment_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No data.root: $SURGERY_FASHION_MNIST, else Debian's folder; the error names both ways."""
    write_mnist_files(tmp_path / "fm", 20, 10, gz=False)
    monkeypatch.setenv("SURGERY_FASHION_MNIST", str(tmp_path / "fm"))
    bundle = build({"name": "fashion-mnist", "image_size": 16})
    assert (len(bundle.train), len(bundle.val)) == (20, 10)
    monkeypatch.setenv("SURGERY_FASHION_MNIST", str(tmp_path / "nowhere"))
    with pytest.raises(SpecError) as err:
        build({"name": "fashion-mnist"})
    assert str(tmp_path / "nowhere") in err.value.problem and "SURGERY_FASHION_MNIST" in err.value.hint


def test_fashion_mnist_missing_or_corrupt(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="apt-get install dataset-fashion-mnist") as err:
        build({"name": "fashion-mnist", "root": str(tmp_path)})
    assert err.value.key_path == ("data", "root")
    write_mnist_files(tmp_path, 5, 5, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x01\x02\x03\x04junk")
    with pytest.raises(SpecError, match="t10k-labels"):
        build({"name": "fashion-mnist", "root": str(tmp_path)})
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "t10k-labels-idx1-ubyte")


@pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_from_the_debian_package() -> None:
    bundle = build({"name": "fashion-mnist"})
    assert (len(bundle.train), len(bundle.val)) == (60000, 10000)
    assert len(bundle.classes) == 10
    image, label = bundle.val[0]
    assert image.shape == (3, 32, 32) and label == 9  # the first test image is an ankle boot


def test_torchvision_dataset_by_name(tmp_path: Path) -> None:
    write_mnist_files(tmp_path / "MNIST" / "raw", 40, 20, gz=False)
    bundle = build({"name": "mnist", "root": str(tmp_path), "classes": ["1 - one", 0], "image_size": 8})
    assert bundle.classes == ["1 - one", "0 - zero"]
    assert (len(bundle.train), len(bundle.val)) == (8, 4)
    assert bundle.train[0][0].shape == (3, 8, 8)


# --------------------------------------------------------------------------- transforms
def test_eval_transform_crops_large_images_and_keeps_small_ones_whole() -> None:
    transform = eval_transform(CFG, 32)
    large = Image.new("L", (100, 80), 0)
    large.putpixel((0, 0), 255)
    out = transform(large)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    assert out.max() == 0  # the corner pixel fell outside the centre crop
    small = Image.new("L", (8, 8), 0)
    small.paste(255, (0, 0, 2, 2))
    out = transform(small)
    assert out.shape == (3, 32, 32) and out[:, 0, 0].min() > 200  # whole image kept: corner survives


def test_augment_mapping_and_determinism_flag() -> None:
    assert build({"name": "digits", "augment": {}}).deterministic_train
    bundle = build(
        {
            "name": "digits",
            "augment": {"hflip": 0.5, "rotation": 10, "color_jitter": 0.2, "randaugment": "rand-m9-mstd0.5"},
        }
    )
    assert not bundle.deterministic_train
    first, again = bundle.train[(4, 11)][0], bundle.train[(4, 11)][0]
    assert first.shape == (3, 32, 32) and torch.equal(first, again)
    assert any(not torch.equal(first, bundle.train[(e, 11)][0]) for e in range(5, 10))


def test_normalize_matches_torchvision_and_keeps_channels_last() -> None:
    from torchvision.transforms import Normalize

    batch = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    expected = Normalize(CFG["mean"], CFG["std"])(batch.float() / 255)
    out = normalize(batch, CFG["mean"], CFG["std"])
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-5)
    last = normalize(batch.contiguous(memory_format=torch.channels_last), CFG["mean"], CFG["std"])
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(last, expected, atol=1e-5)


# --------------------------------------------------------------------------- loaders
def test_epoch_depends_only_on_seed_and_epoch() -> None:
    bundle = build({"name": "digits", "augment": "standard", "subset": {"train": 48}})
    warm = make_loader(bundle.train, batch_size=16, train=True, seed=7, num_workers=2, pin_memory=False)
    for epoch in range(3):
        for step, _ in enumerate(warm.epoch(epoch)):
            if step == 1 and epoch == 1:  # an epoch cut short, as train.limit_batches does
                break
    resumed = list(warm.epoch(3))
    fresh = make_loader(bundle.train, batch_size=16, train=True, seed=7, num_workers=0, pin_memory=False)
    rng_before = torch.get_rng_state()
    direct = list(fresh.epoch(3))
    assert torch.equal(rng_before, torch.get_rng_state())  # the training process's RNG is left alone
    assert len(resumed) == len(direct) == len(warm) == 3
    for (xa, ya), (xb, yb) in zip(resumed, direct):
        assert xa.dtype == torch.uint8 and ya.dtype == torch.int64 and xa.shape == (16, 3, 32, 32)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = list(fresh.epoch(2))
    assert not torch.equal(torch.cat([y for _, y in other]), torch.cat([y for _, y in direct]))


def test_eval_loader_keeps_order() -> None:
    bundle = build({"name": "digits", "subset": {"val": 30}})
    loader = make_loader(bundle.val, batch_size=8, train=False, seed=0, num_workers=0, pin_memory=False)
    assert len(loader) == 4
    assert torch.cat([y for _, y in loader.epoch(0)]).tolist() == labels(bundle.val)


@pytest.mark.parametrize(
    "size, drop_last, per_rank, batches", [(24, False, 12, 3), (25, False, 13, 4), (25, True, 12, 3)]
)
def test_ranks_split_each_epoch(size: int, drop_last: bool, per_rank: int, batches: int) -> None:
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.zeros(size, 3, 2, 2, dtype=torch.uint8), torch.arange(size))
    shares = []
    for rank in range(2):
        part = make_loader(
            data,
            batch_size=4,
            train=True,
            seed=3,
            num_workers=0,
            pin_memory=False,
            drop_last=drop_last,
            rank=rank,
            world_size=2,
        )
        shares.append([i for _, ys in part.epoch(5) for i in ys.tolist()])
        assert len(part) == batches
    assert len(shares[0]) == len(shares[1]) == (per_rank // 4 * 4 if drop_last else per_rank)
    if size % 2 == 0:
        assert sorted(shares[0] + shares[1]) == list(range(size))


def test_make_loader_takes_a_plain_dataset() -> None:
    from torch.utils.data import TensorDataset

    data = TensorDataset(torch.zeros(10, 3, 4, 4, dtype=torch.uint8), torch.arange(10))
    loader = make_loader(data, batch_size=4, train=False, seed=0, num_workers=0, pin_memory=False)
    assert [y.tolist() for _, y in loader.epoch(0)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


# --------------------------------------------------------------------------- data.balance
def _batches(loader, epoch: int, start: int = 0) -> list[list[int]]:
    return loader.batch_indices(epoch, start)


def test_balanced_sampler_evens_the_classes_is_seeded_per_epoch_and_resumable() -> None:
    targets = np.array([0] * 900 + [1] * 90 + [2] * 10)  # 90:9:1
    items = torch.utils.data.TensorDataset(torch.arange(len(targets)), torch.as_tensor(targets))
    loader = make_loader(
        items,
        batch_size=50,
        train=True,
        seed=3,
        num_workers=0,
        pin_memory=False,
        drop_last=True,
        balance_targets=targets,
    )
    epoch0 = _batches(loader, 0)
    assert len(epoch0) == 20 and all(len(b) == 50 for b in epoch0)  # as many draws as items
    drawn = np.bincount(targets[np.concatenate(epoch0)], minlength=3)
    assert all(250 <= n <= 420 for n in drawn), drawn  # about 1000/3 each, against 900/90/10
    assert _batches(loader, 0) == epoch0 and _batches(loader, 1) != epoch0  # a pure function of (seed, epoch)
    assert _batches(loader, 0, start=7) == epoch0[7:]  # resumed mid-epoch: the same batches from there
    # two ranks split the same draw, as DistributedSampler splits a permutation
    shares = [
        make_loader(
            items,
            batch_size=25,
            train=True,
            seed=3,
            num_workers=0,
            pin_memory=False,
            drop_last=True,
            balance_targets=targets,
            rank=r,
            world_size=2,
        )
        for r in (0, 1)
    ]
    draw = [i for b in epoch0 for i in b]
    assert [i for b in _batches(shares[0], 0) for i in b] == draw[0::2]
    assert [i for b in _batches(shares[1], 0) for i in b] == draw[1::2]
    images, _ = next(iter(loader.epoch(0)))  # the loader yields exactly the listed items
    assert images.flatten().tolist() == epoch0[0]


def test_balance_with_a_class_without_training_images_warns_and_weighs_it_zero() -> None:
    from surgery import build
    from surgery.data import class_weights
    from surgery.train.checks import check_training

    spec = load_spec(
        {
            "model": {"backbone": "timm:resnet10t", "num_classes": 10},
            "data": {"name": "digits", "balance": "loss", "subset": {"train": 5}},
        }
    )
    warnings = check_training(spec, build(spec))
    assert any("data.balance: 5 class(es) have no training images" in w for w in warnings), warnings
    assert class_weights(np.array([0, 0, 0, 2]), 4).tolist() == pytest.approx([4 / 6, 0.0, 4 / 2, 0.0])


# --------------------------------------------------------------------------- csv, imagefolder test/
def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), (value, value, value)).save(path)


def test_csv_dataset_with_split_column_and_paths_relative_to_the_csv(tmp_path: Path) -> None:
    folder = tmp_path / "shots"
    lines = ["path,label,split"]
    for i in range(12):
        split = "train" if i < 8 else ("val" if i < 10 else "test")
        _png(folder / "img" / f"{i}.png", 20 * i)
        lines.append(f"img/{i}.png,{'cat' if i % 2 else 'dog'},{split}")
    lines.append("img/missing.png,dog,train")  # skipped with a warning, like an unreadable imagefolder file
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    spec = load_spec(
        {
            "model": {"backbone": "timm:resnet10t", "num_classes": 2},
            "data": {"name": "csv", "root": str(folder / "labels.csv"), "image_size": 16},
        }
    )
    data = build_data(spec, {})
    assert data.classes == ["cat", "dog"] and (len(data.train), len(data.val), len(data.test)) == (8, 2, 2)
    assert data.describe.startswith("csv: 8 train / 2 val / 2 test, 2 classes")
    image, label = data.train[1]
    assert image.shape == (3, 16, 16) and label == 0  # img/1.png is a cat
    # without a split column: val_split holds out part of the rows
    (folder / "nosplit.csv").write_text(
        "path,label\n" + "\n".join(f"img/{i}.png,{'cat' if i % 2 else 'dog'}" for i in range(10)) + "\n"
    )
    spec = load_spec(
        {
            "model": {"backbone": "timm:resnet10t"},
            "data": {"name": "csv", "root": str(folder / "nosplit.csv"), "val_split": 0.2},
        }
    )
    data = build_data(spec, {})
    assert (len(data.train), len(data.val), data.test) == (8, 2, None)


@pytest.mark.parametrize(
    "text,words",
    [
        ("file,label\na.png,x\n", "no column path"),
        ("path,label,split\na.png,x,training\n", "unknown split 'training'"),
        ("path,label\na.png,\n", "an empty label"),
    ],
)
def test_csv_mistakes_name_the_file_and_line(tmp_path: Path, text: str, words: str) -> None:
    (tmp_path / "labels.csv").write_text(text)
    spec = load_spec(
        {"model": {"backbone": "timm:resnet10t"}, "data": {"name": "csv", "root": str(tmp_path / "labels.csv")}}
    )
    with pytest.raises(SpecError) as info:
        build_data(spec, {})
    assert words in info.value.problem and info.value.path == "data.root"


def test_imagefolder_test_folder_beside_val_is_the_test_set(tmp_path: Path) -> None:
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        for c in ("a", "b"):
            for i in range(n):
                _png(tmp_path / split / c / f"{i}.png", 10 * i)
    spec = load_spec(
        {
            "model": {"backbone": "timm:resnet10t", "num_classes": 2},
            "data": {"name": "imagefolder", "root": str(tmp_path)},
        }
    )
    data = build_data(spec, {})
    assert (len(data.train), len(data.val), len(data.test)) == (8, 4, 6)


@pytest.mark.parametrize(
    "multi, cell, shown",
    [
        (False, "cat\x1b[2J", "'cat\\x1b[2J'"),
        (True, "dog|owl\x1b]0;x\x07", "'owl\\x1b]0;x\\x07'"),
        (False, "cat\u202e", "'cat\\u202e'"),
    ],
)
def test_a_csv_label_with_a_terminal_escape_is_refused_at_its_line(
    tmp_path: Path, multi: bool, cell: str, shown: str
) -> None:
    (tmp_path / "labels.csv").write_text(f"path,label\na.png,dog\nb.png,{cell}\n")  # <- line 3
    spec = load_spec(
        {
            "model": {"backbone": "timm:resnet10t"},
            "data": {"name": "csv", "root": str(tmp_path / "labels.csv"), "multi_label": multi},
        }
    )
    with pytest.raises(SpecError) as info:
        build_data(spec, {})
    assert f"labels.csv, line 3: the label {shown} holds the control character" in info.value.problem
    assert info.value.path == "data.root"


def test_a_class_folder_with_a_terminal_escape_is_refused_by_name(tmp_path: Path) -> None:
    make_folder(tmp_path, per_class=2)
    (tmp_path / "cat" / "0.png").rename(tmp_path / "cat" / "keep.png")
    (tmp_path / "cat").rename(tmp_path / "cat\x1b[31m")
    with pytest.raises(SpecError) as info:
        build({"name": "imagefolder", "root": str(tmp_path)})
    assert f"the class folder {tmp_path}/cat\\x1b[31m holds the control character '\\x1b'" in info.value.problem
    assert "\x1b" not in info.value.problem


def test_spec_classes_with_a_terminal_escape_are_refused_where_written() -> None:
    with pytest.raises(SpecError) as info:
        spec_for({"name": "digits", "classes": ["ok", "bad\x1b[2J"]})
    assert info.value.path == "data.classes[1]" and "holds the control character '\\x1b'" in info.value.problem


# --------------------------------------------------------------------------- the files a run reads
def _csv_spec(csv_path: Path, **data):
    return load_spec(
        {
            "model": {"backbone": "timm:resnet10t", "num_classes": 2},
            "data": {"name": "csv", "root": str(csv_path), "image_size": 16, **data},
        }
    )


def _shots(folder: Path, n: int = 8) -> list[str]:
    for i in range(n):
        _png(folder / "img" / f"{i}.png", 20 * i)
    return [f"img/{i}.png,{'cat' if i % 2 else 'dog'}" for i in range(n)]


def test_an_image_in_train_and_val_is_refused_naming_the_csv_lines(tmp_path: Path) -> None:
    rows = _shots(tmp_path)
    lines = ["path,label,split"] + [r + ",train" for r in rows[:6]] + [r + ",val" for r in rows[6:]]
    lines.append("img/./2.png,dog,val")  # line 10: the train image of line 4, spelt another way
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(SpecError) as info:
        build_data(_csv_spec(tmp_path / "labels.csv"), {})
    err = info.value
    assert err.path == "data.root" and "in more than one split (train and val)" in err.problem
    assert "labels.csv:4) in train and" in err.found and "labels.csv:10) in val" in err.found
    assert "resolved path" in err.expected


def test_a_symbolic_link_between_split_folders_is_the_same_image(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for c in ("a", "b"):
            for i in range(3):
                _png(tmp_path / split / c / f"{i}.png", 40 * i + (c == "b") * 10)
    (tmp_path / "val" / "a" / "leak.png").symlink_to(tmp_path / "train" / "a" / "1.png")
    spec = load_spec(
        {
            "model": {"backbone": "timm:resnet10t", "num_classes": 2},
            "data": {"name": "imagefolder", "root": str(tmp_path)},
        }
    )
    with pytest.raises(SpecError, match=r"1 image\(s\) are in more than one split \(train and val\)") as info:
        build_data(spec, {})
    assert "train/a/1.png in train" in info.value.found and "val/a/leak.png in val" in info.value.found


def test_a_row_listed_twice_in_one_split_is_warned_about(tmp_path: Path, caplog) -> None:
    rows = _shots(tmp_path)
    (tmp_path / "labels.csv").write_text(
        "path,label,split\n"
        + "\n".join(r + ",train" for r in rows[:6])
        + "\n"
        + rows[0]
        + ",train\n"
        + "\n".join(r + ",val" for r in rows[6:])
        + "\n"
    )
    data = build_data(_csv_spec(tmp_path / "labels.csv"), {})
    assert len(data.train) == 7
    said = " ".join(r.getMessage() for r in caplog.records)
    assert (
        "1 image(s) are listed more than once in one split" in said
        and "labels.csv:2" in said
        and "labels.csv:8" in said
    )


def test_a_named_pipe_listed_in_a_csv_is_skipped_with_its_line_not_opened(tmp_path: Path, caplog) -> None:
    import os
    import threading

    rows = _shots(tmp_path)
    os.mkfifo(tmp_path / "img" / "pipe.png")  # opened for reading, it would wait for a writer forever
    (tmp_path / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\nimg/pipe.png,cat\n")
    spec = _csv_spec(tmp_path / "labels.csv", val_split=0.25)
    done: dict = {}
    worker = threading.Thread(target=lambda: done.setdefault("data", build_data(spec, {})), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert "data" in done, "build_data blocked on a named pipe"
    data = done["data"]
    assert len(data.train) + len(data.val) == 8 and "1 unreadable files skipped" in data.describe
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "pipe.png (labels.csv:10): not a regular file (a named pipe)" in said


def test_a_big_csv_with_a_subset_touches_only_the_rows_kept(tmp_path: Path, monkeypatch, capsys) -> None:
    import os

    from surgery.data import scan

    n = 100_000  # hard links to four images: distinct files by path, as many rows as a real big listing
    (tmp_path / "img").mkdir()
    for j in range(4):
        _png(tmp_path / f"{j}.png", 60 * j)
    lines = ["path,label"]
    for i in range(n):
        os.link(tmp_path / f"{i % 4}.png", tmp_path / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,{'cat' if i % 2 else 'dog'}")
    (tmp_path / "big.csv").write_text("\n".join(lines) + "\n")
    spec = _csv_spec(tmp_path / "big.csv", subset={"train": 40, "val": 20})
    calls = Counter()
    images = str(tmp_path / "img")
    for name in ("stat", "lstat", "open"):
        real = getattr(os, name)

        def counted(path, *args, _real=real, _name=name, **kw):
            if str(path).startswith(images):
                calls[_name] += 1
            return _real(path, *args, **kw)

        monkeypatch.setattr(os, name, counted)
    monkeypatch.setattr(scan, "PROGRESS_EVERY", 0.0)  # a line for each file: shows the scan speaks on stderr
    data = build_data(spec, {})
    assert (len(data.train), len(data.val)) == (40, 20)
    assert 0 < sum(calls.values()) <= 10 * 60, calls  # bounded by the 60 rows kept, not the 100,000 listed
    assert "checking the image files of csv: 60 of 60" in capsys.readouterr().err


def test_a_csv_data_root_that_is_a_named_pipe_is_refused_not_read(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "labels.csv")
    with pytest.raises(SpecError, match="labels.csv is a named pipe") as info:
        build_data(_csv_spec(tmp_path / "labels.csv"), {})
    assert info.value.path == "data.root"


def test_a_file_name_with_a_control_character_is_escaped_in_the_warning(tmp_path: Path, caplog) -> None:
    rows = _shots(tmp_path)
    (tmp_path / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\nimg/\x1b[2Jgone.png,cat\n")
    build_data(_csv_spec(tmp_path / "labels.csv", val_split=0.25), {})
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "img/\\x1b[2Jgone.png (labels.csv:10): no such file" in said and "\x1b" not in said
