"""`surgery average`: WiSE-FT, model soups and SWA of finished runs, written as a new run directory.

    wise   one run: every tensor interpolated between the model before fine-tuning (the run's own
           spec built at step 0: pretrained weights, inserted modules at their identity init) and
           the fine-tuned one; a tensor that had no pretrained value (a new head) is kept fine-tuned.
           alpha given, or `auto`: the best of 0, 0.1, ..., 1 on the validation split.
    soup   several runs of one architecture: their uniform mean, or greedy (best validation first,
           each next run kept only if the soup's validation figure improves).
    swa    one run's last K kept epochs (train.keep_epochs), averaged.
BatchNorm: WiSE-FT interpolates the running statistics with the weights (so alpha 0 and 1 are
exactly the two models); soups of two runs or more and SWA recompute them on the training split
(`norms.recalibrate`), frozen norms left as they are.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import Origin, UsageError
from ..runs import layout, load_safetensors
from ..runs.derived import DERIVED, check_new, write_derived
from ..runs.loaded import REBUILD_OVERRIDES
from .norms import recalibrate, trained_norms
from .sources import Source, read_sources
from .states import interpolate, mean_state

ALPHA_GRID = tuple(i / 10 for i in range(11))  # `--wise auto`
METHODS = ("wise", "soup", "swa")


# --------------------------------------------------------------------------- the model's surroundings
class Bench:
    """A run's model, data and evaluation, built once (`surgery.train.prepare`): states are loaded
    into the one model, scored on the validation split and recalibrated on the training split."""

    def __init__(self, source: Source, device: str | None, pretrained: bool) -> None:
        from ..spec import load_spec
        from ..train.context import prepare

        spec = load_spec(source.run.file(layout.SPEC), () if pretrained else REBUILD_OVERRIDES)
        self.ctx = prepare(spec, device=device, runs_root=source.path.parent)
        self.start = self.state()  # the model before fine-tuning (its spec built at step 0)

    @property
    def model(self) -> torch.nn.Module:
        return self.ctx.model

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)

    def score(self, state: dict[str, torch.Tensor]) -> Any:
        """The validation result (`EpochResult`) of `state`."""
        from ..train.loop import evaluate

        self.load(state)
        return evaluate(self.ctx)

    def recalibrate(self, state: dict[str, torch.Tensor], norms: Sequence[str]) -> tuple[dict[str, torch.Tensor], int]:
        """`state` with the running statistics of `norms` recomputed over one pass of the training loader."""
        self.load(state)
        seen = recalibrate(self.model, self._train_inputs(), norms, self._forward)
        return self.state(), seen

    def state(self) -> dict[str, torch.Tensor]:
        """The model's state, copied to the CPU (where the weight files are read)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def _forward(self, x: torch.Tensor) -> Any:
        with self.ctx.runtime.autocast():
            return self.model(x)

    def _train_inputs(self):
        from ..train.loop import images_to_device

        limit = self.ctx.spec.train.limit_batches
        for step, (x, y) in enumerate(self.ctx.train_loader.epoch(0)):
            if limit is not None and step >= limit:
                break
            yield images_to_device(self.ctx, x, y)[0]

    def norms(self, rows: Sequence[dict[str, Any]]) -> list[str]:
        return trained_norms(self.model, self.ctx.built.groups, rows)


def headline(result: Any) -> float:
    return result.mean_ap if result.mean_ap is not None else result.acc


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(path)


# --------------------------------------------------------------------------- WiSE-FT
def parse_alpha(value: str) -> float | None:
    """`--wise`: a number in [0, 1], or auto (None).

    Raises:
        UsageError: not a number, or outside [0, 1].
    """
    if value.strip().lower() == "auto":
        return None
    try:
        alpha = float(value)
    except ValueError:
        alpha = math.nan
    if not 0.0 <= alpha <= 1.0:
        raise UsageError(
            "--wise takes alpha, the weight of the fine-tuned model, between 0 and 1",
            origin=Origin.flag("--wise", value),
            found=value,
            expected="a number in [0, 1] (0: the model before fine-tuning, 1: the fine-tuned run), or auto",
        )
    return alpha


def kept_keys(bench: Bench) -> set[str]:
    """Tensors with no pretrained value and no identity initialisation (a new head, a re-initialised
    module): WiSE-FT keeps them at their fine-tuned value."""
    from ..model.insert import inserted_paths

    built = bench.ctx.built
    inserted = tuple(p + "." for p in inserted_paths(bench.model))
    loaded = set(built.report.loaded)
    return {k for k in bench.start if k not in loaded and not k.startswith(inserted)}


def check_pretrained(source: Source) -> None:
    from ..spec import load_spec

    spec = load_spec(source.run.file(layout.SPEC))
    if spec.model.pretrained is False:
        raise spec.error(
            ("model", "pretrained"),
            "WiSE-FT interpolates toward the pretrained weights, and this run started from random ones",
            found="pretrained: false",
            expected="a run fine-tuned from pretrained weights (model.pretrained: true or a weight file)",
            hint="average it with others (--soup) or over its last epochs (--swa) instead",
        )


def wise(source: Source, bench: Bench, alpha: float | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """WiSE-FT of one run: the state and its record (alpha, and with auto the validation curve)."""
    tuned = _state(source.run.file(layout.FINAL))
    keep = kept_keys(bench)
    record: dict[str, Any] = {
        "kept_fine_tuned": sorted(keep),
        "batch_norm": "running statistics interpolated with the weights",
    }
    if alpha is None:
        curve = []
        for a in ALPHA_GRID:
            result = bench.score(interpolate(bench.start, tuned, a, keep))
            curve.append({"alpha": a, "val_score": headline(result), "val_loss": result.loss})
        # the best validation figure; ties: the lower loss, then the larger alpha
        best = max(curve, key=lambda p: (p["val_score"], -p["val_loss"], p["alpha"]))
        alpha = best["alpha"]
        record.update(alpha_chosen_on="val", curve=curve)
    record["alpha"] = alpha
    return interpolate(bench.start, tuned, alpha, keep), record


# --------------------------------------------------------------------------- soups
def soup_of(bench: Bench, states: Sequence[dict[str, torch.Tensor]], rows: Sequence[dict[str, Any]]):
    """The mean of `states`, its trained BatchNorms recomputed when there are two or more; the number of batches."""
    mean = mean_state(states)
    if len(states) < 2:
        return mean, 0  # the soup of one run is that run, bit for bit
    return bench.recalibrate(mean, bench.norms(rows))


def greedy_soup(
    ranked: Sequence[Any], score_of: Callable[[list[Any]], tuple[float, Any]]
) -> tuple[list[Any], Any, list[dict[str, Any]]]:
    """Model soups' greedy recipe: the first candidate, then each next one kept only if the soup's
    validation figure strictly improves.

    Args:
        ranked: candidates, best first.
        score_of: ingredients -> (validation figure of their soup, what to return for it).

    Returns:
        (the ingredients, the payload of their soup, every choice: candidate, score, added).
    """
    chosen = [ranked[0]]
    best, payload = score_of(chosen)
    choices = [{"candidate": ranked[0], "val_score": best, "added": True}]
    for candidate in ranked[1:]:
        score, trial = score_of([*chosen, candidate])
        added = score > best
        choices.append({"candidate": candidate, "val_score": score, "added": added})
        if added:
            chosen, best, payload = [*chosen, candidate], score, trial
    return chosen, payload, choices


def soup(sources: Sequence[Source], bench: Bench, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A uniform or greedy soup: the state and its record (ingredients; greedy: every choice)."""
    ranked = sorted(sources, key=lambda s: -s.val_score)  # stable: ties keep the order given
    states = {str(s.path): _state(s.run.file(layout.FINAL)) for s in ranked}
    rows = {str(s.path): s.run.metrics for s in ranked}

    def soup_from(paths: list[str]) -> tuple[dict[str, torch.Tensor], int]:
        return soup_of(bench, [states[p] for p in paths], [r for p in paths for r in rows[p]])

    if kind == "uniform":
        state, batches = soup_from(list(states))
        return state, {"ingredients": list(states), "bn_batches": batches}

    def score_of(paths: list[str]) -> tuple[float, tuple[dict[str, torch.Tensor], int]]:
        made = soup_from(paths)
        return headline(bench.score(made[0])), made

    chosen, (state, batches), choices = greedy_soup(list(states), score_of)
    choices = [{"run": c.pop("candidate"), **c} for c in choices]
    return state, {"ingredients": chosen, "choices": choices, "bn_batches": batches}


# --------------------------------------------------------------------------- SWA
def swa(source: Source, bench: Bench, epochs: int | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The mean of a run's last `epochs` kept epoch weights (default: all it kept), BatchNorm recomputed."""
    rows = source.run.metrics
    kept = {layout.epoch_of(p): p for p in layout.kept_epochs(source.path)}
    last = max((int(r["epoch"]) for r in rows), default=-1)
    want = epochs if epochs is not None else len(kept)
    window = list(range(last - want + 1, last + 1))
    missing = [e for e in window if e not in kept]
    if want < 1 or missing or last < 0:
        spec_keep = (source.raw.get("train") or {}).get("keep_epochs", 0)
        raise UsageError(
            f"SWA over the last {want} epoch(s) needs their weights, and the run kept {len(kept)}",
            origin=Origin.flag("--swa-epochs", want) if epochs is not None else Origin.path(source.path),
            found=f"train.keep_epochs: {spec_keep}; kept: " + (", ".join(str(e + 1) for e in sorted(kept)) or "none"),
            expected=f"checkpoints for epochs {', '.join(str(e + 1) for e in window) or '(none)'}",
            hint="train with train.keep_epochs: K (K at least --swa-epochs), or ask for fewer epochs",
        )
    states = [_state(kept[e]) for e in window]
    averaged_rows = [r for r in rows if int(r["epoch"]) in window]
    state, batches = soup_of(bench, states, averaged_rows)
    return state, {"epochs": [e + 1 for e in window], "bn_batches": batches}


# --------------------------------------------------------------------------- the command
def _method_of(wise_alpha: str | None, soup_kind: str | None, swa_on: bool) -> str:
    chosen = [m for m, on in zip(METHODS, (wise_alpha is not None, soup_kind is not None, swa_on)) if on]
    if len(chosen) != 1:
        raise UsageError(
            "choose one way of averaging" if chosen else "no way of averaging was chosen",
            origin=Origin.flag("surgery average"),
            found=" ".join(f"--{m}" for m in chosen) or "none of --wise, --soup, --swa",
            expected="exactly one of --wise ALPHA|auto, --soup uniform|greedy, --swa",
        )
    return chosen[0]


def _one_run(method: str, runs: Sequence[str]) -> None:
    if len(runs) != 1:
        raise UsageError(
            f"--{method} averages one run",
            origin=Origin.flag(f"--{method}"),
            found=f"{len(runs)} runs: " + ", ".join(runs),
            expected="one run directory (several runs: --soup uniform|greedy)",
        )


def average_runs(
    runs: Sequence[str | Path],
    out: str | Path,
    *,
    wise_alpha: str | None = None,
    soup_kind: str | None = None,
    swa_on: bool = False,
    swa_epochs: int | None = None,
    device: str | None = None,
    say: Callable[..., Any] = lambda *a, **k: None,
) -> Path:
    """Average finished runs into the new run directory `out`; return it.

    Args:
        runs: finished run directories (one for wise and swa; soups: one or more, of one architecture).
        wise_alpha: ``--wise``: "0".."1" or "auto". soup_kind: ``--soup``: uniform or greedy.
        swa_on, swa_epochs: ``--swa`` over the last `swa_epochs` kept epochs (default: every kept one).
        device: where to evaluate and recalibrate (default: the run's train.device).

    Raises:
        UserError: an unknown or missing method, alpha outside [0, 1], an unfinished run, runs that
            differ, a run without pretrained weights (wise), too few kept epochs (swa), `out` that exists.
    """
    method = _method_of(wise_alpha, soup_kind, swa_on)
    runs = [str(r) for r in runs]
    alpha = parse_alpha(wise_alpha) if method == "wise" else None
    if method == "soup" and soup_kind not in ("uniform", "greedy"):
        raise UsageError(
            f"unknown soup {soup_kind!r}",
            origin=Origin.flag("--soup", soup_kind),
            expected="uniform or greedy",
        )
    if method != "soup":
        _one_run(method, runs)
    check_new(out)
    sources = read_sources(runs)
    if method == "wise":
        check_pretrained(sources[0])
    # the new run keeps the spec, classes and splits of its base: the run itself, or a soup's best ingredient
    base = min(sources, key=lambda s: -s.val_score)
    wall = time.perf_counter()
    bench = Bench(base, device, pretrained=method == "wise")
    if method == "wise":
        state, record = wise(base, bench, alpha)
    elif method == "soup":
        state, record = soup(sources, bench, soup_kind)
    else:
        state, record = swa(base, bench, swa_epochs)
    final = bench.score(state)
    record = {
        "method": method if method != "soup" else f"soup-{soup_kind}",
        "sources": [{"run": str(s.path), "val_score": _finite(s.val_score)} for s in sources],
        **record,
    }
    say(
        f"{record['method']} of {len(sources)} run(s): val {headline(final):.4f}, the runs' own "
        + ", ".join(f"{s.val_score:.4f}" for s in sources)
    )
    summary = _summary(bench, final, time.perf_counter() - wall, Path(out).name, record)
    return write_derived(out, base.run, state, summary, lambda folder: _draw(folder, bench, say))


def _summary(bench: Bench, final: Any, wall: float, name: str, record: dict[str, Any]) -> dict[str, Any]:
    from ..train.summary import summary_of

    best = {"epoch": None, "val_acc": final.acc, "val_loss": final.loss}
    if final.mean_ap is not None:
        best["val_map"] = final.mean_ap
    summary = summary_of(bench.ctx, [], best, final, wall)
    summary["name"] = name
    summary[DERIVED] = record
    return summary


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _draw(folder: Path, bench: Bench, say: Callable[..., Any]) -> None:
    from ..train.final import write_drawn_files

    write_drawn_files(folder, bench.ctx.spec, say)


__all__ = [
    "ALPHA_GRID",
    "Bench",
    "average_runs",
    "interpolate",
    "greedy_soup",
    "kept_keys",
    "mean_state",
    "parse_alpha",
    "soup",
    "swa",
    "wise",
]
