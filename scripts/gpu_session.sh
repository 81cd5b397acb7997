#!/usr/bin/env bash
# Everything a short GPU lease should run, in one command, inside one time budget:
#
#   bash scripts/gpu_session.sh DEST [BUDGET_SECONDS]      (default budget: 420 s)
#
# 1. the card and the versions (nvidia-smi, pip list)                      -> env.txt
# 2. scripts/gpu_check.sh: the cuSPARSELt build, every GPU-only test, the cuSPARSELt benchmark and
#    the torch peer (its own stage caps, 295 s at most)                     -> check/
# 3. python -m benchmarks.gpu_kernels: the Pallas kernels against the card's ceilings and XLA, and
#    the transformer-block training step (capped; writes each section as it finishes) -> kernels/
# 4. python -m benchmarks.run --models gpt: the GPT-style decoder's step time, memory, compile time
#    and FLOPs on the GPU (what is left of the budget)                      -> run/
#
# The device machine returns at most 8 files, so everything is written to a scratch folder and
# packed into DEST/gpu_session.tar.gz; DEST/summary.md holds the tables to read first, and
# DEST/RESULTS.md is benchmarks/RESULTS.md with the sections the benchmarks appended.
# $PYTHON picks the interpreter (default python3: on the GPU machine, the one with jax's CUDA plugin).
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${1:?usage: gpu_session.sh DEST [BUDGET_SECONDS]}
BUDGET=${2:-420}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
mkdir -p "$DEST"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
T0=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - T0))); }

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  "$PY" --version
  "$PY" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda13-plugin|jax-cuda13-pjrt|flax|optax|chex|triton|torch|nvidia-cusparselt-cu13|numpy|tqdm|matplotlib) '
  command -v g++ nvcc
} > "$WORK/env.txt" 2>&1
cat "$WORK/env.txt"

PYTHON="$PY" bash scripts/gpu_check.sh --out "$WORK/check"

cap=$(($(left) - 90)); [ "$cap" -gt 170 ] && cap=170
if [ "$cap" -gt 20 ]; then
  echo "== gpu_kernels (timeout ${cap}s)"
  JAX_PLATFORMS=cuda timeout --kill-after=10 "$cap" "$PY" -m benchmarks.gpu_kernels --runs 20 \
    --out "$WORK/kernels" > "$WORK/kernels.log" 2>&1
  echo "   rc $?"; tail -n 40 "$WORK/kernels.log"
fi

cap=$(left)
if [ "$cap" -gt 20 ]; then
  echo "== benchmarks.run --models gpt (timeout ${cap}s)"
  JAX_PLATFORMS=cuda timeout --kill-after=10 "$cap" "$PY" -m benchmarks.run --models gpt --skip-gemm \
    --no-faults --compile-reps 1 --runs 10 --out "$WORK/run" > "$WORK/run.log" 2>&1
  echo "   rc $?"
fi

cp benchmarks/RESULTS.md "$DEST/RESULTS.md"
{ cat "$WORK/check/summary.md" 2>/dev/null; echo; grep -A200 '^### Targets\|^#### Targets' "$WORK/kernels.log" 2>/dev/null | head -40
  echo; grep -v '^\s*$' "$WORK/run.log" 2>/dev/null | tail -n 60; } > "$DEST/summary.md"
tar czf "$DEST/gpu_session.tar.gz" -C "$WORK" .
echo "== done in $(($(date +%s) - T0)) s; $DEST: $(ls "$DEST" | tr '\n' ' ')"
