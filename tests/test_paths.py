"""surgery.model.paths: one path syntax, matched at dot boundaries; type selectors."""

from __future__ import annotations

import pytest
from torch import nn

from surgery.model.insert import with_inserts
from surgery.model.paths import covers, is_type, matches, nearest, select_modules, type_names

MATCHES = [
    # pattern, path, matches
    ("layer1", "layer1", True),
    ("layer1", "layer10", False),
    ("layer1", "layer1.0", False),
    ("layer1", "xlayer1", False),
    ("layer*", "layer1", True),
    ("layer*", "layer4", True),
    ("layer*", "layer1.0", False),
    ("layer*", "conv1", False),
    ("layer*.*.bn2", "layer1.0.bn2", True),
    ("layer*.*.bn2", "layer4.1.bn2", True),
    ("layer*.*.bn2", "layer1.bn2", False),
    ("layer*.*.bn2", "layer1.0.bn20", False),
    ("layer*.*.bn2", "layer1.0.downsample.bn2", False),
    ("blocks.*.*.bn2", "blocks.3.1.bn2", True),
    ("**.bn2", "bn2", True),  # ** stands for zero parts too
    ("**.bn2", "layer1.0.bn2", True),
    ("**.bn2", "a.b.c.d.bn2", True),
    ("**.bn2", "layer1.0.bn20", False),
    ("**.bn2", "layer1.0.bn2.weight", False),
    ("layer1.**", "layer1.0.conv1", True),
    ("layer[12]", "layer1", True),
    ("layer[12]", "layer2", True),
    ("layer[12]", "layer3", False),
    ("layer[12]", "layer12", False),
    ("layer[!1]", "layer2", True),
    ("layer[!1]", "layer1", False),
    ("layer?", "layer1", True),
    ("layer?", "layer10", False),
    ("*", "conv1", True),
    ("*", "layer1.0", False),
    ("features.4", "features.4", True),
    ("features.4", "features.40", False),
    ("Layer1", "layer1", False),  # case matters: module names are Python attributes
]


@pytest.mark.parametrize(("pattern", "path", "expected"), MATCHES)
def test_matches_whole_names_at_dot_boundaries(pattern: str, path: str, expected: bool) -> None:
    assert matches(pattern, path) is expected


COVERS = [
    # pattern, parameter or module name, covered
    ("layer1", "layer1", True),
    ("layer1", "layer1.0.conv1.weight", True),
    ("layer1", "layer10.0.conv1.weight", False),
    ("layer1", "layer1x.weight", False),
    ("layer1.0", "layer1.0.conv1.weight", True),
    ("layer1.0", "layer1.01.weight", False),
    ("layer*", "layer3.1.bn2.running_mean", True),
    ("layer*", "fc.weight", False),
    ("layer*.*.bn2", "layer2.0.bn2.weight", True),
    ("layer*.*.bn2", "layer2.0.bn1.weight", False),
    ("**.bn2", "layer2.0.bn2.bias", True),
    ("**.bn2", "bn2.weight", True),
    ("**.bn2", "layer2.0.bn20.bias", False),
    ("*", "conv1.weight", True),
    ("*", "layer4.1.conv2.weight", True),
    ("fc.weight", "fc.weight", True),
    ("fc.weight", "fc.bias", False),
]


@pytest.mark.parametrize(("pattern", "name", "expected"), COVERS)
def test_covers_a_name_or_its_descendants(pattern: str, name: str, expected: bool) -> None:
    assert covers(pattern, name) is expected


def _tiny() -> nn.Module:
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(3, 8, 3))
    model.add_module("pool", nn.MaxPool2d(2))
    model.add_module("layer1", nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.MaxPool2d(2)))
    model.add_module("layer10", nn.Sequential(nn.Conv2d(8, 8, 1)))
    model.add_module("head", nn.Linear(8, 2))
    return model


def test_select_modules_keeps_model_order_and_never_the_root() -> None:
    modules = dict(_tiny().named_modules())
    assert select_modules(modules, "layer1", None) == ["layer1"]
    assert select_modules(modules, "layer1*", None) == ["layer1", "layer10"]
    assert select_modules(modules, "layer1.*", None) == ["layer1.0", "layer1.1", "layer1.2"]
    assert select_modules(modules, "**", None) == [p for p in modules if p]
    assert "" not in select_modules(modules, "**", None)


@pytest.mark.parametrize("type_name", ["MaxPool2d", "torch.nn.MaxPool2d", "torch.nn.modules.pooling.MaxPool2d"])
def test_type_selector_by_short_public_and_full_name(type_name: str) -> None:
    modules = dict(_tiny().named_modules())
    assert select_modules(modules, None, type_name) == ["pool", "layer1.2"]


@pytest.mark.parametrize("type_name", ["maxpool2d", "nn.MaxPool2d", "MaxPool", "Sequential2"])
def test_type_selector_needs_the_exact_class_name(type_name: str) -> None:
    assert select_modules(dict(_tiny().named_modules()), None, type_name) == []


def test_type_selector_is_exact_not_isinstance() -> None:
    class MyPool(nn.MaxPool2d):
        pass

    modules = {"a": nn.MaxPool2d(2), "b": MyPool(2)}
    assert select_modules(modules, None, "MaxPool2d") == ["a"]
    assert select_modules(modules, None, "MyPool") == ["b"]


def test_a_swapped_module_still_matches_its_original_type_name() -> None:
    model = _tiny()
    pool = model.get_submodule("pool")
    pool.__class__ = with_inserts(nn.MaxPool2d)  # what surgery does to a leaf target
    assert type(pool) is not nn.MaxPool2d and isinstance(pool, nn.MaxPool2d)
    assert type_names(pool) == ("MaxPool2d", "torch.nn.modules.pooling.MaxPool2d")
    for name in ("MaxPool2d", "torch.nn.MaxPool2d", "torch.nn.modules.pooling.MaxPool2d"):
        assert is_type(pool, name)
    assert select_modules(dict(model.named_modules()), None, "MaxPool2d") == ["pool", "layer1.2"]
    assert not is_type(pool, type(pool).__name__)  # the internal class name is never a user-facing type


def test_a_surgered_model_still_matches_original_type_names() -> None:
    from surgery import build, load_spec

    built = build(
        load_spec(
            {
                "model": {"backbone": "torchvision:resnet18"},
                "surgery": [{"insert": "se", "at": {"type": "MaxPool2d"}}, {"insert": "eca", "at": "layer1.0.bn2"}],
            }
        )
    )
    modules = dict(built.model.named_modules())
    assert select_modules(modules, None, "MaxPool2d") == ["maxpool"]
    assert "layer1.0.bn2" in select_modules(modules, None, "torch.nn.BatchNorm2d")
    assert select_modules(modules, "layer1.0.bn2", None) == ["layer1.0.bn2"]


def test_nearest_suggests_real_paths_at_the_same_depth_first() -> None:
    names = ["layer1", "layer2", "layer1.0", "layer1.0.bn2", "layer1.0.bn1", "fc"]
    assert nearest("layr1", names)[0] == "layer1"
    assert set(nearest("layer1.0.bn3", names)[:2]) == {"layer1.0.bn1", "layer1.0.bn2"}
    assert nearest("zzzzzz", names) == []


@pytest.mark.parametrize(
    ("pattern", "suggestions"),
    [
        ("layer*.*.bn3", {"layer*.*.bn1", "layer*.*.bn2"}),
        ("layer[12].*.conv3", {"layer[12].*.conv1", "layer[12].*.conv2"}),
        ("**.bn3", {"**.bn1", "**.bn2"}),
    ],
)
def test_a_glob_gets_corrected_globs_that_match(pattern: str, suggestions: set) -> None:
    names = [
        "layer1",
        "layer1.0",
        "layer1.0.bn1",
        "layer1.0.bn2",
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer2",
        "layer2.0",
        "layer2.0.bn1",
        "layer2.0.bn2",
        "layer2.0.conv1",
        "layer2.0.conv2",
    ]
    found = nearest(pattern, names)
    assert set(found[:2]) == suggestions
    assert all(any(matches(f, n) for n in names) for f in found)
