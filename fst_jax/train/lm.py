"""The main job's language-model setting: ``--dataset text``, the character-level GPT.

:mod:`fst_jax.text`'s :class:`~fst_jax.text.CharGPT` on Python's standard-library sources
(:func:`~fst_jax.text.load_corpus`), trained dense and with FST from the same initialization and
the same batches, as the other data sets are. Text has no test accuracy: the metric is the
validation loss (nats per character) and bits per character of the model FST trained, the 2:4
one — exported with :func:`fst_jax.forward_masks` and :func:`fst_jax.prune_params` and evaluated
with the plain loss (:func:`evaluate_text_pruned`), never the raw master weights.

:func:`train_text` is one run (also what ``benchmarks/lm_study.py`` trains with);
:func:`run_text` is the command's text path: the report, the runs, the table
(:func:`text_table`), ``results.json`` and ``curves.png``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fst_jax
from fst_jax import text
from fst_jax._config import FSTConfig
from fst_jax.train.loop import StepLog
from fst_jax.train.pruned import PrunedModel, mask_parts
from fst_jax.train.stats import mean_std_se

__all__ = ["TextRun", "evaluate_text_pruned", "run_text", "text_summary", "text_table",
           "train_text"]

TEXT_MODEL = "transformer"  # the only --model that applies: the CharGPT
TEXT_WIDTH = 128  # d_model
TEXT_DEPTH = 2  # blocks
TEXT_SEQ_LEN = 64
TEXT_BATCH = 32
TEXT_CHARS = 2_000_000  # corpus length: 1.8 M train / 0.2 M validation characters
EVAL_WINDOWS = 512  # validation windows of seq_len characters (64 Ki characters at 128)

Params = Any


@dataclasses.dataclass
class TextRun(StepLog):
    """What one language-model run (dense or FST) produced: the fields of
    :class:`StepLog` (losses in nats per character; ``pruned``: the 2:4 model
    evaluated with the plain loss by :func:`evaluate_text_pruned`, its ``test_loss`` the validation
    loss, its ``test_accuracy`` NaN: text has none) and the validation curve.

    Attributes:
      val_loss: the validation loss at each of ``eval_steps``, of the model as it trains (for
        FST, the sparsified loss: the 2:4 forward).

    Example:
      >>> from fst_jax.train import TextRun
      >>> round(TextRun("dense", losses=[1.2], val_loss=[1.5]).final()["val_bpc"], 3)
      2.164
    """

    val_loss: list[float] = dataclasses.field(default_factory=list)

    def final(self) -> dict[str, float]:
        """The final metrics: ``val_loss`` and ``val_bpc`` of the model the run trained (for FST
        the exported 2:4 model's), the last batch loss, the median step time (first 5 steps left
        out when there are more) and the compile time."""
        val = self.pruned.test_loss if self.pruned is not None else self.val_loss[-1]
        return {
            "val_loss": val,
            "val_bpc": val / math.log(2),
            "batch_loss": self.losses[-1],
            "median_step_ms": self.median_step_ms(),
            "compile_s": self.compile_s,
        }


def train_text(
    variant: str,
    loss_fn: Callable[..., jax.Array],
    params: Params,
    corpus: text.Corpus,
    tx: optax.GradientTransformation,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    seed: int,
    eval_every: int,
    eval_loss: Callable[..., jax.Array] | None = None,
    eval_windows: int | None = EVAL_WINDOWS,
    fst_key: bool = False,
    quiet: bool = False,
    cache: dict[Any, Any] | None = None,
) -> tuple[Params, TextRun]:
    """Trains ``params`` on ``corpus`` for ``steps`` steps and measures the validation loss.

    Step ``i`` trains on :func:`fst_jax.text.sample_batch` windows drawn with
    ``jax.random.fold_in(jax.random.key(seed), i)``: the same batches for every variant of a seed.
    The step (batch sampling, ``value_and_grad``, the optimizer update) is one ``jax.jit``
    function compiled ahead of time; the validation loss is :func:`fst_jax.text.evaluate` over
    the first ``eval_windows`` windows, at step 0, every ``eval_every`` steps and at the end.

    Args:
      variant: a label for the progress bar and the result.
      loss_fn: ``loss_fn(params, x, y)`` (:func:`fst_jax.text.make_loss`, possibly sparsified).
      params: the initial parameters.
      corpus: the corpus.
      tx: the optimizer.
      steps: the number of steps.
      batch_size: windows per batch.
      seq_len: characters per window.
      seed: the seed of the batch order.
      eval_every: evaluate every this many steps.
      eval_loss: the loss to evaluate with (default ``loss_fn``; a rotating-pattern FST loss
        needs one with ``fst_key`` bound, which the forward product does not use).
      eval_windows: validation windows per evaluation (``None``: all).
      fst_key: pass the step number (traced) to ``loss_fn`` as ``fst_key=``.
      quiet: no progress bar.
      cache: a dict keeping the compiled step for the next call with the same ``loss_fn``,
        ``tx`` and shapes (another seed).

    Returns:
      The trained parameters and the :class:`TextRun`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from fst_jax import text
      >>> from fst_jax.train.lm import train_text
      >>> corpus = text.load_corpus(num_chars=100_000)
      >>> model = text.CharGPT(d_model=16, num_heads=2, seq_len=16)
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
      >>> _, run = train_text("dense", text.make_loss(model), params, corpus, optax.adam(1e-2),
      ...                     steps=4, batch_size=8, seq_len=16, seed=0, eval_every=2,
      ...                     eval_windows=8, quiet=True)
      >>> run.eval_steps, len(run.losses), run.val_loss[-1] < run.val_loss[0]
      ([0, 2, 4], 4, True)
    """
    from tqdm import tqdm

    eval_loss = loss_fn if eval_loss is None else eval_loss
    batch_key = jax.random.key(seed)

    def step(p: Params, opt_state: Any, ids: jax.Array, bkey: jax.Array,
             i: jax.Array) -> tuple[Params, Any, jax.Array]:
        x, y = text.sample_batch(ids, jax.random.fold_in(bkey, i), batch_size, seq_len)
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y, **({"fst_key": i} if fst_key else {}))
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    ids = jnp.asarray(corpus.train)
    opt_state = tx.init(params)
    result = TextRun(variant=variant)
    key = (loss_fn, tx.init, tx.update, fst_key, batch_size, seq_len, ids.shape,
           jax.tree_util.tree_structure(params),
           tuple((leaf.shape, str(leaf.dtype)) for leaf in jax.tree_util.tree_leaves(params)))
    if cache is not None and key in cache:
        step_c = cache[key]
    else:
        t0 = time.perf_counter()
        step_c = jax.jit(step).lower(params, opt_state, ids, batch_key, jnp.int32(0)).compile()
        result.compile_s = time.perf_counter() - t0
        if cache is not None:
            cache[key] = step_c

    def do_eval(at: int, p: Params) -> None:
        result.eval_steps.append(at)
        result.val_loss.append(text.evaluate(eval_loss, p, corpus.val, seq_len=seq_len,
                                             max_windows=eval_windows)["loss"])

    do_eval(0, params)
    bar = tqdm(total=steps, desc=f"{variant:>5}", disable=quiet, file=sys.stderr, dynamic_ncols=True)
    with bar:
        for i in range(steps):
            t = time.perf_counter()
            params, opt_state, loss = step_c(params, opt_state, ids, batch_key, jnp.int32(i))
            loss.block_until_ready()
            result.step_times_ms.append(1e3 * (time.perf_counter() - t))
            result.loss_steps.append(i + 1)
            result.losses.append(float(loss))
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}", refresh=False)
            if (i + 1) % eval_every == 0 or i + 1 == steps:
                do_eval(i + 1, params)
                if not quiet:
                    bar.write(f"[{variant}] step {i + 1:>5}  batch loss {result.losses[-1]:.4f}  "
                              f"val loss {result.val_loss[-1]:.4f}  "
                              f"({result.val_loss[-1] / math.log(2):.3f} bits/char)")
    return params, result


def evaluate_text_pruned(
    loss_fn: Callable[..., jax.Array],
    config: FSTConfig | None,
    params: Params,
    corpus: text.Corpus,
    *,
    seq_len: int,
    eval_windows: int | None = EVAL_WINDOWS,
) -> PrunedModel:
    """Exports the 2:4 model of FST-trained ``params`` and evaluates it with the plain loss.

    ``masks = fst_jax.forward_masks(loss_fn, config)(params, x, y)`` (shapes only; a rotating
    config gets ``fst_key=0``: the forward product does not use the draw),
    ``fst_jax.prune_params(params, masks)``, then :func:`fst_jax.text.evaluate` of the *dense*
    ``loss_fn`` on the pruned parameters over the validation windows (``test_loss``) and as many
    training windows (``train_loss``).

    Args:
      loss_fn: the loss before :func:`fst_jax.sparsify` (:func:`fst_jax.text.make_loss`).
      config: the config the FST run trained with (``None``: the default).
      params: the trained parameters.
      corpus: the corpus.
      seq_len: characters per window.
      eval_windows: windows to evaluate (``None``: all).

    Returns:
      A :class:`PrunedModel` with ``test_loss`` the validation loss in nats per character and
      ``test_accuracy`` NaN.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fst_jax import text
      >>> from fst_jax.train.lm import evaluate_text_pruned
      >>> corpus = text.load_corpus(num_chars=100_000)
      >>> model = text.CharGPT(d_model=16, num_heads=2, seq_len=16)
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
      >>> m = evaluate_text_pruned(text.make_loss(model), None, params, corpus, seq_len=16,
      ...                          eval_windows=8)
      >>> m.kept / m.total, m.not_exportable
      (0.5, {})
    """
    config = FSTConfig() if config is None else config
    shape = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    masks = fst_jax.forward_masks(loss_fn, config)(
        params, shape, shape, **({"fst_key": 0} if config.needs_fst_key else {}))
    pruned = fst_jax.prune_params(params, masks)
    val = text.evaluate(loss_fn, pruned, corpus.val, seq_len=seq_len, max_windows=eval_windows)
    train = text.evaluate(loss_fn, pruned, corpus.train, seq_len=seq_len, max_windows=eval_windows)
    return PrunedModel(train_loss=train["loss"], test_loss=val["loss"], test_accuracy=float("nan"),
                       **mask_parts(params, masks))


def _pm(stats: dict[str, Any], digits: int = 4) -> str:
    if stats["std"] is None:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['stderr']:.{digits}f}"


def text_summary(per_seed: Sequence[tuple[int, dict[str, TextRun]]]) -> dict[str, Any]:
    """Validation loss and bits/char per variant over seeds, and the paired difference FST − dense.

    Args:
      per_seed: ``(seed, {variant: TextRun})`` per seed.

    Returns:
      ``{"val_loss": {variant: mean_std_se}, "val_bpc": {...}, "paired_difference": mean_std_se
      of fst − dense val loss, "gap_percent": its mean as % of dense's mean}`` (the last two
      only when both variants ran).

    Example:
      >>> from fst_jax.train.lm import TextRun, text_summary
      >>> run = lambda v, loss: TextRun(v, losses=[loss], val_loss=[loss])
      >>> s = text_summary([(0, {"dense": run("dense", 2.0), "fst": run("fst", 2.1)})])
      >>> round(s["gap_percent"], 6)
      5.0
    """
    variants = list(per_seed[0][1])
    out: dict[str, Any] = {
        metric: {v: mean_std_se([runs[v].final()[metric] for _, runs in per_seed]) for v in variants}
        for metric in ("val_loss", "val_bpc")
    }
    if "dense" in variants and "fst" in variants:
        diffs = [runs["fst"].final()["val_loss"] - runs["dense"].final()["val_loss"]
                 for _, runs in per_seed]
        out["paired_difference"] = mean_std_se(diffs)
        out["gap_percent"] = 100 * out["paired_difference"]["mean"] / out["val_loss"]["dense"]["mean"]
    return out


def text_table(per_seed: Sequence[tuple[int, dict[str, TextRun]]], flops: dict[str, Any]) -> str:
    """The results table of ``--dataset text``.

    One row per variant and seed (last batch loss, validation loss and bits per character of
    the model the run trained — for FST the exported 2:4 model — median step time, compile time,
    matmul FLOPs per step), then the means over seeds (± standard error), the paired difference
    and the gap to dense in %, and what the 2:4 model pruned.

    Args:
      per_seed: ``(seed, {variant: TextRun})`` per seed.
      flops: matmul FLOPs per step by variant (``None``: unknown).

    Returns:
      The table, lines joined with ``"\\n"``.

    Example:
      >>> from fst_jax.train.lm import TextRun, text_table
      >>> run = lambda v, loss: TextRun(v, losses=[loss], val_loss=[loss])
      >>> print(text_table([(0, {"dense": run("dense", 2.0), "fst": run("fst", 2.1)})], {}))
      variant  seed  last batch loss  val loss  val bits/char  median step (ms)  compile (s)  matmul FLOPs/step
      ---------------------------------------------------------------------------------------------------------
      dense       0           2.0000    2.0000         2.8854               nan         0.00                n/a
      fst         0           2.1000    2.1000         3.0297               nan         0.00                n/a
      validation loss over 1 seed: dense 2.0000, fst 2.1000
      bits per character: dense 2.8854, fst 3.0297
      paired difference fst − dense: +0.1000 nats/char (+5.00 % of dense)
    """
    from fst_jax.train.stats import _fmt_flops

    header = ("variant", "seed", "last batch loss", "val loss", "val bits/char",
              "median step (ms)", "compile (s)", "matmul FLOPs/step")
    rows = [header]
    for variant in per_seed[0][1]:
        for seed, runs in per_seed:
            f = runs[variant].final()
            rows.append((variant, str(seed), f"{f['batch_loss']:.4f}", f"{f['val_loss']:.4f}",
                         f"{f['val_bpc']:.4f}", f"{f['median_step_ms']:.1f}",
                         f"{f['compile_s']:.2f}", _fmt_flops(flops.get(variant))))
    widths = [max(len(row[j]) for row in rows) for j in range(len(header))]
    lines = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    if flops.get("dense") and flops.get("fst") is not None:
        lines.append(f"FST/dense FLOPs per step: {flops['fst'] / flops['dense']:.3f}")
    s = text_summary(per_seed)
    n = len(per_seed)
    spread = " (mean ± standard error)" if n > 1 else ""
    lines.append(f"validation loss over {n} seed{'s' if n > 1 else ''}{spread}: "
                 + ", ".join(f"{v} {_pm(st)}" for v, st in s["val_loss"].items()))
    lines.append("bits per character: " + ", ".join(f"{v} {_pm(st)}" for v, st in s["val_bpc"].items()))
    if "paired_difference" in s:
        d = s["paired_difference"]
        se = f" ± {d['stderr']:.4f}" if d["stderr"] is not None else ""
        lines.append(f"paired difference fst − dense: {d['mean']:+.4f}{se} nats/char "
                     f"({s['gap_percent']:+.2f} % of dense)")
    pruned = [(seed, runs["fst"]) for seed, runs in per_seed if runs.get("fst") and runs["fst"].pruned]
    if pruned:
        worst = max(abs(r.pruned.test_loss - r.val_loss[-1]) for _, r in pruned)
        lines.append("fst's val loss is its 2:4 model's (fst_jax.forward_masks + prune_params, plain "
                     f"loss); the sparsified loss agrees within {worst:.1e}")
        lines.append(f"2:4 model: {pruned[0][1].pruned.summary()}")
    return "\n".join(lines)


def run_text(args: Any, config: FSTConfig, error: Callable[[str], Any]) -> int:
    """``fst-jax train --dataset text``: dense and FST char-level GPTs, side by side.

    Called by :func:`fst_jax.train.main` with its parsed arguments. ``--width`` is ``d_model``,
    ``--depth`` the number of blocks, ``--seq-len`` the context; ``--model`` must be
    ``transformer`` (or left out). Prints the FST report, a progress bar per run and
    :func:`text_table`; writes ``DIR/results.json`` and, with matplotlib, ``DIR/curves.png``.

    Args:
      args: the parsed arguments of :func:`fst_jax.train.build_parser`.
      config: the FST config from ``--config``.
      error: called with a message for an invalid argument (``parser.error``: exits with 2).

    Returns:
      0.

    Example:
      >>> import contextlib, io, json, tempfile
      >>> from pathlib import Path
      >>> from fst_jax.train import main
      >>> out = tempfile.mkdtemp()
      >>> with contextlib.redirect_stdout(io.StringIO()):
      ...     status = main(["--dataset", "text", "--steps", "2", "--width", "16", "--depth", "1",
      ...                    "--seq-len", "16", "--batch-size", "4", "--quiet", "--out", out])
      >>> r = json.loads((Path(out) / "results.json").read_text())
      >>> status, r["data"]["name"], sorted(r["summary"]["val_loss"])
      (0, 'text', ['dense', 'fst'])
    """
    from fst_jax.train.loop import DEFAULT_LR, make_optimizer
    from fst_jax.train.plots import plot_text_curves

    if args.model not in (None, TEXT_MODEL):
        error(f"argument --model: --dataset text trains the character-level GPT (fst_jax.text."
              f"CharGPT); use --model {TEXT_MODEL} or leave --model out, got {args.model!r}")
    width = TEXT_WIDTH if args.width is None else args.width
    depth = TEXT_DEPTH if args.depth is None else args.depth
    seq_len = TEXT_SEQ_LEN if args.seq_len is None else args.seq_len
    batch_size = TEXT_BATCH if args.batch_size is None else args.batch_size
    heads = 4 if width % 4 == 0 else 2 if width % 2 == 0 else 1
    corpus = text.load_corpus(num_chars=TEXT_CHARS)
    if seq_len + 1 > len(corpus.val):
        error(f"argument --seq-len: at most {len(corpus.val) - 1} (the validation split), got {seq_len}")
    steps = args.steps
    eval_every = args.eval_every if args.eval_every is not None else max(1, steps // 10)
    seeds = [args.seed + i for i in range(args.seeds)]
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))

    model = text.CharGPT(d_model=width, num_heads=heads, num_layers=depth, seq_len=seq_len)
    loss = text.make_loss(model)
    fst_loss = fst_jax.sparsify(loss, config)
    rotating = config.needs_fst_key
    fst_eval = functools.partial(fst_loss, fst_key=0) if rotating else fst_loss
    tx = make_optimizer(args.optimizer, lr, steps, args.schedule)
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, seq_len), jnp.int32))["params"])
    params = init(jax.random.key(seeds[0]))
    n_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))
    say(f"char-level GPT: d_model {width}, {depth} blocks, {heads} heads, {seq_len} tokens, "
        f"{n_params:,} parameters; text: Python {corpus.python} standard library, "
        f"{len(corpus.train):,} train / {len(corpus.val):,} validation characters "
        f"(corpus {corpus.fingerprint}); {steps} steps of batch {batch_size}, {args.optimizer} lr {lr} "
        f"({args.schedule}), seeds {seeds[0]}..{seeds[-1]}")
    say(f"config: {config}")
    x, y = text.sample_batch(corpus.train, jax.random.key(seeds[0]), batch_size, seq_len)
    rep = fst_jax.report(loss, config)(params, x, y, **({"fst_key": 0} if rotating else {}))
    flops = {"dense": getattr(rep, "flops_dense", None), "fst": getattr(rep, "flops_fst", None)}
    say(str(rep))

    caches: dict[str, dict[Any, Any]] = {"dense": {}, "fst": {}}
    per_seed: list[tuple[int, dict[str, TextRun]]] = []
    for seed in seeds:
        if seed != seeds[0]:
            params = init(jax.random.key(seed))
            say(f"seed {seed}")
        runs: dict[str, TextRun] = {}
        for variant, lf, ef in (("dense", loss, loss), ("fst", fst_loss, fst_eval)):
            trained, runs[variant] = train_text(
                variant, lf, params, corpus, tx, steps=steps, batch_size=batch_size,
                seq_len=seq_len, seed=seed, eval_every=eval_every, eval_loss=ef,
                fst_key=rotating and variant == "fst", quiet=args.quiet, cache=caches[variant])
        runs["fst"].pruned = evaluate_text_pruned(loss, config, trained, corpus, seq_len=seq_len)
        per_seed.append((seed, runs))
    print(text_table(per_seed, flops), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": {"name": "CharGPT", "d_model": width, "depth": depth, "heads": heads,
                  "seq_len": seq_len, "num_params": n_params},
        "optimizer": {"name": args.optimizer, "lr": lr, "schedule": args.schedule},
        "config": str(config),
        "data": {"name": "text", "source": corpus.source, "python": corpus.python,
                 "fingerprint": corpus.fingerprint, "num_train": len(corpus.train),
                 "num_val": len(corpus.val), "eval_windows": EVAL_WINDOWS},
        "flops_per_step": flops,
        "seeds": seeds,
        "per_seed": [{"seed": seed, "runs": {
            v: {**dataclasses.asdict(dataclasses.replace(r, pruned=None)), "final": r.final(),
                "pruned": None if r.pruned is None else {
                    "val_loss": r.pruned.test_loss, "train_loss": r.pruned.train_loss,
                    "summary": r.pruned.summary(), "pruned": list(r.pruned.pruned)}}
            for v, r in runs.items()}} for seed, runs in per_seed],
        "summary": text_summary(per_seed),
        "versions": {"jax": jax.__version__, "backend": jax.default_backend()},
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    if plot_text_curves(per_seed, out / "curves.png"):
        say(f"wrote {out / 'results.json'} and {out / 'curves.png'}")
    else:
        say(f"wrote {out / 'results.json'} (matplotlib not installed: no curves.png)")
    return 0
