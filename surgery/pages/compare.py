"""`surgery compare RUN_DIR...`: finished runs side by side, seeds of one variant as mean ± std.

    collect(run_dirs)           each finished run's figures -> [RunRow] (in the order given)
    aggregate(rows, labels)     runs grouped into variants -> [VariantRow], best first
    to_markdown / to_json / to_table / write_html   the same table as text, JSON, a terminal
                                table, or a self-contained page with the validation curves overlaid

A variant is a set of runs that differ only in their seed: by default, runs whose resolved
``spec.yaml`` files are equal once ``seed`` and ``name`` are set aside. Its label is the part
of the run names they share, cut at a ``-``, ``_`` or ``.`` (``cbam-s0`` and ``cbam-s1`` make
``cbam``); two variants that would get the same label (runs all named ``quickstart``, say) are
told apart by what their specs set differently from the first one
(``quickstart (train.epochs=4)``). `aggregate` takes explicit labels instead, by run directory.

Figures: ``best`` is the best epoch's validation accuracy (mAP for multi-label runs, which are
compared only with each other), ``final`` the last epoch's model's, ``images_per_sec`` the
median over epochs of the training images per second, std the sample standard deviation
(n - 1), absent for a variant of one run. Importing this module does not import torch.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Origin, UsageError, printable
from ..runs import layout, open_run
from .paired import Significance

_SEPARATORS = "-_."


@dataclass(frozen=True)
class RunRow:
    """One finished run's figures.

    metric: what `best`, `final` and `val_curve` measure, ``val_acc`` or ``val_map`` (multi-label).
    best_epoch: 0-based, as summary.json counts (shown from 1). val_curve: one value per epoch.
    spec: the resolved spec without ``name`` and ``seed``, which decides the default variant.
    """

    name: str
    run_dir: Path
    seed: int | None
    metric: str
    best: float | None
    final: float | None
    best_epoch: int | None
    params_total: int | None
    params_inserted: int | None
    images_per_sec: float | None
    wall_seconds: float | None
    val_curve: tuple[float | None, ...]
    spec: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "run_dir": str(self.run_dir),
            "seed": self.seed,
            "metric": self.metric,
            "best": self.best,
            "final": self.final,
            "best_epoch": self.best_epoch,
            "params_total": self.params_total,
            "params_inserted": self.params_inserted,
            "images_per_sec": self.images_per_sec,
            "wall_seconds": self.wall_seconds,
            "val_curve": list(self.val_curve),
        }


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation of one figure over a variant's runs (None: no run has it)."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> "Stat":
        present = [v for v in values if v is not None]
        if not present:
            return cls(None, None, 0)
        return cls(statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None, len(present))

    def format(self, spec: str = ".4f") -> str:
        """``0.9609 ± 0.0032``, ``0.9609`` for one run, ``-`` for none."""
        if self.mean is None:
            return "-"
        return f"{self.mean:{spec}}" + (f" ± {self.std:{spec}}" if self.std is not None else "")

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "n": self.n}


@dataclass(frozen=True)
class VariantRow:
    """The runs of one variant and their figures as `Stat`s."""

    label: str
    runs: tuple[RunRow, ...]
    metric: str
    best: Stat
    final: Stat
    best_epoch: Stat
    params_total: Stat
    params_inserted: Stat
    images_per_sec: Stat
    wall_seconds: Stat

    @classmethod
    def of(cls, label: str, runs: Sequence[RunRow]) -> "VariantRow":
        return cls(
            label=label,
            runs=tuple(runs),
            metric=runs[0].metric,
            best=Stat.of(r.best for r in runs),
            final=Stat.of(r.final for r in runs),
            best_epoch=Stat.of(None if r.best_epoch is None else r.best_epoch + 1 for r in runs),
            params_total=Stat.of(r.params_total for r in runs),
            params_inserted=Stat.of(r.params_inserted for r in runs),
            images_per_sec=Stat.of(r.images_per_sec for r in runs),
            wall_seconds=Stat.of(r.wall_seconds for r in runs),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "metric": self.metric,
            "runs": [r.to_dict() for r in self.runs],
            **{
                k: getattr(self, k).to_dict()
                for k in (
                    "best",
                    "final",
                    "best_epoch",
                    "params_total",
                    "params_inserted",
                    "images_per_sec",
                    "wall_seconds",
                )
            },
        }


# --------------------------------------------------------------------------- reading runs
def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _whole(value: Any) -> int | None:
    number = _finite(value)
    return int(number) if number is not None and number == int(number) else None


def read_run(run_dir: str | Path) -> RunRow:
    """One finished run's figures from summary.json, metrics.jsonl and spec.yaml.

    Raises:
        UsageError: not a folder, or not a finished run (no readable summary.json and spec.yaml, or
            a metrics.jsonl that cannot be read).
    """
    run = open_run(run_dir, hint=None)
    summary, spec = run.require_finished()
    multi = bool(summary.get("multi_label"))
    metric = layout.headline(multi)
    rows = [r for r in run.require_metrics() if isinstance(r, dict)]
    speeds = [s for s in (_finite(r.get("images_per_sec")) for r in rows) if s is not None]
    params = summary.get("params") if isinstance(summary.get("params"), dict) else {}
    return RunRow(
        name=str(summary.get("name") or spec.get("name") or run.path.name),
        run_dir=run.path,
        seed=_whole(spec.get("seed")),
        metric=metric,
        best=_finite(summary.get(f"best_{metric}")),
        final=_finite(summary.get(f"final_{metric}")),
        best_epoch=_whole(summary.get("best_epoch")),
        params_total=_whole(params.get("total")),
        params_inserted=_whole(params.get("inserted")),
        images_per_sec=statistics.median(speeds) if speeds else None,
        wall_seconds=_finite(summary.get("wall_seconds")),
        val_curve=tuple(_finite(r.get(metric)) for r in rows),
        spec={k: v for k, v in spec.items() if k not in ("name", "seed")},
    )


# what a refused folder is, by the start of its error: (one, several)
_REFUSALS = (
    (("the run directory does not exist",), ("does not exist", "do not exist")),
    (("the run path is not a folder",), ("is not a folder", "are not folders")),
    (("the folder is not a run directory",), ("is not a run directory", "are not run directories")),
    (("the run has not finished", "summary.json is not a finished run's"), ("has not finished", "have not finished")),
    (("a run directory is given twice",), ("is given twice", "are given twice")),
)


def _kind(error: UsageError) -> tuple[str, str]:
    return next(
        (words for starts, words in _REFUSALS if error.problem.startswith(starts)),
        ("has a file that cannot be read", "have files that cannot be read"),
    )


def _refused(errors: Sequence[UsageError], total: int) -> UsageError:
    """One error naming every refused folder, and how many of each kind."""
    if len(errors) == 1:
        return errors[0]
    kinds: dict[tuple[str, str], int] = {}
    for error in errors:
        kinds[_kind(error)] = kinds.get(_kind(error), 0) + 1
    twice = any(_kind(e)[0] == "is given twice" for e in errors)
    head = "cannot be compared" if twice else "are not finished runs"
    counts = ", ".join(f"{n} {one if n == 1 else several}" for (one, several), n in kinds.items())
    return UsageError(
        f"{len(errors)} of the {total} folders {head}: {counts}",
        origin=errors[0].origin,
        found="; ".join(f"{e.origin}: {e.problem}" for e in errors),
        expected="finished run directories (written by `surgery run`, with summary.json), each once",
        hint="finish them with --resume, or leave them out",
    )


def collect(run_dirs: Iterable[str | Path], *, skip_unfinished: bool = False) -> list[RunRow]:
    """Every run's figures, in the order given.

    Args:
        skip_unfinished: leave out folders that are not finished runs instead of raising (a sweep
            whose trials failed); the caller compares the lengths to say how many were left out.

    Raises:
        UsageError: a folder given twice; a folder that is not a finished run (all of them are
            named, not only the first); finished runs that measure different things (single-
            and multi-label).
    """
    dirs = [Path(d) for d in run_dirs]
    seen: dict[Path, Path] = {}
    twice, unique = [], []
    for d in dirs:
        key = d.resolve()
        if key in seen:
            twice.append(
                UsageError(
                    "a run directory is given twice",
                    origin=Origin.path(d),
                    found=f"{seen[key]} and {d}",
                    expected="each run once (a run counted twice would weigh twice in its mean)",
                )
            )
            continue
        seen[key] = d
        unique.append(d)
    rows, errors = [], []
    for d in unique:
        try:
            rows.append(read_run(d))
        except UsageError as exc:
            errors.append(exc)
    refused = twice if skip_unfinished else errors + twice  # every refusal named at once, of every kind
    if refused:
        raise _refused(refused, len(dirs))
    metrics = sorted({r.metric for r in rows})
    if len(metrics) > 1:
        multi = [str(r.run_dir) for r in rows if r.metric == layout.headline(True)]
        raise UsageError(
            "single-label and multi-label runs cannot be compared: one is scored by accuracy, the other by mAP",
            origin=Origin.path(multi[0]),
            found=f"multi-label: {', '.join(multi)}",
            expected="runs of one kind",
        )
    return rows


# --------------------------------------------------------------------------- variants
def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    if isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def spec_difference(spec: Mapping[str, Any], reference: Mapping[str, Any], limit: int = 2) -> str:
    """What `spec` sets differently from `reference`, as ``key=value`` items (at most `limit`)."""
    a, b = _flatten(dict(spec)), _flatten(dict(reference))
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k, "<unset>") != b.get(k, "<unset>")]
    items = [
        f"{k}={json.dumps(a[k], default=str) if not isinstance(a[k], str) else a[k]}" if k in a else f"{k} unset"
        for k in keys[:limit]
    ]
    return ", ".join(items) + (f" +{len(keys) - limit} more" if len(keys) > limit else "")


def shared_name(names: Sequence[str]) -> str:
    """The part of the run names a variant's runs share: ``cbam-s0``, ``cbam-s1`` -> ``cbam``."""
    if len(set(names)) == 1:
        return names[0]
    prefix = os.path.commonprefix(list(names))
    cut = max(prefix.rfind(c) for c in _SEPARATORS)
    if all(len(n) == len(prefix) or n[len(prefix)] in _SEPARATORS for n in names):
        cut = len(prefix)
    label = (prefix[:cut] if cut > 0 else prefix).rstrip(_SEPARATORS)
    return label or " / ".join(dict.fromkeys(names))


def _spec_key(spec: Mapping[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True, default=str)


def aggregate(rows: Sequence[RunRow], labels: Mapping[str | Path, str] | None = None) -> list[VariantRow]:
    """Group runs into variants (mean ± std over each), best first.

    Args:
        rows: what `collect` returned.
        labels: a label for some or all run directories; runs sharing a label are one variant.
            Runs without one are grouped by their spec (see the module's docstring).

    Returns:
        One `VariantRow` per variant, sorted by the mean best figure, highest first (a variant
        without one last); runs within a variant in the order given.
    """
    given = {Path(k).resolve(): v for k, v in (labels or {}).items()}
    groups: dict[tuple[str, str], list[RunRow]] = {}
    for row in rows:
        label = given.get(row.run_dir.resolve())
        key = ("label", label) if label is not None else ("spec", _spec_key(row.spec))
        groups.setdefault(key, []).append(row)
    named: dict[tuple[str, str], str] = {
        k: k[1] if k[0] == "label" else shared_name([r.name for r in g]) for k, g in groups.items()
    }
    first_spec = next((g[0].spec for k, g in groups.items() if k[0] == "spec"), None)
    taken = [named[k] for k in groups]
    for key, group in groups.items():
        if key[0] == "spec" and taken.count(named[key]) > 1 and group[0].spec != first_spec:
            named[key] = f"{named[key]} ({spec_difference(group[0].spec, first_spec or {}) or 'same spec'})"
    seen: dict[str, int] = {}
    for key in groups:  # still equal (explicit labels that match a default one): number them
        seen[named[key]] = seen.get(named[key], 0) + 1
        if seen[named[key]] > 1:
            named[key] = f"{named[key]} #{seen[named[key]]}"
    variants = [VariantRow.of(named[k], g) for k, g in groups.items()]
    return sorted(variants, key=lambda v: -math.inf if v.best.mean is None else v.best.mean, reverse=True)


# --------------------------------------------------------------------------- renderers
_COLUMNS = ("variant", "runs", "best {m}", "final {m}", "best epoch", "params added", "params", "images/s", "wall time")


def _cells(v: VariantRow) -> list[str]:
    from .run_page import duration, human

    inserted, total = v.params_inserted, v.params_total
    return [
        v.label,
        str(len(v.runs)),
        v.best.format(),
        v.final.format(),
        _epoch(v.best_epoch),
        human(inserted.mean) if inserted.mean is not None else "-",
        human(total.mean) if total.mean is not None else "-",
        v.images_per_sec.format(".0f"),
        duration(v.wall_seconds.mean),
    ]


def _epoch(stat: Stat) -> str:
    """Best epochs: ``7`` while the runs agree, else ``6.5 ± 0.7``."""
    if stat.mean is not None and not stat.std:
        return f"{stat.mean:.0f}"
    return stat.format(".1f")


def _headers(variants: Sequence[VariantRow], sig: Significance | None = None) -> list[str]:
    metric = layout.headline_label(variants[0].metric if variants else layout.headline(False))
    head = [c.format(m=metric) for c in _COLUMNS]
    return head if sig is None else [head[0], *sig.headers(), *head[1:]]


def _row(v: VariantRow, sig: Significance | None) -> list[str]:
    cells = _cells(v)
    return cells if sig is None else [cells[0], *sig.cells(v.label), *cells[1:]]


def ordered(variants: Sequence[VariantRow], sig: Significance | None) -> list[VariantRow]:
    """With a paired comparison, the variants by their mean accuracy on its split, best first."""
    if sig is None:
        return list(variants)
    return sorted(variants, key=lambda v: -sig.accuracy[v.label])


def to_markdown(variants: Sequence[VariantRow], sig: Significance | None = None) -> str:
    """The comparison as a GitHub-flavoured Markdown table (numbers right-aligned); with `sig`, the
    paired comparison's columns too, and a note saying how they were computed."""
    head = [printable(h, newlines=False).replace("|", "\\|") for h in _headers(variants, sig)]  # names a run
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for v in ordered(variants, sig):
        cells = [
            printable(c, newlines=False).replace("|", "\\|") for c in _row(v, sig)
        ]  # written raw: no terminal escapes
        lines.append("| " + " | ".join(cells) + " |")
    if sig is not None:
        lines += ["", sig.note()]
    return "\n".join(lines) + "\n"


def to_json(variants: Sequence[VariantRow], sig: Significance | None = None) -> str:
    """The comparison as JSON: ``{"variants": [...]}``, each variant with its `Stat`s and its runs;
    with `sig`, also ``"significance"``: the split, baseline, each pair's intervals, p and verdict."""
    data: dict[str, Any] = {"variants": [v.to_dict() for v in ordered(variants, sig)]}
    if sig is not None:
        data["significance"] = sig.to_dict()
    return json.dumps(data, indent=2) + "\n"


def to_table(variants: Sequence[VariantRow], sig: Significance | None = None) -> Any:
    """The comparison as a rich table, for the terminal."""
    from rich.markup import escape
    from rich.table import Table

    title = "comparison (mean ± std over seeds), best first"
    if sig is not None:
        title = f"comparison on the {sig.split} split against {escape(sig.baseline)}, best first"
    table = Table(title=title, caption=None if sig is None else escape(sig.note()))
    for i, head in enumerate(_headers(variants, sig)):
        table.add_column(escape(head), justify="left" if i == 0 else "right")
    for v in ordered(variants, sig):  # labels are run names: text, never rich markup
        table.add_row(*(escape(c) for c in _row(v, sig)))
    return table


_MARKERS = "osD^vP*Xph"


def curves_figure(variants: Sequence[VariantRow]) -> Any:
    """Validation curves of every run overlaid: one colour and one marker per variant. Where runs of
    different variants share a point (the same figure at the same epoch), each variant's points are
    moved sideways by a fraction of an epoch, so no variant hides behind another; the title says so."""
    from matplotlib import colormaps

    from .plots import figure, label

    curves = [[[(e + 1, y) for e, y in enumerate(run.val_curve) if y is not None] for run in v.runs] for v in variants]
    owners: dict[tuple[int, float], set[int]] = {}
    for i, runs in enumerate(curves):
        for points in runs:
            for point in points:
                owners.setdefault(point, set()).add(i)
    shared = any(len(o) > 1 for o in owners.values())
    step = min(0.3 / max(len(variants) - 1, 1), 0.08)
    fig = figure(10, 4.6)
    ax = fig.subplots()
    colours = colormaps["tab10"].colors
    for i, (v, runs) in enumerate(zip(variants, curves)):
        shift = (i - (len(variants) - 1) / 2) * step if shared else 0.0
        for j, points in enumerate(runs):
            if points:
                xs, ys = zip(*points)
                name = label(v.label, 40)
                ax.plot(
                    [x + shift for x in xs],
                    ys,
                    "-",
                    marker=_MARKERS[i % len(_MARKERS)],
                    markersize=4,
                    linewidth=1.4,
                    alpha=0.85,
                    color=colours[i % len(colours)],
                    label=(f"{name} ({len(v.runs)} runs)" if len(v.runs) > 1 else name) if j == 0 else None,
                )
    ax.set_xlabel("epoch")
    ax.set_ylabel(layout.headline_label(variants[0].metric if variants else layout.headline(False)))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if variants:
        ax.legend(loc="lower right", fontsize=8)
    ax.set_title(
        "validation, every run (colour and marker: variant"
        + ("; identical points moved sideways to show each variant)" if shared else ")")
    )
    fig.tight_layout()
    return fig


def curves_png(variants: Sequence[VariantRow]) -> bytes:
    """`curves_figure` as PNG bytes."""
    from .plots import figure_png

    return figure_png(curves_figure(variants))


def render_html(
    variants: Sequence[VariantRow],
    *,
    base: Path | None = None,
    sig: Significance | None = None,
    missing: Sequence[str] = (),
) -> str:
    """The comparison page: the table, the overlaid validation curves, every run.

    Args:
        base: the folder the page will be written in; each run's report.html is linked relative
            to it, so the links still work when the folders move together.
        sig: the paired comparison (its columns, verdicts and procedure); missing: without one,
            the `surgery evaluate` commands that would give it.
    """
    from .. import __version__
    from .run_page import data_uri, duration, environment, human

    def link(run: RunRow) -> Path | None:  # the template's `href` filter makes it a safe URL
        report = run.run_dir / layout.REPORT
        if not report.is_file():
            return None
        try:
            return Path(os.path.relpath(report.resolve(), (base or Path.cwd()).resolve()))
        except ValueError:  # another drive (Windows)
            return report.resolve()

    runs = [
        {
            "variant": v.label,
            "colour": i,
            "name": r.name,
            "dir": str(r.run_dir),
            "seed": r.seed,
            "best": r.best,
            "final": r.final,
            "best_epoch": None if r.best_epoch is None else r.best_epoch + 1,
            "inserted": human(r.params_inserted) if r.params_inserted is not None else "-",
            "speed": r.images_per_sec,
            "wall": duration(r.wall_seconds),
            "link": link(r),
        }
        for i, v in enumerate(variants)
        for r in v.runs
    ]
    colour = {v.label: i for i, v in enumerate(variants)}
    table = [{"cells": _row(v, sig), "colour": colour[v.label]} for v in ordered(variants, sig)]
    seeds = any(len(v.runs) > 1 for v in variants)
    winner = variants[0] if variants and variants[0].best.mean is not None else None
    tied = [v.label for v in variants[1:] if winner is not None and v.best.mean == winner.best.mean]
    if sig is not None:
        winner = next(v for v in variants if v.label == sig.best)
        tied = [v.label for v in variants if sig.rank(v.label) == "tied"]
    return (
        environment()
        .get_template("compare.html.j2")
        .render(
            headers=_headers(variants, sig),
            sig=sig,
            missing=list(missing),
            table=table,
            runs=runs,
            seeds=seeds,
            winner=winner,
            tied=tied,
            metric=layout.headline_label(variants[0].metric if variants else layout.headline(False)),
            curves=data_uri(curves_png(variants)) if variants else None,
            colours=_colour_hex(len(variants)),
            count=len(runs),
            version=__version__,
        )
    )


def _colour_hex(n: int) -> list[str]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    colours = colormaps["tab10"].colors
    return [to_hex(colours[i % len(colours)]) for i in range(n)]


def write_html(
    path: str | Path,
    variants: Sequence[VariantRow],
    sig: Significance | None = None,
    missing: Sequence[str] = (),
) -> Path:
    """Write the comparison page to `path` atomically (the old page or the new one, never half).

    Raises:
        RunDirError: the file cannot be written (exit code 1).
    """
    from ..files import write_text

    path = Path(path)
    write_text(path, render_html(variants, base=path.parent, sig=sig, missing=missing))
    return path


def compare_command(
    run_dirs: Sequence[str],
    *,
    out: str | None = None,
    as_json: bool = False,
    as_markdown: bool = False,
    baseline: str | None = None,
    seed: int = 0,
    resamples: int = 2000,
    console: Any = None,
) -> int:
    """`surgery compare`: the table on stdout (rich, Markdown or JSON) and, with `out`, the page; with
    the runs' predictions (`surgery evaluate`), each variant against `baseline` (`surgery.pages.paired`)."""
    import sys

    from rich.markup import escape

    from ..untrusted import Console

    if out is not None and Path(out).is_dir():
        raise UsageError(
            "--out names a folder",
            origin=Origin.flag("--out", out),
            found=out,
            expected="an HTML file to write, such as compare.html",
        )
    _check_bootstrap_flags(seed, resamples)
    variants = aggregate(collect(run_dirs))
    sig, missing = paired_comparison(variants, baseline=baseline, seed=seed, resamples=resamples)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    if missing and len(variants) > 1:
        err.print(
            "[yellow]note[/yellow] no run has predictions to compare pairwise (differences are not tested); "
            + "; ".join(f"`{escape(c)}`" for c in missing)
        )
    if as_json:
        sys.stdout.write(to_json(variants, sig))
    elif as_markdown:
        sys.stdout.write(to_markdown(variants, sig))
    else:
        (console or Console(highlight=False)).print(to_table(variants, sig))
    if out is not None:
        path = write_html(out, variants, sig, missing)
        err.print(f"wrote {escape(str(path))}")
    return 0


def paired_comparison(
    variants: Sequence[VariantRow], *, baseline: str | None = None, seed: int = 0, resamples: int = 2000
) -> tuple[Significance | None, list[str]]:
    """(the paired comparison, []) when the runs have predictions; (None, the `surgery evaluate`
    commands that would give them) when none has; (None, []) for a single variant without --baseline.

    Raises:
        UsageError: see `surgery.pages.paired.significance`.
    """
    from .paired import evaluate_command_for, significance

    if len(variants) < 2 and baseline is None:
        return None, []
    sig = significance(variants, baseline=baseline, seed=seed, resamples=resamples)
    if sig is not None:
        return sig, []
    return None, [evaluate_command_for(open_run(r.run_dir, hint=None)) for v in variants for r in v.runs]


def _check_bootstrap_flags(seed: int, resamples: int) -> None:
    if resamples < 100:
        raise UsageError(
            "--resamples is too small for a 95% interval",
            origin=Origin.flag("--resamples", resamples),
            found=str(resamples),
            expected="at least 100 (the default, 2000, gives intervals stable to about 0.001)",
        )
    if seed < 0:
        raise UsageError(
            "--seed must not be negative",
            origin=Origin.flag("--seed", seed),
            found=str(seed),
            expected="0 or a positive integer (numpy's default_rng seed)",
        )


__all__ = [
    "RunRow",
    "Stat",
    "VariantRow",
    "read_run",
    "collect",
    "aggregate",
    "shared_name",
    "spec_difference",
    "to_markdown",
    "to_json",
    "to_table",
    "curves_figure",
    "curves_png",
    "render_html",
    "write_html",
    "compare_command",
    "paired_comparison",
    "ordered",
]
