#!/usr/bin/env bash
# The GPU bench in one call, well under 9 minutes on one H100/H200 (see bench/README.md).
#   run from the repo root:  bash bench/gpu.sh            (carry .whl: diffusers, transformers, regex wheels)
# Writes into $OUT (default bench/results/gpu): gpu-compile.json/.md (official dimensions, compiled: the
# targets), gpu.json/.md (the default path, if time is left), gpu-tiny.json/.md (if time is left) and gpu.log.
# Each step is cut by `timeout`, and the JSON is rewritten after every figure, so a step cut short still
# leaves its figures.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
START=$(date +%s)
TOTAL=${WEGEN_BENCH_SECONDS:-530}   # the whole script's wall-clock budget
left() { echo $((TOTAL - ($(date +%s) - START))); }
log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu.log"; }
bench() {  # bench SECONDS ARGS...: bench/run.py under a hard time limit, output into the log
  local limit=$1; shift
  timeout "$limit" python3 bench/run.py --workdir /tmp/wegen-bench "$@" 2>&1 | tee -a "$OUT/gpu.log"
}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || { log "wheel install failed"; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 | tee -a "$OUT/gpu.log"
python3 -c "import torch, transformers, diffusers, accelerate; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'diffusers', diffusers.__version__, 'accelerate', accelerate.__version__)" 2>&1 \
  | tee -a "$OUT/gpu.log"

# 1) the targets: official dimensions, random weights, WEGEN_COMPILE=default (the UNet and one decoder layer
#    compiled, then captured in CUDA graphs); decode, UNet, VAE, full turn and sweep of 8, stock and ours.
#    Compiling costs about 100 s for the UNet per batch shape and a few seconds for the decoder layer.
log "full size, compiled: the issue-5 targets"
bench $(( $(left) - 40 )) --size full --device cuda --compile default --only 1,3,4,5,2 \
  --json "$OUT/gpu-compile.json" --budget-s $(( $(left) - 70 ))

# 2) the default path (no compile) with every figure, as far as the time left allows
if [ "$(left)" -gt 100 ]; then
  log "full size, default path"
  bench $(( $(left) - 45 )) --size full --device cuda --json "$OUT/gpu.json" --budget-s $(( $(left) - 60 ))
fi

# 3) the tiny checkpoint on the GPU (a launch-bound model: what graphs save per step)
if [ "$(left)" -gt 40 ]; then
  log "tiny"
  bench $(( $(left) - 5 )) --size tiny --device cuda --only 1,2,3,4,5,6 --json "$OUT/gpu-tiny.json" \
    --budget-s $(( $(left) - 15 ))
fi
log "done"
