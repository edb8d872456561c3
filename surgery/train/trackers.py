"""Trackers: where a run's metrics go besides metrics.jsonl, which stays the source of truth.

    metrics.csv     always: metrics.jsonl's rows as a table, rewritten atomically after each epoch
    tensorboard     `log.tensorboard: true`: event files in RUN_DIR/tensorboard (torch.utils.tensorboard)
    mlflow          `log.mlflow`: one MLflow run (the real client), its id kept in RUN_DIR/mlflow_run.json

The runner talks to them through one `Trackers` object, on rank 0 only:

    with Trackers(spec, folder, rows, enabled=..., say=...) as trackers:   # start: after the run directory is in place
        trackers.log_epoch(rows)         # after each epoch's checkpoint; rows[-1] is the new epoch
        trackers.finish(summary)         # after the final files: the plots, summary.json, spec.yaml

Metric names are metrics.jsonl's keys, nested ones joined with "/" (`lr/head`, `trainable/head`),
in the CSV header, the TensorBoard tags and the MLflow metric keys alike; the step is the 0-based
epoch. A tracker that cannot start is an error before anything trains; one that fails later (an
MLflow server gone, a full disk) is warned about once and dropped: the run goes on, and
metrics.jsonl and metrics.csv keep every epoch.

A resumed run continues the same trackers without duplicating an epoch: metrics.csv is rewritten
from the restored rows; TensorBoard purges the events from the last checkpointed epoch on (its
`purge_step`) and logs that epoch again, since it may or may not have been written before the run
stopped; MLflow continues the run whose id mlflow_run.json holds and logs only the epochs missing
from its history.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from ..errors import SpecError, UserError, describe_exception
from ..runs import layout

# torch, TensorBoard and MLflow are imported where they are used: `surgery validate` checks the
# packages through `check_available` without importing any of them

RECORD = "mlflow_run.json"  # which MLflow run a run directory logs to, so --resume continues it
# tracker -> (the module it imports, the pyproject extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}
# summary.json figures logged once at the end (those present: multi-label runs have no accuracy-based best)
SUMMARY_METRICS = ("best_val_acc", "final_val_acc", "final_val_loss", "val_macro_f1", "best_val_map", "final_val_map")
_PLOTS = (layout.CURVES, layout.CONFUSION)


class TrackerError(UserError):
    """A tracker that cannot start (an unreachable MLflow server, a tracking URI MLflow refuses).
    Exit code 1: nothing was trained, and the machine or the server is at fault, not the spec."""

    exit_code = 1


# --------------------------------------------------------------------------- before a run
def requested(spec: Any) -> list[str]:
    """The trackers a spec asks for besides metrics.csv, in `PACKAGES` order."""
    return [name for name, on in (("tensorboard", spec.log.tensorboard), ("mlflow", spec.log.mlflow is not None)) if on]


def _missing(spec: Any, name: str, cause: str = "is not installed") -> SpecError:
    module, extra = PACKAGES[name]
    return spec.error(
        ("log", name),
        f"log.{name} needs the {module} package, which {cause}",
        found=f"log.{name}: {json.dumps(spec.raw['log'][name])}",
        expected=f"the {module} package installed",
        hint=f"pip install 'surgery[{extra}]' (in a checkout: pip install -e '.[{extra}]'), or log.{name}: false",
    )


def check_available(spec: Any) -> None:
    """Raise a located SpecError for a tracker that cannot start: its package missing (naming the
    extra to install), or a local MLflow store that cannot be made (a file in the way, a folder
    that cannot be written, a path the system refuses).

    Cheap (nothing is imported, nothing is created), so `surgery validate` and `surgery run` call
    it before the run directory is claimed; `Trackers` imports for real and reports a broken
    install the same way.
    """
    for name in requested(spec):
        if importlib.util.find_spec(PACKAGES[name][0]) is None:
            raise _missing(spec, name)
    if spec.log.mlflow is not None:
        _check_store(spec)


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")
_URI_KEY = ("log", "mlflow", "tracking_uri")


def _local_store(spec: Any) -> tuple[Path, str] | None:
    """The folder a local MLflow store is made in and the file it goes to (a sqlite:/// URI's
    database file, else mlflow.db inside the folder), or None for a server or the default store
    (made inside the run directory, which `rundir.check_writable` checks)."""
    written = spec.log.mlflow.tracking_uri
    if written is None or written == "databricks":
        return None
    if written.startswith("sqlite:///"):
        db = Path(written[len("sqlite:///") :])
        return db.parent, db.name
    if written.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(written).path)), "mlruns"
    if _SCHEME.match(written):
        return None
    return spec.resolve_path(written, _URI_KEY), "mlflow.db"


def _check_store(spec: Any) -> None:
    store = _local_store(spec)
    if store is None:
        return
    from ..files import not_regular, shown_path

    folder, _ = store

    def error(problem: str, at: Path) -> SpecError:
        return spec.error(
            _URI_KEY,
            f"the MLflow store cannot be made: {problem}",
            found=shown_path(at),
            expected="a folder that exists or can be created, and can be written",
            hint="a relative tracking_uri starts at the spec file's folder; a server is written http://host:port",
        )

    why = not_regular(folder)
    if why in ("a path longer than the system allows", "a path with a NUL character"):
        raise error(why, folder)
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise error("a file is in the way" if existing != folder else "it is a file, not a folder", existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise error("this folder cannot be written", existing)


# --------------------------------------------------------------------------- rows and names
def flatten(row: Mapping[str, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """{"lr": {"head": 0.1}} -> {"lr/head": 0.1}: one name per value, nested keys joined by `sep`."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, sep, name))
        else:
            out[name] = value
    return out


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row a tracker plots (true/false as 1/0); not `epoch`, the step itself."""
    return {
        name: float(value)
        for name, value in flatten(row).items()
        if name != "epoch" and isinstance(value, (int, float)) and value == value
    }


def metrics_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """metrics.jsonl's rows as CSV text: columns are the union of the flattened keys, first seen first."""
    flat = [flatten(r) for r in rows]
    columns = list(dict.fromkeys(k for r in flat for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, restval="", lineterminator="\n")
    writer.writeheader()
    for r in flat:
        writer.writerow({k: _cell(v) for k, v in r.items()})
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def spec_params(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The spec as flat parameters named like `--set` keys (`train.optimizer.lr`, `surgery.0.at`);
    values are strings, numbers, true/false or None (empty lists and mappings as text)."""
    out: dict[str, Any] = {}
    stack: list[tuple[str, Any]] = [("", raw)]
    while stack:
        name, value = stack.pop()
        items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, list) else None
        if items is None:
            out[name] = value
        elif not value:
            out[name] = json.dumps(value)
        else:
            stack.extend((f"{name}.{k}" if name else str(k), v) for k, v in reversed(list(items)))
    return out


_MLFLOW_NAME = re.compile(r"[^A-Za-z0-9_\-. /]")  # what MLflow accepts in a metric or parameter name


def _mlflow_name(name: str) -> str:
    return _MLFLOW_NAME.sub("_", name)


# --------------------------------------------------------------------------- the trackers
class _Csv:
    """metrics.csv: part of the run directory, written like metrics.jsonl (a failed write stops the run)."""

    label = "metrics.csv"

    def __init__(self, folder: Path) -> None:
        self.path = folder / "metrics.csv"

    def start(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if rows or self.path.exists():  # a resume keeps the rows before its checkpoint, as metrics.jsonl does
            self.log_epoch(rows)

    def log_epoch(self, rows: Sequence[Mapping[str, Any]]) -> None:
        from ..files import write_text

        write_text(self.path, metrics_csv(rows))

    def finish(self, summary: Mapping[str, Any]) -> None:
        pass

    def close(self, status: str) -> None:
        pass


class _TensorBoard:
    label = "TensorBoard"

    def __init__(self, spec: Any, folder: Path, say: Callable[[str], None]) -> None:
        self.spec, self.folder, self.say = spec, folder, say
        self.logdir = folder / "tensorboard"
        self.writer: Any = None

    def start(self, rows: Sequence[Mapping[str, Any]]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise _missing(self.spec, "tensorboard", f"cannot be imported ({describe_exception(exc, 80)})") from None
        # events from the last checkpointed epoch on may be left from before a stop: TensorBoard
        # hides them (purge_step) and this writer logs that epoch again
        first = rows[-1]["epoch"] if rows else 0
        self.writer = SummaryWriter(log_dir=str(self.logdir), purge_step=first)
        if first == 0:
            self.writer.add_text("spec", "```yaml\n" + self.spec.to_yaml() + "```", global_step=0)
        for row in rows[-1:]:
            self._scalars(row)
        self.writer.flush()
        self.say(f"tensorboard: {self.logdir} (tensorboard --logdir {self.logdir})")

    def _scalars(self, row: Mapping[str, Any]) -> None:
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=row["epoch"])

    def log_epoch(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self._scalars(rows[-1])
        self.writer.flush()  # on disk each epoch: a crash loses nothing a checkpoint has

    def finish(self, summary: Mapping[str, Any]) -> None:
        import numpy as np
        from PIL import Image

        step = max(self.spec.train.epochs - 1, 0)
        for name in _PLOTS:
            path = self.folder / name
            if path.is_file():
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self.writer.add_image(Path(name).stem, pixels, global_step=step, dataformats="HWC")
        figures = {
            f"hparams/{k}": float(summary[k]) for k in SUMMARY_METRICS if isinstance(summary.get(k), (int, float))
        }
        # the spec beside its final figures in the HPARAMS tab; add_hparams writes its own sub-run,
        # replaced whole if a resumed run finishes a second time
        shutil.rmtree(self.logdir / "hparams", ignore_errors=True)
        self.writer.add_hparams(spec_params(self.spec.raw), figures, run_name="hparams", global_step=step)
        self.writer.flush()

    def close(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()


class _Mlflow:
    label = "MLflow"

    def __init__(self, spec: Any, folder: Path, say: Callable[[str], None]) -> None:
        self.spec, self.folder, self.say = spec, folder, say
        self.client: Any = None
        self.run_id: str | None = None
        self.logged: set[int] = set()

    def _uri(self) -> tuple[str, str | None]:
        """The tracking URI and, for a local store, where its artifacts go."""
        written = self.spec.log.mlflow.tracking_uri
        if written is None and os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"], None
        if written is not None and (_SCHEME.match(written) or written == "databricks"):
            return written, None
        store = self.folder / "mlflow" if written is None else self.spec.resolve_path(written, _URI_KEY)
        store = store.resolve()
        try:
            store.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # `check_available` refuses what it can foresee; this is what it could not
            raise TrackerError(
                f"cannot make the MLflow store {store}: {exc.strerror or exc}",
                origin=self.spec.source.origin(_URI_KEY if written is not None else ("log", "mlflow")),
                found=str(store),
                expected="a folder that can be created and written",
                hint="nothing was trained: fix log.mlflow.tracking_uri, then run again",
            ) from None
        return f"sqlite:///{store / 'mlflow.db'}", (store / "artifacts").as_uri()

    def start(self, rows: Sequence[Mapping[str, Any]]) -> None:
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise _missing(self.spec, "mlflow", f"cannot be imported ({describe_exception(exc, 80)})") from None
        uri, artifacts = self._uri()
        try:
            with _quiet_mlflow():
                self.client = MlflowClient(tracking_uri=uri)
                self.run_id = self._continue(uri) or self._create(uri, artifacts)
                params = [Param(_mlflow_name(k), _param(v)) for k, v in spec_params(self.spec.raw).items()]
                for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
                    self.client.log_batch(self.run_id, params=params[i : i + 100])
        except Exception as exc:  # noqa: BLE001 - any failure to reach the store is the same problem for the user
            raise TrackerError(
                f"cannot start the MLflow run at {uri}: {describe_exception(exc)}",
                origin=self.spec.source.origin(("log", "mlflow")),
                found=uri,
                expected="a tracking URI MLflow can reach",
                hint="nothing was trained: start the server or fix log.mlflow, then run again "
                "with --overwrite (or log.mlflow: false)",
            ) from None
        for row in rows:
            if row["epoch"] not in self.logged:
                self._log_row(row)
        self.say(f"mlflow: run {self.run_id} in {uri}, experiment {self.spec.log.mlflow.experiment!r}")

    def _continue(self, uri: str) -> str | None:
        """The run a resumed run directory logged to, if it is in this store; its logged epochs in `logged`."""
        record = self.folder / RECORD
        if not record.is_file():
            return None
        saved = json.loads(record.read_text(encoding="utf-8"))
        if saved.get("tracking_uri") != uri:
            self.say(f"mlflow: this run logged to {saved.get('tracking_uri')}, now {uri}: a new MLflow run starts")
            return None
        run_id = saved["run_id"]
        try:
            self.client.get_run(run_id)
        except Exception as exc:  # noqa: BLE001 - deleted from the store, or the store was replaced
            self.say(f"mlflow: run {run_id} is not in {uri} ({describe_exception(exc, 80)}): a new MLflow run starts")
            return None
        self.client.update_run(run_id, status="RUNNING")
        key = _mlflow_name("val_loss")
        self.logged = {m.step for m in self.client.get_metric_history(run_id, key)}
        return run_id

    def _create(self, uri: str, artifacts: str | None) -> str:
        name = self.spec.log.mlflow.experiment
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(name, artifact_location=artifacts)
        )
        run = self.client.create_run(
            experiment_id, run_name=self.spec.name, tags={"surgery.run_dir": str(self.folder.resolve())}
        )
        from ..files import write_json

        write_json(
            self.folder / RECORD, {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": run.info.run_id}
        )
        return run.info.run_id

    def log_epoch(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self._log_row(rows[-1])

    def _log_row(self, row: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_name(k), v, now, row["epoch"]) for k, v in scalars(row).items()]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.logged.add(row["epoch"])

    def finish(self, summary: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), max(self.spec.train.epochs - 1, 0)
        figures = [
            Metric(k, float(summary[k]), now, step) for k in SUMMARY_METRICS if isinstance(summary.get(k), (int, float))
        ]
        self.client.log_batch(self.run_id, metrics=figures)
        for name in (*_PLOTS, layout.SUMMARY, layout.SPEC):
            path = self.folder / name
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path), str(Path(name).parent) if "/" in name else None)
        self.client.set_terminated(self.run_id, "FINISHED")
        self.run_id = None  # finished: close has nothing to mark

    def close(self, status: str) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, status)


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 6000 else text[:5997] + "..."  # MLflow's limit on a parameter value


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow announces creating a database's tables on stderr (INFO) and SQLAlchemy warns about
    MLflow's own mappers: neither is the user's to act on."""
    logger = logging.getLogger("mlflow.store.db.utils")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*noload.*")
            yield
    finally:
        logger.setLevel(level)


class Trackers:
    """Every tracker of one run behind the three calls the runner makes (see the module docstring).

    Args:
        spec: the run's `Spec` (`spec.log` says which trackers).
        folder: the run directory, already in place (`RunDir.start`).
        rows: the metrics rows a resume restored (empty for a new run).
        env: the run's `distributed.Distributed`; only rank 0 writes, and an error there (a full
            disk under metrics.csv, a tracker that cannot start) is raised on every rank, as
            `env.on_main` does for the run's other files. None: a single process.
        say: prints a line for the user (rank 0's console).

    Raises (on entering):
        SpecError: a tracker's package is missing or broken (the extra to install is named).
        TrackerError: MLflow cannot be reached; nothing has been trained.
    """

    def __init__(
        self,
        spec: Any,
        folder: Path,
        rows: Sequence[Mapping[str, Any]] = (),
        *,
        env: Any = None,
        say: Callable[[str], None] = print,
    ) -> None:
        self.rows, self.say = list(rows), say
        self.main = env is None or env.is_main
        self.on_main: Callable[[Callable[[], Any]], Any] = env.on_main if env is not None else (lambda fn: fn())
        self.csv = _Csv(folder)
        self.external: list[Any] = []
        if self.main:
            if spec.log.tensorboard:
                self.external.append(_TensorBoard(spec, folder, say))
            if spec.log.mlflow is not None:
                self.external.append(_Mlflow(spec, folder, say))

    def __enter__(self) -> "Trackers":
        self.on_main(self._start)
        return self

    def _start(self) -> None:
        self.csv.start(self.rows)
        for tracker in list(self.external):
            try:
                tracker.start(self.rows)
            except Exception:
                self.close("FAILED")
                raise

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> None:
        from .loop import TrainingStopped

        if kind is None:
            status = "FINISHED"
        else:
            status = "KILLED" if issubclass(kind, (TrainingStopped, KeyboardInterrupt)) else "FAILED"
        self.close(status)

    def log_epoch(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """After an epoch's checkpoint: `rows` is every metrics row so far, the new epoch last."""

        def write() -> None:
            self.csv.log_epoch(rows)
            self._each("log_epoch", rows)

        self.on_main(write)

    def finish(self, summary: Mapping[str, Any]) -> None:
        """After summary.json, spec.yaml and the plots are written."""
        self.on_main(lambda: self._each("finish", summary))

    def close(self, status: str) -> None:
        """Flush and close every tracker; MLflow marks an unfinished run `status` (KILLED, FAILED).
        Never raises, and no collective: it runs while an error unwinds, perhaps on one rank only."""
        self._each("close", status)
        self.external = []

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.external):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a tracker never costs the run its training
                self.external.remove(tracker)
                self.say(
                    f"warning: {tracker.label} failed ({describe_exception(exc)}); the run goes on without it, "
                    "and metrics.jsonl and metrics.csv keep every epoch"
                )
                with contextlib.suppress(Exception):
                    tracker.close("FAILED")


__all__ = [
    "Trackers",
    "TrackerError",
    "check_available",
    "requested",
    "flatten",
    "scalars",
    "metrics_csv",
    "spec_params",
    "PACKAGES",
    "RECORD",
]
