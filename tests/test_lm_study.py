"""Smoke test of the language-model study: ``benchmarks.lm_study --quick`` runs, reads finished
runs back, and its table's gap column follows from the per-seed numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import lm_study


def test_quick_study_runs_and_reads_back(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    results_md = lm_study.append_section.__globals__["RESULTS_MD"].read_text()
    argv = ["--quick", "--no-append", "--variants", "dense", "rotating", "--out", str(tmp_path)]
    assert lm_study.main(argv) == 0
    table = capsys.readouterr().out
    runs = sorted((tmp_path / "runs").glob("*.json"))
    assert [p.name.split("_s")[0] for p in runs] == ["dense", "rotating"]
    dense, rot = (json.loads(p.read_text()) for p in runs)
    assert rot["pruned"]["not_exportable"] == {} and "pruned 2:4" in rot["pruned"]["summary"]
    assert rot["val_loss"] == pytest.approx(rot["pruned"]["sparsified_val_loss"], rel=1e-5)
    gap = 100 * (rot["val_loss"] / dense["val_loss"] - 1)
    assert f"| {gap:+.2f} |" in table and "| 1 |" in table
    # A second invocation reads the finished runs back instead of retraining.
    monkeypatch.setattr(lm_study, "run_one", lambda *a, **k: pytest.fail("retrained"))
    assert lm_study.main(argv) == 0
    assert capsys.readouterr().out == table
    assert lm_study.append_section.__globals__["RESULTS_MD"].read_text() == results_md


def test_table_mean_se_and_gap() -> None:
    rs = [{"variant": v, "seed": s, "val_loss": x, "val_bpc": x}
          for v, s, x in [("dense", 0, 2.0), ("dense", 1, 2.0), ("fixed", 0, 2.02), ("fixed", 1, 1.98),
                          ("rotating", 0, 2.1)]]
    rows = {r.split(" | ")[0].lstrip("| "): r for r in lm_study.study_table(rs).splitlines()[2:]}
    assert rows["dense"].endswith("| — | — |")
    assert "| 2.0000 ± 0.0200 |" in rows["FST, fixed checkerboard (`FSTConfig()`)"]
    assert "| +0.00 ± 1.00 | 1/2 |" in rows["FST, fixed checkerboard (`FSTConfig()`)"]
    rot = [r for k, r in rows.items() if "authors" in k][0]
    assert "| +5.00 | 0/1 |" in rot  # one seed: no standard error
