"""`surgery explain`: where a trained run looks, and what its inserted modules attend to.

For each image, in one forward pass of the run's surgered model: a class activation map by the
`grad-cam` package (Grad-CAM or one of its variants) for the predicted or a named class, and the
gates of every inserted module (`attention_maps.record_attention`). Then the same CAM of the
model without its inserted modules (`attention_maps.bypass_inserted`), for the same class, so
the two can be compared. One PNG per image (`explain_figure.render`) and predictions.json,
put in place together once every image is done: a failed command leaves no trace.

Which layer, by default: the last feature map before the classifier, read off the probe of
the surgered model (the run's `Built.shapes`): among the model's top-level children and its
inserted modules, the last one to finish whose output is a 4-D map (pools, identities and the
head left out). For a ResNet that is `layer4`, whose output already includes a module
inserted after it (`layer4.cbam_after` runs inside `layer4`); a module inserted after the
last stage outside it (before the global pool) ends later and is chosen instead. A 1 x 1 map
(a 32 px input to a ResNet) makes every CAM one flat value, so the last larger map is taken
then, and the command says so.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..data.images import batches, decode, images_or_skips
from ..errors import Origin, UsageError, describe_exception, did_you_mean
from ..files import staging_folder, swap_in
from ..model.builder import Built
from ..model.paths import nearest, select_modules
from ..runs import layout, open_run
from ..runs.loaded import LoadedRun
from .attention import bypass_inserted, record_attention
from .results import METHODS, Explained, Layers

_PROGRESS_BARS = frozenset({"scorecam", "ablationcam"})
INSTALL_HINT = "pip install -e '.[grad-cam]'"
DEFAULT_FOLDER = layout.EXPLAIN
PREDICTIONS = layout.EXPLAIN_PREDICTIONS


def require_grad_cam() -> Any:
    """The `pytorch_grad_cam` package, or a UsageError naming the extra that installs it."""
    try:
        import cv2  # noqa: F401 - grad-cam's overlay needs it; say so now, not after the first image
        import pytorch_grad_cam
    except ImportError as exc:
        raise UsageError(
            f"surgery explain needs the grad-cam package ({describe_exception(exc, 80)}): {INSTALL_HINT}",
            origin=Origin("flag", "surgery explain"),
            expected="the extra surgery[grad-cam] (grad-cam, which brings opencv)",
            hint=f"{INSTALL_HINT}  (or: pip install grad-cam)",
        ) from None
    return pytorch_grad_cam


# --------------------------------------------------------------------------- which layer


def _is_map(shape: Sequence[int] | None) -> bool:
    return shape is not None and len(shape) == 4


def _spatial(shape: Sequence[int], channels_last: bool) -> tuple[int, int]:
    return (int(shape[1]), int(shape[2])) if channels_last else (int(shape[2]), int(shape[3]))


def default_layers(built: Built) -> Layers:
    """The last feature map before the classifier (see the module docstring for the rule)."""
    from ..model.insert import channels_last

    modules = dict(built.model.named_modules())
    size = built.spec.data.image_size
    shapes = built.shapes
    candidates = [n for n in modules if n and "." not in n] + [i.path for i in built.inserted]

    def eligible(path: str) -> bool:
        module, seen = modules.get(path), shapes.get(path)
        if module is None or seen is None or not _is_map(seen.output) or seen.end < 0:
            return False
        if isinstance(module, nn.Identity) or "Pool" in type(module).__name__:
            return False
        return not any(h == path or h.startswith(path + ".") for h in built.head)

    found = sorted((p for p in dict.fromkeys(candidates) if eligible(p)), key=lambda p: shapes[p].end)
    if not found:
        raise UsageError(
            f"{built.spec.model.backbone} has no 4-D feature map before its head to take a CAM at",
            origin=Origin.flag("--layer"),
            found="no default layer",
            expected="a module whose output is (batch, channels, height, width)",
            hint="name one with --layer PATH (`surgery inspect RUN_DIR/spec.yaml` shows output shapes)",
        )
    last = found[-1]
    last_cl = channels_last(modules[last], shapes[last].output)
    if _spatial(shapes[last].output, last_cl) != (1, 1):
        return Layers((last,), last, last_cl)
    larger = [p for p in found if _spatial(shapes[p].output, channels_last(modules[p], shapes[p].output)) != (1, 1)]
    if not larger:
        return Layers(
            (last,), last, last_cl, note=f"{last}'s map is 1x1 at {size} px: every CAM there is one flat value"
        )
    pick = larger[-1]
    pick_cl = channels_last(modules[pick], shapes[pick].output)
    h, w = _spatial(shapes[pick].output, pick_cl)
    return Layers(
        (pick,),
        pick,
        pick_cl,
        note=f"{last}'s map is 1x1 at {size} px, which any CAM shows as one flat value; "
        f"explaining at {pick} ({h}x{w}) instead (--layer {last} to insist)",
    )


def resolve_layers(built: Built, pattern: str | None) -> Layers:
    """The layers `--layer` names (the project's path syntax, or @inserted), checked to give a map.

    Raises:
        UsageError: the pattern matches no module (naming the closest paths), or a module whose
            output is not a 4-D feature map, or maps laid out both ways.
    """
    from ..model.insert import channels_last

    if pattern is None:
        return default_layers(built)
    modules = dict(built.model.named_modules())
    origin = Origin.flag("--layer", pattern)
    if pattern == "@inserted":
        inserted = {i.path for i in built.inserted}
        paths = [p for p in modules if p in inserted]  # model order
        if not paths:
            raise UsageError(
                "this run has no inserted modules",
                origin=origin,
                found="@inserted",
                expected="a module path or glob of the model",
            )
    else:
        paths = select_modules(modules, pattern, None)
    if not paths:
        close = nearest(pattern, [p for p in modules if p])
        raise UsageError(
            f"no module of the run's model matches {pattern!r}",
            origin=origin,
            found=pattern,
            expected="a module path or glob of the run's surgered model (`surgery inspect "
            "RUN_DIR/spec.yaml` lists them), or @inserted",
            hint=("did you mean " + " or ".join(repr(c) for c in close) + "?") if close else None,
        )
    layouts = set()
    for path in paths:
        seen = built.shapes.get(path)
        if seen is not None and abs(seen.calls) != 1:  # grad-cam would pair one call's map with another's gradient
            raise UsageError(
                f"{path} runs {abs(seen.calls)} times per forward pass, so it has no one map to take a CAM at",
                origin=origin,
                found=path,
                expected="a module called once per forward pass",
                hint=f"the module that contains it, {path.rpartition('.')[0]}" if "." in path else None,
            )
        if seen is None or not _is_map(seen.output):
            what = (
                "is never called in the forward pass"
                if seen is None
                else f"gives {list(seen.output) if seen.output else 'no tensor'}"
            )
            maps = [
                p
                for p in modules
                if p and "." not in p and built.shapes.get(p) is not None and _is_map(built.shapes[p].output)
            ]
            raise UsageError(
                f"{path} {what}, not a feature map to take a CAM at",
                origin=origin,
                found=path,
                expected="a module whose output is (batch, channels, height, width)",
                hint=("feature maps here: " + ", ".join(maps[-4:])) if maps else None,
            )
        layouts.add(channels_last(modules[path], seen.output))
    if len(layouts) > 1:
        raise UsageError(
            "the layers mix channels-first and channels-last maps",
            origin=origin,
            found=pattern,
            expected="layers whose maps are laid out alike",
        )
    label = paths[0] if len(paths) == 1 else f"{pattern} ({len(paths)} layers, averaged)"
    return Layers(tuple(paths), label, layouts.pop())


def class_index(run: LoadedRun, name: str | None) -> int | None:
    """The index of `--class NAME` among the run's classes (None: the predicted class)."""
    if name is None:
        return None
    if name in run.classes:
        return run.classes.index(name)
    raise UsageError(
        f"the run has no class {name!r}",
        origin=Origin.flag("--class", name),
        found=name,
        expected=f"one of the run's {len(run.classes)} classes: "
        + ", ".join(run.classes[:12])
        + (" ..." if len(run.classes) > 12 else ""),
        hint=did_you_mean(name, run.classes),
    )


# --------------------------------------------------------------------------- the maps


class Explainer:
    """One CAM object per model, reused image after image; `close` removes grad-cam's hooks."""

    def __init__(self, run: LoadedRun, layers: Layers, method: str) -> None:
        grad_cam = require_grad_cam()
        self.run, self.layers, self.method = run, layers, method
        self.multi_label = run.spec.data.multi_label
        self._targets = grad_cam.utils.model_targets.ClassifierOutputTarget
        cls = getattr(grad_cam, METHODS[method])
        reshape = (lambda t: t.permute(0, 3, 1, 2)) if layers.channels_last else None
        model = run.model.requires_grad_(False)  # gradients reach the maps through the input, not the weights
        self.cam = cls(
            model=model, target_layers=[model.get_submodule(p) for p in layers.paths], reshape_transform=reshape
        )
        self.inserted = [i.path for i in run.built.inserted]
        self.backbone_cam, self.backbone_note = None, None
        inside = [p for p in layers.paths if any(p.startswith(i + ".") for i in self.inserted)]
        if inside:  # the model without its inserted modules has no such layer
            self.backbone_note = f"{inside[0]} is inside an inserted module,\nwhich the model without them lacks"
        elif self.inserted:
            twin = bypass_inserted(model)
            self.backbone_cam = cls(
                model=twin, target_layers=[twin.get_submodule(p) for p in layers.paths], reshape_transform=reshape
            )

    def close(self) -> None:
        for cam in (self.cam, self.backbone_cam):
            if cam is not None:
                cam.activations_and_grads.release()

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.detach().float()[0]
        return logits.sigmoid() if self.multi_label else logits.softmax(0)

    def _run(self, cam: Any, x: torch.Tensor, target: int | None) -> tuple[Any, torch.Tensor]:
        targets = None if target is None else [self._targets(target)]
        quiet = contextlib.redirect_stderr(io.StringIO()) if self.method in _PROGRESS_BARS else contextlib.nullcontext()
        with torch.enable_grad(), quiet:
            maps = cam(input_tensor=x.detach().requires_grad_(True), targets=targets)
        return maps[0], self._probabilities(cam.outputs)

    def explain(self, path: Path, image: torch.Tensor, target: int | None) -> Explained:
        """The CAM (and, with inserts, the bypassed model's) and the modules' gates for one image."""
        x = self.run.preprocess(image[None])
        with record_attention(self.run.model) as attention:
            cam, probs = self._run(self.cam, x, target)  # no target: grad-cam explains the top class
        predicted = int(probs.argmax())
        explained = predicted if target is None else target
        item = Explained(
            path=path,
            image=image,
            cam=cam,
            predicted=predicted,
            confidence=float(probs[predicted]),
            explained=explained,
            attention=attention,
            backbone_note=self.backbone_note,
        )
        if self.backbone_cam is not None:
            item.backbone_cam, bprobs = self._run(self.backbone_cam, x, explained)
            item.backbone_predicted = int(bprobs.argmax())
            item.backbone_confidence = float(bprobs[item.backbone_predicted])
        return item


def _entry(item: Explained, run: LoadedRun, layers: Layers, method: str) -> dict[str, Any]:
    entry = {
        "image": str(item.path),
        "png": item.png,
        "predicted": run.classes[item.predicted],
        "confidence": round(item.confidence, 6),
        "explained_class": run.classes[item.explained],
        "layer": ", ".join(layers.paths),
        "method": method,
        "modules": list(item.attention),
    }
    if item.backbone_predicted is not None:
        entry["backbone_predicted"] = run.classes[item.backbone_predicted]
        entry["backbone_confidence"] = round(float(item.backbone_confidence), 6)
    return entry


def _png_name(path: Path, taken: set[str]) -> str:
    stem, n = path.stem or "image", 2
    name = f"{stem}.png"
    while name.lower() in taken:  # two images with one stem (a/1.png, b/1.png): 1.png, 1-2.png
        name, n = f"{stem}-{n}.png", n + 1
    taken.add(name.lower())
    return name


# --------------------------------------------------------------------------- the output folder
def _check_target(target: Path, origin: Origin) -> None:
    """A folder that may be replaced: absent, empty, or an earlier explain output."""
    if target.exists() and not target.is_dir():
        raise UsageError(
            f"{target} is a file",
            origin=origin,
            found=str(target),
            expected="a folder for the figures, or a path that does not exist yet",
        )
    if target.is_dir() and any(target.iterdir()) and not (target / PREDICTIONS).is_file():
        raise UsageError(
            f"{target} holds other files; explain replaces its output folder whole",
            origin=origin,
            found=str(target),
            expected=f"an empty folder, a new path, or an earlier explain output (with its {PREDICTIONS})",
            hint="pass another --out DIR",
        )


# --------------------------------------------------------------------------- the command
def explain_command(
    run_dir: str | Path,
    paths: Sequence[str],
    *,
    layer: str | None = None,
    class_name: str | None = None,
    method: str = "gradcam",
    out: str | Path | None = None,
    device: str | None = None,
) -> int:
    """`surgery explain RUN_DIR IMAGE... [--layer PATH] [--class NAME] [--method M] [--out DIR] [--device D]`.

    Writes one PNG per readable image and predictions.json into RUN_DIR/explain (or --out),
    replacing an earlier explain output there, all at once when every image is done.

    Returns:
        0 when at least one image was explained, 1 when none could be read (nothing written).

    Raises:
        UserError: grad-cam missing, no such run or weights, no image given, unknown class or
            layer, an output folder that holds other files (exit 2); a folder that cannot be
            written (RunDirError, exit 1).
    """
    from rich.markup import escape

    from ..untrusted import Console

    require_grad_cam()
    _check_method(method)
    # --- the run and the output folder, checked before the model is rebuilt
    run_dir = Path(run_dir)
    trained = open_run(run_dir)
    trained.require_trained()
    target = Path(out) if out is not None else run_dir / DEFAULT_FOLDER
    _check_target(target, Origin.flag("--out", out) if out is not None else Origin.path(target))
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    out_console = Console(highlight=False, soft_wrap=True)
    images, _ = images_or_skips(paths, err, "explain", "IMAGE...")
    # --- the model, the class to explain and the layers to explain it at
    run = trained.load(device)
    if run.note:
        err.print(f"[yellow]note[/yellow] {escape(run.note)}")
    wanted = class_index(run, class_name)
    layers = resolve_layers(run.built, layer)
    if layers.note:
        err.print(f"[yellow]note[/yellow] {escape(layers.note)}")
    # --- one figure per readable image, put in place together
    entries = _explain_images(Explainer(run, layers, method), images, wanted, target, err, out_console)
    if entries is None:
        return 1
    # --- what was written
    err.print(
        f"wrote {len(entries)} figure{'s' if len(entries) != 1 else ''} and {PREDICTIONS} to "
        f"{escape(str(target))} ({METHODS[method]} at {escape(layers.label)})"
    )
    if target == run_dir / DEFAULT_FOLDER:  # the run's own page shows them
        _refresh_run_page(run_dir, err)
    return 0


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise UsageError(
            f"unknown CAM method {method!r}",
            origin=Origin.flag("--method", method),
            found=method,
            expected="one of " + ", ".join(METHODS),
            hint=did_you_mean(method, METHODS),
        )


def _explain_images(
    explainer: Explainer, images: Sequence[Path], wanted: int | None, target: Path, err: Any, out_console: Any
) -> list[dict[str, Any]] | None:
    """Explain each image into a staging folder swapped in for `target` once all are done; return
    predictions.json's entries, or None (and nothing written) when no image could be read.
    The explainer is closed, and a staging folder left behind by a failure removed, either way."""
    from rich.markup import escape

    from ..files import atomic_write_bytes, write_json
    from .figure import render

    run, layers, method = explainer.run, explainer.layers, explainer.method
    staging: Path | None = None
    entries: list[dict[str, Any]] = []
    taken: set[str] = set()
    try:

        def skip(path: Path, reason: str) -> None:
            err.print(f"[yellow]skipped[/yellow] {escape(str(path))}: {escape(reason)}")

        for (path,), image in batches(images, lambda p: decode(p, run.transform), 1, skip):
            item = explainer.explain(path, image[0], wanted)
            item.png = _png_name(path, taken)
            staging = staging or staging_folder(target)  # and removes what a killed explain left there
            atomic_write_bytes(staging / item.png, render(item, run, layers, method))
            entries.append(_entry(item, run, layers, method))
            out_console.print(
                f"{path}  {run.classes[item.predicted]} ({item.confidence:.3f})  -> {target / item.png}", markup=False
            )
        if staging is None:
            err.print(f"[bold red]error[/bold red] no image could be read ({len(images)} tried); nothing written")
            return None
        write_json(staging / PREDICTIONS, entries)
        swap_in(staging, target, what="the figures")  # an earlier output is removed once the new one is there
        staging = None
    finally:
        explainer.close()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return entries


def _refresh_run_page(run_dir: Path, err: Any) -> None:
    from rich.markup import escape

    from ..pages.run_page import refresh_report

    if refresh_report(run_dir, lambda text: err.print(f"[yellow]warning[/yellow]: {escape(text)}")):
        err.print(f"refreshed {escape(str(run_dir / layout.REPORT))}")


__all__ = [
    "METHODS",
    "Explained",
    "Explainer",
    "Layers",
    "class_index",
    "default_layers",
    "explain_command",
    "require_grad_cam",
    "resolve_layers",
]
