"""`surgery predict`: classify image files with a trained run, using the run's own eval transform.

`load_run` rebuilds a run's surgered model from its spec.yaml and weights (never from the
original pretrained source), so `export` and any other consumer see exactly what `run` trained.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from ..data.images import IMAGE_SUFFIXES, batches, decode, find_images, images_or_skips  # noqa: F401 - re-exported
from ..errors import Origin, UsageError
from ..runs import layout, open_run
from ..runs.loaded import LoadedRun

WEIGHT_CHOICES = layout.WEIGHT_CHOICES


def locate_run(run_dir: str | Path, weights: str | None = None) -> tuple[Path, str | None]:
    """Check that `run_dir` holds a trained run, without loading it; return (weight file, note or None).

    `open_run(run_dir).require_trained(weights)`: see `Run.require_trained`.
    """
    return open_run(run_dir).require_trained(weights)


def load_run(run_dir: str | Path, device: str | torch.device | None = None, weights: str | None = None) -> LoadedRun:
    """Rebuild a run's surgered model from spec.yaml and its weights, in eval mode.

    `open_run(run_dir).load(device, weights)`: see `Run.load`; device None: the run's recorded
    ``train.device`` (auto: cuda when available, else cpu), as `surgery run` chose.

    Example:
        >>> run = load_run("runs/resnet18-cbam")
        >>> x = run.preprocess(run.transform(Image.open("cat.jpg"))[None])
        >>> run.model(x).softmax(1)
    """
    return open_run(run_dir).load(device, weights)


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
def predict(
    run: LoadedRun,
    paths: Sequence[Path],
    *,
    topk: int = 3,
    batch_size: int = 32,
    on_skip: Callable[[Path, str], None] | None = None,
) -> Iterator[Prediction]:
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
    for done, images in batches(paths, lambda path: decode(path, run.transform), batch_size, skip):
        logits = run.model(run.preprocess(images)).float()
        probs = logits.sigmoid() if multi else logits.softmax(dim=1)
        values, indices = probs.topk(k, dim=1)
        ranked = probs.sort(dim=1, descending=True)
        for n, (path, vs, ix) in enumerate(zip(done, values.tolist(), indices.tolist())):
            labels = None
            if multi:
                labels = [
                    (run.classes[i], v)
                    for v, i in zip(ranked.values[n].tolist(), ranked.indices[n].tolist())
                    if v >= threshold
                ]
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
                table.add_row(
                    escape(str(p.path)) if n == 0 else "",
                    c if v is None else f"[bold]{escape(c)}[/bold]",
                    "" if v is None else f"{v:.3f}",
                )
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


def predict_command(
    run_dir: str | Path,
    paths: Sequence[str],
    *,
    topk: int = 3,
    as_json: bool = False,
    batch_size: int = 32,
    device: str | None = None,
    weights: str | None = None,
) -> int:
    """`surgery predict RUN_DIR PATH... [--topk K] [--json] [--batch-size N] [--device D] [--weights W]`.

    Exit code 0 when at least one image was classified, 1 when every file was unreadable;
    a missing run or no image at all is a UserError (exit 2).
    """
    from rich.markup import escape

    from ..untrusted import Console

    if batch_size < 1:
        raise UsageError(
            "--batch-size must be at least 1",
            origin=Origin.flag("--batch-size", batch_size),
            found=str(batch_size),
            expected="a positive integer",
        )
    if topk < 1:
        raise UsageError(
            "--topk must be at least 1",
            origin=Origin.flag("--topk", topk),
            found=str(topk),
            expected="a positive integer",
        )
    trained = open_run(run_dir)
    trained.require_trained(weights)  # a wrong run directory is reported before any image is looked at
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    out = Console(highlight=False)
    images, missing = images_or_skips(paths, err, "classify", "PATH...")
    run = trained.load(device, weights)
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
        err.print(
            f"[bold red]error[/bold red] no image could be read ({_count(len(images), 'file')} tried); "
            "nothing classified"
        )
        return 1
    if skipped:
        err.print(f"classified {_count(len(results), 'image')}, skipped {_count(len(skipped) + len(missing), 'path')}")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


__all__ = [
    "LoadedRun",
    "Prediction",
    "load_run",
    "locate_run",
    "find_images",
    "images_or_skips",
    "predict",
    "predict_command",
    "IMAGE_SUFFIXES",
    "WEIGHT_CHOICES",
]
