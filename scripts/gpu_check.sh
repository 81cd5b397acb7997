#!/usr/bin/env bash
# One command for a GPU machine: build the cuSPARSELt extension, run every GPU-only test, then the
# GPU benchmark, each stage under its own timeout, each writing its results (markdown + JSON) into
# one folder as it finishes -- a run cut off by a timeout still leaves the stages it finished.
#
#   bash scripts/gpu_check.sh [--out DIR] [--smoke] [--only "STAGE ..."]
#
# For a bare machine of the kind the project is lent: one H100/H200, Python 3.12, jax 0.11.2 with
# the CUDA 13 plugin, nvidia-cusparselt-cu13, nvcc 13.0, torch; no network. Run from the working
# tree (PYTHONPATH=. is set here). $PYTHON picks the interpreter (default: python). The stage caps
# add up to under 8 minutes (460 s); on an H200 stages 1-6 took about 4 minutes (2026-11-29).
# --only runs the named stages alone (e.g. --only "1_build 2_cslt_tests"), for a rerun.
#
# Stages (DIR/<stage>.log, DIR/<stage>.json, DIR/<stage>.md; DIR/summary.md lists them all):
#   1_build           python -m fst_jax.cusparselt build      (compiles with g++, ~10 s)   40 s
#   2_cslt_tests      tests/test_cusparselt_gpu.py             (values, layouts, vmap, scan,
#                                                               poisoned outputs, plan cache) 60 s
#   3_pallas_backend  tests/test_pallas_backend.py, compiled   (sparsify backend="pallas")  75 s
#   4_kernel_tests    tests/test_kernels.py -k "not Interpret" (the compiled twins of the
#                                                               interpret-mode kernel tests) 110 s
#   5_bench           python -m benchmarks.cusparselt          (bench/gemm.*, layer.*,
#                                                               train_step.*)              105 s
#   6_torch           python -m benchmarks.cusparselt_torch    (torch._cslt_sparse_mm, own
#                                                               process; bench/torch.*)     30 s
#   7_checkerboard    python -m benchmarks.checkerboard        (the compact checkerboard
#                     --dtype bfloat16 --runs 20                grad-weight's forms: two quarter
#                                                               GEMMs vs one batched GEMM)  45 s
# Test stages log a line per test as it ends, so a stage cut off by its timeout still shows what
# ran; the benchmark writes each section as it finishes.
#
# --smoke: CPU smoke mode for CI: the build, then the benchmark and the torch peer with tiny
# shapes (off a GPU the cuSPARSELt calls run their jnp emulation; the timings mean nothing); the
# GPU test stages are recorded as skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
OUT=""
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) OUT="$2"; shift ;;
    --only) ONLY=" $2 "; shift ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-gpu_check_out/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
PY=${PYTHON:-python}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # leave room for the torch process and the tests
export PYTHONUNBUFFERED=1
if [ "$SMOKE" = 1 ]; then export JAX_PLATFORMS=cpu; else export JAX_PLATFORMS=cuda,cpu; fi

{
  echo "# gpu_check $(date -u +%FT%TZ)"
  echo
  echo "host $(hostname), smoke=$SMOKE, $($PY --version 2>&1), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1 || echo 'no nvidia-smi')"
  echo "$($PY -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__)' 2>&1 | tail -n 1)"
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 1 || echo none)"
  echo
  echo "| stage | status | seconds | summary |"
  echo "|---|---|---|---|"
} > "$OUT/summary.md"

FAILED=0
# stage NAME CAP_SECONDS KIND CMD...   (KIND: pytest | cmd)
stage() {
  local name=$1 cap=$2 kind=$3; shift 3
  if [ -n "$ONLY" ] && [[ "$ONLY" != *" $name "* ]]; then return; fi
  local log="$OUT/$name.log" t0 t1 rc status summary
  echo "== $name (timeout ${cap}s): $*"
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$cap" "$@" > "$log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  local secs
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="timeout"
  elif [ $rc -eq 0 ]; then status="ok"
  elif [ $rc -eq 2 ] && [ "$kind" = cmd ]; then status="unavailable"  # no GPU / no torch: exit 2
  else status="failed (rc $rc)"; fi
  if [ "$kind" = pytest ]; then
    summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)|no tests ran' "$log" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')
    [ -z "$summary" ] && summary="$(grep -c -E ' PASSED| FAILED' "$log") results before the cut-off"
  else
    summary=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-200)
  fi
  case "$status" in ok|unavailable) ;; *) FAILED=1 ;; esac
  echo "   $status in ${secs}s: $summary"
  echo "| $name | $status | $secs | ${summary//|//} |" >> "$OUT/summary.md"
  "$PY" - "$OUT" "$name" "$rc" "$status" "$secs" "$summary" "$kind" <<'EOF'
import json, re, sys
from pathlib import Path
out, name, rc, status, secs, summary, kind = sys.argv[1:]
log = (Path(out) / f"{name}.log").read_text(errors="replace")
res = {"stage": name, "rc": int(rc), "status": status, "seconds": float(secs), "summary": summary}
md = [f"## {name}: {status} ({secs} s)", "", summary, ""]
if kind == "pytest":
    res["failed"] = re.findall(r"^FAILED (\S+)", log, re.M)
    res["errors"] = re.findall(r"^ERROR (\S+)", log, re.M)
    res["skipped"] = re.findall(r"^SKIPPED \[\d+\] (.*)$", log, re.M)[:20]
    md += [f"* FAILED {t}" for t in res["failed"]] + [f"* ERROR {t}" for t in res["errors"]]
    if res["skipped"]:
        md += ["", "skipped (first 20):"] + [f"* {s}" for s in res["skipped"]]
else:
    res["tail"] = log.splitlines()[-40:]
    md += ["```", *res["tail"], "```"]
(Path(out) / f"{name}.json").write_text(json.dumps(res, indent=1))
(Path(out) / f"{name}.md").write_text("\n".join(md) + "\n")
EOF
}

skipped() {
  local name=$1 why=$2
  echo "== $name: skipped ($why)"
  echo "| $name | skipped | 0 | $why |" >> "$OUT/summary.md"
  printf '{"stage": "%s", "status": "skipped", "reason": "%s"}\n' "$name" "$why" > "$OUT/$name.json"
  printf '## %s: skipped\n\n%s\n' "$name" "$why" > "$OUT/$name.md"
}

PYTEST=("$PY" -m pytest -v -rA -p no:cacheprovider -o addopts="")  # -v: a line per test as it ends
"$PY" -c "import xdist" 2>/dev/null && PYTEST+=(-n 0)  # one process (pytest-xdist installed)

stage 1_build 40 cmd "$PY" -m fst_jax.cusparselt build --verbose
if [ "$SMOKE" = 1 ]; then
  for s in 2_cslt_tests 3_pallas_backend 4_kernel_tests; do skipped $s "smoke mode (no GPU stages)"; done
  stage 5_bench 120 cmd "$PY" -m benchmarks.cusparselt --smoke --out "$OUT/bench"
  stage 6_torch 60 cmd "$PY" -m benchmarks.cusparselt_torch --smoke --out "$OUT/bench"
  stage 7_checkerboard 60 cmd "$PY" -m benchmarks.checkerboard --shape 256 64 64 --runs 2
else
  stage 2_cslt_tests 60 pytest "${PYTEST[@]}" tests/test_cusparselt_gpu.py
  stage 3_pallas_backend 75 pytest "${PYTEST[@]}" tests/test_pallas_backend.py
  stage 4_kernel_tests 110 pytest "${PYTEST[@]}" tests/test_kernels.py -k "not Interpret"
  stage 5_bench 105 cmd "$PY" -m benchmarks.cusparselt --out "$OUT/bench"
  stage 6_torch 30 cmd "$PY" -m benchmarks.cusparselt_torch --out "$OUT/bench"
  stage 7_checkerboard 45 cmd "$PY" -m benchmarks.checkerboard --dtype bfloat16 --runs 20
fi
for f in "$OUT"/bench/*.md; do [ -e "$f" ] && { echo; cat "$f"; } >> "$OUT/summary.md"; done
echo
cat "$OUT/summary.md"
echo
echo "results in $OUT"
exit $FAILED
