"""The run directory as a whole: one run at a time, --overwrite that loses nothing, files nobody may
trust (a pickle that runs code), resume after the last epoch, and every check `validate` makes first."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from surgery.cli import main
from surgery.errors import RunDirError
from surgery.runs import RunDir, load_safetensors

TINY = {
    "name": "tiny",
    "model": {"backbone": "timm:resnet10t", "num_classes": 10},
    "train": {"epochs": 1, "batch_size": 16, "limit_batches": 1, "channels_last": False},
    "data": {"name": "digits", "image_size": 32, "num_workers": 0},
}


def write_spec(folder: Path, filename: str = "tiny.yaml", **sections) -> Path:
    data = json.loads(json.dumps(TINY))
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / filename
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(spec, run directory) of one finished tiny run; tests copy it before changing it."""
    folder = tmp_path_factory.mktemp("trained")
    spec = write_spec(folder)
    out = folder / "runs" / "tiny"
    torch.set_num_threads(1)
    assert main(["run", str(spec), "--out", str(out)]) == 0
    return spec, out


def _copy(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to)
    return to


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Boom:
    """A pickle that runs a command when it is loaded: what a shared run directory could hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil(path: Path, marker: Path, wrap: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"epoch": 1, "model": {}, "x": Boom(marker)} if wrap else Boom(marker)
    torch.save(payload, path)
    probe = path.with_name("probe.pt")  # torch.load reads a .safetensors name as safetensors
    probe.write_bytes(path.read_bytes())
    torch.load(probe, weights_only=False)  # the payload is real: an unrestricted load runs the command
    assert marker.exists()
    marker.unlink()
    probe.unlink()


# --------------------------------------------------------------------------- nothing the project reads runs code
def test_a_planted_checkpoint_never_runs_on_resume(trained, tmp_path, capsys):
    spec, run = trained
    out = _copy(run, tmp_path / "run")
    marker = tmp_path / "pwned"
    _evil(out / "checkpoints" / "last.pt", marker)
    assert main(["run", str(spec), "--out", str(out), "--resume"]) == 1
    assert not marker.exists()
    said = capsys.readouterr()
    assert "does not unpickle" in said.out.replace("\n", " ") and "Traceback" not in said.out + said.err


def test_a_planted_weight_file_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    _evil(tmp_path / "evil.pth", marker, wrap=False)
    spec = write_spec(tmp_path, model={"pretrained": "evil.pth"})
    assert main(["validate", str(spec)]) == 2
    assert not marker.exists()
    assert "weights_only" in capsys.readouterr().err or not marker.exists()


@pytest.mark.parametrize("command", ["predict", "export", "run:NAME"])
def test_planted_run_weights_never_run(trained, tmp_path, command, capsys):
    spec, run = trained
    out = _copy(run, tmp_path / "runs" / "tiny")
    marker = tmp_path / "pwned"
    _evil(out / "model.safetensors", marker, wrap=False)
    if command == "predict":
        image = tmp_path / "digit.png"
        from PIL import Image

        Image.new("RGB", (8, 8)).save(image)
        code = main(["predict", str(out), str(image)])
    elif command == "export":
        code = main(["export", str(out)])
    else:
        child = write_spec(tmp_path, "child.yaml", name="child", model={"pretrained": "run:tiny"})
        code = main(["run", str(child), "--out", str(tmp_path / "runs" / "child")])
    assert code == 2
    assert not marker.exists()
    assert "Traceback" not in capsys.readouterr().err


def test_checkpoints_load_weights_only(trained):
    _, run = trained
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["format"] == 3 and state["epoch"] == 1


# --------------------------------------------------------------------------- one run per folder
def test_a_second_run_into_a_held_folder_is_refused(trained, tmp_path, capsys):
    spec, _ = trained
    out = tmp_path / "run"
    holder = RunDir(out)
    holder.claim(resume=False, overwrite=False)
    try:
        assert main(["run", str(spec), "--out", str(out)]) == 1
        assert main(["run", str(spec), "--out", str(out), "--resume"]) == 1
        assert main(["run", str(spec), "--out", str(out), "--overwrite"]) == 1
    finally:
        holder.release()
    said = capsys.readouterr().out.replace("\n", " ")
    assert f"another run is using {out} (pid {os.getpid()})" in said
    assert not out.exists()  # the holder never started; nothing was written
    assert main(["run", str(spec), "--out", str(out)]) == 0  # released: free again


def test_a_lock_is_released_when_the_run_fails(tmp_path):
    spec = write_spec(tmp_path, surgery=[{"insert": "cbam", "at": "layer9"}])
    out = tmp_path / "run"
    assert main(["run", str(spec), "--out", str(out)]) == 2
    with RunDir(out) as again:
        again.claim(resume=False, overwrite=False)  # not held by the failed run


# --------------------------------------------------------------------------- --overwrite loses nothing
def test_overwrite_with_a_spec_that_fails_to_build_keeps_the_old_run(trained, tmp_path, capsys):
    _, run = trained
    out = _copy(run, tmp_path / "run")
    before = _snapshot(out)
    broken = write_spec(tmp_path, surgery=[{"insert": "cbam", "at": "layer9"}])  # found only at build time
    assert main(["run", str(broken), "--out", str(out), "--overwrite"]) == 2
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left
    assert "layer9" in capsys.readouterr().err


def test_overwrite_replaces_the_run_once_the_new_one_has_started(trained, tmp_path):
    spec, run = trained
    out = _copy(run, tmp_path / "run")
    (out / "notes-from-the-old-run.txt").write_text("old")
    assert main(["run", str(spec), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "notes-from-the-old-run.txt").exists()
    assert (out / "model.safetensors").exists() and (out / "summary.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_overwrite_may_start_from_the_weights_it_replaces(trained, tmp_path):
    """`pretrained: run:tiny` into runs/tiny --overwrite: the old weights are loaded before they go."""
    _, run = trained
    runs = tmp_path / "runs"
    out = _copy(run, runs / "tiny")
    old = load_safetensors(out / "model.safetensors")
    again = write_spec(
        tmp_path,
        "again.yaml",
        name="tiny",
        model={"pretrained": "run:tiny"},
        train={"epochs": 1, "limit_batches": 1, "optimizer": {"lr": 1e-12}},
    )
    assert main(["run", str(again), "--out", str(out), "--overwrite"]) == 0
    report = json.loads((out / "load_report.json").read_text())
    assert report["source"].endswith("model.safetensors") and len(report["loaded"]) == len(old)
    new = load_safetensors(out / "model.safetensors")
    assert all(
        torch.allclose(new[k].float(), old[k].float(), atol=1e-6)
        for k in old
        if "running" not in k and "num_batches" not in k
    )


def test_a_build_error_leaves_no_folder_behind(tmp_path):
    spec = write_spec(tmp_path, surgery=[{"insert": "cbam", "at": "layer9"}])
    out = tmp_path / "fresh"
    assert main(["run", str(spec), "--out", str(out)]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


# --------------------------------------------------------------------------- resume after the last epoch
def test_resume_after_the_final_writes_were_killed_finishes_them(trained, tmp_path, capsys):
    spec, run = trained
    out = _copy(run, tmp_path / "run")
    for name in ("model.safetensors", "summary.json"):
        (out / name).unlink()  # killed after the last checkpoint, before the final files
    capsys.readouterr()
    assert main(["run", str(spec), "--out", str(out), "--resume"]) == 0
    said = capsys.readouterr().out
    assert "all 1 epochs are trained; writing the final files" in said and "epoch 2/1" not in said
    assert (out / "model.safetensors").exists() and json.loads((out / "summary.json").read_text())["epochs"] == 1


# --------------------------------------------------------------------------- validate says what run would
@pytest.mark.parametrize(
    "sections, where, words",
    [
        ({"model": {"num_classes": 5}}, "model.num_classes", "the model has 5 outputs but the data has 10 classes"),
        (
            {"model": {"backbone": "timm:resnet10t", "num_classes": None}},
            "model.num_classes",
            "model.num_classes is not set, so the model keeps 1000 outputs",
        ),
        ({"train": {"optimizer": {"name": "adamm"}}}, "train.optimizer.name", "did you mean 'adam'"),
        ({"train": {"scheduler": {"name": "cosin"}}}, "train.scheduler.name", "did you mean 'cosine'"),
        ({"data": {"subset": {"train": 1}}}, "data.subset.train", "a batch of one cannot train BatchNorm"),
        ({"data": {"augment": {"randaugment": "rand-zz"}}}, "data.augment.randaugment", "RandAugment"),
        ({"train": {"compile": "inductr"}}, "train.compile", "did you mean 'inductor'"),
    ],
)
def test_validate_finds_what_run_would_stop_on(tmp_path, capsys, sections, where, words):
    spec = write_spec(tmp_path, **sections)
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err.replace("\n", " ")
    assert f"{spec}:" in err and where in err and words in err, err


def test_validate_warns_about_a_device_this_machine_lacks(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    spec = write_spec(tmp_path, train={"device": "cuda"})
    assert main(["validate", str(spec)]) == 0
    assert "CUDA is not available on this machine" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--device", "foo"], "--device foo: this is not a device"),
        (["--device", "cuda:7"], "--device cuda:7:"),
    ],
)
def test_command_line_values_get_located_errors(trained, tmp_path, capsys, argv, words):
    spec, _ = trained
    if "cuda" in argv[-1] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    assert main(["run", str(spec), "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_run_dir_errors_are_user_errors():
    err = RunDirError("x", exit_code=2)
    assert err.exit_code == 2 and RunDirError("y").exit_code == 1


# --------------------------------------------------------------------------- hangs
def test_a_named_pipe_given_to_predict_is_skipped_not_read(trained, tmp_path, capsys):
    _, run = trained
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    image = tmp_path / "good.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    assert main(["predict", str(run), str(fifo), str(image), "--json"]) == 0  # would block forever on the pipe
    said = capsys.readouterr()
    assert f"{fifo}: not a regular file (a named pipe)" in said.err.replace("\n", "")
    assert json.loads(said.out.splitlines()[0])["path"] == str(image)


def test_a_key_map_that_backtracks_without_end_is_stopped_and_named(tmp_path, capsys):
    from surgery import build, load_spec
    from surgery.errors import SpecError

    weights = tmp_path / "w.pth"
    model = build(load_spec(TINY)).model
    torch.save({("a" * 28 + "!" + k): v for k, v in model.state_dict().items()}, weights)
    slow = {**TINY, "model": {**TINY["model"], "pretrained": str(weights), "key_map": {"^(a|aa)+$": "x"}}}
    with pytest.raises(SpecError, match=r"this pattern is too slow") as info:
        build(load_spec(slow))
    assert info.value.path == "model.key_map.^(a|aa)+$"


def test_a_staging_folder_a_killed_run_left_is_removed_by_the_next_one(tmp_path):
    import subprocess
    import sys

    dead = int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    )
    left = tmp_path / f".tiny.new-{dead}-half"  # what `kill -9` during a run's first epoch leaves
    left.mkdir()
    (left / "spec.yaml").write_text("half")
    other = tmp_path / f".other.new-{dead}-half"  # another run directory's: not this claim's business
    other.mkdir()
    with RunDir(tmp_path / "tiny") as rundir:
        rundir.claim(resume=False, overwrite=False)
        assert not left.exists() and other.exists()
        assert rundir.folder.name.startswith(f".tiny.new-{os.getpid()}-")
