"""`surgery schema --output FILE`: the schema written atomically, a clear one-line error otherwise."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from surgery import schema
from surgery.cli import main


def test_writes_the_schema_readable_and_leaves_no_temporary_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / ".surgery-schema.json"
    assert main(["schema", "--output", str(target)]) == 0
    assert json.loads(target.read_text()) == schema()
    assert os.listdir(tmp_path) == [target.name]
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    out, err = capsys.readouterr()
    assert out == "" and str(target) in err


def test_replaces_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "schema.json"
    target.write_text("stale")
    assert main(["schema", "--output", str(target)]) == 0
    assert json.loads(target.read_text()) == schema()


@pytest.mark.parametrize(
    "where",
    [
        "missing-folder/schema.json",  # the folder does not exist: nothing is created
        "a-folder",  # the target is a folder: the temporary file is removed again
    ],
)
def test_an_unwritable_path_is_one_line_and_exit_code_1(
    tmp_path: Path, capsys: pytest.CaptureFixture, where: str
) -> None:
    (tmp_path / "a-folder").mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["schema", "--output", str(tmp_path / where)]) == 1
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"error --output {tmp_path / where}: cannot write the schema: ")


def test_without_output_it_prints_the_schema(capsys: pytest.CaptureFixture) -> None:
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == schema()


def test_the_sweep_file_schema_is_published_and_shares_the_spec_s_name_rule(capsys: pytest.CaptureFixture) -> None:
    import jsonschema
    import yaml

    from surgery.sweep.file import OBJECTIVES, SAMPLERS

    assert main(["schema", "--sweep"]) == 0
    sweep = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(sweep)
    assert sweep["$ref"] == "#/$defs/sweep_file" and sweep["$defs"] == schema()["$defs"]
    top = sweep["$defs"]["sweep_file"]["properties"]
    assert top["name"]["$ref"] == schema()["properties"]["name"]["$ref"] == "#/$defs/name"  # one name pattern
    body = sweep["$defs"]["sweep"]["properties"]
    assert tuple(body["sampler"]["enum"]) == SAMPLERS and body["objective"]["enum"] == list(OBJECTIVES)
    # an editor given the schema accepts every shipped sweep file
    validator = jsonschema.Draft202012Validator(sweep)
    shipped = sorted((Path(__file__).resolve().parent.parent / "examples").rglob("sweep-*.yaml"))
    assert shipped
    for path in shipped:
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text()))), path


def test_a_sweep_and_a_spec_of_the_same_file_name_get_the_same_default_name(tmp_path: Path) -> None:
    from surgery.spec import load_spec
    from surgery.sweep.file import load_sweep

    (tmp_path / "spec").mkdir()
    (tmp_path / "spec" / "_my run!.yaml").write_text("model: {backbone: 'timm:resnet10t', pretrained: false}\n")
    (tmp_path / "_my run!.yaml").write_text("spec: 'spec/_my run!.yaml'\nsweep: {axes: {seed: [0, 1]}}\n")
    assert (
        load_sweep(tmp_path / "_my run!.yaml").name == load_spec(tmp_path / "spec" / "_my run!.yaml").name == "my-run-"
    )
