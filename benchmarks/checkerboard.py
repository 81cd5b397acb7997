"""Forms of the compact checkerboard grad-weight product, timed side by side in one run.

Run from the repository root::

    python -m benchmarks.checkerboard                  # f32, T=8192, K=O=1024, 10 paired rounds
    python -m benchmarks.checkerboard --dtype bfloat16 --runs 20
    python -m benchmarks.run --malloc-cache ...        # (see there) the same without page faults

``dW = Aᵀ·dY'`` over the kept tokens with the default checkerboard (``(t + k) % 2 == 0``) has two
quarter GEMMs: ``A[t even, k even]ᵀ·dY'[t even]`` and ``A[t odd, k odd]ᵀ·dY'[t odd]``, interleaved
along ``K``. The forms:

* ``library``: what ``sparsify`` runs (:func:`benchmarks.run.library_compact`: since 2026-11-30
  the two quarters selected per token pair through ``fst_jax._rotate``, one batched GEMM);
* ``two_gemms``: ``fst_jax._dot._compact_grad_weight``, the form before (two arrays saved, two
  GEMMs, each parity's shifted ``dY`` computed from all of ``dY``: two reads of ``dY``);
* ``batched``: the two quarters saved stacked ``[2, T/2, K/2]``, ``dY'`` split by parity in one
  pass (``dY`` read once) into ``[2, T/2, O]``, one batched ``dot_general`` (a strided-batched GEMM
  on a GPU), then the interleave;
* ``stacked_two_gemms``: the stacked residual and the one-pass shift, but two plain GEMMs on the
  two slices of the stack;
* ``even``: the ``"even"`` pattern's one half GEMM (for reference: what a single half GEMM costs).

Each round runs every form once (order rotated); the ratio is dense time / form time of the same
round, and the median over rounds is printed. On the 2-core CPU of 2026-11-29 (load 7-8, so
provisional) ``two_gemms`` was the fastest checkerboard form at the GEMM level: XLA:CPU's batched dot, and the slices of
a stacked array (copies), cost more than the second read of ``dY`` saves. On a GPU the byte count
favours ``batched``. In whole training steps the batched form through ``fst_jax._rotate`` was
faster on the CPU too (transformer block 1.21× dense vs 1.00×, 2026-11-30), and the library
switched to it; run this on a GPU to see the forms there.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks.run import library_compact, matmul_plan
from fst_jax import _dot


def _shifted_parities(dy: jax.Array, scale: float) -> jax.Array:
    """``gradient_shift(dy, 0, scale)`` (tokens on axis 0) split by token parity: ``[2, T/2, O]``,
    reading ``dy`` once."""
    pairs = dy.reshape(dy.shape[0] // 2, 2, *dy.shape[1:])
    even, odd = pairs[:, 0].astype(jnp.float32), pairs[:, 1].astype(jnp.float32)
    shifted = (even + scale * jnp.roll(odd, 1, 0), odd + scale * even)
    return jnp.stack([x.astype(dy.dtype) for x in shifted])


def _interleave(halves: jax.Array) -> jax.Array:
    """``[2, K/2, O]`` -> ``[K, O]`` with row ``k = 2j + p`` from ``halves[p, j]``."""
    return jnp.moveaxis(halves, 0, 1).reshape(-1, halves.shape[-1])


def batched(stack: jax.Array, dy: jax.Array, scale: float) -> jax.Array:
    """One batched GEMM over the two parities."""
    sh = _shifted_parities(dy, scale)
    return _interleave(lax.dot_general(stack, sh, (((1,), (1,)), ((0,), (0,)))))


def stacked_two_gemms(stack: jax.Array, dy: jax.Array, scale: float) -> jax.Array:
    """Two GEMMs on the two slices of the stacked residual and of the one-pass shift."""
    sh = _shifted_parities(dy, scale)
    gemm = functools.partial(lax.dot_general, dimension_numbers=(((0,), (0,)), ((), ())))
    return _interleave(jnp.stack([gemm(stack[p], sh[p]) for p in (0, 1)]))


def paired(fns: dict[str, Callable[[], Any]], runs: int, base: str = "dense") -> dict[str, tuple[float, float]]:
    """``{name: (median seconds, median over rounds of base time / this time)}``; each round runs
    every thunk once, the order rotated from round to round."""
    names = list(fns)
    for f in fns.values():
        jax.block_until_ready(f())
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(runs):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[n]())
            times[n].append(time.perf_counter() - t0)
    return {n: (statistics.median(times[n]), statistics.median(b / x for b, x in zip(times[base], times[n])))
            for n in names}


def main(argv: list[str] | None = None) -> int:
    """Times the forms and prints a markdown table."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.checkerboard", description=__doc__.split("\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=(8192, 1024, 1024), metavar=("T", "K", "O"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--runs", type=int, default=10)
    args = p.parse_args(argv)
    t, k, o = args.shape
    dtype = jnp.dtype(args.dtype)
    ka, kd = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (t, k), dtype)
    dy = jax.random.normal(kd, (t, o), dtype)
    w = jnp.zeros((k, o), dtype)
    plan = matmul_plan(a, w, "checkerboard", "compact")
    even_plan = matmul_plan(a, w, "even", "compact")
    s = plan.restore_scale
    parts = jax.block_until_ready(jax.jit(functools.partial(_dot._compact_parts, plan))(a))
    stack = jax.block_until_ready(jnp.stack(parts))
    even_parts = jax.block_until_ready(jax.jit(functools.partial(_dot._compact_parts, even_plan))(a))
    two_gemms = jax.jit(functools.partial(_dot._compact_grad_weight, plan))
    take, product = library_compact(plan, a.shape, w.shape)
    lib_parts = jax.block_until_ready(jax.jit(take)(a))
    fns = {
        "dense": functools.partial(jax.jit(lambda a, dy: a.T @ dy), a, dy),
        "library": functools.partial(jax.jit(product), lib_parts, w, dy),
        "two_gemms": functools.partial(two_gemms, parts, w, dy),
        "batched": functools.partial(jax.jit(functools.partial(batched, scale=s)), stack, dy),
        "stacked_two_gemms": functools.partial(jax.jit(functools.partial(stacked_two_gemms, scale=s)), stack, dy),
        "even": functools.partial(jax.jit(functools.partial(_dot._compact_grad_weight, even_plan)), even_parts, w, dy),
    }
    ref = jnp.asarray(fns["library"](), jnp.float32)
    for name in ("two_gemms", "batched", "stacked_two_gemms"):
        err = float(jnp.max(jnp.abs(jnp.asarray(fns[name](), jnp.float32) - ref)))
        assert err <= 1e-3 * float(jnp.max(jnp.abs(ref))), (name, err)
    res = paired(fns, args.runs)
    print(f"T={t} K={k} O={o} {dtype.name}, {args.runs} paired rounds, backend {jax.default_backend()}\n")
    print("| form | median ms | dense / form (paired median) |\n|---|---|---|")
    for name, (sec, ratio) in res.items():
        print(f"| {name} | {sec * 1e3:.2f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
