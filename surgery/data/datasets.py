"""The datasets `data.name` names: digits, fake, imagefolder, csv, fashion-mnist, and torchvision's."""

from __future__ import annotations

import gzip
import inspect
import io
import logging
import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SpecError, did_you_mean, printable
from ..files import not_regular, open_regular
from ..spec import Spec
from ..untrusted import label_problem
from .sources import ArraySource, DatasetSource, FileSource, Pool
from .splits import train_val_split

log = logging.getLogger(__name__)


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_MNIST_ENV = "SURGERY_FASHION_MNIST"  # another folder for data.name: fashion-mnist without data.root


def fashion_mnist_dir() -> Path:
    """Where `data.name: fashion-mnist` looks when `data.root` is not set: $SURGERY_FASHION_MNIST,
    else the folder Debian's dataset-fashion-mnist package installs."""
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FAKE_SIZES = {"train": 256, "val": 64}
_VAL_DIRS = ("val", "validation", "valid", "test")
# classification datasets of torchvision known to load through `_torchvision` (others may too)
_TORCHVISION_SHOWN = (
    "cifar10",
    "cifar100",
    "mnist",
    "fashionmnist",
    "kmnist",
    "qmnist",
    "svhn",
    "stl10",
    "usps",
    "semeion",
    "flowers102",
    "food101",
    "dtd",
    "oxfordiiitpet",
    "stanfordcars",
    "fgvcaircraft",
    "gtsrb",
    "country211",
    "eurosat",
    "pcam",
    "caltech101",
    "sun397",
    "imagenette",
    "fer2013",
    "imagenet",
)


def _digits(spec: Spec) -> tuple[Pool, Pool, int]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    source = ArraySource(images, digits.target, [str(c) for c in digits.target_names])
    return (*train_val_split(spec, source), 0)


def _fake(spec: Spec) -> tuple[Pool, Pool, int]:
    from torchvision.datasets import FakeData

    size = spec.data.image_size
    num_classes = spec.model.num_classes or 10
    n_train = spec.data.subset.train or FAKE_SIZES["train"]
    n_val = spec.data.subset.val or FAKE_SIZES["val"]
    offset = spec.seed * 1_000_003  # FakeData seeds item i with i + offset: disjoint train and val
    pools = []
    for n, start in ((n_train, offset), (n_val, offset + n_train)):
        dataset = FakeData(n, (3, size, size), num_classes, random_offset=start)
        targets = np.array([dataset[i][1] for i in range(n)])
        pools.append(Pool(DatasetSource(dataset, targets, [f"class{i}" for i in range(num_classes)]), np.arange(n)))
    return pools[0], pools[1], 0


def _folder_error(spec: Spec, problem: str, folder: Path, **kw: Any) -> SpecError:
    return spec.error(("data", "root"), problem, found=str(folder), **kw)


CSV_SPLITS = ("train", "val", "test")


def _csv(spec: Spec) -> tuple[Pool, Pool, int, Pool | None]:
    """A CSV file with a header: `path` (relative to the CSV's folder), `label` (a class name) and
    optionally `split` (train, val or test; without it, or without val rows, val_split holds out
    part of train). Classes are the label names, sorted, as ImageFolder sorts its folders."""
    # --- the file: its header and rows
    path = _csv_path(spec)
    header, rows = _read_csv(spec, path)
    # --- each row checked and put in its split
    multi, separator = spec.data.multi_label, spec.data.label_separator
    # paths joined as text: no file is touched until the splits and subsets are fixed (`scan.check_files`)
    folder, shown = str(path.parent), path.name
    samples: dict[str, list[tuple[str, str, int]]] = {s: [] for s in CSV_SPLITS}
    for line, row in rows:
        file, label, split = _csv_row(spec, path, header, line, row)
        samples[split].append((os.path.join(folder, file), label, line))
    if not samples["train"]:
        raise _folder_error(
            spec,
            f"the CSV file {path} has no training rows",
            path,
            expected="rows with split train (or no split column)",
        )
    # --- the classes, and the source: every row (train, val, then test) with its class or classes
    names = {s: [_label_names(c, separator) if multi else [c] for _, c, _ in samples[s]] for s in CSV_SPLITS}
    classes = sorted({c for split in CSV_SPLITS for cell in names[split] for c in cell})
    if not classes:
        raise _folder_error(
            spec,
            f"every label cell of {path} is empty",
            path,
            expected=f"class names in the label column, separated by {separator!r}",
        )
    index = {c: i for i, c in enumerate(classes)}
    every = [row for split in CSV_SPLITS for row in samples[split]]
    targets, hot = _csv_targets(names, index, multi)
    source = FileSource(
        [(p, t) for (p, _, _), t in zip(every, targets)],
        classes,
        multi_hot=hot,
        listed_at=[f"{shown}:{line}" for _, _, line in every],
    )
    # --- every class has a training row; the pools
    n_train, n_val = len(samples["train"]), len(samples["val"])
    if hot is not None:
        present = set(np.flatnonzero(hot[:n_train].sum(0)).tolist())
    else:
        present = set(source.targets[:n_train].tolist())
    empty = [c for c in classes if index[c] not in present]
    if empty:
        raise _folder_error(
            spec,
            f"some labels of {path} have no training rows: " + ", ".join(empty),
            path,
            expected="at least one training image per label",
        )
    test = Pool(source, np.arange(n_train + n_val, len(source))) if samples["test"] else None
    if n_val == 0:
        train, val = train_val_split(spec, source, np.arange(n_train))
    else:
        train, val = Pool(source, np.arange(n_train)), Pool(source, np.arange(n_train, n_train + n_val))
    return train, val, 0, test


def _csv_path(spec: Spec) -> Path:
    """The CSV file `data.root` names, which must be a regular file."""
    if spec.data.root is None:
        raise spec.error(
            ("data", "root"),
            "csv needs the CSV file",
            found="root: null",
            expected="data.root set to a CSV file with the columns path,label[,split]",
        )
    path = spec.resolve_path(spec.data.root, ("data", "root"))
    why = not_regular(path)
    if why is not None:
        raise _folder_error(
            spec,
            f"the CSV file {path} does not exist" if why == "no such file" else f"{path} is {why}",
            path,
            expected="a CSV file with a header line path,label[,split]",
            hint="data.root is relative to the spec file's folder",
        )
    return path


def _read_csv(spec: Spec, path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """The CSV file's header (with path and label) and its rows, each with its line number."""
    import csv

    try:
        with io.TextIOWrapper(open_regular(path), encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in ("path", "label") if c not in header]
            if missing:
                raise _folder_error(
                    spec,
                    f"the CSV file {path} has no column {' or '.join(missing)}",
                    path,
                    expected="a header line with path and label (and optionally split)",
                    hint=f"its header is: {','.join(header) or '(empty)'}",
                )
            rows = [(reader.line_num, row) for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise _folder_error(
            spec,
            f"cannot read the CSV file {path}: {exc}",
            path,
            expected="UTF-8 text, comma-separated, with a header line",
        ) from None
    except OSError as exc:
        raise _folder_error(
            spec, f"cannot read the CSV file {path}: {exc.strerror or exc}", path, expected="a readable CSV file"
        ) from None
    return list(header), rows


def _csv_row(spec: Spec, path: Path, header: Sequence[str], line: int, row: dict[str, Any]) -> tuple[str, str, str]:
    """One row's (path, label cell, split), checked: a path, a label (multi-label: may be empty),
    a known split, and printable class names."""
    multi, separator = spec.data.multi_label, spec.data.label_separator
    file, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
    split = (row.get("split") or "train").strip() if "split" in header else "train"
    if not file or (not label and not multi):  # multi-label: an empty cell is an image of no class
        raise _folder_error(
            spec,
            f"{path}, line {line}: an empty {'path' if not file else 'label'}",
            path,
            expected="a path and a label on every line",
        )
    if split not in CSV_SPLITS:
        raise _folder_error(
            spec,
            f"{path}, line {line}: unknown split {split!r}",
            path,
            expected="train, val or test",
            hint=did_you_mean(split, list(CSV_SPLITS)),
        )
    for name in _label_names(label, separator) if multi else [label]:
        problem = label_problem(name)
        if problem:
            raise _folder_error(
                spec,
                f"{path}, line {line}: the label '{printable(name)}' {problem}",
                path,
                expected="class names of printable characters",
                hint="class names are shown on terminals and pages; fix the label cell",
            )
    return file, label, split


def _csv_targets(
    names: dict[str, list[list[str]]], index: dict[str, int], multi: bool
) -> tuple[list[int], np.ndarray | None]:
    """Each row's target (rows in CSV_SPLITS order) and, multi-label, the multi-hot rows (else None)."""
    cells = [cell for split in CSV_SPLITS for cell in names[split]]
    if not multi:
        return [index[cell[0]] for cell in cells], None
    # one stratum for splits and subsets (targets 0); the classes live in the multi-hot rows
    hot = np.zeros((len(cells), len(index)), dtype=np.float32)
    for r, cell in enumerate(cells):
        hot[r, [index[c] for c in cell]] = 1.0
    return [0] * len(cells), hot


def _label_names(cell: str, separator: str) -> list[str]:
    """The class names of one multi-label cell: split at `separator`, spaces around it dropped,
    empty parts (an empty cell, a doubled separator) ignored, each name once."""
    return list(dict.fromkeys(part.strip() for part in cell.split(separator) if part.strip()))


_IMAGEFOLDER_LAYOUT = "root/<class>/<image> or root/train/<class>/<image> with root/val/<class>/<image>"


def _imagefolder(spec: Spec) -> tuple[Pool, Pool, int, Pool | None]:
    # --- the folders: root/<class>/..., or train/ beside val/ (and then maybe test/)
    root = _imagefolder_root(spec)
    val_dir = next((root / d for d in _VAL_DIRS if (root / d).is_dir()), None)
    # test/ is the validation set when there is no val/ (as before); beside val/ it is a test set
    test_dir = root / "test" if val_dir is not None and val_dir.name != "test" and (root / "test").is_dir() else None
    train_dir = root / "train" if (root / "train").is_dir() and val_dir is not None else root
    # --- the classes (train's folders) and each split's images
    folder = _class_folders(spec, train_dir)
    samples = list(folder.samples)
    val_samples: list[tuple[str, int]] = []
    if train_dir != root:
        val_samples = _split_images(spec, folder, train_dir, val_dir, "val")
    test_samples: list[tuple[str, int]] = []
    if train_dir != root and test_dir is not None:
        test_samples = _split_images(spec, folder, train_dir, test_dir, "test")
    _check_train_images(spec, folder, samples, train_dir)
    # --- the pools; no image is opened here: `scan.check_files` reads the headers of those the splits keep
    if train_dir == root:
        source = FileSource(samples, list(folder.classes))
        return (*train_val_split(spec, source), 0, None)
    source = FileSource(samples + val_samples + test_samples, list(folder.classes))
    n, m = len(samples), len(samples) + len(val_samples)
    test = Pool(source, np.arange(m, len(source))) if test_samples else None
    return Pool(source, np.arange(n)), Pool(source, np.arange(n, m)), 0, test


def _imagefolder_root(spec: Spec) -> Path:
    """The dataset folder `data.root` names, which must be a folder."""
    if spec.data.root is None:
        raise spec.error(
            ("data", "root"),
            "imagefolder needs a folder",
            found="root: null",
            expected=f"data.root set to a folder laid out as {_IMAGEFOLDER_LAYOUT}",
        )
    root = spec.resolve_path(spec.data.root, ("data", "root"))
    if not root.is_dir():
        raise _folder_error(
            spec,
            f"the dataset folder {root} does not exist" if not root.exists() else f"{root} is not a folder",
            root,
            expected=f"a folder laid out as {_IMAGEFOLDER_LAYOUT}",
            hint="data.root is relative to the spec file's folder",
        )
    return root


def _class_folders(spec: Spec, train_dir: Path) -> Any:
    """torchvision's ImageFolder of the training folder, its class folders' names checked."""
    from torchvision.datasets import ImageFolder

    try:
        folder = ImageFolder(str(train_dir), allow_empty=True)
    except FileNotFoundError:
        raise _folder_error(
            spec,
            f"the dataset folder {train_dir} has no class folders",
            train_dir,
            expected=f"one sub-folder per class with images inside: {_IMAGEFOLDER_LAYOUT}",
        ) from None
    for name in folder.classes:
        problem = label_problem(name)
        if problem:
            raise _folder_error(
                spec,
                f"the class folder {printable(train_dir / name)} {problem}",
                train_dir / name,
                expected="class folder names of printable characters",
                hint="class names are shown on terminals and pages; rename the folder",
            )
    return folder


def _split_images(spec: Spec, folder: Any, train_dir: Path, split_dir: Path, split: str) -> list[tuple[str, int]]:
    """The images of the val (or test) folder `split_dir`, whose class folders must all be train's."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    extra = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and d.name not in folder.class_to_idx)
    if extra:
        raise _folder_error(
            spec,
            f"{split_dir} has class folders that {train_dir} lacks: {', '.join(extra)}",
            split_dir,
            expected=f"the same class folders under train/ and {split}/",
        )
    return make_dataset(str(split_dir), folder.class_to_idx, IMG_EXTENSIONS, allow_empty=True)


def _check_train_images(spec: Spec, folder: Any, samples: Sequence[tuple[str, int]], train_dir: Path) -> None:
    """The training folder has images, and every class folder has some."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not samples:
        raise _folder_error(
            spec,
            f"the dataset folder {train_dir} has no images",
            train_dir,
            expected="image files (" + " ".join(IMG_EXTENSIONS) + ") in class sub-folders",
        )
    present = {t for _, t in samples}
    empty = [c for i, c in enumerate(folder.classes) if i not in present]
    if empty:
        raise _folder_error(
            spec,
            f"some class folders under {train_dir} have no images: " + ", ".join(empty),
            train_dir,
            expected="at least one image per class",
            hint="remove the empty folders or add images",
        )


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format; gzipped if the name ends in .gz) into an array.

    Raises:
        ValueError: if the file is not IDX or is cut short.
    """
    path = Path(path)
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        data = f.read()
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in dtypes:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is cut short in its header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(dtypes[data[2]])
    if len(data) - header != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{path} holds {len(data) - header} bytes of data, its header says shape {shape}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _fashion_mnist(spec: Spec) -> tuple[Pool, Pool, int]:
    root = spec.resolve_path(spec.data.root, ("data", "root")) if spec.data.root else fashion_mnist_dir()
    arrays = {}
    for part, stem in (
        ("train_x", "train-images-idx3-ubyte"),
        ("train_y", "train-labels-idx1-ubyte"),
        ("val_x", "t10k-images-idx3-ubyte"),
        ("val_y", "t10k-labels-idx1-ubyte"),
    ):
        path = next((root / (stem + ext) for ext in ("", ".gz") if (root / (stem + ext)).is_file()), None)
        if path is None:
            raise spec.error(
                ("data", "root"),
                f"Fashion-MNIST is not in {root}",
                found=f"no {stem}[.gz] in {root}",
                expected="the four IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (optionally .gz)",
                hint="apt-get install dataset-fashion-mnist, or set data.root (or the environment "
                f"variable {FASHION_MNIST_ENV}) to a folder with them",
            )
        try:
            arrays[part] = read_idx(path)
        except (OSError, ValueError, EOFError) as exc:
            raise spec.error(
                ("data", "root"),
                f"cannot read {path}: {exc}",
                found=str(path),
                expected="an IDX file as published by Fashion-MNIST",
            ) from None
    pools = []
    for x, y in (("train_x", "train_y"), ("val_x", "val_y")):
        if arrays[x].ndim != 3 or len(arrays[x]) != len(arrays[y]):
            raise spec.error(
                ("data", "root"),
                f"the Fashion-MNIST files in {root} do not match",
                found=f"images {arrays[x].shape}, labels {arrays[y].shape}",
                expected="N images of HxW and N labels",
            )
        source = ArraySource(arrays[x].astype(np.uint8, copy=False), arrays[y], list(FASHION_MNIST_CLASSES))
        pools.append(Pool(source, np.arange(len(source))))
    return pools[0], pools[1], 0


def _norm_name(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def _torchvision_classes() -> dict[str, type]:
    import torchvision.datasets as tvd
    from torchvision.datasets import VisionDataset

    skip = {"ImageFolder", "DatasetFolder", "FakeData", "VisionDataset"}
    return {
        _norm_name(n): getattr(tvd, n)
        for n in tvd.__all__
        if n not in skip and inspect.isclass(getattr(tvd, n)) and issubclass(getattr(tvd, n), VisionDataset)
    }


def _torchvision(spec: Spec, cls: type) -> tuple[Pool, Pool, int]:
    root = (
        spec.resolve_path(spec.data.root, ("data", "root"))
        if spec.data.root
        else Path(torch.hub.get_dir()).parent / "datasets"
    )
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {"root": str(root)}
    if "download" in params:
        kwargs["download"] = spec.data.download
    name = spec.data.name

    def make(**split: Any) -> Any:
        try:
            return cls(**kwargs, **split)
        except (RuntimeError, FileNotFoundError) as exc:
            if spec.data.download:
                raise spec.error(
                    ("data", "download"),
                    f"{name} could not be downloaded to {root}: {exc}",
                    found="download: true",
                    hint=f"place the files under {root} yourself",
                ) from None
            raise spec.error(
                ("data", "root"),
                f"{name} is not in {root}",
                found=str(exc).strip(),
                expected=f"the {cls.__name__} files under {root}",
                hint="set data.download: true, or place the files under data.root",
            ) from None
        except OSError as exc:  # network failures while downloading
            raise spec.error(
                ("data", "download"),
                f"{name} could not be downloaded to {root}: {exc}",
                found="download: true",
                hint=f"place the files under {root} yourself",
            ) from None

    def first_split(names: Sequence[str]) -> Any:
        for split in names:
            try:
                return make(split=split)
            except SpecError:
                raise
            except ValueError:  # torchvision's verify_str_arg: not a split of this dataset
                continue
        return None

    if "train" in params:
        train, val = make(train=True), make(train=False)
    elif "split" in params:
        train = first_split(("train", "trainval", "train-standard"))
        val = first_split(("val", "valid", "validation", "test"))
        if train is None or val is None:
            raise spec.error(
                ("data", "name"),
                f"{name}: cannot tell which splits are train and val",
                found=name,
                expected="a torchvision dataset with train/val or train/test splits",
                hint="export it as an image folder and use name: imagefolder",
            )
    else:
        train, val = make(), None
    sources = [_dataset_source(spec, d) for d in (train, val) if d is not None]
    if val is None:
        return (*train_val_split(spec, sources[0]), 0)
    return Pool(sources[0], np.arange(len(sources[0]))), Pool(sources[1], np.arange(len(sources[1]))), 0


def _dataset_source(spec: Spec, dataset: Any) -> DatasetSource:
    targets = None
    for attr in ("targets", "labels", "_labels", "y"):
        value = getattr(dataset, attr, None)
        if value is not None and len(value) == len(dataset):
            array = np.asarray(value)
            if array.ndim == 1 and np.issubdtype(array.dtype, np.integer):
                targets = array
                break
    if targets is None:
        log.info("reading every label of %s one item at a time", type(dataset).__name__)
        targets = np.array([dataset[i][1] for i in range(len(dataset))])
        if targets.ndim != 1 or not np.issubdtype(targets.dtype, np.integer):
            raise spec.error(
                ("data", "name"),
                f"{type(dataset).__name__} has no integer class labels",
                found=spec.data.name,
                expected="a classification dataset",
            )
    classes = [str(c) for c in getattr(dataset, "classes", None) or []]
    if len(classes) <= int(targets.max(initial=0)):
        classes = [str(i) for i in range(int(targets.max(initial=0)) + 1)]
    return DatasetSource(dataset, targets, classes)


_BUILTIN = {
    "digits": _digits,
    "fake": _fake,
    "imagefolder": _imagefolder,
    "csv": _csv,
    "fashion-mnist": _fashion_mnist,
    "fashion_mnist": _fashion_mnist,
}


def dataset_names() -> list[str]:
    """Dataset names `data.name` accepts without listing all of torchvision (for help and errors)."""
    return ["digits", "fake", "imagefolder", "csv", "fashion-mnist"] + list(_TORCHVISION_SHOWN)


def pools(spec: Spec) -> tuple[Pool, Pool, int, Pool | None]:
    """(train, val, unreadable files skipped, test or None) of `data.name`."""
    name = spec.data.name
    if name.lower() in _BUILTIN:
        train, val, skipped, *test = _BUILTIN[name.lower()](spec)
        return train, val, skipped, test[0] if test else None
    known = _torchvision_classes()
    if _norm_name(name) in known:
        return (*_torchvision(spec, known[_norm_name(name)]), None)
    raise spec.error(
        ("data", "name"),
        f"unknown dataset {name!r}",
        found=repr(name),
        expected="one of " + ", ".join(dataset_names()) + " (or another torchvision dataset class)",
        hint=did_you_mean(name, dataset_names() + sorted(known)),
    )
