"""Trackers: metrics.csv, TensorBoard and MLflow receive exactly what metrics.jsonl holds, and a resumed
run continues them without duplicating an epoch. Values are read back with TensorBoard's own event
reader and MLflow's client. One run with both trackers (interrupted, then resumed) serves most tests:
MLflow's import and its SQLite store cost seconds."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from surgery import load_spec
from surgery.cli import main
from surgery.runs import read_metrics
from surgery.train import TrainingStopped, run
from surgery.train.trackers import RECORD, Trackers, flatten, metrics_csv, scalars, spec_params

SPEC = {
    "name": "tracked",
    "model": {"backbone": "timm:resnet10t", "num_classes": 10, "pretrained": False},
    "surgery": [{"insert": "se", "at": "layer2"}],
    "groups": [
        {"name": "head", "params": ["@head", "@inserted"], "lr": 0.01},
        {"name": "body", "params": ["*"], "lr": 0.001, "unfreeze_at": 1},
    ],
    "train": {"epochs": 3, "batch_size": 16, "limit_batches": 2},
    "data": {"name": "digits", "image_size": 32, "num_workers": 0, "subset": {"train": 64, "val": 64}},
    "log": {"tensorboard": True, "mlflow": True},
}


def _console() -> tuple[Console, io.StringIO]:
    text = io.StringIO()
    return Console(file=text, width=300), text


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, one_thread) -> dict:
    """A run with TensorBoard and MLflow, stopped by Ctrl-C in its last epoch and resumed."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    spec = load_spec(SPEC)

    def interrupt(epoch: int, step: int, loss: float) -> None:
        if (epoch, step) == (2, 0):
            os.kill(os.getpid(), signal.SIGINT)  # handled: finish the batch, checkpoint, stop

    console, first = _console()
    with pytest.raises(TrainingStopped):
        run(spec, out, on_step=interrupt, console=console)
    record = json.loads((out / RECORD).read_text())
    run_id = record["run_id"]
    from mlflow.tracking import MlflowClient

    assert MlflowClient(record["tracking_uri"]).get_run(run_id).info.status == "KILLED"  # stopped, resumable
    console, second = _console()
    run(spec, out, resume=True, console=console)
    return {"out": out, "spec": spec, "run_id": run_id, "first": first.getvalue(), "second": second.getvalue()}


# ---------------------------------------------------------------------- names and tables
def test_nested_metrics_get_one_name_each_and_scalars_are_numbers_only():
    row = {
        "epoch": 3,
        "val_acc": 0.5,
        "lr": {"head": 0.1, "body": 0.01},
        "trainable": {"head": True, "body": False},
        "train_acc_basis": "label",
        "val_top5": None,
        "val_f1": {},
    }
    assert flatten(row) == {
        "epoch": 3,
        "val_acc": 0.5,
        "lr/head": 0.1,
        "lr/body": 0.01,
        "trainable/head": True,
        "trainable/body": False,
        "train_acc_basis": "label",
        "val_top5": None,
        "val_f1": {},
    }
    assert scalars(row) == {
        "val_acc": 0.5,
        "lr/head": 0.1,
        "lr/body": 0.01,
        "trainable/head": 1.0,
        "trainable/body": 0.0,
    }


def test_csv_columns_are_the_union_of_every_rows_keys():
    rows = [
        {"epoch": 0, "val_acc": 0.25, "lr": {"head": 0.1}},
        {"epoch": 1, "val_acc": 0.5, "lr": {"head": 0.1}, "val_acc_ema": 0.75},
    ]
    table = list(csv.DictReader(io.StringIO(metrics_csv(rows))))
    assert list(table[0]) == ["epoch", "val_acc", "lr/head", "val_acc_ema"]
    assert table == [
        {"epoch": "0", "val_acc": "0.25", "lr/head": "0.1", "val_acc_ema": ""},
        {"epoch": "1", "val_acc": "0.5", "lr/head": "0.1", "val_acc_ema": "0.75"},
    ]


def test_spec_parameters_are_named_like_set_keys_and_give_the_spec_back():
    spec = load_spec(SPEC)
    params = spec_params(spec.raw)
    assert params["train.optimizer.lr"] == spec.train.optimizer.lr
    assert params["surgery.0.at"] == "layer2" and params["groups.0.params.1"] == "@inserted"
    assert params["train.scheduler.milestones"] == "[]" and params["log.mlflow"] is True
    # every parameter given back as --set (empty lists and mappings as written) rebuilds the same spec
    sets = [f"{k}={v if v in ('[]', '{}') else json.dumps(v)}" for k, v in params.items()]
    assert load_spec({"model": {"backbone": "timm:resnet18"}}, sets).raw == spec.raw


def test_every_run_writes_metrics_csv_with_the_rows_of_metrics_jsonl(tiny_run):
    rows = read_metrics(tiny_run / "metrics.jsonl")
    table = list(csv.DictReader((tiny_run / "metrics.csv").open()))
    assert [r["epoch"] for r in table] == [str(r["epoch"]) for r in rows] == ["0", "1"]
    for line, row in zip(table, rows):
        assert float(line["val_loss"]) == row["val_loss"] and float(line["lr/all"]) == row["lr"]["all"]
    assert not (tiny_run / "tensorboard").exists() and not (tiny_run / RECORD).exists()  # nothing asked for


# ---------------------------------------------------------------------- one tracked run, read back
def test_the_resumed_run_names_both_trackers_and_metrics_csv_matches(tracked):
    out = tracked["out"]
    assert "tensorboard: " in tracked["first"] and f"mlflow: run {tracked['run_id']}" in tracked["first"]
    assert f"mlflow: run {tracked['run_id']}" in tracked["second"]  # the same MLflow run continues
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    table = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(table) == 3
    for row, line in zip(rows, table):
        assert {k: _typed(v) for k, v in line.items()} == flatten(row)


def _typed(cell: str):
    """A CSV cell as the value it was written from."""
    if cell in ("True", "False", ""):
        return {"True": True, "False": False, "": None}[cell]
    try:
        return json.loads(cell)
    except ValueError:
        return cell


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def test_tensorboard_holds_every_epoch_once_with_the_values_of_metrics_jsonl(tracked):
    out = tracked["out"]
    rows = read_metrics(out / "metrics.jsonl")
    events = _events(out / "tensorboard")
    # the stop came in epoch 2, after epoch 1 was logged; the resume logged epoch 1 again and
    # purged the first copy, so TensorBoard shows each epoch once
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
    expected = {tag for r in rows for tag in scalars(r)}
    assert set(events.Tags()["scalars"]) == expected
    for tag in expected:
        logged = [(s.step, s.value) for s in events.Scalars(tag)]
        assert logged == [(r["epoch"], pytest.approx(scalars(r)[tag])) for r in rows if tag in scalars(r)], tag
    assert {"lr/head", "lr/body", "trainable/head", "trainable/body", "images_per_sec"} <= expected
    assert [s.value for s in events.Scalars("trainable/body")] == [0.0, 1.0, 1.0]
    assert set(events.Tags()["images"]) == {"curves", "confusion"}
    image = events.Images("curves")[0]
    assert image.step == 2 and image.width > 100 and image.encoded_image_string.startswith(b"\x89PNG")
    text = events.Tensors("spec/text_summary")[0].tensor_proto.string_val[0].decode()
    assert yaml.safe_load(text.removeprefix("```yaml\n").removesuffix("```")) == json.loads(
        json.dumps(tracked["spec"].raw)
    )


def test_tensorboard_hparams_hold_the_spec_and_the_final_figures(tracked):
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = tracked["out"]
    summary = json.loads((out / "summary.json").read_text())
    events = _events(out / "tensorboard" / "hparams")
    content = events.PluginTagToContent("hparams")
    info = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert info.hparams["train.epochs"].number_value == 3
    assert info.hparams["model.backbone"].string_value == "timm:resnet10t"
    assert events.Scalars("hparams/best_val_acc")[0].value == pytest.approx(summary["best_val_acc"])


def test_mlflow_holds_every_epoch_once_the_spec_and_the_artifacts(tracked):
    from mlflow.tracking import MlflowClient

    out, run_id = tracked["out"], tracked["run_id"]
    record = json.loads((out / RECORD).read_text())
    assert (
        record["run_id"] == run_id and record["tracking_uri"] == f"sqlite:///{(out / 'mlflow' / 'mlflow.db').resolve()}"
    )
    client = MlflowClient(record["tracking_uri"])
    mlrun = client.get_run(run_id)
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "tracked"
    assert client.get_experiment(mlrun.info.experiment_id).name == "surgery"
    rows = read_metrics(out / "metrics.jsonl")
    for key in scalars(rows[0]):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert history == [(r["epoch"], pytest.approx(scalars(r)[key])) for r in rows], key
    summary = json.loads((out / "summary.json").read_text())
    assert mlrun.data.metrics["best_val_acc"] == pytest.approx(summary["best_val_acc"])
    params = spec_params(tracked["spec"].raw)
    assert mlrun.data.params == {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "plots")
    }
    assert {"plots/curves.png", "plots/confusion.png", "summary.json", "spec.yaml"} <= artifacts
    local = Path(client.download_artifacts(run_id, "spec.yaml", str(out.parent)))
    assert local.read_text() == (out / "spec.yaml").read_text()


def test_a_tracker_failing_mid_run_is_warned_about_once_and_the_run_goes_on(tracked, tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    real = MlflowClient.log_batch
    calls = {"metrics": 0}

    def log_batch(self, run_id, metrics=(), *args, **kwargs):
        if metrics:
            calls["metrics"] += 1
            if calls["metrics"] >= 2:  # the server goes away after epoch 0
                raise MlflowException("API request to http://tracking:5000 failed: Connection refused")
        return real(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    store = tracked["out"] / "mlflow"  # a store that exists already: no new database to create
    spec = load_spec({**SPEC, "name": "flaky", "log": {"mlflow": {"tracking_uri": str(store), "experiment": "flaky"}}})
    rows = read_metrics(tracked["out"] / "metrics.jsonl")
    said: list[str] = []
    with Trackers(spec, tmp_path, say=said.append) as trackers:  # what the runner does, epoch by epoch
        for epoch in range(len(rows)):
            trackers.log_epoch(rows[: epoch + 1])
        trackers.finish(json.loads((tracked["out"] / "summary.json").read_text()))
    warnings = [line for line in said if line.startswith("warning")]
    assert warnings == [
        "warning: MLflow failed (MlflowException: API request to http://tracking:5000 failed: "
        "Connection refused); the run goes on without it, and metrics.jsonl and metrics.csv keep "
        "every epoch"
    ]
    assert len(list(csv.DictReader((tmp_path / "metrics.csv").open()))) == 3  # metrics.csv kept every epoch
    client = MlflowClient(f"sqlite:///{store.resolve() / 'mlflow.db'}")
    run_id = json.loads((tmp_path / RECORD).read_text())["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [0]
    assert client.get_run(run_id).info.status == "FAILED"


# ---------------------------------------------------------------------- missing packages, unreachable servers
@pytest.fixture
def spec_file(tmp_path) -> Path:
    path = tmp_path / "logged.yaml"
    path.write_text(
        yaml.safe_dump({k: v for k, v in SPEC.items() if k != "log"}, sort_keys=False)
        + "log:\n  tensorboard: true\n  mlflow:\n    experiment: x\n"
    )
    return path


@pytest.mark.parametrize("package", ["tensorboard", "mlflow"])
def test_a_missing_package_is_a_located_error_naming_the_extra(spec_file, tmp_path, monkeypatch, capsys, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now fails, as if it were not installed
    line = spec_file.read_text().splitlines().index(f"  {package}:" + (" true" if package == "tensorboard" else "")) + 1
    for argv in (["validate", str(spec_file)], ["run", str(spec_file), "--out", str(tmp_path / "run")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{spec_file}:{line}:3: log.{package}: log.{package} needs the {package} package" in err
        assert f"pip install 'surgery[{package}]'" in err and f"pip install -e '.[{package}]'" in err
        assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # found before anything trained or was written


def test_a_broken_tensorboard_install_is_found_when_the_run_starts(tmp_path, monkeypatch):
    from surgery.errors import SpecError

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    spec = load_spec({**SPEC, "log": {"tensorboard": True}})
    with pytest.raises(SpecError, match="log.tensorboard needs the tensorboard package, which cannot be imported"):
        Trackers(spec, tmp_path, say=lambda text: None).__enter__()


def test_an_unreachable_mlflow_server_stops_the_run_before_it_trains(spec_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    out = tmp_path / "run"
    code = main(
        [
            "run",
            str(spec_file),
            "--out",
            str(out),
            "--set",
            "log.tensorboard=false",
            "--set",
            "log.mlflow.tracking_uri=http://127.0.0.1:9",
        ]
    )
    said = capsys.readouterr()
    assert code == 1
    assert "cannot start the MLflow run at http://127.0.0.1:9" in said.err and "nothing was trained" in said.err
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize(
    "uri,words",
    [
        ("blocker/store", "a file is in the way"),
        ("sqlite:///{tmp}/blocker/sub/x.db", "a file is in the way"),
        ("blocker", "it is a file, not a folder"),
        ("{long}", "a path longer than the system allows"),
    ],
)
def test_an_mlflow_store_that_cannot_be_made_is_refused_at_its_line_before_the_run_directory(
    tmp_path, capsys, uri, words
):
    (tmp_path / "blocker").write_text("a file where the store's folder would go\n")
    uri = uri.format(tmp=tmp_path, long="d" * 5000)
    path = tmp_path / "store.yaml"
    path.write_text(
        yaml.safe_dump({k: v for k, v in SPEC.items() if k != "log"}, sort_keys=False)
        + f"log:\n  mlflow:\n    experiment: x\n    tracking_uri: '{uri}'\n"
    )
    line = len(path.read_text().splitlines())
    out = tmp_path / "run"
    for argv in (["validate", str(path)], ["run", str(path), "--out", str(out)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{path}:{line}:5: log.mlflow.tracking_uri: the MLflow store cannot be made: {words}" in err
        assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "store.yaml"]  # no run directory, no store
