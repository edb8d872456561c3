"""The workers of `surgery sweep`: one worker's loop (take a queued trial, train its variant into
its run directory, report its objective) and the N processes `--workers N` starts.

A worker takes trials until none is waiting or running. While it trains, Optuna's heartbeat
thread marks it alive; a trial it is interrupted in (Ctrl-C, SIGTERM) is failed and queued again
with the same params, so the next worker resumes the same run directory from its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import Origin, RunDirError, UserError, describe_exception
from .file import Sweep, Variant

DONE, FAILED, INTERRUPTED, PRUNED = "done", "failed", "interrupted", "pruned"


def variant_attrs(variant: Variant) -> dict[str, Any]:
    """The trial attributes that name a variant (kept by a trial queued again)."""
    return {"variant": variant.name, "label": variant.label, "seed": variant.seed}


# --------------------------------------------------------------------------- one worker
@dataclass
class Worker:
    """What one worker process needs to train the trials it takes."""

    sweep: Sweep
    study: Any
    folder: Path  # runs/<sweep>
    runs_root: Path  # where `pretrained: run:NAME` looks: the sweep folder's parent
    overrides: tuple[str, ...]
    device: str | None
    console: Any
    resume_hint: str
    storage: str  # the study's URL, password hidden (for messages)

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)


def work(worker: Worker) -> int:
    """Take queued trials until none is waiting or running; 130 when interrupted (the trial in
    hand is queued again, its checkpoint kept), else 0.

    An idle worker waits while other trials run: when one of their workers dies, its trial is
    queued again once its heartbeat is `grace` seconds old, and this worker takes it over.
    """
    from optuna.exceptions import StorageInternalError
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    study, poll = worker.study, max(1.0, min(worker.sweep.heartbeat, 5))
    waiting_said = False
    try:
        while True:
            fail_stale_trials(study)
            held, trial_id = hold_signals(), None  # until the trial taken has a heartbeat (see run_trial)
            try:
                trial_id = study._pop_waiting_trial_id()  # WAITING -> RUNNING, for one worker only
            finally:
                if trial_id is None:
                    release_signals(held)
            if trial_id is None:
                running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if not running:
                    return 0
                if not waiting_said:
                    worker.say(
                        f"nothing left to take; waiting while trials {', '.join(str(t.number) for t in running)} "
                        "run (to take one over if its worker stops)"
                    )
                    waiting_said = True
                time.sleep(poll)
                continue
            waiting_said = False
            if run_trial(worker, trial_id, held) == INTERRUPTED:
                return 130
    except KeyboardInterrupt:
        return 130
    except StorageInternalError as exc:  # the database went away: the study keeps what was told
        raise storage_failed(exc, worker.storage) from None


def storage_failed(exc: BaseException, storage: str) -> UserError:
    """The error for a study storage that fails mid-command (the database went away, or stayed
    locked past the lock timeout): exit code 1, and what the study keeps."""
    err = UserError(
        f"the study's storage failed: {describe_exception(exc.__cause__ or exc)}",
        origin=Origin.path(storage),
        hint="rerun the same command once the database is back (or no longer locked): finished variants are kept",
    )
    err.exit_code = 1
    return err


def run_trial(worker: Worker, trial_id: int, held: Any = None) -> str:
    """Train the variant of one trial (just taken) into its run directory and report its objective.

    A run directory with a finished run of this spec is reported without training (a trial queued
    again after its worker was thought dead, but finished after all); one with a checkpoint resumes.

    Args:
        held: what `hold_signals` returned before the trial was taken: a Ctrl-C is acted on
            only once the trial has a heartbeat and can be queued again (a RUNNING trial that
            never had a heartbeat is never found stale, and idle workers would wait on it).
    """
    import optuna
    from optuna.storages._heartbeat import get_heartbeat_thread  # Optuna's own, as `study.optimize` uses it
    from optuna.trial import TrialState

    from ..train.loop import NonFiniteLoss, TrainingStopped

    study, sweep = worker.study, worker.sweep
    heartbeat = get_heartbeat_thread(trial_id, study._storage)
    heartbeat.start()  # at once: a trial without any heartbeat is never found stale
    try:
        release_signals(held)  # a Ctrl-C that came meanwhile lands here, and queues the trial again
        trial = optuna.Trial(study, trial_id)
        study.sampler = _sampler(sweep, trial.number)
        variant = _variant_of(sweep, trial)
        cpu = time.process_time()  # this process's CPU time, every thread of it: what the variant cost
        summary = _train(worker, trial, variant)
        trial.set_user_attr("cpu_seconds", round(time.process_time() - cpu, 3))
        if summary.get("pruned"):
            heartbeat.join()
            return _pruned(worker, trial, variant, summary)
        value = summary.get(sweep.objective)
        if not isinstance(value, (int, float)) or not math.isfinite(value):  # Optuna would fail the trial silently
            raise RunDirError(
                f"the run's {sweep.objective} is {value}, which cannot be ranked",
                origin=Origin.path(worker.folder / variant.name / "summary.json"),
                expected="a finite number",
                hint="see the run's metrics.jsonl",
            )
    except NonFiniteLoss as exc:
        return _fail(worker, trial_id, heartbeat, f"stopped: {exc}")
    except (TrainingStopped, KeyboardInterrupt) as exc:  # a signal: checkpointed; queue it again for the next run
        heartbeat.join()
        requeue(worker, trial_id, str(exc) or "interrupted")
        return INTERRUPTED
    except UserError as exc:
        return _fail(worker, trial_id, heartbeat, str(exc))
    except Exception as exc:  # noqa: BLE001 - one variant's crash (out of memory, a bug) must not end the sweep
        import traceback

        traceback.print_exc()
        return _fail(worker, trial_id, heartbeat, describe_exception(exc, 300))
    heartbeat.join()
    told = study.tell(trial, value, skip_if_finished=True)
    if told.state != TrialState.COMPLETE:
        worker.say(
            f"trial {trial.number} ({variant.name}) was declared dead meanwhile and queued again; "
            "the worker that takes it reports this run"
        )
        return DONE
    worker.say(f"trial {trial.number} {variant.name}: {sweep.objective} {value:.4f}")
    return DONE


def _pruned(worker: Worker, trial: Any, variant: Variant, summary: dict[str, Any]) -> str:
    """Record a run its pruner stopped as PRUNED (Optuna keeps its last reported figure as its
    value): never ranked, never a loss, and finished, so a rerun does not train it again."""
    from optuna.trial import TrialState

    sweep, pruned = worker.sweep, summary["pruned"]
    step = pruned["after_epoch"] + 1
    trial.set_user_attr("pruned_after_epoch", step)
    last = summary.get(sweep.objective)
    if step not in trial.storage.get_trial(trial._trial_id).intermediate_values and _finite(last):
        trial.report(float(last), step)  # a finished pruned run reused by a retried trial: nothing reported yet
    told = worker.study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
    if told.state != TrialState.PRUNED:
        worker.say(f"trial {trial.number} ({variant.name}) was declared dead meanwhile and queued again")
        return DONE
    worker.say(f"trial {trial.number} {variant.name}: pruned after epoch {step}/{pruned['epochs']}")
    return PRUNED


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# the metrics-row figure a run reports after each epoch for each objective (running best for best_*);
# a single-label run has no per-epoch macro-F1, and reports its val_acc instead
_EPOCH_FIGURE = {"final_val_loss": "val_loss", "best_val_map": "val_map", "final_val_map": "val_map"}


def epoch_value(objective: str, rows: Sequence[dict[str, Any]]) -> float:
    """The objective as it stands after the last of `rows` (what the pruner compares at that epoch)."""
    key = _EPOCH_FIGURE.get(objective, "val_macro_f1" if objective == "val_macro_f1" else "val_acc")
    values = [row.get(key, row.get("val_acc")) for row in rows]
    return max(values) if objective.startswith("best_") else values[-1]


def _reporter(worker: Worker, trial: Any) -> Callable[[list, int], str | None]:
    """The runner's epoch hook: report each new epoch's figure to the trial (step = epochs trained),
    then ask the study's pruner whether to go on (not after the last epoch: nothing is left to save)."""
    sweep, reported = worker.sweep, set()

    def on_epoch(rows: list, total: int) -> str | None:
        for i, row in enumerate(rows):  # a resumed run reports its earlier epochs first
            step = row["epoch"] + 1
            value = epoch_value(sweep.objective, rows[: i + 1])
            if step not in reported and _finite(value):
                trial.report(float(value), step)
            reported.add(step)
        if len(rows) >= total or not trial.should_prune():
            return None
        return (
            f"Optuna's {type(worker.study.pruner).__name__} ({sweep.prune.pruner}) found its "
            f"{sweep.objective} of {value:.4f} behind the other variants'"
        )

    return on_epoch


def _train(worker: Worker, trial: Any, variant: Variant) -> dict[str, Any]:
    from ..spec import load_spec
    from ..train import runner

    run_dir = worker.folder / variant.name
    for key, value in {
        **variant_attrs(variant),
        "run_dir": str(run_dir),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }.items():
        trial.set_user_attr(key, value)
    spec = load_spec(worker.sweep.spec, [*worker.sweep.set, *worker.overrides, *variant.overrides])
    lock = _wait_for_run_dir(worker, run_dir)
    try:
        summary = _finished_run(run_dir, spec, worker.console.print)
    finally:
        if lock is not None:
            lock.release()
    if summary is not None:
        summary, written = summary
        trial.set_user_attr("reused_finished_run", True)
        rewritten = f" (its training had finished; wrote {', '.join(written)})" if written else ""
        worker.say(f"trial {trial.number} {variant.name}: already trained in {run_dir}{rewritten}")
        return summary
    start = _checkpoint_epoch(run_dir / "checkpoints" / "last.pt")
    trial.set_user_attr("resumed_from_epoch", start)
    worker.say(
        f"trial {trial.number} {variant.name}: "
        + ("resuming from its checkpoint" if start else "training")
        + f" in {run_dir}"
    )
    resume = run_dir.is_dir() and any(run_dir.iterdir())
    return runner.run(
        spec,
        run_dir,
        device=worker.device,
        resume=resume,
        console=worker.console,
        on_epoch=_reporter(worker, trial) if worker.sweep.prune.on else None,
        runs_root=worker.runs_root,
        resume_hint=worker.resume_hint,
    )


def _sampler(sweep: Sweep, number: int) -> Any:
    """The sampler for one trial, seeded by its number: two workers never draw the same values by
    sharing a seed, and a sweep run again draws what it drew before."""
    import optuna

    seed = sweep.sampler_seed + number
    if sweep.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)  # grid trials arrive with every value fixed


def _variant_of(sweep: Sweep, trial: Any) -> Variant:
    params: dict[str, Any] = {}
    for axis in sweep.axes:
        params[axis.key] = trial.suggest_categorical(axis.key, list(axis.labels))
    for r in sweep.ranges:
        if r.integer:
            params[r.key] = trial.suggest_int(r.key, int(r.low), int(r.high), step=int(r.step or 1), log=r.log)
        else:
            params[r.key] = trial.suggest_float(r.key, r.low, r.high, step=r.step, log=r.log)
    name = trial.user_attrs.get("variant") or f"trial-{trial.number:04d}"  # a retried trial keeps its first name
    return sweep.variant(params, None if sweep.sampler == "grid" else name)


def _fail(worker: Worker, trial_id: int, heartbeat: Any, error: str) -> str:
    from optuna.trial import TrialState

    heartbeat.join()
    study = worker.study
    with contextlib.suppress(Exception):  # the trial may have been failed as stale meanwhile
        study._storage.set_trial_user_attr(trial_id, "error", error)
    number = study._storage.get_trial_number_from_id(trial_id)
    study.tell(number, state=TrialState.FAIL, skip_if_finished=True)  # tell takes a trial's number, not its id
    worker.say(f"trial {number} failed: {error}")
    return FAILED


def requeue(worker: Worker, trial_id: int, why: str) -> None:
    """Fail an interrupted trial and queue a copy (same params, same run directory): the next
    `surgery sweep` resumes it from its checkpoint at once instead of after the grace period."""
    from optuna.trial import TrialState

    study = worker.study
    frozen = study._storage.get_trial(trial_id)
    if frozen.state.is_finished():
        return
    with contextlib.suppress(Exception):
        study._storage.set_trial_user_attr(trial_id, "error", "interrupted")
    study.tell(frozen.number, state=TrialState.FAIL, skip_if_finished=True)
    # stopped before its params were suggested, a grid trial still holds them as its fixed params
    params = frozen.params or frozen.system_attrs.get("fixed_params", {})
    study.enqueue_trial(dict(params), user_attrs={k: v for k, v in frozen.user_attrs.items() if k != "error"})
    worker.say(f"trial {frozen.number} queued again, to resume from its checkpoint: {why}")


def hold_signals() -> tuple[dict, list] | None:
    """Note SIGINT and SIGTERM instead of acting on them; `release_signals` acts on them.
    (Python runs signal handlers in the main thread, whichever thread the signal reached.)"""
    noted: list[int] = []
    try:
        previous = {
            s: signal.signal(s, lambda signum, frame: noted.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)
        }
    except ValueError:  # not the main thread: signals are not ours to handle
        return None
    return previous, noted


def release_signals(held: tuple[dict, list] | None) -> None:
    """Restore the handlers `hold_signals` replaced; a signal noted meanwhile raises KeyboardInterrupt."""
    if held is None:
        return
    previous, noted = held
    for s, handler in previous.items():
        signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: not set from Python
    if noted:
        raise KeyboardInterrupt


def _wait_for_run_dir(worker: Worker, run_dir: Path) -> Any:
    """Wait while another process holds the run directory (a worker that was thought dead, still
    finishing the variant this trial was queued again for); return its lock, now held."""
    from ..runs.writer import RunLock

    said = False
    while True:
        try:
            lock = RunLock.take(run_dir)
        except RunDirError as exc:
            if "another run" not in exc.problem:  # rundir's words for a folder locked by a live process
                raise
            if not said:
                worker.say(f"{exc.problem}: waiting for it to finish")
                said = True
            time.sleep(max(1.0, min(worker.sweep.heartbeat, 5)))
            continue
        return lock


def _finished_run(run_dir: Path, spec: Any, say: Callable[..., None]) -> tuple[dict[str, Any], list[str]] | None:
    """The summary of a run of `spec` in `run_dir` whose training finished, and the final files
    drawn now because its process was killed before drawing them (`train.final.complete_run`);
    None when it holds no run whose training finished (it resumes from its checkpoint)."""
    import yaml

    from ..train.final import complete_run

    summary, saved = run_dir / "summary.json", run_dir / "spec.yaml"
    if not summary.is_file():
        return None
    if not saved.is_file() or yaml.safe_load(saved.read_text(encoding="utf-8")) != yaml.safe_load(spec.to_yaml()):
        raise RunDirError(
            f"the run directory {run_dir} holds a finished run of another spec",
            exit_code=2,
            origin=Origin.path(run_dir),
            expected="the run of this variant, or no run",
            hint="the sweep's runs belong to another definition: use another --out or sweep name",
        )
    data = json.loads(summary.read_text(encoding="utf-8"))
    if "final_val_acc" not in data:
        return None
    written = complete_run(run_dir, spec, say)
    return None if written is None else (data, written)


def _checkpoint_epoch(path: Path) -> int:
    """The epoch a run resumes at (0: none), read without loading the tensors."""
    import torch

    if not path.is_file():
        return 0
    with contextlib.suppress(Exception):  # an unreadable checkpoint: the run itself says so
        return int(torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)["epoch"])
    return 0


# --------------------------------------------------------------------------- several workers
def worker_environments(n: int, device: str | None) -> list[dict[str, str]]:
    """One environment per worker: a GPU each (round robin) when the runs use CUDA, and the CPU
    cores shared out (OMP_NUM_THREADS) so N workers do not each start a thread per core.
    A device with an index (cuda:1) is left alone: it names its GPU."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // n)
    asked = os.environ.get("OMP_NUM_THREADS", "")
    if asked.isdigit() and int(asked) > 0:
        threads = min(threads, int(asked))
    gpus: list[str] = []
    if (device or "auto") in ("auto", "cuda") and torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    envs = []
    for i in range(n):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        envs.append(env)
    return envs


def spawn(n: int, argv: Sequence[str], device: str | None, say: Callable[[str], None]) -> tuple[list[int], bool]:
    """Start N worker processes (`surgery sweep ... --worker`), relay their output line by line
    with a prefix, and wait. Ctrl-C (or SIGTERM) is passed on once: each worker checkpoints the
    batch it is on, queues its trial again and stops; a second one kills them.

    Returns:
        The workers' exit codes, and whether the sweep was interrupted.
    """
    procs, relays = [], []
    for i, env in enumerate(worker_environments(n, device)):
        proc = subprocess.Popen(
            [sys.executable, "-m", "surgery", *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        relay = threading.Thread(target=_relay, args=(proc, f"w{i + 1}"), daemon=True)
        relay.start()
        procs.append(proc)
        relays.append(relay)
        gpu = f", CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in env else ""
        say(f"worker w{i + 1}: pid {proc.pid}, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}{gpu}")
    interrupted = False
    previous = _on_sigterm(signal.default_int_handler)  # SIGTERM (a scheduler's stop) as Ctrl-C
    try:
        try:
            codes = [p.wait() for p in procs]
        except KeyboardInterrupt:
            interrupted = True
            say("interrupted: each worker checkpoints and stops (again to stop them at once)")
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGINT)
            try:
                codes = [p.wait() for p in procs]
            except KeyboardInterrupt:
                for p in procs:
                    p.kill()
                codes = [p.wait() for p in procs]
    finally:
        _on_sigterm(previous)
        for relay in relays:
            relay.join(timeout=5)
    return codes, interrupted


def _on_sigterm(handler: Any) -> Any:
    try:
        return signal.signal(signal.SIGTERM, handler)
    except (ValueError, TypeError):  # not the main thread, or no handler to restore
        return None


def _relay(proc: subprocess.Popen, prefix: str) -> None:
    for line in proc.stdout:
        sys.stdout.write(f"{prefix} | {line}")
        sys.stdout.flush()


__all__ = ["Worker", "work", "run_trial", "spawn", "storage_failed", "variant_attrs"]
