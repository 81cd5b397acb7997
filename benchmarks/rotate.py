"""The rotating patterns' compact grad-weight product beside the fixed pattern, MVUE and dense.

Run from the repository root::

    python -m benchmarks.rotate                      # f32, T=8192, K=O=1024, 9 timed runs
    python -m benchmarks.rotate --t 1024 --k 256 --o 256 --runs 3   # a smoke run

All on ``jax.default_backend()``, interleaved round-robin, each call waited for
(:func:`benchmarks.run.time_interleaved`); medians. The grad-weight product is ``dW = Aᵀ·dY`` for
``A: [T, K]``, ``dY: [T, O]`` with the gradient shift (``s = 0.03``):

* *dense*: ``a.T @ dy``.
* *fixed checkerboard*: ``fst_jax._dot._compact_grad_weight`` on the kept half of ``A`` already
  gathered (two quarter GEMMs interleaved along ``K``), the form ``mode="compact"`` ran before
  2026-11-30 (now the checkerboard runs through ``fst_jax._rotate`` like the rotating patterns,
  and this form only where the token axis is not the activation's innermost free axis).
* *rotating*: :func:`fst_jax._rotate.parts_grad_weight` on its kept half, the pattern
  choice a traced int32 that changes every call (cycling through the authors' four): one batched
  ``dot_general`` over the two ``K`` parities.
* *rotating, two GEMMs*: the same selects with two separate ``dot_general`` calls, for comparison.
* *mvue*: ``grad_weight="mvue"``, ``Aᵀ·mvue_2to4(dY)`` along the tokens with a traced seed that
  changes every call: the sample, then a dense GEMM (XLA has no 2:4 operand); *mvue sample*: the
  sampling alone.
* *… parts*: the forward-side cost, gathering the kept half of ``A`` from ``A``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from benchmarks.run import matmul_plan, md_table, time_interleaved
from fst_jax import _dot, _masks, _rotate


def _rotating_two_gemms(parts, choice, dy, layout, scale):
    """parts_grad_weight with two dot_generals instead of one batched call."""
    dys = _rotate._kept_gradients(dy, layout, _masks.AUTHORS_PATTERNS,
                                  jnp.asarray(choice, jnp.int32), scale)
    halves = [lax.dot_general(parts[i], dys[i], (((1,), (1,)), ((0,), (0,)))) for i in (0, 1)]
    dw = jnp.stack(halves, axis=2).reshape(layout.batch, layout.num_k, layout.num_o)
    return dw.reshape(layout.weight_shape)


def bench(t: int, k: int, o: int, warmup: int, runs: int, dtype: Any = jnp.float32) -> dict[str, Any]:
    ka, kd = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (t, k), dtype)
    dy = jax.random.normal(kd, (t, o), dtype)
    w = jnp.zeros((k, o), dtype)
    plan = matmul_plan(a, w, "checkerboard", "compact")
    lay = _rotate.compact_layout(a.shape, w.shape, (((1,), (0,)), ((), ())), weight_side=1)
    scale = 0.03

    fixed_parts_fn = jax.jit(functools.partial(_dot._compact_parts, plan))
    rot_parts_fn = jax.jit(lambda a, c: _rotate.select_parts(a, c, lay))
    fixed_parts = jax.block_until_ready(fixed_parts_fn(a))
    rot_parts = jax.block_until_ready(rot_parts_fn(a, jnp.int32(0)))

    dense = jax.jit(lambda a, dy: a.T @ dy)
    fixed = jax.jit(functools.partial(_dot._compact_grad_weight, plan))
    rot = jax.jit(lambda p, c, dy: _rotate.parts_grad_weight(
        p, c, dy, lay, weight_dtype=dtype, scale=scale))
    rot2 = jax.jit(lambda p, c, dy: _rotating_two_gemms(p, c, dy, lay, scale))
    mvue_sample = jax.jit(lambda dy, seed: _dot._mvue(dy, 0, seed))
    mvue = jax.jit(lambda a, dy, seed: a.T @ _dot._mvue(dy, 0, seed))
    choices = [jnp.int32(c) for c in range(4)]
    calls = {"n": 0}

    def next_choice() -> jax.Array:
        calls["n"] += 1
        return choices[calls["n"] % 4]

    times = time_interleaved({
        "dense": lambda: dense(a, dy),
        "fixed_checkerboard": lambda: fixed(fixed_parts, w, dy),
        "rotating": lambda: rot(rot_parts, next_choice(), dy),
        "rotating_two_gemms": lambda: rot2(rot_parts, next_choice(), dy),
        "mvue": lambda: mvue(a, dy, next_choice()),
    }, warmup, runs)
    times.update(time_interleaved({  # the cheap gathers apart, not right after the GEMMs
        "fixed_parts": lambda: fixed_parts_fn(a),
        "rotating_parts": lambda: rot_parts_fn(a, next_choice()),
        "mvue_sample": lambda: mvue_sample(dy, next_choice()),
    }, warmup, 3 * runs))
    compiles = {"rotating": rot._cache_size(), "rotating_parts": rot_parts_fn._cache_size(),
                "mvue": mvue._cache_size()}
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {"T": t, "K": k, "O": o, "dtype": jnp.dtype(dtype).name, "runs": runs,
            "backend": jax.default_backend(), "loadavg": os.getloadavg(), "median_s": med,
            "times_s": times, "compiled_versions": compiles}


def table(res: dict[str, Any]) -> str:
    med = res["median_s"]
    rows = []
    for name in ("dense", "fixed_checkerboard", "rotating", "rotating_two_gemms", "mvue", "fixed_parts",
                 "rotating_parts", "mvue_sample"):
        ref = med["fixed_parts" if name.endswith(("parts", "sample")) else "fixed_checkerboard"]
        rows.append([name, f"{1e3 * med[name]:.2f}", f"{med['dense'] / med[name]:.2f}",
                     f"{med[name] / ref:.3f}"])
    return md_table(["variant", "median ms", "dense / variant", "variant / fixed"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--t", type=int, default=8192)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--o", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--json", default=None, help="write the results to this file")
    args = p.parse_args(argv)
    res = bench(args.t, args.k, args.o, args.warmup, args.runs)
    print(f"grad-weight dW = Aᵀ·dY', f32, T={args.t} K={args.k} O={args.o}, backend "
          f"{res['backend']}, load average {res['loadavg'][0]:.1f}, medians of {args.runs}; "
          f"compiled versions of the rotating functions: {res['compiled_versions']}")
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
