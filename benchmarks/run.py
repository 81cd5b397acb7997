"""Benchmarks of fst_jax: dense vs masked vs compact FST, side by side, in one run.

Run from the repository root::

    python -m benchmarks.run            # full shapes; appends a dated section to benchmarks/RESULTS.md
    python -m benchmarks.run --quick    # tiny shapes (a tiny GPT), 3 timed runs: a smoke run (minutes)
    python -m benchmarks.run --models gpt gpt_bf16 --skip-gemm   # the GPT alone
    python -m benchmarks.run --malloc-cache ...   # glibc reusing freed memory (no per-call page faults)
    python -m benchmarks.run --out DIR --no-append

Everything runs on whatever backend JAX picks (``jax.default_backend()``). The run prints markdown
tables, writes ``DIR/results.json`` and ``DIR/benchmarks.png`` (default ``DIR`` is
``benchmarks/out/``) and, unless ``--quick`` or ``--no-append``, appends the tables with the
machine description (date, platform, CPU, cores, JAX versions, backend, load average, command) to
``benchmarks/RESULTS.md``.

Sections (the keys of ``results.json``):

``gemm``
    The grad-weight product alone, ``dW = Aᵀ·dY`` for ``A: [T, K]``, ``dY: [T, O]``.
    *dense* is ``jit(lambda a, dy: a.T @ dy)``. *masked* is what ``mode="masked"`` runs: the
    token-masked ``A``, the shifted ``dY`` and a dense GEMM. *compact* is
    the library's compact product (:func:`library_compact`) on the kept half of ``A`` already
    gathered (what the compact custom_vjp saves as its residual): the shifted ``dY`` over the kept
    tokens and one half GEMM (``even``) or, for the ``checkerboard``, the two quarters as one GEMM
    batched over the two parities (``fst_jax._rotate``; where the token axis is not the
    innermost free axis the library runs two quarter GEMMs interleaved along ``K`` instead).
    *compact incl.
    gather* also gathers the kept half of ``A`` from the full ``A`` inside the same jit (in
    training that gather happens in the forward pass, once per step). Ratios are
    ``dense time / other time``: above 1 means faster than dense.
``gemm_profile``
    At the target shape (``T=8192, K=O=1024``, f32): the library's compact product split into its
    pieces (the GEMMs alone on operands already laid out: for the checkerboard the one batched
    ``dot_general`` before the interleave; the ``dY`` side alone: shift and selection of the
    kept tokens; the ``A`` gather alone), to show where the time goes.
``train_step``
    One jitted training step (forward, backward, ``optax.adamw`` update; nothing donated) of each
    model: an MLP, a pre-LN transformer block and a GPT-style decoder (6 causal pre-LN blocks,
    d_model 512, 8 heads, MLP 4x, vocabulary 1024 with its own dense LM head, tokens [8, 256];
    f32, and bf16 compute with f32 parameters), for the untransformed loss (*dense*) and for
    ``fst_jax.sparsify(loss, FSTConfig(mode=..., skip_first=False, skip_last=False))`` with
    ``mode="masked"`` and ``mode="compact"``: *every* weight matmul is sparse, the first and last
    included. Median of the timed runs after the warm-up runs, interleaved round-robin, each call
    waited for with ``block_until_ready``; *paired* is the median over repetitions of dense time /
    compact time of the same repetition. More variants run in the same rotation: compact with
    ``pattern="even"``, the library's **default config** ``FSTConfig()`` (compact,
    checkerboard, first and last weight matmul dense), and the keyed variants: compact with
    ``pattern="rotating"`` and with ``grad_weight="mvue"``, their step taking a traced step number
    as ``fst_key``. The minor page faults per step are counted
    too (see ``--malloc-cache``).
``memory``
    *residual bytes*: the summed ``nbytes`` of the distinct arrays held by the closure of
    ``jax.vjp(lambda p: loss(p, x), params)[1]`` (what the backward pass keeps from the forward
    pass; weights included), on the real shapes, with the ``vjp`` under ``jax.jit``. *temp bytes*:
    ``memory_analysis().temp_size_in_bytes`` of the compiled training step (``None`` where the
    backend does not say). *floor* / *floor_default*: the residuals of the same model in which
    every sparse weight matmul keeps only the kept half of its activation, once per distinct
    activation (benchmarks/overhead.py): what the rest of the model keeps anyway plus what FST
    cannot avoid keeping.
``compile``
    Trace + lower time (``jax.jit(step).lower(...)``) and compile time (``.compile()``) of the
    training step, each on a fresh step function and a fresh ``sparsify`` wrapper, so that no
    cache of either is reused; best of 3 (of 1 with ``--quick``). Library-level caches (for
    example the jitted mask helpers) stay warm after the first repetition, as in any real run.
``flops``
    Matmul FLOPs of one training step (forward + both backward products) from
    ``fst_jax.report``: dense, and FST with each 2:4-sparse product counted at half.
``proxy``
    The GPU proxy (benchmarks/overhead.py): the bytes FST's own passes move per step, from the
    HLO (non-GEMM bytes of the compiled and of the unoptimized step, FST minus dense) and from an
    analytic count per sparse matmul (fused and unfused bounds), as a share of an H200 step.
``multiprocess`` (with ``--multiprocess``)
    Data-parallel training over 2 processes vs 1 (benchmarks/multiprocess.py): step time and the
    gradient all-reduce alone.

Options: ``--models`` (a subset), ``--skip-gemm``, ``--runs``, ``--gemm-runs``, ``--multiprocess``,
``--malloc-cache`` (glibc without ``mmap`` for large blocks, so XLA:CPU's per-call temp buffers
are reused instead of page-faulted afresh on every call, as a GPU's caching allocator reuses them).

Targets are shown next to the numbers with a met/missed marker; they are goals for the library,
and the numbers are whatever this run measured.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
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
from jax import lax
from tqdm import tqdm

import fst_jax
from benchmarks import overhead
from fst_jax import _dot, _rotate

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "out"
RESULTS_MD = ROOT / "RESULTS.md"
RESULTS_HEADER = """# fst_jax benchmark results

Each section below was appended by one run of `python -m benchmarks.run` (see the module
docstring of `benchmarks/run.py` for what each table measures). Ratios are dense time / other
time: above 1 means faster than dense. Timings on a shared or loaded machine are noisy: the load
average at the start and end of each run is recorded with it.
"""

# Targets: (description, threshold, comparison).
TARGETS: dict[str, tuple[str, float, str]] = {
    "gemm": ("grad-weight GEMM compact vs dense, f32, T=8192 K=O=1024", 1.75, ">="),
    "train_compact": ("training step compact vs dense", 1.10, ">="),
    "train_masked": ("training step masked vs dense (at most 1.3x slower)", 1 / 1.3, ">="),
    "residual": ("residual bytes compact / dense", 0.8, "<="),
    # the memory target: <= 0.8 of dense, or within 5 % of the floor, whichever is higher
    "residual_floor": ("residual bytes compact / floor (met if this or the one above is)", 1.05, "<="),
    "compile": ("trace+lower+compile FST / dense", 1.5, "<="),
    "rotating": ("training step compact, rotating / fixed pattern (paired)", 1.03, "<="),
}
TARGET_GEMM_SHAPE = (8192, 1024, 1024)
MODES = ("dense", "masked", "compact")


# ------------------------------------------------------------------------------------------------
# Small helpers


def _met(value: float | None, key: str) -> str:
    """``"met"``/``"MISSED"`` for ``value`` against target ``key``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    _, threshold, op = TARGETS[key]
    ok = value >= threshold if op == ">=" else value <= threshold
    return "met" if ok else "MISSED"


def _target_str(key: str) -> str:
    _, threshold, op = TARGETS[key]
    return f"{op} {threshold:.3g}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table of ``rows`` (cells are formatted with ``str``)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _mib(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def _fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}"


def time_interleaved(fns: dict[str, Callable[[], Any]], warmup: int, runs: int) -> dict[str, list[float]]:
    """Wall times (seconds) of each thunk, interleaved round-robin in the order of ``fns``.

    Each thunk is called ``warmup`` times (untimed), then ``runs`` repetitions each call every
    thunk once in turn, waiting for its result with ``jax.block_until_ready``.

    Args:
      fns: name -> a thunk that launches the computation and returns its (device) result.
      warmup: untimed calls of each thunk first.
      runs: timed repetitions.

    Returns:
      name -> the ``runs`` wall times in seconds.
    """
    for _ in range(warmup):
        for fn in fns.values():
            jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return times


def minor_faults_per_call(fn: Callable[[], Any], calls: int = 3) -> float:
    """Minor page faults of this process per call of ``fn`` (after one untimed call).

    On Linux/glibc every allocation of 32 MiB or more is a fresh ``mmap``: each page an XLA:CPU
    executable touches in such a buffer (its temp buffer, large outputs) faults once per call.
    """
    import resource  # noqa: PLC0415 - POSIX only

    jax.block_until_ready(fn())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        jax.block_until_ready(fn())
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


#: glibc settings of ``--malloc-cache``: no ``mmap`` for large blocks and no trimming, so freed
#: memory is reused without page faults (as a GPU's caching allocator does).
#: One arena (``MALLOC_ARENA_MAX=1``): threads' arenas are mmapped heaps that glibc shrinks with
#: ``madvise`` on free; with it a dense MLP step faults 27k times instead of 52k (2026-11-29).
MALLOC_CACHE_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40), "MALLOC_TOP_PAD_": str(2**28),
                    "MALLOC_ARENA_MAX": "1"}


def _summary(ts: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(ts), "min_s": min(ts), "times_s": ts}


# ------------------------------------------------------------------------------------------------
# 1. grad-weight GEMM


def matmul_plan(a: jax.Array, w: jax.Array, pattern: str, mode: str) -> _dot.GemmPlan:
    """The :class:`fst_jax._dot.GemmPlan` that ``sparsify`` builds for ``a @ w`` (a: [T, K]).

    The ``dot_general`` parameters are read from the jaxpr of ``a @ w`` on this JAX version.
    """
    params = jax.make_jaxpr(lambda a, w: a @ w)(a, w).eqns[0].params
    return _dot.GemmPlan(
        dot_params=tuple(sorted(params.items())), weight_side=1, forward=True,
        grad_input="prune_output_dim", grad_weight="fixed_mask", k_axis=0, o_axis=1, t_axis=0,
        t_out_axis=0, act_contract=(1,), pattern=pattern, restore_scale=0.03, mode=mode,
        act_free=(0,), tokens=a.shape[0], act_shape=tuple(a.shape))


def library_compact(plan: _dot.GemmPlan, a_shape: tuple[int, ...],
                    w_shape: tuple[int, ...]) -> tuple[Callable, Callable]:
    """(gather, product): the kept half of ``A`` and ``dW`` from it, as the compact custom_vjp of
    ``sparsify`` computes them for ``plan``: the checkerboard through :mod:`fst_jax._rotate` (one
    GEMM batched over the two parities), ``"even"``/``"odd"`` as one half GEMM."""
    if plan.pair_select:
        lay, pats = _dot._layout(plan, a_shape, w_shape), plan.compact_patterns
        return (lambda a: _rotate.select_parts(a, 0, lay, pats),
                lambda parts, w, dy: _rotate.parts_grad_weight(
                    parts, 0, dy, lay, weight_dtype=w.dtype, scale=plan.restore_scale, patterns=pats))
    return functools.partial(_dot._compact_parts, plan), functools.partial(_dot._compact_grad_weight, plan)


def _masked_grad_weight(plan: _dot.GemmPlan, a: jax.Array, w: jax.Array, dy: jax.Array) -> jax.Array:
    """The grad-weight product of ``mode="masked"``: masked A, shifted dY, one dense GEMM."""
    a_g, dy_g = _dot._grad_weight_operands(plan, a, dy, None)
    _, vjp_w = jax.vjp(lambda w_: _dot._dot(plan, a_g, w_), w)
    return vjp_w(dy_g)[0]


def _gemm_inputs(t: int, k: int, o: int, dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    ka, kd = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (t, k), dtype)
    dy = jax.random.normal(kd, (t, o), dtype)
    return a, jnp.zeros((k, o), dtype), dy


def bench_gemm(t: int, k: int, o: int, dtype: Any, pattern: str, warmup: int, runs: int) -> dict[str, Any]:
    """Times dense, masked, compact and compact-incl.-gather grad-weight products of one case."""
    a, w, dy = _gemm_inputs(t, k, o, dtype)
    plan = matmul_plan(a, w, pattern, "compact")
    mplan = matmul_plan(a, w, pattern, "masked")
    take, product = library_compact(plan, a.shape, w.shape)
    parts = jax.block_until_ready(jax.jit(take)(a))
    dense = jax.jit(lambda a, dy: a.T @ dy)
    masked = jax.jit(functools.partial(_masked_grad_weight, mplan))
    compact = jax.jit(product)
    gather = jax.jit(lambda a, w, dy: product(take(a), w, dy))
    ref, got = masked(a, w, dy).astype(jnp.float32), compact(parts, w, dy).astype(jnp.float32)
    if not bool(jnp.allclose(got, ref, rtol=1e-2, atol=1e-2 * float(jnp.max(jnp.abs(ref))))):
        raise AssertionError(f"compact grad-weight != masked for {pattern} {t}x{k}x{o}")
    fns = {
        "dense": lambda: dense(a, dy),
        "masked": lambda: masked(a, w, dy),
        "compact": lambda: compact(parts, w, dy),
        "compact_gather": lambda: gather(a, w, dy),
    }
    times = time_interleaved(fns, warmup, runs)
    res: dict[str, Any] = {"T": t, "K": k, "O": o, "dtype": jnp.dtype(dtype).name, "pattern": pattern,
                           "flops_dense": 2 * t * k * o}
    res.update({name: _summary(ts) for name, ts in times.items()})
    d = res["dense"]["median_s"]
    for name in fns:
        if name != "dense":
            res[f"speedup_{name}"] = d / res[name]["median_s"]
            res[f"paired_speedup_{name}"] = statistics.median(x / y for x, y in zip(times["dense"], times[name]))
    return res


def _compact_pieces(plan: Any, a_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> tuple[Any, Any]:
    """``(dy_side, gemms)`` of the library's compact grad-weight product for ``plan``: the shift and
    selection of the kept ``dY`` tokens, and the GEMM(s) on operands already laid out (for the
    per-pair form ``[κ, B, K/2, O]``, before the halves are interleaved)."""
    if plan.pair_select:
        dy_side = functools.partial(_rotate._kept_gradients, layout=_dot._layout(plan, a_shape, w_shape),
                                    patterns=plan.compact_patterns, choice=0, scale=plan.restore_scale)
        return dy_side, functools.partial(lax.dot_general, dimension_numbers=(((2,), (2,)), ((0, 1), (0, 1))))
    phase = int(plan.pattern == "odd")
    return (lambda dy: _dot._shifted_tokens(dy, 0, phase, plan.restore_scale)), (lambda ps, ds: ps[0].T @ ds)


def profile_gemm(t: int, k: int, o: int, warmup: int, runs: int,
                 patterns: Sequence[str] = ("checkerboard", "even")) -> list[dict[str, Any]]:
    """The library's compact grad-weight product at one shape (f32) split into its pieces, per
    pattern: the GEMM(s) alone on operands already laid out, the ``dY`` side alone (shift and
    selection of the kept tokens), the ``A`` gather alone, the whole product, and with the gather.

    The checkerboard is profiled in the form the library runs (:func:`library_compact`: the
    parities' quarters selected per token pair, one ``dot_general`` batched over the parities,
    the two ``K/2`` halves interleaved into ``dW``), ``"even"``/``"odd"`` as one half GEMM."""
    a, w, dy = _gemm_inputs(t, k, o, jnp.float32)
    out = []
    for pattern in patterns:
        plan = matmul_plan(a, w, pattern, "compact")
        gather, product = library_compact(plan, a.shape, w.shape)
        parts = jax.block_until_ready(jax.jit(gather)(a))
        dy_side, gemms = _compact_pieces(plan, a.shape, w.shape)
        kept_dy = jax.block_until_ready(jax.jit(dy_side)(dy))
        fns = {
            "dense": functools.partial(jax.jit(lambda a, dy: a.T @ dy), a, dy),
            "gemms_only": functools.partial(jax.jit(gemms), parts, kept_dy),
            "dy_shift_only": functools.partial(jax.jit(dy_side), dy),
            "a_gather_only": functools.partial(jax.jit(gather), a),
            "compact": functools.partial(jax.jit(product), parts, w, dy),
            "compact_gather": functools.partial(jax.jit(lambda a, w, dy: product(gather(a), w, dy)), a, w, dy),
        }
        times = time_interleaved(fns, warmup, runs)
        row: dict[str, Any] = {"T": t, "K": k, "O": o, "dtype": "float32", "pattern": pattern,
                               "form": "batched over parities" if plan.pair_select else "one half GEMM"}
        row.update({name: _summary(ts) for name, ts in times.items()})
        row["faults_per_call"] = {name: minor_faults_per_call(fns[name]) for name in ("dense", "dy_shift_only", "compact")}
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------
# 2.-5. Models, training step, memory, compile time, FLOPs


class BenchMLP(nn.Module):
    """``depth`` Dense layers of ``width`` with gelu between them (none after the last)."""

    width: int
    depth: int = 4
    dot_general: Any = None  # a DotHook (benchmarks.overhead) or None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.depth):
            x = nn.Dense(self.width, dot_general=self.dot_general)(x)
            if i < self.depth - 1:
                x = nn.gelu(x)
        return x


class BenchBlock(nn.Module):
    """A pre-LN transformer block: ``x + MHA(LN(x))``, then ``x + MLP(LN(x))`` (gelu, 4x)."""

    num_heads: int
    mlp_ratio: int = 4
    dtype: Any = None  # the computation dtype (None: the inputs'); parameters stay f32
    dot_general: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        d = x.shape[-1]
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, qkv_features=d, dtype=self.dtype, qkv_dot_general=self.dot_general,
            out_dot_general=self.dot_general)(nn.LayerNorm(dtype=self.dtype)(x), mask=mask)
        x = x + y
        h = nn.Dense(self.mlp_ratio * d, dtype=self.dtype, dot_general=self.dot_general)(
            nn.LayerNorm(dtype=self.dtype)(x))
        y = nn.Dense(d, dtype=self.dtype, dot_general=self.dot_general)(nn.gelu(h))
        return x + y


class BenchGPT(nn.Module):
    """A GPT-style decoder: token + learned position embeddings, ``depth`` pre-LN causal blocks,
    a final LayerNorm and a dense LM head (its own weight, not tied to the embedding)."""

    vocab: int
    d_model: int
    num_heads: int
    depth: int
    dtype: Any = None
    dot_general: Any = None

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        t = tokens.shape[-1]
        x = nn.Embed(self.vocab, self.d_model, dtype=self.dtype)(tokens)
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (t, self.d_model))
        x = x + pos.astype(x.dtype)[None]
        mask = nn.make_causal_mask(tokens)
        for _ in range(self.depth):
            x = BenchBlock(self.num_heads, dtype=self.dtype, dot_general=self.dot_general)(x, mask)
        x = nn.LayerNorm(dtype=self.dtype)(x)
        return nn.Dense(self.vocab, dtype=self.dtype, dot_general=self.dot_general, name="lm_head")(x)


def _gpt_case(quick: bool, dtype: Any) -> dict[str, Any]:
    vocab, d, heads, depth, (b, t) = (64, 32, 2, 2, (2, 16)) if quick else (1024, 512, 8, 6, (8, 256))
    name = jnp.dtype(dtype).name
    return dict(module=functools.partial(BenchGPT, vocab=vocab, d_model=d, num_heads=heads, depth=depth,
                                         dtype=dtype),
                x_shape=(b, t), tokens=vocab, loss="lm",
                desc=f"GPT {depth} layers d={d}, {heads} heads, MLP 4x, vocab {vocab} (dense LM head), causal, "
                     f"tokens [{b}, {t}], {name} compute (f32 parameters)")


def model_cases(quick: bool, names: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """The models: name -> module factory (``dot_general=`` hook), input shape, loss and description."""
    if quick:
        cases = {
            "mlp": dict(module=functools.partial(BenchMLP, width=64), x_shape=(256, 64),
                        desc="MLP 4x Dense(64), gelu, x [256, 64]"),
            "transformer_block": dict(module=functools.partial(BenchBlock, num_heads=2), x_shape=(4, 16, 32),
                                      desc="pre-LN block d=32, 2 heads, MLP 4x, x [4, 16, 32]"),
        }
    else:
        cases = {
            "mlp": dict(module=functools.partial(BenchMLP, width=1024), x_shape=(4096, 1024),
                        desc="MLP 4x Dense(1024), gelu, x [4096, 1024]"),
            "transformer_block": dict(module=functools.partial(BenchBlock, num_heads=8), x_shape=(16, 256, 512),
                                      desc="pre-LN block d=512, 8 heads, MLP 4x, x [16, 256, 512]"),
        }
    cases["gpt"] = _gpt_case(quick, jnp.float32)
    if not quick:  # the smoke run keeps one tiny GPT
        cases["gpt_bf16"] = _gpt_case(quick, jnp.bfloat16)
    if names == ["none"]:
        return {}
    if names:
        unknown = set(names) - set(cases)
        if unknown:
            raise SystemExit(f"unknown model(s) {sorted(unknown)}; choose from {sorted(cases)}")
        cases = {n: cases[n] for n in names}
    return cases


def make_input(case: dict[str, Any], key: jax.Array) -> jax.Array:
    """The model's input: random tokens for a language model, else a standard normal ``x``."""
    if case.get("loss") == "lm":
        return jax.random.randint(key, case["x_shape"], 0, case["tokens"], jnp.int32)
    return jax.random.normal(key, case["x_shape"], jnp.float32)


def make_loss(module: nn.Module, kind: str = "l2") -> Callable[[Any, jax.Array], jax.Array]:
    """``loss(params, x)``: ``mean(module(x) ** 2)``, or for ``kind="lm"`` the next-token
    cross-entropy of ``module(tokens)`` (f32 logits; the last position predicts the first)."""
    if kind == "lm":
        def lm_loss(params: Any, tokens: jax.Array) -> jax.Array:
            logits = module.apply({"params": params}, tokens).astype(jnp.float32)
            targets = jnp.roll(tokens, -1, axis=-1)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return lm_loss

    def loss(params: Any, x: jax.Array) -> jax.Array:
        y = module.apply({"params": params}, x)
        return jnp.mean(jnp.square(y.astype(jnp.float32)))
    return loss


def fst_config(mode: str) -> fst_jax.FSTConfig:
    """The benchmarked config: every weight matmul sparse (no skip_first / skip_last)."""
    return fst_jax.FSTConfig(mode=mode, skip_first=False, skip_last=False)


#: The variants of the train-step rotation: the benchmark config per mode, the benchmark config with
#: ``pattern="even"``, and the library's default config (compact, first and last weight matmul dense).
VARIANT_CONFIGS: dict[str, Callable[[], fst_jax.FSTConfig]] = {
    "masked": lambda: fst_config("masked"),
    "compact": lambda: fst_config("compact"),
    "compact_even": lambda: fst_config("compact").replace(pattern="even"),
    "default": lambda: fst_jax.FSTConfig(),
    "compact_rotating": lambda: fst_config("compact").replace(pattern="rotating"),
    "mvue": lambda: fst_config("compact").replace(grad_weight="mvue"),
}
#: The variants that draw from ``fst_key`` (their step takes the step number, traced).
KEYED = ("compact_rotating", "mvue")


def make_mode_loss(loss: Callable, mode: str) -> Callable:
    """A fresh loss for ``mode`` (``"dense"`` or a key of :data:`VARIANT_CONFIGS`): the loss itself
    for dense, a new ``sparsify`` wrapper otherwise."""
    if mode == "dense":
        return lambda params, x: loss(params, x)
    return fst_jax.sparsify(loss, VARIANT_CONFIGS[mode]())


def make_step(loss: Callable, opt: optax.GradientTransformation, keyed: bool = False) -> Callable:
    """A fresh (not yet jitted) training step ``(params, opt_state, x) -> (params, opt_state, loss)``;
    ``keyed``: ``(params, opt_state, x, step)``, the step number passed on as ``fst_key``."""
    def step(params: Any, opt_state: Any, x: jax.Array, *key: jax.Array) -> tuple[Any, Any, jax.Array]:
        value, grads = jax.value_and_grad(loss)(params, x, **({"fst_key": key[0]} if keyed else {}))
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value
    return step


def residual_bytes(loss: Callable, params: Any, x: jax.Array) -> tuple[int, int]:
    """(bytes, count) of the distinct arrays in the closure of ``jax.vjp(lambda p: loss(p, x), params)[1]``.

    The ``vjp`` runs under ``jax.jit`` (one compiled forward pass instead of op-by-op dispatch),
    so the residuals are those a jitted training step keeps; the closure is returned as a pytree.
    (Identical residuals of several matmuls count once each here; inside one jitted training step
    XLA may merge them: the compiled temp bytes are the step's real footprint.)
    """
    pull = jax.jit(lambda p, x: jax.vjp(lambda p: loss(p, x), p)[1])(params, x)
    seen: dict[int, int] = {}
    for leaf in jax.tree_util.tree_leaves(pull):
        if hasattr(leaf, "nbytes"):
            seen[id(leaf)] = int(leaf.nbytes)
    return sum(seen.values()), len(seen)


def _temp_bytes(compiled: Any) -> dict[str, int | None]:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        stats = None
    keys = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")
    return {k: (None if stats is None else getattr(stats, k, None)) for k in keys}


def _cost(compiled: Any) -> dict[str, float | None]:
    try:
        c = compiled.cost_analysis()
        c = c[0] if isinstance(c, (list, tuple)) else c
        return {"flops": c.get("flops"), "bytes_accessed": c.get("bytes accessed")}
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return {"flops": None, "bytes_accessed": None}


def bench_model(name: str, case: dict[str, Any], warmup: int, runs: int, compile_reps: int,
                progress: Callable[[str], None], faults: bool = True) -> dict[str, Any]:
    """All model sections (train step, memory + floor, compile time, FLOPs, GPU proxy) for one model."""
    hook = overhead.DotHook()
    module = case["module"](dot_general=hook)
    kp, kx = jax.random.split(jax.random.key(1))
    x = make_input(case, kx)
    params = jax.jit(module.init)(kp, x)["params"]
    loss = make_loss(module, case.get("loss", "l2"))
    opt = optax.adamw(1e-3)
    opt_state = opt.init(params)
    out: dict[str, Any] = {"model": name, "desc": case["desc"],
                           "n_params": sum(int(p.size) for p in jax.tree.leaves(params))}
    hook.reset()
    jax.eval_shape(loss, params, x)  # records the weight matmuls, in call order
    calls = list(hook.calls)
    default_dense = {0, len(calls) - 1}

    # FLOPs
    rep = fst_jax.report(loss, fst_config("compact"))(params, x)
    rep_default = fst_jax.report(loss, fst_jax.FSTConfig())(params, x)
    out["flops"] = {"dense": rep.flops_dense, "fst": rep.flops_fst,
                    "ratio": rep.flops_fst / rep.flops_dense, "fst_default": rep_default.flops_fst,
                    "ratio_default": rep_default.flops_fst / rep_default.flops_dense,
                    "matmuls": len(rep.rows), "weight_matmuls": sum(r.weight is not None for r in rep.rows),
                    "sparse_products": sum(r.sparse_gemms for r in rep.rows),
                    "products": 3 * len(rep.rows)}
    progress(f"{name}: compile")

    # compile time (fresh step function and sparsify wrapper per repetition)
    modes = (*MODES, "default")
    compile_times: dict[str, dict[str, list[float]]] = {m: {"lower_s": [], "compile_s": []} for m in modes}
    compiled: dict[str, Any] = {}
    lowered_text: dict[str, str] = {}
    for rep_i in range(compile_reps):
        for mode in modes:
            step = make_step(make_mode_loss(loss, mode), opt)
            t0 = time.perf_counter()
            lowered = jax.jit(step).lower(params, opt_state, x)
            t1 = time.perf_counter()
            compiled[mode] = lowered.compile()
            t2 = time.perf_counter()
            compile_times[mode]["lower_s"].append(t1 - t0)
            compile_times[mode]["compile_s"].append(t2 - t1)
            if rep_i == 0:
                lowered_text[mode] = lowered.as_text(dialect="hlo")
    comp: dict[str, Any] = {}
    for mode in modes:
        ct = compile_times[mode]
        totals = [lo + co for lo, co in zip(ct["lower_s"], ct["compile_s"])]
        comp[mode] = {"lower_s": min(ct["lower_s"]), "compile_s": min(ct["compile_s"]),
                      "total_s": min(totals), "all": ct}
    for mode in modes[1:]:
        comp[mode]["total_vs_dense"] = comp[mode]["total_s"] / comp["dense"]["total_s"]
    out["compile"] = comp
    progress(f"{name}: memory")

    # memory, and the floor (benchmarks/overhead.py)
    mem: dict[str, Any] = {}
    for mode in modes:
        nbytes, count = residual_bytes(make_mode_loss(loss, mode), params, x)
        mem[mode] = {"residual_bytes": nbytes, "residual_arrays": count, **_temp_bytes(compiled[mode])}
    for label, dense_calls in (("floor", ()), ("floor_default", default_dense)):
        floor_hook = overhead.DotHook("floor", dense_calls)
        floor_loss = make_loss(case["module"](dot_general=floor_hook), case.get("loss", "l2"))
        nbytes, count = residual_bytes(floor_loss, params, x)
        mem[label] = {"residual_bytes": nbytes, "residual_arrays": count}
    for mode in modes[1:]:
        mem[mode]["residual_vs_dense"] = mem[mode]["residual_bytes"] / mem["dense"]["residual_bytes"]
        mem[mode]["temp_vs_dense"] = _ratio(mem[mode]["temp_size_in_bytes"], mem["dense"]["temp_size_in_bytes"])
        floor = mem["floor_default" if mode == "default" else "floor"]["residual_bytes"]
        mem[mode]["residual_vs_floor"] = mem[mode]["residual_bytes"] / floor
    for label in ("floor", "floor_default"):
        mem[label]["residual_vs_dense"] = mem[label]["residual_bytes"] / mem["dense"]["residual_bytes"]
    out["memory"] = mem

    # the GPU proxy: HLO byte counts (fused: compiled; unfused: unoptimized) and the analytic count
    hlo = {mode: {"fused": overhead.hlo_bytes(compiled[mode].as_text()),
                  "unfused": overhead.hlo_bytes(lowered_text[mode])} for mode in ("dense", "compact", "default")}
    dense_flops = hlo["dense"]["fused"].gemm_flops
    proxy: dict[str, Any] = {"gemm_flops_dense_hlo": dense_flops,
                             "cost_analysis": {m: _cost(compiled[m]) for m in ("dense", "compact", "default")}}
    for mode, sparse in (("compact", range(len(calls))),
                         ("default", [i for i in range(len(calls)) if i not in default_dense])):
        cfg = VARIANT_CONFIGS[mode]()
        analytic = overhead.analytic_extra_bytes(calls, list(sparse), cfg.pattern, cfg.sr_ste > 0)
        row: dict[str, Any] = {}
        # The model's own non-GEMM bytes, as the compiler fuses them: the same base for both bounds.
        base_other = hlo["dense"]["fused"].other_bytes
        for bound in ("fused", "unfused"):
            d, f = hlo["dense"][bound], hlo[mode][bound]
            extra_hlo = f.other_bytes - d.other_bytes
            extra_an = sum(analytic[bound].values())
            row[bound] = {
                "dense_other_bytes": d.other_bytes, "fst_other_bytes": f.other_bytes,
                "dense_gemm_bytes": d.gemm_bytes, "fst_gemm_bytes": f.gemm_bytes, "base_other_bytes": base_other,
                "extra_bytes_hlo": extra_hlo, "extra_bytes_analytic": extra_an,
                "analytic_by_pass": analytic[bound],
                "fraction_hlo": overhead.step_fraction(extra_hlo, dense_flops, base_other),
                "fraction_analytic": overhead.step_fraction(extra_an, dense_flops, base_other),
                "hlo_extra_by_op": {op: f.by_op.get(op, 0) - d.by_op.get(op, 0)
                                    for op in sorted(set(f.by_op) | set(d.by_op))
                                    if f.by_op.get(op, 0) != d.by_op.get(op, 0)},
            }
        proxy[mode] = row
    out["proxy"] = proxy
    progress(f"{name}: train step")

    # training step, interleaved: dense, masked, compact, compact with pattern="even", default
    # config, and the keyed variants (rotating patterns, mvue) with a traced step number
    step_no = jnp.int32(7)
    for m in ("compact_even", *KEYED):
        compiled[m] = jax.jit(make_step(make_mode_loss(loss, m), opt, keyed=m in KEYED)).lower(
            params, opt_state, x, *((step_no,) if m in KEYED else ())).compile()
    variants = (*MODES, "compact_even", "default", *KEYED)
    calls = {m: functools.partial(compiled[m], params, opt_state, x, *((step_no,) if m in KEYED else ()))
             for m in variants}
    times = time_interleaved(calls, warmup, runs)
    ts: dict[str, Any] = {m: _summary(times[m]) for m in variants}
    try:
        for m in variants if faults else ():
            ts[m]["minor_faults_per_call"] = minor_faults_per_call(calls[m])
    except ImportError:  # not POSIX
        pass
    for mode in variants[1:]:
        ts[f"speedup_{mode}"] = ts["dense"]["median_s"] / ts[mode]["median_s"]
        ts[f"paired_speedup_{mode}"] = statistics.median(
            d / v for d, v in zip(times["dense"], times[mode]))
    # issue 14's target: a rotating pattern's compact step within 3 % of the fixed pattern's
    ts["rotating_vs_fixed"] = statistics.median(r / c for r, c in zip(times["compact_rotating"], times["compact"]))
    out["train_step"] = ts
    return out


# ------------------------------------------------------------------------------------------------
# Report


def gemm_tables(gemm: list[dict[str, Any]], profile: list[dict[str, Any]]) -> str:
    """Markdown tables of the GEMM section and its profile."""
    rows = []
    for r in gemm:
        is_target = (r["T"], r["K"], r["O"]) == TARGET_GEMM_SHAPE and r["dtype"] == "float32"
        rows.append([r["T"], r["K"], r["O"], r["dtype"], r["pattern"], _ms(r["dense"]["median_s"]),
                     _ms(r["masked"]["median_s"]), _ms(r["compact"]["median_s"]),
                     _ms(r["compact_gather"]["median_s"]), f"{r['speedup_masked']:.2f}",
                     f"{r['speedup_compact']:.2f}", f"{r['paired_speedup_compact']:.2f}",
                     f"{r['speedup_compact_gather']:.2f}",
                     _target_str("gemm") if is_target else "-",
                     _met(r["speedup_compact"], "gemm") if is_target else "-"])
    out = md_table(["T", "K", "O", "dtype", "pattern", "dense ms", "masked ms", "compact ms",
                    "compact incl. gather ms", "dense/masked", "dense/compact", "paired",
                    "dense/(compact incl. gather)",
                    "target", "met"], rows)
    prow = []
    for r in profile:
        d = r["dense"]["median_s"]
        faults = r.get("faults_per_call", {})
        prow.append([r["pattern"], r.get("form", ""), *(f"{_ms(r[k]['median_s'])} ({d / r[k]['median_s']:.2f}x)"
                                     for k in ("dense", "gemms_only", "dy_shift_only", "a_gather_only",
                                               "compact", "compact_gather")),
                     " / ".join(f"{faults[k]:.0f}" for k in ("dense", "dy_shift_only", "compact")) if faults else "-"])
    if profile:
        p0 = profile[0]
        out += (f"\n\nWhere the compact time goes (T={p0['T']}, K={p0['K']}, O={p0['O']}, f32; ms, and "
                "dense/that):\n\n")
        out += md_table(["pattern", "form", "dense", "compact GEMMs only", "dY side only", "A gather only",
                         "compact", "compact incl. gather", "page faults / call: dense / dY side / compact"], prow)
        out += ("\n\nPage faults: minor faults of the process per call (Linux). With glibc's default "
                "allocator every block of 32 MiB or more is a fresh `mmap`, so each page XLA:CPU touches in "
                "such a temp buffer faults once per call; `--malloc-cache` (a reused heap, like a GPU's "
                "caching allocator) removes them.")
    return out


def model_tables(models: list[dict[str, Any]]) -> dict[str, str]:
    """Markdown tables of the train-step, memory, compile, FLOPs and GPU-proxy sections."""
    rows = []
    for m in models:
        t = m["train_step"]
        rows.append([m["model"], _ms(t["dense"]["median_s"]), _ms(t["masked"]["median_s"]),
                     _ms(t["compact"]["median_s"]), f"{t['speedup_masked']:.2f}", _target_str("train_masked"),
                     _met(t["speedup_masked"], "train_masked"), f"{t['speedup_compact']:.2f}",
                     f"{t['paired_speedup_compact']:.2f}",
                     _target_str("train_compact"), _met(t["speedup_compact"], "train_compact"),
                     _ms(t["compact_even"]["median_s"]), f"{t['speedup_compact_even']:.2f}",
                     _ms(t["default"]["median_s"]), f"{t['speedup_default']:.2f}",
                     " / ".join(f"{t[k].get('minor_faults_per_call', float('nan')):.0f}" for k in ("dense", "compact"))])
    train = md_table(["model", "dense ms", "masked ms", "compact ms", "dense/masked", "target", "met",
                      "dense/compact", "paired", "target", "met", "compact (even) ms", "dense/compact (even)",
                      "default config ms", "dense/default", "page faults / step, dense / compact"], rows)
    rows = []
    for m in models:
        t = m["train_step"]
        rows.append([m["model"], _ms(t["compact"]["median_s"]), _ms(t["compact_rotating"]["median_s"]),
                     f"{t['rotating_vs_fixed']:.3f}", _target_str("rotating"), _met(t["rotating_vs_fixed"], "rotating"),
                     _ms(t["mvue"]["median_s"]), f"{t['speedup_mvue']:.2f}"])
    keyed = md_table(["model", "compact, fixed ms", "compact, rotating ms", "rotating / fixed", "target", "met",
                      "mvue ms", "dense/mvue"], rows)
    rows = []
    for m in models:
        mem = m["memory"]
        for mode in (*MODES, "default", "floor", "floor_default"):
            r = mem[mode]
            rv = r.get("residual_vs_dense")
            rows.append([m["model"], mode, _mib(r["residual_bytes"]), r["residual_arrays"],
                         "1.00" if mode == "dense" else _fmt_ratio(rv),
                         _fmt_ratio(r.get("residual_vs_floor")) if mode in ("masked", "compact", "default") else "-",
                         _mib(r.get("temp_size_in_bytes")) if "floor" not in mode else "-",
                         "1.00" if mode == "dense" else _fmt_ratio(r.get("temp_vs_dense")),
                         _target_str("residual") if mode == "compact" else "-",
                         _met(rv, "residual") if mode == "compact" else "-"])
    memory = md_table(["model", "mode", "residual MiB", "residual arrays", "residual / dense", "residual / floor",
                       "compiled temp MiB", "temp / dense", "target", "met"], rows)
    rows = []
    for m in models:
        for mode in (*MODES, "default"):
            c = m["compile"][mode]
            rv = c.get("total_vs_dense")
            rows.append([m["model"], mode, f"{c['lower_s']:.2f}", f"{c['compile_s']:.2f}", f"{c['total_s']:.2f}",
                         "1.00" if mode == "dense" else _fmt_ratio(rv),
                         "-" if mode == "dense" else _target_str("compile"),
                         "-" if mode == "dense" else _met(rv, "compile")])
    compile_ = md_table(["model", "mode", "trace+lower s", "compile s", "total s (best)", "total / dense",
                         "target", "met"], rows)
    rows = []
    for m in models:
        f = m["flops"]
        rows.append([m["model"], f"{f['dense'] / 1e9:.2f}", f"{f['fst'] / 1e9:.2f}", f"{f['ratio']:.3f}",
                     f"{f['ratio_default']:.3f}", f"{f['sparse_products']} / {f['products']}",
                     f"{f['weight_matmuls']} of {f['matmuls']}", f"{m['n_params'] / 1e6:.2f}"])
    flops = md_table(["model", "dense GFLOP", "FST GFLOP", "FST / dense", "default config / dense",
                      "2:4-sparse products", "weight matmuls", "params (M)"], rows)
    rows = []
    for m in models:
        p = m["proxy"]
        for mode in ("compact", "default"):
            for bound in ("fused", "unfused"):
                r = p[mode][bound]
                rows.append([m["model"], mode, bound, f"{p['gemm_flops_dense_hlo'] / 1e9:.1f}",
                             _mib(r.get("base_other_bytes", r["dense_other_bytes"])), _mib(r["extra_bytes_hlo"]),
                             _mib(r["extra_bytes_analytic"]), f"{100 * r['fraction_hlo']:.1f} %",
                             f"{100 * r['fraction_analytic']:.1f} %"])
    proxy = md_table(["model", "config", "bound", "dense GEMM GFLOP (HLO)", "dense other MiB (compiled)",
                      "FST extra MiB (HLO)", "FST extra MiB (analytic)", "H200 step share (HLO)",
                      "H200 step share (analytic)"], rows)
    return {"train_step": train, "keyed": keyed, "memory": memory, "compile": compile_, "flops": flops,
            "proxy": proxy}


def target_summary(results: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """The table of every target with the measured value, and the same as data."""
    items: list[dict[str, Any]] = []
    for r in results["gemm"]:
        if (r["T"], r["K"], r["O"]) == TARGET_GEMM_SHAPE and r["dtype"] == "float32":
            items.append(dict(key="gemm", what=f"{TARGETS['gemm'][0]}, {r['pattern']}",
                              value=r["speedup_compact"]))
    for m in results["models"]:
        items.append(dict(key="train_compact", what=f"{TARGETS['train_compact'][0]}, {m['model']}",
                          value=m["train_step"]["speedup_compact"]))
        items.append(dict(key="train_masked", what=f"{TARGETS['train_masked'][0]}, {m['model']}",
                          value=m["train_step"]["speedup_masked"]))
        items.append(dict(key="residual", what=f"{TARGETS['residual'][0]}, {m['model']}",
                          value=m["memory"]["compact"]["residual_vs_dense"]))
        items.append(dict(key="residual_floor", what=f"{TARGETS['residual_floor'][0]}, {m['model']}",
                          value=m["memory"]["compact"]["residual_vs_floor"]))
        items.append(dict(key="train_compact", what=f"{TARGETS['train_compact'][0]}, {m['model']}, default config",
                          value=m["train_step"]["speedup_default"]))
        items.append(dict(key="rotating", what=f"{TARGETS['rotating'][0]}, {m['model']}",
                          value=m["train_step"]["rotating_vs_fixed"]))
        items.append(dict(key="residual", what=f"{TARGETS['residual'][0]}, {m['model']}, default config",
                          value=m["memory"]["default"]["residual_vs_dense"]))
        for mode in ("masked", "compact", "default"):
            items.append(dict(key="compile", what=f"{TARGETS['compile'][0]}, {m['model']}, {mode}",
                              value=m["compile"][mode]["total_vs_dense"]))
    for it in items:
        it["target"] = _target_str(it["key"])
        it["met"] = _met(it["value"], it["key"])
    table = md_table(["target", "measured", "threshold", "met"],
                     [[it["what"], f"{it['value']:.2f}", it["target"], it["met"]] for it in items])
    return table, items


def machine_info(argv: Sequence[str]) -> dict[str, Any]:
    """Date, platform, CPU, cores, versions, backend, load average and the command."""
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import jaxlib

    devices = jax.devices()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "device": f"{len(devices)} x {devices[0].device_kind}",
        "loadavg_start": _loadavg(),
        "malloc": ("glibc, " + " ".join(f"{k}={os.environ[k]}" for k in MALLOC_CACHE_ENV if k in os.environ))
        if any(k in os.environ for k in MALLOC_CACHE_ENV) else "default",
        "command": "python -m benchmarks.run" + "".join(" " + shlex.quote(a) for a in argv),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def plot(results: dict[str, Any], path: Path) -> None:
    """A horizontal bar chart of the speed ratios (dense time / other time) per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, colors = [], [], []
    for r in results["gemm"]:
        base = f"GEMM {r['T']}x{r['K']}x{r['O']} {r['dtype']} {r['pattern'][:5]}"
        for key, color in (("compact", "tab:green"), ("compact_gather", "tab:olive"), ("masked", "tab:blue")):
            labels.append(f"{base} {key.replace('_', '+')}")
            values.append(r[f"speedup_{key}"])
            colors.append(color)
    for m in results["models"]:
        for mode, color in (("compact", "tab:green"), ("compact_even", "tab:olive"), ("default", "tab:purple"),
                            ("masked", "tab:blue")):
            labels.append(f"train step {m['model']} {mode.replace('_', ' (') + ')' if '_' in mode else mode}")
            values.append(m["train_step"][f"speedup_{mode}"])
            colors.append(color)
    fig, ax = plt.subplots(figsize=(9, 0.25 * len(labels) + 1.5))
    y = np.arange(len(labels))
    ax.barh(y, values, color=colors)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("dense time / time (> 1: faster than dense)")
    ax.set_title(f"fst_jax speed ratios ({results['meta']['backend']}, {results['meta']['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# main


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes and 3 timed runs (a smoke run)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: benchmarks/out)")
    p.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    p.add_argument("--runs", type=int, default=None, help="timed runs (default: 3 with --quick, else 15)")
    p.add_argument("--models", nargs="+", default=None,
                   help="only these models (mlp, transformer_block, gpt, gpt_bf16; none: the GEMM sections only; default: all)")
    p.add_argument("--skip-gemm", action="store_true", help="skip the grad-weight GEMM sections")
    p.add_argument("--gemm-target-only", action="store_true",
                   help="only the target GEMM case (f32, T=8192, K=O=1024) and its profile")
    p.add_argument("--malloc-cache", action="store_true",
                   help="re-run under glibc settings that reuse freed memory instead of page-faulting fresh "
                        "mmaps (MALLOC_MMAP_MAX_=0 ...), like a GPU's caching allocator")
    p.add_argument("--multiprocess", action="store_true",
                   help="also time data-parallel training over 2 processes (benchmarks/multiprocess.py)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each variant first (default 2)")
    p.add_argument("--compile-reps", type=int, default=None, help="compile repetitions (default: 1 with --quick, else 3)")
    p.add_argument("--no-faults", action="store_true", help="do not count page faults per step (saves 4 steps per variant)")
    p.add_argument("--gemm-runs", type=int, default=None,
                   help="timed runs of the GEMM cases (default: 3 with --quick, else 10)")
    return p


def gemm_cases(quick: bool) -> list[tuple[int, int, int, Any, str]]:
    """(T, K, O, dtype, pattern) of every GEMM case."""
    shapes = [(256, 64, 64)] if quick else [TARGET_GEMM_SHAPE, (4096, 512, 2048), (16384, 256, 256)]
    return [(t, k, o, dt, pat) for (t, k, o) in shapes for dt in (jnp.float32, jnp.bfloat16)
            for pat in ("checkerboard", "even")]


def main(argv: Sequence[str] | None = None) -> int:
    """Runs every section; prints the tables and writes results.json, benchmarks.png, RESULTS.md.

    Args:
      argv: command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
      The exit status, 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.malloc_cache and any(os.environ.get(k) != v for k, v in MALLOC_CACHE_ENV.items()):
        # glibc reads these at process start: run again with them set
        env = {**os.environ, **MALLOC_CACHE_ENV}
        return subprocess.call([sys.executable, "-m", "benchmarks.run", *argv], env=env, cwd=ROOT.parent)
    runs = args.runs or (3 if args.quick else 15)
    gemm_runs = args.gemm_runs or (3 if args.quick else 10)
    warmup = args.warmup
    compile_reps = args.compile_reps or (1 if args.quick else 3)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = machine_info(argv)
    meta.update(runs=runs, gemm_runs=gemm_runs, warmup=warmup, compile_reps=compile_reps, quick=args.quick)

    cases = [] if args.skip_gemm else gemm_cases(args.quick)
    if args.gemm_target_only and not args.quick:
        cases = [c for c in cases if c[:3] == TARGET_GEMM_SHAPE and c[3] == jnp.float32]
    models = model_cases(args.quick, args.models)
    profile_shape = (512, 64, 64) if args.quick else TARGET_GEMM_SHAPE
    steps_per_model = 4
    bar = tqdm(total=len(cases) + 1 + steps_per_model * len(models), desc="benchmarks", unit="case",
               file=sys.stderr, dynamic_ncols=True)

    def progress(label: str) -> None:
        bar.set_postfix_str(label, refresh=False)
        bar.update(1)

    t_start = time.perf_counter()
    gemm = []
    for t, k, o, dt, pat in cases:
        bar.set_postfix_str(f"GEMM {t}x{k}x{o} {jnp.dtype(dt).name} {pat}")
        gemm.append(bench_gemm(t, k, o, dt, pat, warmup, gemm_runs))
        bar.update(1)
    bar.set_postfix_str("GEMM profile")
    profile = [] if args.skip_gemm else profile_gemm(
        *profile_shape, warmup, gemm_runs, patterns=("checkerboard",) if args.quick else ("checkerboard", "even"))
    bar.update(1)
    model_results = []
    for name, case in models.items():
        bar.set_postfix_str(f"{name}: FLOPs")
        model_results.append(bench_model(name, case, warmup, runs, compile_reps, progress, not args.no_faults))
        progress(f"{name}: done")
    bar.close()
    meta["loadavg_end"] = _loadavg()
    meta["wall_s"] = time.perf_counter() - t_start

    results: dict[str, Any] = {
        "meta": meta,
        "gemm": gemm,
        "gemm_profile": profile,
        "models": model_results,
        "train_step": {m["model"]: m["train_step"] for m in model_results},
        "memory": {m["model"]: m["memory"] for m in model_results},
        "compile": {m["model"]: m["compile"] for m in model_results},
        "flops": {m["model"]: m["flops"] for m in model_results},
        "floor": {m["model"]: {k: m["memory"][k] for k in ("floor", "floor_default")} for m in model_results},
        "proxy": {m["model"]: m["proxy"] for m in model_results},
    }
    mp_text = ""
    if args.multiprocess:
        from benchmarks import multiprocess  # noqa: PLC0415

        bar.write("multiprocess: 2 processes vs 1")
        results["multiprocess"] = multiprocess.bench(quick=args.quick)
        mp_text = multiprocess.table(results["multiprocess"])
    summary, items = target_summary(results)
    results["targets"] = items
    tables = model_tables(model_results)
    model_desc = "; ".join(f"{m['model']}: {m['desc']}" for m in model_results)
    text = "\n\n".join([
        *([f"### grad-weight GEMM dW = Aᵀ·dY (median of {gemm_runs} runs; restore_scale=0.03)",
           gemm_tables(gemm, profile)] if gemm else []),
        *([
            f"### Training step (adamw; median of {runs} interleaved runs after {warmup} warm-up)",
            f"Models: {model_desc}. FST: `FSTConfig(mode=..., skip_first=False, skip_last=False)`: every "
            "weight matmul is sparse, the first and last included; pattern checkerboard except in the "
            "`even` columns (`pattern=\"even\"`); *default config*: `FSTConfig()` (compact, checkerboard, "
            "first and last weight matmul dense). *paired*: median over the runs of dense time / compact "
            "time of the same repetition.",
            tables["train_step"],
            "#### Keyed variants: rotating patterns and the mvue grad-weight (issue 14)",
            "The benchmark config with `pattern=\"rotating\"` (the authors' four patterns, compact: one "
            "compiled step for every draw) and with `grad_weight=\"mvue\"` (keeps the whole activation; a "
            "dense GEMM on the sampled dY on XLA), each step taking the step number as a traced `fst_key`, "
            "in the same rotation. *rotating / fixed*: median over the runs of rotating time / compact "
            "time of the same repetition.",
            tables["keyed"],
            "### Memory (residuals of jit(jax.vjp) on the real shapes; compiled temp of the training step)",
            "*floor*: the residuals of the same model when every sparse weight matmul keeps only the kept "
            "half of its activation, once per distinct activation, and nothing else (benchmarks/overhead.py); "
            "*floor_default*: the same with the first and last weight matmul dense (the default config). "
            "*residual / floor*: compact against *floor*, default config against *floor_default*.",
            tables["memory"],
            f"### Trace+lower and compile time of the training step (best of {compile_reps}, fresh functions)",
            tables["compile"],
            "### Matmul FLOPs per training step (fst_jax.report)",
            tables["flops"],
            "### GPU proxy: FST's own bytes per step as a share of an H200 step",
            "H200: 4.3 TB/s device copy (read + write), 790 TFLOP/s bf16 dense. Share = FST extra bytes / "
            "4.3 TB/s ÷ (dense GEMM FLOPs / 790 TFLOP/s + dense other bytes / 4.3 TB/s), the dense other bytes "
            "those of the compiled step for both bounds. *HLO*: non-GEMM "
            "bytes of the step, FST minus dense (fused: the compiled CPU module, each instruction one pass; "
            "unfused: the unoptimized module, every op one pass). *analytic*: the recipe's passes per sparse "
            "matmul (benchmarks/overhead.py, `analytic_extra_bytes`). Bytes at each model's own dtypes.",
            tables["proxy"],
        ] if model_results else []),
        *(["### Data-parallel training over 2 processes (benchmarks/multiprocess.py)", mp_text] if mp_text else []),
        "### Targets",
        summary,
    ])
    print(text)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plot(results, out_dir / "benchmarks.png")
    print(f"\nwrote {out_dir / 'results.json'} and {out_dir / 'benchmarks.png'} "
          f"({meta['wall_s']:.0f} s)")
    if not args.quick and not args.no_append:
        append_results(meta, text)
        print(f"appended to {RESULTS_MD}")
    return 0


def machine_lines(meta: dict[str, Any]) -> list[str]:
    """The machine description of a RESULTS.md section (command, platform, CPU, JAX, load, time)."""
    return [f"command: `{meta['command']}`",
            f"platform: {meta['platform']}; Python {meta['python']}",
            f"CPU: {meta['cpu'] or 'unknown'}; {meta['cores']} cores",
            f"jax {meta['jax']}, jaxlib {meta['jaxlib']}; backend `{meta['backend']}` ({meta['device']})",
            f"load average (1, 5, 15 min) at start {meta['loadavg_start']}, at end {meta['loadavg_end']}",
            f"allocator: {meta.get('malloc', 'default')}",
            f"wall time {meta['wall_s']:.0f} s"]


def append_section(heading: str, lines: Sequence[str], text: str) -> None:
    """Appends ``## heading``, a bullet list and ``text`` (``###`` demoted to ``####``) to
    ``benchmarks/RESULTS.md`` (created with its header when missing). Every benchmark uses this."""
    if not RESULTS_MD.exists():
        RESULTS_MD.write_text(RESULTS_HEADER)
    head = f"\n## {heading}\n\n" + "".join(f"- {line}\n" for line in lines) + "\n"
    with RESULTS_MD.open("a") as f:
        f.write(head + text.replace("### ", "#### ") + "\n")


def append_results(meta: dict[str, Any], text: str) -> None:
    """Appends a dated section (machine description + tables) to ``benchmarks/RESULTS.md``."""
    append_section(meta["date"], machine_lines(meta), text)


if __name__ == "__main__":
    sys.exit(main())
