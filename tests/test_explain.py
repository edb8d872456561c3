"""`surgery explain`: figures and predictions.json on a real run, the CAM without the inserted
modules, the modules' own gates, the default layer, and every kind of bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from PIL import Image

from surgery import load_spec
from surgery.cli import main

needs_grad_cam = pytest.mark.skipif(
    find_spec("pytorch_grad_cam") is None, reason="needs the grad-cam extra: pip install -e '.[grad-cam]'"
)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three digits PNGs (two of them share the stem '7', in two folders), one photo, one broken PNG."""
    from sklearn.datasets import load_digits, load_sample_images

    root = tmp_path_factory.mktemp("explain-images")
    digits = load_digits()
    (root / "a").mkdir()
    (root / "b").mkdir()
    for folder, i in (("a", 0), ("a", 7), ("b", 17)):  # digits 0, 7 and 7
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(root / folder / f"{digits.target[i]}.png")
    Image.fromarray(load_sample_images().images[1][::8, ::8]).save(root / "flower.jpg")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 8)
    return root


def _snapshot(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def run_copy(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("explain-run") / "tiny"
    shutil.copytree(tiny_run, out)
    return out


@needs_grad_cam
def test_three_images_give_three_figures_and_predictions(run_copy, images, capsys):
    before = _snapshot(run_copy)
    code = main(
        [
            "explain",
            str(run_copy),
            str(images / "a" / "0.png"),
            str(images / "a" / "7.png"),
            str(images / "b" / "7.png"),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    folder = run_copy / "explain"
    entries = json.loads((folder / "predictions.json").read_text())
    assert [e["png"] for e in entries] == ["0.png", "7.png", "7-2.png"]  # one stem twice: unique names
    classes = json.loads((run_copy / "classes.json").read_text())
    for entry in entries:
        with Image.open(folder / entry["png"]) as png:
            assert png.format == "PNG" and png.size[0] > 600
        assert entry["predicted"] in classes and entry["explained_class"] == entry["predicted"]
        assert 0 < entry["confidence"] <= 1
        assert entry["method"] == "gradcam" and entry["layer"] == "layer3"  # layer4 is 1x1 at 32 px
        assert entry["modules"] == ["layer2.se_after", "layer3.cbam_after", "layer4.cbam_after"]
        assert entry["backbone_predicted"] in classes
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "7-2.png", "7.png", "predictions.json"]
    assert "layer4's map is 1x1" in err
    after = _snapshot(run_copy)
    assert after.pop("report.html") != before.pop("report.html")  # the run's page refreshed, showing them
    assert after == {**before, **{f"explain/{k}": v for k, v in _snapshot(folder).items()}}
    assert "refreshed" in err and 'id="explain"' in (run_copy / "report.html").read_text()
    assert not [p for p in run_copy.iterdir() if p.name.startswith(".")]  # no staging folder left


@needs_grad_cam
def test_a_named_class_and_layer_and_another_out_folder(run_copy, images, tmp_path, capsys):
    out = tmp_path / "figs"
    assert (
        main(
            [
                "explain",
                str(run_copy),
                str(images / "flower.jpg"),
                "--class",
                "3",
                "--layer",
                "layer2",
                "--method",
                "eigengradcam",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    (entry,) = json.loads((out / "predictions.json").read_text())
    assert (entry["explained_class"], entry["layer"], entry["method"]) == ("3", "layer2", "eigengradcam")
    assert sorted(p.name for p in out.iterdir()) == ["flower.png", "predictions.json"]


def test_a_new_output_replaces_an_earlier_one_whole(tmp_path):
    from surgery.files import swap_in

    target, staging = tmp_path / "explain", tmp_path / ".explain.new-1"
    target.mkdir()
    (target / "old.png").write_bytes(b"old")
    staging.mkdir()
    (staging / "new.png").write_bytes(b"new")
    swap_in(staging, target, what="the figures")
    assert [p.name for p in target.iterdir()] == ["new.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["explain"]  # neither the old nor the staging folder left


@needs_grad_cam
def test_staging_folders_a_killed_explain_left_are_removed_by_the_next_one(run_copy, images, capsys):
    import os
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)  # a process that has ended: its staging folder is no one's
    left = [run_copy / f".explain.new-{dead}-k9x1", run_copy / ".explain.new-abcd1234"]  # and one from before pids
    running = run_copy / f".explain.new-{os.getppid()}-busy"  # a command still writing: left alone
    for folder in (*left, running):
        folder.mkdir()
        (folder / "half.png").write_bytes(b"half")
    os.utime(left[1], (0, 0))
    assert main(["explain", str(run_copy), str(images / "flower.jpg")]) == 0
    assert not any(folder.exists() for folder in left)
    assert running.exists()
    assert sorted(p.name for p in run_copy.iterdir() if p.name.startswith(".explain")) == [running.name]


@pytest.fixture(scope="module")
def loaded(tiny_run):
    """The shared run, loaded once, for tests that only read it."""
    from surgery.deploy.predict import load_run

    return load_run(tiny_run)


@needs_grad_cam
@pytest.mark.parametrize(
    "layer, words",
    [
        ("layer5", ["--layer layer5", "no module", "did you mean", "'layer4'"]),
        ("fc", ["--layer fc", "fc gives [1, 10], not a feature map", "layer4"]),
        ("layer3.cbam_after.attn.spatial.gaet", ["did you mean", "'layer3.cbam_after.attn.spatial.gate'"]),
        ("layer*.cbam_aftr", ["did you mean", "'layer*.cbam_after'"]),
    ],
)
def test_a_layer_that_is_not_a_feature_map_names_the_closest(loaded, layer, words):
    from surgery.errors import UsageError
    from surgery.explain.command import resolve_layers

    with pytest.raises(UsageError) as caught:
        resolve_layers(loaded.built, layer)
    assert all(w in str(caught.value) for w in words), str(caught.value)


def test_a_layer_called_twice_per_pass_is_refused():
    from surgery.errors import UsageError
    from surgery.explain.command import resolve_layers
    from surgery.model.builder import build

    built = build(
        load_spec(
            {
                "model": {"backbone": "torchvision:resnet18", "pretrained": False, "num_classes": 4},
                "data": {"image_size": 64},
            }
        )
    )
    with pytest.raises(UsageError, match="layer4.1.relu runs 2 times per forward pass") as caught:
        resolve_layers(built, "layer4.1.relu")  # torchvision's BasicBlock calls its one ReLU twice
    assert caught.value.hint == "the module that contains it, layer4.1"


@needs_grad_cam
def test_a_layer_inside_an_inserted_module_has_no_backbone_twin(loaded, images):
    from surgery.data.images import decode as _read
    from surgery.explain.command import Explainer, resolve_layers
    from surgery.explain.figure import render

    layers = resolve_layers(loaded.built, "layer3.cbam_after.attn.channel")
    explainer = Explainer(loaded, layers, "gradcam")
    try:
        item = explainer.explain(images / "flower.jpg", _read(images / "flower.jpg", loaded.transform), None)
    finally:
        explainer.close()
    assert item.backbone_cam is None and "inside an inserted module" in item.backbone_note
    assert item.cam.shape == (32, 32) and float(item.cam.max()) > 0
    assert render(item, loaded, layers, "gradcam")[:8] == b"\x89PNG\r\n\x1a\n"


@needs_grad_cam
def test_layer_globs_and_selectors_resolve_to_maps(loaded):
    from surgery.explain.command import resolve_layers

    assert resolve_layers(loaded.built, "layer*.cbam_after").paths == ("layer3.cbam_after", "layer4.cbam_after")
    assert resolve_layers(loaded.built, "@inserted").paths == (
        "layer2.se_after",
        "layer3.cbam_after",
        "layer4.cbam_after",
    )


@needs_grad_cam
def test_an_unknown_class_exits_2_and_writes_nothing(run_copy, images, capsys):
    before = _snapshot(run_copy)
    assert main(["explain", str(run_copy), str(images / "a" / "0.png"), "--class", "seven"]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in ["--class seven", "no class 'seven'", "one of the run's 10 classes"]), err
    assert "Traceback" not in err
    assert _snapshot(run_copy) == before


@needs_grad_cam
def test_unreadable_images_are_skipped_and_none_readable_exits_1(run_copy, images, tmp_path, capsys):
    out = tmp_path / "figs"
    assert (
        main(
            [
                "explain",
                str(run_copy),
                str(images / "broken.png"),
                str(images / "a" / "0.png"),
                str(images / "missing.png"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "skipped" in err and "broken.png" in err and "missing.png" in err
    assert [e["png"] for e in json.loads((out / "predictions.json").read_text())] == ["0.png"]
    before = _snapshot(out)
    assert main(["explain", str(run_copy), str(images / "broken.png"), "--out", str(out)]) == 1
    assert "no image could be read" in capsys.readouterr().err
    assert _snapshot(out) == before  # a command that explained nothing leaves the earlier output as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figs"]


@needs_grad_cam
def test_wrong_run_folders_and_outputs_are_clear_errors(tiny_run, run_copy, images, tmp_path, capsys):
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_run, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    before = _snapshot(no_weights)
    assert main(["explain", str(no_weights), str(images / "a" / "0.png")]) == 2
    assert "holds no trained weights" in capsys.readouterr().err
    assert _snapshot(no_weights) == before
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main(["explain", str(run_copy), str(images / "a" / "0.png"), "--out", str(taken)]) == 2
    assert "holds other files" in capsys.readouterr().err
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]


def test_the_cli_offers_every_method_and_only_those():
    from surgery.cli import _CAM_METHODS
    from surgery.explain.command import METHODS

    assert tuple(METHODS) == _CAM_METHODS  # kept in cli.py too, so that --help imports no torch
    if find_spec("pytorch_grad_cam") is not None:
        import pytorch_grad_cam

        assert all(hasattr(pytorch_grad_cam, name) for name in METHODS.values())


def test_without_the_grad_cam_extra_the_error_names_the_install(tiny_run, images, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # `import pytorch_grad_cam` now fails
    assert main(["explain", str(tiny_run), str(images / "a" / "0.png")]) == 2
    err = capsys.readouterr().err
    assert "pip install -e '.[grad-cam]'" in err.splitlines()[0] and "Traceback" not in err
    assert not (tiny_run / "explain").exists()


@needs_grad_cam
def test_with_gates_at_zero_the_cam_equals_the_cam_without_the_inserted_modules(tiny_run, images):
    from surgery.data.images import decode as _read
    from surgery.deploy.predict import load_run
    from surgery.explain.attention import bypass_inserted, inserted_modules
    from surgery.explain.command import Explainer, resolve_layers
    from surgery.model.backbones import create_backbone

    run = load_run(tiny_run)
    with torch.no_grad():
        for wrapper in inserted_modules(run.model).values():
            wrapper.gate.zero_()  # as an identity-initialised run is before its first step
    image = _read(images / "flower.jpg", run.transform)
    explainer = Explainer(run, resolve_layers(run.built, "layer3"), "gradcam")
    try:
        item = explainer.explain(images / "flower.jpg", image, None)
    finally:
        explainer.close()
    assert float(item.cam.max()) > 0  # a real map, not two flat ones
    np.testing.assert_array_equal(item.cam, item.backbone_cam)
    assert (item.predicted, item.confidence) == (item.backbone_predicted, item.backbone_confidence)
    # the bypassed model is the backbone before surgery, with the run's weights
    backbone = create_backbone(run.spec, fetch=False).model
    inserted = tuple(inserted_modules(run.model))
    backbone.load_state_dict(
        {k: v for k, v in run.model.state_dict().items() if not k.startswith(tuple(p + "." for p in inserted))},
        strict=True,
    )
    x = run.preprocess(image[None])
    with torch.no_grad():
        torch.testing.assert_close(bypass_inserted(run.model).eval()(x), backbone.eval()(x), rtol=0, atol=0)


@needs_grad_cam
def test_each_inserted_module_shows_its_own_gates(tiny_run, images):
    from surgery.data.images import decode as _read
    from surgery.deploy.predict import load_run
    from surgery.explain.command import Explainer, resolve_layers

    run = load_run(tiny_run)
    explainer = Explainer(run, resolve_layers(run.built, "layer2"), "scorecam")  # runs the model once per 16 channels
    try:
        item = explainer.explain(images / "a" / "0.png", _read(images / "a" / "0.png", run.transform), None)
    finally:
        explainer.close()
    kinds = {path: [(g.branch, g.kind, tuple(g.values.shape)) for g in m.gates] for path, m in item.attention.items()}
    assert kinds == {
        "layer2.se_after": [("", "channel", (128,))],
        "layer3.cbam_after": [("channel.gate", "channel", (256,)), ("spatial.gate", "spatial", (2, 2))],
        "layer4.cbam_after": [("channel.gate", "channel", (512,)), ("spatial.gate", "spatial", (1, 1))],
    }
    for module in item.attention.values():
        assert module.gate_value == float(run.model.get_submodule(module.path).gate)
        for gate in module.gates:
            assert 0 <= float(gate.values.min()) and float(gate.values.max()) <= 1  # sigmoid gates


@pytest.mark.parametrize(
    "backbone, surgery, size, layer",
    [
        ("timm:resnet10t", [{"insert": "cbam", "at": "layer4"}], 64, "layer4"),  # layer4.cbam_after runs inside layer4
        ("timm:resnet10t", [{"insert": "se", "at": "global_pool", "position": "before"}], 64, "global_pool.se_before"),
        ("torchvision:resnet18", [], 64, "layer4"),
        ("torchvision:squeezenet1_0", [], 64, "features"),  # its classifier (which holds the head) gives a map too
    ],
)
def test_the_default_layer_is_the_last_map_before_the_head(backbone, surgery, size, layer):
    from surgery.explain.command import default_layers
    from surgery.model.builder import build

    built = build(
        load_spec(
            {
                "model": {"backbone": backbone, "pretrained": False, "num_classes": 4},
                "surgery": surgery,
                "data": {"image_size": size},
            }
        )
    )
    assert default_layers(built).paths == (layer,)
