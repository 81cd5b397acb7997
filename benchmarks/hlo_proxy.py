"""The GPU proxy's HLO byte count of each benchmark model's training step, compiled but not run.

``python -m benchmarks.run`` times the steps and derives the proxy from the same count; this
compiles only (seconds per model at full size), so the count can be compared across commits::

    python -m benchmarks.hlo_proxy                       # mlp and transformer_block, full size
    python -m benchmarks.hlo_proxy --models mlp --modes compact default --quick

For each model: the dense step's non-GEMM bytes and GEMM FLOPs, and per FST mode the extra
non-GEMM bytes over dense (:func:`benchmarks.overhead.hlo_bytes` on XLA's optimized module: each
instruction reads its operands and writes its result once) with the HLO ops that account for
them. The count charges a strided slice its whole input (an upper bound for the gathers).
"""

from __future__ import annotations

import argparse
import sys

import jax
import optax

from benchmarks import overhead, run

MiB = 2**20


def step_bytes(name: str, case: dict, modes: list[str]) -> dict[str, overhead.HloBytes]:
    """The HLO byte count of the model's AdamW training step, dense and in each FST mode."""
    module = case["module"](dot_general=overhead.DotHook())
    kp, kx = jax.random.split(jax.random.key(1))
    x = run.make_input(case, kx)
    params = jax.eval_shape(module.init, kp, x)["params"]
    loss = run.make_loss(module, case.get("loss", "l2"))
    opt = optax.adamw(1e-3)
    opt_state = jax.eval_shape(opt.init, params)
    out = {}
    for mode in ["dense", *modes]:
        step = run.make_step(run.make_mode_loss(loss, mode), opt)
        out[mode] = overhead.hlo_bytes(jax.jit(step).lower(params, opt_state, x).compile().as_text())
    return out


def main(argv: list[str] | None = None) -> int:
    """Compiles each model's step and prints the dense count and each mode's extra bytes."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.hlo_proxy", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["mlp", "transformer_block"])
    p.add_argument("--modes", nargs="+", default=["compact", "default"], choices=("masked", "compact", "default"))
    p.add_argument("--quick", action="store_true", help="the smoke sizes of benchmarks.run --quick")
    args = p.parse_args(argv)
    print("| model | mode | dense GEMM GFLOP | dense other MiB | FST extra MiB | by op (MiB) |\n|---|---|---|---|---|---|")
    for name, case in run.model_cases(args.quick, args.models).items():
        res = step_bytes(name, case, args.modes)
        d = res["dense"]
        for mode in args.modes:
            f = res[mode]
            by_op = {op: (f.by_op.get(op, 0) - d.by_op.get(op, 0)) / MiB for op in sorted({*f.by_op, *d.by_op})}
            ops = ", ".join(f"{op} {v:+.1f}" for op, v in by_op.items() if v)
            print(f"| {name} | {mode} | {d.gemm_flops / 1e9:.1f} | {d.other_bytes / MiB:.1f} | "
                  f"{(f.other_bytes - d.other_bytes) / MiB:.1f} | {ops or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
