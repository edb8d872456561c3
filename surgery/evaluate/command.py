"""`surgery evaluate`: score a trained run on images that never touched its training or model selection.

    surgery evaluate RUN_DIR [--split test|val | --data PATH] [--tta] [--weights final|best|ema] [--json]

What is scored (`EvalSet`):
    --split test   the run's held-out test split: ``data.test_split`` of the training images, or the
                   dataset's own test images (an image folder's test/ beside val/, csv rows with
                   split test), rebuilt from the run's spec.yaml and checked against the fingerprint
                   the run recorded in splits.json
    --split val    the validation split, labelled as such: it selected the model, so it flatters
    --data PATH    a folder PATH/<class>/<image>, class folders matched to the run's classes by name

What is written, atomically (a staging folder renamed into place, so a failed or interrupted
evaluation leaves the previous results whole), in ``RUN_DIR/eval/<split>/``:
    metrics.json        accuracy, top5, per_class, macro_avg, weighted_avg, confusion_matrix,
                        most_confused, ece and its reliability bins, tta, pngs, mistakes
    predictions.jsonl   one line per image: path or index, true, predicted, confidence (and tta_*)
    confusion.png, confusion_normalized.png, reliability.png, mistakes.png

Every figure is scikit-learn's on the model's softmax outputs, except the expected calibration
error, which scikit-learn does not have (`calibration`). Multi-label runs are refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..data.images import UNREADABLE, decode, unreadable
from ..errors import Origin, RunDirError, UsageError, did_you_mean
from ..files import write_folder
from ..runs import layout, open_run
from ..runs.loaded import LoadedRun
from ..spec import Spec

SPLITS = ("test", "val")
ECE_BINS = 15  # equal-width confidence bins, as Guo et al. (2017) report ECE
GALLERY_SIZE = 16  # the most confident mistakes shown in mistakes.png
MOST_CONFUSED = 10  # (true, predicted) pairs listed in metrics.json
PNGS = {
    "confusion": "confusion.png",
    "confusion_normalized": "confusion_normalized.png",
    "reliability": "reliability.png",
    "mistakes": "mistakes.png",
}


@dataclass(frozen=True)
class EvalSet:
    """The labelled images an evaluation scores.

    name: the folder under ``RUN_DIR/eval/``. source: what the images are, in words.
    source_kind: test, val or folder. selection: whether the images chose the best epoch (val).
    source_images: loads image i (`ImageSource`); indices: the images scored, in order;
    labels: each one's class (the run's class index); ids: each one's path or dataset index;
    id_key: "path" or "index" (the key predictions.jsonl names it by).
    """

    name: str
    source: str
    source_kind: str
    selection: bool
    source_images: Any
    indices: np.ndarray
    labels: np.ndarray
    ids: list[str]
    id_key: str

    def __len__(self) -> int:
        return len(self.indices)


# --------------------------------------------------------------------------- what is scored
def _flag_error(flag: str, value: Any, problem: str, **kw: Any) -> UsageError:
    return UsageError(problem, origin=Origin.flag(flag, value), **kw)


def split_set(run: LoadedRun, split: str) -> EvalSet:
    """The run's test or validation split, rebuilt from its spec.yaml exactly as it trained.

    Raises:
        UsageError: no such split in this run (naming data.test_split and --data), or it is empty.
        RunDirError: the split's images are no longer those the run recorded (exit code 1).
    """
    from ..data import build_data, data_base, item_ids
    from ..data.sources import FileSource

    if split not in SPLITS:
        raise _unknown_split(split)
    # --- rebuild the run's data from its spec, with the classes it trained on
    record = open_run(run.run_dir).require_splits()
    spec = _spec_with_data_root(run, record)
    bundle = build_data(spec, run.data_config)
    _check_classes(run, bundle.classes)
    dataset = bundle.test if split == "test" else bundle.val
    if dataset is None:
        raise _no_test_split(run, spec, split)
    # --- check it is the split the run recorded, and not empty
    ids = item_ids(dataset, data_base(spec))  # paths relative to the data folder, as splits.json has them
    labels = np.asarray(dataset.targets, dtype=np.int64)
    _check_fingerprint(run, split, (record or {}).get(split), ids, labels, len(dataset))
    if len(dataset) == 0:
        raise _flag_error(
            "--split",
            split,
            f"the {split} split is empty",
            found=f"0 images ({bundle.describe})",
            expected="at least one image",
            hint="check data.classes and data.subset in the run's spec",
        )
    # --- the set
    is_file = isinstance(dataset.source, FileSource)
    return EvalSet(
        name=split,
        source=_split_words(spec, split),
        source_kind=split,
        selection=split == "val",
        source_images=dataset.source,
        indices=np.asarray(dataset.indices),
        labels=labels,
        ids=[dataset.source.paths[int(i)] for i in dataset.indices] if is_file else ids,
        id_key="path" if is_file else "index",
    )


def _unknown_split(split: str) -> UsageError:
    return _flag_error(
        "--split",
        split,
        f"unknown split {split!r}",
        found=repr(split),
        expected=" or ".join(SPLITS),
        hint=did_you_mean(split, SPLITS),
    )


def _check_classes(run: LoadedRun, classes: Sequence[str]) -> None:
    """The rebuilt dataset must have the classes the run trained on, in the same order."""
    if classes != run.classes:
        raise RunDirError(
            "the run's dataset no longer has the classes the run trained on",
            origin=Origin.path(run.run_dir),
            found=", ".join(classes[:10]),
            expected=", ".join(run.classes[:10]),
            hint="evaluate a folder of labelled images with --data PATH",
        )


def _no_test_split(run: LoadedRun, spec: Spec, split: str) -> UsageError:
    return _flag_error(
        "--split",
        split,
        "this run has no test split",
        found=f"data.test_split: "
        f"{spec.data.test_split} in {run.run_dir / layout.SPEC}, and {spec.data.name} has no test "
        "images of its own",
        expected="a run trained with data.test_split (e.g. 0.1), or on a "
        "dataset with test images (an image folder's test/ beside val/, csv rows with split test)",
        hint="evaluate a folder of labelled images with --data PATH, or the validation split "
        "with --split val (it selected the model, so its figures flatter)",
    )


def _check_fingerprint(
    run: LoadedRun, split: str, recorded: Mapping[str, Any] | None, ids: Sequence[Any], labels: np.ndarray, images: int
) -> None:
    """The rebuilt split must be the one splits.json recorded (when it recorded one): same images, same labels."""
    from ..data.splits import fingerprint

    if recorded and recorded.get("fingerprint") != fingerprint(zip(ids, labels.tolist())):
        raise RunDirError(
            f"the {split} split rebuilt from {run.run_dir / layout.SPEC} is not the one the run "
            f"recorded: the dataset changed since it trained",
            origin=Origin.path(run.run_dir / layout.SPLITS),
            found=f"{images} images now",
            expected=f"the {recorded.get('images')} images of splits.json, with the same labels",
            hint="an image that trained could now sit in the split; "
            "evaluate a folder of labelled images with --data PATH instead",
        )


def _split_words(spec: Spec, split: str) -> str:
    """What the split is, in words (metrics.json's source)."""
    if split == "val":
        return "validation split (used for model selection: not a held-out estimate)"
    if spec.data.test_split:
        return f"test split (held out: data.test_split {spec.data.test_split} of the training images, seed {spec.seed})"
    return "test split (the dataset's own test images)"


def _spec_with_data_root(run: LoadedRun, record: Mapping[str, Any] | None) -> Spec:
    """The run's spec with `data.root` where it pointed when the run trained: spec.yaml keeps the
    path as written, relative to the spec file the run came from, not to the run directory."""
    spec = run.spec
    root = spec.data.root
    if root is None or Path(root).expanduser().is_absolute():
        return spec
    recorded = (record or {}).get("data_root")
    if recorded:
        return replace(spec, data=replace(spec.data, root=str(recorded)))
    if not (run.run_dir / root).exists():
        raise UsageError(
            f"the run's data.root {root!r} is relative to the spec file it was trained from, which "
            "this run does not record",
            origin=Origin.path(run.run_dir / layout.SPEC),
            found=f"no {run.run_dir / root}",
            expected="a run written by this version of `surgery run` (splits.json records the folder)",
            hint="evaluate the images with --data PATH",
        )
    return spec


def folder_set(classes: Sequence[str], path: str | Path) -> EvalSet:
    """Labelled images in ``PATH/<class>/...``; class folders are matched to the run's `classes` by name.

    A class of the run without a folder (or without images) is allowed: it is then never the true
    class, only possibly a predicted one.

    Raises:
        UsageError: PATH is not a folder, holds a class folder the run does not know, or no images.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    from ..data.sources import FileSource

    folder = Path(path)
    if not folder.is_dir():
        raise _flag_error(
            "--data",
            path,
            "no such folder" if not folder.exists() else "not a folder",
            found=str(folder),
            expected="a folder with one sub-folder of images per class",
        )
    names = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    unknown = [n for n in names if n not in classes]
    if unknown:
        shown = ", ".join(repr(c) for c in classes[:20]) + (", ..." if len(classes) > 20 else "")
        splits = [n for n in unknown if n in ("train", "val", "valid", "validation", "test")]
        hint = (
            f"point --data at the folder whose sub-folders are the classes, e.g. {folder / splits[0]}"
            if splits
            else did_you_mean(unknown[0], classes)
        )
        raise _flag_error(
            "--data",
            path,
            f"{folder} has class folders the run does not know: "
            + ", ".join(repr(n) for n in unknown[:10])
            + (" ..." if len(unknown) > 10 else ""),
            found=f"{len(unknown)} of {len(names)} folders unknown",
            expected=f"folders named after the run's {len(classes)} classes: {shown}",
            hint=hint,
        )
    if not names:
        raise _flag_error(
            "--data",
            path,
            f"{folder} has no class folders",
            found=str(folder),
            expected="one sub-folder of images per class, named after the run's classes",
        )
    index = {name: classes.index(name) for name in names}
    samples = make_dataset(str(folder), index, IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise _flag_error(
            "--data",
            path,
            f"the class folders of {folder} hold no images",
            found=str(folder),
            expected="image files (" + " ".join(IMG_EXTENSIONS) + ") in class sub-folders",
        )
    source = FileSource(samples, list(classes))
    return EvalSet(
        name=folder_name(folder),
        source=f"folder {folder.absolute()}",
        source_kind="folder",
        selection=False,
        source_images=source,
        indices=np.arange(len(samples)),
        labels=source.targets.copy(),
        ids=[p for p, _ in samples],
        id_key="path",
    )


def folder_name(folder: Path) -> str:
    """``folder-<last part>-<8 hex digits>``: the last part kept readable (characters other than
    letters, digits, dot, dash and underscore become a dash), the digest of the absolute path
    telling apart folders of the same name; the same folder always gets the same name."""
    absolute = Path(folder).expanduser().absolute()
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", absolute.name).strip(".-")[:40] or "root"
    digest = hashlib.sha256(str(absolute).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"folder-{readable}-{digest}"


# --------------------------------------------------------------------------- the model's outputs
@dataclass
class Outputs:
    """Softmax outputs of the images that could be read (positions into the `EvalSet`)."""

    positions: np.ndarray
    probs: np.ndarray  # (images, classes), float64
    tta_probs: np.ndarray | None
    views: list[str]  # every TTA view used, in order of first use
    cropped: int  # images that had corner crops
    skipped: list[tuple[Any, str]]  # (path or index, reason) of unreadable images


class _Items(torch.utils.data.Dataset):
    """Item k of an `EvalSet`: (k, eval view or None, TTA views and names or None, reason unreadable)."""

    def __init__(self, evalset: EvalSet, transform: Callable, views: Callable | None) -> None:
        self.source, self.indices = evalset.source_images, evalset.indices
        self.transform, self.views = transform, views

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, Any, Any, str | None]:
        try:
            x, v = decode(
                lambda: self.source.load(int(self.indices[k])),
                lambda image: (self.transform(image), self.views(image) if self.views else None),
            )
            return k, x, v, None
        except UNREADABLE as exc:
            return k, None, None, unreadable(exc)


def _collate(batch: list) -> list:
    return batch  # items stay whole: unreadable ones and per-image view counts are sorted out in `infer`


@torch.inference_mode()
def infer(
    run: LoadedRun,
    evalset: EvalSet,
    *,
    tta: bool = False,
    batch_size: int = 64,
    workers: int = 0,
    on_skip: Callable[[str, str], None] | None = None,
) -> Outputs:
    """Softmax outputs of the run's model on every readable image of `evalset` (eval transform),
    and with `tta` the mean softmax over each image's `TTAViews` as well.

    Unreadable images are skipped, each passed to `on_skip(id, reason)`.
    """
    from ..data import TTAViews

    views = TTAViews(run.data_config, run.image_size) if tta else None
    loader = torch.utils.data.DataLoader(
        _Items(evalset, run.transform, views), batch_size=batch_size, num_workers=workers, collate_fn=_collate
    )
    positions, probs, tta_probs, seen_views, skipped, cropped = [], [], [], {}, [], 0
    for batch in loader:
        good = []
        for k, x, v, reason in batch:
            if reason is not None:
                skipped.append((_id(evalset, k), reason))
                if on_skip is not None:
                    on_skip(str(evalset.ids[k]), reason)
            else:
                good.append((k, x, v))
        if not good:
            continue
        positions.extend(k for k, _, _ in good)
        probs.append(_softmax(run, torch.stack([x for _, x, _ in good])))
        if views is not None:
            stacked = torch.cat([v[0] for _, _, v in good])
            owner = torch.repeat_interleave(torch.arange(len(good)), torch.tensor([len(v[1]) for _, _, v in good]))
            per_view = _softmax(run, stacked)
            mean = torch.zeros(len(good), per_view.shape[1], dtype=torch.float64).index_add_(0, owner, per_view)
            tta_probs.append(mean / torch.bincount(owner, minlength=len(good))[:, None])
            for _, _, (_, names) in good:
                seen_views.update(dict.fromkeys(names))
                cropped += len(names) > 2
    k = len(run.classes)
    return Outputs(
        positions=np.asarray(positions, dtype=np.int64),
        probs=torch.cat(probs).numpy() if probs else np.zeros((0, k)),
        tta_probs=(torch.cat(tta_probs).numpy() if tta_probs else np.zeros((0, k))) if tta else None,
        views=list(seen_views),
        cropped=cropped,
        skipped=skipped,
    )


def _softmax(run: LoadedRun, images: torch.Tensor) -> torch.Tensor:
    return run.model(run.preprocess(images)).float().softmax(dim=1).double().cpu()


# --------------------------------------------------------------------------- the figures
def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """Expected calibration error of the top class, and the reliability table behind it.

    The confidences are put in `bins` equal-width bins, (0, 1/bins], ..., ((bins-1)/bins, 1];
    ECE = sum over bins of (images in the bin / all images) * |accuracy in the bin - mean
    confidence in the bin| (Guo et al., "On calibration of modern neural networks", 2017).

    Returns:
        (ece, [{lower, upper, count, confidence, accuracy}] per bin, the last two None when empty).
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=bins)
    hits = np.bincount(which, weights=correct, minlength=bins)
    ece = float(np.abs(hits - conf_sum).sum() / max(len(confidence), 1))
    table = [
        {
            "lower": b / bins,
            "upper": (b + 1) / bins,
            "count": int(count[b]),
            "confidence": float(conf_sum[b] / count[b]) if count[b] else None,
            "accuracy": float(hits[b] / count[b]) if count[b] else None,
        }
        for b in range(bins)
    ]
    return ece, table


def figures(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Every figure of metrics.json for one set of predictions (the argmax of `probs`).

    Per-class precision, recall, F1 and support, and their macro and weighted averages, are
    scikit-learn's `precision_recall_fscore_support` over the classes that occur as true or
    predicted labels (its default); a class with no prediction has precision 0 (zero_division=0).
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score

    k = len(classes)
    y_pred = probs.argmax(axis=1)
    present = np.union1d(y_true, y_pred)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=present, zero_division=0)
    averages = {}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=present, average=average, zero_division=0)
        averages[average] = {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(len(y_true))}
    matrix = confusion_matrix(y_true, y_pred, labels=np.arange(k))
    confidence = probs.max(axis=1)
    ece, bins = calibration(confidence, y_pred == y_true)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # top-5 only means something with more than 5 classes (with 5 or fewer it is always 1)
        "top5": float(top_k_accuracy_score(y_true, probs, k=5, labels=np.arange(k))) if k > 5 else None,
        "per_class": {
            classes[c]: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(present, precision, recall, f1, support)
        },
        "macro_avg": averages["macro"],
        "weighted_avg": averages["weighted"],
        "confusion_matrix": matrix.tolist(),
        "most_confused": most_confused(matrix, classes),
        "ece": ece,
        "ece_bins": ECE_BINS,
        "reliability": bins,
        "mean_confidence": float(confidence.mean()) if len(confidence) else None,
    }


def most_confused(matrix: np.ndarray, classes: Sequence[str], n: int = MOST_CONFUSED) -> list[dict[str, Any]]:
    """The `n` largest off-diagonal cells of a confusion matrix (rows true), largest first; `rate`
    is the share of the true class's images that went to the predicted one."""
    off = np.array(matrix, dtype=np.int64)
    np.fill_diagonal(off, 0)
    rows, cols = np.nonzero(off)
    order = sorted(zip(rows.tolist(), cols.tolist()), key=lambda rc: (-off[rc], rc))[:n]
    totals = np.asarray(matrix).sum(axis=1)
    return [
        {"true": classes[r], "predicted": classes[c], "count": int(off[r, c]), "rate": float(off[r, c] / totals[r])}
        for r, c in order
    ]


def tta_figures(
    y_true: np.ndarray, plain: np.ndarray, tta: np.ndarray, classes: Sequence[str], views: list[str], cropped: int
) -> dict[str, Any]:
    """`tta` of metrics.json: the TTA figures beside the gain over no TTA on the same images."""
    with_tta = figures(y_true, tta, classes)
    before, after = plain.argmax(1) == y_true, tta.argmax(1) == y_true
    base = figures(y_true, plain, classes)
    return {
        "views": views,
        "images_with_crops": cropped,
        "accuracy": with_tta["accuracy"],
        "gain": with_tta["accuracy"] - base["accuracy"],
        "top5": with_tta["top5"],
        "macro_f1": with_tta["macro_avg"]["f1"],
        "macro_f1_gain": with_tta["macro_avg"]["f1"] - base["macro_avg"]["f1"],
        "ece": with_tta["ece"],
        "fixed": int((~before & after).sum()),
        "broken": int((before & ~after).sum()),
    }


# --------------------------------------------------------------------------- the command
def evaluate_run(
    run_dir: str | Path,
    *,
    split: str | None = None,
    data: str | None = None,
    tta: bool = False,
    weights: str | None = None,
    batch_size: int = 64,
    device: str | None = None,
    on_skip: Callable[[str, str], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], Path]:
    """Evaluate a run and write ``RUN_DIR/eval/<split>/``; return (metrics.json's content, that folder).

    Args:
        split: test or val (default test, when `data` is None); data: a folder of labelled images.
        tta: also score the mean softmax over flipped (and, where the eval transform crops,
            corner-cropped) views. weights: None (final, else best), final, best or ema.
        on_skip: called with (image, reason) for each unreadable image, which is left out.
        on_note: called with a line worth showing before the work starts.

    Raises:
        UserError: a wrong run, split, folder or flag (exit 2); RunDirError when nothing could be
            read or the run directory cannot be written (exit 1). Nothing is written then.
    """
    _check_flags(split, data, batch_size)
    # --- the run, and what to score
    run_dir = Path(run_dir)
    trained = open_run(run_dir)
    trained.require_trained(weights)  # a wrong run directory or weight choice before anything is loaded
    classes = trained.written_classes()
    # a wrong folder too, when classes.json names the classes (rebuilding the model takes a while)
    evalset = folder_set(classes, data) if data is not None and classes is not None else None
    run = trained.load(device, weights)
    _check_single_label(run)
    if run.note and on_note:
        on_note(run.note)
    if evalset is None:
        evalset = folder_set(run.classes, data) if data is not None else split_set(run, split or "test")
    if on_note:
        on_note(f"evaluating {len(evalset)} images ({evalset.name}) with {run.weights}" + (" and TTA" if tta else ""))
    # --- the model's outputs
    outputs = infer(run, evalset, tta=tta, batch_size=batch_size, workers=run.spec.data.num_workers, on_skip=on_skip)
    if len(outputs.positions) == 0:
        raise RunDirError(
            f"no image could be read ({len(evalset)} tried); nothing evaluated",
            origin=Origin.flag("--data", data) if data else Origin.path(run_dir),
            found=f"{len(outputs.skipped)} unreadable images, e.g. {outputs.skipped[0][0]}",
            expected="readable image files",
        )
    # --- the figures, written together
    y_true = evalset.labels[outputs.positions]
    metrics = _metrics(run, evalset, outputs, y_true)
    files = _files(run, evalset, outputs, y_true, metrics)
    folder = run_dir / layout.EVAL / evalset.name
    write_folder(folder, files)
    return metrics, folder


def _check_flags(split: str | None, data: str | None, batch_size: int) -> None:
    """The flags alone, before the run is opened: a batch size, and one known split or --data."""
    if batch_size < 1:
        raise _flag_error(
            "--batch-size",
            batch_size,
            "--batch-size must be at least 1",
            found=str(batch_size),
            expected="a positive integer",
        )
    if split is not None and data is not None:
        raise _flag_error(
            "--split",
            split,
            "--split and --data both say what to evaluate",
            found=f"--split {split} --data {data}",
            expected="one of them",
        )
    if data is None and split is not None and split not in SPLITS:
        raise _unknown_split(split)


def _check_single_label(run: LoadedRun) -> None:
    if run.spec.data.multi_label:
        raise UsageError(
            "surgery evaluate scores single-label runs; this one is multi-label",
            origin=Origin.path(run.run_dir / layout.SPEC),
            found="data.multi_label: true",
            expected="a run with one class per image",
            hint="summary.json holds the validation mAP and per-class F1 of a multi-label run",
        )


def _metrics(run: LoadedRun, evalset: EvalSet, outputs: Outputs, y_true: np.ndarray) -> dict[str, Any]:
    relative = run.weights.relative_to(run.run_dir).as_posix()
    kind = run.weights_kind
    body = figures(y_true, outputs.probs, run.classes)
    mistakes = _mistakes(evalset, outputs, y_true, run.classes)
    return {
        "split": evalset.name,
        "source": evalset.source,
        "source_kind": evalset.source_kind,
        "used_for_model_selection": evalset.selection,
        "run": run.spec.name,
        "weights": kind,
        "weights_file": relative,
        "images": int(len(y_true)),
        "skipped": [{evalset.id_key: i, "reason": r} for i, r in outputs.skipped],
        "classes": list(run.classes),
        **body,
        "tta": (
            tta_figures(y_true, outputs.probs, outputs.tta_probs, run.classes, outputs.views, outputs.cropped)
            if outputs.tta_probs is not None
            else None
        ),
        "mistakes": mistakes,
        "pngs": dict(PNGS),
    }


def _mistakes(evalset: EvalSet, outputs: Outputs, y_true: np.ndarray, classes: Sequence[str]) -> list[dict[str, Any]]:
    """The most confident wrong predictions, most confident first (those mistakes.png shows)."""
    y_pred = outputs.probs.argmax(1)
    confidence = outputs.probs.max(1)
    wrong = np.flatnonzero(y_pred != y_true)
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:GALLERY_SIZE]
    return [
        {
            evalset.id_key: _id(evalset, outputs.positions[j]),
            "position": int(outputs.positions[j]),
            "true": classes[y_true[j]],
            "predicted": classes[y_pred[j]],
            "confidence": float(confidence[j]),
        }
        for j in order
    ]


def _id(evalset: EvalSet, position: int) -> Any:
    value = evalset.ids[int(position)]
    return int(value) if evalset.id_key == "index" else str(value)


def _predictions(evalset: EvalSet, outputs: Outputs, y_true: np.ndarray, classes: Sequence[str]) -> str:
    y_pred, confidence = outputs.probs.argmax(1), outputs.probs.max(1)
    lines = []
    for j, position in enumerate(outputs.positions):
        row = {
            evalset.id_key: _id(evalset, position),
            "true": classes[y_true[j]],
            "predicted": classes[y_pred[j]],
            "confidence": float(confidence[j]),
            "correct": bool(y_pred[j] == y_true[j]),
        }
        if outputs.tta_probs is not None:
            row["tta_predicted"] = classes[int(outputs.tta_probs[j].argmax())]
            row["tta_confidence"] = float(outputs.tta_probs[j].max())
        lines.append(json.dumps(row) + "\n")
    return "".join(lines)


def _files(
    run: LoadedRun, evalset: EvalSet, outputs: Outputs, y_true: np.ndarray, metrics: Mapping[str, Any]
) -> dict[str, bytes]:
    from ..pages.plots import confusion_png
    from .plots import mistakes_png, reliability_png

    title = f"{run.spec.name}, {evalset.name} ({metrics['images']} images)"
    matrix = np.asarray(metrics["confusion_matrix"])
    shown = [(_image(run, evalset, m["position"]), m) for m in metrics["mistakes"]]
    return {
        layout.EVAL_METRICS: (json.dumps(metrics, indent=2) + "\n").encode(),
        layout.EVAL_PREDICTIONS: _predictions(evalset, outputs, y_true, run.classes).encode(),
        PNGS["confusion"]: confusion_png(matrix, run.classes, f"confusion: {title}", normalized=False),
        PNGS["confusion_normalized"]: confusion_png(
            matrix, run.classes, f"confusion, each row / its images: {title}", normalized=True
        ),
        PNGS["reliability"]: reliability_png(metrics["reliability"], metrics["ece"], f"reliability: {title}"),
        PNGS["mistakes"]: mistakes_png(shown, f"most confident mistakes: {title}", metrics["images"]),
    }


def _image(run: LoadedRun, evalset: EvalSet, position: int) -> torch.Tensor:
    """An image exactly as the model saw it (uint8 C x H x W, before normalisation)."""
    return run.transform(evalset.source_images.load(int(evalset.indices[position])))


def printed(metrics: Mapping[str, Any]) -> list[Any]:
    """What `surgery evaluate` prints: a headline, the per-class table, the most confused pairs and
    the TTA comparison (rich renderables, figures to 4 decimals)."""
    from rich.markup import escape
    from rich.table import Table

    m = metrics
    head = [
        f"{escape(m['run'])}: {escape(m['source'])}; {m['images']} images, weights {m['weights']} "
        f"({escape(m['weights_file'])})"
    ]
    if m["used_for_model_selection"]:
        head.append(
            "[yellow]note[/yellow] these images selected the model (its best epoch, a plateau schedule, the "
            "settings tried): their figures flatter it; hold out data.test_split for an unbiased estimate"
        )
    top5 = f"   top-5 {m['top5']:.4f}" if m["top5"] is not None else ""
    head.append(
        f"[bold]accuracy {m['accuracy']:.4f}[/bold]{top5}   macro F1 {m['macro_avg']['f1']:.4f}   "
        f"weighted F1 {m['weighted_avg']['f1']:.4f}   ECE {m['ece']:.4f}"
    )
    table = Table(box=None, pad_edge=False)
    for name, justify in (
        ("class", "left"),
        ("precision", "right"),
        ("recall", "right"),
        ("f1", "right"),
        ("support", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)
    rows = [*m["per_class"].items(), ("macro avg", m["macro_avg"]), ("weighted avg", m["weighted_avg"])]
    for i, (name, row) in enumerate(rows):
        table.add_row(
            escape(name),
            f"{row['precision']:.4f}",
            f"{row['recall']:.4f}",
            f"{row['f1']:.4f}",
            str(row["support"]),
            end_section=i == len(m["per_class"]) - 1,
        )
    parts: list[Any] = [*head, table]
    if m["most_confused"]:
        parts.append(
            "most confused (true -> predicted): "
            + ", ".join(f"{escape(c['true'])} -> {escape(c['predicted'])} {c['count']}" for c in m["most_confused"][:5])
        )
    t = m["tta"]
    if t is not None:
        crops = f"; corner crops on {t['images_with_crops']} images" if t["images_with_crops"] else ""
        parts.append(
            f"TTA ({', '.join(t['views'])}{crops}): accuracy {t['accuracy']:.4f}, {t['gain']:+.4f} against "
            f"no TTA on the same {m['images']} images (fixed {t['fixed']}, broke {t['broken']}); "
            f"macro F1 {t['macro_f1']:.4f} ({t['macro_f1_gain']:+.4f})"
        )
    return parts


def evaluate_command(
    run_dir: str | Path,
    *,
    split: str | None = None,
    data: str | None = None,
    tta: bool = False,
    weights: str | None = None,
    as_json: bool = False,
    batch_size: int = 64,
    device: str | None = None,
) -> int:
    """`surgery evaluate RUN_DIR [--split test|val | --data PATH] [--tta] [--weights W] [--json]`:
    print the figures (a table, or one JSON object with --json) after writing them."""
    from rich.markup import escape

    from ..untrusted import Console

    err = Console(stderr=True, highlight=False, soft_wrap=True)

    def on_skip(item: str, reason: str) -> None:
        err.print(f"[yellow]skipped[/yellow] {escape(item)}: {escape(reason)}")

    def on_note(text: str) -> None:
        err.print(escape(text))

    metrics, folder = evaluate_run(
        run_dir,
        split=split,
        data=data,
        tta=tta,
        weights=weights,
        batch_size=batch_size,
        device=device,
        on_skip=on_skip,
        on_note=on_note,
    )
    if as_json:
        print(json.dumps({**metrics, "folder": str(folder)}))
    else:
        out = Console(highlight=False, soft_wrap=True)
        for part in printed(metrics):
            out.print(part)
        err.print(f"wrote {escape(str(folder))}: metrics.json, predictions.jsonl, " + ", ".join(PNGS.values()))
    if metrics["skipped"]:
        err.print(
            f"[yellow]note[/yellow] {len(metrics['skipped'])} unreadable images left out (listed in "
            "metrics.json, skipped)"
        )
    from ..pages.run_page import refresh_report

    run_folder = folder.parent.parent  # RUN_DIR/eval/<split>: the run's own page shows it
    if refresh_report(run_folder, lambda text: err.print(f"[yellow]warning[/yellow]: {escape(text)}")):
        err.print(f"refreshed {escape(str(run_folder / layout.REPORT))}")
    return 0


__all__ = [
    "EvalSet",
    "Outputs",
    "split_set",
    "folder_set",
    "folder_name",
    "infer",
    "figures",
    "calibration",
    "most_confused",
    "tta_figures",
    "evaluate_run",
    "evaluate_command",
    "write_folder",
    "printed",
    "SPLITS",
    "PNGS",
]
