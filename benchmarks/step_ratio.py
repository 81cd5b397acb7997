"""Training-step time of FST configs against dense, paired, for one or more benchmark models.

A focused form of ``python -m benchmarks.run``'s training-step table (same models, same AdamW
step, same interleaved timing), without the memory, compile and proxy sections, so that a config
change can be checked on the full-size GPT in minutes::

    python -m benchmarks.step_ratio --models transformer_block gpt
    python -m benchmarks.step_ratio --models mlp --runs 5 --quick

Columns: the median step time of each variant and the *paired* ratio: the median over the timed
rounds of dense time / variant time of the same round (robust to a load that drifts during the
run). Variants: the benchmark config (every weight matmul sparse, compact) with the default
checkerboard, with ``pattern="even"``, and with a one-pattern rotating set ``("checkerboard",)``
(the keyed path with a traced ``fst_key``).

*grad-weight GEMMs*: the dense grad-weight products of every weight matmul of the model (shapes
and dtypes recorded by :class:`benchmarks.overhead.DotHook`), alone in one jit, timed in the same
rotation. Their share ``S`` of the dense step bounds what a compact grad-weight product at exactly
half the time can give: the *ceiling* ``1 / (1 − S/2)``, printed below the table (on XLA the
forward and grad-input products of a 2:4 weight cost what dense ones cost).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

import fst_jax
from benchmarks import overhead, run


def grad_weight_gemms(calls: list[overhead.MatmulShape]) -> tuple[Any, tuple[Any, ...]]:
    """``(fn, args)``: the dense grad-weight product ``dW`` of every recorded weight matmul, in one
    function (``jax.jit(fn)(*args)``), on random operands of the recorded shapes and dtypes."""
    args, dims = [], []
    for i, c in enumerate(calls):
        dn = ((c.lhs_contract, c.rhs_contract), ((), ()))
        ka, kd = jax.random.split(jax.random.key(i))
        out = jax.eval_shape(lambda a, w, dn=dn: lax.dot_general(a, w, dn), jax.ShapeDtypeStruct(c.lhs_shape, c.lhs_dtype),
                             jax.ShapeDtypeStruct(c.rhs_shape, c.rhs_dtype))
        args += [jax.random.normal(ka, c.lhs_shape, c.lhs_dtype), jnp.zeros(c.rhs_shape, c.rhs_dtype),
                 jax.random.normal(kd, out.shape, out.dtype)]
        dims.append(dn)

    def fn(*flat: jax.Array) -> list[jax.Array]:
        grads = []
        for j, dn in enumerate(dims):
            a, w, dy = flat[3 * j: 3 * j + 3]
            grads.append(jax.vjp(lambda w, a=a, dn=dn: lax.dot_general(a, w, dn), w)[1](dy)[0])
        return grads
    return fn, tuple(args)


def step_ratios(name: str, case: dict, warmup: int, runs: int) -> dict[str, tuple[float, float | None]]:
    """``{variant: (median seconds, paired dense / variant)}`` for one model, and for the dense
    grad-weight GEMMs (``"grad-weight GEMMs"``: their time, ratio ``None``)."""
    hook = overhead.DotHook()
    module = case["module"](dot_general=hook)
    kp, kx = jax.random.split(jax.random.key(1))
    x = run.make_input(case, kx)
    params = module.init(kp, x)["params"]
    loss = run.make_loss(module, case.get("loss", "l2"))
    opt = optax.adamw(1e-3)
    state = opt.init(params)
    base = run.fst_config("compact")
    configs = {"checkerboard": base, "even": base.replace(pattern="even"),
               "rotating(checkerboard)": base.replace(pattern=("checkerboard",))}
    hook.reset()
    jax.eval_shape(loss, params, x)
    gw_fn, gw_args = grad_weight_gemms(hook.calls)
    calls = {"dense": functools.partial(jax.jit(run.make_step(loss, opt)), params, state, x),
             "grad-weight GEMMs": functools.partial(jax.jit(gw_fn), *gw_args)}
    for label, cfg in configs.items():
        keyed = cfg.needs_fst_key
        step = jax.jit(run.make_step(fst_jax.sparsify(loss, cfg), opt, keyed=keyed))
        calls[label] = functools.partial(step, params, state, x, *((jnp.int32(3),) if keyed else ()))
    times = run.time_interleaved(calls, warmup, runs)
    gemms = "grad-weight GEMMs"  # a part of the step, not a step: its time only
    return {k: (statistics.median(v),
                None if k == gemms else statistics.median(d / t for d, t in zip(times["dense"], v)))
            for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    """Prints one markdown row per model and variant."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_ratio", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["transformer_block", "gpt"])
    p.add_argument("--runs", type=int, default=9, help="timed rounds (default 9)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="the smoke sizes of benchmarks.run --quick")
    args = p.parse_args(argv)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, load average {os.getloadavg()}\n")
    print("| model | variant | median ms | dense / variant (paired) |\n|---|---|---|---|")
    ceilings = []
    for name, case in run.model_cases(args.quick, args.models).items():
        out = step_ratios(name, case, args.warmup, args.runs)
        for variant, (sec, ratio) in out.items():
            print(f"| {name} | {variant} | {sec * 1e3:.1f} | {'—' if ratio is None else f'{ratio:.3f}'} |",
                  flush=True)
        share = out["grad-weight GEMMs"][0] / out["dense"][0]
        ceilings.append(f"{name}: grad-weight GEMMs {share:.1%} of the dense step, ceiling "
                        f"{1 / (1 - share / 2):.3f}")
    print("\nCeiling at exactly half the grad-weight GEMM time (1 / (1 − share/2)):\n" + "\n".join(ceilings))
    print(f"\nload average at the end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
