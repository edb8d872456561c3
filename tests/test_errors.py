"""SpecError: every malformed spec is reported at the right line and key path, with a suggestion.

The corpus is a table. Each case is YAML text whose offending line carries a `# <-` comment; the
test finds that line, so editing a case never leaves a stale line number behind. Cases marked
`build` pass `load_spec` and must fail in `build`, against the real model.
"""

from __future__ import annotations

import pickle
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from surgery.errors import SpecError, close_matches, did_you_mean, format_path
from surgery.spec import load_spec

MARK = "# <-"

# A valid, tiny model: resnet18 with 10 classes, probed at 32 px (about a second to build).
HEAD = """\
model:
  backbone: torchvision:resnet18
  num_classes: 10
data:
  image_size: 32
"""


@dataclass(frozen=True)
class Case:
    id: str
    text: str
    path: str  # the key path as SpecError.path writes it
    hint: str | None = None  # a substring of err.hint
    problem: str | None = None  # a substring of err.problem
    build: bool = False  # passes load_spec; build must reject it
    overrides: tuple[str, ...] = ()  # the error then sits in the --set text, not in the file


def yaml(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


CASES = [
    # ------------------------------------------------------------------ YAML itself
    Case(
        "tab-indentation",
        "model:\n\tbackbone: torchvision:resnet18  # <-\n",
        "(top level)",
        hint="spaces",
        problem="not valid YAML",
    ),
    Case(
        "unclosed-bracket",
        yaml("""
        model: {backbone: torchvision:resnet18  # <-
        train:
          epochs: 3
        """),
        "(top level)",
        problem="never closed",
    ),
    Case(
        "unclosed-quote",
        yaml("""
        model:
          backbone: 'torchvision:resnet18  # <-
        train:
          epochs: 3
        """),
        "(top level)",
        problem="never closed",
    ),
    Case(
        "unquoted-star",
        HEAD
        + yaml("""
        groups:
          - name: all
            params: *  # <-
        """),
        "(top level)",
        hint="quote it",
    ),
    Case(
        "unquoted-at",
        HEAD
        + yaml("""
        surgery:
          - insert: se
            at: @head  # <-
        """),
        "(top level)",
        hint="quote it",
    ),
    Case(
        "duplicate-key",
        yaml("""
        model:
          backbone: torchvision:resnet18
          backbone: timm:resnet18  # <-
        """),
        "model.backbone",
        problem="appears twice",
    ),
    Case("empty-file", "# <- nothing but a comment\n", "(top level)", problem="empty"),
    Case(
        "top-level-list",
        yaml("""
        - model  # <-
        - train
        """),
        "(top level)",
        problem="mapping",
    ),
    Case(
        "python-object-tag",
        yaml("""
        model: !!python/object/apply:os.system ["echo owned"]  # <-
        """),
        "model",
        problem="tag",
    ),
    Case(
        "custom-tag",
        HEAD
        + yaml("""
        train:
          epochs: !big 3  # <-
        """),
        "train.epochs",
        problem="tag",
    ),
    Case(
        "recursive-alias",
        yaml("""
        model: &m
          backbone: torchvision:resnet18
          args: *m  # <-
        """),
        "model.args",
        problem="alias",
    ),
    # ------------------------------------------------------------------ required keys, backbone names
    Case(
        "missing-model",
        yaml("""
        train:  # <-
          epochs: 3
        """),
        "(top level)",
        problem="'model' is missing",
    ),
    Case(
        "missing-model-misspelt",
        yaml("""
        modle:  # <-
          backbone: torchvision:resnet18
        """),
        "modle",
        hint="'model'",
    ),
    Case(
        "missing-backbone",
        yaml("""
        model:  # <-
          pretrained: false
        """),
        "model",
        problem="'backbone' is missing",
    ),
    Case(
        "backbone-without-source",
        yaml("""
        model:
          backbone: resnet18  # <-
        """),
        "model.backbone",
        hint="torchvision:resnet18",
    ),
    Case(
        "unknown-source",
        yaml("""
        model:
          backbone: keras:resnet  # <-
        """),
        "model.backbone",
        problem="'keras'",
    ),
    Case(
        "misspelt-source",
        yaml("""
        model:
          backbone: torchvison:resnet18  # <-
        """),
        "model.backbone",
        hint="'torchvision'",
    ),
    Case(
        "torchvision-resnet81",
        yaml("""
        model:
          backbone: torchvision:resnet81  # <-
        """),
        "model.backbone",
        hint="'resnet18'",
        build=True,
    ),
    Case(
        "timm-efficientnet-b9",
        yaml("""
        model:
          backbone: timm:efficientnet_b9  # <-
        """),
        "model.backbone",
        hint="'efficientnet_b",
        build=True,
    ),
    Case(
        "torchvision-weights-tag",
        yaml("""
        model:
          backbone: torchvision:resnet18.IMAGENET1K_V9  # <-
        """),
        "model.backbone",
        hint="IMAGENET1K_V1",
        build=True,
    ),
    Case(
        "backbone-constructor-args",
        HEAD.replace("  num_classes: 10\n", "  num_classes: 10\n  args: {widht: 2}  # <-\n"),
        "model.args",
        problem="rejected",
        build=True,
    ),
    # ------------------------------------------------------------------ unknown keys
    Case(
        "unknown-top-level-key",
        HEAD
        + yaml("""
        surgrey:  # <-
          - insert: cbam
            at: layer1
        """),
        "surgrey",
        hint="'surgery'",
    ),
    Case(
        "unknown-train-key",
        HEAD
        + yaml("""
        train:
          epocs: 3  # <-
        """),
        "train.epocs",
        hint="'epochs'",
    ),
    Case(
        "unknown-model-key",
        yaml("""
        model:
          backbone: torchvision:resnet18
          pretrianed: false  # <-
        """),
        "model.pretrianed",
        hint="'pretrained'",
    ),
    Case(
        "unknown-surgery-key",
        HEAD
        + yaml("""
        surgery:
          - insert: cbam
            at: layer1
            positon: before  # <-
        """),
        "surgery[0].positon",
        hint="'position'",
    ),
    Case(
        "unknown-type-selector-key",
        HEAD
        + yaml("""
        surgery:
          - insert: cbam
            at: {typ: MaxPool2d}  # <-
        """),
        "surgery[0].at.typ",
        hint="'type'",
    ),
    Case(
        "first-error-in-the-file-wins",
        HEAD
        + yaml("""
        train:
          epocs: 3  # <-
        surgery:
          - insert: cbam
            at: layer1
            position: afterr
        """),
        "train.epocs",
        hint="'epochs'",
    ),
    # ------------------------------------------------------------------ wrong kinds and ranges
    Case(
        "num-classes-twelve",
        yaml("""
        model:
          backbone: torchvision:resnet18
          num_classes: twelve  # <-
        """),
        "model.num_classes",
        problem="integer",
    ),
    Case(
        "epochs-zero",
        HEAD
        + yaml("""
        train:
          epochs: 0  # <-
        """),
        "train.epochs",
        problem="minimum",
    ),
    Case(
        "negative-lr",
        HEAD
        + yaml("""
        train:
          optimizer:
            lr: -1  # <-
        """),
        "train.optimizer.lr",
        problem="minimum",
    ),
    Case(
        "lr-as-text",
        HEAD
        + yaml("""
        groups:
          - name: all
            params: '*'
            lr: fast  # <-
        """),
        "groups[0].lr",
        problem="not a string",
    ),
    Case(
        "image-size-too-small",
        yaml("""
        model:
          backbone: torchvision:resnet18
        data:
          image_size: 4  # <-
        """),
        "data.image_size",
        problem="minimum",
    ),
    Case("bad-run-name", HEAD + 'name: "my run"  # <-\n', "name", problem="not a valid name"),
    Case(
        "bad-module-pattern",
        HEAD
        + yaml("""
        surgery:
          - insert: cbam
            at: layer1/0  # <-
        """),
        "surgery[0].at",
        problem="not a valid",
    ),
    Case(
        "surgery-entry-not-a-mapping",
        HEAD
        + yaml("""
        surgery:
          - cbam  # <-
        """),
        "surgery[0]",
        problem="an entry of surgery takes a mapping",
    ),
    Case(
        "empty-target-list",
        HEAD
        + yaml("""
        surgery:
          - insert: cbam
            at: []  # <-
        """),
        "surgery[0].at",
        problem="at least 1",
    ),
    Case("no-groups", HEAD + "groups: []  # <-\n", "groups", problem="at least 1"),
    Case(
        "group-without-params",
        HEAD
        + yaml("""
        groups:
          - name: all  # <-
            lr: 1.0e-3
        """),
        "groups[0]",
        problem="'params' is missing",
    ),
    # ------------------------------------------------------------------ choices
    Case(
        "position-afterr",
        HEAD
        + yaml("""
        surgery:
          - insert: cbam
            at: layer1
            position: afterr  # <-
        """),
        "surgery[0].position",
        hint="'after'",
    ),
    Case(
        "init-zero",
        HEAD
        + yaml("""
        surgery:
          - insert: cbam
            at: layer1
            init: zero  # <-
        """),
        "surgery[0].init",
        problem="not an accepted value",
    ),
    Case(
        "scheduler-cosin",
        HEAD
        + yaml("""
        train:
          scheduler:
            name: cosin  # <-
        """),
        "train.scheduler.name",
        hint="'cosine'",
    ),
    Case(
        "unfreeze-at-nevr",
        HEAD
        + yaml("""
        groups:
          - name: all
            params: '*'
            unfreeze_at: nevr  # <-
        """),
        "groups[0].unfreeze_at",
        hint="'never'",
    ),
    Case("augment-standrd", HEAD + "  augment: standrd  # <-\n", "data.augment", hint="'standard'"),
    # ------------------------------------------------------------------ rules across keys
    Case(
        "lr-map-not-from-zero",
        HEAD
        + yaml("""
        groups:
          - name: all
            params: '*'
            lr: {2: 1.0e-3, 5: 1.0e-4}  # <-
        """),
        "groups[0].lr",
        problem="epoch 0",
    ),
    Case(
        "lr-map-keys-not-epochs",
        HEAD
        + yaml("""
        groups:
          - name: all
            params: '*'
            lr:
              0: 1.0e-3
              late: 1.0e-4  # <-
        """),
        "groups[0].lr.late",
        problem="not an epoch",
    ),
    Case(
        "lr-map-negative-value",
        HEAD
        + yaml("""
        groups:
          - name: all
            params: '*'
            lr:
              0: 1.0e-3
              5: -1.0e-4  # <-
        """),
        "groups[0].lr.5",
        problem="minimum",
    ),
    Case(
        "nothing-ever-trains",
        HEAD
        + yaml("""
        groups:  # <-
          - name: all
            params: '*'
            unfreeze_at: never
        """),
        "groups",
        problem="no group ever trains",
    ),
    Case(
        "duplicate-group-names",
        HEAD
        + yaml("""
        groups:
          - name: head
            params: fc
          - name: head  # <-
            params: '*'
        """),
        "groups[1].name",
        hint="groups[0]",
    ),
    Case(
        "key-map-order-without-file",
        yaml("""
        model:
          backbone: torchvision:resnet18
          key_map: order  # <-
        """),
        "model.key_map",
        problem="weight file",
    ),
    Case(
        "key-map-rules-without-file",
        yaml("""
        model:
          backbone: torchvision:resnet18
          key_map: {'^backbone\\.': ''}  # <-
        """),
        "model.key_map",
        problem="weight file",
    ),
    # ------------------------------------------------------------------ against the real model
    Case(
        "target-layer5",
        HEAD
        + yaml("""
        surgery:
          - insert: cbam
            at: layer5  # <-
        """),
        "surgery[0].at",
        hint="'layer4'",
        build=True,
    ),
    Case(
        "target-layr1-in-a-list",
        HEAD
        + yaml("""
        surgery:
          - insert: cbam
            at:
              - layer2
              - layr1  # <-
        """),
        "surgery[0].at[1]",
        hint="'layer1'",
        build=True,
    ),
    Case(
        "target-type-absent",
        HEAD
        + yaml("""
        surgery:
          - insert: se
            at: {type: MaxPool3d}  # <-
        """),
        "surgery[0].at",
        hint="'MaxPool2d'",
        build=True,
    ),
    Case(
        "target-inserted-selector",
        HEAD
        + yaml("""
        surgery:
          - insert: se
            at: '@inserted'  # <-
        """),
        "surgery[0].at",
        problem="modules of the backbone",
        build=True,
    ),
    Case(
        "attention-cbma",
        HEAD
        + yaml("""
        surgery:
          - insert: cbma  # <-
            at: layer1
        """),
        "surgery[0].insert",
        hint="'cbam'",
        build=True,
    ),
    Case(
        "attention-class-not-importable",
        HEAD
        + yaml("""
        surgery:
          - insert: no_such_package.attention:Gate  # <-
            at: layer1
        """),
        "surgery[0].insert",
        problem="cannot import",
        build=True,
    ),
    Case(
        "attention-bad-args",
        HEAD
        + yaml("""
        surgery:
          - insert: cbam
            at: layer1
            args: {rd_ratioo: 0.25}  # <-
        """),
        "surgery[0].args",
        problem="rd_ratioo",
        build=True,
    ),
    Case(
        "target-not-4d-after",
        HEAD
        + yaml("""
        surgery:
          - insert: cbam
            at: fc  # <-
        """),
        "surgery[0].at",
        problem="not a 4-D feature map",
        build=True,
    ),
    Case(
        "target-not-4d-before",
        HEAD
        + yaml("""
        surgery:
          - insert: se
            at: fc  # <-
            position: before
        """),
        "surgery[0].at",
        problem="input of fc",
        build=True,
    ),
    Case(
        "group-pattern-matches-nothing",
        HEAD
        + yaml("""
        groups:
          - name: head
            params: fc
          - name: body
            params: [layr2, layer3]  # <-
        """),
        "groups[1].params[0]",
        hint="'layer2'",
        build=True,
    ),
    Case(
        "group-type-matches-nothing",
        HEAD
        + yaml("""
        groups:
          - name: norms
            params: {type: BatchNorm3d}  # <-
          - name: rest
            params: '*'
        """),
        "groups[0].params",
        hint="'BatchNorm2d'",
        build=True,
    ),
    Case(
        "group-inserted-without-surgery",
        HEAD
        + yaml("""
        groups:
          - name: new
            params: '@inserted'  # <-
          - name: rest
            params: '*'
        """),
        "groups[0].params",
        problem="'@inserted' selects nothing",
        build=True,
    ),
    Case(
        "parameters-in-no-group",
        HEAD
        + yaml("""
        groups:  # <-
          - name: head
            params: fc
          - name: deep
            params: [layer3, layer4]
        """),
        "groups",
        hint="catch-all",
        build=True,
    ),
    Case(
        "empty-group",
        HEAD
        + yaml("""
        groups:
          - name: all
            params: '*'
          - name: head
            params: fc  # <-
        """),
        "groups[1].params",
        hint="before the broader one",
        build=True,
    ),
    Case(
        "weights-file-missing",
        HEAD.replace("  num_classes: 10\n", "  num_classes: 10\n  pretrained: weights/missing.pth  # <-\n"),
        "model.pretrained",
        problem="does not exist",
        build=True,
    ),
    Case(
        "weights-wrong-shape",
        HEAD.replace("  num_classes: 10\n", "  num_classes: 10\n  pretrained: @WRONG@  # <-\n"),
        "model.pretrained",
        problem="another shape",
        build=True,
    ),
    Case(
        "weights-not-a-state-dict",
        HEAD.replace("  num_classes: 10\n", "  num_classes: 10\n  pretrained: @GARBAGE@  # <-\n"),
        "model.pretrained",
        problem="cannot be read",
        build=True,
    ),
    Case(
        "checkpoint-key-absent",
        HEAD.replace("  num_classes: 10\n", "  num_classes: 10\n  pretrained: @WRONG@\n  checkpoint_key: ema  # <-\n"),
        "model.checkpoint_key",
        problem="no entry 'ema'",
        build=True,
    ),
    # ------------------------------------------------------------------ --set overrides
    # ------------------------------------------------------------------ recipes for small datasets
    Case(
        "mixup-both-alphas-zero",
        HEAD
        + yaml("""
        train:
          mixup: {mixup_alpha: 0, cutmix_alpha: 0}  # <-
        """),
        "train.mixup",
        problem="both off",
    ),
    Case(
        "mixup-smoothing-twice",
        HEAD
        + yaml("""
        train:
          label_smoothing: 0.1  # <-
          mixup: {label_smoothing: 0.1}
        """),
        "train.label_smoothing",
        hint="train.mixup.label_smoothing",
    ),
    Case(
        "mixup-odd-batch",
        HEAD
        + yaml("""
        train:
          batch_size: 7  # <-
          mixup: {}
        """),
        "train.batch_size",
        problem="even batch size",
    ),
    Case(
        "mixup-misspelt-key",
        HEAD
        + yaml("""
        train:
          mixup: {mixup_alpah: 0.2}  # <-
        """),
        "train.mixup.mixup_alpah",
        hint="'mixup_alpha'",
    ),
    Case(
        "erasing-mode-typo",
        HEAD + "  augment: {erasing: {mode: pixl}}  # <-\n",
        "data.augment.erasing.mode",
        hint="'pixel'",
    ),
    Case(
        "accumulate-zero",
        HEAD
        + yaml("""
        train:
          accumulate: 0  # <-
        """),
        "train.accumulate",
        problem="minimum",
    ),
    Case("set-epochs-zero", HEAD, "train.epochs", problem="minimum", overrides=("train.epochs=0",)),
    Case("set-misspelt-key", HEAD, "train.epocs", hint="'epochs'", overrides=("train.epocs=3",)),
    Case("set-not-yaml", HEAD, "surgery", problem="not valid YAML", overrides=("surgery=[{insert: se",)),
    Case(
        "set-unquoted-star",
        HEAD,
        "groups[0].params",
        hint="quote it",
        overrides=("groups.0.name=all", "groups.0.params=*"),
    ),
    Case("set-without-equals", HEAD, "(top level)", problem="key.path=value", overrides=("train.epochs",)),
    Case(
        "set-below-a-value",
        HEAD,
        "model.backbone",
        problem="neither a mapping nor a list",
        overrides=("model.backbone.depth=3",),
    ),
    Case("set-past-list-end", HEAD, "surgery[2]", problem="past its end", overrides=("surgery.2.insert=se",)),
    Case(
        "set-bad-entry",
        HEAD,
        "surgery[0].position",
        hint="'after'",
        overrides=("surgery=[{insert: se, at: layer1}]", "surgery.0.position=aftr"),
    ),
    Case(
        "set-target-layer5",
        HEAD,
        "surgery[0].at",
        hint="'layer4'",
        build=True,
        overrides=("surgery.0.insert=se", "surgery.0.at=layer5"),
    ),
]


def test_the_corpus_is_large_and_distinct() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)
    assert len({(c.text, c.overrides) for c in CASES}) == len(CASES)


def marked_line(text: str) -> int | None:
    lines = [i for i, line in enumerate(text.splitlines(), 1) if MARK in line]
    assert len(lines) <= 1, "a case marks one line"
    return lines[0] if lines else None


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch
    import torchvision

    folder = tmp_path_factory.mktemp("weights")
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)  # 7x7 in resnet18
    wrong = folder / "wrong.pth"
    torch.save(state, wrong)
    garbage = folder / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    return {"@WRONG@": wrong, "@GARBAGE@": garbage}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_spec(case: Case, tmp_path: Path, weight_files: dict[str, Path]) -> None:
    text = case.text
    for placeholder, path in weight_files.items():
        text = text.replace(placeholder, str(path))
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(text, encoding="utf-8")

    if case.build:
        from surgery.model.builder import build

        spec = load_spec(spec_file, case.overrides)  # valid as far as the schema can tell
        with pytest.raises(SpecError) as info:
            build(spec)
    else:
        with pytest.raises(SpecError) as info:
            load_spec(spec_file, case.overrides)
    err = info.value

    assert isinstance(err, ValueError)
    assert err.path == case.path, str(err)
    if case.overrides:
        assert err.line is None
        assert err.file.startswith("--set "), str(err)
        assert err.file[len("--set ") :] in case.overrides
    else:
        assert err.file == str(spec_file)
        assert err.line == marked_line(text), str(err)
        assert err.column is not None and err.column >= 1
    if case.hint is not None:
        assert err.hint and case.hint in err.hint, str(err)
    if case.problem is not None:
        assert case.problem in err.problem, str(err)
    # the message is short and names where to look
    message = str(err)
    named = err.location + ": " + (err.path + ": " if err.key_path or err.line else "")
    assert message.startswith(named + err.problem)
    assert len(message.splitlines()) <= 12


def test_key_path_is_a_tuple_as_well() -> None:
    with pytest.raises(SpecError) as info:
        load_spec(
            {
                "model": {"backbone": "torchvision:resnet18"},
                "surgery": [{"insert": "se", "at": "layer1", "position": "afterr"}],
            }
        )
    assert info.value.key_path == ("surgery", 0, "position")
    assert info.value.path == "surgery[0].position"


# ---------------------------------------------------------------------- specs given as dicts
DICT_CASES = [
    ({"model": {"backbone": "torchvision:resnet18", "pretrianed": False}}, "model.pretrianed", "'pretrained'"),
    ({"model": {"backbone": "resnet18"}}, "model.backbone", "torchvision:resnet18"),
    ({"model": {"backbone": "torchvision:resnet18"}, "train": {"epochs": 0}}, "train.epochs", None),
    (
        {
            "model": {"backbone": "torchvision:resnet18"},
            "surgery": [{"insert": "se", "at": "layer1", "position": "afterr"}],
        },
        "surgery[0].position",
        "'after'",
    ),
    (
        {
            "model": {"backbone": "torchvision:resnet18"},
            "groups": [{"name": "a", "params": "*"}, {"name": "a", "params": "fc"}],
        },
        "groups[1].name",
        "groups[0]",
    ),
    ({"train": {"epochs": 3}}, "(top level)", None),
]


@pytest.mark.parametrize("data, path, hint", DICT_CASES, ids=[c[1] for c in DICT_CASES])
def test_dict_spec_errors_carry_the_key_path_and_no_line(data: dict, path: str, hint: str | None) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(data)
    err = info.value
    assert err.line is None and err.column is None and err.file is None
    assert err.path == path
    if hint:
        assert hint in err.hint
    assert str(err).startswith(f"<spec>: {path}: ")


def test_dict_spec_semantic_error_carries_the_key_path() -> None:
    from surgery.model.builder import build

    spec = load_spec(
        {
            "model": {"backbone": "torchvision:resnet18", "num_classes": 10},
            "data": {"image_size": 32},
            "surgery": [{"insert": "cbam", "at": ["layer1", "layr2"]}],
        }
    )
    with pytest.raises(SpecError) as info:
        build(spec)
    assert info.value.line is None
    assert info.value.key_path == ("surgery", 0, "at", 1)
    assert "'layer2'" in info.value.hint


def test_dict_spec_is_not_modified() -> None:
    data = {"model": {"backbone": "torchvision:resnet18"}}
    load_spec(data)
    assert data == {"model": {"backbone": "torchvision:resnet18"}}


# ---------------------------------------------------------------------- the error type itself
def test_missing_spec_file_suggests_a_neighbour(tmp_path: Path) -> None:
    (tmp_path / "resnet18-cbam.yaml").write_text(HEAD)
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "resnet18-cbma.yaml")
    assert "does not exist" in info.value.problem
    assert "resnet18-cbam.yaml" in info.value.hint


def test_error_fields_and_message() -> None:
    err = SpecError(
        "the value is wrong",
        path=("surgery", 1, "at"),
        found="layr1",
        expected="a module path",
        hint="did you mean 'layer1'?",
        file="spec.yaml",
        line=7,
        column=5,
    )
    assert isinstance(err, ValueError)
    assert (err.file, err.line, err.column, err.path, err.key_path) == (
        "spec.yaml",
        7,
        5,
        "surgery[1].at",
        ("surgery", 1, "at"),
    )
    assert str(err).splitlines() == [
        "spec.yaml:7:5: surgery[1].at: the value is wrong",
        "  found:    layr1",
        "  expected: a module path",
        "  hint:     did you mean 'layer1'?",
    ]


def test_error_survives_pickling() -> None:
    err = SpecError("bad", path=("train", "epochs"), found="0", file="a.yaml", line=3, column=3)
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, SpecError)
    assert (again.path, again.line, again.found, str(again)) == (err.path, err.line, err.found, str(err))


@pytest.mark.parametrize(
    "parts, text",
    [
        ((), "(top level)"),
        (("model",), "model"),
        (("surgery", 1, "at"), "surgery[1].at"),
        (("groups", 0, "params", 2), "groups[0].params[2]"),
        (("groups", 0, "lr", "5"), "groups[0].lr.5"),
    ],
)
def test_format_path(parts: tuple, text: str) -> None:
    assert format_path(parts) == text


def test_suggestions() -> None:
    assert close_matches("resnet81", ["resnet18", "resnet34", "vgg11"])[0] == "resnet18"
    assert did_you_mean("surgrey", ["surgery", "seed"]) == "did you mean 'surgery'?"
    assert did_you_mean("zzzz", ["surgery", "seed"]) is None


def test_control_characters_in_any_part_of_a_message_are_escaped() -> None:
    err = SpecError(
        "no class named 'a\x1b[2Jb'",
        file="spec\x00.yaml",
        line=3,
        found="'\u202egnp.exe'",
        expected="a\tname",
        hint="x\x07",
    )
    text = str(err)
    assert all(c == "\n" or c.isprintable() for c in text), repr(text)
    assert "spec\\x00.yaml:3" in text and "a\\x1b[2Jb" in text and "\\u202egnp.exe" in text
    assert "a\\tname" in text and "x\\x07" in text
