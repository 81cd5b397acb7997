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
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import optax

import fst_jax
from benchmarks import overhead, run


def step_ratios(name: str, case: dict, warmup: int, runs: int) -> dict[str, tuple[float, float]]:
    """``{variant: (median seconds, paired dense / variant)}`` for one model."""
    module = case["module"](dot_general=overhead.DotHook())
    kp, kx = jax.random.split(jax.random.key(1))
    x = run.make_input(case, kx)
    params = module.init(kp, x)["params"]
    loss = run.make_loss(module, case.get("loss", "l2"))
    opt = optax.adamw(1e-3)
    state = opt.init(params)
    base = run.fst_config("compact")
    configs = {"checkerboard": base, "even": base.replace(pattern="even"),
               "rotating(checkerboard)": base.replace(pattern=("checkerboard",))}
    calls = {"dense": functools.partial(jax.jit(run.make_step(loss, opt)), params, state, x)}
    for label, cfg in configs.items():
        keyed = cfg.needs_fst_key
        step = jax.jit(run.make_step(fst_jax.sparsify(loss, cfg), opt, keyed=keyed))
        calls[label] = functools.partial(step, params, state, x, *((jnp.int32(3),) if keyed else ()))
    times = run.time_interleaved(calls, warmup, runs)
    return {k: (statistics.median(v), statistics.median(d / t for d, t in zip(times["dense"], v)))
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
    for name, case in run.model_cases(args.quick, args.models).items():
        for variant, (sec, ratio) in step_ratios(name, case, args.warmup, args.runs).items():
            print(f"| {name} | {variant} | {sec * 1e3:.1f} | {ratio:.3f} |", flush=True)
    print(f"\nload average at the end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
