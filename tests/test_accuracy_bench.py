"""Smoke test of the accuracy study: ``benchmarks.accuracy --quick`` runs and writes its report.

Nothing here asserts on accuracy: only the structure of ``accuracy.json`` and that the parity
verdict follows the rule from the numbers it reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import accuracy


def _check_stats(st: dict, n: int) -> None:
    assert len(st["values"]) == n
    assert all(isinstance(v, float) for v in st["values"])
    assert isinstance(st["mean"], float)
    if n == 1:
        assert st["std"] is None and st["stderr"] is None


def test_quick_run_writes_report(tmp_path: Path) -> None:
    results_md = accuracy.RESULTS_MD.read_text() if accuracy.RESULTS_MD.exists() else None
    assert accuracy.main(["--quick", "--suite", "all", "--no-append", "--out", str(tmp_path)]) == 0
    # --quick never appends to RESULTS.md
    assert (accuracy.RESULTS_MD.read_text() if accuracy.RESULTS_MD.exists() else None) == results_md

    report = json.loads((tmp_path / "accuracy.json").read_text())
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert {"meta", "parity_rule", "main", "ablation"} <= set(report)
    assert report["meta"]["command"].startswith("python -m benchmarks.accuracy")
    assert len(report["main"]) == 2
    assert len(report["ablation"]) == 2
    for row in report["main"] + report["ablation"]:
        for key in ("dataset", "model", "width", "config", "optimizer", "seeds", "steps",
                    "dense", "fst", "paired_difference", "threshold_pt", "parity"):
            assert key in row, key
        assert row["steps"] == accuracy.QUICK_STEPS
        assert row["seeds"] == [0]
        for variant in ("dense", "fst"):  # one curve per seed, ending at the final accuracy
            [(steps, acc)] = row["curves"][variant]
            assert steps[-1] == accuracy.QUICK_STEPS and acc[-1] == row[variant]["values"][0]
        for name in ("dense", "fst", "paired_difference"):
            _check_stats(row[name], 1)
        assert all(0.0 <= v <= 1.0 for v in row["dense"]["values"] + row["fst"]["values"])
        diff = row["fst"]["values"][0] - row["dense"]["values"][0]
        assert abs(row["paired_difference"]["mean"] - diff) < 1e-12
        assert row["threshold_pt"] == accuracy.PARITY_PT  # one seed: no standard error
        assert row["parity"] == (abs(100 * diff) <= accuracy.PARITY_PT)
    assert [r["name"] for r in report["ablation"]] == ["forward_only", "default"]
    assert report["ablation"][0]["config"] == ["grad_input=dense", "grad_weight=dense"]
    # One file per distinct run: the ablation's dense run and its default-config FST run are the
    # main digits setting's runs (same key), so 4 main runs + 1 forward-only run.
    assert len(list((tmp_path / "runs").glob("*.json"))) == 5
    assert report["meta"]["runs_trained"] == 5 and report["meta"]["runs_read_back"] == 3

    # A second invocation reads every run back instead of retraining, with the same numbers.
    assert accuracy.main(["--quick", "--suite", "all", "--no-append", "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "accuracy.json").read_text())
    assert again["meta"]["runs_trained"] == 0 and again["meta"]["runs_read_back"] == 8
    assert [r["paired_difference"] for r in again["main"] + again["ablation"]] == [
        r["paired_difference"] for r in report["main"] + report["ablation"]]
    assert all(r["reused"] for r in again["main"] + again["ablation"])


def test_summarize_parity_rule() -> None:
    """The verdict uses max(0.5 pt, 2 SE) of the paired difference."""
    def results(dense: list[float], fst: list[float]) -> dict:
        return {
            "per_seed": [{"runs": {"dense": {"final": {"test_accuracy": d}},
                                   "fst": {"final": {"test_accuracy": f}}}}
                         for d, f in zip(dense, fst, strict=True)],
            "model": {"depth": 1, "num_params": 1}, "args": {"steps": 1, "batch_size": 1},
            "optimizer": {"lr": 1.0}, "seeds": list(range(len(dense))), "config": {},
            "flops_per_step": {},
        }

    s = accuracy._setting("main", "x", "digits", "mlp", 8)
    # constant difference of -1 pt: SE 0, bound 0.5 pt -> no parity
    row = accuracy.summarize(s, results([0.9, 0.8, 0.7], [0.89, 0.79, 0.69]))
    assert not row["parity"] and row["threshold_pt"] == accuracy.PARITY_PT
    # differences -3, +1, -1 pt: mean -1 pt, SE ~1.15 pt, bound ~2.3 pt -> parity
    row = accuracy.summarize(s, results([0.9, 0.8, 0.7], [0.87, 0.81, 0.69]))
    assert row["parity"] and row["threshold_pt"] > 2.0


def test_read_only_pairs_found_runs_and_trains_none(tmp_path: Path) -> None:
    """``--read-only`` trains nothing: a setting with no run found gives no row, one with seed 0's
    pair found gives a row over seed 0 only."""
    s = accuracy._setting("ablation", "default", "digits", "mlp", 16)
    assert accuracy.Runner(tmp_path, read_only=True).setting(s, 2, 6) == (None, False)
    assert not list((tmp_path / "runs").glob("*.json"))
    trained, _ = accuracy.Runner(tmp_path).setting(s, 1, 6)
    accuracy.Runner(tmp_path).run(s, 1, "dense", 6)  # seed 1's dense run, without its FST pair
    reader = accuracy.Runner(tmp_path, read_only=True)
    results, read_back = reader.setting(s, 2, 6)
    assert read_back and results["seeds"] == [0] and len(list((tmp_path / "runs").glob("*.json"))) == 3
    assert reader.read_back == 2 and reader.trained == 0  # the unpaired dense run is not counted
    assert accuracy.summarize(s, results)["paired_difference"] == accuracy.summarize(s, trained)["paired_difference"]


def test_fresh_and_read_only_are_exclusive() -> None:
    """``--fresh`` (retrain all) and ``--read-only`` (train none) are refused together, by the CLI
    and by :class:`Runner`."""
    with pytest.raises(SystemExit):
        accuracy.build_parser().parse_args(["--fresh", "--read-only"])
    with pytest.raises(ValueError, match="read_only"):
        accuracy.Runner(Path("unused"), fresh=True, read_only=True)


def test_grid_table_marks_misses_and_counts() -> None:
    """The settings × variants table: one cell per (setting, variant) row, **miss** / ↑ from the
    parity verdict, the seed count where it differs, and the count of cells at parity or ahead."""
    def row(width: int, name: str, dense: list[float], fst: list[float]) -> dict:
        results = {"per_seed": [{"runs": {"dense": {"final": {"test_accuracy": d}},
                                          "fst": {"final": {"test_accuracy": f}}}}
                                for d, f in zip(dense, fst, strict=True)],
                   "model": {"depth": 1}, "args": {"steps": 1, "batch_size": 1}, "optimizer": {"lr": 1.0},
                   "seeds": list(range(len(dense))), "config": ""}
        return accuracy.summarize(accuracy._setting("ablation", name, "digits", "mlp", width), results)

    rows = [row(8, "a", [0.9, 0.8], [0.88, 0.78]),    # -2 pt, SE 0: miss
            row(8, "b", [0.9, 0.8], [0.92, 0.82]),    # +2 pt, SE 0: ahead
            row(16, "a", [0.9, 0.8], [0.9, 0.801]),   # +0.05 pt: parity
            row(16, "b", [0.9], [0.9])]               # one seed
    table = accuracy.grid_table(rows, seeds=2).splitlines()
    assert table[0] == "| setting | a | b |"
    assert table[2] == "| digits / mlp / 8 | -2.00 ± 0.00 **miss** | +2.00 ± 0.00 ↑ |"
    assert table[3] == "| digits / mlp / 16 | +0.05 ± 0.05 | +0.00 (1 seed) |"
    assert table[4] == "| at parity or ahead | 1 of 2 | 2 of 2 |"


def test_rotating_variants_run_with_the_step_as_key(tmp_path: Path) -> None:
    """The study's rotating variants train (the step number is the fst_key), differ from the fixed
    pattern, and are deterministic."""
    assert accuracy.ABLATION_VARIANTS["rotating"][1] == ["pattern=rotating"]

    def final(config: list[str], out: Path) -> dict:
        s = accuracy._setting("ablation", "x", "digits", "mlp", 16, config=config)
        metrics, read_back, _ = accuracy.Runner(out).run(s, 0, "fst", 6)
        assert not read_back
        return {k: metrics[k] for k in ("train_loss", "test_loss", "test_accuracy")}

    rotating = final(["pattern=rotating"], tmp_path / "a")
    assert rotating == final(["pattern=rotating"], tmp_path / "b")
    assert rotating["train_loss"] != final([], tmp_path / "c")["train_loss"]
    assert 0 <= rotating["test_accuracy"] <= 1
