"""The `surgery` command: fast help and schema, exit code 2 with a short message, inspect output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from surgery.cli import EXIT_SPEC_ERROR, main
from surgery.spec import schema

GOOD = """\
model:
  backbone: torchvision:resnet18
  num_classes: 10
surgery:
  - insert: se
    at: [layer3, layer4]
groups:
  - name: new
    params: '@inserted'
  - name: head
    params: '@head'
  - name: rest
    params: '*'
    unfreeze_at: 2
train:
  epochs: 4
data:
  image_size: 32
"""

BAD = GOOD.replace("at: [layer3, layer4]", "at: [layer3, layer5]")


def run_cli(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "COLUMNS": "200"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "surgery", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    return proc, time.perf_counter() - start


@pytest.fixture()
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    return path


@pytest.fixture()
def bad(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    return path


# ---------------------------------------------------------------------- fast paths, no torch
@pytest.mark.parametrize("args", [["--help"], ["schema"], ["validate", "--help"]])
def test_help_and_schema_answer_at_once(args: list[str]) -> None:
    run_cli("--version")  # warm the file cache: the limit is about imports, not a cold disk
    proc, seconds = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert seconds < 1.5, f"surgery {' '.join(args)} took {seconds:.2f}s"


def test_schema_command_prints_the_schema() -> None:
    proc, _ = run_cli("schema")
    assert json.loads(proc.stdout) == schema()


@pytest.mark.parametrize(
    "code",
    [
        "from surgery.cli import main; main(['schema'])",
        "import surgery; surgery.load_spec({'model': {'backbone': 'timm:resnet18'}})",
        "from surgery.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    ],
)
def test_no_torch_where_none_is_needed(code: str) -> None:
    check = code + "\nimport sys\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_no_command_prints_help(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 0
    assert "usage: surgery" in capsys.readouterr().out


# ---------------------------------------------------------------------- validate
def test_validate_good_spec(good: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["validate", str(good)]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "2 modules inserted" in out and "3 groups" in out


def test_validate_bad_spec(bad: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["validate", str(bad)]) == EXIT_SPEC_ERROR == 2
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err and captured.out == ""
    lines = err.strip().splitlines()
    assert 2 <= len(lines) <= 6
    assert lines[0].startswith(f"error {bad}:6:") and "surgery[0].at[1]" in lines[0]
    assert "did you mean 'layer4'" in err


def test_validate_several_specs_reports_each(good: Path, bad: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["validate", str(good), str(bad)]) == 2
    captured = capsys.readouterr()
    assert "ok" in captured.out and str(good) in captured.out
    assert str(bad) in captured.err


def test_validate_with_a_bad_override(good: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["validate", str(good), "--set", "train.epocs=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error --set train.epocs=3: train.epocs: unknown key")
    assert "did you mean 'epochs'" in err


def test_validate_with_a_good_override(good: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["validate", str(good), "--set", "surgery.0.at=layer4", "--set", "train.epochs=3"]) == 0
    assert "1 modules inserted" in capsys.readouterr().out


def test_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "resnet.yaml").write_text(GOOD)
    assert main(["validate", str(tmp_path / "resnt.yaml")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "resnet.yaml" in err


@pytest.mark.parametrize("mistake", [False, True])
def test_validate_runs_every_check_registered_in_validation_checks(
    good: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, mistake: bool
) -> None:
    """`surgery validate` is `surgery.validate`: a check added to CHECKS runs there too."""
    from surgery import validation
    from surgery.errors import SpecError

    seen: list[tuple] = []

    def extra(spec, built):
        seen.append((spec.name, len(built.inserted)))
        if mistake:
            raise SpecError("the extra check refuses this spec", path=("surgery",), file=str(good), line=3)
        return (f"{good}:3: surgery: the extra check's warning",)

    monkeypatch.setattr(validation, "CHECKS", (*validation.CHECKS, validation.Check("extra", extra, needs_model=True)))
    assert main(["validate", str(good)]) == (2 if mistake else 0)
    captured = capsys.readouterr()
    assert seen == [("good", 2)]
    if mistake:
        assert captured.err.startswith(f"error {good}:3: surgery: the extra check refuses this spec")
    else:
        assert "warning" in captured.err and "the extra check's warning" in captured.err
        assert "ok" in captured.out and "2 modules inserted" in captured.out


SWEEP = """\
name: placements
spec: good.yaml
set: {train.epochs: 3}
sweep:
  axes:
    surgery.0.at: {l4: [layer4], l34: [layer3, layer4]}
"""


def test_validate_a_sweep_file_checks_its_schema_and_every_variant(good: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = good.parent / "sweep.yaml"
    sweep.write_text(SWEEP)
    assert main(["validate", str(sweep)]) == 0
    captured = capsys.readouterr()
    assert f"ok {sweep}: sweep placements, 2 variants" in captured.out, captured

    sweep.write_text(SWEEP.replace("l34: [layer3, layer4]", "l34: [layer3, layer5]"))  # only the model can say
    assert main(["validate", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error {sweep}:6:") and "variant at-l34" in err and "layer5" in err, err

    sweep.write_text(SWEEP.replace("sweep:", "sweep:\n  sampler: gird"))  # the sweep file's own schema
    assert main(["validate", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error {sweep}:5:") and "unknown key 'spec'" not in err and "'grid'" in err, err

    # a pruner's setting: the schema's range, and a min_epochs that leaves nothing to prune (train.epochs: 3)
    sweep.write_text(SWEEP + "  prune: {pruner: successive_halving, reduction_factor: 1}\n")
    assert main(["validate", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error {sweep}:7:") and "reduction_factor" in err, err
    sweep.write_text(SWEEP + "  prune: {pruner: hyperband, min_epochs: 3}\n")
    assert main(["validate", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error {sweep}:7:") and "leaves nothing to prune" in err, err


def test_validate_in_a_subprocess_exits_2_without_a_traceback(bad: Path) -> None:
    proc, _ = run_cli("validate", str(bad))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{bad}:6:" in proc.stderr and "layer5" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 6


def test_yaml_syntax_error_in_a_subprocess(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n\tbackbone: torchvision:resnet18\n")
    proc, seconds = run_cli("validate", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{path}:2:1" in proc.stderr and "tabs" in proc.stderr
    assert seconds < 1.5  # a spec that fails the schema is rejected before torch is imported


def test_long_messages_are_not_wrapped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / ("a-rather-long-file-name-for-a-spec-" * 3 + ".yaml")
    path.write_text(GOOD + "surgrey: []\n")
    assert main(["validate", str(path)]) == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert first.endswith("surgrey: unknown key 'surgrey'")


# ---------------------------------------------------------------------- inspect
@pytest.fixture(scope="module")
def backbone_records() -> list[dict]:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["inspect", "timm:resnet18", "--json", "--input-size", "32"]) == 0
    return json.loads(out.getvalue())


def test_inspect_backbone_json(backbone_records: list[dict]) -> None:
    records = backbone_records
    assert isinstance(records, list) and records
    for r in records:
        assert set(r) >= {"path", "type", "params", "output_shape", "inserted", "group"}
        assert isinstance(r["inserted"], bool) and r["inserted"] is False
        assert isinstance(r["params"], int)
    by_path = {r["path"]: r for r in records}
    assert by_path[""]["type"] == "ResNet" and by_path[""]["output_shape"] == [1, 1000]
    assert by_path["layer4"]["output_shape"] == [1, 512, 1, 1]  # batch first, 32 px probe
    assert by_path["conv1"]["group"] == "all"
    assert by_path["act1"]["params"] == 0 and by_path["act1"]["group"] is None


def test_inspect_spec_json_marks_inserted_modules_and_groups(good: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(good), "--json"]) == 0
    records = {r["path"]: r for r in json.loads(capsys.readouterr().out)}
    inserted = [p for p, r in records.items() if r["inserted"] and p.count(".") == 1]
    assert inserted == ["layer3.se_after", "layer4.se_after"]
    assert records["layer3.se_after"]["group"] == "new"
    assert records["layer3.se_after"]["type"].startswith("Inserted")
    assert records["fc"]["group"] == "head"
    assert records["layer1"]["group"] == "rest" and records["layer1"]["inserted"] is False
    assert set(records["layer4"]["group"]) == {"rest", "new"}
    assert records[""]["output_shape"] == [1, 10]


def test_inspect_spec_tree(good: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(good)]) == 0
    out = capsys.readouterr().out
    assert "se_after" in out and "inserted after layer3" in out
    assert "load report" in out and "parameter groups" in out


def test_inspect_depth_one(good: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(good), "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "layer1" in out and "folded (--depth)" in out
    assert "conv2" not in out  # inside the blocks, folded away


def test_inspect_schedule(good: Path, capsys: pytest.CaptureFixture) -> None:
    schedule = pytest.importorskip("surgery.train.schedule")
    if not hasattr(schedule, "schedule_table"):
        pytest.skip("surgery.train.schedule.schedule_table is not written yet")
    assert main(["inspect", str(good), "--schedule"]) == 0
    out = capsys.readouterr().out
    assert "epoch" in out and "frozen" in out
    for name in ("new", "head", "rest"):
        assert name in out
    rows = [line for line in out.splitlines() if line.strip("│ ").split(" ")[0].isdigit()]
    assert len(rows) == 4  # one row per epoch
    assert "frozen" in rows[0] and "frozen" not in rows[2]  # rest unfreezes at epoch 2


def test_inspect_list(capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", "--list", "timm", "resnet1*"]) == 0
    names = capsys.readouterr().out.split()
    assert "timm:resnet18" in names
    assert all(n.startswith("timm:resnet1") for n in names)


def test_inspect_list_torchvision(capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", "--list", "torchvision", "resnet*"]) == 0
    names = capsys.readouterr().out.split()
    assert "torchvision:resnet18" in names and "torchvision:vgg11" not in names


@pytest.mark.parametrize(
    "args, words",
    [
        (["inspect"], "surgery inspect: a TARGET is needed"),
        (["inspect", "resnet18"], "neither a spec file nor a backbone id"),
        (["inspect", "torchvision:resnet81"], "did you mean 'resnet18'"),
        (["inspect", "keras:resnet"], "unknown backbone source"),
    ],
)
def test_inspect_errors(args: list[str], words: str, capsys: pytest.CaptureFixture) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_inspect_bad_spec_in_a_subprocess(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(GOOD.replace("epochs: 4", "epocs: 4"))
    proc, _ = run_cli("inspect", str(path), "--json")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert f"{path}:16:3: train.epocs: unknown key 'epocs'" in proc.stderr


def test_inspect_piped_to_a_file_keeps_every_line_whole(tmp_path):
    """Not a terminal: nothing is cut to the (here 40) columns of a terminal with '…'."""
    proc = subprocess.run(
        [sys.executable, "-m", "surgery", "inspect", "torchvision:convnext_tiny", "--input-size", "32"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "40"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout
    deep = [line for line in proc.stdout.splitlines() if "StochasticDepth" in line]
    assert deep and all(line.rstrip().endswith("]") for line in deep)
    assert max(len(line) for line in proc.stdout.splitlines()) > 60


def test_inspect_before_the_source_run_names_the_spec_that_makes_it(tmp_path: Path, monkeypatch, capsys) -> None:
    model = "model: {backbone: 'timm:resnet10t', num_classes: 2, pretrained: %s}\n"
    (tmp_path / "maker.yaml").write_text("name: source-run\n" + model % "false")
    (tmp_path / "child.yaml").write_text(model % "'run:source-run'")
    (tmp_path / "orphan.yaml").write_text(model % "'run:nobody'")
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "child.yaml"]) == EXIT_SPEC_ERROR
    err = capsys.readouterr().err
    assert "child.yaml:1:53: model.pretrained: the run 'source-run' has not been trained yet" in err
    assert "run maker.yaml first: surgery run maker.yaml" in err
    assert main(["inspect", "orphan.yaml"]) == EXIT_SPEC_ERROR
    err = capsys.readouterr().err
    assert "run:nobody is the model.safetensors of an earlier run named 'nobody'" in err and "surgery run SPEC" in err


def test_the_resolved_spec_of_a_run_and_of_validate_loads_from_any_folder(
    tmp_path: Path, monkeypatch, capsys, one_thread
) -> None:
    import shutil

    import torch
    from PIL import Image

    project = tmp_path / "project"
    (project / "data" / "img").mkdir(parents=True)
    rows = ["path,label,split"]
    for i in range(8):
        Image.new("RGB", (32, 32), (30 * i, 0, 0)).save(project / "data" / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{'ab'[i % 2]},{'train' if i < 6 else 'val'}")
    (project / "data" / "labels.csv").write_text("\n".join(rows) + "\n")
    import timm

    torch.save(timm.create_model("resnet10t", num_classes=2).state_dict(), project / "start.pth")
    (project / "spec.yaml").write_text(
        "name: moved\nmodel: {backbone: 'timm:resnet10t', num_classes: 2, pretrained: start.pth}\n"
        "train: {epochs: 1, batch_size: 4, limit_batches: 1}\n"
        "data: {name: csv, root: data/labels.csv, image_size: 32, num_workers: 0}\n"
    )
    monkeypatch.chdir(project)
    assert main(["validate", "--show-resolved", "spec.yaml"]) == 0
    shown = capsys.readouterr().out
    assert f"root: {project / 'data' / 'labels.csv'}" in shown and f"pretrained: {project / 'start.pth'}" in shown
    assert main(["run", "spec.yaml", "--out", str(tmp_path / "runs" / "moved")]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(tmp_path / "runs" / "moved" / "spec.yaml", elsewhere / "copied.yaml")
    (elsewhere / "shown.yaml").write_text(shown)
    monkeypatch.chdir(tmp_path)  # neither the spec's folder nor the copies'
    capsys.readouterr()
    assert main(["validate", str(elsewhere / "copied.yaml"), str(elsewhere / "shown.yaml")]) == 0, (
        capsys.readouterr().err
    )
    # the run resumes from its own spec.yaml as from the spec it started with
    assert main(["run", str(elsewhere / "copied.yaml"), "--out", str(tmp_path / "runs" / "moved"), "--resume"]) == 0
