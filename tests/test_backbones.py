"""surgery.model.backbones: torchvision and timm models, their heads, and `pretrained: true` through the
libraries' own caches, offline (weights are planted in temporary caches; the network is never used)."""

from __future__ import annotations

import os
import time
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.hub
from safetensors.torch import save_file

from surgery import SpecError, build, load_spec
from surgery.model.backbones import create_backbone

COMMIT = "0123456789abcdef0123456789abcdef01234567"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """torch.hub downloads fail at once, as they would offline; returns the URLs tried."""
    tried: list[str] = []

    def refuse(request, *args, **kwargs):
        tried.append(getattr(request, "full_url", request))
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "urlopen", refuse)
    return tried


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a torch.hub.set_dir() elsewhere would win over TORCH_HOME
    return tmp_path / "torch"


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]) -> Path:
    """An empty Hugging Face hub cache in offline mode.

    huggingface_hub reads HF_HOME / HF_HUB_OFFLINE into `constants` when imported, so the
    constants are patched as well as the environment."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path / "hf" / "hub"


def spec_of(backbone: str, **model):
    return load_spec({"model": {"backbone": backbone, **model}, "surgery": [{"insert": "se", "at": "layer1"}]})


def generated(backbone: str, seed: int) -> dict[str, torch.Tensor]:
    """A state_dict of the architecture with values no seed-0 build has."""
    model = build(load_spec({"model": {"backbone": backbone}, "seed": seed})).model
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- torchvision
def test_torch_home_moves_the_hub_cache_on_every_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    for name in ("a", "b"):
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / name))
        assert torch.hub.get_dir() == str(tmp_path / name / "hub")


def test_torchvision_pretrained_loads_the_planted_hub_file(torch_home: Path, no_network: list[str]) -> None:
    from torchvision.models import ResNet18_Weights

    planted = generated("torchvision:resnet18", seed=5)
    path = torch_home / "hub" / "checkpoints" / os.path.basename(ResNet18_Weights.DEFAULT.url)
    path.parent.mkdir(parents=True)
    torch.save(planted, path)
    built = build(spec_of("torchvision:resnet18", pretrained=True))
    state = built.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in planted.items())
    assert set(built.report.loaded) == set(planted)
    assert str(path) in built.report.source and "ResNet18_Weights.IMAGENET1K_V1" in built.report.source
    assert no_network == []


def test_torchvision_weight_tags_pick_the_file(torch_home: Path) -> None:
    from torchvision.models import ResNet18_Weights

    planted = generated("torchvision:resnet18", seed=6)
    path = torch_home / "hub" / "checkpoints" / os.path.basename(ResNet18_Weights.IMAGENET1K_V1.url)
    path.parent.mkdir(parents=True)
    torch.save(planted, path)
    built = build(spec_of("torchvision:resnet18.IMAGENET1K_V1", pretrained=True))
    assert torch.equal(built.model.conv1.weight, planted["conv1.weight"])
    with pytest.raises(SpecError) as info:
        build(spec_of("torchvision:resnet18.IMAGENET1K_V2", pretrained=True))
    assert info.value.path == "model.backbone" and "IMAGENET1K_V1" in info.value.expected


def test_torchvision_pretrained_without_the_file_says_where_to_put_it(torch_home: Path, no_network: list[str]) -> None:
    from torchvision.models import ResNet18_Weights

    start = time.perf_counter()
    with pytest.raises(SpecError) as info:
        build(spec_of("torchvision:resnet18", pretrained=True))
    assert time.perf_counter() - start < 30  # fails fast: one refused download, no retries
    err = info.value
    expected = torch_home / "hub" / "checkpoints" / os.path.basename(ResNet18_Weights.DEFAULT.url)
    assert err.path == "model.pretrained"
    assert str(expected) in err.expected and str(expected.parent) in err.hint
    assert no_network == [ResNet18_Weights.DEFAULT.url]


def test_given_weights_skip_the_pretrained_download(torch_home: Path, no_network: list[str]) -> None:
    # a trained run rebuilt from its spec (pretrained: true) and its own weights needs no cache
    weights = generated("torchvision:resnet18", seed=4)
    built = build(spec_of("torchvision:resnet18", pretrained=True), state_dict=weights)
    assert set(built.report.loaded) == set(weights) and built.report.source == "given state_dict"
    assert no_network == []


# --------------------------------------------------------------------------- timm
def _plant_timm(cache: Path, hub_id: str, state: dict[str, torch.Tensor]) -> Path:
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    path = repo / "snapshots" / COMMIT / "model.safetensors"
    save_file(state, str(path))
    return path


def test_timm_pretrained_loads_the_planted_hub_cache(hf_cache: Path, no_network: list[str]) -> None:
    planted = generated("timm:resnet18", seed=5)
    _plant_timm(hf_cache, "timm/resnet18.a1_in1k", planted)
    built = build(spec_of("timm:resnet18.a1_in1k", pretrained=True))
    state = built.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in planted.items())
    assert set(built.report.loaded) == set(planted)
    assert "timm/resnet18.a1_in1k" in built.report.source
    assert [i.path for i in built.inserted] == ["layer1.se_after"]
    assert no_network == []


def test_timm_pretrained_with_a_new_head_keeps_the_rest(hf_cache: Path) -> None:
    planted = generated("timm:resnet18", seed=5)
    _plant_timm(hf_cache, "timm/resnet18.a1_in1k", planted)
    built = build(spec_of("timm:resnet18.a1_in1k", pretrained=True, num_classes=3))
    assert set(built.report.reinitialised) == {"fc.weight", "fc.bias"}
    assert built.model.fc.out_features == 3
    assert torch.equal(built.model.layer4[1].bn2.running_var, planted["layer4.1.bn2.running_var"])


def test_timm_pretrained_without_the_cache_says_where_it_looked(hf_cache: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(SpecError) as info:
        build(spec_of("timm:resnet18.a1_in1k", pretrained=True))
    assert time.perf_counter() - start < 30
    err = info.value
    assert err.path == "model.pretrained"
    assert str(hf_cache / "models--timm--resnet18.a1_in1k") in err.expected
    assert "model.pretrained" in err.hint


# --------------------------------------------------------------------------- names, arguments, heads
@pytest.mark.parametrize(
    ("backbone", "suggestion"),
    [
        ("torchvision:resnet181", "resnet18"),
        ("timm:efficientnet_b00", "efficientnet_b0"),
        ("timm:resnet18.a1_in1kk", "resnet18.a1_in1k"),
    ],
)
def test_an_unknown_backbone_suggests_real_names(backbone: str, suggestion: str) -> None:
    with pytest.raises(SpecError) as info:
        create_backbone(load_spec({"model": {"backbone": backbone}}))
    assert info.value.path == "model.backbone" and f"'{suggestion}'" in info.value.hint


@pytest.mark.parametrize("backbone", ["torchvision:resnet18", "timm:resnet18"])
def test_rejected_constructor_arguments_are_an_error_at_args(backbone: str) -> None:
    with pytest.raises(SpecError) as info:
        create_backbone(load_spec({"model": {"backbone": backbone, "args": {"no_such_argument": 1}}}))
    assert info.value.path == "model.args" and "no_such_argument" in info.value.found


@pytest.mark.parametrize(
    ("backbone", "head", "num_classes"),
    [
        ("torchvision:resnet18", ("fc",), 10),
        ("torchvision:mobilenet_v3_small", ("classifier.3",), 10),
        ("torchvision:mobilenet_v3_small", ("classifier.3",), 1024),  # the hidden layer has 1024 outputs too
        ("timm:convnext_atto", ("head.fc",), 10),
        ("timm:efficientnet_b0", ("classifier",), 10),
        ("timm:resnet18", ("fc",), 1000),
        ("torchvision:googlenet", ("aux1.fc2", "aux2.fc2", "fc"), 10),  # auxiliary heads are heads too
        ("torchvision:inception_v3", ("AuxLogits.fc", "fc"), 10),
    ],
)
def test_the_head_is_found_and_sized(backbone: str, head: tuple, num_classes: int) -> None:
    args = {"init_weights": True} if backbone in ("torchvision:googlenet", "torchvision:inception_v3") else {}
    backbone_ = create_backbone(load_spec({"model": {"backbone": backbone, "num_classes": num_classes, "args": args}}))
    assert backbone_.head == head and backbone_.num_classes == num_classes
    size = 75 if "inception" in backbone else 32  # inception_v3's smallest input
    with torch.no_grad():
        assert backbone_.model.eval()(torch.zeros(1, 3, size, size)).shape == (1, num_classes)


def test_a_new_class_count_reinitialises_auxiliary_heads_too(tmp_path: Path) -> None:
    model = {"backbone": "torchvision:googlenet", "args": {"init_weights": True}}
    weights = build(load_spec({"model": model})).model.state_dict()
    torch.save(weights, tmp_path / "googlenet.pth")
    built = build(load_spec({"model": {**model, "num_classes": 10, "pretrained": str(tmp_path / "googlenet.pth")}}))
    assert set(built.report.reinitialised) == {
        f"{m}.{p}" for m in ("aux1.fc2", "aux2.fc2", "fc") for p in ("weight", "bias")
    }
    assert set(built.report.loaded) == set(weights) - set(built.report.reinitialised)


def test_data_configs_come_from_the_libraries() -> None:
    tv = create_backbone(load_spec({"model": {"backbone": "torchvision:resnet18"}})).data_config
    assert tv["input_size"] == (3, 224, 224) and tv["mean"] == pytest.approx((0.485, 0.456, 0.406))
    timm_ = create_backbone(load_spec({"model": {"backbone": "timm:resnet18.a1_in1k"}})).data_config
    assert timm_["input_size"] == (3, 224, 224) and timm_["crop_pct"] == pytest.approx(0.95)


def test_timm_pretrained_without_cache_or_network_fails_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Online mode, nothing cached, the hub unreachable: our located error, without timm ever asking
    huggingface_hub (whose retries used to print ten 'Retrying in N s' lines over about 50 s)."""
    import socket

    import timm
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    tried: list[tuple] = []

    def unreachable(address, *args, **kwargs):
        tried.append(address)
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    real_create = timm.create_model

    def create(name, pretrained=False, **kwargs):
        assert not pretrained, "timm was asked to download"
        return real_create(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)
    with pytest.raises(SpecError, match="not in the cache, and the hub cannot be reached") as info:
        build(spec_of("timm:resnet18", pretrained=True))
    assert info.value.path == "model.pretrained" and "models--timm--resnet18" in info.value.expected
    assert tried and tried[0][0] == "huggingface.co"
