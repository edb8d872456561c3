#!/usr/bin/env bash
# Everything the GPU issue checks, in one run on a device machine, in well under 8 minutes:
#   bash benchmarks/gpu_check.sh --prepare   # here, with network: wheels the device image lacks
#                                            # (.whl/) and a copy of timm's train.py (.peer/), both
#                                            # git-ignored and never committed
#   bash benchmarks/gpu_check.sh             # there (device `run`, carry .whl and .peer): the
#                                            # `cuda` tests, then benchmarks/gpu.py with the peer
# Results go to $OUT (the device tool's folder; a temporary one elsewhere): pytest-cuda.log,
# gpu.log, gpu.json. On a machine without CUDA the tests skip and the benchmark says so: that is
# how CI and this CPU shake the script out.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
  # the device image has torch, torchvision, timm, pytest, rich, safetensors, regex, yaml, sklearn;
  # not jsonschema and its own needs
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl jsonschema jsonschema-specifications referencing rpds-py
  mkdir -p .peer
  timm_repo=${TIMM_REPO:-/work/.mirror/huggingface+pytorch-image-models/repo}
  git -C "$timm_repo" show HEAD:train.py > .peer/train.py
  echo "prepared: $(ls .whl | tr '\n' ' ') and .peer/train.py"
  exit 0
fi
OUT=${OUT:-$(mktemp -d)}
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi";
  python3 -c "import torch, timm, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
  'timm', timm.__version__, 'cuda', torch.cuda.is_available())"; } | tee "$OUT/machine.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider -m cuda -rs tests/test_cuda.py 2>&1 | tee "$OUT/pytest-cuda.log"
peer=()
[ -f .peer/train.py ] && peer=(--timm-train .peer/train.py --repeats 2 --peer-images 6144)
timeout 330 python3 benchmarks/gpu.py --json "$OUT/gpu.json" "${peer[@]}" 2>&1 | tee "$OUT/gpu.log"
echo "results in $OUT"
