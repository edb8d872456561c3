"""surgery.model.groups: every parameter to exactly one group, first match wins, errors at the exact key path."""

from __future__ import annotations

from typing import Any

import pytest

from surgery import SpecError, build, load_spec
from surgery.model.groups import NORM_TYPES, ResolvedGroup, resolve_groups

# resnet18, 10 classes; CBAM after layer4 (a Sequential) and SE after layer4.0.bn2 (a swapped BatchNorm2d)
SURGERY = [{"insert": "cbam", "at": "layer4"}, {"insert": "se", "at": "layer4.0.bn2"}]
MODEL = {"backbone": "torchvision:resnet18", "num_classes": 10}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def built():
    return build(load_spec({"model": MODEL, "surgery": SURGERY}))


def resolve(built, groups: list[dict[str, Any]]) -> dict[str, ResolvedGroup]:
    spec = load_spec({"model": MODEL, "surgery": SURGERY, "groups": groups})
    inserted = [i.path for i in built.inserted]
    return {g.name: g for g in resolve_groups(spec, built.model, inserted=inserted, head=built.head)}


def error(built, groups: list[dict[str, Any]]) -> SpecError:
    with pytest.raises(SpecError) as info:
        resolve(built, groups)
    return info.value


def params(built) -> list[str]:
    return [n for n, _ in built.model.named_parameters()]


def assert_partition(built, groups: dict[str, ResolvedGroup]) -> None:
    owned = [p for g in groups.values() for p in g.params]
    assert sorted(owned) == sorted(params(built)) and len(owned) == len(set(owned))
    order = {p: i for i, p in enumerate(params(built))}
    for g in groups.values():  # model order within a group
        assert list(g.params) == sorted(g.params, key=order.__getitem__)


def test_the_default_group_owns_everything(built) -> None:
    assert [g.name for g in built.groups] == ["all"]
    assert list(built.groups[0].params) == params(built)
    assert set(built.group_of().values()) == {"all"}


def test_first_match_wins(built) -> None:
    groups = resolve(built, [{"name": "l4", "params": "layer4"}, {"name": "rest", "params": "*"}])
    assert_partition(built, groups)
    assert all(p.startswith("layer4.") for p in groups["l4"].params)
    assert "layer4.cbam_after.gate" in groups["l4"].params  # inserted modules live under their target
    assert not any(p.startswith("layer4.") for p in groups["rest"].params)


def test_named_selectors_select_inserted_modules_and_the_head(built) -> None:
    groups = resolve(
        built,
        [{"name": "new", "params": "@inserted"}, {"name": "head", "params": "@head"}, {"name": "rest", "params": "*"}],
    )
    assert_partition(built, groups)
    inserted = [i.path for i in built.inserted]
    assert all(any(p.startswith(i + ".") for i in inserted) for p in groups["new"].params)
    assert all(any(p.startswith(i + ".") for p in groups["new"].params) for i in inserted)
    assert groups["head"].params == ("fc.weight", "fc.bias")
    assert not any(".cbam_after." in p or ".se_after." in p for p in groups["rest"].params)


@pytest.mark.parametrize("type_name", ["BatchNorm2d", "torch.nn.BatchNorm2d", "torch.nn.modules.batchnorm.BatchNorm2d"])
def test_a_type_selector_takes_every_parameter_under_modules_of_that_type(built, type_name: str) -> None:
    groups = resolve(built, [{"name": "bn", "params": {"type": type_name}}, {"name": "rest", "params": "*"}])
    assert_partition(built, groups)
    bns = [n for n, m in built.model.named_modules() if type(m).__name__ == "BatchNorm2d"]
    # layer4.0.bn2 carries an inserted SE: its class is swapped, its type name is not
    assert "layer4.0.bn2.weight" in groups["bn"].params
    assert "layer4.0.bn2.se_after.gate" in groups["bn"].params  # the SE sits under the BatchNorm2d
    assert {p for p in groups["bn"].params if not p.startswith("layer4.0.bn2.se_after.")} == {
        f"{m}.{w}" for m in bns + ["layer4.0.bn2"] for w in ("weight", "bias")
    }


def test_a_type_selector_of_a_block_covers_the_block(built) -> None:
    groups = resolve(built, [{"name": "blocks", "params": [{"type": "BasicBlock"}]}, {"name": "rest", "params": "*"}])
    assert all(p.startswith("layer") for p in groups["blocks"].params)
    assert "layer4.cbam_after.gate" in groups["rest"].params  # appended to layer4, outside its blocks


def test_a_group_left_empty_names_the_earlier_groups(built) -> None:
    err = error(
        built, [{"name": "all", "params": "*"}, {"name": "l3", "params": "layer3"}, {"name": "l4", "params": "layer4"}]
    )
    assert err.path == "groups[1].params"
    assert "'l3' gets no parameters" in err.problem and "(all)" in err.problem
    assert "before" in err.hint


def test_uncovered_parameters_are_an_error_with_a_catch_all_hint(built) -> None:
    err = error(built, [{"name": "l4", "params": "layer4"}])
    assert err.path == "groups"
    assert err.found.startswith("conv1.weight, bn1.weight") and "in all" in err.found
    assert "params: ['*']" in err.hint


@pytest.mark.parametrize(
    ("groups", "path", "suggestion"),
    [
        (
            [{"name": "a", "params": "layer4"}, {"name": "b", "params": ["layr2", "*"]}],
            "groups[1].params[0]",
            "'layer2'",
        ),
        (
            [{"name": "a", "params": "layer4"}, {"name": "b", "params": "layer3.0.conv3"}],
            "groups[1].params",
            "'layer3.0.conv1'",
        ),
        ([{"name": "a", "params": ["*", {"type": "Batchnorm2d"}]}], "groups[0].params[1]", "'BatchNorm2d'"),
        (
            [{"name": "a", "params": ["fc", "layer*.*.bn3"]}, {"name": "b", "params": "*"}],
            "groups[0].params[1]",
            "'layer*.*.bn2'",
        ),
    ],
)
def test_a_selector_that_matches_nothing_is_an_error_at_its_key_path(
    built, groups: list, path: str, suggestion: str
) -> None:
    err = error(built, groups)
    assert err.path == path
    assert suggestion in err.hint


@pytest.mark.parametrize("selector", ["maxpool", {"type": "ReLU"}])
def test_a_selector_of_modules_without_parameters_says_so(built, selector: Any) -> None:
    err = error(built, [{"name": "a", "params": ["layer1", selector]}, {"name": "b", "params": "*"}])
    assert err.path == "groups[0].params[1]" and "without parameters" in err.problem
    assert err.hint is None or "'maxpool'" not in err.hint  # never "did you mean" the name itself


def test_inserted_without_surgery_is_an_error() -> None:
    with pytest.raises(SpecError) as info:
        build(
            load_spec(
                {"model": MODEL, "groups": [{"name": "new", "params": "@inserted"}, {"name": "rest", "params": "*"}]}
            )
        )
    assert info.value.path == "groups[0].params" and "@inserted" in info.value.problem


def test_norm_modules_go_to_the_group_that_owns_their_weights(built) -> None:
    groups = resolve(
        built,
        [
            {"name": "new", "params": "@inserted"},
            {"name": "one", "params": "layer3.0.bn1.weight"},  # a parameter path, not the module
            {"name": "l4", "params": "layer4"},
            {"name": "rest", "params": "*"},
        ],
    )
    norms = [n for n, m in built.model.named_modules() if isinstance(m, NORM_TYPES)]
    owned = [n for g in groups.values() for n in g.norm_modules]
    assert sorted(owned) == sorted(norms) and len(owned) == len(set(owned))  # each norm in exactly one group
    assert groups["one"].norm_modules == ("layer3.0.bn1",)
    assert "layer4.cbam_after.attn.spatial.conv.bn" in groups["new"].norm_modules
    assert {"layer4.0.bn1", "layer4.0.bn2", "layer4.0.downsample.1", "layer4.1.bn1", "layer4.1.bn2"} == set(
        groups["l4"].norm_modules
    )
    assert "bn1" in groups["rest"].norm_modules and "layer3.0.bn1" not in groups["rest"].norm_modules
    owner = {p: name for name, g in groups.items() for p in g.params}
    for name, g in groups.items():
        for norm in g.norm_modules:
            assert owner[f"{norm}.weight"] == name


def test_build_resolves_groups_of_the_spec() -> None:
    built = build(
        load_spec(
            {
                "model": MODEL,
                "surgery": SURGERY,
                "groups": [
                    {"name": "new", "params": ["@inserted", "@head"], "lr": 1.0e-3},
                    {"name": "backbone", "params": "*", "lr": 1.0e-5, "unfreeze_at": 2},
                ],
                "train": {"epochs": 4},
            }
        )
    )
    owner = built.group_of()
    assert (
        owner["fc.weight"] == "new" and owner["layer4.cbam_after.gate"] == "new" and owner["conv1.weight"] == "backbone"
    )
    assert [g.spec.unfreeze_at for g in built.groups] == [0, 2]
