"""The main job's training loop: the optimizer, one training run, and what a run produced.

:func:`train_run` trains one variant (dense, or FST through :func:`fst_jax.sparsify`) with one
jitted, ahead-of-time compiled train step and evaluates it on the whole training and test sets
every ``eval_every`` steps; :class:`RunResult` holds its curves and final metrics, and
:class:`SeedResult` the dense and FST runs of one seed.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fst_jax.train.data import Dataset, _allowed

if TYPE_CHECKING:
    from fst_jax.train.pruned import PrunedModel

__all__ = [
    "DEFAULT_LR",
    "OPTIMIZERS",
    "SCHEDULES",
    "RunResult",
    "SeedResult",
    "StepLog",
    "make_optimizer",
    "train_run",
]

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
DEFAULT_LR = {"adamw": 1e-3, "sgd": 0.1}
SGD_MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4

Params = Any
LossFn = Callable[[Params, jax.Array, jax.Array], jax.Array]
PredictFn = Callable[[Params, jax.Array], jax.Array]
EvalFn = Callable[[Params, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


@dataclasses.dataclass
class StepLog:
    """What every training run records step by step (the fields :class:`RunResult` and
    :class:`TextRun` share).

    Attributes:
      variant: ``"dense"`` or ``"fst"``.
      loss_steps: the step number of each entry of ``losses`` (1-based: the loss of the batch
        the ``step``-th update was computed on).
      losses: the training-batch loss of every step.
      eval_steps: the steps at which the model was evaluated (0 = at initialization).
      step_times_ms: the wall time of each step, ``block_until_ready`` included.
      compile_s: the time to trace and compile the train step (0 when reused from a cache).
      pruned: for an FST run, the 2:4 model it trained, exported and evaluated without FST
        (:class:`~fst_jax.train.PrunedModel`); ``None`` otherwise.

    Example:
      >>> from fst_jax.train import StepLog
      >>> StepLog("dense", step_times_ms=[9.0, 1.0, 2.0, 3.0]).median_step_ms(warmup=1)
      2.0
    """

    variant: str
    loss_steps: list[int] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)
    eval_steps: list[int] = dataclasses.field(default_factory=list)
    step_times_ms: list[float] = dataclasses.field(default_factory=list)
    compile_s: float = 0.0
    pruned: PrunedModel | None = None

    def median_step_ms(self, warmup: int = 5) -> float:
        """The median step time in ms, without the first ``warmup`` steps (if there are more)."""
        times = (
            self.step_times_ms[warmup:] if len(self.step_times_ms) > warmup else self.step_times_ms
        )
        return statistics.median(times) if times else float("nan")


@dataclasses.dataclass
class RunResult(StepLog):
    """What one training run (dense or FST) of an image classifier produced: the fields of
    :class:`StepLog` and the evaluations.

    Attributes:
      train_loss: the loss on the whole training set at each of ``eval_steps``.
      test_loss: the loss on the test set at each evaluation step.
      test_accuracy: the test accuracy at each evaluation step.

    Example:
      >>> from fst_jax.train import RunResult
      >>> RunResult("dense", train_loss=[0.4], test_loss=[0.5], test_accuracy=[0.9]).final()["test_accuracy"]
      0.9
    """

    train_loss: list[float] = dataclasses.field(default_factory=list)
    test_loss: list[float] = dataclasses.field(default_factory=list)
    test_accuracy: list[float] = dataclasses.field(default_factory=list)

    def final(self) -> dict[str, float]:
        """The final metrics: train-set loss, test loss/accuracy, median step ms, compile s; with
        :attr:`pruned`, also ``pruned_test_accuracy`` (the exported 2:4 model's)."""
        out = {
            "train_loss": self.train_loss[-1],
            "test_loss": self.test_loss[-1],
            "test_accuracy": self.test_accuracy[-1],
            "median_step_ms": self.median_step_ms(),
            "compile_s": self.compile_s,
        }
        if self.pruned is not None:
            out["pruned_test_accuracy"] = self.pruned.test_accuracy
        return out


@dataclasses.dataclass
class SeedResult:
    """The dense and FST runs of one seed (same initialization, same batch order).

    Attributes:
      seed: the seed of the initialization and of the batch order.
      runs: the :class:`RunResult` of each variant, by variant name (``"dense"``, ``"fst"``).
    """

    seed: int
    runs: dict[str, RunResult]


def _eval_fn(predict_fn: PredictFn, n_train: int) -> EvalFn:
    """``evaluate(params, x_all, y_all) -> (train loss, test loss, test accuracy)``, to be jitted.

    ``x_all``/``y_all`` are the training set followed by the test set: one forward pass over both
    (one compilation instead of two); the first ``n_train`` rows are the training set.
    """

    def evaluate(p: Params, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        # One forward pass over train + test together: one compilation instead of two.
        logits = predict_fn(p, x)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = (jnp.argmax(logits[n_train:], axis=-1) == y[n_train:]).astype(jnp.float32)
        return jnp.mean(losses[:n_train]), jnp.mean(losses[n_train:]), jnp.mean(correct)

    return evaluate


def _all_examples(data: Dataset) -> tuple[jax.Array, jax.Array]:
    """The training set followed by the test set, on device: what :func:`_eval_fn` evaluates."""
    x_all = jnp.asarray(np.concatenate([data.x_train, data.x_test]))
    y_all = jnp.asarray(np.concatenate([data.y_train, data.y_test]))
    return x_all, y_all


def make_optimizer(
    name: str, lr: float, steps: int, schedule: str = "cosine"
) -> optax.GradientTransformation:
    """The optimizer of ``--optimizer``, with a constant or warm-up + cosine learning rate.

    * ``"adamw"``: ``optax.adamw`` with decoupled weight decay ``1e-4``.
    * ``"sgd"``: SGD with heavy-ball momentum 0.9 and L2 weight decay ``1e-4`` added to the
      gradient (``optax.add_decayed_weights`` then ``optax.sgd``, as PyTorch's SGD does it).

    The ``"cosine"`` schedule warms up linearly over the first 5% of the steps (none when that
    is 0 steps), then decays to 1% of ``lr`` at ``steps``.

    Args:
      name: ``"adamw"`` or ``"sgd"``.
      lr: the peak learning rate.
      steps: the number of training steps (the length of the schedule).
      schedule: ``"cosine"`` or ``"constant"``.

    Returns:
      The optax transformation.

    Raises:
      ValueError: an unknown optimizer or schedule.

    Example:
      >>> import jax.numpy as jnp
      >>> from fst_jax.train import make_optimizer
      >>> tx = make_optimizer("sgd", 0.5, steps=100, schedule="constant")
      >>> updates, _ = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.zeros(2)}), {"w": jnp.zeros(2)})
      >>> print(updates["w"])
      [-0.5 -0.5]
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r} is not valid; allowed values: {_allowed(OPTIMIZERS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not valid; allowed values: {_allowed(SCHEDULES)}")
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
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(WEIGHT_DECAY),
            optax.sgd(learning_rate, momentum=SGD_MOMENTUM),
        )
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
    cache: dict[Any, Any] | None = None,
    fst_key: bool = False,
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
      cache: a dict to keep the compiled step and evaluation in, for the next call with the same
        ``loss_fn``, ``predict_fn`` and ``tx`` objects and the same shapes (another seed); such a
        call reports ``compile_s = 0.0``.
      fst_key: pass the step number (0-based, traced) to ``loss_fn`` as ``fst_key=``: what a
        sparsified loss with a rotating pattern (``FSTConfig(pattern="rotating")``) draws from.

    Returns:
      The trained parameters and the :class:`RunResult`.

    Example:
      >>> import optax
      >>> from fst_jax.train import batch_indices, init_model, load_digits_dataset, make_optimizer, train_run
      >>> data = load_digits_dataset("mlp")
      >>> params, predict = init_model("mlp", 16, 1, data.x_train, seed=0)
      >>> def loss(p, x, y):
      ...     return optax.softmax_cross_entropy_with_integer_labels(predict(p, x), y).mean()
      >>> batches = batch_indices(len(data.x_train), 64, steps=4, seed=0)
      >>> _, run = train_run("dense", loss, predict, params, data, batches,
      ...                    make_optimizer("adamw", 1e-2, 4), eval_every=2, quiet=True)
      >>> run.eval_steps, len(run.losses), run.train_loss[-1] < run.train_loss[0]
      ([0, 2, 4], 4, True)
    """
    from tqdm import tqdm

    steps = len(batches)

    def step(
        p: Params, opt_state: Any, x: jax.Array, y: jax.Array, idx: jax.Array, i: jax.Array
    ) -> tuple[Params, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(
            p, jnp.take(x, idx, axis=0), jnp.take(y, idx, axis=0), **({"fst_key": i} if fst_key else {})
        )
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    n_train = len(data.x_train)
    evaluate = _eval_fn(predict_fn, n_train)
    x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    x_all, y_all = _all_examples(data)
    idx_rows = [jnp.asarray(b) for b in batches]  # on device before the timed loop
    step_nums = [jnp.int32(i) for i in range(steps)]
    opt_state = tx.init(params)
    result = RunResult(variant=variant)

    key = (
        loss_fn,
        predict_fn,
        tx.init,
        tx.update,
        n_train,
        jax.tree_util.tree_structure(params),
        tuple((leaf.shape, str(leaf.dtype)) for leaf in jax.tree_util.tree_leaves(params)),
        x_all.shape,
        str(x_all.dtype),
        batches.shape,
    )
    if cache is not None and key in cache:
        step_c, eval_c = cache[key]
    else:
        t0 = time.perf_counter()
        step_c = jax.jit(step).lower(params, opt_state, x_train, y_train, idx_rows[0], step_nums[0]).compile()
        result.compile_s = time.perf_counter() - t0
        eval_c = jax.jit(evaluate)
        if cache is not None:
            cache[key] = (step_c, eval_c)

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
            params, opt_state, loss = step_c(params, opt_state, x_train, y_train, idx_rows[i], step_nums[i])
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
