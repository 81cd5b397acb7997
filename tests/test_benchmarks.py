"""Smoke test of the benchmark suite: ``benchmarks.run --quick`` runs and writes every section.

Nothing here asserts on speed: only that each section is present and its numbers are positive.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import run


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


def test_quick_run_writes_all_sections(tmp_path: Path) -> None:
    # the transformer block is left out: the tiny GPT has its attention and 3-D activations, and the
    # block's compiles would add a third to this smoke run's time (it is the longest test)
    assert run.main(["--quick", "--models", "mlp", "gpt", "--out", str(tmp_path), "--no-append"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "benchmarks.png").stat().st_size > 0
    for section in ("gemm", "train_step", "memory", "compile", "flops"):
        assert results[section], section

    assert len(results["gemm"]) == 4  # one shape x (f32, bf16) x (checkerboard, even)
    for case in results["gemm"]:
        for name in ("dense", "masked", "compact", "compact_gather"):
            assert _positive(case[name]["median_s"]), (case, name)
        for name in ("masked", "compact", "compact_gather"):
            assert _positive(case[f"speedup_{name}"])

    models = ("mlp", "gpt")  # the smoke run's GPT is tiny, f32 only
    assert set(results["train_step"]) == set(models)
    for model in models:
        step = results["train_step"][model]
        for mode in ("dense", "masked", "compact"):
            assert len(step[mode]["times_s"]) == 3
            assert all(_positive(t) for t in step[mode]["times_s"])
            mem = results["memory"][model][mode]
            assert _positive(mem["residual_bytes"])
            assert mem["temp_size_in_bytes"] is None or mem["temp_size_in_bytes"] >= 0
            comp = results["compile"][model][mode]
            assert _positive(comp["lower_s"]) and _positive(comp["compile_s"])
        for name in ("masked", "compact", "compact_even", "default", "compact_rotating", "mvue"):
            assert _positive(step[f"speedup_{name}"])
        assert _positive(step["rotating_vs_fixed"])
        # the memory floor: compact keeps at least the floor; the floor keeps less than dense
        mem = results["memory"][model]
        assert mem["floor"]["residual_bytes"] < mem["dense"]["residual_bytes"]
        assert mem["compact"]["residual_vs_floor"] >= 0.99
        # the GPU proxy: both derivations, both bounds, for the benchmark and the default config
        for config in ("compact", "default"):
            for bound in ("fused", "unfused"):
                proxy = results["proxy"][model][config][bound]
                assert proxy["extra_bytes_analytic"] > 0 and proxy["dense_other_bytes"] > 0
                assert proxy["fraction_analytic"] > 0
        assert results["proxy"][model]["gemm_flops_dense_hlo"] > 0
        flops = results["flops"][model]
        assert _positive(flops["dense"]) and _positive(flops["fst"])
        assert flops["fst"] < flops["dense"]  # every weight matmul is sparse in the benchmark config
        # the compact mode keeps half of each sparse matmul's activation (both FST modes also keep
        # two bool masks per sparse weight, which at these tiny shapes outweigh that half)
        assert mem["compact"]["residual_bytes"] < mem["masked"]["residual_bytes"]

    assert results["targets"] and all(t["met"] in ("met", "MISSED") for t in results["targets"])


def test_hlo_proxy_counts_fst_extra_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    """The compile-only proxy count: FST's compact step moves more non-GEMM bytes than dense, and
    the default config (first and last matmul dense) fewer than compact."""
    from benchmarks import hlo_proxy

    assert hlo_proxy.main(["--quick", "--models", "mlp", "--modes", "compact", "default"]) == 0
    rows = {line.split("|")[2].strip(): float(line.split("|")[5]) for line in capsys.readouterr().out.splitlines()
            if line.startswith("| mlp |")}
    assert set(rows) == {"compact", "default"}
    assert rows["compact"] > rows["default"] > 0


def test_step_ratio_times_every_variant(capsys: pytest.CaptureFixture[str]) -> None:
    """The focused step benchmark: one row per variant with a positive paired ratio (no speed
    assertion: the smoke sizes time nothing meaningful)."""
    from benchmarks import step_ratio

    assert step_ratio.main(["--quick", "--models", "mlp", "--runs", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| mlp |")]
    assert [r[2].strip() for r in rows] == ["dense", "grad-weight GEMMs", "checkerboard", "even",
                                            "rotating(checkerboard)"]
    assert rows[1][4].strip() == "—"  # the GEMMs are part of a step: their time, no ratio
    assert all(float(r[4]) > 0 for r in rows if r is not rows[1])
    ceiling = next(line for line in out.splitlines() if line.startswith("mlp: grad-weight GEMMs"))
    assert 1.0 < float(ceiling.rsplit(" ", 1)[1]) <= 2.0


def test_grad_weight_gemms_are_the_weight_gradients() -> None:
    """The ceiling's GEMMs compute dW = Aᵀ·dY of each recorded matmul."""
    from benchmarks import overhead, step_ratio

    calls = [overhead.MatmulShape((6, 4), (4, 3), "float32", "float32", "float32", (1,), (0,)),
             overhead.MatmulShape((2, 5, 8), (8, 4), "float32", "float32", "float32", (2,), (0,))]
    fn, args = step_ratio.grad_weight_gemms(calls)
    for j, dw in enumerate(fn(*args)):
        a, _, dy = args[3 * j: 3 * j + 3]
        want = a.reshape(-1, a.shape[-1]).T @ dy.reshape(-1, dy.shape[-1])
        np.testing.assert_allclose(dw, want, rtol=1e-5, atol=1e-5)
