"""Tests of the ``fst-jax train`` command (:mod:`fst_jax.train`)."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import os
import random
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fst_jax
import fst_jax.train.cli
from fst_jax.models import ResNet
from fst_jax.train import (
    PrunedModel,
    batch_indices,
    config_from_overrides,
    evaluate_pruned,
    init_model,
    load_digits_dataset,
    load_mnist1d_dataset,
    main,
    make_optimizer,
    train_run,
)
from fst_jax.train.data import _mnist1d_arrays


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _assert_both_learn(results: dict) -> None:
    for variant in ("dense", "fst"):
        curves = results["runs"][variant]["curves"]
        assert curves["eval_step"][0] == 0
        assert curves["train_loss"][-1] < curves["train_loss"][0], variant
        assert results["runs"][variant]["final"]["train_loss"] == curves["train_loss"][-1]
    _assert_pruned_is_the_fst_model(results)


def _assert_pruned_is_the_fst_model(results: dict) -> None:
    """Each FST run's exported 2:4 model (forward_masks + prune_params, dense predict) scores the
    test accuracy the sparsified predict measured; every weight a sparse forward product prunes
    was exported, half of its entries kept."""
    for seed in results["per_seed"]:
        fst = seed["runs"]["fst"]
        pruned = fst["pruned"]
        assert pruned["test_accuracy"] == fst["final"]["test_accuracy"]
        assert fst["final"]["pruned_test_accuracy"] == pruned["test_accuracy"]
        assert pruned["equals_sparsified_predict"] is True
        assert pruned["pruned"] and 2 * pruned["kept"] == pruned["total"]
        assert pruned["not_exportable"] == {}
        assert pruned["dense_weights"]  # the first and last layer, by default
        assert "pruned" not in seed["runs"]["dense"]
        assert "pruned_test_accuracy" not in seed["runs"]["dense"]["final"]
    accs = [s["runs"]["fst"]["pruned"]["test_accuracy"] for s in results["per_seed"]]
    assert results["pruned_test_accuracy"]["values"] == accs


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
        ("--model vgg", ["--model", "vgg", "mlp", "transformer", "cnn", "resnet", "mlp_nnx"]),
        ("--steps 0", ["--steps"]),
        ("--dataset imagenet", ["--dataset", "imagenet", "digits", "mnist1d"]),
        ("--optimizer lion", ["--optimizer", "lion", "adamw", "sgd"]),
        ("--seeds 0", ["--seeds"]),
        ("--dataset text --model cnn", ["--model", "text", "transformer", "'cnn'"]),
        ("--seq-len 16", ["--seq-len", "text", "digits"]),
        ("--dataset text --seq-len 300000", ["--seq-len", "at most", "300000"]),
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


def test_text_dense_and_fst_rotating(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--dataset text``: the char-level GPT, dense and FST (rotating: fst_key from the step),
    2 paired seeds; FST is judged by its exported 2:4 model, which the sparsified loss equals."""
    argv = ("--dataset text --steps 4 --width 16 --depth 1 --seq-len 16 --batch-size 8 --lr 1e-2 "
            "--eval-every 2 --seeds 2 --config pattern=rotating --quiet")
    assert main([*argv.split(), "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "bits per character" in table and "2:4 model:" in table
    results = _results(tmp_path)
    assert results["data"]["name"] == "text" and results["model"]["d_model"] == 16
    assert results["seeds"] == [0, 1]
    for seed in results["per_seed"]:
        dense, fst = seed["runs"]["dense"], seed["runs"]["fst"]
        assert dense["pruned"] is None and fst["pruned"] is not None
        for run in (dense, fst):
            assert run["eval_steps"] == [0, 2, 4] and len(run["losses"]) == 4
            assert run["val_loss"][-1] < run["val_loss"][0]  # both learn
        # The metric is the 2:4 model's (prune_params + plain loss), equal to the sparse forward's.
        assert fst["final"]["val_loss"] == fst["pruned"]["val_loss"]
        assert fst["pruned"]["val_loss"] == pytest.approx(fst["val_loss"][-1], rel=1e-5)
        assert fst["final"]["val_bpc"] == pytest.approx(fst["final"]["val_loss"] / np.log(2))
        assert "pruned 2:4" in fst["pruned"]["summary"] and fst["pruned"]["pruned"]
    # The two seeds start from different parameters; the summary pairs them.
    assert results["per_seed"][0]["runs"]["dense"]["losses"] != results["per_seed"][1]["runs"]["dense"]["losses"]
    s = results["summary"]
    diffs = [r["runs"]["fst"]["final"]["val_loss"] - r["runs"]["dense"]["final"]["val_loss"]
             for r in results["per_seed"]]
    assert s["paired_difference"]["values"] == pytest.approx(diffs)
    assert s["gap_percent"] == pytest.approx(100 * np.mean(diffs) / s["val_loss"]["dense"]["mean"])
    assert (tmp_path / "curves.png").stat().st_size > 0


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


# ------------------------------------------------------------------------------------------------
# Data sets, models, optimizers, seeds
# ------------------------------------------------------------------------------------------------


def test_mnist1d_mlp_learns(tmp_path: Path) -> None:
    """MNIST-1D end to end: 40-sample signals flat for the MLP; both runs lower the loss."""
    argv = "--dataset mnist1d --steps 30 --width 32 --lr 3e-3 --quiet"
    assert main([*argv.split(), "--out", str(tmp_path)]) == 0
    results = _results(tmp_path)
    _assert_both_learn(results)
    assert results["data"]["name"] == "mnist1d"
    assert results["data"]["input_shape"] == [40]
    assert (results["data"]["num_train"], results["data"]["num_test"]) == (4000, 1000)
    for variant in ("dense", "fst"):
        losses = results["runs"][variant]["curves"]["loss"]
        assert np.mean(losses[-5:]) < np.mean(losses[:5]), variant


def test_mnist1d_is_generated_locally_and_deterministically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No network, no files, the same arrays every time, and the global RNGs left as they were."""

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("mnist1d generation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.chdir(tmp_path)
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    fresh = _mnist1d_arrays.__wrapped__(42)  # bypass the in-process cache
    assert os.listdir(tmp_path) == []
    np.testing.assert_array_equal(np.random.get_state()[1], np_before)
    assert random.getstate() == py_before
    x, y, x_test, y_test = fresh
    assert (x.shape, x_test.shape, x.dtype, y.dtype) == ((4000, 40), (1000, 40), np.float32, np.int32)
    assert sorted(set(y.tolist())) == list(range(10))
    data = load_mnist1d_dataset("transformer")  # 8 tokens of 5 samples
    assert data.x_train.shape == (4000, 8, 5)
    np.testing.assert_array_equal(data.x_train.reshape(4000, 40), x)
    np.testing.assert_array_equal(data.y_test, y_test)


def test_cnn_on_mnist1d_runs(tmp_path: Path) -> None:
    """The 1-D CNN (8 tokens of 5 samples, window 3) trains, dense and FST."""
    argv = "--dataset mnist1d --model cnn --steps 20 --width 16 --depth 2 --lr 3e-3 --quiet"
    assert main([*argv.split(), "--out", str(tmp_path)]) == 0
    results = _results(tmp_path)
    _assert_both_learn(results)
    assert results["model"]["name"] == "cnn"
    assert results["data"]["input_shape"] == [8, 5]
    assert results["flops_per_step"]["fst"] < results["flops_per_step"]["dense"]


@pytest.mark.parametrize(("dataset", "input_shape"), [("digits", [8, 8, 1]), ("mnist1d", [40, 1])])
def test_resnet_runs(tmp_path: Path, dataset: str, input_shape: list[int]) -> None:
    """The ResNet (nn.Conv, 2-D on digits, 1-D on MNIST-1D) trains, dense and FST, with every block
    convolution sparse in all three products and the stem and classifier dense."""
    argv = f"--dataset {dataset} --model resnet --steps 12 --width 8 --depth 1 --batch-size 32 --lr 3e-3"
    assert main([*argv.split(), "--quiet", "--out", str(tmp_path)]) == 0
    results = _results(tmp_path)
    _assert_both_learn(results)
    assert results["model"]["name"] == "resnet"
    assert results["data"]["input_shape"] == input_shape
    # stem + 2 convolutions + head; the two convolutions' products count half.
    flops = results["flops_per_step"]
    assert flops["fst"] < 0.8 * flops["dense"]


def test_resnet_report_keeps_stem_and_head_dense() -> None:
    """Every block convolution (a downsampled one included) is sparse in all three products; the
    stem and the classifier are the first and last weight matmuls, dense by default."""
    model = ResNet(features=8, num_blocks=2, downsample=True, num_groups=4)
    x = jnp.zeros((2, 8, 8, 1))
    params = model.init(jax.random.key(0), x)["params"]
    rows = fst_jax.report(lambda p, x: model.apply({"params": p}, x).sum())(params, x).rows
    assert [r.param_path for r in rows] == ["['stem']['kernel']"] + [
        f"['ResidualBlock_{b}']['Conv_{c}']['kernel']" for b in (0, 1) for c in (0, 1)] + ["['head']['kernel']"]
    assert rows[0].forward == "dense: first weight matmul (skip_first)"
    assert rows[-1].forward == "dense: last weight matmul (skip_last)"
    for r in rows[1:-1]:
        assert (r.forward, r.grad_input, r.grad_weight) == (
            "sparse", "sparse (prune_output_dim)", "sparse (fixed_mask, checkerboard, compact)"), r.param_path
    assert rows[4].lhs == "float32[2,4,4,8]"  # after the stride-2 convolution of block 1


def test_mlp_nnx_runs(tmp_path: Path) -> None:
    """The Flax NNX MLP trains through nnx.split/merge; FST rewrites its weight matmuls."""
    argv = "--model mlp_nnx --steps 20 --width 32 --lr 3e-3 --quiet"
    assert main([*argv.split(), "--out", str(tmp_path)]) == 0
    results = _results(tmp_path)
    _assert_both_learn(results)
    assert results["model"]["name"] == "mlp_nnx"
    assert results["flops_per_step"]["fst"] < results["flops_per_step"]["dense"]
    # Same init and first batch: the first losses differ only by the 2:4 forward of the middle
    # layers, so they are close but not equal.
    dense, fst = (results["runs"][v]["curves"]["loss"][0] for v in ("dense", "fst"))
    assert dense != fst
    assert dense == pytest.approx(fst, rel=0.2)


def test_sgd_learns(tmp_path: Path) -> None:
    """--optimizer sgd (momentum 0.9, default lr 0.1) trains both runs."""
    argv = "--optimizer sgd --steps 20 --width 32 --quiet"
    assert main([*argv.split(), "--out", str(tmp_path)]) == 0
    results = _results(tmp_path)
    _assert_both_learn(results)
    assert results["optimizer"] == {"name": "sgd", "lr": 0.1, "schedule": "cosine"}


def test_seeds_aggregate_and_pairing(
    mlp_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--seeds 2 from --seed 2 runs seeds 2 and 3; seed 3 equals the single --seed 3 run
    exactly; the aggregate is the mean/std of the per-seed numbers and the paired difference."""
    argv = [a for a in MLP_ARGV if a != "--seed" and a != "3"]
    assert main([*argv, "--seed", "2", "--seeds", "2", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "test accuracy over 2 seeds (mean ± std)" in table
    assert "paired difference fst − dense" in table
    # The 2:4 model: its accuracy column, that it equals the FST runs', and which weights it pruned.
    assert table.splitlines()[0].endswith("2:4 model test acc")
    assert "= the FST run's test acc (sparsified predict), every seed" in table
    summary = next(line for line in table.splitlines() if line.startswith("2:4 model: "))
    assert "2 of 4 weights pruned 2:4" in summary
    assert "['Dense_0']['kernel']" in summary and "['head']['kernel']" in summary
    results, single = _results(tmp_path), _results(mlp_run)
    assert results["seeds"] == [2, 3]
    assert [s["seed"] for s in results["per_seed"]] == [2, 3]
    assert results["runs"] == results["per_seed"][0]["runs"]
    seed3 = results["per_seed"][1]["runs"]
    for variant in ("dense", "fst"):
        assert seed3[variant]["curves"]["loss"] == single["runs"][variant]["curves"]["loss"]
        assert seed3[variant]["final"]["test_accuracy"] == single["runs"][variant]["final"]["test_accuracy"]
        assert seed3[variant]["final"]["compile_s"] == 0.0  # the compiled step was reused
    assert results["per_seed"][0]["runs"]["dense"]["curves"]["loss"] != seed3["dense"]["curves"]["loss"]
    agg = results["aggregate"]
    assert agg["num_seeds"] == 2 and agg["seeds"] == [2, 3]
    accs = {
        v: [s["runs"][v]["final"]["test_accuracy"] for s in results["per_seed"]]
        for v in ("dense", "fst")
    }
    for variant in ("dense", "fst"):
        stats = agg["variants"][variant]
        assert stats["values"] == accs[variant]
        assert stats["mean"] == pytest.approx(np.mean(accs[variant]))
        assert stats["std"] == pytest.approx(np.std(accs[variant], ddof=1))
    diffs = np.subtract(accs["fst"], accs["dense"])
    assert agg["paired_difference"]["mean"] == pytest.approx(diffs.mean())
    assert agg["paired_difference"]["stderr"] == pytest.approx(diffs.std(ddof=1) / np.sqrt(2))


# ------------------------------------------------------------------------------------------------
# The 2:4 model of an FST run
# ------------------------------------------------------------------------------------------------


def test_evaluate_pruned_is_the_model_fst_trained() -> None:
    """After FST training, the exported 2:4 model evaluated dense computes the sparsified predict's
    logits, so its accuracy is the one training reports; the raw master weights are another model
    (the entries the forward mask drops are not zero)."""
    data = load_digits_dataset("mlp")
    params, predict = init_model("mlp", 32, 2, data.x_train, seed=0)
    cfg = fst_jax.FSTConfig()

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(predict(p, x), y).mean()

    steps = 20
    trained, run = train_run(
        "fst", fst_jax.sparsify(loss, cfg), fst_jax.sparsify(predict, cfg), params, data,
        batch_indices(len(data.x_train), 64, steps, seed=0), make_optimizer("adamw", 3e-3, steps),
        eval_every=steps, quiet=True,
    )
    model = evaluate_pruned(predict, cfg, trained, data)
    assert model.test_accuracy == run.test_accuracy[-1]
    assert model.test_loss == pytest.approx(run.test_loss[-1], rel=1e-6)
    assert model.pruned == ("['Dense_1']['kernel']",)
    assert (model.kept, model.total) == (32 * 32 // 2, 32 * 32)
    assert set(model.dense_weights) == {"['Dense_0']['kernel']", "['head']['kernel']"}
    assert set(model.others) == {"['Dense_0']['bias']", "['Dense_1']['bias']", "['head']['bias']"}
    assert model.not_exportable == {}

    x = jnp.asarray(data.x_test)
    masks = fst_jax.forward_masks(predict, cfg)(trained, x)
    sparse_logits = fst_jax.sparsify(predict, cfg)(trained, x)
    pruned_logits = predict(fst_jax.prune_params(trained, masks), x)
    np.testing.assert_allclose(pruned_logits, sparse_logits, rtol=1e-6, atol=1e-6)
    dropped = np.asarray(trained["Dense_1"]["kernel"])[~np.asarray(masks.tree["Dense_1"]["kernel"])]
    assert np.all(dropped != 0)  # master weights keep the dropped entries
    assert not np.allclose(predict(trained, x), sparse_logits, atol=1e-3)


def test_pruned_model_summary_names_what_it_evaluated() -> None:
    """The summary says how many weights were pruned, which stayed dense and why, and flags
    weights that could not be exported (then the pruned model is not the model FST trained)."""
    model = PrunedModel(
        0.1, 0.2, 0.9, pruned=("['w1']", "['w2']"), kept=16, total=32,
        dense_weights={"['w0']": "first weight matmul (skip_first)"}, others=("['b0']", "['b1']"),
    )
    assert model.summary() == (
        "2 of 3 weights pruned 2:4 (16 of 32 entries kept), the rest dense: ['w0'] (first weight "
        "matmul (skip_first)); 2 other parameters (biases, norm scales, embeddings) as they are"
    )
    bad = dataclasses.replace(model, not_exportable={"['w3']": "reaches sparse matmul #2 through mul"})
    assert bad.summary().startswith("2 of 4 weights pruned 2:4")
    assert "NOT EXPORTABLE" in bad.summary() and "['w3'] (reaches sparse matmul #2 through mul)" in bad.summary()


# ------------------------------------------------------------------------------------------------
# The package: entry points, public names
# ------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def test_python_m_and_console_script_entry_points() -> None:
    """``python -m fst_jax.train`` runs the CLI, and the ``fst-jax`` console script names
    ``fst_jax.train:main``, the CLI's main."""
    out = subprocess.run(
        [sys.executable, "-m", "fst_jax.train", "--help"], cwd=ROOT, capture_output=True,
        text=True, check=True,
    ).stdout
    assert out.startswith("usage: python -m fst_jax.train")
    assert "--dataset" in out and "--config" in out
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["fst-jax"].partition(":")
    assert getattr(importlib.import_module(module), attr) is fst_jax.train.cli.main


def test_public_names_are_reexported() -> None:
    """What ``from fst_jax.train import ...`` offered before the package split still works."""
    import fst_jax.train as train

    for name in (
        "Dataset", "RunResult", "SeedResult", "aggregate", "build_parser", "config_from_overrides",
        "init_model", "load_dataset", "load_digits_dataset", "load_mnist1d_dataset", "main",
        "make_model", "make_optimizer", "train_run", "DEFAULT_STEPS", "DEFAULT_WIDTH",
        "DEFAULT_DEPTH", "DEFAULT_LR", "DATASETS", "MODELS", "OPTIMIZERS",
        "mean_std_se", "batch_indices", "evaluate_pruned", "PrunedModel",
    ):
        assert hasattr(train, name), name
    for name in train.__all__:
        assert getattr(train, name).__module__.startswith("fst_jax.train."), name


def test_benchmarks_use_only_public_train_names() -> None:
    """Benchmarks import fst_jax.train's public functions, not its private helpers."""
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fst_jax.train"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name}:{node.lineno} imports {private} from {node.module}"
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "train" and node.attr.startswith("_")):
                raise AssertionError(f"{path.name}:{node.lineno} uses train.{node.attr}")
