#!/usr/bin/env bash
# The GPU bench in one call (one H100/H200, about 9 minutes; see bench/README.md "Reproduce").
#   run from the repo root:  bash bench/gpu.sh          (carry .whl: diffusers, transformers, regex wheels)
#   bash bench/gpu.sh --dry  runs every python part at tiny widths on whatever is there (a CPU: minutes)
# Writes into $OUT (default bench/results/gpu):
#   capped.json   the full 1024 px, 50-step turn under a hard cap: fp8 + phase within 8 GiB, bf16 + phase 16 GiB
#   gpu-targets.json/.md  official dimensions, compiled: decode, UNet, VAE, full turn (issue 12's speed targets)
#   gpu.json/.md  every other figure (sweep of 8 measured as 8 stock turns, chat turn 5, peak memory, load)
#   gpu.log       everything printed; status.txt: one line per step with its exit code
# Every figure asserts its check (bench/figures.py TOL); a failed check or cap makes its step exit 1 (recorded
# in status.txt). Each step is cut by `timeout`, and the JSON is rewritten after every figure.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
START=$(date +%s)
TOTAL=${WEGEN_BENCH_SECONDS:-540}   # the whole script's wall-clock budget
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
left() { echo $((TOTAL - ($(date +%s) - START))); }
log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/gpu.log"; }
step() {  # step NAME SECONDS CMD...: run under a hard time limit, output into the log, exit code into status.txt
  local name=$1 limit=$2; shift 2
  if [ "$limit" -lt 20 ]; then log "$name: skipped, no time left"; echo "$name skipped" >> "$OUT/status.txt"; return; fi
  log "$name (at most ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/gpu.log"
  local rc=${PIPESTATUS[0]}
  echo "$name exit $rc" >> "$OUT/status.txt"
}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || { log "wheel install failed"; exit 1; }
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  2>&1 | tee -a "$OUT/gpu.log"
python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'diffusers', diffusers.__version__)" 2>&1 | tee -a "$OUT/gpu.log"

if [ "$DRY" = 1 ]; then
  step capped 300 python3 bench/capped_turn.py --dry --json "$OUT/capped.json"
  step bench 600 python3 bench/run.py --size full-mini --quick --json "$OUT/gpu.json"
  log "dry run done"; exit 0
fi

# 1) the memory claims: one full turn under set_per_process_memory_fraction (fp8 + phase: 8 GiB; bf16: 16 GiB)
step capped $(( $(left) - 330 )) python3 bench/capped_turn.py --json "$OUT/capped.json"

# 2) the speed targets at official dimensions, UNet and decoder layer compiled (about 100 s of compiling)
step targets $(( $(left) - 150 )) python3 bench/run.py --workdir /tmp/wegen-bench --size full --device cuda \
  --compile default --only 1,3,4,5 --repeats 3 --json "$OUT/gpu-targets.json" --budget-s $(( $(left) - 180 ))

# 3) the other figures on the default path: sweep of 8 (stock: 8 real sequential turns), chat turn 5, peak, load
step figures $(( $(left) - 5 )) python3 bench/run.py --workdir /tmp/wegen-bench --size full --device cuda \
  --only 2,6,8,7 --repeats 2 --json "$OUT/gpu.json" --budget-s $(( $(left) - 20 ))
log "done"; cat "$OUT/status.txt" | tee -a "$OUT/gpu.log"
