"""GPU benchmarks of the Pallas-Triton kernels of fst_jax, against the card's ceilings and XLA.

Run on the GPU machine (H100/H200, jax 0.11.2), from the repository root, in one command::

    JAX_PLATFORMS=cuda PYTHONPATH=. python -m benchmarks.gpu_kernels

It takes a few minutes, prints markdown tables, writes ``benchmarks/out/gpu/results.json`` and
appends a dated section (date, ``jax.devices()[0].device_kind``, JAX version, command) to
``benchmarks/RESULTS.md``. Options: ``--out DIR`` (where results.json goes), ``--no-append``,
``--runs N`` (timed runs, default 30), ``--quick`` (tiny shapes, 2 runs; nothing appended) and
``--interpret`` (the kernels run in the Pallas interpreter, on any backend; nothing appended).
Without a GPU and without ``--interpret`` the command exits with status 2.
``python -m benchmarks.gpu_kernels --quick --interpret`` is a CPU smoke run (well under a minute)
that only keeps this script from rotting: **interpret-mode timings mean nothing**.

**How it times.** Every Pallas kernel is compiled for the GPU (``interpret=False``) and called
through ``jax.jit``. Each variant is warmed up (compiled) first; then every timed run calls the
variant ``inner`` times back to back and waits for the last result with
``jax.block_until_ready`` (one GPU stream runs them in order), and the run's time is the wall time
divided by ``inner``. ``inner`` is picked once per variant so that a run lasts at least ~5 ms,
which hides the ~10 µs Python dispatch of one call. The variants of one table are timed
round-robin (interleaved), and every number is the median of the timed runs (default 30).

Sections (the keys of ``results.json``) and their targets:

``ceilings``
    The card, measured on the spot. *copy*: a device-to-device copy of a 1 GiB bf16 array
    (``jit(jnp.copy)``), ``GB/s = 2·bytes/time`` (read + write). *elementwise*: ``x * 2`` over the
    same array, for comparison. *matmul*: a dense bf16 ``8192×8192×8192`` ``jnp.dot`` (XLA,
    cuBLAS), ``TFLOP/s = 2·M·N·K/time``.
``prune_compress``
    :func:`fst_jax.kernels.prune_compress_2to4` of an ``8192×4096`` bf16 weight along its last
    axis. *GB/s* counts the bytes read (the weight) plus written (values, half the weight, and
    metadata, 1/16 of it). **Target: ≥ 70 % of the copy bandwidth.** Compared with what the XLA
    path runs, ``where(fst_jax.mask_2to4(w), w, 0)`` (reads and writes the dense weight), with the
    kernel's pure-jnp ``_reference`` (the same compression in XLA), and, for the inverse,
    :func:`~fst_jax.kernels.decompress_2to4` against its XLA reference. A sweep over block
    shapes shows how far the defaults are from the best.
``sparse_matmul``
    :func:`fst_jax.kernels.sparse_matmul` for ``A [M=8192, K=4096]`` 2:4-compressed along ``K``
    times a dense ``B [K, N=4096]``, bf16 with float32 accumulation. *TFLOP/s* counts dense
    FLOPs, ``2·M·N·K``. **Target: time ≤ 1.1 × XLA's dense** ``jnp.dot`` of the same (pruned,
    dense) ``A`` and ``B``. The bytes of the sparse operand (values + metadata) are compared with
    those of the dense ``A``: 1/2 + 1/16 of them, 43.75 % fewer. Also timed: the Pallas
    decompression followed by XLA's dense dot. No JAX route reaches the H100's 2:4 sparse tensor
    cores (DESIGN.md §4), so the kernel can save lhs bytes, not FLOPs.
``grad_weight_shift``
    :func:`fst_jax.kernels.grad_weight_shift` (the compact grad-weight product with the gradient
    shift fused, ``restore_scale=0.03``) for ``A [B=8, T=1024, K=4096]`` and
    ``dY [8, 1024, O=4096]``, bf16, for the ``checkerboard`` pattern (the default; the targets)
    and ``even``. Compared with XLA's dense grad-weight ``einsum('btk,bto->ko', A, dY)``
    (**target: ≥ 1.3× faster**), with XLA's compact path ``fst_jax._dot._compact_grad_weight``
    on the kept half of ``A`` already gathered (what the compact ``custom_vjp`` saves) and with
    the gather included (``_compact_parts`` in the same jit; the kernel reads the full ``A``)
    (**target: no slower than either**), and with the masked XLA product (masked ``A``, shifted
    ``dY``, one dense GEMM). Ratios are *other time / kernel time*: above 1, the kernel is faster.
``train_step``
    One jitted training step (forward, backward, ``optax.adamw`` update; nothing donated) of a
    pre-LN transformer block, ``d=1024``, 16 heads, MLP 4×, ``x [batch 8, seq 1024, 1024]``:
    float32 parameters and optimizer state, bf16 compute (Flax ``dtype=bfloat16``, bf16 input
    and activations), loss ``mean(y²)`` in float32. Variants: the untransformed loss (*dense*) and
    ``fst_jax.sparsify(loss, FSTConfig(mode="compact", skip_first=False, skip_last=False,
    backend=...))`` with ``backend="xla"`` and, when ``FSTConfig(backend="pallas")`` exists (it
    raised ``NotImplementedError`` before the Pallas integration landed), ``backend="pallas"``;
    otherwise that row says "not available". Target (the CPU suite's): dense / FST ≥ 1.08.
``targets``
    Every target with the measured value and met/MISSED.

Each kernel's output is also checked once against its ``_reference`` (exact for the
compression, relative error for the products); a failed check, or a kernel that fails to
compile at its default blocks, makes the exit status 1 (after everything is written).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import inspect
import json
import math
import os
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import fst_jax
from benchmarks import run as cpu_suite
from benchmarks.run import md_table
from fst_jax import _dot
from fst_jax._compat import ignore_triton_deprecation
from fst_jax.kernels import decompress_2to4, grad_weight_shift, prune_compress_2to4, sparse_matmul
from fst_jax.kernels import prune_compress as _pc

# The kernel modules hold the ``_reference`` s; ``fst_jax.kernels.sparse_matmul`` (the attribute)
# is the function re-exported under the module's name, so the modules are looked up by name.
_spmm_mod = importlib.import_module("fst_jax.kernels.sparse_matmul")
_gws_mod = importlib.import_module("fst_jax.kernels.grad_weight_shift")

ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "out" / "gpu"
COMMAND = "python -m benchmarks.gpu_kernels"
NO_GPU_MESSAGE = ("no GPU: run on a GPU machine, or use --quick --interpret for a CPU smoke run "
                  "(JAX sees backend {backend!r})")
INTERPRET_NOTE = ("INTERPRET MODE: the Pallas kernels run in the Pallas interpreter, not compiled for "
                  "a GPU. Every timing, ratio and met/missed in this run means nothing; the run only "
                  "checks that the benchmark script works.")

RESTORE_SCALE = 0.03  # FSTConfig's default
MIN_RUN_S = 5e-3  # each timed run lasts at least this long (calls repeated back to back)
MAX_INNER = 256

# Targets: key -> (description, threshold, comparison).
TARGETS: dict[str, tuple[str, float, str]] = {
    "prune_bw": ("prune_compress_2to4 bandwidth / copy bandwidth", 0.70, ">="),
    "spmm_vs_dense": ("sparse_matmul time / XLA dense jnp.dot time", 1.1, "<="),
    "gws_vs_dense": ("XLA dense grad-weight time / grad_weight_shift time", 1.3, ">="),
    "gws_vs_compact": ("XLA compact (pre-gathered) time / grad_weight_shift time", 1.0, ">="),
    "gws_vs_compact_gather": ("XLA compact incl. gather time / grad_weight_shift time", 1.0, ">="),
    "train_xla": ("train step dense / FST compact backend=xla", cpu_suite.TARGETS["train_compact"][1], ">="),
    "train_pallas": ("train step dense / FST compact backend=pallas",
                     cpu_suite.TARGETS["train_compact"][1], ">="),
}


# ------------------------------------------------------------------------------------------------
# Shapes


def shapes(quick: bool) -> dict[str, Any]:
    """The benchmark shapes: the real ones, or tiny ones for ``--quick``."""
    if quick:
        return dict(copy_bytes=2**20, matmul=(128, 128, 128), prune=(128, 128), spmm=(128, 128, 128),
                    gws=(2, 64, 128, 128), block=dict(d=64, heads=4, seq=32, batch=2))
    return dict(copy_bytes=2**30, matmul=(8192, 8192, 8192), prune=(8192, 4096), spmm=(8192, 4096, 4096),
                gws=(8, 1024, 4096, 4096), block=dict(d=1024, heads=16, seq=1024, batch=8))


def _defaults(fn: Callable, names: Sequence[str]) -> dict[str, Any]:
    """The default values of keyword arguments of ``fn`` (the kernels' default blocks)."""
    params = inspect.signature(fn).parameters
    return {n: params[n].default for n in names}


PRUNE_DEFAULT = _defaults(prune_compress_2to4, ("block", "num_warps", "num_stages"))
SPMM_DEFAULT = _defaults(sparse_matmul, ("block_m", "block_n", "block_k", "num_warps", "num_stages"))
GWS_DEFAULT = _defaults(grad_weight_shift, ("block_k", "block_o", "block_t", "num_warps", "num_stages"))

# Block sweeps (the default first). A configuration that does not compile (shared memory,
# registers) is reported as failed and does not stop the run.
PRUNE_SWEEP = [PRUNE_DEFAULT] + [
    dict(block=(32, 256), num_warps=4, num_stages=1), dict(block=(8, 512), num_warps=4, num_stages=1),
    dict(block=(32, 512), num_warps=8, num_stages=1), dict(block=(64, 128), num_warps=4, num_stages=1),
]
SPMM_SWEEP = [SPMM_DEFAULT] + [
    dict(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3),
    dict(block_m=128, block_n=128, block_k=64, num_warps=4, num_stages=4),
    dict(block_m=128, block_n=64, block_k=128, num_warps=4, num_stages=3),
    dict(block_m=128, block_n=256, block_k=128, num_warps=8, num_stages=3),
    dict(block_m=64, block_n=128, block_k=256, num_warps=4, num_stages=3),
]
GWS_SWEEP = [GWS_DEFAULT] + [
    dict(block_k=128, block_o=128, block_t=32, num_warps=8, num_stages=2),
    dict(block_k=128, block_o=128, block_t=64, num_warps=8, num_stages=3),
    dict(block_k=64, block_o=128, block_t=64, num_warps=4, num_stages=3),
    dict(block_k=128, block_o=64, block_t=64, num_warps=4, num_stages=3),
]


def _sweep(configs: list[dict[str, Any]], quick: bool) -> list[dict[str, Any]]:
    out = []
    for c in configs[:2] if quick else configs:
        if c not in out:
            out.append(c)
    return out


def _config_str(c: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in c.items())


# ------------------------------------------------------------------------------------------------
# Timing


def _error_str(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def time_fns(fns: dict[str, Callable[[], Any]], *, warmup: int, runs: int, min_run_s: float,
             optional: Sequence[str] = ()) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Times thunks round-robin; see the module docstring ("How it times").

    Args:
      fns: name -> a thunk that launches the computation and returns its (device) result.
      warmup: untimed calls of each thunk first (at least 1: it compiles).
      runs: timed runs of each thunk.
      min_run_s: each run repeats its thunk back to back until it lasts about this long (0: once).
      optional: names whose failure (at compile or run time) is recorded instead of raised.

    Returns:
      ``(summaries, errors)``: name -> ``{median_s, min_s, inner, times_s}`` for the thunks that
      ran, and name -> error message for the optional ones that failed.
    """
    ok: dict[str, Callable[[], Any]] = {}
    errors: dict[str, str] = {}
    for name, fn in fns.items():
        try:
            for _ in range(max(warmup, 1)):
                jax.block_until_ready(fn())
        except Exception as e:  # noqa: BLE001 - a block config may not compile; recorded
            if name not in optional:
                raise
            errors[name] = _error_str(e)
            continue
        ok[name] = fn
    inner: dict[str, int] = {}
    for name, fn in ok.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        once = time.perf_counter() - t0
        inner[name] = 1 if min_run_s <= 0 else max(1, min(MAX_INNER, math.ceil(min_run_s / max(once, 1e-7))))
    times: dict[str, list[float]] = {name: [] for name in ok}
    for _ in range(runs):
        for name, fn in ok.items():
            n = inner[name]
            t0 = time.perf_counter()
            for _ in range(n):
                out = fn()
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t0) / n)
            del out
    summaries = {name: {"median_s": statistics.median(ts), "min_s": min(ts), "inner": inner[name],
                        "times_s": ts} for name, ts in times.items()}
    return summaries, errors


def _normal(key: int, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return jax.block_until_ready(
        jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32).astype(dtype))(jax.random.key(key)))


def _gb_s(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _tflop_s(flops: float, seconds: float) -> float:
    return flops / seconds / 1e12


def _rel_err(x: Any, ref: Any) -> float:
    """max |x − ref| / max |ref| (float32, NumPy)."""
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(x - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def _bits_equal(x: Any, y: Any) -> bool:
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    return bool(np.array_equal(x.view(np.uint8), y.view(np.uint8)))


# ------------------------------------------------------------------------------------------------
# 1. Ceilings


def bench_ceilings(sh: dict[str, Any], warmup: int, runs: int, min_run_s: float) -> dict[str, Any]:
    """Copy bandwidth and dense bf16 matmul throughput of the device."""
    n = sh["copy_bytes"] // 2
    x = jax.block_until_ready(jax.jit(lambda: jnp.arange(n, dtype=jnp.int32).astype(jnp.bfloat16))())
    copy = jax.jit(jnp.copy)
    scale = jax.jit(lambda x: x * jnp.asarray(2, x.dtype))
    m, k, nn_ = sh["matmul"]
    a, b = _normal(10, (m, k), jnp.bfloat16), _normal(11, (k, nn_), jnp.bfloat16)
    dot = jax.jit(jnp.dot)
    t, _ = time_fns({"copy": lambda: copy(x), "elementwise": lambda: scale(x)},
                    warmup=warmup, runs=runs, min_run_s=min_run_s)
    tm, _ = time_fns({"matmul": lambda: dot(a, b)}, warmup=warmup, runs=runs, min_run_s=min_run_s)
    nbytes = int(x.nbytes)
    flops = 2 * m * k * nn_
    return {
        "copy": {"bytes": nbytes, **t["copy"], "gb_s": _gb_s(2 * nbytes, t["copy"]["median_s"])},
        "elementwise": {"bytes": nbytes, **t["elementwise"],
                        "gb_s": _gb_s(2 * nbytes, t["elementwise"]["median_s"])},
        "matmul": {"shape": [m, k, nn_], "dtype": "bfloat16", "flops": flops, **tm["matmul"],
                   "tflop_s": _tflop_s(flops, tm["matmul"]["median_s"])},
    }


# ------------------------------------------------------------------------------------------------
# 2. prune_compress_2to4


def bench_prune(sh: dict[str, Any], interpret: bool, quick: bool, copy_gb_s: float, warmup: int, runs: int,
                min_run_s: float) -> dict[str, Any]:
    """prune_compress_2to4 / decompress_2to4 against XLA, and a block sweep."""
    rows, cols = sh["prune"]
    w = _normal(20, (rows, cols), jnp.bfloat16)
    configs = _sweep(PRUNE_SWEEP, quick)
    kernels = {f"pallas_{i}": jax.jit(functools.partial(prune_compress_2to4, axis=-1, interpret=interpret, **c))
               for i, c in enumerate(configs)}
    mask_where = jax.jit(lambda w: jnp.where(fst_jax.mask_2to4(w, axis=-1), w, jnp.zeros((), w.dtype)))
    ref = jax.jit(_pc._reference)
    values, metadata = jax.block_until_ready(ref(w))  # what the kernel returns (checked below)
    decomp = jax.jit(functools.partial(decompress_2to4, interpret=interpret, **PRUNE_DEFAULT))
    decomp_ref = jax.jit(_pc._decompress_reference)

    fns: dict[str, Callable[[], Any]] = {name: functools.partial(k, w) for name, k in kernels.items()}
    fns.update({"xla_mask_where": lambda: mask_where(w), "xla_reference": lambda: ref(w),
                "pallas_decompress": lambda: decomp(values, metadata),
                "xla_decompress_reference": lambda: decomp_ref(values, metadata)})
    t, errors = time_fns(fns, warmup=warmup, runs=runs, min_run_s=min_run_s,
                         optional=[*kernels, "pallas_decompress"])

    compressed = int(values.nbytes + metadata.nbytes)
    moved = {"pallas": int(w.nbytes) + compressed, "xla_mask_where": 2 * int(w.nbytes),
             "xla_reference": int(w.nbytes) + compressed, "pallas_decompress": compressed + int(w.nbytes),
             "xla_decompress_reference": compressed + int(w.nbytes)}
    res: dict[str, Any] = {"shape": [rows, cols], "dtype": "bfloat16", "weight_bytes": int(w.nbytes),
                           "values_bytes": int(values.nbytes), "metadata_bytes": int(metadata.nbytes)}

    def entry(name: str, kind: str) -> dict[str, Any]:
        if name not in t:
            return {"error": errors.get(name, "did not run")}
        e = dict(t[name])
        e["bytes_moved"] = moved[kind]
        e["gb_s"] = _gb_s(moved[kind], e["median_s"])
        e["fraction_of_copy"] = e["gb_s"] / copy_gb_s
        return e

    res["pallas"] = entry("pallas_0", "pallas")
    for name in ("xla_mask_where", "xla_reference", "pallas_decompress", "xla_decompress_reference"):
        res[name] = entry(name, name)
    if "median_s" in res["pallas"]:
        p = res["pallas"]["median_s"]
        res["xla_mask_where_vs_pallas"] = res["xla_mask_where"]["median_s"] / p
        res["xla_reference_vs_pallas"] = res["xla_reference"]["median_s"] / p
    if "median_s" in res["pallas_decompress"]:
        res["xla_decompress_vs_pallas"] = (res["xla_decompress_reference"]["median_s"]
                                           / res["pallas_decompress"]["median_s"])
    res["sweep"] = [{"config": {k: list(v) if isinstance(v, tuple) else v for k, v in c.items()},
                     **entry(f"pallas_{i}", "pallas")} for i, c in enumerate(configs)]

    check: dict[str, Any] = {}
    if "median_s" in res["pallas"]:
        k_values, k_metadata = kernels["pallas_0"](w)
        check["values_exact"] = _bits_equal(k_values, values)
        check["metadata_exact"] = _bits_equal(k_metadata, metadata)
    if "median_s" in res["pallas_decompress"]:
        check["decompress_exact"] = _bits_equal(decomp(values, metadata), decomp_ref(values, metadata))
    check["ok"] = "values_exact" in check and all(check.values())
    res["check"] = check
    return res


# ------------------------------------------------------------------------------------------------
# 3. sparse_matmul


def bench_spmm(sh: dict[str, Any], interpret: bool, quick: bool, warmup: int, runs: int,
               min_run_s: float) -> dict[str, Any]:
    """sparse_matmul against XLA's dense dot, and a block sweep."""
    m, k, n = sh["spmm"]
    a = _normal(30, (m, k), jnp.bfloat16)
    b = _normal(31, (k, n), jnp.bfloat16)
    values, metadata = jax.block_until_ready(jax.jit(_pc._reference)(a))
    a_pruned = jax.block_until_ready(jax.jit(_pc._decompress_reference)(values, metadata))
    configs = _sweep(SPMM_SWEEP, quick)
    kernels = {f"pallas_{i}": jax.jit(functools.partial(sparse_matmul, interpret=interpret, **c))
               for i, c in enumerate(configs)}
    dense = jax.jit(jnp.dot)
    decomp = jax.jit(functools.partial(decompress_2to4, interpret=interpret, **PRUNE_DEFAULT))
    decomp_dot = jax.jit(lambda v, md, b: jnp.dot(decomp(v, md), b))
    fns: dict[str, Callable[[], Any]] = {name: functools.partial(kern, values, metadata, b)
                                         for name, kern in kernels.items()}
    fns.update({"xla_dense": lambda: dense(a_pruned, b),
                "pallas_decompress_xla_dot": lambda: decomp_dot(values, metadata, b)})
    t, errors = time_fns(fns, warmup=warmup, runs=runs, min_run_s=min_run_s,
                         optional=[*kernels, "pallas_decompress_xla_dot"])
    flops = 2 * m * n * k
    d = t["xla_dense"]["median_s"]

    def entry(name: str) -> dict[str, Any]:
        if name not in t:
            return {"error": errors.get(name, "did not run")}
        e = dict(t[name])
        e["tflop_s"] = _tflop_s(flops, e["median_s"])
        e["time_vs_dense"] = e["median_s"] / d
        return e

    sparse_bytes = int(values.nbytes + metadata.nbytes)
    res: dict[str, Any] = {
        "shape": {"M": m, "K": k, "N": n}, "dtype": "bfloat16", "flops_dense": flops,
        "lhs_bytes": {"dense": int(a.nbytes), "values": int(values.nbytes), "metadata": int(metadata.nbytes),
                      "sparse": sparse_bytes, "sparse_vs_dense": sparse_bytes / int(a.nbytes),
                      "fewer": 1 - sparse_bytes / int(a.nbytes)},
        "xla_dense": entry("xla_dense"),
        "pallas": entry("pallas_0"),
        "pallas_decompress_xla_dot": entry("pallas_decompress_xla_dot"),
        "sweep": [{"config": c, **entry(f"pallas_{i}")} for i, c in enumerate(configs)],
    }
    check: dict[str, Any] = {}
    if "median_s" in res["pallas"]:
        out = kernels["pallas_0"](values, metadata, b)
        check["max_rel_err_vs_reference"] = _rel_err(out, jax.jit(_spmm_mod._reference)(values, metadata, b))
        check["ok"] = check["max_rel_err_vs_reference"] < 2e-2
    else:
        check["ok"] = False
    res["check"] = check
    return res


# ------------------------------------------------------------------------------------------------
# 4. grad_weight_shift


def _plan_3d(a: jax.Array, w: jax.Array, pattern: str) -> _dot.GemmPlan:
    """The :class:`fst_jax._dot.GemmPlan` that ``sparsify`` builds for ``a @ w``, a: [B, T, K]."""
    params = jax.make_jaxpr(lambda a, w: a @ w)(a, w).eqns[0].params
    return _dot.GemmPlan(
        dot_params=tuple(sorted(params.items())), weight_side=1, forward=True,
        grad_input="prune_output_dim", grad_weight="fixed_mask", k_axis=0, o_axis=1, t_axis=1,
        t_out_axis=1, act_contract=(2,), pattern=pattern, restore_scale=RESTORE_SCALE, mode="compact")


def bench_gws(sh: dict[str, Any], pattern: str, interpret: bool, quick: bool, warmup: int, runs: int,
              min_run_s: float, sweep: bool) -> dict[str, Any]:
    """grad_weight_shift against XLA's dense, masked and compact grad-weight products."""
    nb, t_len, k, o = sh["gws"]
    a = _normal(40, (nb, t_len, k), jnp.bfloat16)
    dy = _normal(41, (nb, t_len, o), jnp.bfloat16)
    w = jnp.zeros((k, o), jnp.bfloat16)
    plan = _plan_3d(a, w, pattern)
    mplan = dataclasses.replace(plan, mode="masked")
    parts = jax.block_until_ready(jax.jit(functools.partial(_dot._compact_parts, plan))(a))
    configs = _sweep(GWS_SWEEP, quick) if sweep else [GWS_DEFAULT]
    kernels = {f"pallas_{i}": jax.jit(functools.partial(grad_weight_shift, pattern=pattern, scale=RESTORE_SCALE,
                                                        interpret=interpret, **c))
               for i, c in enumerate(configs)}
    dense = jax.jit(lambda a, dy: jnp.einsum("btk,bto->ko", a, dy))
    masked = jax.jit(functools.partial(cpu_suite._masked_grad_weight, mplan))
    compact = jax.jit(functools.partial(_dot._compact_grad_weight, plan))
    gather = jax.jit(lambda a, w, dy: _dot._compact_grad_weight(plan, _dot._compact_parts(plan, a), w, dy))
    fns: dict[str, Callable[[], Any]] = {name: functools.partial(kern, a, dy) for name, kern in kernels.items()}
    fns.update({"xla_dense": lambda: dense(a, dy), "xla_masked": lambda: masked(a, w, dy),
                "xla_compact": lambda: compact(parts, w, dy), "xla_compact_gather": lambda: gather(a, w, dy)})
    t, errors = time_fns(fns, warmup=warmup, runs=runs, min_run_s=min_run_s, optional=list(kernels))
    flops_dense = 2 * nb * t_len * k * o

    def entry(name: str, flops: int) -> dict[str, Any]:
        if name not in t:
            return {"error": errors.get(name, "did not run")}
        e = dict(t[name])
        e["tflop_s"] = _tflop_s(flops, e["median_s"])
        return e

    res: dict[str, Any] = {"shape": {"B": nb, "T": t_len, "K": k, "O": o}, "dtype": "bfloat16",
                           "pattern": pattern, "restore_scale": RESTORE_SCALE, "flops_dense": flops_dense,
                           "flops_compact": flops_dense // 2}
    for name in ("xla_dense", "xla_masked"):
        res[name] = entry(name, flops_dense)
    for name in ("xla_compact", "xla_compact_gather"):
        res[name] = entry(name, flops_dense // 2)
    res["pallas"] = entry("pallas_0", flops_dense // 2)
    sweep_rows = []
    for i, c in enumerate(configs):
        e = {"config": c, **entry(f"pallas_{i}", flops_dense // 2)}
        if "median_s" in e:
            e["dense_vs_pallas"] = res["xla_dense"]["median_s"] / e["median_s"]
        sweep_rows.append(e)
    res["sweep"] = sweep_rows
    check: dict[str, Any] = {}
    if "median_s" in res["pallas"]:
        p = res["pallas"]["median_s"]
        for name in ("xla_dense", "xla_masked", "xla_compact", "xla_compact_gather"):
            res[f"{name}_vs_pallas"] = res[name]["median_s"] / p
        ref = jax.jit(functools.partial(_gws_mod._reference, pattern=pattern, scale=RESTORE_SCALE))(a, dy)
        check["max_rel_err_vs_reference"] = _rel_err(kernels["pallas_0"](a, dy), ref)
        check["xla_compact_max_rel_err_vs_reference"] = _rel_err(compact(parts, w, dy), ref)
        check["ok"] = check["max_rel_err_vs_reference"] < 2e-2
    else:
        check["ok"] = False
    res["check"] = check
    return res


# ------------------------------------------------------------------------------------------------
# 5. Transformer-block training step


class Block(nn.Module):
    """A pre-LN transformer block, ``x + MHA(LN(x))`` then ``x + MLP(LN(x))`` (gelu, 4×), computing
    in ``dtype`` with float32 parameters."""

    num_heads: int
    dtype: Any = jnp.bfloat16
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        h = nn.LayerNorm(dtype=self.dtype)(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=d, dtype=self.dtype)(h)
        h = nn.LayerNorm(dtype=self.dtype)(x)
        h = nn.gelu(nn.Dense(self.mlp_ratio * d, dtype=self.dtype)(h))
        return x + nn.Dense(d, dtype=self.dtype)(h)


def fst_config(backend: str) -> fst_jax.FSTConfig:
    """The benchmarked config: compact, every weight matmul sparse, on ``backend``."""
    return fst_jax.FSTConfig(mode="compact", skip_first=False, skip_last=False, backend=backend)


def pallas_backend() -> tuple[fst_jax.FSTConfig | None, str | None]:
    """``(config, None)`` if ``FSTConfig(backend="pallas")`` is accepted, else ``(None, reason)``."""
    try:
        return fst_config("pallas"), None
    except NotImplementedError as e:
        return None, f"not available: {_error_str(e)}"


def bench_train(sh: dict[str, Any], warmup: int, runs: int, min_run_s: float) -> dict[str, Any]:
    """Dense vs FST (XLA, and Pallas when available) training steps of one transformer block."""
    c = sh["block"]
    module = Block(num_heads=c["heads"])
    kp, kx = jax.random.split(jax.random.key(50))
    x = jax.random.normal(kx, (c["batch"], c["seq"], c["d"]), jnp.float32).astype(jnp.bfloat16)
    params = jax.jit(module.init)(kp, x)["params"]

    def loss(params: Any, x: jax.Array) -> jax.Array:
        y = module.apply({"params": params}, x)
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    opt = optax.adamw(1e-3)
    opt_state = opt.init(params)
    pallas_cfg, pallas_reason = pallas_backend()
    variants: dict[str, Callable] = {"dense": loss, "fst_xla": fst_jax.sparsify(loss, fst_config("xla"))}
    if pallas_cfg is not None:
        variants["fst_pallas"] = fst_jax.sparsify(loss, pallas_cfg)
    compiled: dict[str, Any] = {}
    compile_s: dict[str, float] = {}
    errors: dict[str, str] = {}
    for name, fn in variants.items():
        t0 = time.perf_counter()
        try:
            compiled[name] = jax.jit(cpu_suite.make_step(fn, opt)).lower(params, opt_state, x).compile()
        except Exception as e:  # noqa: BLE001 - the Pallas backend may not be ready; recorded
            if name != "fst_pallas":
                raise
            errors[name] = f"failed: {_error_str(e)}"
            traceback.print_exc(file=sys.stderr)
            continue
        compile_s[name] = time.perf_counter() - t0
    fns = {name: functools.partial(cfn, params, opt_state, x) for name, cfn in compiled.items()}
    t, run_errors = time_fns(fns, warmup=warmup, runs=runs, min_run_s=min_run_s, optional=["fst_pallas"])
    errors.update({k: f"failed: {v}" for k, v in run_errors.items()})
    rep = fst_jax.report(loss, fst_config("xla"))(params, x)
    res: dict[str, Any] = {
        "model": (f"pre-LN block d={c['d']}, {c['heads']} heads, MLP 4x, x [{c['batch']}, {c['seq']}, "
                  f"{c['d']}]; f32 params + adamw state, bf16 compute and activations"),
        "shape": c, "param_dtype": "float32", "compute_dtype": "bfloat16",
        "n_params": sum(int(p.size) for p in jax.tree.leaves(params)),
        "flops": {"dense": rep.flops_dense, "fst": rep.flops_fst, "ratio": rep.flops_fst / rep.flops_dense},
    }
    for name in ("dense", "fst_xla", "fst_pallas"):
        if name in t:
            res[name] = {**t[name], "compile_s": compile_s[name], "status": "ok"}
        elif name == "fst_pallas":
            res[name] = {"status": errors.get(name, pallas_reason or "did not run")}
    d = res["dense"]["median_s"]
    res["speedup_fst_xla"] = d / res["fst_xla"]["median_s"]
    if res["fst_pallas"]["status"] == "ok":
        res["speedup_fst_pallas"] = d / res["fst_pallas"]["median_s"]
        res["fst_xla_vs_fst_pallas"] = res["fst_xla"]["median_s"] / res["fst_pallas"]["median_s"]
    return res


# ------------------------------------------------------------------------------------------------
# Report


def _met(value: float | None, key: str, interpret: bool) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    if interpret:
        return "n/a (interpret)"
    _, threshold, op = TARGETS[key]
    return "met" if (value >= threshold if op == ">=" else value <= threshold) else "MISSED"


def _target_str(key: str) -> str:
    _, threshold, op = TARGETS[key]
    return f"{op} {threshold:.3g}"


def _ms(e: dict[str, Any]) -> str:
    return f"{e['median_s'] * 1e3:.3f}" if "median_s" in e else "failed"


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _rate(x: float | None) -> str:
    """A rate or size with 3-4 significant digits (GB/s, TFLOP/s, MiB, %)."""
    if x is None:
        return "n/a"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def target_items(results: dict[str, Any], interpret: bool) -> list[dict[str, Any]]:
    """Every target with its measured value (``None`` when the kernel did not run)."""
    pc, sp, tr = results["prune_compress"], results["sparse_matmul"], results["train_step"]
    gws = {c["pattern"]: c for c in results["grad_weight_shift"]}
    cb = gws["checkerboard"]
    items = [
        dict(key="prune_bw", value=pc["pallas"].get("fraction_of_copy")),
        dict(key="spmm_vs_dense", value=sp["pallas"].get("time_vs_dense")),
        dict(key="gws_vs_dense", value=cb.get("xla_dense_vs_pallas")),
        dict(key="gws_vs_compact", value=cb.get("xla_compact_vs_pallas")),
        dict(key="gws_vs_compact_gather", value=cb.get("xla_compact_gather_vs_pallas")),
        dict(key="train_xla", value=tr.get("speedup_fst_xla")),
        dict(key="train_pallas", value=tr.get("speedup_fst_pallas")),
    ]
    for it in items:
        it["what"] = TARGETS[it["key"]][0]
        it["target"] = _target_str(it["key"])
        it["met"] = _met(it["value"], it["key"], interpret)
        if it["key"] == "train_pallas" and it["value"] is None:
            it["met"] = tr["fst_pallas"]["status"]
    return items


def tables(results: dict[str, Any], interpret: bool) -> str:
    """The markdown text of a run."""
    ce, pc, sp, tr = (results[k] for k in ("ceilings", "prune_compress", "sparse_matmul", "train_step"))
    parts: list[str] = []
    if interpret:
        parts.append(f"**{INTERPRET_NOTE}**")

    parts.append("### Card ceilings (measured on the spot)")
    gib = ce["copy"]["bytes"] / 2**30
    parts.append(md_table(["measurement", "size", "median ms", "rate"], [
        ["device-to-device copy (jnp.copy)", f"{gib:.3g} GiB bf16", _ms(ce["copy"]),
         f"{_rate(ce['copy']['gb_s'])} GB/s (2·bytes/time)"],
        ["elementwise x*2", f"{gib:.3g} GiB bf16", _ms(ce["elementwise"]), f"{_rate(ce['elementwise']['gb_s'])} GB/s"],
        ["dense bf16 matmul (XLA)", "×".join(map(str, ce["matmul"]["shape"])), _ms(ce["matmul"]),
         f"{_rate(ce['matmul']['tflop_s'])} TFLOP/s"],
    ]))

    rows_, cols_ = pc["shape"]
    parts.append(f"### prune_compress_2to4, {rows_}×{cols_} bf16 weight, along the last axis")
    names = [("Pallas prune_compress_2to4", "pallas"), ("XLA mask_2to4 + where (dense out)", "xla_mask_where"),
             ("XLA compression (_reference)", "xla_reference"), ("Pallas decompress_2to4", "pallas_decompress"),
             ("XLA decompression (_decompress_reference)", "xla_decompress_reference")]
    prow = []
    for label, key in names:
        e = pc[key]
        is_t = key == "pallas"
        prow.append([label, _ms(e), _rate(e["bytes_moved"] / 2**20) if "bytes_moved" in e else "-",
                     _rate(e.get("gb_s")), _rate(100 * e["fraction_of_copy"]) if "gb_s" in e else "n/a",
                     ">= 70" if is_t else "-",
                     _met(e.get("fraction_of_copy"), "prune_bw", interpret) if is_t else "-"])
    parts.append(md_table(["op", "median ms", "bytes read+written MiB", "GB/s", "% of copy", "target %",
                           "met"], prow))
    parts.append(f"XLA mask+where time / Pallas time: {_f(pc.get('xla_mask_where_vs_pallas'))}; XLA "
                 f"compression / Pallas: {_f(pc.get('xla_reference_vs_pallas'))}; XLA decompression / Pallas: "
                 f"{_f(pc.get('xla_decompress_vs_pallas'))}. Correct (bit-exact vs _reference): "
                 f"{pc['check']['ok']}.")
    parts.append(md_table(["block sweep", "median ms", "GB/s", "% of copy"], [
        [_config_str(r["config"]), _ms(r), _rate(r.get("gb_s")),
         _rate(100 * r["fraction_of_copy"]) if "fraction_of_copy" in r else r.get("error", "")]
        for r in pc["sweep"]]))

    s = sp["shape"]
    lb = sp["lhs_bytes"]
    parts.append(f"### sparse_matmul, bf16 M={s['M']} K={s['K']} N={s['N']} (lhs 2:4-compressed along K)")
    srow = []
    for label, key in [("XLA dense jnp.dot (pruned A, dense)", "xla_dense"),
                       ("Pallas sparse_matmul", "pallas"),
                       ("Pallas decompress_2to4 + XLA dot", "pallas_decompress_xla_dot")]:
        e = sp[key]
        is_t = key == "pallas"
        srow.append([label, _ms(e), _rate(e.get("tflop_s")), _f(e.get("time_vs_dense")),
                     _target_str("spmm_vs_dense") if is_t else "-",
                     _met(e.get("time_vs_dense"), "spmm_vs_dense", interpret) if is_t else "-"])
    parts.append(md_table(["op", "median ms", "TFLOP/s (2·M·N·K)", "time / dense", "target", "met"], srow))
    parts.append(f"Sparse operand: values {_rate(lb['values'] / 2**20)} MiB + metadata "
                 f"{_rate(lb['metadata'] / 2**20)} MiB = {_rate(lb['sparse'] / 2**20)} MiB vs dense A "
                 f"{_rate(lb['dense'] / 2**20)} MiB: "
                 f"{100 * lb['fewer']:.2f}% fewer bytes. Correct (vs _reference): {sp['check']['ok']} "
                 f"(max rel err {_f(sp['check'].get('max_rel_err_vs_reference'), '.2e')}). XLA dense "
                 f"TFLOP/s / the matmul ceiling's: {_f(sp['xla_dense']['tflop_s'] / ce['matmul']['tflop_s'])}.")
    parts.append(md_table(["block sweep", "median ms", "TFLOP/s", "time / dense"], [
        [_config_str(r["config"]), _ms(r), _rate(r.get("tflop_s")),
         _f(r.get("time_vs_dense")) if "time_vs_dense" in r else r.get("error", "")] for r in sp["sweep"]]))

    g0 = results["grad_weight_shift"][0]["shape"]
    parts.append(f"### grad_weight_shift, bf16 A [{g0['B']}, {g0['T']}, {g0['K']}], dY [{g0['B']}, {g0['T']}, "
                 f"{g0['O']}], restore_scale={RESTORE_SCALE} (ratios: other time / Pallas time)")
    grow = []
    for c in results["grad_weight_shift"]:
        is_t = c["pattern"] == "checkerboard"

        def tcol(key: str, value: float | None, is_t: bool = is_t) -> list[str]:
            return [_f(value), _target_str(key) if is_t else "-", _met(value, key, interpret) if is_t else "-"]

        grow.append([c["pattern"], _ms(c["xla_dense"]), _ms(c["xla_masked"]), _ms(c["xla_compact"]),
                     _ms(c["xla_compact_gather"]), _ms(c["pallas"]),
                     *tcol("gws_vs_dense", c.get("xla_dense_vs_pallas")),
                     *tcol("gws_vs_compact", c.get("xla_compact_vs_pallas")),
                     *tcol("gws_vs_compact_gather", c.get("xla_compact_gather_vs_pallas")),
                     c["check"]["ok"]])
    parts.append(md_table(["pattern", "XLA dense ms", "XLA masked ms", "XLA compact ms", "XLA compact incl. "
                           "gather ms", "Pallas ms", "dense/Pallas", "target", "met", "compact/Pallas", "target",
                           "met", "(compact+gather)/Pallas", "target", "met", "correct"], grow))
    sw = [[c["pattern"], _config_str(r["config"]), _ms(r), _rate(r.get("tflop_s")),
           _f(r.get("dense_vs_pallas")) if "dense_vs_pallas" in r else r.get("error", "")]
          for c in results["grad_weight_shift"] for r in c["sweep"]]
    parts.append(md_table(["pattern", "block sweep", "median ms", "TFLOP/s (kept FLOPs)", "dense/Pallas"], sw))

    parts.append(f"### Training step: {tr['model']}")
    parts.append("FST: `FSTConfig(mode=\"compact\", skip_first=False, skip_last=False, backend=...)`, every "
                 f"weight matmul sparse; matmul FLOPs FST/dense {tr['flops']['ratio']:.3f} (fst_jax.report).")
    trow = [["dense", _ms(tr["dense"]), "1.00", "-", "-", f"{tr['dense']['compile_s']:.1f}"],
            ["FST backend=xla", _ms(tr["fst_xla"]), _f(tr["speedup_fst_xla"]), _target_str("train_xla"),
             _met(tr["speedup_fst_xla"], "train_xla", interpret), f"{tr['fst_xla']['compile_s']:.1f}"]]
    pe = tr["fst_pallas"]
    if pe["status"] == "ok":
        trow.append(["FST backend=pallas", _ms(pe), _f(tr["speedup_fst_pallas"]), _target_str("train_pallas"),
                     _met(tr["speedup_fst_pallas"], "train_pallas", interpret), f"{pe['compile_s']:.1f}"])
    else:
        trow.append(["FST backend=pallas", pe["status"], "-", _target_str("train_pallas"), "n/a", "-"])
    parts.append(md_table(["variant", "median ms", "dense / variant", "target", "met", "compile s"], trow))

    parts.append("### Targets")
    parts.append(md_table(["target", "measured", "threshold", "met"],
                          [[it["what"], _f(it["value"], ".3f"), it["target"], it["met"]]
                           for it in results["targets"]]))
    return "\n\n".join(parts)


# ------------------------------------------------------------------------------------------------
# main


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 timed runs (a smoke run)")
    p.add_argument("--interpret", action="store_true",
                   help="run the Pallas kernels in the interpreter (any backend; timings mean nothing)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: benchmarks/out/gpu)")
    p.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    p.add_argument("--runs", type=int, default=None, help="timed runs per variant (default: 2 with --quick, else 30)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs every section; prints the tables, writes results.json and appends to RESULTS.md.

    Args:
      argv: command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
      The exit status: 0; 1 if a kernel failed at its default blocks or a correctness check failed;
      2 if there is no GPU and ``--interpret`` was not given (nothing is run).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    backend = jax.default_backend()
    if backend != "gpu" and not args.interpret:
        print(NO_GPU_MESSAGE.format(backend=backend), file=sys.stderr)
        return 2
    quick, interpret = args.quick, args.interpret
    runs = args.runs or (2 if quick else 30)
    warmup = 1 if quick else 3
    min_run_s = 0.0 if quick or interpret else MIN_RUN_S
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    sh = shapes(quick)
    meta = cpu_suite.machine_info(argv)
    meta.update(command=COMMAND + "".join(" " + shlex.quote(a) for a in argv),
                device_kind=jax.devices()[0].device_kind, jax_platforms=os.environ.get("JAX_PLATFORMS", ""),
                quick=quick, interpret=interpret, runs=runs,
                warmup=warmup, min_run_s=min_run_s, shapes=sh)
    if interpret:
        meta["note"] = INTERPRET_NOTE
        print(INTERPRET_NOTE, file=sys.stderr)

    stages = ["ceilings", "prune_compress_2to4", "sparse_matmul", "grad_weight_shift (checkerboard, even)",
              "train step"]
    bar = tqdm(total=len(stages), desc="gpu kernels", unit="section", file=sys.stderr, dynamic_ncols=True)
    t_start = time.perf_counter()
    timing = dict(warmup=warmup, runs=runs, min_run_s=min_run_s)
    results: dict[str, Any] = {"meta": meta}

    def section(key: str, label: str, fn: Callable[[], Any]) -> Any:
        # each section's result is written as soon as it exists, so a run cut off by a timeout
        # (the GPU machine's lease is short) still leaves the sections it finished
        bar.set_postfix_str(label)
        results[key] = fn()
        (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
        bar.update(1)
        return results[key]

    with ignore_triton_deprecation():
        ceilings = section("ceilings", stages[0], lambda: bench_ceilings(sh, **timing))
        prune = section("prune_compress", stages[1], lambda: bench_prune(
            sh, interpret, quick, ceilings["copy"]["gb_s"], **timing))
        spmm = section("sparse_matmul", stages[2], lambda: bench_spmm(sh, interpret, quick, **timing))
        gws = section("grad_weight_shift", stages[3], lambda: [
            bench_gws(sh, pattern, interpret, quick, sweep=pattern == "checkerboard", **timing)
            for pattern in ("checkerboard", "even")])
        section("train_step", stages[4], lambda: bench_train(sh, **timing))
    bar.close()
    meta["loadavg_end"] = cpu_suite._loadavg()
    meta["wall_s"] = time.perf_counter() - t_start

    results["targets"] = target_items(results, interpret)
    text = tables(results, interpret)
    print(text)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwrote {out_dir / 'results.json'} ({meta['wall_s']:.0f} s)")
    if not (quick or interpret or args.no_append):
        append_results(meta, text)
        print(f"appended to {cpu_suite.RESULTS_MD}")

    problems = [f"{name}: {sec['pallas']['error']}" for name, sec in
                (("prune_compress_2to4", prune), ("sparse_matmul", spmm),
                 *((f"grad_weight_shift {c['pattern']}", c) for c in gws)) if "error" in sec["pallas"]]
    problems += [f"{name}: correctness check failed: {sec['check']}" for name, sec in
                 (("prune_compress_2to4", prune), ("sparse_matmul", spmm),
                  *((f"grad_weight_shift {c['pattern']}", c) for c in gws))
                 if "error" not in sec["pallas"] and not sec["check"]["ok"]]
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems else 0


def append_results(meta: dict[str, Any], text: str) -> None:
    """Appends a dated section (device, versions, command, tables) to ``benchmarks/RESULTS.md``."""
    cpu_suite.append_section(f"{meta['date']} — GPU kernels (`{COMMAND}`)", [
        f"command: `{meta['command']}` (JAX_PLATFORMS={meta['jax_platforms']!r})",
        f"device: {meta['device_kind']} ({meta['device']}); backend `{meta['backend']}`",
        f"jax {meta['jax']}, jaxlib {meta['jaxlib']}; Python {meta['python']}; {meta['platform']}",
        f"host CPU: {meta['cpu'] or 'unknown'}; {meta['cores']} cores",
        f"median of {meta['runs']} timed runs after {meta['warmup']} warm-up (each run ≥ "
        f"{meta['min_run_s'] * 1e3:.0f} ms of back-to-back calls); wall time {meta['wall_s']:.0f} s"], text)


if __name__ == "__main__":
    sys.exit(main())
