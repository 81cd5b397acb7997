"""``scripts/gpu_check.sh --smoke``: the GPU check's CPU smoke mode runs and writes every stage."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("1_build", "2_cslt_tests", "3_pallas_backend", "4_kernel_tests", "5_bench", "6_torch", "7_checkerboard")


def test_gpu_check_smoke_writes_every_stage(tmp_path):
    from fst_jax.cusparselt import _build

    try:
        _build.find_toolchain()
    except _build.BuildError as e:
        if not os.environ.get("CI"):
            pytest.skip(f"cannot build the cuSPARSELt extension here: {e}")
    out = tmp_path / "gpu_check"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--smoke", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in STAGES:
        res = json.loads((out / f"{stage}.json").read_text())
        assert res["status"] in ("ok", "skipped", "unavailable"), res
        assert (out / f"{stage}.md").exists()
    for section in ("gemm", "layer", "train_step"):
        data = json.loads((out / "bench" / f"{section}.json").read_text())
        assert data["rows"] and not data["error"], data
    gemm = json.loads((out / "bench" / "gemm.json").read_text())["rows"][0]
    assert gemm["max_abs_err"]["cslt"] == 0.0  # the emulated custom calls, exact in smoke mode
    assert (out / "bench" / "torch.json").exists()
    summary = (out / "summary.md").read_text()
    assert all(stage in summary for stage in STAGES)
