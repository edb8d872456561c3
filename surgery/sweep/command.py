"""`surgery sweep`: every variant of a sweep file trained as an ordinary run directory, with an
Optuna study deciding which worker trains which variant.

    surgery sweep SWEEP.yaml [--workers N] [--storage URL]
      load_sweep           the sweep file, located errors (file.py)
      check_variants       every variant's spec loaded and built before anything trains
      open_study           the study (study.py): created once, every grid point (or random/tpe trial) queued once
      work / spawn         N workers take queued trials until none is left; each trains
                           runs/<sweep>/<variant>/ (worker.py)
      report               sweep.json and a per-trial list
      write_comparison     the finished variants compared (surgery.pages.compare: mean ± std over seeds,
                           best first): comparison.md, .json and .html

The study and its storage: study.py; the workers: worker.py; the sweep file: file.py.
"""

from __future__ import annotations

import contextlib
import json
import shlex
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import Origin, RunDirError, SpecError, UsageError
from .file import Sweep, Variant, fingerprint, load_sweep
from .study import LOCK_TIMEOUT, default_storage, open_storage, open_study, shown_url, trial_counts
from .worker import Worker, spawn, storage_failed, work


# --------------------------------------------------------------------------- checking the variants
def check_variants(
    sweep: Sweep, overrides: Sequence[str], runs_root: Path, warn: Callable[[str], None]
) -> list[Variant]:
    """Load and build every variant's spec (grid), or every axis value and range end on its own
    (random, tpe), so a value the spec or the model refuses stops the sweep before it trains.

    Returns:
        The grid's variants (empty for random and tpe).

    Raises:
        SpecError: located at the sweep file's line that gave the value, and naming the variant.
    """
    from ..spec import load_spec
    from ..validation import validate

    if sweep.sampler == "grid":
        variants = probes = sweep.grid()
    else:
        variants, probes = [], _probe_variants(sweep)
    built: set[str] = set()
    shown: set[str] = set()

    def once(text: str) -> None:
        if text not in shown:
            shown.add(text)
            warn(text)

    for variant in probes:
        try:
            every = [*sweep.set, *overrides, *variant.overrides]
            spec = load_spec(sweep.spec, every)
            _check_objective(sweep, spec)
            key = json.dumps(
                {k: v for k, v in spec.raw.items() if k not in ("name", "seed")}, sort_keys=True, default=str
            )
            if key not in built:  # variants that differ only in their seed build the same model
                built.add(key)
                validate(sweep.spec, overrides=every, warn=once, runs_root=runs_root)  # what `surgery validate` runs
        except SpecError as err:
            raise SpecError(
                f"variant {variant.name}: {err.problem}",
                path=err.key_path,
                origin=err.origin,
                found=err.found,
                expected=err.expected,
                hint=err.hint,
            ) from None
    return variants


def _probe_variants(sweep: Sweep) -> list[Variant]:
    first = {a.key: a.labels[0] for a in sweep.axes} | {r.key: r.low for r in sweep.ranges}
    probes = [sweep.variant(first, "check-base")]
    for axis in sweep.axes:
        probes += [sweep.variant(first | {axis.key: label}, f"check-{axis.short}-{label}") for label in axis.labels[1:]]
    for r in sweep.ranges:
        probes.append(sweep.variant(first | {r.key: r.high}, f"check-{r.key}-high"))
    return probes


def _check_objective(sweep: Sweep, spec: Any) -> None:
    if sweep.objective.endswith("_map") and not spec.data.multi_label:
        raise sweep.source.error(
            ("sweep", "objective"),
            f"{sweep.objective} is a multi-label figure",
            found=f"objective: {sweep.objective} with data.multi_label: false",
            expected="best_val_acc, final_val_acc, final_val_loss or val_macro_f1",
        )


# --------------------------------------------------------------------------- sweep.json
def write_sweep_json(sweep: Sweep, study: Any, folder: Path, storage_url: str) -> dict[str, Any]:
    """sweep.json: the study, what it varied, and per variant its label, params, run directory,
    state, objective value and seed (the comparison table is built from it and the run directories).

    A variant's state is its best trial's: COMPLETE, else RUNNING, WAITING, then FAIL (a variant
    whose worker died has a FAIL trial and, once resumed, a COMPLETE one).
    """
    from ..files import write_json

    trials: dict[str, list[Any]] = {}
    pending = 0
    for t in study.get_trials(deepcopy=False):
        if "variant" in t.user_attrs:
            trials.setdefault(t.user_attrs["variant"], []).append(t)
        else:  # a random/tpe trial no worker has drawn yet
            pending += 1
    order = ("COMPLETE", "RUNNING", "WAITING", "FAIL", "PRUNED")
    variants = []
    for name, ts in trials.items():
        best = min(ts, key=lambda t: (order.index(t.state.name), -t.number))
        row = {
            "variant": name,
            "label": best.user_attrs.get("label", name),
            "params": _values(sweep, best.params or ts[0].params),
            "seed": best.user_attrs.get("seed"),
            "run_dir": str(folder / name),
            "state": best.state.name,
            "value": best.value,
            "trials": [t.number for t in ts],
        }
        if best.state.name == "FAIL" and "error" in best.user_attrs:
            row["error"] = best.user_attrs["error"]
        variants.append(row)
    data = {
        "name": sweep.name,
        "sweep_file": sweep.file,
        "study": sweep.name,
        "storage": shown_url(storage_url),
        **{k: v for k, v in sweep.definition().items() if k != "name"},
        "counts": trial_counts(study),
        "pending_trials": pending,
        "variants": variants,
    }
    write_json(folder / "sweep.json", data)
    return data


def write_comparison(folder: Path, data: Mapping[str, Any]) -> tuple[list[Any], Any, str | None]:
    """The variants that finished, compared (`surgery.pages.compare`: mean ± std over the seeds of each
    label, best first) into comparison.md, comparison.json and comparison.html in the sweep's
    folder; when their runs have been evaluated (`surgery evaluate`), with the paired comparison
    (`surgery.pages.paired`), also added to sweep.json as ``significance``.

    Returns:
        (the variants compared: empty when none has finished yet, the paired comparison or None,
        a note saying why there is none, or None)
    """
    from ..errors import UsageError
    from ..files import write_json, write_text
    from ..pages.compare import aggregate, collect, paired_comparison, to_json, to_markdown, write_html

    done = {v["run_dir"]: v["label"] for v in data["variants"] if v["state"] == "COMPLETE"}
    rows = collect(list(done), skip_unfinished=True)
    if not rows:
        return [], None, None
    variants = aggregate(rows, labels=done)
    try:
        sig, missing = paired_comparison(variants)
        note = "differences not tested: evaluate the runs first, e.g. " + missing[0] if missing else None
    except UsageError as exc:  # some runs evaluated, or on other images: said, the table still written
        sig, note = None, f"differences not tested: {exc.problem}" + (f" ({exc.hint})" if exc.hint else "")
    write_text(folder / "comparison.md", to_markdown(variants, sig))
    write_text(folder / "comparison.json", to_json(variants, sig))
    write_html(folder / "comparison.html", variants, sig)
    if sig is not None:
        write_json(folder / "sweep.json", {**data, "significance": sig.to_dict()})
    return variants, sig, note


def _values(sweep: Sweep, params: dict[str, Any]) -> dict[str, Any]:
    """Optuna params (axis labels, drawn numbers) as the values the spec got."""
    out = {}
    for axis in sweep.axes:
        if axis.key in params:
            out[axis.key] = axis.choice(params[axis.key])[0]
    for r in sweep.ranges:
        if r.key in params:
            out[r.key] = params[r.key]
    return out


def trial_lines(sweep: Sweep, study: Any, folder: Path) -> list[str]:
    """One plain line per trial: number, state, objective value, variant, run directory or error."""
    lines = [f"{'trial':>5}  {'state':<8}  {sweep.objective:>{len(sweep.objective)}}  variant / run directory"]
    for t in study.get_trials(deepcopy=False):
        name = t.user_attrs.get("variant", "(not yet drawn)")
        value = f"{t.value:.4f}" if t.value is not None else "-"
        note = t.user_attrs.get("error")
        if note is None and "failed_trial" in t.system_attrs:
            note = f"retry of trial {t.system_attrs['failed_trial']}"
        if t.state.name == "FAIL" and note is None:
            note = "its worker stopped sending heartbeats"
        where = str(folder / name) if name != "(not yet drawn)" else name
        extra = f"  [{note.splitlines()[0]}]" if note else ""
        if t.state.name == "COMPLETE" and t.user_attrs.get("resumed_from_epoch"):
            extra += f"  [resumed after epoch {t.user_attrs['resumed_from_epoch']}]"
        lines.append(f"{t.number:>5}  {t.state.name:<8}  {value:>{len(sweep.objective)}}  {where}{extra}")
    return lines


# --------------------------------------------------------------------------- the command
def sweep_command(
    path: str,
    *,
    workers: int = 1,
    storage: str | None = None,
    out: str | None = None,
    device: str | None = None,
    overrides: Sequence[str] = (),
    worker: bool = False,
    lock_timeout: float = LOCK_TIMEOUT,
    console: Any = None,
    warn: Callable[[str], None] | None = None,
) -> int:
    """`surgery sweep`: check every variant, open (or create and fill) the study, train with
    `workers` processes, write sweep.json and list the trials.

    Args:
        lock_timeout: seconds to wait for an SQLite study that another process holds locked
            (said on stderr while waiting), before giving up with exit code 1.

    Returns:
        0 when every variant is trained; 1 when one failed or is left unfinished; 130 when interrupted.

    Raises:
        UserError: a mistake in the sweep file, a variant's spec, the flags or the storage.
    """
    from ..untrusted import Console

    console = console or Console(highlight=False, soft_wrap=True)

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    # --- the flags, the sweep file, and the command line that a worker or a rerun repeats
    _check_flags(workers, lock_timeout)
    sweep = load_sweep(path)
    folder = Path(out) if out else Path("runs") / sweep.name
    runs_root = folder.parent
    url = storage or default_storage(folder)
    argv = _sweep_argv(path, folder, storage, device, lock_timeout, overrides)
    shown = [shown_url(a) if a == storage else a for a in argv]  # no password in messages
    hint = shlex.join(["surgery", *shown, *(["--workers", str(workers)] if workers > 1 else [])])
    from ..spec import load_spec

    base = load_spec(sweep.spec, [*sweep.set, *overrides]).raw
    digest = fingerprint(sweep.definition(), base, overrides)
    # --- a new local study: every variant checked before the folder is made
    checked = None
    if not worker and storage is None and not (folder / "study.db").exists():
        checked = check_variants(sweep, overrides, runs_root, warn or say)  # a mistake leaves no folder behind
    _make_folder(folder)
    # --- the study: a worker's to work on, or opened (created and filled when new) and trained
    store = open_storage(
        url, sweep.heartbeat, sweep.grace, flag=storage is not None, lock_timeout=lock_timeout, note=_stderr_note
    )
    shown_storage = shown_url(url)

    def trainer(study: Any) -> Worker:
        return Worker(sweep, study, folder, runs_root, tuple(overrides), device, console, hint, shown_storage)

    with _storage_errors(url):  # the database went away, or stayed locked past --lock-timeout
        if worker:
            return work(trainer(_worker_study(sweep, store, digest, say, shown_storage)))
        study = open_study(
            sweep,
            store,
            digest,
            say,
            lambda: checked if checked is not None else check_variants(sweep, overrides, runs_root, warn or say),
        )
        left = _trials_left(sweep, study, shown_storage, say)
        code, interrupted = _train(study, left, workers, trainer, argv, device, base, say)
        # --- the report: sweep.json, the trials, the comparison and the exit code
        data = _report(sweep, study, folder, url, console, say)
        return _exit_code(data, interrupted, code, hint, say)


def _check_flags(workers: int, lock_timeout: float) -> None:
    if workers < 1:
        raise UsageError(
            "--workers is a number of processes",
            origin=Origin.flag("--workers", workers),
            found=str(workers),
            expected="1 or more",
        )
    if not lock_timeout > 0:
        raise UsageError(
            "--lock-timeout is a number of seconds",
            origin=Origin.flag("--lock-timeout", lock_timeout),
            found=str(lock_timeout),
            expected="a number above 0",
        )


def _sweep_argv(
    path: str, folder: Path, storage: str | None, device: str | None, lock_timeout: float, overrides: Sequence[str]
) -> list[str]:
    """The command's arguments (`--workers` aside) as a `--worker` process and a rerun repeat them."""
    return [
        "sweep",
        path,
        "--out",
        str(folder),
        *(["--storage", storage] if storage else []),
        *(["--device", device] if device else []),
        *(["--lock-timeout", f"{lock_timeout:g}"] if lock_timeout != LOCK_TIMEOUT else []),
        *[a for o in overrides for a in ("--set", o)],
    ]


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)  # the study's SQLite file, the runs and sweep.json
    except OSError as exc:
        raise RunDirError(
            f"cannot make the sweep's folder {folder}: {exc.strerror or exc}", origin=Origin.path(folder)
        ) from None


def _worker_study(sweep: Sweep, store: Any, digest: str, say: Callable[[str], None], shown_storage: str) -> Any:
    """The study a `--worker` process works on: one that `surgery sweep` without --worker made."""
    study = open_study(sweep, store, digest, say)
    if study is None:
        raise UsageError(
            f"there is no study {sweep.name!r} to work on",
            origin=Origin.flag("--storage", shown_storage),
            expected="a study made by `surgery sweep` without --worker",
        )
    return study


def _trials_left(sweep: Sweep, study: Any, shown_storage: str, say: Callable[[str], None]) -> int:
    """The trials waiting or running, said with the variants done."""
    counts = trial_counts(study)
    left = counts["waiting"] + counts["running"]
    say(
        f"sweep {sweep.name}: {sweep.trials} variants ({sweep.sampler}), {counts['complete']} done, "
        f"{left} to go; study {sweep.name!r} in {shown_storage}"
    )
    return left


def _train(
    study: Any,
    left: int,
    workers: int,
    trainer: Callable[[Any], Worker],
    argv: list[str],
    device: str | None,
    base: Mapping[str, Any],
    say: Callable[[str], None],
) -> tuple[int, bool]:
    """Train the `left` variants in this process, or in up to `workers` `--worker` processes.

    Returns:
        This process's exit code (0 when the variants were left to spawned workers) and whether it was interrupted.
    """
    code, interrupted = 0, False
    if left:
        n = min(workers, left)
        if n == 1:
            code = work(trainer(study))
            interrupted = code == 130
        else:
            codes, interrupted = spawn(n, [*argv, "--worker"], device or base.get("train", {}).get("device"), say)
            for i, c in enumerate(codes):
                if c not in (0, 130):
                    say(f"worker w{i + 1} ended with " + (f"signal {-c}" if c < 0 else f"exit code {c}"))
    return code, interrupted


def _report(
    sweep: Sweep, study: Any, folder: Path, url: str, console: Any, say: Callable[[str], None]
) -> dict[str, Any]:
    """Write sweep.json, list the trials, and compare the finished variants; return sweep.json's data."""
    data = write_sweep_json(sweep, study, folder, url)
    for line in trial_lines(sweep, study, folder):
        say(line)
    say(f"wrote {folder / 'sweep.json'}")
    variants, sig, note = write_comparison(folder, data)
    if variants:
        from ..pages.compare import to_markdown, to_table

        # a table drawn for the terminal; piped or logged, the Markdown (a fixed 80-column table wraps every cell)
        if console.is_terminal:
            console.print(to_table(variants, sig))
        else:
            say(to_markdown(variants, sig).rstrip("\n"))
        if note:
            say(note)
        say(f"wrote {folder / 'comparison.md'}, comparison.json and comparison.html")
    return data


def _exit_code(data: Mapping[str, Any], interrupted: bool, code: int, hint: str, say: Callable[[str], None]) -> int:
    """130 when interrupted; 1 when a variant failed or is unfinished (said, with the command to rerun) or `code`
    is not 0; else 0."""
    states = [v["state"] for v in data["variants"]]
    if interrupted:
        say(f"interrupted: rerun the same command to continue ({hint})")
        return 130
    unfinished = sum(s in ("RUNNING", "WAITING") for s in states) + data["pending_trials"]
    if unfinished:
        say(f"{unfinished} variants are unfinished: rerun the same command to continue ({hint})")
    return 1 if unfinished or any(s == "FAIL" for s in states) or code else 0


@contextlib.contextmanager
def _storage_errors(url: str) -> Any:
    from optuna.exceptions import StorageInternalError

    try:
        yield
    except StorageInternalError as exc:
        raise storage_failed(exc, shown_url(url)) from None


def _stderr_note(text: str) -> None:
    from ..untrusted import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(text, markup=False)


__all__ = ["sweep_command", "check_variants", "write_sweep_json", "write_comparison", "trial_lines"]
