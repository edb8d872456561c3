"""surgery.spec: YAML with line marks, the JSON Schema, defaults, overrides, the typed Spec."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surgery.errors import SpecError
from surgery.spec import Spec, load_spec, parse_yaml, schema

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = "model:\n  backbone: torchvision:resnet18\n"

FULL = """\
name: full-example
seed: 3
model:
  backbone: torchvision:resnet18
  num_classes: 10
surgery:
  - insert: cbam
    at: [layer3, layer4]
    args: {rd_ratio: 0.25}
  - insert: eca
    at: {type: MaxPool2d}
    position: before
    init: default
groups:
  - name: new
    params: '@inserted'
    lr: 1e-3
  - name: head
    params: '@head'
    lr: {0: 1.0e-3, 4: 1.0e-4}
  - name: backbone
    params: '*'
    lr: 1e-4
    unfreeze_at: 2
    norm: train
train:
  epochs: 6
  batch_size: 8
  optimizer: {name: sgd, lr: 0.01, momentum: 0.8}
  scheduler: {name: multistep, milestones: [3, 5], gamma: 0.5}
data:
  name: fake
  image_size: 32
  augment: {hflip: 0.5, crop: true}
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# ---------------------------------------------------------------------- defaults
def test_only_model_is_required(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL, "my-first-run.yaml"))
    assert isinstance(spec, Spec)
    assert spec.name == "my-first-run"
    assert spec.model.backbone == "torchvision:resnet18"
    assert (spec.model.source, spec.model.arch) == ("torchvision", "resnet18")
    assert spec.model.pretrained is False and spec.model.num_classes is None
    assert spec.surgery == ()
    # one group for every parameter, trainable from the start, at the optimizer's lr
    assert spec.default_groups
    [group] = spec.groups
    assert group.name == "all"
    assert [str(s) for s in group.params] == ["*"]
    assert group.unfreeze_at == 0 and group.trainable(0)
    assert group.lr == ((0, spec.train.optimizer.lr),)
    assert spec.raw["groups"][0]["name"] == "all"
    # train and data sections are filled from the schema's defaults
    train_defaults = schema()["$defs"]["train"]["properties"]
    assert spec.train.epochs == train_defaults["epochs"]["default"]
    assert spec.train.batch_size == train_defaults["batch_size"]["default"]
    assert spec.train.optimizer.name == "adamw"
    assert spec.train.scheduler.name == "none"
    assert spec.data.image_size == schema()["$defs"]["data"]["properties"]["image_size"]["default"]
    assert spec.seed == 0 and spec.raw["version"] == 1


def test_every_default_is_valid_against_the_schema() -> None:
    import jsonschema

    spec = load_spec({"model": {"backbone": "timm:resnet18"}})
    jsonschema.Draft202012Validator(schema()).validate(json.loads(json.dumps(spec.raw)))


@pytest.mark.parametrize(
    "file_name, name",
    [
        ("resnet18 cbam (v2).yaml", "resnet18-cbam--v2-"),
        (".hidden.yaml", "hidden"),
        ("a.b.yml", "a.b"),
    ],
)
def test_name_comes_from_the_file_name(tmp_path: Path, file_name: str, name: str) -> None:
    assert load_spec(write(tmp_path, MINIMAL, file_name)).name == name


def test_name_of_a_dict_spec_and_an_explicit_name(tmp_path: Path) -> None:
    assert load_spec({"model": {"backbone": "timm:resnet18"}}).name == "run"
    assert load_spec(write(tmp_path, "name: mine\n" + MINIMAL, "other.yaml")).name == "mine"


def test_full_spec_is_typed(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, FULL))
    assert spec.name == "full-example" and spec.seed == 3
    assert [s.insert for s in spec.surgery] == ["cbam", "eca"]
    assert [str(s) for s in spec.surgery[0].at] == ["layer3", "layer4"]
    assert spec.surgery[0].at[1].where == ("surgery", 0, "at", 1)
    assert str(spec.surgery[1].at[0]) == "{type: MaxPool2d}" and spec.surgery[1].at[0].type == "MaxPool2d"
    assert (spec.surgery[1].position, spec.surgery[1].init) == ("before", "default")
    assert dict(spec.surgery[0].args) == {"rd_ratio": 0.25}
    new, head, backbone = spec.groups
    assert new.lr == ((0, 1e-3),)
    assert head.lr == ((0, 1e-3), (4, 1e-4)) and head.base_lr(3) == 1e-3 and head.base_lr(4) == 1e-4
    assert backbone.unfreeze_at == 2 and not backbone.trainable(1) and backbone.trainable(2)
    assert backbone.norm == "train" and new.norm == "frozen"
    assert not spec.default_groups


def test_frozen(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL))
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]


# ---------------------------------------------------------------------- YAML details
@pytest.mark.parametrize(
    "text, value",
    [
        ("1e-3", 1e-3),
        ("1E-3", 1e-3),
        ("5e-4", 5e-4),
        ("-2e-5", -2e-5),
        ("+1e2", 100.0),
        ("1.0e-3", 1e-3),
        ("0.001", 1e-3),
        ("3", 3),
    ],
)
def test_exponent_without_a_dot_is_a_float(text: str, value: float) -> None:
    data, _ = parse_yaml(f"lr: {text}\n", "t.yaml")
    assert data["lr"] == value and type(data["lr"]) is type(value)


def test_pyyaml_alone_reads_1e_minus_3_as_text() -> None:
    assert yaml.safe_load("lr: 1e-3")["lr"] == "1e-3"  # why spec.py adds a resolver


def test_lr_written_1e_minus_4_validates(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL + "train:\n  optimizer:\n    lr: 1e-4\n"))
    assert spec.train.optimizer.lr == pytest.approx(1e-4)


def test_marks_point_at_keys(tmp_path: Path) -> None:
    _, marks = parse_yaml(FULL, "f.yaml")
    lines = FULL.splitlines()
    for path, needle in [
        (("model", "num_classes"), "num_classes"),
        (("surgery", 1, "position"), "position: before"),
        (("groups", 2, "unfreeze_at"), "unfreeze_at"),
    ]:
        _, line, column = marks[path]
        assert lines[line - 1].strip().startswith(needle)
        assert lines[line - 1][column - 1 :].startswith(needle.split(":")[0])


def test_anchors_and_merge_keys(tmp_path: Path) -> None:
    spec = load_spec(
        write(
            tmp_path,
            """\
        model:
          backbone: torchvision:resnet18
          num_classes: 10
        surgery:
          - insert: se
            at: &deep [layer3, layer4]
            args: &se_args {rd_ratio: 0.25}
          - insert: eca
            at: *deep
            position: before
        groups:
          - &slow
            name: deep
            params: *deep
            lr: 1.0e-4
            unfreeze_at: 1
          - <<: *slow
            name: rest
            params: '*'
          - name: unused-but-valid
            params: fc
        train:
          epochs: 4
        """,
        )
    )
    assert [str(s) for s in spec.surgery[1].at] == ["layer3", "layer4"]
    deep, rest, _ = spec.groups
    assert (rest.lr, rest.unfreeze_at) == (deep.lr, deep.unfreeze_at) == (((0, 1e-4),), 1)
    assert [str(s) for s in rest.params] == ["*"]


def test_merged_keys_are_validated_like_any_key(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(
            write(
                tmp_path,
                """\
            model:
              backbone: torchvision:resnet18
            groups:
              - &base
                name: a
                params: fc
                unfreez_at: 1
              - <<: *base
                name: b
                params: '*'
            """,
            )
        )
    assert info.value.path == "groups[0].unfreez_at" and info.value.line == 7


@pytest.mark.parametrize(
    "tagged",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object/new:pathlib.Path ['{marker}']",
        "!!python/name:os.system",
        "!!binary aGVsbG8=",
        "!!set {a, b}",
        "!custom thing",
    ],
)
def test_no_object_construction(tmp_path: Path, tagged: str) -> None:
    marker = tmp_path / "constructed"
    path = write(tmp_path, MINIMAL + "  args:\n    x: " + tagged.replace("{marker}", str(marker)) + "\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "tag" in info.value.problem
    assert info.value.path == "model.args.x" and info.value.line == 4
    assert not marker.exists()


def test_yaml_aliases_cannot_blow_up(tmp_path: Path) -> None:
    rows = ["    a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for prev, name in zip("abcdefg", "bcdefgh"):
        rows.append(f"    {name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    path = write(tmp_path, MINIMAL + "  args:\n" + "\n".join(rows) + "\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "expands" in info.value.problem


# ---------------------------------------------------------------------- round trip
@pytest.mark.parametrize("text", [MINIMAL, FULL], ids=["minimal", "full"])
def test_to_yaml_round_trips(tmp_path: Path, text: str) -> None:
    first = load_spec(write(tmp_path, text, "first.yaml"))
    again = load_spec(write(tmp_path, first.to_yaml(), "second.yaml"))
    assert again.raw == first.raw
    assert again.groups == first.groups
    assert again.surgery == tuple(
        type(s)(s.insert, tuple(type(a)(a.pattern, a.type, a.where) for a in s.at), s.position, s.init, s.args, s.index)
        for s in first.surgery
    )
    # and the dumped text is itself plain YAML (no tags, no Python objects)
    assert "!!" not in first.to_yaml()


def test_to_yaml_of_a_dict_spec_round_trips(tmp_path: Path) -> None:
    first = load_spec(
        {
            "model": {"backbone": "timm:resnet18"},
            "groups": [{"name": "head", "params": "@head", "lr": {0: 1e-3, 2: 1e-4}}, {"name": "rest", "params": "*"}],
        }
    )
    again = load_spec(write(tmp_path, first.to_yaml()))
    assert again.groups == first.groups
    assert json.loads(json.dumps(again.raw)) == json.loads(json.dumps(first.raw))


# ---------------------------------------------------------------------- overrides
def test_override_scalar(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, FULL), ["train.epochs=8", "train.optimizer.lr=5e-3", "model.pretrained=false"])
    assert spec.train.epochs == 8
    assert spec.train.optimizer.lr == 5e-3
    assert spec.model.pretrained is False


def test_override_lists_and_mappings(tmp_path: Path) -> None:
    spec = load_spec(
        write(tmp_path, MINIMAL),
        [
            "surgery=[{insert: se, at: [layer1, layer2]}]",
            "data.classes=[cat, dog]",
            "train.scheduler={name: cosine, warmup_epochs: 1}",
        ],
    )
    assert [str(s) for s in spec.surgery[0].at] == ["layer1", "layer2"]
    assert list(spec.data.classes) == ["cat", "dog"]
    assert spec.train.scheduler.name == "cosine" and spec.train.scheduler.warmup_epochs == 1
    assert spec.train.scheduler.gamma == 0.1  # defaults still filled below an overridden mapping


def test_override_creates_nested_keys(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL), ["data.subset.train=100", "train.optimizer.args.foreach=false"])
    assert spec.data.subset.raw == {"train": 100}
    assert dict(spec.train.optimizer.args) == {"foreach": False}


def test_override_list_index(tmp_path: Path) -> None:
    spec = load_spec(
        write(tmp_path, FULL),
        ["surgery.0.insert=se", "surgery.1.at.type=AvgPool2d", "groups.1.lr.2=5e-5", "train.scheduler.milestones.1=4"],
    )
    assert spec.surgery[0].insert == "se" and [str(s) for s in spec.surgery[0].at] == ["layer3", "layer4"]
    assert spec.surgery[1].at[0].type == "AvgPool2d"
    assert spec.groups[1].lr == ((0, 1e-3), (2, 5e-5), (4, 1e-4))
    assert list(spec.train.scheduler.milestones) == [3, 4]


def test_override_appends_one_past_the_end(tmp_path: Path) -> None:
    spec = load_spec(
        write(tmp_path, MINIMAL),
        ["surgery.0.insert=se", "surgery.0.at=layer4", "surgery.1.insert=eca", "surgery.1.at=layer3"],
    )
    assert [(s.insert, str(s.at[0])) for s in spec.surgery] == [("se", "layer4"), ("eca", "layer3")]


def test_override_is_validated_like_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    with pytest.raises(SpecError) as info:
        load_spec(path, ["surgery.0.insert=se"])  # an entry without `at`
    assert info.value.path == "surgery[0]" and info.value.file == "--set surgery.0.insert=se"
    with pytest.raises(SpecError) as info:
        load_spec(path, ["train.batch_size=-8"])
    assert info.value.path == "train.batch_size" and info.value.line is None
    with pytest.raises(SpecError) as info:
        load_spec(path, ["groups.0.lr=1e-3"])  # creates groups: [{lr: 1e-3}], which lacks name and params
    assert info.value.path == "groups[0]" and info.value.file == "--set groups.0.lr=1e-3"
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, FULL), ["groups.2.lr.3=5e-5"])  # lr is a number there, not a map
    assert info.value.path == "groups[2].lr" and "groups.2.lr=VALUE" in info.value.expected


def test_a_file_error_keeps_its_line_beside_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "train:\n  epocs: 4\n")
    with pytest.raises(SpecError) as info:
        load_spec(path, ["train.batch_size=8"])
    assert (info.value.file, info.value.line, info.value.path) == (str(path), 4, "train.epocs")


def test_an_override_replaces_the_marks_below_it(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    with pytest.raises(SpecError) as info:
        load_spec(path, ["surgery=[{insert: se, at: layer1, position: aftr}]"])
    assert info.value.path == "surgery[0].position"
    assert info.value.file == "--set surgery=[{insert: se, at: layer1, position: aftr}]"


def test_later_override_wins(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL), ["train.epochs=3", "train.epochs=5"])
    assert spec.train.epochs == 5


# ---------------------------------------------------------------------- the schema
def test_schema_is_draft_2020_12() -> None:
    import jsonschema

    s = schema()
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(s)
    assert s["required"] == ["model"]
    assert s["additionalProperties"] is False


def test_schema_rejects_unknown_keys_everywhere() -> None:
    def walk(node: dict, where: str) -> None:
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, where
            for key, sub in node["properties"].items():
                walk(sub, f"{where}.{key}")
        for key in ("oneOf", "anyOf"):
            for i, sub in enumerate(node.get(key, [])):
                walk(sub, f"{where}/{key}[{i}]")

    s = schema()
    walk(s, "spec")
    for name, node in s["$defs"].items():
        walk(node, name)


def test_schema_is_shipped_inside_the_package() -> None:
    from importlib import resources

    text = resources.files("surgery.spec").joinpath("schema.json").read_text()
    assert json.loads(text) == schema()


def test_every_default_fits_its_own_schema() -> None:
    import jsonschema

    root = schema()

    def check(node: dict, where: str) -> None:
        if "default" in node:
            sub = dict(node)
            sub.pop("default")
            sub["$defs"] = root["$defs"]
            errors = list(jsonschema.Draft202012Validator(sub).iter_errors(node["default"]))
            assert not errors, f"{where}: {errors[0].message}"
        for key, sub in node.get("properties", {}).items():
            check(sub, f"{where}.{key}")

    check(root, "spec")
    for name, node in root["$defs"].items():
        check(node, name)


# ---------------------------------------------------------------------- robustness
_yaml_chars = st.sampled_from(list("abmodelbackbone:torchvision18 -_[]{},'\"\n\t#&*!|>?%@`.0123456789e"))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(_yaml_chars, max_size=80))
def test_any_text_is_a_spec_or_a_spec_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_spec(path)
    except SpecError as err:
        assert err.file == str(path)
        assert err.line is None or 1 <= err.line <= text.count("\n") + 2


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.floats(-2, 2)
    | st.sampled_from(["layer1", "*", "cbam", "after", "never", "torchvision:resnet18", "timm:resnet18", "x"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "model",
                    "backbone",
                    "surgery",
                    "insert",
                    "at",
                    "groups",
                    "name",
                    "params",
                    "lr",
                    "train",
                    "epochs",
                    "unfreeze_at",
                    "position",
                    "type",
                    "0",
                    "3",
                ]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    data=st.dictionaries(
        st.sampled_from(["model", "surgery", "groups", "train", "data", "name", "seed"]), _json, max_size=4
    )
)
def test_any_dict_is_a_spec_or_a_spec_error(data: dict) -> None:
    try:
        load_spec(data)
    except SpecError as err:
        assert err.line is None
        assert isinstance(err.key_path, tuple)


# ---------------------------------------------------------------------- shipped specs
def _shipped() -> list[Path]:
    files = sorted(
        p
        for folder in ("specs", "examples")
        for suffix in ("*.yaml", "*.yml")
        for p in (ROOT / folder).rglob(suffix)
        if not p.name.startswith("sweep-")
    )
    return files  # sweep files (sweep-*.yaml) are checked by tests/test_sweep.py


@pytest.mark.parametrize("path", _shipped() or [None], ids=lambda p: str(p.relative_to(ROOT)) if p else "none-yet")
def test_shipped_specs_load_and_build(path: Path | None) -> None:
    if path is None:
        pytest.skip("no specs under specs/ or examples/ yet")
    spec = load_spec(path)
    from surgery.model.builder import build

    # Weights the test cannot have (pretrained: true needs the network, run:NAME an earlier run,
    # pkg:... an installed package) are swapped for random ones: surgery targets and groups are
    # still checked on the real model. A plain path must exist. A small probe keeps it fast.
    overrides = [f"data.image_size={min(spec.data.image_size, 64)}"]
    pretrained = spec.model.pretrained
    if pretrained is True or (isinstance(pretrained, str) and re.match(r"^[a-z]+:", pretrained)):
        overrides += ["model.pretrained=false", "model.key_map=null"]
    built = build(load_spec(path, overrides))
    assert built.groups and all(g.params for g in built.groups)
    # every surgery entry did something: an insertion, a changed module (replace/remove) or a LoRA adapter
    assert len(built.inserted) + len(built.changes) + len(built.adapters) >= len(spec.surgery)


def test_settings_past_a_shortened_run_are_located_warnings_not_errors(tmp_path):
    """`--set train.epochs=1` for a smoke run must not make a staged spec invalid."""
    path = tmp_path / "staged.yaml"
    path.write_text(
        "model: {backbone: 'torchvision:resnet18'}\n"
        "groups:\n"
        "  - {name: head, params: fc, lr: {0: 1.0e-3, 20: 1.0e-4}}\n"
        "  - {name: rest, params: '*', unfreeze_at: 5}\n"
        "train:\n"
        "  epochs: 30\n"
        "  scheduler: {name: multistep, milestones: [10, 25]}\n"
    )
    assert load_spec(path).warnings == ()
    spec = load_spec(path, ["train.epochs=3"])
    text = "\n".join(spec.warnings)
    assert f"{path}:3: groups[0].lr" in text and "epoch 20" in text
    assert f"{path}:4: groups[1].unfreeze_at" in text and "stays frozen" in text
    assert "train.scheduler.milestones[0]" in text and "train.scheduler.milestones[1]" in text


def test_a_spec_path_that_is_a_named_pipe_is_refused_not_read(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "spec.yaml")
    with pytest.raises(SpecError, match="the spec path is not a file") as info:
        load_spec(tmp_path / "spec.yaml")
    assert info.value.found.endswith("spec.yaml (a named pipe)")
