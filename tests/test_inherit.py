"""Spec inheritance (`base:`): what merges how, where every error points, relative paths, and the
resolved spec that `surgery validate --show-resolved` prints and a run keeps.

Error cases are a table of small file sets; the offending line carries a `# <-` comment, in
whichever file it sits, and the test finds it there.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from surgery.cli import main
from surgery.errors import SpecError
from surgery.spec import inherit, load_spec

MARK = "# <-"
MODEL = "model: {backbone: timm:resnet10t, num_classes: 10, pretrained: false}\n"


def _dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def _write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(_dedent(text), encoding="utf-8")


# ---------------------------------------------------------------------- merging
FAMILY = {
    "base.yaml": """
        name: base-name
        model: {backbone: timm:resnet10t, num_classes: 10, pretrained: false}
        surgery:
          - {insert: se, at: layer2}
          - {insert: cbam, at: layer3}
        train:
          epochs: 3
          batch_size: 16
          optimizer: {name: sgd, lr: 0.1}
          mixup: {mixup_alpha: 0.2}
        data: {name: digits, image_size: 32, num_workers: 0}
        """,
    "mid.yaml": """
        base: base.yaml
        train:
          optimizer: {lr: 0.05}
        """,
    "other.yaml": """
        train: {epochs: 4}
        """,
    "child.yaml": """
        base: [mid.yaml, other.yaml]
        surgery:
          - {insert: eca, at: layer4}
        train:
          optimizer: {momentum: 0.8}
          mixup: null
        """,
}


def _line(folder: Path, name: str, text: str) -> int:
    return (folder / name).read_text().splitlines().index(text) + 1


def test_mappings_merge_key_by_key_and_everything_else_is_replaced_whole(tmp_path):
    _write(tmp_path, FAMILY)
    spec = load_spec(tmp_path / "child.yaml")
    assert spec.name == "child"  # a base's name is not inherited
    assert (spec.train.optimizer.name, spec.train.optimizer.lr, spec.train.optimizer.momentum) == ("sgd", 0.05, 0.8)
    assert spec.train.epochs == 4 and spec.train.batch_size == 16  # a later base wins; keys merge at every depth
    assert spec.train.mixup is None  # null replaces a mapping
    assert [(s.insert, str(s.at[0])) for s in spec.surgery] == [("eca", "layer4")]  # lists replaced whole
    assert "base" not in spec.raw and "base" not in spec.to_yaml()
    assert load_spec(tmp_path / "child.yaml", ["train.epochs=6"]).train.epochs == 6  # --set comes last


def test_every_value_keeps_the_file_and_line_it_was_written_on(tmp_path):
    _write(tmp_path, FAMILY)
    spec = load_spec(tmp_path / "child.yaml", ["train.batch_size=8"])

    def where(*path):
        origin = spec.source.origin(path)
        return Path(origin.name).name if origin.kind == "file" else str(origin), origin.line

    assert where("train", "optimizer", "name") == (
        "base.yaml",
        _line(tmp_path, "base.yaml", "  optimizer: {name: sgd, lr: 0.1}"),
    )
    assert where("train", "optimizer", "lr") == ("mid.yaml", 3)
    assert where("train", "optimizer", "momentum") == ("child.yaml", 5)
    assert where("train", "epochs") == ("other.yaml", 1)
    assert where("surgery", 0, "insert") == ("child.yaml", 3)
    assert where("train", "batch_size") == ("--set train.batch_size=8", None)
    assert where("data", "image_size") == (
        "base.yaml",
        _line(tmp_path, "base.yaml", "data: {name: digits, image_size: 32, num_workers: 0}"),
    )


def test_a_base_named_twice_through_two_routes_is_fine(tmp_path):
    _write(tmp_path, {**FAMILY, "child.yaml": "base: [mid.yaml, base.yaml]\n"})
    spec = load_spec(tmp_path / "child.yaml")
    assert spec.train.optimizer.lr == 0.1  # base.yaml, merged again after mid.yaml, wins
    assert spec.name == "child"


def test_a_spec_given_as_a_dict_finds_its_base_in_the_working_directory(tmp_path, monkeypatch):
    _write(tmp_path, FAMILY)
    monkeypatch.chdir(tmp_path)
    spec = load_spec({"base": "mid.yaml", "train": {"epochs": 2}})
    assert (spec.train.epochs, spec.train.optimizer.lr, spec.name) == (2, 0.05, "run")


# ---------------------------------------------------------------------- errors, located
@dataclass(frozen=True)
class Case:
    id: str
    files: dict[str, str]  # name -> text; the offending line carries `# <-`
    path: str  # the key path as SpecError.path writes it
    problem: str
    spec: str = "child.yaml"
    hint: str | None = None
    overrides: tuple[str, ...] = ()
    build: bool = False  # passes load_spec; build must reject it
    marked: str = field(default="")  # the file with the `# <-` line (default: the only one that has it)


COMMON = MODEL + "train: {epochs: 2}\n"
CASES = [
    Case(
        "missing-base",
        {"common.yaml": COMMON, "child.yaml": "base: commn.yaml  # <-\n"},
        "base",
        "the base file does not exist",
        hint="'common.yaml'",
    ),
    Case(
        "missing-in-a-list",
        {"common.yaml": COMMON, "child.yaml": "base:\n  - common.yaml\n  - other.yaml  # <-\n"},
        "base[1]",
        "the base file does not exist",
    ),
    Case(
        "base-is-a-folder",
        {"common.yaml": COMMON, "sub/x.yaml": "a: 1\n", "child.yaml": "base: sub  # <-\n"},
        "base",
        "the base is not a file",
    ),
    Case(
        "base-path-too-long",
        {"child.yaml": MODEL + f"base: {'d' * 5000}.yaml  # <-\n"},
        "base",
        "the base path cannot be used: a path longer than the system allows",
    ),
    Case(
        "base-path-with-a-nul",
        {"child.yaml": MODEL + 'base: "common\\0.yaml"  # <-\n'},
        "base",
        "the base path cannot be used: a path with a NUL character",
    ),
    Case(
        "base-is-a-list",
        {"list.yaml": "- a\n- b\n", "child.yaml": MODEL + "base: list.yaml  # <-\n"},
        "base",
        "is a list, not a mapping of spec keys",
    ),
    Case(
        "base-is-empty",
        {"empty.yaml": "# nothing yet\n", "child.yaml": MODEL + "base: empty.yaml  # <-\n"},
        "base",
        "is empty, not a mapping",
    ),
    Case("base-is-a-number", {"child.yaml": MODEL + "base: 3  # <-\n"}, "base", "base takes a path or a list of paths"),
    Case(
        "base-is-a-mapping",
        {"child.yaml": MODEL + "base: {file: common.yaml}  # <-\n"},
        "base",
        "base takes a path or a list of paths",
    ),
    Case(
        "base-entry-not-a-path",
        {"common.yaml": COMMON, "child.yaml": "base: [common.yaml, 3]  # <-\n"},
        "base[1]",
        "a base is the path of a spec file",
    ),
    Case("base-empty-text", {"child.yaml": MODEL + "base: ''  # <-\n"}, "base", "a base is the path of a spec file"),
    Case(
        "cycle",
        {"a.yaml": "base: b.yaml\n", "b.yaml": MODEL + "base: a.yaml  # <-\n"},
        "base",
        "the bases form a cycle: ",
        spec="a.yaml",
    ),
    Case(
        "self-cycle", {"a.yaml": MODEL + "base: [a.yaml]  # <-\n"}, "base[0]", "the bases form a cycle", spec="a.yaml"
    ),
    Case(
        "value-in-base",
        {"common.yaml": MODEL + "train:\n  epochs: 0  # <-\n", "child.yaml": "base: common.yaml\n"},
        "train.epochs",
        "less than the minimum of 1",
    ),
    Case(
        "unknown-key-in-base",
        {"common.yaml": MODEL + "train:\n  epoch: 3  # <-\n", "child.yaml": "base: common.yaml\n"},
        "train.epoch",
        "unknown key 'epoch'",
        hint="did you mean 'epochs' or 'keep_epochs'?",
    ),
    Case(
        "yaml-in-base",
        {"common.yaml": MODEL + "train: {epochs: 3  # <-\n", "child.yaml": "base: common.yaml\n"},
        "(top level)",
        "never closed",
    ),
    Case(
        "value-in-grand-base",
        {
            "c.yaml": MODEL + "data:\n  val_split: 1.5  # <-\n",
            "b.yaml": "base: c.yaml\n",
            "child.yaml": "base: b.yaml\ntrain: {epochs: 2}\n",
        },
        "data.val_split",
        "maximum",
    ),
    Case(
        "missing-model-names-the-child",
        {"common.yaml": "train: {epochs: 2}\n", "child.yaml": "base: common.yaml  # <-\n"},
        "(top level)",
        "the required key 'model' is missing",
    ),
    Case(
        "cross-field-across-files",
        {
            "common.yaml": MODEL + "train:\n  mixup: {mixup_alpha: 0.2}\n",
            "child.yaml": "base: common.yaml\ntrain:\n  batch_size: 15  # <-\n",
        },
        "train.batch_size",
        "needs an even batch size",
    ),
    Case(
        "cross-field-in-base",
        {
            "common.yaml": MODEL + "groups:\n  - {name: all, params: '*', unfreeze_at: never}\n"
            "train:\n  mixup: {mixup_alpha: 0, cutmix_alpha: 0}  # <-\n",
            "child.yaml": "base: common.yaml\ngroups: [{name: all, params: '*'}]\n",
        },
        "train.mixup",
        "mixup and CutMix are both off",
    ),
    Case("set-base", {"child.yaml": MODEL}, "base", "base cannot be set with --set", overrides=("base=other.yaml",)),
    Case(
        "set-error-over-a-base",
        {"common.yaml": COMMON, "child.yaml": "base: common.yaml\n"},
        "train.epochs",
        "less than the minimum",
        overrides=("train.epochs=0",),
    ),
    Case(
        "pattern-in-base",
        {"common.yaml": MODEL + "surgery:\n  - insert: se\n    at: layr3  # <-\n", "child.yaml": "base: common.yaml\n"},
        "surgery[0].at",
        "matches 'layr3'",
        build=True,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_inheritance_mistakes_are_located(case: Case, tmp_path: Path) -> None:
    _write(tmp_path, case.files)
    if case.build:
        from surgery.model.builder import build

        spec = load_spec(tmp_path / case.spec, case.overrides)
        with pytest.raises(SpecError) as info:
            build(spec)
    else:
        with pytest.raises(SpecError) as info:
            load_spec(tmp_path / case.spec, case.overrides)
    err = info.value
    assert err.path == case.path, str(err)
    assert case.problem in err.problem, str(err)
    if case.hint is not None:
        assert err.hint and case.hint in err.hint, str(err)
    if case.overrides:
        assert err.file.startswith("--set ") and err.line is None, str(err)
        return
    marked = [name for name, text in case.files.items() if MARK in text]
    assert len(marked) == 1, "a case marks one line"
    text = _dedent(case.files[marked[0]])
    assert Path(err.file).resolve() == (tmp_path / marked[0]).resolve(), str(err)
    assert err.line == next(i for i, line in enumerate(text.splitlines(), 1) if MARK in line), str(err)


def test_a_cycle_names_the_whole_chain(tmp_path):
    _write(tmp_path, {"a.yaml": "base: b.yaml\n", "b.yaml": "base: c.yaml\n", "c.yaml": MODEL + "base: a.yaml\n"})
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "a.yaml")
    chain = info.value.problem.removeprefix("the bases form a cycle: ").split(" -> ")
    assert [Path(p).name for p in chain] == ["a.yaml", "b.yaml", "c.yaml", "a.yaml"]


def test_bases_of_bases_are_bounded(tmp_path):
    _write(tmp_path, {"common.yaml": COMMON, "child.yaml": "base: [" + ", ".join(["common.yaml"] * 33) + "]\n"})
    with pytest.raises(SpecError, match="the spec and its bases read more than 32 files"):
        load_spec(tmp_path / "child.yaml")


def test_the_merged_spec_is_held_to_the_size_of_one_file(tmp_path, monkeypatch):
    monkeypatch.setattr(inherit, "_MAX_VALUES", 40)  # each file alone stays below it, the two together do not
    values = "\n".join(f"  k{i}: {i}" for i in range(12))
    _write(
        tmp_path,
        {
            "a.yaml": MODEL + "args_a:\n" + values,
            "b.yaml": "args_b:\n" + values,
            "child.yaml": "base: [a.yaml, b.yaml]\n",
        },
    )
    with pytest.raises(SpecError, match="the spec and its bases together hold more than 40 values") as info:
        load_spec(tmp_path / "child.yaml")
    assert info.value.path == "base[1]"


# ---------------------------------------------------------------------- relative paths
def test_a_relative_path_is_relative_to_the_file_that_wrote_it(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import save_file

    from surgery.model.builder import build, weights_path

    weights = tmp_path / "common" / "weights" / "resnet10t.safetensors"
    weights.parent.mkdir(parents=True)
    save_file(timm.create_model("resnet10t", num_classes=10).state_dict(), str(weights))
    _write(
        tmp_path,
        {
            "common/base.yaml": """
            model: {backbone: timm:resnet10t, num_classes: 10, pretrained: weights/resnet10t.safetensors}
            data: {name: imagefolder, root: data, image_size: 32}
            """,
            "exp/child.yaml": "base: ../common/base.yaml\n",
            "exp/own-root.yaml": "base: ../common/base.yaml\ndata: {root: mine}\n",
        },
    )
    spec = load_spec(tmp_path / "exp" / "child.yaml")
    assert weights_path(spec) == tmp_path / "common" / "weights" / "resnet10t.safetensors"
    assert spec.resolve_path(spec.data.root, ("data", "root")) == tmp_path / "common" / "data"
    assert len(build(spec).report.loaded) > 0  # the base's weights, found beside the base
    own = load_spec(tmp_path / "exp" / "own-root.yaml")
    assert own.resolve_path(own.data.root, ("data", "root")) == tmp_path / "exp" / "mine"
    monkeypatch.chdir(tmp_path)
    flag = load_spec(tmp_path / "exp" / "child.yaml", ["data.root=cli"])
    assert flag.resolve_path(flag.data.root, ("data", "root")) == tmp_path / "cli"


# ---------------------------------------------------------------------- the resolved spec
TINY_BASE = """
    model: {backbone: timm:resnet10t, num_classes: 10, pretrained: false}
    train: {epochs: 1, batch_size: 16, limit_batches: 1}
    data: {name: digits, image_size: 32, num_workers: 0, subset: {train: 32, val: 32}}
    """


def test_validate_show_resolved_prints_the_resolved_spec_alone(tmp_path, capsys):
    _write(tmp_path, {"base.yaml": TINY_BASE, "child.yaml": "base: base.yaml\nsurgery: [{insert: se, at: layer4}]\n"})
    child = str(tmp_path / "child.yaml")
    assert main(["validate", child, "--show-resolved", "--set", "train.epochs=2"]) == 0
    said = capsys.readouterr()
    resolved = load_spec(child, ["train.epochs=2"])
    assert said.out == resolved.to_yaml()
    assert "ok " in said.err and "ok " not in said.out
    printed = yaml.safe_load(said.out)
    assert "base" not in printed and printed["train"]["epochs"] == 2 and printed["name"] == "child"
    elsewhere = tmp_path / "elsewhere" / "copy.yaml"  # self-contained: it loads on its own, anywhere
    elsewhere.parent.mkdir()
    elsewhere.write_text(said.out)
    assert load_spec(elsewhere).raw == resolved.raw

    assert main(["validate", child, child, "--show-resolved"]) == 0
    assert len(list(yaml.safe_load_all(capsys.readouterr().out))) == 2

    assert main(["validate", child, "--show-resolved", "--set", "train.epochs=0"]) == 2
    said = capsys.readouterr()
    assert said.out == "" and "train.epochs" in said.err


def test_a_run_of_an_inheriting_spec_keeps_the_resolved_spec_resumes_and_predicts(tmp_path, capsys, one_thread):
    from PIL import Image

    _write(tmp_path, {"base.yaml": TINY_BASE, "child.yaml": "base: base.yaml\nseed: 3\n"})
    child, out = str(tmp_path / "child.yaml"), str(tmp_path / "run")
    assert main(["run", child, "--out", out]) == 0
    kept = (tmp_path / "run" / "spec.yaml").read_text()
    assert kept == load_spec(child).to_yaml() and "base" not in yaml.safe_load(kept)
    assert main(["run", child, "--out", out, "--resume"]) == 0  # the same spec: the resume is accepted
    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "x.png")
    capsys.readouterr()
    assert main(["predict", out, str(tmp_path / "x.png"), "--json", "--topk", "2"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert len(json.loads(line)["topk"]) == 2


def test_a_base_that_is_a_named_pipe_is_refused_without_reading_it(tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.yaml")  # read, it would wait for a writer forever
    (tmp_path / "child.yaml").write_text(MODEL + "base: pipe.yaml\n")
    with pytest.raises(SpecError, match="the base is not a file") as info:
        load_spec(tmp_path / "child.yaml")
    assert info.value.found.endswith("pipe.yaml (a named pipe)") and info.value.line == 2


def test_control_characters_in_a_base_are_escaped_in_the_message(tmp_path, capsys):
    (tmp_path / "child.yaml").write_text(MODEL + 'base: "com\\0mon\\e[31m.yaml"\n')
    assert main(["validate", str(tmp_path / "child.yaml")]) == 2
    err = capsys.readouterr().err
    assert "\0" not in err and "\x1b" not in err
    assert "com\\x00mon\\x1b[31m.yaml" in err and f"{tmp_path / 'child.yaml'}:2:1: base:" in err
