"""The accuracy study's language model: fixed vs rotating patterns vs MVUE on a char-level GPT.

Run from the repository root::

    python -m benchmarks.lm_study                          # 3 paired seeds; appends to RESULTS.md
    python -m benchmarks.lm_study --seeds 0 1 --variants dense fixed --no-append   # a share of it
    python -m benchmarks.lm_study --quick --no-append      # smoke run: tiny model, 1 seed

:mod:`fst_jax.text`'s :class:`~fst_jax.text.CharGPT` (2 layers, d_model 256, 4 heads, 128 tokens)
on Python's standard-library sources (:func:`~fst_jax.text.load_corpus`, 2 M characters, the last
10 % held out), AdamW (lr 1e-3, weight decay 1e-4, 5 % warm-up then cosine, as
:func:`fst_jax.train.make_optimizer`), trained with :func:`fst_jax.train.lm.train_text`:

* ``dense``;
* ``fixed``: FST, ``FSTConfig()`` (the fixed checkerboard grad-weight mask);
* ``rotating``: FST, ``FSTConfig(pattern="rotating")`` (the authors' four patterns, drawn per layer
  and per step from ``fst_key`` = the step number);
* ``rotating_ceo``: FST, ``FSTConfig(pattern=("checkerboard", "even", "odd"))``.
* ``odd``: FST, ``FSTConfig(pattern="odd")`` (a fixed mask on the odd tokens, faster in compact mode);
* ``gw_dense``: FST with a dense grad-weight product (``grad_weight="dense"``): what the forward and
  grad-input products cost alone;
* ``mvue``: FST, ``FSTConfig(grad_weight="mvue")`` (the grad-weight product on the minimum-variance
  unbiased 2:4 sample of ``dY`` along the tokens, keyed by the step number; no fixed token mask);
* ``fwd_only``: FST forward product alone (``grad_input="dense", grad_weight="dense"``): with
  ``gw_dense``, splits the forward and grad-input products' share of the gap;
* ``transposable``: one transposable mask (2:4 along both ``K`` and ``O``) for the forward and
  grad-input products, the fixed checkerboard grad-weight;
* ``transposable_mvue``: one transposable mask (2:4 along both ``K`` and ``O``) for the forward and
  grad-input products, so the grad-input product uses the forward's weight exactly (no second
  pruning), and the mvue grad-weight.

Every variant of a seed starts from the same initialization (``jax.random.key(seed)``) and sees the
same batches. The metric is the validation loss (nats per character) and bits per character of the
model each run trained — for FST the 2:4 model exported with ``fst_jax.forward_masks`` +
``prune_params`` and evaluated with the plain loss — over the first :data:`EVAL_WINDOWS` validation
windows. The table gives mean ± standard error over seeds and the paired gap to dense in % (± its
standard error). Target (issue 14): within 2 % of dense.

Each finished run is written to ``OUT/runs/<variant>_s<seed>_<settings hash>.json``; a later
invocation with the same settings reads it back instead of retraining, so the study can be split
over processes (``--seeds``, ``--variants``) and resumed. Unless ``--quick`` or ``--no-append``,
the table is appended to ``benchmarks/RESULTS.md`` with the command, date and machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

import fst_jax
from fst_jax import text
from fst_jax.train import make_optimizer, mean_std_se
from fst_jax.train.lm import evaluate_text_pruned, train_text

from benchmarks.run import _loadavg, append_section, machine_info, machine_lines, md_table

VARIANTS: dict[str, tuple[str, fst_jax.FSTConfig | None]] = {
    "dense": ("dense", None),
    "fixed": ("FST, fixed checkerboard (`FSTConfig()`)", fst_jax.FSTConfig()),
    "rotating": ("FST, rotating: the authors' 4 patterns (`pattern=\"rotating\"`)",
                 fst_jax.FSTConfig(pattern="rotating")),
    "rotating_ceo": ("FST, rotating over (checkerboard, even, odd)",
                     fst_jax.FSTConfig(pattern=("checkerboard", "even", "odd"))),
    "odd": ("FST, fixed `pattern=\"odd\"` (odd tokens: one half GEMM in compact mode)",
            fst_jax.FSTConfig(pattern="odd")),
    "gw_dense": ("FST forward + grad-input only (`grad_weight=\"dense\"`)",
                 fst_jax.FSTConfig(grad_weight="dense")),
    "mvue": ("FST, grad-weight by the unbiased 2:4 sample of dY (`grad_weight=\"mvue\"`)",
             fst_jax.FSTConfig(grad_weight="mvue")),
    "fwd_only": ("FST forward only (`grad_input=\"dense\", grad_weight=\"dense\"`)",
                 fst_jax.FSTConfig(grad_input="dense", grad_weight="dense")),
    "transposable": ("FST, one transposable mask for forward and grad-input (`grad_input=\"transposable\"`)",
                     fst_jax.FSTConfig(grad_input="transposable")),
    "transposable_mvue": ("FST, one transposable mask for forward and grad-input, mvue grad-weight "
                          "(`grad_input=\"transposable\", grad_weight=\"mvue\"`)",
                          fst_jax.FSTConfig(grad_input="transposable", grad_weight="mvue")),
}
EVAL_WINDOWS = 512  # 512 windows of 128 characters: 64 Ki validation characters
FULL = {"steps": 600, "batch_size": 16, "d_model": 256, "layers": 2, "heads": 4, "seq_len": 128,
        "lr": 1e-3, "num_chars": 2_000_000, "eval_windows": EVAL_WINDOWS}
QUICK = {"steps": 6, "batch_size": 4, "d_model": 32, "layers": 1, "heads": 2, "seq_len": 16,
         "lr": 3e-3, "num_chars": 100_000, "eval_windows": 8}
TARGET_PERCENT = 2.0


def run_one(variant: str, seed: int, settings: dict[str, Any], *, quiet: bool = True) -> dict[str, Any]:
    """Trains one variant for one seed and evaluates the model it trained.

    Args:
      variant: a key of :data:`VARIANTS`.
      seed: the seed of the initialization and of the batches.
      settings: :data:`FULL`, :data:`QUICK` or the like.
      quiet: no progress bar.

    Returns:
      ``{"variant", "seed", "val_loss", "val_bpc", "val_loss_curve", "eval_steps", "final_batch_loss",
      "median_step_ms", "wall_s", "pruned"}``; for FST runs ``val_loss`` is the 2:4 model's and
      ``pruned`` says what it pruned (``None`` for dense).

    Example:
      >>> from benchmarks.lm_study import QUICK, run_one
      >>> r = run_one("rotating", 0, QUICK)
      >>> r["val_bpc"] > 0, r["pruned"]["not_exportable"]
      (True, {})
    """
    s = settings
    t0 = time.perf_counter()
    corpus = text.load_corpus(num_chars=s["num_chars"])
    model = text.CharGPT(d_model=s["d_model"], num_layers=s["layers"], num_heads=s["heads"],
                         seq_len=s["seq_len"])
    params = model.init(jax.random.key(seed), jnp.zeros((1, s["seq_len"]), jnp.int32))["params"]
    loss = text.make_loss(model)
    config = VARIANTS[variant][1]
    rotating = config is not None and config.needs_fst_key
    train_loss = loss if config is None else fst_jax.sparsify(loss, config)
    eval_loss = (lambda p, x, y: train_loss(p, x, y, fst_key=0)) if rotating else train_loss
    tx = make_optimizer("adamw", s["lr"], s["steps"])
    trained, run = train_text(
        variant, train_loss, params, corpus, tx, steps=s["steps"], batch_size=s["batch_size"],
        seq_len=s["seq_len"], seed=seed, eval_every=max(1, s["steps"] // 4), eval_loss=eval_loss,
        eval_windows=s["eval_windows"], fst_key=rotating, quiet=quiet)
    pruned = None
    if config is not None:
        run.pruned = evaluate_text_pruned(loss, config, trained, corpus, seq_len=s["seq_len"],
                                          eval_windows=s["eval_windows"])
        pruned = {"summary": run.pruned.summary(), "not_exportable": dict(run.pruned.not_exportable),
                  "sparsified_val_loss": run.val_loss[-1]}
    final = run.final()
    return {"variant": variant, "seed": seed, "val_loss": final["val_loss"], "val_bpc": final["val_bpc"],
            "eval_steps": run.eval_steps, "val_loss_curve": run.val_loss,
            "final_batch_loss": final["batch_loss"], "median_step_ms": final["median_step_ms"],
            "wall_s": time.perf_counter() - t0, "pruned": pruned,
            "corpus": text.load_corpus(num_chars=s["num_chars"]).fingerprint}


def _run_path(out: Path, variant: str, seed: int, settings: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return out / "runs" / f"{variant}_s{seed}_{digest}.json"


def study_table(results: Sequence[dict[str, Any]]) -> str:
    """The markdown table: per variant, 2:4-model validation loss and bits/char (mean ± SE over
    seeds), the paired gap to dense in % (mean ± SE), and in how many seeds it beat dense.

    Args:
      results: :func:`run_one` results (any variants and seeds; dense needed for the gap).

    Returns:
      The markdown table.

    Example:
      >>> from benchmarks.lm_study import study_table
      >>> rs = [{"variant": v, "seed": s, "val_loss": l, "val_bpc": l / 0.693}
      ...       for v, s, l in [("dense", 0, 2.0), ("dense", 1, 2.2), ("fixed", 0, 2.1), ("fixed", 1, 2.2)]]
      >>> print(study_table(rs).splitlines()[-1])
      | FST, fixed checkerboard (`FSTConfig()`) | 2 | 2.1500 ± 0.0500 | 3.1025 ± 0.0722 | +2.50 ± 2.50 | 0/2 |
    """
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results:
        by.setdefault(r["variant"], {})[r["seed"]] = r
    dense = by.get("dense", {})
    rows = []
    for variant in [v for v in VARIANTS if v in by]:
        runs = by[variant]
        seeds = sorted(runs)

        def pm(values: list[float], sign: str = "") -> str:
            st = mean_std_se(values)
            digits = ".2f" if sign else ".4f"
            se = f" ± {st['stderr']:{digits}}" if st["stderr"] is not None else ""
            return f"{st['mean']:{sign}{digits}}" + se

        loss = pm([runs[s]["val_loss"] for s in seeds])
        bpc = pm([runs[s]["val_bpc"] for s in seeds])
        paired = [s for s in seeds if s in dense]
        if variant == "dense" or not paired:
            gap, ahead = "—", "—"
        else:
            gaps = [100 * (runs[s]["val_loss"] / dense[s]["val_loss"] - 1) for s in paired]
            gap = pm(gaps, "+")
            ahead = f"{sum(g < 0 for g in gaps)}/{len(gaps)}"
        rows.append((VARIANTS[variant][0], len(seeds), loss, bpc, gap, ahead))
    return md_table(("setting", "seeds", "val loss (nats/char)", "bits/char", "gap to dense (%)",
                     "ahead of dense"), rows)


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``python -m benchmarks.lm_study``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.lm_study", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="paired seeds (default: 0 1 2; 0 with --quick)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=None, help=f"AdamW steps (default {FULL['steps']})")
    p.add_argument("--batch-size", type=int, default=None, help=f"default {FULL['batch_size']}")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/lm_study"))
    p.add_argument("--quick", action="store_true", help="smoke run: a tiny model, a few steps")
    p.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    p.add_argument("--fresh", action="store_true", help="retrain runs found under --out/runs")
    p.add_argument("--progress", action="store_true", help="a progress bar per run")
    p.add_argument("--note", action="append", default=[], help="a line added to the RESULTS.md section")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs (or reads back) every variant × seed, prints the table and appends it to RESULTS.md.

    Args:
      argv: the arguments (``None``: ``sys.argv[1:]``).

    Returns:
      0.

    Example:
      >>> import contextlib, io, tempfile
      >>> from benchmarks.lm_study import main
      >>> buf = io.StringIO()
      >>> with contextlib.redirect_stdout(buf):
      ...     status = main(["--quick", "--no-append", "--variants", "dense", "fixed", "--out", tempfile.mkdtemp()])
      >>> status
      0
      >>> "| FST, fixed checkerboard" in buf.getvalue()
      True
    """
    args_in = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(args_in)
    meta = machine_info(args_in)
    meta["command"] = meta["command"].replace("benchmarks.run", "benchmarks.lm_study")
    settings = dict(QUICK if args.quick else FULL)
    for name in ("steps", "batch_size"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1, 2]
    t_start = time.perf_counter()
    results, trained = [], 0
    for seed in args.seeds:
        for variant in args.variants:
            path = _run_path(args.out, variant, seed, settings)
            if path.exists() and not args.fresh:
                results.append(json.loads(path.read_text()))
                continue
            r = run_one(variant, seed, settings, quiet=not args.progress)
            trained += 1
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**r, "settings": settings}, indent=1) + "\n")
            results.append(r)
            print(f"{variant} seed {seed}: val loss {r['val_loss']:.4f} ({r['val_bpc']:.4f} bits/char), "
                  f"{r['wall_s']:.0f} s", file=sys.stderr, flush=True)
    table = study_table(results)
    print(table)
    if not (args.quick or args.no_append):
        meta["loadavg_end"] = _loadavg()
        meta["wall_s"] = time.perf_counter() - t_start
        s = settings
        lines = machine_lines(meta) + [
            f"char-level GPT (`fst_jax.text.CharGPT`): {s['layers']} layers, d_model {s['d_model']}, "
            f"{s['heads']} heads, {s['seq_len']} tokens; {s['steps']} AdamW steps of batch {s['batch_size']}, "
            f"lr {s['lr']} (5 % warm-up, cosine); Python {sys.version.split()[0]} standard-library "
            f"sources, {s['num_chars']:,} characters (corpus {results[0].get('corpus')}), last 10 % held out",
            f"validation loss of the model each run trained (FST: its 2:4 model, forward_masks + "
            f"prune_params, plain loss) over the first {s['eval_windows']} validation windows; mean ± "
            f"standard error over paired seeds {sorted(set(args.seeds))}; gap = FST/dense − 1 per seed",
            f"runs trained by this invocation: {trained}, read back from `{args.out / 'runs'}`: "
            f"{len(results) - trained}; issue 14's target: gap within {TARGET_PERCENT:g} %",
            "per run: wall {:.0f}–{:.0f} s, median step {:.0f}–{:.0f} ms".format(
                min(r["wall_s"] for r in results), max(r["wall_s"] for r in results),
                min(r["median_step_ms"] for r in results), max(r["median_step_ms"] for r in results)),
            *args.note,
        ]
        append_section(f"Language-model study (issue 14), {meta['date']}", lines, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
