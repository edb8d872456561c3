"""`RUN_DIR/report.html`: one self-contained page about a run, from the files the run left.

    gather(run_dir)        every file of the run read tolerantly -> the page's data (a dict)
    render_report(data)    jinja2 template -> HTML (autoescaped: a class named <script> is text)
    write_report(run_dir)  both, written atomically to RUN_DIR/report.html; returns its path

The page shows what is there and skips what is not: a finished run (summary.json), a run still
training or interrupted (metrics.jsonl only), a multi-label run (per-class F1, no confusion
matrix), and the outputs of `surgery evaluate` (``eval/<split>/metrics.json``) and `surgery
explain` (``explain/predictions.json``) when present. A file that cannot be read, or holds
something other than what the run writes, is named in a box at the top of the page: the page
is still written, and never from half the facts without saying so. Pictures are embedded as
data URIs and the style is inline, so the file opens from disk, in any browser, without a server.

`run` writes the page at the end of a run; `surgery report RUN_DIR` writes it again by hand.
Importing this module, and writing a page, does not import torch.
"""

from __future__ import annotations

import base64
import functools
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import describe_exception
from ..runs import Run, layout, open_run
from ..runs.derived import DERIVED

REPORT_NAME = layout.REPORT
_LOAD_ROWS = (  # load_report.json key, label, what it means
    ("loaded", "loaded", "bit-identical from the pretrained source"),
    ("random", "random", "no pretrained weights asked for (pretrained: false)"),
    ("reinitialised", "re-initialised", None),
    ("new", "new", "inserted modules"),
    ("defaulted", "defaulted", "BatchNorm step counters absent from the file"),
    ("mapped", "renamed", "file keys mapped by model.key_map"),
    ("kept", "kept", "of them, in replaced modules: same name and shape"),
    ("adapted", "adapted", None),
    ("dropped", "dropped", "file tensors of replaced or removed modules"),
    ("unused", "unused", None),
)


# --------------------------------------------------------------------------- reading, tolerantly
# the run is read by `surgery.runs.Run`: missing files are None, unreadable ones None plus a line
# in `run.problems` (the box at the top of the page); it embeds only files inside the run
def _image(reader: Run, path: Path) -> str | None:
    """A picture of the run as a data URI (None, with a problem, when it may not be shown)."""
    picture = reader.image(path)
    return data_uri(*picture) if picture is not None else None


def data_uri(data: bytes, mime: str = "image/png") -> str:
    """Bytes as a ``data:`` URI, so the page needs no file beside it."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _num(value: Any) -> float | None:
    """A finite number, or None (JSON null, a string, NaN: shown as a dash, never as a wrong figure)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _int(value: Any) -> int | None:
    number = _num(value)
    return int(number) if number is not None and number == int(number) else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


# --------------------------------------------------------------------------- the page's sections
def actual_starts(spec: Any, rows: Sequence[Mapping[str, Any]]) -> dict[str, int | None]:
    """The epoch each group starts training: what the spec says (`schedule.unfreeze_epochs`), and
    for event rules (plateau, after), which only the record knows, what the last epoch recorded
    (metrics.jsonl's ``unfreeze_at``, in the rows that record one)."""
    from ..train.schedule import unfreeze_epochs

    starts = unfreeze_epochs(spec)
    for row in reversed(rows):
        recorded = row.get("unfreeze_at")
        if isinstance(recorded, Mapping):
            starts.update(
                {
                    name: epoch
                    for name, epoch in recorded.items()
                    if name in starts and isinstance(epoch, int) and not isinstance(epoch, bool)
                }
            )
            break
    return starts


def epoch_table(spec: Any, rows: Sequence[Mapping[str, Any]], best_epoch: int | None) -> dict[str, Any] | None:
    """One row per epoch: each group's lr (or frozen), then the epoch's losses and accuracies.

    Epochs trained show what metrics.jsonl recorded; epochs not trained yet show the plan, the
    table of `surgery inspect --schedule` (`schedule.schedule_table`). The two agree except under
    the plateau scheduler, whose reductions only the record holds. A group's first trainable
    epoch after the start is marked.
    """
    if spec is None and not rows:
        return None
    planned: dict[int, dict[str, Any]] = {}
    starts: dict[str, int] = {}
    if spec is not None:
        from ..train.schedule import schedule_table, unfreeze_events

        planned = {row["epoch"]: row["groups"] for row in schedule_table(spec)}
        starts = {
            name: epoch
            for epoch, names in unfreeze_events(spec, actual_starts(spec, rows)).items()
            for name in names
            if epoch > 0
        }
    names = (
        [g.name for g in spec.groups]
        if spec is not None
        else list(dict.fromkeys(k for r in rows for k in _dict(r.get("lr"))))
    )
    recorded = {int(r["epoch"]): r for r in rows}
    multi = any(_num(r.get("val_map")) is not None for r in rows)
    keys = ["train_loss", "train_acc", "val_loss", "val_acc"] + (["val_map"] if multi else [])
    table = []
    for epoch in sorted(set(planned) | set(recorded)):
        row = recorded.get(epoch)
        lr, trainable = (_dict(row.get("lr")), _dict(row.get("trainable"))) if row else ({}, {})
        plan = planned.get(epoch, {})
        cells = []
        for n in names:
            rate = _num(lr.get(n)) if n in lr else _num(_dict(plan.get(n)).get("lr"))
            on = trainable.get(n) if n in trainable else _dict(plan.get(n)).get("trainable")
            cells.append({"lr": rate, "trainable": on, "starts": starts.get(n) == epoch})
        table.append(
            {
                "epoch": epoch,
                "trained": row is not None,
                "best": epoch == best_epoch,
                "groups": cells,
                "values": [_num(row.get(k)) if row else None for k in keys],
                "speed": _num(row.get("images_per_sec")) if row else None,
                "seconds": _num(row.get("seconds")) if row else None,
            }
        )
    unfreeze = {}
    for name, epoch in starts.items():
        unfreeze.setdefault(epoch, []).append(name)
    note = None
    if spec is not None and spec.train.scheduler.name == "plateau":
        note = "plateau scheduler: epochs not trained yet show the lr before any reduction"
    return {
        "groups": names,
        "columns": ["train loss", "train acc", "val loss", "val acc"] + (["val mAP"] if multi else []),
        "rows": table,
        "note": note,
        "unfreeze": dict(sorted(unfreeze.items())),
        "planned": any(not r["trained"] for r in table) and bool(planned),
    }


def _load_report(reader: Run, run_dir: Path) -> dict[str, Any] | None:
    data = reader.json(run_dir / layout.LOAD_REPORT)
    if data is None:
        return None
    rows = []
    for key, label, what in _LOAD_ROWS:
        value = data.get(key)
        count = len(value) if isinstance(value, (list, dict)) else None
        if count is None or (count == 0 and key not in ("loaded", "new", "reinitialised", "unused")):
            continue
        if what is None:
            if isinstance(value, dict):
                what = "; ".join(sorted({str(v) for v in value.values()})) or "-"
            else:
                what = ", ".join(str(v) for v in value[:4]) + (" ..." if len(value) > 4 else "") or "-"
        rows.append({"label": label, "count": count, "what": what})
    inserted = [
        {
            "path": m.get("path"),
            "type": m.get("type"),
            "where": f"{m.get('position', '')} {m.get('target', '')}".strip(),
            "channels": m.get("channels"),
            "init": m.get("init"),
            "params": _int(m.get("params")),
        }
        for m in _list(data.get("inserted_modules"))
        if isinstance(m, dict)
    ]
    changed = [
        {
            "path": c.get("path"),
            "kind": c.get("kind"),
            "old": c.get("old"),
            "new": c.get("new"),
            "by": str(c.get("by", "")).partition(": ")[0],
        }
        for c in _list(data.get("changed_modules"))
        if isinstance(c, dict)
    ]
    imports = [str(i) for i in _list(data.get("imports"))]
    return {"source": data.get("source"), "rows": rows, "inserted": inserted, "changed": changed, "imports": imports}


def _classes(reader: Run, summary: Mapping[str, Any]) -> list[str]:
    if reader.classes is not None:
        return reader.classes
    for key in ("per_class_f1", "per_class_accuracy"):  # a run without classes.json: the summary's order
        if isinstance(summary.get(key), dict):
            return [str(c) for c in summary[key]]
    return []


def _per_class(
    summary: Mapping[str, Any], classes: Sequence[str], last: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """Per-class training count, validation recall and F1 (multi-label: F1, from the summary or,
    for an unfinished run, the last epoch's ``val_f1``)."""
    counts = _dict(_dict(summary.get("balance")).get("train_counts"))
    weights = _dict(_dict(summary.get("balance")).get("class_weights"))
    recall = _dict(summary.get("per_class_accuracy"))
    f1 = _dict(summary.get("per_class_f1")) or _dict((last or {}).get("val_f1"))
    columns = [
        (label, kind, column)
        for label, kind, column in (
            ("train images", "int", counts),
            ("loss weight", "lr", weights),
            ("val accuracy (recall)", "acc", recall),
            ("val F1", "acc", f1),
        )
        if column
    ]
    if not columns:
        return None
    rows = [
        {"name": c, "values": [_num(column.get(c)) for _, _, column in columns]}
        for c in classes or list(f1 or recall or counts)
    ]
    return {"columns": [{"label": label, "kind": kind} for label, kind, _ in columns], "rows": rows}


def _figures(
    summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], multi_label: bool, total_epochs: int | None
) -> list[dict[str, Any]]:
    """The header's key figures: best and final validation figure, macro F1, parameters, speed, time."""
    figures: list[dict[str, Any]] = []
    metric = layout.headline(multi_label)
    label = "val mAP" if multi_label else "val accuracy"
    scored = [(r[metric], int(r["epoch"])) for r in rows if _num(r.get(metric)) is not None]
    if summary.get("best_epoch") is not None and not (multi_label and summary.get("best_val_map") is None):
        best = _num(summary.get("best_val_map" if multi_label else "best_val_acc"))
        best_epoch = _int(summary.get("best_epoch"))
    elif scored:
        best, best_epoch = max(scored, key=lambda s: s[0])
    else:
        best, best_epoch = None, None
    if best is not None:
        figures.append(
            {
                "label": f"best {label}",
                "value": best,
                "kind": "acc",
                "note": f"epoch {best_epoch + 1}" if best_epoch is not None else "",
            }
        )
    final = _num(summary.get("final_val_map" if multi_label else "final_val_acc"))
    if final is not None:
        figures.append({"label": f"final {label}", "value": final, "kind": "acc", "note": "last epoch's model"})
    elif scored:
        epochs = f" of {total_epochs}" if total_epochs else ""
        figures.append(
            {
                "label": f"last {label}",
                "value": scored[-1][0],
                "kind": "acc",
                "note": f"after epoch {scored[-1][1] + 1}{epochs}",
            }
        )
    if _num(summary.get("val_macro_f1")) is not None:
        figures.append({"label": "macro F1", "value": summary["val_macro_f1"], "kind": "acc", "note": "validation"})
    if multi_label and _num(summary.get("final_val_acc")) is not None:
        figures.append({"label": "exact match", "value": summary["final_val_acc"], "kind": "acc", "note": "validation"})
    params = _dict(summary.get("params"))
    if _int(params.get("inserted")) is not None:
        total = _int(params.get("total"))
        share = f"{params['inserted'] / total:.2%} of {human(total)}" if total else ""
        figures.append({"label": "params added", "value": params["inserted"], "kind": "count", "note": share})
    speeds = [r["images_per_sec"] for r in rows if _num(r.get("images_per_sec")) is not None]
    if speeds:
        figures.append(
            {
                "label": "train images/s",
                "value": statistics.median(speeds),
                "kind": "rate",
                "note": "median over epochs",
            }
        )
    wall = _num(summary.get("wall_seconds"))
    if wall is None and rows:
        wall = sum(_num(r.get("seconds")) or 0.0 for r in rows) or None
    if wall is not None:
        figures.append(
            {
                "label": "wall time",
                "value": wall,
                "kind": "seconds",
                "note": summary.get("device") or ("training and validation" if not summary else ""),
            }
        )
    return figures


def _status(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], total: int | None) -> dict[str, str]:
    if summary.get("stopped"):
        return {"kind": "stopped", "text": f"stopped: {summary['stopped']}"}
    if summary and _dict(summary.get(DERIVED)):
        return {"kind": "finished", "text": f"averaged: {origin_line(_dict(summary[DERIVED]))}"}
    if summary:
        return {"kind": "finished", "text": f"finished: {summary.get('epochs', len(rows))} epochs"}
    done = f"{len(rows)} of {total}" if total else str(len(rows))
    return {
        "kind": "unfinished",
        "text": f"unfinished: {done} epochs trained (still running, or interrupted: resume with --resume)",
    }


def origin_line(record: Mapping[str, Any]) -> str:
    """How an averaged run was made (summary.json's `averaged`), in one line."""
    method = str(record.get("method"))
    runs = [str(_dict(s).get("run")) for s in _list(record.get("sources"))]
    if method == "wise":
        chosen = " (chosen on validation)" if record.get("alpha_chosen_on") else ""
        return f"WiSE-FT of {', '.join(runs)}, alpha {record.get('alpha')}{chosen}"
    if method == "swa":
        epochs = ", ".join(str(e) for e in _list(record.get("epochs")))
        return f"SWA of {', '.join(runs)} over epochs {epochs}, BatchNorm recomputed"
    kept = _list(record.get("ingredients"))
    return f"{method} of {len(kept)} of {len(runs)} runs: {', '.join(str(k) for k in kept)}"


def _facts(summary: Mapping[str, Any], spec: Any) -> list[tuple[str, str]]:
    facts: list[tuple[str, str]] = []
    if summary.get("data") or spec is not None:
        facts.append(("data", str(summary.get("data") or f"{spec.data.name}, {spec.data.image_size}px")))
    if summary.get("device"):
        extras = [
            str(summary.get("precision") or ""),
            "channels_last" if summary.get("channels_last") else "",
            "compiled" if summary.get("compiled") else "",
        ]
        facts.append(("device", ", ".join([str(summary["device"])] + [e for e in extras if e])))
    if _int(summary.get("global_batch_size")) is not None:
        batch = f"{summary['global_batch_size']}"
        if (summary.get("world_size") or 1) > 1:
            batch += f" ({summary['world_size']} processes x {summary.get('batch_size_per_process')})"
        if (summary.get("accumulate") or 1) > 1:
            batch += f", accumulated x{summary['accumulate']} = {summary.get('effective_batch_size')} per step"
        facts.append(("batch", batch))
    if _int(summary.get("val_images")) is not None:
        facts.append(("validation images", str(summary["val_images"])))
    if summary.get("multi_label"):
        facts.append(("multi-label", f"threshold {summary.get('threshold')}; accuracy is the exact-match ratio"))
    balance = _dict(summary.get("balance"))
    if balance.get("mode") not in (None, "none"):
        facts.append(("balance", str(balance["mode"])))
    versions = _dict(summary.get("versions"))
    if versions:
        facts.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    return facts


def _evaluations(reader: Run, run_dir: Path) -> list[dict[str, Any]]:
    """``eval/<split>/metrics.json`` of `surgery evaluate`, one entry per split, in name order."""
    folder = run_dir / layout.EVAL
    if not folder.is_dir():
        return []
    out = []
    for split_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        data = reader.json(split_dir / layout.EVAL_METRICS)
        if data is None:
            continue
        per_class = []
        for name, figures in _dict(data.get("per_class")).items():
            figures = _dict(figures)
            per_class.append(
                {
                    "name": str(name),
                    "values": [_num(figures.get(k)) for k in ("precision", "recall", "f1")],
                    "support": _int(figures.get("support")),
                }
            )
        averages = []
        for label, key in (("macro average", "macro_avg"), ("weighted average", "weighted_avg")):
            figures = _dict(data.get(key))
            if figures:
                averages.append(
                    {
                        "name": label,
                        "values": [_num(figures.get(k)) for k in ("precision", "recall", "f1")],
                        "support": _int(figures.get("support")),
                    }
                )
        confused = [
            {"true": str(c.get("true")), "predicted": str(c.get("predicted")), "count": _int(c.get("count"))}
            for c in _list(data.get("most_confused"))
            if isinstance(c, dict)
        ]
        tta = _dict(data.get("tta"))
        pictures = []
        for key, name in _dict(data.get("pngs")).items():
            path = reader.member(split_dir, name)
            uri = _image(reader, path) if path is not None else None
            if uri is not None:
                pictures.append({"title": str(key).replace("_", " "), "uri": uri})
        figures = [
            f
            for f in (
                {"label": "accuracy", "value": _num(data.get("accuracy")), "kind": "acc", "note": ""},
                {"label": "top-5 accuracy", "value": _num(data.get("top5")), "kind": "acc", "note": ""},
                {"label": "ECE", "value": _num(data.get("ece")), "kind": "acc", "note": "expected calibration error"},
                {"label": "with TTA", "value": _num(tta.get("accuracy")), "kind": "acc", "note": _tta_note(tta)},
            )
            if f["value"] is not None
        ]
        out.append(
            {
                "split": str(data.get("split") or split_dir.name),
                "source": data.get("source"),
                "images": _int(data.get("images")),
                "weights": data.get("weights"),
                "figures": figures,
                "per_class": per_class,
                "averages": averages,
                "confused": confused,
                "pictures": pictures,
            }
        )
    return out


def _tta_note(tta: Mapping[str, Any]) -> str:
    parts = []
    if _num(tta.get("gain")) is not None:
        parts.append(f"{tta['gain']:+.4f}")
    if tta.get("views") is not None:
        views = tta["views"]
        parts.append(f"{len(views) if isinstance(views, list) else views} views")
    return ", ".join(parts)


def _explanations(reader: Run, run_dir: Path) -> list[dict[str, Any]]:
    """``explain/predictions.json`` of `surgery explain`: each picture with what it explains."""
    folder = run_dir / layout.EXPLAIN
    items = reader.json(folder / layout.EXPLAIN_PREDICTIONS, list)
    out = []
    for item in items or []:
        if not isinstance(item, dict):
            reader.note(folder / layout.EXPLAIN_PREDICTIONS, "holds an entry that is not an object; left out")
            continue
        path = reader.member(folder, item.get("png"))
        uri = _image(reader, path) if path is not None else None
        if uri is None:
            continue
        modules = item.get("modules")
        out.append(
            {
                "uri": uri,
                "image": item.get("image"),
                "predicted": item.get("predicted"),
                "confidence": _num(item.get("confidence")),
                "explained": item.get("explained_class"),
                "layer": item.get("layer"),
                "method": item.get("method"),
                "modules": ", ".join(map(str, modules)) if isinstance(modules, list) else modules,
            }
        )
    return out


def _pictures(
    reader: Run,
    run_dir: Path,
    summary: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    spec: Any,
    classes: Sequence[str],
) -> dict[str, str | None]:
    """The curves and the confusion matrix. A finished run's own PNGs are embedded as they are
    (written with summary.json); a run without them (unfinished, or the PNG deleted) gets them
    redrawn in memory by `plots`, from metrics.jsonl and summary.json."""
    from .plots import confusion_png, curves_png

    curves = _image(reader, run_dir / layout.CURVES) if summary and (run_dir / layout.CURVES).is_file() else None
    plottable = [
        r for r in rows if all(_num(r.get(k)) is not None for k in ("train_loss", "val_loss", "train_acc", "val_acc"))
    ]
    if curves is None and plottable:
        from ..train.schedule import unfreeze_events

        curves = data_uri(
            curves_png(plottable, unfreeze_events(spec, actual_starts(spec, rows)) if spec is not None else {})
        )
    confusion = None
    matrix = summary.get("confusion_matrix")
    if isinstance(matrix, list) and matrix:
        if (run_dir / layout.CONFUSION).is_file():
            confusion = _image(reader, run_dir / layout.CONFUSION)
        elif _square(matrix, len(classes)):
            confusion = data_uri(confusion_png(matrix, list(classes)))
        else:
            reader.note(
                run_dir / layout.SUMMARY,
                f"confusion_matrix is not {len(classes)} x {len(classes)} numbers "
                "(one row and column per class); not drawn",
            )
    return {"curves": curves, "confusion": confusion}


def _square(matrix: list[Any], n: int) -> bool:
    return (
        n > 0
        and len(matrix) == n
        and all(isinstance(r, list) and len(r) == n and all(_num(v) is not None for v in r) for r in matrix)
    )


def gather(run_dir: str | Path) -> dict[str, Any]:
    """Read everything a run directory holds into the page's data (plain dicts and lists).

    Raises:
        UsageError: `run_dir` is not a run directory (no spec.yaml and no metrics.jsonl).
    """
    reader = open_run(run_dir).require_run()
    run_dir = reader.path
    spec_text, spec = reader.spec_text, reader.spec
    summary = reader.summary
    rows = reader.metrics
    multi_label = reader.multi_label
    total = spec.train.epochs if spec is not None else _int(summary.get("epochs"))
    classes = _classes(reader, summary)
    best_epoch = _int(summary.get("best_epoch"))
    data = {
        "name": summary.get("name") or (spec.name if spec is not None else run_dir.name),
        "backbone": summary.get("backbone") or (spec.model.backbone if spec is not None else None),
        "run_dir": str(run_dir),
        "status": _status(summary, rows, total),
        "figures": _figures(summary, rows, multi_label, total),
        "facts": _facts(summary, spec),
        "pictures": _pictures(reader, run_dir, summary, rows, spec, classes),
        "per_class": _per_class(summary, classes, rows[-1] if rows else None),
        "multi_label": multi_label,
        "epochs": epoch_table(spec, rows, best_epoch),
        "load": _load_report(reader, run_dir),
        "evaluations": _evaluations(reader, run_dir),
        "explanations": _explanations(reader, run_dir),
        "spec_text": spec_text,
    }
    data["problems"] = reader.problems
    return data


def check_run_dir(run_dir: Path) -> None:
    """Raise a `UsageError` (exit code 2) unless `run_dir` is a folder holding a run's spec.yaml or metrics.jsonl."""
    open_run(run_dir).require_run()


# --------------------------------------------------------------------------- rendering
def human(n: Any) -> str:
    """11223001 -> '11.2M', 43924 -> '43.9k' (as `surgery inspect` shows parameter counts)."""
    if _num(n) is None:
        return "-"
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:g}"


def duration(seconds: Any) -> str:
    """47.1 -> '47 s', 312 -> '5 min 12 s', 4000 -> '1 h 06 min'."""
    if _num(seconds) is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _fmt(value: Any, kind: str = "acc") -> str:
    """One number as the page shows it; '-' for a missing one."""
    if _num(value) is None:
        return "-"
    if kind == "acc":
        return f"{value:.4f}"
    if kind == "lr":
        return f"{value:.3g}"
    if kind == "count":
        return human(value)
    if kind == "rate":
        return f"{value:,.0f}"
    if kind == "seconds":
        return duration(value)
    if kind == "int":
        return f"{int(value):,}"
    return f"{value:g}"


@functools.lru_cache(maxsize=1)
def environment() -> Any:
    """The jinja2 environment of the page templates: autoescaped, strict about undefined names
    (a misspelt field is an error in the tests, not a blank on the page). One per process, so
    each template is compiled once."""
    import jinja2

    from ..untrusted import href

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("surgery.pages", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["fmt"] = _fmt
    env.filters["human"] = human
    env.filters["duration"] = duration
    env.filters["href"] = href  # every link to a file: './'-prefixed, percent-encoded
    return env


def render_report(data: Mapping[str, Any]) -> str:
    """The report page for `gather`'s data."""
    from .. import __version__

    return environment().get_template("report.html.j2").render(**data, version=__version__)


def write_report(run_dir: str | Path) -> Path:
    """Write (or rewrite) ``RUN_DIR/report.html`` from the files in `run_dir`; return its path.

    Idempotent: the same files give the same page, byte for byte. Atomic: the page is either the
    old one or the new one, and nothing else in the run directory is touched. Commands that add
    to a run (`evaluate`, `explain`) call it again to refresh the page.

    Raises:
        UsageError: `run_dir` is not a run directory (exit code 2).
        RunDirError: the page cannot be written (exit code 1).

    Example:
        >>> write_report("runs/quickstart")
        PosixPath('runs/quickstart/report.html')
    """
    from ..files import write_text

    run_dir = Path(run_dir)
    html = render_report(gather(run_dir))
    path = run_dir / REPORT_NAME
    write_text(path, html)
    return path


def refresh_report(run_dir: str | Path, warn: Callable[[str], None]) -> Path | None:
    """Rewrite ``RUN_DIR/report.html`` at the end of a command that wrote into the run (`run`,
    `evaluate`, `explain`); return its path, or None when it could not be written.

    The page only shows files already in place, so failing to draw it is a warning (plain text,
    given to `warn`) that says how to write it again, never a failure of the command that called this.
    """
    import shlex

    try:
        return write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - every other file is in place; only the page is missing
        warn(
            f"{Path(run_dir) / REPORT_NAME} was not written ({describe_exception(exc)}); "
            f"write it with: surgery report {shlex.quote(str(run_dir))}"
        )
        return None


__all__ = [
    "REPORT_NAME",
    "check_run_dir",
    "refresh_report",
    "gather",
    "render_report",
    "write_report",
    "data_uri",
    "environment",
    "human",
    "duration",
]
