"""The ``fst-jax train`` command: arguments, ``--config`` overrides, and the run itself.

:func:`main` loads the data, builds the model, trains a dense and an FST model from the same
initialization and batch order for each seed, exports and evaluates the 2:4 model of each FST
run, prints the report and the results table, and writes ``DIR/results.json`` and
``DIR/curves.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fst_jax
from fst_jax._config import FSTConfig
from fst_jax.train.data import DATASETS, DEFAULT_STEPS, MNIST1D_SEED, MODELS, batch_indices, load_dataset
from fst_jax.train.loop import (
    DEFAULT_LR,
    OPTIMIZERS,
    SCHEDULES,
    SGD_MOMENTUM,
    WEIGHT_DECAY,
    Params,
    RunResult,
    SeedResult,
    make_optimizer,
    train_run,
)
from fst_jax.train.lm import TEXT_BATCH, TEXT_DEPTH, TEXT_SEQ_LEN, TEXT_WIDTH, run_text
from fst_jax.train.model import DEFAULT_DEPTH, DEFAULT_WIDTH, NUM_HEADS, init_model
from fst_jax.train.plots import plot_curves
from fst_jax.train.pruned import evaluate_pruned
from fst_jax.train.stats import aggregate, mean_std_se, results_table

__all__ = ["build_parser", "config_from_overrides", "main"]

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _parse_value(name: str, raw: str, default: object) -> object:
    """Parses the text ``raw`` for the FSTConfig field ``name``, typed by its default value."""
    text = raw.strip()
    if isinstance(default, bool):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"FSTConfig.{name}={raw!r} is not a bool; allowed values: true, false")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"FSTConfig.{name}={raw!r} is not an int") from None
    if isinstance(default, float):
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"FSTConfig.{name}={raw!r} is not a float") from None
        if not math.isfinite(value):
            raise ValueError(f"FSTConfig.{name}={raw!r} is not a finite float")
        return value
    if isinstance(default, str):
        if name == "pattern" and "," in text:  # a rotating set: pattern=even,odd
            return tuple(part.strip() for part in text.split(","))
        return text
    raise ValueError(
        f"FSTConfig.{name} cannot be set from the command line (it is a {type(default).__name__}); "
        "build an fst_jax.FSTConfig in Python to set it"
    )


def config_from_overrides(overrides: Sequence[str]) -> FSTConfig:
    """Builds an :class:`~fst_jax.FSTConfig` from ``KEY=VALUE`` strings (the ``--config`` flag).

    Values are parsed by the type of the field's default: bools accept
    ``true/false/1/0/yes/no/on/off``, ints and floats the usual literals, strings are taken as they
    are and checked by :class:`~fst_jax.FSTConfig`. Tuple fields (``rules``) are rejected. Later
    assignments to the same key win.

    Args:
      overrides: strings such as ``"pattern=even"`` or ``"restore_scale=0.1"``.

    Returns:
      The validated config; the paper's recipe for fields not given.

    Raises:
      ValueError: a malformed item, an unknown field name, or a value FSTConfig rejects.
      NotImplementedError: a value FSTConfig knows but has not implemented yet.

    Example:
      >>> from fst_jax.train import config_from_overrides
      >>> cfg = config_from_overrides(["pattern=even", "skip_first=false", "restore_scale=0.1"])
      >>> cfg.pattern, cfg.skip_first, cfg.restore_scale
      ('even', False, 0.1)
    """
    names = [f.name for f in dataclasses.fields(FSTConfig)]
    defaults = FSTConfig()
    changes: dict[str, object] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        if key not in names:
            raise ValueError(
                f"{key!r} is not an FSTConfig field; allowed names: {', '.join(names)}"
            )
        changes[key] = _parse_value(key, raw, getattr(defaults, key))
    return FSTConfig(**changes)  # type: ignore[arg-type]


def _jsonable(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def _positive(kind: type) -> Callable[[str], Any]:
    """An argparse ``type=``: parses ``kind`` (int or float) and requires a finite value > 0."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid positive {kind.__name__} value: {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
        return value

    return parse


_positive_int = _positive(int)
_positive_float = _positive(float)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``fst-jax train``.

    Args:
      prog: the program name shown in usage and error messages.

    Returns:
      The parser.

    Example:
      >>> from fst_jax.train import build_parser
      >>> build_parser().parse_args(["--model", "transformer", "--config", "pattern=even"]).config
      ['pattern=even']
    """
    field_names = ", ".join(f.name for f in dataclasses.fields(FSTConfig))
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Train a dense and a fully-sparse (FST, 2:4) model side by side on a small data set "
            "and compare loss, accuracy, step time and FLOPs."
        ),
    )
    parser.add_argument(
        "--dataset",
        choices=DATASETS,
        default="digits",
        help="scikit-learn's 8x8 digits, MNIST-1D (generated locally by the mnist1d package), or "
        "text: a character-level GPT on Python's standard-library sources, judged by validation "
        "loss and bits per character (default: %(default)s)",
    )
    parser.add_argument(
        "--model",
        choices=MODELS,
        default=None,
        help="the model; cnn is a 1-D CNN over the 8 tokens written as matmuls, resnet a residual "
        "CNN with nn.Conv (2-D on digits, 1-D on mnist1d), mlp_nnx the MLP in Flax NNX; text "
        "takes only transformer, the char-level GPT (default: mlp; transformer for text)",
    )
    parser.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="training steps per model (default: "
        + ", ".join(f"{v} for {k}" for k, v in DEFAULT_STEPS.items())
        + ")",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=None,
        help=f"batch size (default: 128; {TEXT_BATCH} windows for text)"
    )
    parser.add_argument(
        "--seq-len", type=_positive_int, default=None,
        help=f"text only: characters per training and validation window (default: {TEXT_SEQ_LEN})",
    )
    parser.add_argument(
        "--width",
        type=_positive_int,
        default=None,
        help="hidden width (MLPs) / d_model (transformer) / channels (CNN, ResNet) (default: "
        + " / ".join(str(DEFAULT_WIDTH[m]) for m in ("mlp", "transformer", "cnn", "resnet"))
        + f"; d_model {TEXT_WIDTH} for text)",
    )
    parser.add_argument(
        "--depth",
        type=_positive_int,
        default=None,
        help="hidden layers (MLPs) / transformer blocks / convolutions (CNN) / residual blocks "
        "(ResNet) (default: "
        + " / ".join(str(DEFAULT_DEPTH[m]) for m in ("mlp", "transformer", "cnn", "resnet"))
        + f"; {TEXT_DEPTH} blocks for text)",
    )
    parser.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="adamw",
        help=f"AdamW (weight decay {WEIGHT_DECAY}) or SGD with momentum {SGD_MOMENTUM} "
        f"(L2 weight decay {WEIGHT_DECAY}) (default: %(default)s)",
    )
    parser.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="peak learning rate (default: "
        + ", ".join(f"{v} for {k}" for k, v in DEFAULT_LR.items())
        + ")",
    )
    parser.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default="cosine",
        help="learning-rate schedule: 5%% warm-up then cosine decay, or constant "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--eval-every",
        type=_positive_int,
        default=None,
        help="evaluate every N steps (default: steps // 10)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the initialization and the batch order (default: %(default)s)",
    )
    parser.add_argument(
        "--seeds",
        type=_positive_int,
        default=1,
        help="run N seeds, SEED .. SEED+N-1 (0 .. N-1 by default), each a dense/FST pair with "
        "the same initialization and batch order; report mean ± std of the final test accuracy "
        "(text: validation loss) and the paired difference with its standard error "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs"), help="output directory (default: %(default)s/)"
    )
    parser.add_argument(
        "--config",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help=f"FSTConfig overrides, e.g. pattern=even skip_first=false; fields: {field_names}",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the results table")
    return parser


def _run_payload(r: RunResult) -> dict[str, Any]:
    out = {
        "final": r.final(),
        "curves": {
            "step": r.loss_steps,
            "loss": r.losses,
            "eval_step": r.eval_steps,
            "train_loss": r.train_loss,
            "test_loss": r.test_loss,
            "test_accuracy": r.test_accuracy,
        },
        "step_times_ms": r.step_times_ms,
    }
    if r.pruned is not None:
        out["pruned"] = {
            "how": "fst_jax.forward_masks + fst_jax.prune_params, evaluated with the dense predict",
            **_jsonable(r.pruned),
            "equals_sparsified_predict": r.pruned.test_accuracy == r.test_accuracy[-1],
            "summary": r.pruned.summary(),
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fst-jax train`` and ``python -m fst_jax.train``.

    Trains the dense and the FST model of each seed, exports and evaluates each FST run's 2:4
    model (:func:`~fst_jax.train.evaluate_pruned`), prints the report and the results table
    (:func:`~fst_jax.train.results_table`), and writes ``DIR/results.json`` and
    ``DIR/curves.png``.

    Args:
      argv: the arguments, without the program name; a leading ``"train"`` subcommand is accepted
        and dropped. ``None`` reads ``sys.argv``.

    Returns:
      The exit status, 0 on success.

    Raises:
      SystemExit: with status 2 for invalid arguments (argparse's convention), naming the bad
        flag or ``--config`` field and the allowed values.

    Example:
      >>> import contextlib, io, json, tempfile
      >>> from pathlib import Path
      >>> from fst_jax.train import main
      >>> out = tempfile.mkdtemp()
      >>> with contextlib.redirect_stdout(io.StringIO()):  # the table
      ...     status = main(["--steps", "3", "--width", "8", "--depth", "2", "--quiet", "--out", out])
      >>> status
      0
      >>> fst = json.loads((Path(out) / "results.json").read_text())["runs"]["fst"]
      >>> fst["pruned"]["pruned"], fst["pruned"]["test_accuracy"] == fst["final"]["test_accuracy"]
      (["['Dense_1']['kernel']"], True)
    """
    args_in = [os.fspath(a) for a in (sys.argv[1:] if argv is None else argv)]
    invoked_as = Path(sys.argv[0]).name if argv is None and sys.argv else ""
    prog = "fst-jax train" if invoked_as.startswith("fst-jax") else "python -m fst_jax.train"
    if args_in and args_in[0] == "train":
        args_in = args_in[1:]
        prog = "fst-jax train"
    parser = build_parser(prog)
    args = parser.parse_args(args_in)
    try:
        config = config_from_overrides(args.config)
    except (ValueError, NotImplementedError) as e:
        parser.error(f"argument --config: {e}")
    if args.steps is None:
        args.steps = DEFAULT_STEPS[args.dataset]
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    if args.dataset == "text":
        return run_text(args, config, parser.error)
    if args.seq_len is not None:
        parser.error("argument --seq-len: applies to --dataset text only (the other data sets have "
                     f"a fixed layout), got --dataset {args.dataset}")
    if args.model is None:
        args.model = "mlp"
    if args.batch_size is None:
        args.batch_size = 128
    width = args.width if args.width is not None else DEFAULT_WIDTH[args.model]
    depth = args.depth if args.depth is not None else DEFAULT_DEPTH[args.model]
    if args.model == "transformer" and width % NUM_HEADS:
        parser.error(
            f"argument --width: the transformer's d_model must be a multiple of {NUM_HEADS}, "
            f"got {width}"
        )
    data = load_dataset(args.dataset, args.model)
    if args.batch_size > len(data.x_train):
        parser.error(
            f"argument --batch-size: at most {len(data.x_train)} (the training set), "
            f"got {args.batch_size}"
        )
    eval_every = args.eval_every if args.eval_every is not None else max(1, args.steps // 10)
    seeds = [args.seed + i for i in range(args.seeds)]

    def say(*parts: object) -> None:
        if not args.quiet:
            print(*parts, flush=True)

    # The model functions of the first seed serve every seed (same structure, other parameters),
    # so that each variant's train step is compiled once.
    params, predict_fn = init_model(
        args.model, width, depth, data.x_train, seeds[0], data.num_classes
    )

    def loss_fn(p: Params, x: jax.Array, y: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(predict_fn(p, x), y).mean()

    fst_loss_fn = fst_jax.sparsify(loss_fn, config)
    fst_predict_fn = fst_jax.sparsify(predict_fn, config)
    keyed = config.needs_fst_key
    if keyed:  # the forward product does not use the drawn pattern or sample: any key evaluates the same
        fst_predict_fn = functools.partial(fst_predict_fn, fst_key=0)
    variants = (("dense", loss_fn, predict_fn), ("fst", fst_loss_fn, fst_predict_fn))
    tx = make_optimizer(args.optimizer, lr, args.steps, args.schedule)

    n_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}..{seeds[-1]}"
    say(
        f"{args.model}: width {width}, depth {depth}, {n_params:,} parameters; {data.name}: "
        f"{len(data.x_train)} train / {len(data.x_test)} test, input {data.x_train.shape[1:]}; "
        f"{args.steps} steps of batch {args.batch_size}, {args.optimizer} lr {lr} "
        f"({args.schedule}), {seed_text}"
    )
    say(f"config: {config}")
    first = batch_indices(len(data.x_train), args.batch_size, args.steps, seeds[0])[0]
    rep = fst_jax.report(loss_fn, config)(
        params, jnp.asarray(data.x_train[first]), jnp.asarray(data.y_train[first])
    )
    flops = {"dense": getattr(rep, "flops_dense", None), "fst": getattr(rep, "flops_fst", None)}
    say(str(rep))

    caches: dict[str, dict[Any, Any]] = {name: {} for name, _, _ in variants}
    pruned_cache: dict[Any, Any] = {}
    per_seed: list[SeedResult] = []
    for seed in seeds:
        if seed != seeds[0]:
            params, _ = init_model(args.model, width, depth, data.x_train, seed, data.num_classes)
            say(f"seed {seed}")
        batches = batch_indices(len(data.x_train), args.batch_size, args.steps, seed)
        runs: dict[str, RunResult] = {}
        for variant, lf, pf in variants:
            trained, runs[variant] = train_run(
                variant, lf, pf, params, data, batches, tx,
                eval_every=eval_every, quiet=args.quiet, cache=caches[variant],
                fst_key=keyed and variant == "fst",
            )
            if variant == "fst":
                # The model FST trained is the 2:4 one: export it as a user would and evaluate it
                # with the plain predict function (once, at the end).
                runs[variant].pruned = evaluate_pruned(
                    predict_fn, config, trained, data, cache=pruned_cache
                )
        per_seed.append(SeedResult(seed=seed, runs=runs))
    agg = aggregate(per_seed)

    print(results_table(per_seed, flops, agg), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if data.name == "mnist1d":
        from importlib.metadata import version

        data_source = (
            f"mnist1d.data.make_dataset(get_dataset_args()), seed {MNIST1D_SEED}, "
            f"mnist1d {version('mnist1d')}"
        )
    else:
        data_source = "sklearn.datasets.load_digits"
    payload = {
        "args": _jsonable(vars(args)),
        "model": {"name": args.model, "width": width, "depth": depth, "num_params": n_params},
        "optimizer": {"name": args.optimizer, "lr": lr, "schedule": args.schedule},
        "config": _jsonable(config),
        "data": {
            "name": data.name,
            "source": data_source,
            "num_train": len(data.x_train),
            "num_test": len(data.x_test),
            "input_shape": list(data.x_train.shape[1:]),
        },
        "flops_per_step": flops,
        "seeds": seeds,
        # The first seed's runs, under the name single-seed readers know.
        "runs": {v: _run_payload(r) for v, r in per_seed[0].runs.items()},
        "per_seed": [
            {"seed": s.seed, "runs": {v: _run_payload(r) for v, r in s.runs.items()}}
            for s in per_seed
        ],
        "aggregate": agg,
        # The exported 2:4 models of the FST runs, evaluated dense (equal to the FST runs' test
        # accuracy, which the sparsified predict function measures).
        "pruned_test_accuracy": mean_std_se(
            [s.runs["fst"].pruned.test_accuracy for s in per_seed if s.runs["fst"].pruned is not None]
        ),
        "versions": {"jax": jax.__version__, "backend": jax.default_backend()},
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    if plot_curves(per_seed, out / "curves.png"):
        say(f"wrote {out / 'results.json'} and {out / 'curves.png'}")
    else:
        say(
            f"wrote {out / 'results.json'} "
            "(matplotlib not installed: no curves.png; pip install matplotlib)"
        )
    return 0
