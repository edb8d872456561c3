"""`surgery export`: a trained run as a deployable file (pt2, onnx or torchscript), checked against the run.

The exported model includes the inserted modules and takes the normalised float NCHW input the
run trained on; a JSON sidecar beside it carries the class names, input size, mean and std, and
the result of the check: the largest absolute difference between the reloaded export's logits
and the trained model's on a sample batch. A file that fails the check is not written.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .. import files
from ..errors import Origin, UsageError, describe_exception, shorten
from ..runs import layout, open_run
from ..runs.loaded import LoadedRun

SUFFIXES = {"pt2": ".pt2", "onnx": ".onnx", "torchscript": ".ts"}
SAMPLE_SIZE = 4
EXAMPLE_BATCH = 2  # the batch traced with; not 1, which torch.export would specialise as a constant
TOLERANCE = 1e-3  # of max(1, largest logit): kernel differences stay far below, a wrong graph far above
# packages each format needs to export, and the one that lets the check compare outputs
REQUIRED = {"pt2": (), "torchscript": (), "onnx": ("onnx", "onnxscript")}
CHECKER = {"onnx": "onnxruntime"}

Forward = Callable[[torch.Tensor], torch.Tensor]


class ExportFailed(RuntimeError):
    """The exporter could not handle the model, or the export does not compute what the run does."""


@dataclass
class ExportResult:
    """What `export_run` wrote and how well the export matches the trained model.

    max_abs_diff is None when the outputs could not be compared (onnx without onnxruntime).
    batch is None for a dynamic batch dimension, else the only batch size the file accepts.
    """

    format: str
    path: Path
    sidecar: Path
    method: str
    max_abs_diff: float | None
    compared_with: str
    batch: int | None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- packages
def _missing(names: tuple[str, ...]) -> list[str]:
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def check_requirements(fmt: str) -> None:
    """Raise a UsageError naming the extra to install when `fmt` needs packages that are absent."""
    missing = _missing(REQUIRED[fmt])
    if missing:
        extra = [CHECKER[fmt]] if fmt in CHECKER and _missing((CHECKER[fmt],)) else []
        verb = "is" if len(missing) == 1 else "are"
        raise UsageError(
            f"exporting to {fmt} needs {' and '.join(missing)}, which {verb} not installed",
            origin=Origin.flag("--format", fmt),
            found=f"--format {fmt}",
            expected=f"the packages {', '.join(REQUIRED[fmt])} (the extra surgery[{fmt}])",
            hint=f"pip install 'surgery[{fmt}]' (or: pip install {' '.join(missing + extra)})"
            + (f"  ({extra[0]} lets the export be checked against the trained model)" if extra else ""),
        )


# --------------------------------------------------------------------------- the exporters
def _dynamic_or_static(
    export: Callable[[torch.Tensor, bool], Any], sample: torch.Tensor, notes: list[str]
) -> tuple[Any, int | None]:
    """Export with a dynamic batch dimension; when the model will not allow it, with batch 1."""
    try:
        return export(sample[:EXAMPLE_BATCH], True), None
    except Exception as exc:  # noqa: BLE001 - any failure here is retried with a fixed batch
        notes.append(f"a dynamic batch failed ({describe_exception(exc)}); exported with a fixed batch of 1")
        return export(sample[:1], False), 1


def _export_pt2(model: nn.Module, sample: torch.Tensor, path: Path, notes: list[str]) -> tuple[str, int | None]:
    def export(example: torch.Tensor, dynamic: bool) -> Any:
        shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
        return torch.export.export(model, (example,), dynamic_shapes=shapes)

    program, batch = _dynamic_or_static(export, sample, notes)
    buffer = io.BytesIO()  # in memory: torch's own file writer aborts the process on a full disk
    torch.export.save(program, buffer)
    files.write_raw(path, buffer.getvalue())
    return "torch.export.export", batch


def _load_pt2(path: Path) -> Forward:
    return torch.export.load(str(path)).module()


def _export_torchscript(model: nn.Module, sample: torch.Tensor, path: Path, notes: list[str]) -> tuple[str, int | None]:
    # torch.jit is deprecated in favour of torch.export, but still what many C++ and mobile runtimes load
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*deprecated.*")
        try:
            # on a copy: scripting swaps modules with inserts for their scriptable form in place
            module, method = torch.jit.script(copy.deepcopy(model)), "torch.jit.script"
        except Exception as exc:  # noqa: BLE001 - script rejects much Python (the surgered forward's *args): trace
            first = describe_exception(exc)
            notes.append(
                f"torch.jit.script failed ({first}); traced instead, which records "
                "the operations run on the sample (fine for models without data-dependent control flow)"
            )
            try:
                module = torch.jit.trace(model, sample[:EXAMPLE_BATCH], check_trace=False)
            except Exception as exc2:  # noqa: BLE001
                raise ExportFailed(
                    f"torchscript: torch.jit.script failed ({first}) and torch.jit.trace "
                    f"failed too ({describe_exception(exc2, 300)}). Export with --format pt2 "
                    "(torch.export) or --format onnx instead"
                ) from None
            method = "torch.jit.trace"
        buffer = io.BytesIO()  # in memory, as for pt2
        torch.jit.save(module, buffer)
        files.write_raw(path, buffer.getvalue())
    tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if tracer:
        notes.append(
            f"the tracer warned {len(tracer)} times (e.g. {shorten(tracer[0].message)}); "
            "the output check below is what counts"
        )
    return method, None


def _load_torchscript(path: Path) -> Forward:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*deprecated.*")
        return torch.jit.load(str(path), map_location="cpu")


def _export_onnx(model: nn.Module, sample: torch.Tensor, path: Path, notes: list[str]) -> tuple[str, int | None]:
    def export(example: torch.Tensor, dynamic: bool) -> Any:
        shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
        return torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            verbose=False,
            dynamic_shapes=shapes,
            input_names=["input"],
            output_names=["logits"],
        )

    program, batch = _dynamic_or_static(export, sample, notes)
    program.save(str(path), external_data=False)  # one self-contained file; these models are far below 2 GB
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    return "torch.onnx.export(dynamo=True)", batch


def _load_onnx(path: Path) -> Forward | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    return forward


EXPORTERS = {
    "pt2": (_export_pt2, _load_pt2, "torch.export.load"),
    "torchscript": (_export_torchscript, _load_torchscript, "torch.jit.load"),
    "onnx": (_export_onnx, _load_onnx, "onnxruntime"),
}


# --------------------------------------------------------------------------- check and write
def sample_batch(run: LoadedRun, n: int = SAMPLE_SIZE, seed: int = 0) -> torch.Tensor:
    """n inputs in the model's normalised space: standard normal is what normalised images look like."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, run.data_config["input_size"][0], run.image_size, run.image_size, generator=generator)


@torch.inference_mode()
def _outputs(forward: Forward, sample: torch.Tensor, batch: int | None) -> torch.Tensor:
    chunks = [sample] if batch is None else list(sample.split(batch))
    return torch.cat([forward(c).float() for c in chunks])


def default_path(run_dir: Path, fmt: str) -> Path:
    return Path(run_dir) / layout.EXPORT / f"model{SUFFIXES[fmt]}"


def _out_path(run: LoadedRun, fmt: str, out: str | Path | None) -> Path:
    if out is None:
        return default_path(run.run_dir, fmt)
    folder = str(out).endswith(("/", os.sep))  # Path() would drop the slash that says "a folder"
    out = Path(out)
    if folder or out.is_dir():
        return out / f"model{SUFFIXES[fmt]}"
    return out


def _sidecar(run: LoadedRun, result: ExportResult, sample: torch.Tensor) -> dict[str, Any]:
    size = run.image_size
    config = run.data_config
    versions = {"torch": torch.__version__}
    if result.format == "onnx":
        for name in ("onnx", "onnxscript", "onnxruntime"):
            with contextlib.suppress(ImportError):
                versions[name] = importlib.import_module(name).__version__
    return {
        "format": result.format,
        "file": result.path.name,
        "method": result.method,
        "run": str(run.run_dir),
        "name": run.spec.name,
        "backbone": run.spec.model.backbone,
        "weights": str(run.weights),
        "inserted": [i.path for i in run.built.inserted],
        "classes": run.classes,
        "num_classes": len(run.classes),
        "input": {
            "description": "normalised float32 images (RGB, or gray for one input channel), NCHW: "
            "x = (pixel / 255 - mean) / std; "
            "the model does not normalise, resize or crop",
            "name": "input",
            "shape": ["batch" if result.batch is None else result.batch, run.data_config["input_size"][0], size, size],
            "dtype": "float32",
            "mean": list(run.mean),
            "std": list(run.std),
            "image_size": size,
            "resize": {
                "interpolation": config.get("interpolation"),
                "crop_pct": config.get("crop_pct"),
                "crop_mode": config.get("crop_mode"),
                "note": "as `surgery predict`: images no larger than image_size are resized whole; larger ones "
                "resized to image_size / crop_pct and cropped",
            },
        },
        "output": {
            "name": "logits",
            "shape": ["batch" if result.batch is None else result.batch, len(run.classes)],
            "description": "logits in the order of `classes`; softmax gives probabilities",
        },
        "check": {
            "inputs": f"{sample.shape[0]} standard normal inputs of shape {list(sample.shape[1:])} (seed 0)",
            "compared_with": result.compared_with,
            "max_abs_diff": result.max_abs_diff,
            "tolerance": TOLERANCE,
        },
        "notes": result.notes,
        "versions": versions,
    }


def export_run(
    run: LoadedRun | str | Path, fmt: str, out: str | Path | None = None, weights: str | None = None
) -> ExportResult:
    """Export a run's surgered model to `fmt`, reload it, and compare its logits with the trained model's.

    Args:
        run: a `LoadedRun` (from `Run.load`) or a run directory.
        fmt: "pt2" (torch.export), "onnx" (torch.onnx dynamo exporter) or "torchscript".
        out: the file to write (a folder gets model.<suffix>); default RUN_DIR/export/model.<pt2|onnx|ts>.
        weights: for a run directory: None (final, else best), final, best or ema.

    Returns:
        An `ExportResult`; the file and its sidecar (``<file>.json``) are written atomically
        through `surgery.files`.

    Raises:
        UsageError: unknown format, or a package the format needs is missing (with the pip command).
        ExportFailed: the exporter rejects the model, or the reloaded export's logits differ from
            the trained model's by more than the tolerance (then nothing is written).
        RunDirError: the file cannot be written (a full disk, a read-only folder): nothing is left.

    Example:
        >>> result = export_run("runs/resnet18-cbam", "onnx")
        >>> result.max_abs_diff < 1e-4
        True
    """
    # --- the format, the model and its reference outputs
    _check_format(fmt)
    check_requirements(fmt)
    if not isinstance(run, LoadedRun):
        run = open_run(run).load("cpu", weights)
    model = run.model.to("cpu").eval()
    path = _out_path(run, fmt, out)
    sample = sample_batch(run)
    reference = _outputs(model, sample, None)
    notes: list[str] = []
    if run.built.adapters:
        notes.append(f"LoRA merged into the weights of {len(run.built.adapters)} layers (the backbone's architecture)")
    done: dict[str, Any] = {}

    # --- export, reload and compare: the file is put in place only when it matches
    def write(tmp: Path) -> None:
        done["method"], done["batch"] = _export_file(fmt, model, sample, tmp, notes)
        done["diff"], done["compared_with"] = _reload_and_compare(fmt, tmp, sample, reference, done["batch"], notes)

    _write_model(path, write)
    # --- the sidecar beside it
    sidecar = path.with_name(path.name + ".json")
    result = ExportResult(
        format=fmt,
        path=path,
        sidecar=sidecar,
        method=done["method"],
        max_abs_diff=done["diff"],
        compared_with=done["compared_with"],
        batch=done["batch"],
        notes=notes,
    )
    _write_sidecar(run, result, sample)
    return result


def _check_format(fmt: str) -> None:
    if fmt not in EXPORTERS:
        raise UsageError(
            f"unknown export format {fmt!r}",
            origin=Origin.flag("--format", fmt),
            found=fmt,
            expected=" or ".join(EXPORTERS),
        )


def _export_file(
    fmt: str, model: nn.Module, sample: torch.Tensor, tmp: Path, notes: list[str]
) -> tuple[str, int | None]:
    """Export to `tmp`: (the method used, the fixed batch or None); any exporter failure is an ExportFailed."""
    exporter = EXPORTERS[fmt][0]
    try:
        method, batch = exporter(model, sample, tmp, notes)
    except (ExportFailed, OSError):  # a full disk is the folder's problem, not the model's
        raise
    except Exception as exc:  # noqa: BLE001 - the exporter's own message is the useful part
        raise ExportFailed(f"{fmt}: the exporter failed on this model: " + describe_exception(exc, 600)) from None
    return method, batch


def _reload_and_compare(
    fmt: str, tmp: Path, sample: torch.Tensor, reference: torch.Tensor, batch: int | None, notes: list[str]
) -> tuple[float | None, str]:
    """Reload the written file and run it on the sample: (the largest logit difference, what ran it).

    Raises:
        ExportFailed: the file does not reload or run, or its logits differ by more than the tolerance.
    """
    _, loader, compared_with = EXPORTERS[fmt]
    try:
        forward = loader(tmp)
        diff = None if forward is None else float((_outputs(forward, sample, batch) - reference).abs().max())
    except Exception as exc:  # noqa: BLE001 - a file that does not load or run is a failed export
        raise ExportFailed(
            f"{fmt}: the written file does not reload and run on a {list(sample.shape)} input: "
            + describe_exception(exc, 400)
        ) from None
    if forward is None:
        notes.append(f"outputs were not compared: `pip install {CHECKER[fmt]}` to run the export and compare")
        return diff, "onnx.checker only"
    limit = TOLERANCE * max(1.0, float(reference.abs().max()))
    if not diff <= limit:
        raise ExportFailed(
            f"{fmt}: the export's logits differ from the trained model's by up to {diff:.3g} "
            f"(more than {limit:.3g}); nothing was written"
        )
    return diff, compared_with


def _write_model(path: Path, write: Callable[[Path], None]) -> None:
    """`files.write_with`; a folder that cannot be written is a UsageError naming --out."""
    from ..errors import RunDirError

    try:
        files.write_with(path, write)
    except RunDirError as exc:
        if exc.problem.startswith("cannot write in "):
            raise UsageError(
                exc.problem,
                origin=Origin.path(path),
                found=str(path),
                expected="a writable folder",
                hint="choose another place with --out PATH",
            ) from None
        raise


def _write_sidecar(run: LoadedRun, result: ExportResult, sample: torch.Tensor) -> None:
    """Write ``<file>.json``; when it cannot be written, remove the model too."""
    from ..errors import RunDirError

    try:
        files.write_json(result.sidecar, _sidecar(run, result, sample))
    except RunDirError:
        result.path.unlink(missing_ok=True)  # a model without its sidecar (classes, mean, std) is not deployable
        raise


def export_command(
    run_dir: str | Path, fmt: str = "pt2", out: str | Path | None = None, weights: str | None = None
) -> int:
    """`surgery export RUN_DIR --format pt2|onnx|torchscript [--out PATH] [--weights final|best|ema]`;
    exit 1 when the export fails or cannot be written."""
    from rich.markup import escape

    from ..untrusted import Console

    console = Console(highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    trained = open_run(run_dir)
    trained.require_trained(weights)
    check_requirements(fmt)  # before the model is rebuilt: a missing package is the quicker answer
    run = trained.load("cpu", weights)
    if run.note:
        err.print(f"[yellow]note[/yellow] {escape(run.note)}")
    try:
        result = export_run(run, fmt, out)
    except ExportFailed as exc:
        err.print(f"[bold red]export failed[/bold red] {escape(str(exc))}")
        return 1
    for note in result.notes:
        err.print(f"[yellow]note[/yellow] {escape(note)}")
    check = (
        "outputs not compared"
        if result.max_abs_diff is None
        else f"max abs diff {result.max_abs_diff:.3g} vs the trained model ({result.compared_with})"
    )
    batch = "dynamic" if result.batch is None else result.batch
    console.print(
        f"[green]wrote[/green] {escape(str(result.path))} ({result.method}, "
        f"{len(run.built.inserted)} inserted modules, batch {batch}); {check}"
    )
    console.print(
        f"[green]wrote[/green] {escape(str(result.sidecar))}: classes, input size {run.image_size}, "
        "mean/std; the model takes normalised float NCHW input"
    )
    return 0


__all__ = [
    "ExportFailed",
    "ExportResult",
    "export_run",
    "export_command",
    "check_requirements",
    "default_path",
    "sample_batch",
    "SUFFIXES",
]
