#!/bin/sh
# Issue 21's figures in one go, for a quiet machine (nothing else running): about 8 minutes on
# this project's 2-core CPU. Writes benchmarks/results-cpu-perf-*.json; the figures go into
# benchmarks/README.md ("Settings by measurement, work beside training") and docs/performance.md.
#
#   sh benchmarks/perf_quiet.sh [PATH/TO/timm/train.py]
#
# The timm peer needs a copy of timm's train.py (git -C pytorch-image-models show HEAD:train.py);
# without one it is skipped.
set -e
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
uptime
# 0. where a whole run's time goes now (cProfile shares of one in-process run)
python benchmarks/run_profile.py
# 1. training-phase throughput: the weak and the strong plain loop against the engine (defaults:
#    channels_last auto, fp32), alternating fresh processes, median of 3; head-only's cache lead
python benchmarks/loops.py --case resnet18-cbam-64 --case head-only-32 --repeats 3 --steps 20 \
    --json benchmarks/results-cpu-perf-loops.json
# 2. what the inserted modules cost per step, and the fused gate against the three-operator one
python benchmarks/inserted_cost.py --repeats 5 --steps 5 --profile --json benchmarks/results-cpu-perf-inserted.json
# 3. whole commands against timm's train.py (the engine with its default channels_last: auto)
if [ -n "$1" ] && [ -f "$1" ]; then
    python benchmarks/peer_timm.py --timm-train "$1" --device cpu --model resnet18 --size 64 --batch 32 \
        --images 960 --repeats 3 --surgery-auto-layout --json benchmarks/results-cpu-perf-peer.json
else
    echo "no timm train.py given: the whole-command peer is skipped"
fi
uptime
