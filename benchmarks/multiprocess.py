"""Data-parallel FST training over 2 processes on one machine, checked against one process.

Run from the repository root::

    python -m benchmarks.multiprocess --check    # 2 processes vs 1: losses and parameters equal
    python -m benchmarks.multiprocess --bench    # step time and all-reduce time, 2 processes vs 1

Each worker process sets the CPU collectives explicitly (``jax_cpu_collectives_implementation =
"gloo"``), one XLA thread (``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``)
and one CPU device, joins ``jax.distributed.initialize`` on a free local port, and trains a
sparsified loss over ``[B, T, D]`` inputs with ``jax.jit`` on the global mesh: the parameters
replicated (``P()``), the batch sharded over the two processes (``P("data")``). Under ``jit`` with
shardings ``sparsify`` sees the global arrays, so the token mask and the gradient shift are those of
one process, and the gradient all-reduce is XLA's.

SR-STE is counted once per step: the loss uses ``FSTConfig(sr_ste=0.0)`` and the optimizer chains
``fst_jax.optax.sr_ste`` (the masks recomputed from the current weights) before AdamW. The check
compares the two-process run with a one-process run that adds SR-STE inside the backward pass
(``FSTConfig(sr_ste=λ)``, no optax SR-STE): same losses and parameters within float tolerance.

Two processes on a 2-core machine measure contention, not scaling: each process has one core (when
nothing else runs), the per-process batch is half the global one, and the all-reduce goes through
gloo over loopback TCP.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LAMBDA = 2e-4  # SR-STE coefficient (the library's default)
LOSS_TOL, PARAM_TOL = 1e-5, 1e-4  # absolute: f32 all-reduce order vs one process (params are ~0.1)
SHAPES = {"check": dict(batch=8, tokens=16, width=64, layers=3, steps=4),
          "bench": dict(batch=16, tokens=128, width=256, layers=4, steps=12),
          "quick": dict(batch=8, tokens=16, width=64, layers=3, steps=6)}


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict[str, str]:
    """The environment of a worker: CPU only, one device, one XLA thread."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=1 --xla_cpu_multi_thread_eigen=false "
                        "intra_op_parallelism_threads=1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ------------------------------------------------------------------------------------------------
# The worker (runs in its own process)


def _train(num_processes: int, process_id: int, port: int, shape: dict[str, int], sr_in_backward: bool,
           time_collective: bool) -> dict[str, Any]:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if num_processes > 1:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=120)
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import fst_jax
    import fst_jax.optax

    b, t, d, n_layers, steps = (shape[k] for k in ("batch", "tokens", "width", "layers", "steps"))
    assert b % num_processes == 0
    rng = np.random.default_rng(0)
    params0 = [rng.standard_normal((d, d)).astype(np.float32) / np.sqrt(d) for _ in range(n_layers)]
    batches = [rng.standard_normal((b, t, d)).astype(np.float32) for _ in range(steps)]

    def loss(params, x):  # x: [B, T, D]
        for w in params:
            x = jnp.tanh(x @ w)
        return jnp.mean(jnp.square(x - 0.5))

    config = fst_jax.FSTConfig(skip_first=False, skip_last=False, sr_ste=LAMBDA if sr_in_backward else 0.0)
    sparse_loss = fst_jax.sparsify(loss, config)
    adamw = optax.adamw(1e-2)
    if sr_in_backward:
        tx = adamw
    else:  # SR-STE once per step, on the summed gradient
        tx = optax.chain(fst_jax.optax.sr_ste(lambda p: [fst_jax.mask_2to4(w, axis=0) for w in p], LAMBDA), adamw)

    mesh = jax.make_mesh((num_processes,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated, by_batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    def step(params, opt_state, x):
        value, grads = jax.value_and_grad(sparse_loss)(params, x)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    params = [global_array(w, replicated) for w in params0]
    opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
    step_jit = jax.jit(step, in_shardings=(replicated, replicated, by_batch),
                       out_shardings=(replicated, replicated, replicated))
    xs = [global_array(x, by_batch) for x in batches]
    losses, times = [], []
    for x in xs:
        t0 = time.perf_counter()
        params, opt_state, value = step_jit(params, opt_state, x)
        value = float(jax.block_until_ready(value))
        times.append(time.perf_counter() - t0)
        losses.append(value)
    out: dict[str, Any] = {
        "process_id": process_id, "num_processes": num_processes, "devices": len(jax.devices()),
        "collectives": jax.config.jax_cpu_collectives_implementation,
        "losses": losses, "step_s": times,
        "params": [np.asarray(p.addressable_data(0)).tolist() for p in params],
    }
    if time_collective and num_processes > 1:
        # The all-reduce a step does: the summed gradient of every parameter, alone.
        n = sum(w.size for w in params0)
        parts = global_array(np.ones((num_processes, n), np.float32), by_batch)
        allreduce = jax.jit(lambda g: jnp.sum(g, axis=0), out_shardings=replicated)
        jax.block_until_ready(allreduce(parts))
        ts = []
        for _ in range(10):
            t0 = time.perf_counter()
            jax.block_until_ready(allreduce(parts))
            ts.append(time.perf_counter() - t0)
        out["allreduce_s"] = statistics.median(ts)
        out["allreduce_floats"] = int(n)
    if num_processes > 1:
        jax.distributed.shutdown()
    return out


# ------------------------------------------------------------------------------------------------
# The launcher


def launch(num_processes: int, shape_name: str, sr_in_backward: bool, time_collective: bool = False,
           timeout_s: float = 300.0) -> list[dict[str, Any]]:
    """Runs ``num_processes`` workers (each a ``python -m benchmarks.multiprocess --worker``) and
    returns their results.

    Raises:
      RuntimeError: a worker failed or timed out (its output is in the message).
    """
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for pid in range(num_processes):
            cmd = [sys.executable, "-m", "benchmarks.multiprocess", "--worker", "--num-processes",
                   str(num_processes), "--process-id", str(pid), "--port", str(port), "--shape", shape_name,
                   "--out", str(Path(tmp) / f"{pid}.json")]
            if sr_in_backward:
                cmd.append("--sr-in-backward")
            if time_collective:
                cmd.append("--time-collective")
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        deadline = time.monotonic() + timeout_s
        logs = []
        failed = False
        for p in procs:
            try:
                log, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                log, _ = p.communicate()
                failed = True
            logs.append(log)
            failed = failed or p.returncode != 0
        if failed:
            raise RuntimeError("a worker failed or timed out:\n" + "\n---\n".join(logs))
        return [json.loads((Path(tmp) / f"{pid}.json").read_text()) for pid in range(num_processes)]


def max_abs_diff(a: Any, b: Any) -> float:
    """The largest absolute difference between two nested lists of numbers."""
    import numpy as np

    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b, strict=True))


def check(shape_name: str = "check", timeout_s: float = 300.0) -> dict[str, Any]:
    """Two processes (optimizer-side SR-STE) vs one (SR-STE in the backward pass): the differences.

    Returns:
      ``{"loss_max_diff", "param_max_diff", "losses_2proc", "losses_1proc", "collectives"}``.
    """
    two = launch(2, shape_name, sr_in_backward=False, timeout_s=timeout_s)
    one = launch(1, shape_name, sr_in_backward=True, timeout_s=timeout_s)[0]
    return {
        "loss_max_diff": max_abs_diff(two[0]["losses"], one["losses"]),
        "param_max_diff": max_abs_diff(two[0]["params"], one["params"]),
        "process_param_diff": max_abs_diff(two[0]["params"], two[1]["params"]),
        "losses_2proc": two[0]["losses"], "losses_1proc": one["losses"],
        "collectives": two[0]["collectives"], "devices": two[0]["devices"],
    }


def bench(quick: bool = False, timeout_s: float = 600.0) -> dict[str, Any]:
    """Step time of the same global batch over 2 processes and over 1, and the all-reduce alone.

    Two processes on two cores measure contention, not scaling (see the module docstring).
    """
    shape_name = "quick" if quick else "bench"
    two = launch(2, shape_name, sr_in_backward=False, time_collective=True, timeout_s=timeout_s)
    one = launch(1, shape_name, sr_in_backward=False, timeout_s=timeout_s)[0]
    skip = 2  # compile + first run

    def med(ts: list[float]) -> float:
        return statistics.median(ts[skip:] if len(ts) > skip + 1 else ts)

    step2, step1 = max(med(w["step_s"]) for w in two), med(one["step_s"])
    return {"shape": SHAPES[shape_name], "step_s_2proc": step2, "step_s_1proc": step1,
            "allreduce_s": max(w["allreduce_s"] for w in two), "allreduce_floats": two[0]["allreduce_floats"],
            "allreduce_share": max(w["allreduce_s"] for w in two) / step2,
            "loss_max_diff": max_abs_diff(two[0]["losses"], one["losses"]), "loadavg": os.getloadavg()}


def table(r: dict[str, Any]) -> str:
    """The benchmark's result as a markdown table."""
    s = r["shape"]
    return "\n".join([
        f"Model: {s['layers']} sparse weight matmuls [{s['width']}, {s['width']}], x [{s['batch']}, "
        f"{s['tokens']}, {s['width']}] (global batch), adamw + optimizer-side SR-STE, {s['steps']} steps. "
        "Two processes on a 2-core machine measure contention, not scaling.",
        "",
        "| 1 process: step ms | 2 processes: step ms | 1 / 2 | all-reduce of the gradient (ms, floats) | "
        "all-reduce / 2-process step | max loss diff |",
        "|---|---|---|---|---|---|",
        f"| {r['step_s_1proc'] * 1e3:.2f} | {r['step_s_2proc'] * 1e3:.2f} | "
        f"{r['step_s_1proc'] / r['step_s_2proc']:.2f} | {r['allreduce_s'] * 1e3:.2f} ({r['allreduce_floats']}) | "
        f"{100 * r['allreduce_share']:.1f} % | {r['loss_max_diff']:.1e} |",
    ])


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--check``, ``--bench`` or (internal) ``--worker``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.multiprocess", description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="2 processes vs 1: fail unless equal")
    p.add_argument("--bench", action="store_true", help="time 2 processes vs 1")
    p.add_argument("--quick", action="store_true", help="tiny shapes for --bench")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--num-processes", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--shape", default="check", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--sr-in-backward", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--time-collective", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        res = _train(args.num_processes, args.process_id, args.port, SHAPES[args.shape], args.sr_in_backward,
                     args.time_collective)
        args.out.write_text(json.dumps(res))
        return 0
    if args.check:
        r = check()
        print(f"collectives: {r['collectives']}, {r['devices']} devices (one per process)")
        print(f"losses, 2 processes: {[round(v, 6) for v in r['losses_2proc']]}")
        print(f"losses, 1 process:   {[round(v, 6) for v in r['losses_1proc']]}")
        print(f"max |loss diff| {r['loss_max_diff']:.2e}, max |param diff| {r['param_max_diff']:.2e}, "
              f"between the 2 processes' params {r['process_param_diff']:.2e}")
        ok = r["loss_max_diff"] < LOSS_TOL and r["param_max_diff"] < PARAM_TOL and r["process_param_diff"] == 0
        print("OK" if ok else "MISMATCH")
        return 0 if ok else 1
    if args.bench:
        print(table(bench(quick=args.quick)))
        return 0
    p.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
