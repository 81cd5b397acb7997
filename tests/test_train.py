"""Tests of the ``fst-jax train`` command (:mod:`fst_jax.train`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fst_jax.train import config_from_overrides, main


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _assert_both_learn(results: dict) -> None:
    for variant in ("dense", "fst"):
        curves = results["runs"][variant]["curves"]
        assert curves["eval_step"][0] == 0
        assert curves["train_loss"][-1] < curves["train_loss"][0], variant
        assert results["runs"][variant]["final"]["train_loss"] == curves["train_loss"][-1]


MLP_ARGV = "--steps 30 --model mlp --width 64 --lr 3e-3 --seed 3 --quiet".split()


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MLP run through the ``fst-jax train`` form; its output directory."""
    out = tmp_path_factory.mktemp("mlp")
    assert main(["train", *MLP_ARGV, "--out", str(out)]) == 0
    return out


def test_mlp_dense_and_fst_learn(mlp_run: Path) -> None:
    """Both runs lower the whole-train-set loss; results.json records args and curves."""
    results = _results(mlp_run)
    _assert_both_learn(results)
    assert results["args"]["steps"] == 30
    assert len(results["runs"]["fst"]["curves"]["loss"]) == 30


def test_same_seed_same_results(mlp_run: Path, tmp_path: Path) -> None:
    """A second run with the same seed agrees bitwise (no "train": the ``python -m`` form)."""
    assert main([*MLP_ARGV, "--out", str(tmp_path)]) == 0
    a, b = _results(mlp_run), _results(tmp_path)
    for variant in ("dense", "fst"):
        ra, rb = a["runs"][variant], b["runs"][variant]
        assert ra["final"]["train_loss"] == rb["final"]["train_loss"]
        assert ra["curves"]["loss"] == rb["curves"]["loss"]
        assert ra["curves"]["test_accuracy"] == rb["curves"]["test_accuracy"]


def test_transformer_dense_and_fst_learn(tmp_path: Path) -> None:
    """The transformer (8 row tokens of 8 pixels) trains too, dense and FST."""
    argv = "train --steps 20 --model transformer --width 16 --depth 1 --batch-size 64 --lr 3e-3"
    assert main([*argv.split(), "--quiet", "--out", str(tmp_path)]) == 0
    _assert_both_learn(_results(tmp_path))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ("--config nonsense=1", ["--config", "nonsense", "pattern", "restore_scale"]),
        ("--config pattern=diagonal", ["--config", "pattern", "diagonal", "checkerboard"]),
        ("--config skip_first=maybe", ["skip_first", "maybe"]),
        ("--config rules=x", ["rules"]),
        ("--config pattern", ["KEY=VALUE"]),
        ("--model resnet", ["--model", "resnet", "mlp", "transformer"]),
        ("--steps 0", ["--steps"]),
    ],
)
def test_bad_arguments_exit_2(
    argv: str, expected: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad flags and config values exit with status 2, naming the bad name/value."""
    with pytest.raises(SystemExit) as exc:
        main(["train", *argv.split(), "--out", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for word in expected:
        assert word in err
    assert not (tmp_path / "results.json").exists()


def test_config_overrides_are_typed() -> None:
    """``--config`` values are parsed by the type of the field's default."""
    cfg = config_from_overrides(["skip_last=no", "min_features=8", "sr_ste=0", "grad_weight=dense"])
    assert cfg.skip_last is False
    assert cfg.min_features == 8
    assert cfg.sr_ste == 0.0
    assert cfg.grad_weight == "dense"
    assert config_from_overrides(["pattern=even", "restore_scale=0.1"]).restore_scale == 0.1
    with pytest.raises(ValueError, match="min_features"):
        config_from_overrides(["min_features=1.5"])
