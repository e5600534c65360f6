#!/usr/bin/env bash
# The one prepared command for a lent GPU machine (nothing installed there: Python with torch+CUDA, numpy,
# pyarrow, safetensors, click, pyyaml, pillow, pytest; no Ray, no pydantic, no network). From the repository
# root, all inside GPU_CHECK_SECONDS (480):
#   1. torch, CUDA and the GPU;
#   2. pytest -m cuda tests/test_cuda.py (the CUDA tests; those needing Ray or the CLI skip);
#   3. bench/gpu.py on the AFHQ-256 shape at batch 32, 8 and 128, as many as fit (rows print as they finish).
# Logs and bench/gpu.py's rows (gpu.jsonl) go to $OUT (a new temporary folder if unset); each step has its
# own timeout, and the tail of each log is printed. GPU_CHECK_DEVICE=cpu runs the same steps here on the
# demo model at batch 1, to check the script itself.
#
#   OUT=/tmp/gpu-check bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
BUDGET=${GPU_CHECK_SECONDS:-480}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then
    BENCH=(--device cuda --shape afhq --batch-sizes 32 8 128)
else
    BENCH=(--device cpu --shape demo --batch-sizes 1)
    export OMP_NUM_THREADS=1  # a shared CPU: one thread per process
fi
echo "gpu_check: logs in $OUT, ${BUDGET}s in all"

step() {  # step NAME SECONDS COMMAND...: run with a timeout, log to $OUT/NAME.log, print its tail
    local name=$1 limit=$2
    shift 2
    if [ "$limit" -lt 10 ]; then
        echo "== $name: not run, the ${BUDGET}s budget is spent"
        return
    fi
    echo "== $name (at most ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n "${TAIL:-60}" "$OUT/$name.log"
    echo "== $name: exit $rc$([ $rc -eq 124 ] && echo ' (timed out)') after ${SECONDS}s in all"
}

left() { echo $((BUDGET - SECONDS - 5)); }
min() { echo $(($1 < $2 ? $1 : $2)); }

step environment 60 python -c '
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU:", torch.cuda.get_device_name(0), f"| {p.total_memory / 2**30:.0f} GiB | capability {p.major}.{p.minor}",
          "| devices:", torch.cuda.device_count())
else:
    print("no CUDA device: the CUDA tests skip")
'
TAIL=40 step test_cuda "$(min 210 "$(left)")" python -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider \
    --durations=10
# batch sizes start while at least a minute is left; the timeout stops the last one where it is
BENCH_LIMIT=$(left)
step gpu_bench "$BENCH_LIMIT" python bench/gpu.py "${BENCH[@]}" --budget-seconds $((BENCH_LIMIT - 60)) \
    --json "$OUT/gpu.jsonl"
echo "gpu_check: done in ${SECONDS}s; logs in $OUT:" "$OUT"/*
