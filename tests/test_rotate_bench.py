"""Smoke test of benchmarks/rotate.py: it runs on tiny shapes and reports every variant."""

import json

from benchmarks import rotate


def test_rotate_benchmark_smoke(tmp_path, capsys):
    out = tmp_path / "rotate.json"
    assert rotate.main(["--t", "64", "--k", "16", "--o", "16", "--warmup", "0", "--runs", "1",
                        "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["median_s"]) == {"dense", "fixed_checkerboard", "rotating", "rotating_two_gemms", "mvue",
                                    "fixed_parts", "rotating_parts", "mvue_sample"}
    assert all(v > 0 for v in res["median_s"].values())
    assert res["compiled_versions"] == {"rotating": 1, "rotating_parts": 1, "mvue": 1}
    assert "| rotating |" in capsys.readouterr().out
