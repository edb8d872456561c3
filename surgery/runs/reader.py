"""`open_run(path) -> Run`: one reader of a run directory for every command that uses a trained run.

Like torchvision's `Weights`, a `Run` carries everything needed to use the trained model: the
spec, classes, splits record, summary, metrics rows, the headline metric and the weight files,
and `Run.load` gives the model ready for inference. Reading is tolerant: a file that is missing
is None, one that cannot be read or holds the wrong thing is None plus a line in `problems`
(what `report` shows in a box). Commands that need a file call a `require_*` method, which
raises a located `UserError` instead.

One rule for what may be shown from a run: a regular file that resolves inside the run
directory (`inside`). A link to a file elsewhere (``eval/test/confusion.png -> /etc/...``) is
a problem, never embedded. Importing this module does not import torch.
"""

from __future__ import annotations

import functools
import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import Origin, RunDirError, UsageError, UserError, describe_exception, did_you_mean
from .layout import (
    CLASSES,
    DEFAULT_WEIGHTS,
    EVAL,
    EVAL_PREDICTIONS,
    METRICS,
    SPEC,
    SPLITS,
    SUMMARY,
    WEIGHT_CHOICES,
    headline,
)

if TYPE_CHECKING:
    from .loaded import LoadedRun

_TRAIN_HINT = "train one with `surgery run SPEC.yaml --out DIR`, then pass DIR"
# kinds of picture a page may embed, by their first bytes
_IMAGE_MAGIC = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF8": "image/gif"}


class Unreadable(Exception):
    """A run file that is there but cannot be used: `kind` "read" (I/O, not UTF-8) or "json" (not
    JSON, or nested past Python's recursion limit); `reason` the error in a few words."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def read_text(path: Path) -> str:
    """A run file's text. Raises `Unreadable` ("read") for an I/O error or a byte that is not UTF-8."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Unreadable("read", describe_exception(exc)) from None


def parse_json(text: str) -> Any:
    """JSON text as Python values. Raises `Unreadable` ("json") for anything `json` rejects,
    including nesting deep enough to exhaust the recursion limit."""
    try:
        return json.loads(text)
    except RecursionError:
        raise Unreadable("json", "nested too deeply") from None
    except ValueError as exc:
        raise Unreadable("json", describe_exception(exc)) from None


def read_json(path: Path) -> Any:
    """`read_text` then `parse_json`: the one JSON reader of run files."""
    return parse_json(read_text(path))


def metrics_rows(path: Path) -> list[Any]:
    """Every complete line of metrics.jsonl (a torn last line from a crash ends the list).

    Raises:
        Unreadable: the file cannot be read or is not UTF-8.
    """
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in read_text(path).splitlines():
        try:
            rows.append(parse_json(line))
        except Unreadable:
            break
    return rows


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """`metrics_rows` for the training loop's resume (an unreadable file raises, as any I/O error)."""
    try:
        return metrics_rows(path)
    except Unreadable as exc:
        raise OSError(f"{path}: {exc.reason}") from None


def inside(root: Path, path: Path) -> str | None:
    """None when `path` is a regular file that resolves inside `root`, else why it may not be shown."""
    try:
        real = Path(path).resolve(strict=True)
        base = Path(root).resolve()
    except (OSError, RuntimeError):  # a broken or looping link
        return "is a broken link"
    if real != base and base not in real.parents:
        return "is a link to a file outside the run directory; not shown"
    try:
        if not stat.S_ISREG(os.stat(real).st_mode):
            return "is not a regular file; not shown"
    except OSError as exc:
        return f"cannot be read ({describe_exception(exc)})"
    return None


def open_run(path: str | Path, *, hint: str | None = _TRAIN_HINT) -> "Run":
    """The run directory at `path`, read lazily and tolerantly (see the module docstring).

    Raises:
        UsageError: `path` is not a folder (exit code 2); `hint` ends the message.
    """
    path = Path(path)
    if not path.is_dir():
        raise UsageError(
            "the run directory does not exist" if not path.exists() else "the run path is not a folder",
            origin=Origin.path(path),
            found=str(path),
            expected="a run directory written by `surgery run`",
            hint=hint,
        )
    return Run(path)


class Run:
    """A run directory and what it holds. Attributes are read on first use and kept.

    Tolerant views (never raise; what cannot be used is None and a line in `problems`):
        spec_text, spec, raw_spec, summary, metrics, classes, splits, multi_label, metric,
        weights (choice -> file or None), missing_weights
    Strict: `require_run`, `require_trained`, `require_classes`, `require_splits`, `require_finished`,
        `load` (the model).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.problems: list[str] = []

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        return self.file(name).is_file()

    # ----------------------------------------------------------------------- tolerant reading
    def note(self, path: Path, what: str) -> None:
        self.problems.append(f"{self.name_of(path)}: {what}")

    def name_of(self, path: Path) -> str:
        try:
            return str(Path(path).relative_to(self.path))
        except ValueError:
            return str(path)

    def text(self, path: Path) -> str | None:
        if not path.is_file():
            return None
        refused = inside(self.path, path)
        if refused is not None:
            self.note(path, refused)
            return None
        try:
            return read_text(path)
        except Unreadable as exc:
            self.note(path, f"cannot be read ({exc.reason})")
            return None

    def json(self, path: Path, kind: type = dict) -> Any:
        text = self.text(path)
        if text is None:
            return None
        try:
            value = parse_json(text)
        except Unreadable as exc:
            self.note(path, f"is not valid JSON ({exc.reason}); not shown")
            return None
        if not isinstance(value, kind):
            self.note(
                path, f"holds a JSON {type(value).__name__}, not {'a list' if kind is list else 'an object'}; not shown"
            )
            return None
        return value

    def image(self, path: Path) -> tuple[bytes, str] | None:
        """A picture's bytes and MIME type (PNG, JPEG or GIF, recognised by its first bytes)."""
        if not path.is_file():
            self.note(path, "is named but missing" if not path.is_symlink() else "is a broken link")
            return None
        refused = inside(self.path, path)
        if refused is not None:
            self.note(path, refused)
            return None
        try:
            data = path.read_bytes()
        except OSError as exc:
            self.note(path, f"cannot be read ({describe_exception(exc)})")
            return None
        mime = next((m for magic, m in _IMAGE_MAGIC.items() if data.startswith(magic)), None)
        if mime is None:
            self.note(path, "is not a PNG, JPEG or GIF picture; not shown")
            return None
        return data, mime

    def member(self, folder: Path, name: Any) -> Path | None:
        """A file named inside a JSON file, which must lie in `folder` (no '..', no absolute path)."""
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            self.note(
                folder, f"names a picture {name!r} that is not a file name inside {self.name_of(folder)}; not shown"
            )
            return None
        return folder / name

    # ----------------------------------------------------------------------- what the run holds
    @functools.cached_property
    def spec_text(self) -> str | None:
        return self.text(self.file(SPEC))

    @functools.cached_property
    def spec(self) -> Any:
        """The typed spec when spec.yaml still loads (None otherwise, with a problem)."""
        from ..spec import load_spec

        if self.spec_text is None:
            return None
        path = self.file(SPEC)
        try:
            return load_spec(path)
        except UserError as exc:
            self.note(path, f"does not load as a spec ({str(exc).splitlines()[0]}); no schedule shown")
            return None

    @functools.cached_property
    def summary(self) -> dict[str, Any]:
        return self.json(self.file(SUMMARY)) or {}

    @functools.cached_property
    def metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl's epoch records (a torn last line is ignored; other lines are a problem)."""
        path = self.file(METRICS)
        refused = inside(self.path, path) if path.is_file() else None
        if refused is not None:
            self.note(path, refused)
            return []
        try:
            rows = metrics_rows(path)
        except Unreadable as exc:
            self.note(path, f"cannot be read ({exc.reason})")
            return []
        good = [r for r in rows if isinstance(r, dict) and _whole(r.get("epoch")) is not None]
        if len(good) < len(rows):
            self.note(path, f"{len(rows) - len(good)} line(s) are not epoch records; left out")
        return good

    @functools.cached_property
    def classes(self) -> list[str] | None:
        classes = self.json(self.file(CLASSES), list)
        return None if classes is None else [str(c) for c in classes]

    @functools.cached_property
    def multi_label(self) -> bool:
        spec = self.spec
        return (
            bool(self.summary.get("multi_label"))
            or (spec is not None and spec.data.multi_label)
            or any(_finite(r.get("val_map")) is not None for r in self.metrics)
        )

    @property
    def metric(self) -> str:
        """The headline metric (`headline`): val_map for a multi-label run, else val_acc."""
        return headline(self.multi_label)

    @property
    def weights(self) -> dict[str, Path | None]:
        """Each `--weights` choice's file, None where it is missing."""
        return {k: (self.file(v) if self.has(v) else None) for k, v in WEIGHT_CHOICES.items()}

    @property
    def missing_weights(self) -> list[str]:
        return [k for k, v in self.weights.items() if v is None]

    # ----------------------------------------------------------------------- strict
    def _error(self, problem: str, **kw: Any) -> UsageError:
        kw.setdefault("hint", _TRAIN_HINT)
        return UsageError(problem, origin=Origin.path(self.path), **kw)

    def require_run(self) -> "Run":
        """Raise unless the folder holds a run's spec.yaml or metrics.jsonl (finished or not)."""
        if not self.has(SPEC) and not self.has(METRICS):
            raise UsageError(
                "the folder is not a run directory: it has no spec.yaml and no metrics.jsonl",
                origin=Origin.path(self.path),
                expected="a run directory written by `surgery run`",
                hint=_TRAIN_HINT,
            )
        return self

    def require_trained(self, weights: str | None = None) -> tuple[Path, str | None]:
        """Check that the run holds a spec and trained weights, without loading them; return
        (weight file, a note to show or None).

        Args:
            weights: None (the final weights, else the best epoch's with a note), or one of
                `WEIGHT_CHOICES` (final, best, ema), which must then be there.

        Raises:
            UsageError: no spec.yaml, no weights, an unknown choice or a missing file (naming what to do).
        """
        spec_path = self.file(SPEC)
        if not spec_path.is_file():
            raise self._error(
                "the run directory has no spec.yaml",
                found=str(spec_path),
                expected="a run directory written by `surgery run` (spec.yaml, model.safetensors, classes.json)",
            )
        if weights is not None:
            return self._chosen(weights), None
        for i, name in enumerate(DEFAULT_WEIGHTS):
            path = self.file(name)
            if path.is_file():
                note = None
                if i:
                    note = (
                        f"{self.file(DEFAULT_WEIGHTS[0])} is missing (the run did not finish?); "
                        f"using the best epoch's weights, {path}"
                    )
                return path, note
        raise self._error(
            "the run directory holds no trained weights",
            found="no " + " and no ".join(str(self.file(n)) for n in DEFAULT_WEIGHTS),
            expected="a run directory written by `surgery run`",
            hint=f"finish or resume the run: surgery run {spec_path} --out {self.path} --resume",
        )

    def _chosen(self, weights: str) -> Path:
        choices = WEIGHT_CHOICES
        flag = Origin.flag("--weights", weights)
        if weights not in choices:
            raise UsageError(
                f"unknown weights {weights!r}",
                origin=flag,
                found=repr(weights),
                expected="one of " + ", ".join(choices),
                hint=did_you_mean(weights, choices),
            )
        path = self.file(choices[weights])
        if path.is_file():
            return path
        spec_path = self.file(SPEC)
        if weights == "ema":
            hint = (
                "the run kept no EMA of its weights (train.ema is null); train with train.ema: 0.999 to keep one"
                if not self._keeps_ema()
                else f"the run did not finish: resume it (surgery run {spec_path} --out {self.path} --resume)"
            )
        elif weights == "final":
            hint = f"the run did not finish: use --weights best, or resume it with --out {self.path} --resume"
        else:
            hint = "no epoch was validated yet: resume the run, or use --weights final"
        raise UsageError(
            f"the run directory has no {weights} weights",
            origin=flag,
            found=f"no {path}",
            expected=f"{choices[weights]} in {self.path}",
            hint=hint,
        )

    def _keeps_ema(self) -> bool:
        """Does spec.yaml set train.ema (read as plain YAML: this only words a message)?"""
        train = self.raw_spec.get("train") if isinstance(self.raw_spec, dict) else None
        return isinstance(train, dict) and train.get("ema") is not None

    @functools.cached_property
    def raw_spec(self) -> Any:
        """spec.yaml as plain YAML (None when missing or unreadable, without a problem: the
        typed `spec` says what is wrong)."""
        import yaml

        try:
            return yaml.safe_load(read_text(self.file(SPEC)))
        except (Unreadable, yaml.YAMLError, RecursionError):
            return None

    def require_classes(self, num_classes: int) -> list[str]:
        """classes.json, checked against the model's outputs (label numbers when there is none)."""
        path = self.file(CLASSES)
        if not path.exists():
            return [str(i) for i in range(num_classes)]  # no classes.json: the label numbers are the names
        try:
            classes = read_json(path)
        except Unreadable as exc:
            raise self._error(
                f"classes.json cannot be read: {exc.reason}",
                found=str(path),
                expected="a JSON list of class names",
                hint="restore it, or delete it to use label numbers",
            ) from None
        if not isinstance(classes, list) or len(classes) != num_classes:
            raise self._error(
                f"classes.json does not match the model's {num_classes} outputs",
                found=str(path),
                expected=f"a JSON list of {num_classes} class names",
                hint="restore it, or delete it to use label numbers",
            )
        return [str(c) for c in classes]

    def written_classes(self) -> list[str] | None:
        """classes.json as written, or None (missing or malformed: `load` then decides and words it)."""
        try:
            classes = read_json(self.file(CLASSES))
        except Unreadable:
            return None
        return [str(c) for c in classes] if isinstance(classes, list) else None

    def require_splits(self) -> dict[str, Any] | None:
        """splits.json, or None when the folder has none (a run folder put together by hand: nothing
        is then checked against it)."""
        path = self.file(SPLITS)
        if not path.is_file():
            return None
        try:
            record = read_json(path)
        except Unreadable as exc:
            raise RunDirError(
                f"splits.json cannot be read: {exc.reason}",
                origin=Origin.path(path),
                expected="the JSON written by `surgery run`",
                hint="restore it, or delete it to skip the "
                "check that the split's images are those the run trained beside",
            ) from None
        return record if isinstance(record, dict) else None

    def require_predictions(self, split: str) -> list[dict[str, Any]] | None:
        """``eval/<split>/predictions.jsonl`` (`surgery evaluate`): one dict per image with its id
        (``path`` or ``index``), ``true`` and ``predicted``; None when the run has not been evaluated so.

        Raises:
            UsageError: the file cannot be read, or a line is not such a record.
        """
        path = self.file(EVAL) / split / EVAL_PREDICTIONS
        if not path.is_file():
            return None
        fix = f"evaluate it again: `surgery evaluate {self.path} --split {split}`"
        try:
            rows = metrics_rows(path)
        except Unreadable as exc:
            raise self._error(
                f"{EVAL}/{split}/{EVAL_PREDICTIONS} cannot be read: {exc.reason}", found=str(path), hint=fix
            ) from None
        if not rows:
            raise UsageError(
                f"{EVAL}/{split}/{EVAL_PREDICTIONS} holds no predictions",
                origin=Origin.path(path),
                found="an empty file",
                expected="one line per image scored",
                hint=fix,
            )
        for line, row in enumerate(rows, 1):
            if not (
                isinstance(row, dict) and {"true", "predicted"} <= row.keys() and ("path" in row or "index" in row)
            ):
                raise UsageError(
                    f"{EVAL}/{split}/{EVAL_PREDICTIONS} line {line} is not a prediction record",
                    origin=Origin.path(path),
                    found=str(row)[:80],
                    expected='{"path" or "index": ..., "true": CLASS, "predicted": CLASS, ...}',
                    hint=fix,
                )
        return rows

    def require_finished(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(summary, spec as plain YAML) of a finished run, for comparisons.

        Raises:
            UsageError: not a run, not finished, stopped, or a file that cannot be read.
        """
        path = self.file(SUMMARY)
        if not path.is_file():
            if not self.has(SPEC) and not self.has(METRICS):
                raise UsageError(
                    "the folder is not a run directory: it has no spec.yaml and no summary.json",
                    origin=Origin.path(self.path),
                    expected="a finished run directory written by `surgery run`",
                    hint="pass the run directories themselves, e.g. runs/NAME, not the folder above them",
                )
            raise self._not_finished(f"the run has not finished: it has no {SUMMARY}", found=str(path))
        try:
            summary = read_json(path)
        except Unreadable as exc:
            raise self._not_finished(f"{SUMMARY} cannot be read: {exc.reason}", found=str(path), hint=None) from None
        if not isinstance(summary, dict) or summary.get("stopped") or "best_val_acc" not in summary:
            stopped = summary.get("stopped") if isinstance(summary, dict) else None
            raise self._not_finished(
                f"{SUMMARY} is not a finished run's" + (f" (the run stopped: {stopped})" if stopped else ""),
                found=str(path),
                hint=None,
            )
        import yaml

        spec_path = self.file(SPEC)
        try:
            spec = yaml.safe_load(read_text(spec_path))
        except Unreadable as exc:
            if not spec_path.exists():
                raise self._not_finished("the run has no spec.yaml", found=str(spec_path), hint=None) from None
            raise self._not_finished(
                f"spec.yaml cannot be read: {exc.reason}", found=str(spec_path), hint=None
            ) from None
        except (yaml.YAMLError, RecursionError) as exc:
            raise self._not_finished(
                f"spec.yaml cannot be read: {describe_exception(exc)}", found=str(spec_path), hint=None
            ) from None
        if not isinstance(spec, dict):
            raise self._not_finished("spec.yaml is not a spec (a mapping)", found=str(spec_path), hint=None)
        return summary, spec

    def require_metrics(self) -> list[Any]:
        """metrics.jsonl's lines (a torn last line ignored; none for a run without the file).

        Raises:
            UsageError: the file cannot be read or is not UTF-8.
        """
        path = self.file(METRICS)
        try:
            return metrics_rows(path)
        except Unreadable as exc:
            raise self._not_finished(f"{METRICS} cannot be read: {exc.reason}", found=str(path), hint=None) from None

    def _not_finished(self, problem: str, **kw: Any) -> UsageError:
        kw.setdefault("expected", "a finished run directory (written by `surgery run`, with summary.json)")
        kw.setdefault(
            "hint", f"finish it with `surgery run {self.file(SPEC)} --out {self.path} --resume`, or leave it out"
        )
        return UsageError(problem, origin=Origin.path(self.path), **kw)

    def load(self, device: Any = None, weights: str | None = None) -> "LoadedRun":
        """The trained model rebuilt from spec.yaml with the run's own weights, in eval mode on `device`.

        Args:
            device: cpu, cuda, cuda:1, mps; None: the run's recorded ``train.device`` (auto: cuda
                when available, else cpu), as `surgery run` chose.
            weights: None (final, else best), or final, best or ema (`--weights`): that file or an error.

        Raises:
            UserError: no spec or weights, weights that do not fit the spec exactly (another model's:
                naming the missing, unexpected and mis-shaped tensors), classes.json that does not
                fit, an absent device.
        """
        from .loaded import load

        return load(self, device, weights)


def _finite(value: Any) -> float | None:
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _whole(value: Any) -> int | None:
    number = _finite(value)
    return int(number) if number is not None and number == int(number) else None


__all__ = [
    "Run",
    "Unreadable",
    "open_run",
    "read_json",
    "read_text",
    "parse_json",
    "metrics_rows",
    "read_metrics",
    "inside",
]
