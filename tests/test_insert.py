"""surgery.model.insert: where inserted modules go, what they see, and the spec errors of surgery."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from surgery import SpecError, build, load_spec
from surgery.model.backbones import create_backbone
from surgery.model.insert import Inserted, attention_names, plan_surgery, probe, with_inserts

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
TESTS = Path(__file__).parent


def spec_of(surgery: list[dict], backbone: str = "torchvision:resnet18", **model: Any):
    return load_spec({"model": {"backbone": backbone, **model}, "surgery": surgery})


def build_with(surgery: list[dict], backbone: str = "torchvision:resnet18", **model: Any):
    return build(spec_of(surgery, backbone, **model))


def spec_error(surgery: list[dict], backbone: str = "torchvision:resnet18") -> SpecError:
    with pytest.raises(SpecError) as info:
        build_with(surgery, backbone)
    return info.value


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def plain() -> nn.Module:
    """Plain resnet18 at seed 0, eval mode: the reference for identity checks."""
    return build(load_spec({"model": {"backbone": "torchvision:resnet18"}})).model.eval()


@pytest.fixture(scope="module")
def reference(plain: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return plain(X)


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


# --------------------------------------------------------------------------- placement
def test_a_plain_sequential_gets_the_module_as_its_last_child() -> None:
    built = build_with([{"insert": "cbam", "at": "layer1"}])
    layer1 = built.model.layer1
    assert [i.path for i in built.inserted] == ["layer1.cbam_after"]
    assert list(layer1._modules) == ["0", "1", "cbam_after"]
    assert type(layer1) is nn.Sequential  # a plain Sequential runs its children in order: no class swap
    assert isinstance(layer1.cbam_after, Inserted)
    assert built.inserted[0].channels == 64


def test_before_a_plain_sequential_makes_it_the_first_child() -> None:
    built = build_with([{"insert": "se", "at": "layer2", "position": "before"}])
    assert list(built.model.layer2._modules)[0] == "se_before"
    assert built.inserted[0].channels == 64  # layer2's input, not its 128-channel output


def test_a_leaf_target_gets_a_child_and_keeps_its_type() -> None:
    built = build_with([{"insert": "cbam", "at": "maxpool"}])
    pool = built.model.maxpool
    assert [i.path for i in built.inserted] == ["maxpool.cbam_after"]
    assert isinstance(pool, nn.MaxPool2d) and type(pool) is not nn.MaxPool2d
    assert repr(pool).startswith("MaxPool2d(")
    assert {"maxpool.cbam_after.gate"} <= set(built.model.state_dict())


def test_inserted_modules_run_where_they_are_placed() -> None:
    built = build_with(
        [
            {"insert": "se", "at": "maxpool", "init": "default"},
            {"insert": "eca", "at": "layer1.0.conv1", "position": "before", "init": "default"},
        ]
    )
    seen: list[str] = []
    for name in ("maxpool", "maxpool.se_after", "layer1.0.conv1", "layer1.0.conv1.eca_before"):
        built.model.get_submodule(name).register_forward_pre_hook(lambda m, a, name=name: seen.append(name))
    outputs(built.model)
    assert seen == ["maxpool", "maxpool.se_after", "layer1.0.conv1", "layer1.0.conv1.eca_before"]
    # a pre-hook on a swapped module fires before everything it runs; what it computes is
    # after: se(pool(x)), before: conv(eca(x))
    pool, conv = built.model.maxpool.eval(), built.model.layer1[0].conv1.eval()
    x = torch.randn(1, 64, 16, 16)
    with torch.no_grad():
        assert torch.equal(pool(x), pool.se_after(nn.MaxPool2d.forward(pool, x)))
        assert torch.equal(conv(x), nn.Conv2d.forward(conv, conv.eca_before(x)))
        assert not torch.equal(pool(x), nn.MaxPool2d.forward(pool, x))


@pytest.mark.parametrize(
    ("target", "position", "channels"),
    [
        ("conv1", "before", 3),
        ("conv1", "after", 64),
        ("layer2.0.conv1", "before", 64),
        ("layer2.0.conv1", "after", 128),
        ("layer4", "before", 256),
        ("layer4", "after", 512),
        ("avgpool", "after", 512),  # pooled, but still a 4-D (N, C, 1, 1) map
    ],
)
def test_channels_come_from_the_input_before_and_the_output_after(target: str, position: str, channels: int) -> None:
    built = build_with([{"insert": "se", "at": target, "position": position}])
    assert built.inserted[0].channels == channels
    assert built.model.get_submodule(built.inserted[0].path).attn.fc1.in_channels == channels


def test_two_inserts_at_one_target_get_distinct_names_in_spec_order() -> None:
    built = build_with(
        [
            {"insert": "se", "at": "maxpool"},
            {"insert": "se", "at": "maxpool"},
            {"insert": "eca", "at": ["layer1", "layer1"]},
        ]
    )
    assert [i.path for i in built.inserted] == ["maxpool.se_after", "maxpool.se_after_2", "layer1.eca_after"]
    assert built.model.maxpool._surgery_after == ("se_after", "se_after_2")


def test_an_insert_never_takes_the_name_of_an_existing_child() -> None:
    built = build_with([{"insert": "fixtures_attn:MyAttn", "at": "layer1.0"}])
    assert built.inserted[0].name == "myattn_after"
    # layer1.0 already has children conv1, bn1, ...; a kind named like one of them gets a suffix
    spec = spec_of([{"insert": "se", "at": "layer1.0"}])
    backbone = create_backbone(spec)
    backbone.model.layer1[0].add_module("se_after", nn.Identity())
    plan = plan_surgery(spec, backbone.model, probe(backbone.model, (3, 32, 32)))
    assert plan[0].name == "se_after_2"


def test_targets_are_resolved_on_the_unmodified_backbone() -> None:
    built = build_with([{"insert": "cbam", "at": "layer1"}, {"insert": "se", "at": "layer1.*"}])
    assert [i.path for i in built.inserted] == ["layer1.cbam_after", "layer1.0.se_after", "layer1.1.se_after"]


def test_a_type_target_matches_each_module_of_that_class() -> None:
    built = build_with([{"insert": "eca", "at": [{"type": "BatchNorm2d"}]}])
    assert len(built.inserted) == 20  # every BatchNorm2d of resnet18, including downsample.1
    assert all(i.name == "eca_after" for i in built.inserted)


def test_surgery_only_adds_keys(plain: nn.Module) -> None:
    built = build_with(
        [
            {"insert": "cbam", "at": ["layer*", "maxpool", "layer*.*.bn2"]},
            {"insert": "se", "at": "conv1", "position": "before"},
        ]
    )
    before, after = plain.state_dict(), built.model.state_dict()
    assert set(before) <= set(after)
    added = set(after) - set(before)
    assert added and all(any(k.startswith(i.path + ".") for i in built.inserted) for k in added)


def test_planning_changes_nothing_when_a_later_entry_fails() -> None:
    spec = spec_of([{"insert": "cbam", "at": "layer1"}, {"insert": "se", "at": "fc"}])
    backbone = create_backbone(spec)
    keys = list(backbone.model.state_dict())
    classes = {n: type(m) for n, m in backbone.model.named_modules()}
    with pytest.raises(SpecError) as info:
        plan_surgery(spec, backbone.model, probe(backbone.model, (3, 32, 32)))
    assert info.value.path == "surgery[1].at"
    assert list(backbone.model.state_dict()) == keys
    assert {n: type(m) for n, m in backbone.model.named_modules()} == classes


# --------------------------------------------------------------------------- identity
@pytest.mark.parametrize(
    "surgery",
    [
        [{"insert": "cbam", "at": "layer*"}],
        [{"insert": "se", "at": "layer*.*.bn2"}, {"insert": "eca", "at": "maxpool", "position": "before"}],
    ],
)
def test_identity_init_computes_what_the_backbone_computes(
    plain: nn.Module, reference: torch.Tensor, surgery: list[dict]
) -> None:
    built = build(spec_of(surgery), state_dict=plain.state_dict())
    assert (outputs(built.model) - reference).abs().max() < 1e-5
    assert all(
        m.gate is not None and float(m.gate.detach()) == 0.0 for m in built.model.modules() if isinstance(m, Inserted)
    )


def test_default_init_changes_the_output(plain: nn.Module, reference: torch.Tensor) -> None:
    built = build(spec_of([{"insert": "cbam", "at": "layer*", "init": "default"}]), state_dict=plain.state_dict())
    assert all(m.gate is None for m in built.model.modules() if isinstance(m, Inserted))
    assert (outputs(built.model) - reference).abs().max() > 1e-3


# --------------------------------------------------------------------------- spec errors at surgery[i]
def test_a_non_4d_target_is_an_error_at_its_at() -> None:
    err = spec_error([{"insert": "se", "at": "layer1"}, {"insert": "se", "at": "fc"}])
    assert err.path == "surgery[1].at"
    assert "4-D" in err.problem and "[1, 1000]" in err.found


def test_a_head_target_is_not_a_feature_map() -> None:
    err = spec_error([{"insert": "se", "at": "@head"}])
    assert err.path == "surgery[0].at" and "fc" in err.found


def test_inserted_is_no_surgery_target() -> None:
    err = spec_error([{"insert": "se", "at": "@inserted"}])
    assert err.path == "surgery[0].at"


def test_a_module_called_twice_is_an_error() -> None:
    # torchvision's BasicBlock calls its one ReLU twice: an insert there would run twice
    err = spec_error([{"insert": "se", "at": "layer1.0.relu"}])
    assert err.path == "surgery[0].at" and "2 times" in err.problem and "ReLU" in err.hint


def test_a_module_never_called_is_an_error() -> None:
    # timm's EfficientNet keeps a drop_path in blocks without a skip connection, never calling it
    err = spec_error([{"insert": "se", "at": "blocks.0.0.drop_path"}], "timm:test_efficientnet")
    assert err.path == "surgery[0].at" and "never called" in err.problem


def test_a_module_list_target_is_an_error() -> None:
    err = spec_error([{"insert": "se", "at": "stages.0.blocks.0.layers"}], "timm:hgnetv2_b0")
    assert err.path == "surgery[0].at" and "ModuleList" in err.problem
    assert err.hint == "insert at its elements instead, e.g. 'stages.0.blocks.0.layers.*'"


def test_a_container_that_runs_its_own_children_is_an_error() -> None:
    # MixedConv2d is a ModuleDict whose forward feeds every child: an added child would join that loop
    err = spec_error([{"insert": "se", "at": "blocks.1.0.conv_pw"}], "timm:mixnet_s")
    assert err.path == "surgery[0].at" and "MixedConv2d" in err.problem


@pytest.mark.parametrize(
    ("at", "path", "hint"),
    [
        ("layr1", "surgery[0].at", "layer1"),
        (["layer1", "layerr2"], "surgery[0].at[1]", "layer2"),
        ("layer1.0.bn3", "surgery[0].at", "layer1.0.bn1"),
        ({"type": "Maxpool2d"}, "surgery[0].at", "MaxPool2d"),
    ],
)
def test_a_target_that_matches_nothing_names_real_modules(at: Any, path: str, hint: str) -> None:
    err = spec_error([{"insert": "se", "at": at}])
    assert err.path == path
    assert hint in err.hint


def test_an_unknown_attention_name_suggests_real_ones() -> None:
    err = spec_error([{"insert": "se", "at": "layer1"}, {"insert": "cbma", "at": "layer1"}])
    assert err.path == "surgery[1].insert"
    assert "'cbam'" in err.hint and "cbam" in err.expected


def test_bad_arguments_are_an_error_at_args_with_a_suggestion() -> None:
    err = spec_error([{"insert": "se", "at": "layer1", "args": {"rd_ratoi": 0.1}}])
    assert err.path == "surgery[0].args"
    assert "rd_ratoi" in err.problem and "'rd_ratio'" in err.hint
    assert err.expected.startswith("arguments of se(channels")


def test_arguments_that_do_not_fit_the_width_are_an_error_at_args() -> None:
    err = spec_error([{"insert": "se", "at": "layer1", "args": {"rd_divisor": 0}}])
    assert err.path == "surgery[0].args"
    assert "cannot be built for 64 channels at layer1" in err.problem and "ZeroDivisionError" in err.problem


def test_a_module_that_changes_the_shape_is_an_error_at_its_entry() -> None:
    # selective kernel with stride 2 halves the map: found while planning, at the entry's args
    err = spec_error([{"insert": "se", "at": "layer1"}, {"insert": "sk", "at": "layer3", "args": {"stride": 2}}])
    assert err.path == "surgery[1].args"
    assert "[1, 256, 2, 2]" in err.problem and "[1, 256, 1, 1]" in err.problem


# --------------------------------------------------------------------------- user classes
def test_a_user_class_is_imported_constructed_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    built = build_with([{"insert": "fixtures_attn:MyAttn", "at": "layer2", "args": {"scale": 2.0}, "init": "default"}])
    module = built.model.layer2.myattn_after.attn
    assert type(module).__name__ == "MyAttn" and module.channels == 128 and module.scale == 2.0
    assert built.report.imports == ["fixtures_attn:MyAttn"]
    assert built.inserted[0].kind == "fixtures_attn:MyAttn"


@pytest.mark.parametrize(
    ("insert", "path", "word"),
    [
        ("fixtures_attn:MyAtn", "surgery[0].insert", "'MyAttn'"),
        ("fixtures_attn:NOT_A_MODULE", "surgery[0].insert", None),
        ("no_such_package_xyz:Attn", "surgery[0].insert", None),
    ],
)
def test_a_user_class_that_cannot_be_had_is_an_error(
    monkeypatch: pytest.MonkeyPatch, insert: str, path: str, word: str | None
) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    err = spec_error([{"insert": insert, "at": "layer1"}])
    assert err.path == path
    if word:
        assert word in err.hint


def test_user_class_arguments_are_checked_like_timm_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    err = spec_error([{"insert": "fixtures_attn:MyAttn", "at": "layer1", "args": {"scael": 2.0}}])
    assert err.path == "surgery[0].args" and "'scale'" in err.hint


# --------------------------------------------------------------------------- swapped classes pickle by name
def test_swapped_classes_pickle_by_name_even_with_underscores(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.models.densenet as densenet

    monkeypatch.syspath_prepend(str(TESTS))
    import fixtures_attn

    for cls in (nn.MaxPool2d, densenet._DenseLayer, fixtures_attn._Odd__Name, nn.modules.batchnorm.BatchNorm2d):
        swapped = with_inserts(cls)
        assert pickle.loads(pickle.dumps(swapped, protocol=2)) is swapped
        assert swapped._surgery_original is cls
    conv = fixtures_attn._Odd__Name(4, 4, 1)
    conv.__class__ = with_inserts(type(conv))
    conv.add_module("se_after", nn.Identity())
    conv._surgery_after = ("se_after",)
    copy = pickle.loads(pickle.dumps(conv, protocol=2))
    assert type(copy) is type(conv) and copy._surgery_after == ("se_after",)


# --------------------------------------------------------------------------- timm's attention registry
# Every registry name that can be built as Module(channels) and keeps the map's shape goes in after
# layer3 of resnet18 (a 256 x 2 x 2 map at 32 px). These cannot, and must say so as a SpecError:
CANNOT = {
    "ge": "timm 1.0's GatherExcite passes act_layer twice to ConvMlp with its defaults (works with use_mlp: false)",
    "bottleneck": "BottleneckAttn needs feat_size",
    "halo": "HaloAttn needs a map divisible by block_size (8 by default)",
    "bat": "BatNonLocalAttn needs a map divisible by block_size (7 by default)",
}
WITH_ARGS = {  # ... and with these arguments they can
    "ge": {"use_mlp": False},
    "bottleneck": {"feat_size": [2, 2]},
    "halo": {"block_size": 2, "halo_size": 1},
    "bat": {"block_size": 2},
}


def test_the_registry_is_read_off_timm() -> None:
    names = attention_names()
    assert {"se", "ese", "eca", "cbam", "lcbam", "gc", "coord"} <= set(names)
    assert set(CANNOT) <= set(names)


@pytest.mark.parametrize("name", attention_names())
def test_every_attention_name_inserts_after_layer3_or_says_why_not(
    name: str, plain: nn.Module, reference: torch.Tensor
) -> None:
    spec = spec_of([{"insert": name, "at": "layer3"}])
    if name in CANNOT:
        with pytest.raises(SpecError) as info:
            build(spec, state_dict=plain.state_dict())
        assert info.value.path == "surgery[0].args", CANNOT[name]
        return
    built = build(spec, state_dict=plain.state_dict())
    assert built.inserted[0].channels == 256
    assert (outputs(built.model) - reference).abs().max() < 1e-5


@pytest.mark.parametrize("name", sorted(WITH_ARGS))
def test_the_ones_that_need_arguments_work_with_them(name: str, plain: nn.Module, reference: torch.Tensor) -> None:
    built = build(spec_of([{"insert": name, "at": "layer3", "args": WITH_ARGS[name]}]), state_dict=plain.state_dict())
    assert (outputs(built.model) - reference).abs().max() < 1e-5


# --------------------------------------------------------------------------- registry: asked of timm, needs named
def test_attention_names_are_asked_of_timm_not_read_from_its_source(monkeypatch: pytest.MonkeyPatch) -> None:
    import inspect

    def no_source(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("attention_names must not read source text")

    attention_names.cache_clear()
    monkeypatch.setattr(inspect, "getsource", no_source)
    try:
        names = attention_names()
    finally:
        attention_names.cache_clear()
    assert {"se", "cbam", "ge", "bottleneck", "halo", "bat", "splat", "lambda"} <= set(names)
    assert "invalid" not in " ".join(names).lower()


@pytest.mark.parametrize(
    ("name", "needed"),
    [("bottleneck", "feat_size: [2, 2]"), ("halo", "block_size"), ("bat", "block_size"), ("ge", "use_mlp: false")],
)
def test_registry_entries_timm_cannot_build_name_the_argument_they_need(name: str, needed: str) -> None:
    err = spec_error([{"insert": name, "at": "layer3"}])
    assert err.path == "surgery[0].args" and needed in err.hint


# --------------------------------------------------------------------------- argument ranges
@pytest.mark.parametrize(
    ("insert", "args", "path"),
    [
        ("cbam", {"rd_ratio": -1}, "surgery[0].args.rd_ratio"),
        ("se", {"rd_ratio": 2}, "surgery[0].args.rd_ratio"),
        ("eca", {"kernel_size": 0}, "surgery[0].args.kernel_size"),
        ("eca", {"kernel_size": 4}, "surgery[0].args.kernel_size"),
        ("cbam", {"spatial_kernel_size": 0}, "surgery[0].args.spatial_kernel_size"),
        ("cbam", {"rd_divisor": 0}, "surgery[0].args"),  # timm itself fails (ZeroDivisionError): the hint names the key
    ],
)
def test_arguments_out_of_range_are_located_errors(insert: str, args: dict, path: str) -> None:
    err = spec_error([{"insert": insert, "at": "layer3", "args": args}])
    key = next(iter(args))
    assert err.path == path
    assert key in err.path or key in (err.hint or "")


def test_a_huge_image_size_is_not_blamed_on_the_surgery_args() -> None:
    # the dry run is shape-only: a 4096 px map (the schema's largest) is never allocated, and
    # nothing blames surgery[0].args; past 4096 the schema names data.image_size itself
    built = build(
        load_spec(
            {
                "model": {"backbone": "torchvision:resnet18", "num_classes": 10},
                "data": {"image_size": 4096},
                "surgery": [{"insert": "cbam", "at": "layer3"}],
            }
        )
    )
    assert built.inserted[0].channels == 256
    with pytest.raises(SpecError) as info:
        load_spec({"model": {"backbone": "torchvision:resnet18"}, "data": {"image_size": 40000}})
    assert info.value.path == "data.image_size"


# --------------------------------------------------------------------------- channels-last maps
@pytest.mark.parametrize(
    ("backbone", "at", "args", "near"),
    [
        ("torchvision:convnext_tiny", "features.1.0.block.2", {}, "'features.1.0.block'"),  # LayerNorm after Permute
        ("torchvision:convnext_tiny", "features.1.0.block.3", {}, "'features.1.0'"),  # Linear
        ("torchvision:swin_t", "features.1.0", {}, "'features.0.0'"),  # swin stages are NHWC throughout
        ("torchvision:swin_t", "features.1", {}, "'permute'"),
        ("timm:convnext_atto", "stages.0.blocks.0.norm", {"conv_mlp": False}, "'stages.0.blocks.0'"),
        ("timm:convnext_atto", "stages.0.blocks.0.mlp.fc1", {"conv_mlp": False}, "'stages.0.blocks.0.conv_dw'"),
    ],
)
def test_a_channels_last_map_is_refused_with_channels_first_positions_nearby(
    backbone: str, at: str, args: dict, near: str
) -> None:
    with pytest.raises(SpecError) as info:
        build(
            load_spec(
                {
                    "model": {"backbone": backbone, "num_classes": 10, "args": args},
                    "surgery": [{"insert": "cbam", "at": at}],
                }
            )
        )
    err = info.value
    assert err.path == "surgery[0].at" and "channels-last" in err.problem
    assert near in err.hint


@pytest.mark.parametrize(
    ("backbone", "at", "args", "channels"),
    [
        ("torchvision:convnext_tiny", "features.1", {}, 96),
        ("torchvision:convnext_tiny", "features.1.0.block.0", {}, 96),  # the depthwise conv, before the Permute
        ("torchvision:swin_t", "features.0.0", {}, 96),  # the patch conv
        ("timm:convnext_atto", "stages.0.blocks.0.norm", {}, 40),  # atto's conv_mlp keeps its blocks NCHW
        ("timm:convnext_atto", "stages.0", {"conv_mlp": False}, 40),
    ],
)
def test_channels_first_positions_of_the_same_backbones_still_take_attention(
    backbone: str, at: str, args: dict, channels: int
) -> None:
    built = build(
        load_spec(
            {
                "model": {"backbone": backbone, "num_classes": 10, "args": args},
                "surgery": [{"insert": "cbam", "at": at}],
            }
        )
    )
    assert built.inserted[0].channels == channels


# --------------------------------------------------------------------------- hints lead somewhere right
@pytest.mark.parametrize(
    ("at", "position", "hint"),
    [
        ("features.denseblock1", "after", "use at: 'features.transition1' with position: before"),
        ("features.denseblock4", "after", "use at: 'features.norm5' with position: before"),
        ("features.denseblock2", "before", "use at: 'features.transition1' with position: after"),
    ],
)
def test_a_dense_block_hint_names_the_position_that_sees_the_blocks_output(at: str, position: str, hint: str) -> None:
    spec = load_spec(
        {
            "model": {"backbone": "torchvision:densenet121", "num_classes": 10},
            "surgery": [{"insert": "se", "at": at, "position": position}],
        }
    )
    with pytest.raises(SpecError) as info:
        build(spec)
    assert info.value.path == "surgery[0].at" and hint in info.value.hint
    assert "denselayer" not in info.value.hint
    target = hint.split("'")[1]  # and the hint works
    built = build(
        load_spec(
            {
                "model": {"backbone": "torchvision:densenet121", "num_classes": 10},
                "surgery": [{"insert": "se", "at": target, "position": hint.rsplit(" ", 1)[1]}],
            }
        )
    )
    assert (
        built.inserted[0].channels
        == {"features.transition1": 256 if position == "after" else 128, "features.norm5": 1024}[target]
    )


# --------------------------------------------------------------------------- a user class beside the spec
GATE = """
import torch
from torch import nn


class Gate(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))
"""


def test_a_user_class_in_a_file_beside_the_spec_is_found_without_pythonpath(tmp_path):
    """`surgery validate` run from another folder finds beside_attn.py next to the spec (and a
    replace's class likewise); a module in neither place is named with the folder searched."""
    import os
    import subprocess
    import sys

    folder = tmp_path / "specs"
    folder.mkdir()
    (folder / "beside_attn.py").write_text(GATE + "\n\nclass Act(nn.SiLU):\n    pass\n")
    spec = (
        "model:\n  backbone: torchvision:resnet18\n  num_classes: 10\n  pretrained: false\n"
        "surgery:\n  - insert: beside_attn:Gate\n    at: layer1\n"
        "  - replace: layer2.0.relu\n    with: beside_attn:Act\n"
        "data:\n  image_size: 32\n"
    )
    (folder / "spec.yaml").write_text(spec)
    (folder / "typo.yaml").write_text(spec.replace("beside_attn:Gate", "besid_attn:Gate"))
    import surgery

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(surgery.__file__).parents[1])}
    run = [sys.executable, "-m", "surgery", "validate"]
    good = subprocess.run(
        [*run, str(folder / "spec.yaml")], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )
    assert good.returncode == 0, good.stderr
    bad = subprocess.run(
        [*run, str(folder / "typo.yaml")], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )
    assert bad.returncode == 2 and "typo.yaml:6:" in bad.stderr and "surgery[0].insert" in bad.stderr
    assert f"no such module on sys.path, nor in the spec's folder {folder.resolve()}" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_channels_last_refusal_never_suggests_attention_weights() -> None:
    """Swin's window attention weights are (windows, heads, tokens, tokens): 4-D and square like a
    channels-first map, but no image's map. Neither the stage with many windows nor the one with a
    single window (batch 1) may be suggested; the patch conv is."""
    tiny_swin = {"img_size": 64, "window_size": 4, "embed_dim": 24, "depths": [1, 1, 1], "num_heads": [1, 1, 2]}
    for at in ("layers.1", "layers.2.blocks.0"):
        with pytest.raises(SpecError) as info:
            build(
                load_spec(
                    {
                        "model": {
                            "backbone": "timm:swin_tiny_patch4_window7_224",
                            "num_classes": 4,
                            "args": tiny_swin,
                            "pretrained": False,
                        },
                        "surgery": [{"insert": "se", "at": at}],
                        "data": {"image_size": 64},
                    }
                )
            )
        hint = info.value.hint
        assert "'patch_embed.proj'" in hint and "softmax" not in hint and "attn_drop" not in hint, hint
