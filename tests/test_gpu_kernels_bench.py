"""Smoke test of the GPU kernel benchmark: ``benchmarks.gpu_kernels --quick --interpret`` on CPU.

Nothing here asserts on speed (interpret-mode timings mean nothing): only that every section is
written with finite numbers, that the kernels' outputs pass the benchmark's own checks, and that
without a GPU the script refuses to run (exit status 2) unless ``--interpret`` is given.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import pytest

from benchmarks import gpu_kernels

SECTIONS = ("meta", "ceilings", "prune_compress", "sparse_matmul", "grad_weight_shift", "train_step", "targets")


def _numbers(x: object) -> list[float]:
    """Every int/float (not bool) in a JSON value."""
    if isinstance(x, dict):
        return [n for v in x.values() for n in _numbers(v)]
    if isinstance(x, list):
        return [n for v in x for n in _numbers(v)]
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return [float(x)]
    return []


def _positive_time(entry: dict) -> bool:
    return math.isfinite(entry["median_s"]) and entry["median_s"] > 0 and len(entry["times_s"]) == 2


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the no-GPU path needs a machine without a GPU")
def test_no_gpu_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_kernels.main([]) == 2
    assert "no GPU: run on a GPU machine, or use --quick --interpret" in capsys.readouterr().err


def test_quick_interpret_run_writes_every_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = gpu_kernels.cpu_suite.RESULTS_MD.read_text() if gpu_kernels.cpu_suite.RESULTS_MD.exists() else None
    status = gpu_kernels.main(["--quick", "--interpret", "--out", str(tmp_path), "--no-append"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert status == 0, results  # 1 would mean a kernel failed or disagreed with its reference
    after = gpu_kernels.cpu_suite.RESULTS_MD.read_text() if gpu_kernels.cpu_suite.RESULTS_MD.exists() else None
    assert after == before  # --no-append (and --interpret) leave RESULTS.md alone

    for section in SECTIONS:
        assert results[section], section
        numbers = _numbers(results[section])
        assert numbers, section
        assert all(math.isfinite(n) for n in numbers), section
    assert results["meta"]["interpret"] is True and "means nothing" in results["meta"]["note"]

    ce = results["ceilings"]
    for name in ("copy", "elementwise", "matmul"):
        assert _positive_time(ce[name])
    assert ce["copy"]["gb_s"] > 0 and ce["matmul"]["tflop_s"] > 0

    pc = results["prune_compress"]
    for name in ("pallas", "xla_mask_where", "xla_reference", "pallas_decompress", "xla_decompress_reference"):
        assert _positive_time(pc[name]), name
        assert pc[name]["gb_s"] > 0
    assert pc["check"] == {"values_exact": True, "metadata_exact": True, "decompress_exact": True, "ok": True}
    assert len(pc["sweep"]) == 2 and all("median_s" in r for r in pc["sweep"])

    sp = results["sparse_matmul"]
    for name in ("xla_dense", "pallas", "pallas_decompress_xla_dot"):
        assert _positive_time(sp[name]), name
    assert sp["lhs_bytes"]["fewer"] == pytest.approx(1 - (1 / 2 + 1 / 16))  # bf16: values + 1 byte per 8
    assert sp["check"]["ok"]

    assert [c["pattern"] for c in results["grad_weight_shift"]] == ["checkerboard", "even"]
    for case in results["grad_weight_shift"]:
        for name in ("xla_dense", "xla_masked", "xla_compact", "xla_compact_gather", "pallas"):
            assert _positive_time(case[name]), (case["pattern"], name)
        assert case["check"]["ok"], case["check"]

    tr = results["train_step"]
    for name in ("dense", "fst_xla"):
        assert _positive_time(tr[name]) and tr[name]["status"] == "ok"
    assert tr["flops"]["fst"] < tr["flops"]["dense"]
    assert tr["fst_pallas"]["status"] == "ok" or tr["fst_pallas"]["status"].startswith(("not available", "failed"))

    keys = [t["key"] for t in results["targets"]]
    assert keys == list(gpu_kernels.TARGETS)
    for t in results["targets"]:  # interpret mode never claims a target
        assert t["met"] in ("n/a (interpret)", "n/a") or t["key"] == "train_pallas"

    # The GPU-only path: the tables with met/MISSED, appended as a dated section (to a copy).
    results_md = tmp_path / "RESULTS.md"
    monkeypatch.setattr(gpu_kernels.cpu_suite, "RESULTS_MD", results_md)
    text = gpu_kernels.tables(results, interpret=False)
    assert "MISSED" in text or "met" in text
    gpu_kernels.append_results(results["meta"], text)
    appended = results_md.read_text()
    assert appended.startswith(gpu_kernels.cpu_suite.RESULTS_HEADER)
    assert "GPU kernels" in appended and results["meta"]["device_kind"] in appended
    assert "#### Targets" in appended
