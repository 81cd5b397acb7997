#!/usr/bin/env bash
# Sets up and runs the whole test suite, from a fresh clone, with only Python 3.11+ and pip.
#
# 1. Python 3.11+ (`python3`, or $PYTHON): a virtual environment .venv with the package and its
#    test and docs extras; the newest jax pip serves there (0.10.2 on Python 3.11). Runs every test
#    and every docstring example, then builds the docs with warnings as errors, which executes the
#    notebooks (docs/_build/html).
# 2. Python 3.12 with jax 0.11.2, the GPU machine's version, when a Python 3.12 is installed
#    (pyenv's 3.12.x or python3.12 on PATH): .venv312, then the tests of the code that depends on
#    the jax version (the transform and its caches, export, the compact path, the Pallas kernels and
#    their CUDA lowering, cuSPARSELt, rotating patterns in sub-jaxprs) and the library's docstring
#    examples; the main job's and the benchmarks' smoke tests run on 3.11 only, to keep CI short.
#    Skipped with a notice when there is no Python 3.12.
# 3. The lean install: .venv-lean with `pip install -e .` alone (no extras) gets none of flax,
#    optax, scikit-learn, tqdm, matplotlib, mnist1d, and sparsifies a loss there.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

# The jax-version-dependent tests that the Python 3.12 / jax 0.11.2 run repeats.
VERSION_TESTS=(tests/test_core_v2.py tests/test_model_patterns.py tests/test_transform.py tests/test_export.py
               tests/test_compact.py tests/test_kernels.py tests/test_pallas_backend.py tests/test_cusparselt.py
               tests/test_cusparselt_backend.py tests/test_rotating_sparsify.py tests/test_prepared.py tests/test_mvue.py
               fst_jax/_config.py fst_jax/_masks.py fst_jax/_transform.py fst_jax/_export.py fst_jax/_report.py
               fst_jax/_rotate.py fst_jax/kernels fst_jax/cusparselt)

# The main job's training runs inside those files: 3.11 only, like the rest of the main job's tests.
MAIN_JOB_TESTS=(tests/test_rotating_sparsify.py::test_main_job_trains_with_a_rotating_pattern
                tests/test_mvue.py::test_main_job_trains_with_mvue)

run_suite() {  # $1: venv dir, $2: python, $3: the package's extras, $4: what to test, $5...: extra pip requirements
  local venv=$1 py=$2 extras=$3 what=$4; shift 4
  echo "== $venv: $("$py" --version)"
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  "$venv/bin/pip" install -q -e ".[$extras]" "$@"
  "$venv/bin/python" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__)'
  if [ "$what" = all ]; then
    "$venv/bin/python" -m pytest -q -n 2 --durations=15 tests fst_jax --doctest-modules
  else
    "$venv/bin/python" -m pytest -q -n 2 --durations=15 --doctest-modules "${VERSION_TESTS[@]}" "${MAIN_JOB_TESTS[@]/#/--deselect=}"
  fi
}

run_suite .venv "${PYTHON:-python3}" test,docs all
echo "== docs: sphinx -W (executes the pages and notebooks/)"
.venv/bin/python -m sphinx -W --keep-going -q -b html docs docs/_build/html

py312=""
if command -v pyenv >/dev/null 2>&1; then
  v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12(\.|$)' | tail -n 1 || true)
  [ -n "$v" ] && py312="$(pyenv root)/versions/$v/bin/python"
fi
[ -z "$py312" ] && command -v python3.12 >/dev/null 2>&1 && py312=$(command -v python3.12)
if [ -n "$py312" ]; then
  run_suite .venv312 "$py312" test version 'jax==0.11.2' 'jaxlib==0.11.2'
else
  echo "== no Python 3.12 found: the jax 0.11.2 run was NOT done (install Python 3.12 to run it)"
fi

echo "== lean install: pip install -e . (no extras) in .venv-lean"
[ -x .venv-lean/bin/python ] || "${PYTHON:-python3}" -m venv .venv-lean
.venv-lean/bin/pip install -q -e .
.venv-lean/bin/python - <<'EOF'
import importlib.util, sys
import jax, jax.numpy as jnp, fst_jax
extras = ("flax", "optax", "sklearn", "tqdm", "matplotlib", "mnist1d")
installed = [m for m in extras if importlib.util.find_spec(m) is not None]
assert not installed, f"pip install fst-jax pulled in {installed}"
loss = fst_jax.sparsify(lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2),
                        fst_jax.FSTConfig(skip_first=False, skip_last=False))
assert jax.grad(loss)(jnp.ones((8, 8)), jnp.ones((2, 4, 8))).shape == (8, 8)
assert not {"flax", "optax"} & set(sys.modules)
print("lean install: jax", jax.__version__, "and numpy only; fst_jax works")
EOF
