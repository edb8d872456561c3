"""surgery.model.weights: weight files in every usual shape, key maps, and a load report that accounts for
every tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import save_file

from surgery import SpecError, build, load_spec
from surgery.model.weights import LoadReport

SURGERY = [{"insert": "se", "at": "layer1"}, {"insert": "cbam", "at": "layer*.*.bn2"}]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    """A resnet18 state_dict unlike the seed-0 initialisation (seed 7), so a load is visible."""
    model = build(load_spec({"model": {"backbone": "torchvision:resnet18"}, "seed": 7})).model
    with torch.no_grad():  # non-default running statistics and step counters too
        for name, buffer in model.named_buffers():
            buffer.copy_(
                torch.full_like(buffer, 3) if name.endswith("num_batches_tracked") else torch.rand_like(buffer)
            )
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("weights")


def build_from(path: Path | str, surgery: list[dict] = SURGERY, **model: Any):
    return build(
        load_spec({"model": {"backbone": "torchvision:resnet18", "pretrained": str(path), **model}, "surgery": surgery})
    )


def load_error(path: Path | str, **model: Any) -> SpecError:
    with pytest.raises(SpecError) as info:
        build_from(path, **model)
    return info.value


def assert_loaded(built, weights: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    state = built.model.state_dict()
    for key, tensor in weights.items():
        if key in skip:
            continue
        assert torch.equal(state[key], tensor), key
    assert set(built.report.loaded) == set(weights) - set(skip)


# --------------------------------------------------------------------------- file forms
FORMS: dict[str, tuple[str, Callable[[dict], Any]]] = {
    "bare": (".pth", lambda sd: sd),
    "state_dict": (".pth", lambda sd: {"state_dict": sd, "epoch": 3, "best_acc": 0.5}),
    "model": (".pt", lambda sd: {"model": sd, "optimizer": {"lr": 0.1}}),
    "ddp": (".pth", lambda sd: {f"module.{k}": v for k, v in sd.items()}),
    "compiled": (".bin", lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()}),
    "ddp_in_checkpoint": (".ckpt", lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}}),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_torch_files_of_every_usual_form_load_bit_identically(form: str, weights: dict, folder: Path) -> None:
    suffix, wrap = FORMS[form]
    path = folder / f"{form}{suffix}"
    torch.save(wrap(weights), path)
    built = build_from(path)
    assert_loaded(built, weights)
    assert built.report.source == str(path)
    assert built.report.unused == [] and built.report.reinitialised == {}
    assert set(built.report.new) == {k for k in built.model.state_dict() if k not in weights}


def test_a_legacy_format_file_loads(weights: dict, folder: Path) -> None:
    path = folder / "legacy.pth"
    torch.save(weights, path, _use_new_zipfile_serialization=False)
    assert_loaded(build_from(path), weights)


def test_safetensors_load_bit_identically(weights: dict, folder: Path) -> None:
    path = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    assert_loaded(build_from(path), weights)


def test_checkpoint_key_picks_the_entry(weights: dict, folder: Path) -> None:
    path = folder / "ema.pth"
    decoy = {k: torch.zeros_like(v) for k, v in weights.items()}
    torch.save({"model": decoy, "ema": weights}, path)
    assert_loaded(build_from(path, checkpoint_key="ema"), weights)
    err = load_error(path, checkpoint_key="emma")
    assert err.path == "model.checkpoint_key" and "model, ema" in err.expected


def test_a_relative_path_starts_at_the_spec_folder(weights: dict, tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()
    torch.save(weights, tmp_path / "w" / "r18.pth")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("model: {backbone: torchvision:resnet18, pretrained: w/r18.pth}\n")
    assert_loaded(build(load_spec(spec_file)), weights)


# --------------------------------------------------------------------------- files that cannot be read
def _truncated(weights: dict, folder: Path, suffix: str) -> Path:
    whole = folder / f"whole{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in weights.items()}, str(whole))
    else:
        torch.save(weights, whole)
    cut = folder / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return cut


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_truncated_file_is_an_error_at_pretrained(weights: dict, folder: Path, suffix: str) -> None:
    err = load_error(_truncated(weights, folder, suffix))
    assert err.path == "model.pretrained" and "cannot be read" in err.problem
    assert err.expected == "an intact PyTorch or safetensors weight file"


@pytest.mark.parametrize(
    ("name", "content"),
    [("garbage.pth", b"not a checkpoint at all"), ("empty.pth", b""), ("garbage.safetensors", b"\x00" * 64)],
)
def test_a_corrupt_file_is_an_error_at_pretrained(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    assert load_error(tmp_path / name).path == "model.pretrained"


def test_a_missing_file_is_an_error_at_pretrained(tmp_path: Path) -> None:
    err = load_error(tmp_path / "nothere.pth")
    assert err.path == "model.pretrained" and "does not exist" in err.problem
    assert load_error(tmp_path).problem == "the weight path is not a file"


class Pickled:  # a checkpoint that pickles Python objects is refused by weights_only loading
    pass


def test_a_file_with_pickled_objects_is_refused_with_a_hint(weights: dict, tmp_path: Path) -> None:
    torch.save({"state_dict": weights, "config": Pickled()}, tmp_path / "objects.pth")
    err = load_error(tmp_path / "objects.pth")
    assert err.path == "model.pretrained" and "torch.save(model.state_dict(), path)" in err.hint


@pytest.mark.parametrize("content", [{}, {"epoch": 3}, {"state_dict": {"note": "no tensors"}}])
def test_a_file_without_a_state_dict_is_an_error(tmp_path: Path, content: dict) -> None:
    torch.save(content, tmp_path / "empty.pth")
    err = load_error(tmp_path / "empty.pth")
    assert err.path == "model.pretrained" and "checkpoint_key" in err.hint


# --------------------------------------------------------------------------- files that do not fit
def test_weights_of_another_architecture_are_an_error_listing_mismatches(tmp_path: Path) -> None:
    import torchvision

    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")
    err = load_error(tmp_path / "r50.pth")
    assert err.path == "model.pretrained" and "do not fit torchvision:resnet18" in err.problem
    assert "layer1.0.conv1.weight: [64, 64, 1, 1] in the file, [64, 64, 3, 3] in the model" in err.found
    assert "and 18 more" in err.found  # 23 mismatches: five shown


def test_a_missing_tensor_is_an_error_naming_it(weights: dict, tmp_path: Path) -> None:
    torch.save({k: v for k, v in weights.items() if k != "layer3.1.bn2.running_var"}, tmp_path / "part.pth")
    err = load_error(tmp_path / "part.pth")
    assert "1 are missing" in err.problem and "layer3.1.bn2.running_var: not in the file" in err.found


def test_missing_step_counters_are_defaulted_not_errors(weights: dict, tmp_path: Path) -> None:
    torch.save({k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}, tmp_path / "nosteps.pth")
    built = build_from(tmp_path / "nosteps.pth")
    steps = [k for k in weights if k.endswith("num_batches_tracked")]
    assert sorted(built.report.defaulted) == sorted(steps)
    assert_loaded(built, weights, skip=tuple(steps))


def test_unused_tensors_are_an_error_until_dropped_on_purpose(weights: dict, tmp_path: Path) -> None:
    path = tmp_path / "extra.pth"
    torch.save({**weights, "extra.proj.weight": torch.ones(3), "extra.proj.bias": torch.ones(3)}, path)
    err = load_error(path)
    assert err.path == "model.pretrained" and "2 tensors of the weights fit nothing" in err.problem
    assert err.found == "extra.proj.weight, extra.proj.bias"
    built = build_from(path, key_map={r"^extra\..*": ""})
    assert_loaded(built, weights)
    assert built.report.unused == [] and built.report.mapped == {}


def test_a_regex_key_map_renames_and_reports(weights: dict, tmp_path: Path) -> None:
    path = tmp_path / "prefixed.pth"
    torch.save({f"backbone.{k}": v for k, v in weights.items()}, path)
    built = build_from(path, key_map={r"^backbone\.": ""})
    assert_loaded(built, weights)
    assert built.report.mapped == {k: f"backbone.{k}" for k in weights}


@pytest.mark.parametrize(
    ("key_map", "word"),
    [
        ({"^backbone\\.(": ""}, "regular expression"),
        ({"^(backbone)\\.": "\\2"}, "replacement"),
        ({"^backbone\\.layer[12]": "layer1"}, "two file keys"),
    ],
)
def test_a_bad_key_map_is_an_error_at_key_map(weights: dict, tmp_path: Path, key_map: dict, word: str) -> None:
    torch.save({f"backbone.{k}": v for k, v in weights.items()}, tmp_path / "p.pth")
    err = load_error(tmp_path / "p.pth", key_map=key_map)
    assert err.key_path[:2] == ("model", "key_map") and word in err.problem + (err.expected or "")


def _renamed(weights: dict) -> dict:
    """Keys from another codebase: every name differs, order and shapes do not."""
    out = {}
    for key, value in weights.items():
        new = key.replace("layer", "stage").replace("bn", "norm").replace("conv", "c").replace("downsample", "proj")
        out["backbone." + new.replace("fc.", "head.")] = value
    return out


def test_key_map_order_maps_renamed_keys_back_by_shape(weights: dict, tmp_path: Path) -> None:
    torch.save(_renamed(weights), tmp_path / "other.pth")
    built = build_from(tmp_path / "other.pth", key_map="order")
    assert_loaded(built, weights)  # step counters too: both sides have them all
    assert built.report.mapped == dict(zip(weights, _renamed(weights)))
    assert built.report.mapped["layer1.0.bn1.weight"] == "backbone.stage1.0.norm1.weight"


def test_key_map_order_allows_a_new_head(weights: dict, tmp_path: Path) -> None:
    torch.save(_renamed(weights), tmp_path / "other.pth")
    built = build_from(tmp_path / "other.pth", key_map="order", num_classes=10)
    assert_loaded(built, weights, skip=("fc.weight", "fc.bias"))
    assert set(built.report.reinitialised) == {"fc.weight", "fc.bias"}
    assert built.model.fc.weight.shape == (10, 512)


def test_key_map_order_rejects_other_counts_and_shapes(weights: dict, tmp_path: Path) -> None:
    fewer = dict(list(_renamed(weights).items())[:-3])
    torch.save(fewer, tmp_path / "fewer.pth")
    err = load_error(tmp_path / "fewer.pth", key_map="order")
    assert err.path == "model.key_map" and "as many tensors" in err.problem
    swapped = dict(_renamed(weights))
    keys = list(swapped)
    first, second = keys.index("backbone.c1.weight"), keys.index("backbone.norm1.weight")
    keys[first], keys[second] = keys[second], keys[first]
    torch.save({k: swapped[k] for k in keys}, tmp_path / "swapped.pth")
    err = load_error(tmp_path / "swapped.pth", key_map="order")
    assert err.path == "model.key_map" and "the shapes differ" in err.problem


# --------------------------------------------------------------------------- heads
@pytest.mark.parametrize(
    "backbone,head",
    [
        ("torchvision:resnet18", ("fc.weight", "fc.bias")),
        ("timm:resnet18", ("fc.weight", "fc.bias")),
        ("timm:convnext_atto", ("head.fc.weight", "head.fc.bias")),
    ],
)
def test_a_new_class_count_reinitialises_exactly_the_head(backbone: str, head: tuple, tmp_path: Path) -> None:
    plain = build(load_spec({"model": {"backbone": backbone}, "seed": 3})).model.state_dict()
    torch.save(plain, tmp_path / "w.pth")
    built = build(
        load_spec(
            {
                "model": {"backbone": backbone, "pretrained": str(tmp_path / "w.pth"), "num_classes": 7},
                "surgery": [{"insert": "eca", "at": "layer1" if "resnet" in backbone else "stages.1"}],
            }
        )
    )
    assert set(built.report.reinitialised) == set(head)
    assert all(reason.startswith("head: shape [7") for reason in built.report.reinitialised.values())
    state = built.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in plain.items() if k not in head)
    assert set(built.report.loaded) == set(plain) - set(head)
    assert state[head[0]].shape[0] == 7 and state[head[1]].shape == (7,)


# --------------------------------------------------------------------------- the report
def test_random_init_reports_random_and_new_keys() -> None:
    built = build(load_spec({"model": {"backbone": "torchvision:resnet18"}, "surgery": SURGERY}))
    report = built.report
    assert report.source == "random initialisation" and report.loaded == []
    assert set(report.random) | set(report.new) == set(built.model.state_dict())
    assert all(any(k.startswith(i.path + ".") for i in built.inserted) for k in report.new)


def test_report_to_dict_counts_every_list() -> None:
    report = LoadReport(loaded=["a", "b"], new=["c"], reinitialised={"d": "head"}, mapped={"a": "x.a"})
    out = report.to_dict()
    assert out["counts"] == {
        "loaded": 2,
        "reinitialised": 1,
        "new": 1,
        "random": 0,
        "unused": 0,
        "mapped": 1,
        "defaulted": 0,
        "kept": 0,
        "adapted": 0,
        "dropped": 0,
    }
    assert out["loaded"] == ["a", "b"]


def test_a_key_map_rule_that_matches_nothing_is_named_with_the_closest_keys(weights: dict, tmp_path: Path) -> None:
    """A typo in a rule would load nothing it was meant to: refused at the rule, never silent."""
    torch.save({f"backbone.{k}": v for k, v in weights.items()}, tmp_path / "p.pth")
    err = load_error(tmp_path / "p.pth", key_map={r"^bakcbone\.": "", r"^backbone\.": ""})
    assert err.path == "model.key_map.^bakcbone\\." and "matches no key of the weight file" in err.problem
    assert err.hint.startswith("did you mean 'backbone'")


# --------------------------------------------------------------------------- a ViT at another image size
def test_a_vit_position_embedding_is_resampled_to_the_image_size(tmp_path: Path) -> None:
    """Weights of a 64 px ViT (4x4 patches + cls token) in a 32 px one (2x2): the position embedding
    is resampled as timm does, its cls token as it was; every other tensor loads bit for bit."""
    from timm.layers import resample_abs_pos_embed

    vit = {"backbone": "timm:vit_tiny_patch16_224", "num_classes": 4}
    trained = build(
        load_spec({"model": {**vit, "args": {"img_size": 64}}, "data": {"image_size": 64}, "seed": 5})
    ).model
    state = trained.state_dict()
    torch.save(state, tmp_path / "vit64.pth")
    built = build(
        load_spec(
            {
                "model": {**vit, "args": {"img_size": 32}, "pretrained": str(tmp_path / "vit64.pth")},
                "data": {"image_size": 32},
            }
        )
    )
    assert list(built.report.adapted) == ["pos_embed"]
    assert built.report.adapted["pos_embed"].startswith("position embedding resampled [1, 17, 192] -> [1, 5, 192]")
    here = built.model.state_dict()
    expected = resample_abs_pos_embed(state["pos_embed"], new_size=[2, 2], num_prefix_tokens=1)
    torch.testing.assert_close(here["pos_embed"], expected)
    assert torch.equal(here["pos_embed"][:, :1], state["pos_embed"][:, :1])
    assert all(torch.equal(here[k], state[k]) for k in state if k != "pos_embed")
    assert set(built.report.loaded) == set(state) - {"pos_embed"} and not built.report.reinitialised


def test_a_weight_file_that_is_a_named_pipe_is_refused_not_read(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "weights.pth")  # torch.load would wait for a writer forever
    err = load_error(tmp_path / "weights.pth")
    assert err.problem == "the weight path is not a file" and err.found.endswith("weights.pth (a named pipe)")
