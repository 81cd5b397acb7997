"""``fst-jax train``: train a dense and a fully-sparse (FST) model side by side and compare them.

Both runs start from the same parameters (``jax.random.key(seed)``), see the same batches in the
same order and use the same optimizer; the only difference is that the FST run differentiates
``fst_jax.sparsify(loss_fn, config)`` instead of ``loss_fn``. The data set is scikit-learn's
bundled 8×8 handwritten digits (1797 images, no download).

Usage::

    fst-jax train [--model {mlp,transformer}] [--steps N] [--config KEY=VALUE ...] [--out DIR]
    python -m fst_jax.train [same options]

What it prints: the per-matmul FST report of the loss, a progress bar per model, and a results
table (final train loss, test accuracy, median step time, FLOPs per step). What it writes:
``DIR/results.json`` (arguments, config, curves, final metrics) and, when matplotlib is
installed, ``DIR/curves.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fst_jax
from fst_jax._config import FSTConfig
from fst_jax.models import MLP, Transformer

__all__ = [
    "Dataset",
    "RunResult",
    "build_parser",
    "config_from_overrides",
    "load_digits_dataset",
    "main",
    "make_model",
    "train_run",
]

MODELS = ("mlp", "transformer")
SCHEDULES = ("cosine", "constant")
DEFAULT_WIDTH = {"mlp": 256, "transformer": 64}
DEFAULT_DEPTH = {"mlp": 3, "transformer": 2}
NUM_HEADS = 4
TEST_FRACTION = 0.2
SPLIT_SEED = 0
WEIGHT_DECAY = 1e-4
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")

Params = Any
LossFn = Callable[[Params, jax.Array, jax.Array], jax.Array]
PredictFn = Callable[[Params, jax.Array], jax.Array]


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test split of the digits data set, standardized with the train statistics.

    Attributes:
      x_train: training inputs, ``[N_train, 64]`` (MLP) or ``[N_train, 8, 8]`` (transformer).
      y_train: training labels in ``0..9``, ``[N_train]`` int32.
      x_test: test inputs, same layout as ``x_train``.
      y_test: test labels, ``[N_test]`` int32.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_classes(self) -> int:
        """The number of classes (10)."""
        return 10


def load_digits_dataset(model: str, test_fraction: float = TEST_FRACTION) -> Dataset:
    """Loads scikit-learn's bundled digits, standardizes each pixel and splits train/test.

    The split is deterministic: a permutation seeded with a fixed seed, the last
    ``test_fraction`` of it is the test set (the same for every ``--seed``). Pixels are
    standardized with the training mean and standard deviation (constant pixels map to 0).

    Args:
      model: ``"mlp"`` (the 64 pixels flat, ``[N, 64]``) or ``"transformer"`` (the 8 image rows
        as 8 tokens of 8 features, ``[N, 8, 8]``).
      test_fraction: the fraction of the examples held out for testing.

    Returns:
      The :class:`Dataset`.

    Raises:
      ValueError: ``model`` is not one of ``"mlp"``, ``"transformer"``.

    Example:
      >>> from fst_jax.train import load_digits_dataset
      >>> data = load_digits_dataset("transformer")
      >>> data.x_train.shape, data.x_test.shape
      ((1438, 8, 8), (359, 8, 8))
    """
    if model not in MODELS:
        raise ValueError(
            f"model={model!r} is not valid; allowed values: {', '.join(map(repr, MODELS))}"
        )
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.asarray(digits.data, dtype=np.float64)
    y = np.asarray(digits.target, dtype=np.int32)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    x, y = x[order], y[order]
    n_test = int(round(test_fraction * len(x)))
    n_train = len(x) - n_test
    mean = x[:n_train].mean(axis=0)
    std = x[:n_train].std(axis=0)
    std = np.where(std > 0, std, 1.0)
    x = ((x - mean) / std).astype(np.float32)
    if model == "transformer":
        x = x.reshape(len(x), 8, 8)
    return Dataset(x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:], y_test=y[n_train:])


def make_model(model: str, width: int, depth: int, num_classes: int = 10) -> nn.Module:
    """Builds the Flax model for ``--model``.

    Args:
      model: ``"mlp"`` (``depth`` hidden layers of ``width``) or ``"transformer"`` (``depth``
        blocks of width ``width``, 4 heads, 8 tokens).
      width: the hidden width (MLP) or ``d_model`` (transformer).
      depth: the number of hidden layers (MLP) or transformer blocks.
      num_classes: the number of output logits.

    Returns:
      The (unbound) Flax module.

    Raises:
      ValueError: ``model`` is not one of ``"mlp"``, ``"transformer"``.

    Example:
      >>> from fst_jax.train import make_model
      >>> make_model("mlp", width=32, depth=2).features
      (32, 32)
    """
    if model == "mlp":
        return MLP(features=(width,) * depth, num_classes=num_classes)
    if model == "transformer":
        return Transformer(
            num_tokens=8,
            d_model=width,
            num_heads=NUM_HEADS,
            num_layers=depth,
            num_classes=num_classes,
        )
    raise ValueError(
        f"model={model!r} is not valid; allowed values: {', '.join(map(repr, MODELS))}"
    )


def _batch_indices(num_train: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """The training batch order: ``[steps, batch_size]`` indices, a fresh permutation per epoch."""
    rng = np.random.default_rng(seed)
    per_epoch = num_train // batch_size
    epochs = -(-steps // per_epoch)
    perms = [rng.permutation(num_train)[: per_epoch * batch_size] for _ in range(epochs)]
    return np.concatenate(perms).reshape(-1, batch_size)[:steps].astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Config parsing
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
    """What one training run (dense or FST) produced.

    Attributes:
      variant: ``"dense"`` or ``"fst"``.
      loss_steps: the step number of each entry of ``losses`` (1-based: the loss of the batch
        the ``step``-th update was computed on).
      losses: the training-batch loss of every step.
      eval_steps: the steps at which the model was evaluated (0 = at initialization).
      train_loss: the loss on the whole training set at each evaluation step.
      test_loss: the loss on the test set at each evaluation step.
      test_accuracy: the test accuracy at each evaluation step.
      step_times_ms: the wall time of each step, ``block_until_ready`` included.
      compile_s: the time to trace and compile the train step.
    """

    variant: str
    loss_steps: list[int] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)
    eval_steps: list[int] = dataclasses.field(default_factory=list)
    train_loss: list[float] = dataclasses.field(default_factory=list)
    test_loss: list[float] = dataclasses.field(default_factory=list)
    test_accuracy: list[float] = dataclasses.field(default_factory=list)
    step_times_ms: list[float] = dataclasses.field(default_factory=list)
    compile_s: float = 0.0

    def median_step_ms(self, warmup: int = 5) -> float:
        """The median step time in ms, without the first ``warmup`` steps (if there are more)."""
        times = (
            self.step_times_ms[warmup:] if len(self.step_times_ms) > warmup else self.step_times_ms
        )
        return statistics.median(times) if times else float("nan")

    def final(self) -> dict[str, float]:
        """The final metrics: train-set loss, test loss/accuracy, median step ms, compile s."""
        return {
            "train_loss": self.train_loss[-1],
            "test_loss": self.test_loss[-1],
            "test_accuracy": self.test_accuracy[-1],
            "median_step_ms": self.median_step_ms(),
            "compile_s": self.compile_s,
        }


def _make_optimizer(lr: float, steps: int, schedule: str) -> optax.GradientTransformation:
    """AdamW with a constant or warm-up + cosine learning rate."""
    if schedule == "constant":
        learning_rate: float | optax.Schedule = lr
    else:
        warmup = steps // 20
        if warmup > 0:
            learning_rate = optax.warmup_cosine_decay_schedule(
                init_value=0.0,
                peak_value=lr,
                warmup_steps=warmup,
                decay_steps=steps,
                end_value=0.01 * lr,
            )
        else:
            learning_rate = optax.cosine_decay_schedule(lr, decay_steps=steps, alpha=0.01)
    return optax.adamw(learning_rate, weight_decay=WEIGHT_DECAY)


def train_run(
    variant: str,
    loss_fn: LossFn,
    predict_fn: PredictFn,
    params: Params,
    data: Dataset,
    batches: np.ndarray,
    tx: optax.GradientTransformation,
    *,
    eval_every: int,
    quiet: bool = False,
) -> tuple[Params, RunResult]:
    """Trains ``params`` on ``data`` for ``len(batches)`` steps.

    The train step (``value_and_grad`` of ``loss_fn``, the optimizer update, and the batch
    gather) is one ``jax.jit`` function, compiled ahead of time so that ``compile_s`` and the step
    times are separate. Each step is timed with ``block_until_ready``.

    Args:
      variant: a label for the progress bar and the result (``"dense"`` or ``"fst"``).
      loss_fn: ``loss_fn(params, x, y) -> scalar`` (possibly wrapped by :func:`fst_jax.sparsify`).
      predict_fn: ``predict_fn(params, x) -> logits``, used for evaluation (sparsified the same
        way for FST, so that FST is evaluated as the 2:4 model it trains).
      params: the initial parameters.
      data: the data set.
      batches: ``[steps, batch_size]`` indices into the training set, in order.
      tx: the optimizer.
      eval_every: evaluate every this many steps (and at step 0 and at the end).
      quiet: no progress bar or log lines.

    Returns:
      The trained parameters and the :class:`RunResult`.
    """
    from tqdm import tqdm

    steps = len(batches)

    def step(
        p: Params, opt_state: Any, x: jax.Array, y: jax.Array, idx: jax.Array
    ) -> tuple[Params, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(
            p, jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0)
        )
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    n_train = len(data.x_train)

    def evaluate(p: Params, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        # One forward pass over train + test together: one compilation instead of two.
        logits = predict_fn(p, x)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = (jnp.argmax(logits[n_train:], axis=-1) == y[n_train:]).astype(jnp.float32)
        return jnp.mean(losses[:n_train]), jnp.mean(losses[n_train:]), jnp.mean(correct)

    x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_all = jnp.asarray(np.concatenate([data.x_train, data.x_test]))
    y_all = jnp.asarray(np.concatenate([data.y_train, data.y_test]))
    idx_rows = [jnp.asarray(b) for b in batches]  # on device before the timed loop
    opt_state = tx.init(params)
    result = RunResult(variant=variant)

    t0 = time.perf_counter()
    step_c = jax.jit(step).lower(params, opt_state, x_train, y_train, idx_rows[0]).compile()
    result.compile_s = time.perf_counter() - t0
    eval_c = jax.jit(evaluate)

    def do_eval(at: int, p: Params) -> None:
        train_loss, test_loss, test_acc = eval_c(p, x_all, y_all)
        result.eval_steps.append(at)
        result.train_loss.append(float(train_loss))
        result.test_loss.append(float(test_loss))
        result.test_accuracy.append(float(test_acc))

    do_eval(0, params)
    bar = tqdm(
        total=steps, desc=f"{variant:>5}", disable=quiet, file=sys.stderr, dynamic_ncols=True
    )
    log_every = max(1, steps // 50)
    with bar:
        for i in range(steps):
            t = time.perf_counter()
            params, opt_state, loss = step_c(params, opt_state, x_train, y_train, idx_rows[i])
            loss.block_until_ready()
            result.step_times_ms.append(1e3 * (time.perf_counter() - t))
            result.loss_steps.append(i + 1)
            result.losses.append(float(loss))
            bar.update(1)
            if (i + 1) % log_every == 0:
                bar.set_postfix(loss=f"{result.losses[-1]:.4f}", refresh=False)
            if (i + 1) % eval_every == 0 or i + 1 == steps:
                do_eval(i + 1, params)
                if not quiet:
                    bar.write(
                        f"[{variant}] step {i + 1:>5}  batch loss {result.losses[-1]:.4f}  "
                        f"train loss {result.train_loss[-1]:.4f}  "
                        f"test acc {result.test_accuracy[-1]:.4f}"
                    )
    return params, result


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def _fmt_flops(flops: float | None) -> str:
    if flops is None:
        return "n/a"
    for unit, scale in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.0f} FLOP"


def _results_table(results: Sequence[RunResult], flops: dict[str, float | None]) -> str:
    header = (
        "variant",
        "final train loss",
        "test acc",
        "median step (ms)",
        "compile (s)",
        "matmul FLOPs/step",
    )
    rows = [header]
    for r in results:
        f = r.final()
        rows.append(
            (
                r.variant,
                f"{f['train_loss']:.4f}",
                f"{f['test_accuracy']:.4f}",
                f"{f['median_step_ms']:.3f}",
                f"{f['compile_s']:.2f}",
                _fmt_flops(flops.get(r.variant)),
            )
        )
    widths = [max(len(row[j]) for row in rows) for j in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if j == 0 else c.rjust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    dense, fst = flops.get("dense"), flops.get("fst")
    if dense and fst is not None:
        lines.append(f"FST/dense FLOPs per step: {fst / dense:.3f}")
    return "\n".join(lines)


def _plot_curves(results: Sequence[RunResult], path: Path) -> bool:
    """Writes the loss and accuracy curves to ``path``; False if matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for r in results:
        line = ax_loss.plot(
            r.loss_steps, r.losses, alpha=0.35, linewidth=0.8, label=f"{r.variant} (batch)"
        )
        ax_loss.plot(
            r.eval_steps,
            r.train_loss,
            color=line[0].get_color(),
            marker="o",
            markersize=3,
            label=f"{r.variant} (train set)",
        )
        ax_acc.plot(r.eval_steps, r.test_accuracy, marker="o", markersize=3, label=r.variant)
    ax_loss.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="train loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="test accuracy")
    ax_loss.legend()
    ax_acc.legend()
    fig.savefig(path, dpi=120)
    return True


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


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid positive int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid positive float value: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


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
            "Train a dense and a fully-sparse (FST, 2:4) model side by side on scikit-learn's "
            "digits and compare loss, accuracy, step time and FLOPs."
        ),
    )
    parser.add_argument(
        "--model", choices=MODELS, default="mlp", help="the model (default: %(default)s)"
    )
    parser.add_argument(
        "--steps",
        type=_positive_int,
        default=500,
        help="training steps per model (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=128, help="batch size (default: %(default)s)"
    )
    parser.add_argument(
        "--width",
        type=_positive_int,
        default=None,
        help="MLP hidden width / transformer d_model "
        f"(default: {DEFAULT_WIDTH['mlp']} / {DEFAULT_WIDTH['transformer']})",
    )
    parser.add_argument(
        "--depth",
        type=_positive_int,
        default=None,
        help="MLP hidden layers / transformer blocks "
        f"(default: {DEFAULT_DEPTH['mlp']} / {DEFAULT_DEPTH['transformer']})",
    )
    parser.add_argument(
        "--lr",
        type=_positive_float,
        default=1e-3,
        help="peak AdamW learning rate (default: %(default)s)",
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fst-jax train`` and ``python -m fst_jax.train``.

    Args:
      argv: the arguments, without the program name; a leading ``"train"`` subcommand is accepted
        and dropped. ``None`` reads ``sys.argv``.

    Returns:
      The exit status, 0 on success.

    Raises:
      SystemExit: with status 2 for invalid arguments (argparse's convention), naming the bad
        flag or ``--config`` field and the allowed values.
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
    width = args.width if args.width is not None else DEFAULT_WIDTH[args.model]
    depth = args.depth if args.depth is not None else DEFAULT_DEPTH[args.model]
    if args.model == "transformer" and width % NUM_HEADS:
        parser.error(
            f"argument --width: the transformer's d_model must be a multiple of {NUM_HEADS}, "
            f"got {width}"
        )
    data = load_digits_dataset(args.model)
    if args.batch_size > len(data.x_train):
        parser.error(
            f"argument --batch-size: at most {len(data.x_train)} (the training set), "
            f"got {args.batch_size}"
        )
    eval_every = args.eval_every if args.eval_every is not None else max(1, args.steps // 10)

    def say(*parts: object) -> None:
        if not args.quiet:
            print(*parts, flush=True)

    model = make_model(args.model, width, depth, data.num_classes)
    # One jitted init (eager init dispatches, and compiles, every initializer op separately).
    params = jax.jit(model.init)(jax.random.key(args.seed), jnp.asarray(data.x_train[:1]))["params"]

    def predict_fn(p: Params, x: jax.Array) -> jax.Array:
        return model.apply({"params": p}, x)

    def loss_fn(p: Params, x: jax.Array, y: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(predict_fn(p, x), y).mean()

    fst_loss_fn = fst_jax.sparsify(loss_fn, config)
    fst_predict_fn = fst_jax.sparsify(predict_fn, config)
    batches = _batch_indices(len(data.x_train), args.batch_size, args.steps, args.seed)

    n_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))
    say(
        f"{args.model}: width {width}, depth {depth}, {n_params:,} parameters; digits: "
        f"{len(data.x_train)} train / {len(data.x_test)} test, input {data.x_train.shape[1:]}; "
        f"{args.steps} steps of batch {args.batch_size}, AdamW lr {args.lr} ({args.schedule}), "
        f"seed {args.seed}"
    )
    say(f"config: {config}")
    first = batches[0]
    rep = fst_jax.report(loss_fn, config)(
        params, jnp.asarray(data.x_train[first]), jnp.asarray(data.y_train[first])
    )
    flops = {"dense": getattr(rep, "flops_dense", None), "fst": getattr(rep, "flops_fst", None)}
    say(str(rep))

    results: list[RunResult] = []
    for variant, lf, pf in (("dense", loss_fn, predict_fn), ("fst", fst_loss_fn, fst_predict_fn)):
        tx = _make_optimizer(args.lr, args.steps, args.schedule)
        _, result = train_run(
            variant, lf, pf, params, data, batches, tx, eval_every=eval_every, quiet=args.quiet
        )
        results.append(result)

    table = _results_table(results, flops)
    print(table, flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "args": _jsonable(vars(args)),
        "model": {"name": args.model, "width": width, "depth": depth, "num_params": n_params},
        "config": _jsonable(config),
        "data": {
            "name": "sklearn.datasets.load_digits",
            "num_train": len(data.x_train),
            "num_test": len(data.x_test),
            "input_shape": list(data.x_train.shape[1:]),
        },
        "flops_per_step": flops,
        "runs": {
            r.variant: {
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
            for r in results
        },
        "versions": {"jax": jax.__version__, "backend": jax.default_backend()},
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    if _plot_curves(results, out / "curves.png"):
        say(f"wrote {out / 'results.json'} and {out / 'curves.png'}")
    else:
        say(
            f"wrote {out / 'results.json'} "
            "(matplotlib not installed: no curves.png; pip install matplotlib)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
