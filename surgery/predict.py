"""`surgery predict`: classify image files with a trained run, using the run's own eval transform.

`load_run` rebuilds a run's surgered model from its spec.yaml and weights (never from the
original pretrained source), so `export` and any other consumer see exactly what `run` trained.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image
from torch import nn

from .builder import Built, build
from .data import eval_transform, normalization, normalize
from .errors import Origin, UsageError, describe_exception, did_you_mean
from .runtime import device_for
from .spec import Spec, load_spec

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm",
                            ".pbm", ".pnm"})
# the run's weights, best first: the final model, else the best epoch of a run that stopped early
WEIGHT_FILES = ("model.safetensors", "checkpoints/best.safetensors")
# `--weights`: which of a run's weight files to use (default: final, else best, as above)
WEIGHT_CHOICES = {"final": "model.safetensors", "best": "checkpoints/best.safetensors", "ema": "model_ema.safetensors"}
# the spec's weight source is replaced by the run's own weights: none of these may touch them
_REBUILD_OVERRIDES = ("model.pretrained=false", "model.key_map=null", "model.checkpoint_key=null",
                      "model.reset_head=false")
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass
class LoadedRun:
    """A trained run, rebuilt and ready for inference.

    model: the surgered model in eval mode on `device`. weights: the file it was loaded from.
    note: a line to show the user when the weights are not the run's final ones.
    data_config: the backbone's timm-style config, `input_size` set to the run's image size.
    """

    run_dir: Path
    spec: Spec
    built: Built
    model: nn.Module
    classes: list[str]
    data_config: dict[str, Any]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: Path
    device: torch.device
    note: str | None = None
    _transform: Callable[[Image.Image], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> uint8 CHW tensor, exactly as the run's validation saw its images."""
        if self._transform is None:
            self._transform = eval_transform(self.data_config, self.image_size)
        return self._transform

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW (from `transform`) -> the normalised float input the model takes, on `device`."""
        return normalize(images.to(self.device), self.mean, self.std)


def _run_error(problem: str, run_dir: Path, **kw: Any) -> UsageError:
    kw.setdefault("hint", "train one with `surgery run SPEC.yaml --out DIR`, then pass DIR")
    return UsageError(problem, origin=Origin.path(run_dir), **kw)


def locate_run(run_dir: str | Path, weights: str | None = None) -> tuple[Path, str | None]:
    """Check that `run_dir` holds a trained run, without loading it; return (weight file, note or None).

    Args:
        weights: None (the final weights, else the best epoch's with a note), or one of
            `WEIGHT_CHOICES` (final, best, ema), which must then be there.

    Raises:
        UsageError: no such folder, no spec.yaml, or no weights (naming what to do).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise _run_error("the run directory does not exist" if not run_dir.exists() else "the run path is not a folder",
                         run_dir, found=str(run_dir), expected="a run directory written by `surgery run`")
    spec_path = run_dir / "spec.yaml"
    if not spec_path.is_file():
        raise _run_error("the run directory has no spec.yaml", run_dir, found=str(spec_path),
                         expected="a run directory written by `surgery run` "
                                  "(spec.yaml, model.safetensors, classes.json)")
    if weights is not None:
        return _chosen_weights(run_dir, weights), None
    for i, name in enumerate(WEIGHT_FILES):
        path = run_dir / name
        if path.is_file():
            note = None
            if i:
                note = (f"{run_dir / WEIGHT_FILES[0]} is missing (the run did not finish?); "
                        f"using the best epoch's weights, {path}")
            return path, note
    raise _run_error("the run directory holds no trained weights", run_dir,
                     found="no " + " and no ".join(str(run_dir / n) for n in WEIGHT_FILES),
                     expected="a run directory written by `surgery run`",
                     hint=f"finish or resume the run: surgery run {run_dir / 'spec.yaml'} --out {run_dir} --resume")


def _chosen_weights(run_dir: Path, weights: str) -> Path:
    flag = Origin.flag("--weights", weights)
    if weights not in WEIGHT_CHOICES:
        raise UsageError(f"unknown weights {weights!r}", origin=flag, found=repr(weights),
                         expected="one of " + ", ".join(WEIGHT_CHOICES), hint=did_you_mean(weights, WEIGHT_CHOICES))
    path = run_dir / WEIGHT_CHOICES[weights]
    if path.is_file():
        return path
    if weights == "ema":
        hint = ("the run kept no EMA of its weights (train.ema is null); train with train.ema: 0.999 to keep one"
                if not _keeps_ema(run_dir) else
                f"the run did not finish: resume it (surgery run {run_dir / 'spec.yaml'} --out {run_dir} --resume)")
    elif weights == "final":
        hint = f"the run did not finish: use --weights best, or resume it with --out {run_dir} --resume"
    else:
        hint = "no epoch was validated yet: resume the run, or use --weights final"
    raise UsageError(f"the run directory has no {weights} weights", origin=flag, found=f"no {path}",
                     expected=f"{WEIGHT_CHOICES[weights]} in {run_dir}", hint=hint)


def _keeps_ema(run_dir: Path) -> bool:
    """Does the run's spec.yaml set train.ema (read as plain YAML: this only words a message)?"""
    import yaml

    try:
        data = yaml.safe_load((run_dir / "spec.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    train = data.get("train") if isinstance(data, dict) else None
    return isinstance(train, dict) and train.get("ema") is not None


def _read_classes(run_dir: Path, num_classes: int) -> list[str]:
    path = run_dir / "classes.json"
    try:
        classes = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [str(i) for i in range(num_classes)]  # an older or hand-made run: labels are the names
    except (OSError, ValueError) as exc:
        raise _run_error(f"classes.json cannot be read: {exc}", run_dir, found=str(path),
                         expected="a JSON list of class names",
                         hint="restore it, or delete it to use label numbers") from None
    if not isinstance(classes, list) or len(classes) != num_classes:
        raise _run_error(f"classes.json does not match the model's {num_classes} outputs", run_dir, found=str(path),
                         expected=f"a JSON list of {num_classes} class names",
                         hint="restore it, or delete it to use label numbers")
    return [str(c) for c in classes]


def load_run(run_dir: str | Path, device: str | torch.device | None = None, weights: str | None = None) -> LoadedRun:
    """Rebuild a run's surgered model from spec.yaml and its weights, in eval mode.

    Args:
        run_dir: a folder written by `surgery run` (spec.yaml, model.safetensors, classes.json).
        device: where the model goes (cpu, cuda, cuda:1, mps); None: the run's recorded
            ``train.device`` (auto: cuda when available, else cpu), as `surgery run` chose.
        weights: None (final, else best), or final, best or ema (`--weights`): that file or an error.

    Returns:
        A `LoadedRun`. The weights are model.safetensors, or checkpoints/best.safetensors when a run
        stopped before writing it (`weights` and `note` say which).

    Raises:
        UserError: the folder, spec.yaml or weights are missing or do not fit (SpecError for
            spec.yaml); the device is absent.

    Example:
        >>> run = load_run("runs/resnet18-cbam")
        >>> x = run.preprocess(run.transform(Image.open("cat.jpg"))[None])
        >>> run.model(x).softmax(1)
    """
    from .rundir import load_safetensors

    run_dir = Path(run_dir)
    chosen = weights
    weights, note = locate_run(run_dir, chosen)
    spec = load_spec(run_dir / "spec.yaml", _REBUILD_OVERRIDES)
    target = device_for(spec, None if device is None else str(device))
    try:
        state = load_safetensors(weights)
    except Exception as exc:  # noqa: BLE001 - any unreadable weight file is the same problem for the user
        raise _run_error(f"the weights cannot be read: {describe_exception(exc, 200)}", run_dir,
                         found=str(weights), expected="an intact safetensors file written by `surgery run`",
                         hint="re-run or resume the training that wrote it") from None
    built = build(spec, state_dict=state)
    model = built.model.to(target).eval()
    size = spec.data.image_size
    config = dict(built.data_config)
    config["input_size"] = (built.input_size[0], size, size)
    mean, std = normalization(config)
    return LoadedRun(run_dir=run_dir, spec=spec, built=built, model=model,
                     classes=_read_classes(run_dir, built.num_classes), data_config=config, image_size=size,
                     mean=mean, std=std, weights=weights, device=target, note=note)


# --------------------------------------------------------------------------- images in
def find_images(paths: Iterable[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Files given directly (whatever their suffix) and image files under given folders, recursively.

    Returns:
        (image paths in the order given, folders sorted; [(path, reason)] for paths that do not exist
        or are not regular files, such as a named pipe, which would block the read).
    """
    found: list[Path] = []
    missing: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                                and not any(part.startswith(".") for part in p.relative_to(path).parts)))
        elif path.is_file():
            found.append(path)
        elif path.exists():  # a named pipe, socket or device would block or never end
            missing.append((path, f"not a regular file ({_kind(path)})"))
        else:
            missing.append((path, "no such file or folder"))
    return list(dict.fromkeys(found)), missing  # a file named both alone and inside its folder: once


def images_or_skips(paths: Sequence[str | Path], err: Any, verb: str,
                    flag: str) -> tuple[list[Path], list[tuple[Path, str]]]:
    """`find_images` for a command: each path that cannot be read is said on `err` (a rich
    console) as skipped; none left is a UsageError ("no images to VERB", at the FLAG argument)."""
    from rich.markup import escape

    images, missing = find_images(paths)
    for path, reason in missing:
        err.print(f"[yellow]skipped[/yellow] {escape(str(path))}: {reason}")
    if not images:
        raise UsageError(f"no images to {verb}", origin=Origin("flag", flag), found=" ".join(map(str, paths)),
                         expected="image files, or folders holding " + ", ".join(sorted(IMAGE_SUFFIXES)))
    return images, missing


def _kind(path: Path) -> str:
    import stat

    mode = path.stat().st_mode
    for test, word in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device")):
        if test(mode):
            return word
    return "not a file"


def _read(path: Path, transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    with Image.open(path) as image:
        image.load()  # decode now: a truncated file fails here, not halfway through a batch
        return transform(image)


def _batches(paths: Sequence[Path], transform: Callable[[Image.Image], torch.Tensor], size: int,
             on_skip: Callable[[Path, str], None]) -> Iterator[tuple[list[Path], torch.Tensor]]:
    done: list[Path] = []
    tensors: list[torch.Tensor] = []
    for path in paths:
        try:
            tensors.append(_read(path, transform))
        except _UNREADABLE as exc:
            on_skip(path, f"not a readable image ({describe_exception(exc, 120)})")
            continue
        done.append(path)
        if len(done) == size:
            yield done, torch.stack(tensors)
            done, tensors = [], []
    if done:
        yield done, torch.stack(tensors)


# --------------------------------------------------------------------------- predictions out
@dataclass(frozen=True)
class Prediction:
    path: Path
    top: list[tuple[str, float]]
    # data.multi_label: every class at or above data.threshold, most probable first (probabilities
    # are then independent sigmoids, and `top` ranks them); None for a single-label run
    labels: list[tuple[str, float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": str(self.path)}
        if self.labels is not None:
            out["labels"] = [{"class": c, "prob": p} for c, p in self.labels]
        out["topk"] = [{"class": c, "prob": p} for c, p in self.top]
        return out


@torch.inference_mode()
def predict(run: LoadedRun, paths: Sequence[Path], *, topk: int = 3, batch_size: int = 32,
            on_skip: Callable[[Path, str], None] | None = None) -> Iterator[Prediction]:
    """Top-k classes and probabilities for each readable image, batch by batch. A multi-label run
    (``data.multi_label`` in its spec) gives sigmoid probabilities and, in `Prediction.labels`,
    every class at or above the run's ``data.threshold``.

    Args:
        run: from `load_run`.
        paths: image files (see `find_images`).
        topk: classes per image, clamped to 1 .. number of classes.
        batch_size: images per forward pass.
        on_skip: called with (path, reason) for each unreadable file, which is skipped.

    Returns:
        An iterator of `Prediction`s, in the order of `paths`.
    """
    k = max(1, min(int(topk), len(run.classes)))
    skip = on_skip or (lambda path, reason: None)
    multi, threshold = run.spec.data.multi_label, run.spec.data.threshold
    for done, images in _batches(paths, run.transform, batch_size, skip):
        logits = run.model(run.preprocess(images)).float()
        probs = logits.sigmoid() if multi else logits.softmax(dim=1)
        values, indices = probs.topk(k, dim=1)
        ranked = probs.sort(dim=1, descending=True)
        for n, (path, vs, ix) in enumerate(zip(done, values.tolist(), indices.tolist())):
            labels = None
            if multi:
                labels = [(run.classes[i], v) for v, i in zip(ranked.values[n].tolist(), ranked.indices[n].tolist())
                          if v >= threshold]
            yield Prediction(path, [(run.classes[i], v) for i, v in zip(ix, vs)], labels)


def _table(predictions: Sequence[Prediction], k: int):
    from rich.markup import escape
    from rich.table import Table

    # paths stay whole on one line (they are what a user copies); the runners-up wrap instead
    table = Table(box=None, pad_edge=False)
    table.add_column("image", no_wrap=True)
    table.add_column("class", no_wrap=True)
    if predictions and predictions[0].labels is not None:  # multi-label: one line per class above the threshold
        table.add_column("prob", justify="right", no_wrap=True)
        for p in predictions:
            for n, (c, v) in enumerate(p.labels or [("[dim](none)[/dim]", None)]):
                table.add_row(escape(str(p.path)) if n == 0 else "", c if v is None else f"[bold]{escape(c)}[/bold]",
                              "" if v is None else f"{v:.3f}")
        return table
    table.add_column("prob", justify="right", no_wrap=True)
    if k > 1:
        table.add_column("next", overflow="fold")
    for p in predictions:
        (best, prob), rest = p.top[0], p.top[1:]
        row = [escape(str(p.path)), f"[bold]{escape(best)}[/bold]", f"{prob:.3f}"]
        if k > 1:
            row.append("   ".join(f"{escape(c)} [dim]{v:.3f}[/dim]" for c, v in rest))
        table.add_row(*row)
    return table


def predict_command(run_dir: str | Path, paths: Sequence[str], *, topk: int = 3, as_json: bool = False,
                    batch_size: int = 32, device: str | None = None, weights: str | None = None) -> int:
    """`surgery predict RUN_DIR PATH... [--topk K] [--json] [--batch-size N] [--device D] [--weights W]`.

    Exit code 0 when at least one image was classified, 1 when every file was unreadable;
    a missing run or no image at all is a UserError (exit 2).
    """
    from rich.console import Console
    from rich.markup import escape

    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1", origin=Origin.flag("--batch-size", batch_size),
                         found=str(batch_size), expected="a positive integer")
    if topk < 1:
        raise UsageError("--topk must be at least 1", origin=Origin.flag("--topk", topk), found=str(topk),
                         expected="a positive integer")
    locate_run(run_dir, weights)  # a wrong run directory is reported before any image is looked at
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    out = Console(highlight=False)
    images, missing = images_or_skips(paths, err, "classify", "PATH...")
    run = load_run(run_dir, device, weights)
    if run.note:
        err.print(f"[yellow]note[/yellow] {escape(run.note)}")
    else:
        err.print(f"{escape(run.spec.name)}: {len(run.classes)} classes, weights {escape(str(run.weights))}")
    k = max(1, min(topk, len(run.classes)))
    skipped: list[Path] = []

    def on_skip(path: Path, reason: str) -> None:
        skipped.append(path)
        err.print(f"[yellow]skipped[/yellow] {escape(str(path))}: {escape(reason)}")

    results: list[Prediction] = []
    for prediction in predict(run, images, topk=k, batch_size=batch_size, on_skip=on_skip):
        results.append(prediction)
        if as_json:  # stream: a long folder shows progress and a crash keeps what was done
            sys.stdout.write(json.dumps(prediction.to_dict()) + "\n")
            sys.stdout.flush()
    if not as_json and results:
        out.print(_table(results, k))
    if not results:
        err.print(f"[bold red]error[/bold red] no image could be read ({_count(len(images), 'file')} tried); "
                  "nothing classified")
        return 1
    if skipped:
        err.print(f"classified {_count(len(results), 'image')}, skipped {_count(len(skipped) + len(missing), 'path')}")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


__all__ = ["LoadedRun", "Prediction", "load_run", "locate_run", "find_images", "images_or_skips", "predict", "predict_command",
           "IMAGE_SUFFIXES", "WEIGHT_CHOICES"]
