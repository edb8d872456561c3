"""What the study storage costs `surgery sweep` per variant, without any training.

    python benchmarks/sweep_storage.py [--variants 50] [--storage URL] [--workers 2]

A study is created and filled the way `surgery sweep` does (one queued trial per grid point);
then `--workers` processes take trials until none is left, doing per trial what a worker does
besides training: take it (WAITING -> RUNNING), suggest its params, set its user attributes,
start and stop its heartbeat thread, report its value, and look for stale trials. Prints the
seconds of storage work per variant (the median over the workers' trials) and the time to
create and fill the study. Default storage: a temporary SQLite file (`surgery sweep`'s default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = """
import json, sys, time
import optuna
from optuna.storages import fail_stale_trials
from optuna.storages._heartbeat import get_heartbeat_thread
from surgery.sweep import open_storage
study = optuna.load_study(study_name="bench", storage=open_storage(sys.argv[1], 20, 60))
times = []
while True:
    t0 = time.perf_counter()
    fail_stale_trials(study)
    trial_id = study._pop_waiting_trial_id()
    if trial_id is None:
        break
    heartbeat = get_heartbeat_thread(trial_id, study._storage)
    heartbeat.start()
    trial = optuna.Trial(study, trial_id)
    trial.suggest_categorical("surgery.0.at", ["l4", "l34", "all"])
    trial.suggest_categorical("seed", ["0", "1"])
    for key in ("variant", "label", "seed", "run_dir", "host", "pid", "resumed_from_epoch"):
        trial.set_user_attr(key, "x")
    heartbeat.join()
    study.tell(trial, 0.5)
    times.append(time.perf_counter() - t0)
print(json.dumps(times))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--storage", default=None, help="a database URL (default: a temporary SQLite file)")
    args = parser.parse_args()
    import optuna

    from surgery.sweep import open_storage

    with tempfile.TemporaryDirectory() as tmp:
        url = args.storage or f"sqlite:///{Path(tmp) / 'study.db'}"
        storage = open_storage(url, 20, 60)
        if args.storage:
            try:  # a previous run's study in a shared database
                optuna.delete_study(study_name="bench", storage=storage)
            except KeyError:
                pass
        t0 = time.perf_counter()
        study = optuna.create_study(study_name="bench", storage=storage, direction="maximize")
        for i in range(args.variants):
            study.enqueue_trial(
                {"surgery.0.at": ["l4", "l34", "all"][i % 3], "seed": str(i % 2)}, user_attrs={"variant": f"v{i}"}
            )
        fill = time.perf_counter() - t0
        procs = [
            subprocess.Popen([sys.executable, "-c", WORKER, url], stdout=subprocess.PIPE, text=True)
            for _ in range(args.workers)
        ]
        per_trial = [t for p in procs for t in json.loads(p.communicate()[0])]
        complete = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
    print(f"storage: {url.split(':')[0]}; {args.variants} variants, {args.workers} workers, {complete} complete")
    print(f"create and fill the study: {fill:.3f} s ({fill / args.variants * 1000:.1f} ms per variant)")
    print(
        f"per variant in a worker: median {statistics.median(per_trial) * 1000:.1f} ms, "
        f"max {max(per_trial) * 1000:.1f} ms"
    )
    return 0 if complete == args.variants else 1


if __name__ == "__main__":
    raise SystemExit(main())
