"""GPU benchmark of the cuSPARSELt backend: dense XLA vs cuSPARSELt vs the Pallas sparse matmul.

Run on the GPU machine from the repository root (``scripts/gpu_check.sh`` runs it as a stage)::

    JAX_PLATFORMS=cuda PYTHONPATH=. python -m benchmarks.cusparselt --out DIR

Every section is written as it finishes, to ``DIR/<section>.json`` and ``DIR/<section>.md``,
so a run cut off by a timeout still leaves the sections it finished. Sections:

``gemm``
    ``A [M, K]`` 2:4 along ``K`` times a dense ``B [K, N]``, bf16 (float32 accumulation), at
    ``8192³`` and at transformer shapes (``M`` = output features, ``N`` = 8192 tokens).
    *dense*: XLA's ``A @ B`` (cuBLAS). *cslt*: :func:`fst_jax.cusparselt.sparse_matmul`,
    compression included (what a training step pays: the weights change every step).
    *cslt_mm*: the matmul custom call alone on a pre-compressed ``A``. *compress*: the compress
    custom call alone. *pallas*: :func:`fst_jax.kernels.sparse_matmul` on a pre-compressed
    ``A``. *cslt_xw*: the FST forward layout ``x [T, K] @ W [K, O]`` through
    :func:`fst_jax.cusparselt.matmul` (``sparse="rhs"``: column-major matrix orders, no copies).
    Targets (issue 12): cslt ≥ 1.15× dense at 8192³; compress ≤ 10 % of a dense GEMM for a
    4096×4096 weight against 8192 tokens.
``layer``
    The three products of one ``d → 4d`` layer (``d = 1024`` and ``4096``, 8192 tokens): forward
    ``x @ W_f``, grad-input ``dY @ W_bᵀ`` (``transpose_rhs``), each dense vs cuSPARSELt; the
    grad-weight product stays dense here (FST's compact grad-weight path is XLA's).
``train_step``
    One jitted step (loss, grads, SGD update) of an MLP block ``x + W2·gelu(W1·x)``, bf16, 8192
    tokens, ``d = 1024`` and ``4096``: dense vs ``sparsify`` with ``backend="xla"`` vs
    ``backend="cusparselt"`` (when :class:`fst_jax.FSTConfig` accepts it).

torch's ``torch._cslt_sparse_mm`` (the peer) runs in its own process:
``python -m benchmarks.cusparselt_torch --out DIR``.

``--smoke``: tiny shapes, one run, on any backend; off a GPU the cuSPARSELt calls run the
test-only jnp emulation of the custom calls. Its timings mean nothing: it only keeps this
script from rotting (CI runs it through ``scripts/gpu_check.sh --smoke``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fst_jax import cusparselt
from fst_jax._masks import mask_2to4
from fst_jax.cusparselt import _ops

TOKENS = 8192


def gemm_shapes(smoke: bool) -> list[tuple[str, int, int, int]]:
    """(name, M, K, N): A [M, K] sparse, B [K, N] dense."""
    if smoke:
        return [("cube", 32, 64, 48)]
    return [
        ("cube 8192³", 8192, 8192, 8192),
        ("d4096 4096x4096", 4096, 4096, TOKENS),  # the compression target's shape
        ("d4096 mlp_up", 4 * 4096, 4096, TOKENS),
        ("d4096 mlp_down", 4096, 4 * 4096, TOKENS),
        ("d1024 mlp_up", 4 * 1024, 1024, TOKENS),
        ("d1024 mlp_down", 1024, 4 * 1024, TOKENS),
    ]


def timeit(fns: dict[str, Callable[[], Any]], runs: int, min_run_s: float = 0.005) -> dict[str, float]:
    """Median seconds per call of each thunk; each timed run repeats the call ``inner`` times
    back to back (``inner`` picked so that a run lasts ≥ ``min_run_s``). Interleaved."""
    inner = {}
    for name, fn in fns.items():
        jax.block_until_ready(fn())  # compile
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        one = max(time.perf_counter() - t0, 1e-7)
        inner[name] = max(1, min(200, int(min_run_s / one)))
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out = None
            for _ in range(inner[name]):
                out = fn()
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - t0) / inner[name])
    return {n: statistics.median(ts) for n, ts in times.items()}


def probe(fns: dict[str, Callable[[], Any]]) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
    """Runs each thunk once; returns the ones that work and the errors of the others, so that
    one failing variant (e.g. a Pallas kernel that has never compiled on this GPU) does not take
    the others' numbers with it."""
    ok, errors = {}, {}
    for name, fn in fns.items():
        try:
            jax.block_until_ready(fn())
            ok[name] = fn
        except Exception as e:  # noqa: BLE001
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"  {name} failed: {errors[name]}", file=sys.stderr, flush=True)
    return ok, errors


def pruned(key, shape, axis, dtype=jnp.bfloat16) -> jax.Array:
    x = jax.random.normal(key, shape, jnp.float32)
    return jnp.where(mask_2to4(x, axis=axis), x, 0).astype(dtype)


def bench_gemm(smoke: bool, runs: int) -> list[dict[str, Any]]:
    from fst_jax.kernels import prune_compress_2to4, sparse_matmul as pallas_spmm

    rows = []
    interpret = smoke and not on_gpu()
    for name, m, k, n in gemm_shapes(smoke):
        ka, kb = jax.random.split(jax.random.key(0))
        a = pruned(ka, (m, k), -1)
        b = jax.random.normal(kb, (k, n), jnp.bfloat16)
        x = jnp.asarray(b.T)  # [N tokens, K]: the FST forward layout x @ W with W = A.T
        w = jnp.asarray(a.T)
        p = _ops._Params("lhs", False, False, 0, False, False, _ops._debug().emulate)
        comp = _ops._emulated_compress if p.emulate else _ops._ffi_compress
        mm = _ops._emulated_matmul if p.emulate else _ops._ffi_matmul
        dense = jax.jit(lambda a, b: a @ b)
        cslt = jax.jit(cusparselt.sparse_matmul)
        cslt_xw = jax.jit(lambda x, w: cusparselt.matmul(x, w, sparse="rhs"))
        compress = jax.jit(lambda a: comp(a, m, k, True, p))
        cslt_mm = jax.jit(lambda c, b: mm(c, b, m, k, n, (True, True, True), p))
        pallas = jax.jit(lambda v, mt, b: pallas_spmm(v, mt, b, interpret=interpret))
        fns, errors = probe({
            "dense": lambda: dense(a, b),
            "cslt": lambda: cslt(a, b),
            "cslt_xw": lambda: cslt_xw(x, w),
            "compress": lambda: compress(a),
        })
        if "compress" in fns:
            c = jax.block_until_ready(compress(a))
            more, err2 = probe({"cslt_mm": lambda: cslt_mm(c, b)})
            fns.update(more)
            errors.update(err2)
        try:
            values, meta = prune_compress_2to4(a, axis=-1, interpret=interpret)
            more, err2 = probe({"pallas": lambda: pallas(values, meta, b)})
        except Exception as e:  # noqa: BLE001
            more, err2 = {}, {"pallas": f"{type(e).__name__}: {str(e)[:300]}"}
        fns.update(more)
        errors.update(err2)
        # correctness first (same pruned A): the max error against the dense product
        ref = np.asarray(dense(a, b), np.float32)
        err = {f: float(np.max(np.abs(np.asarray(fns[f](), np.float32) - ref)))
               for f in ("cslt", "cslt_mm", "pallas") if f in fns}
        if "cslt_xw" in fns:
            err["cslt_xw"] = float(np.max(np.abs(np.asarray(cslt_xw(x, w), np.float32) - ref.T)))
        t = timeit(fns, runs)
        flops = 2 * m * k * n

        def ratio(num, den):
            return t[num] / t[den] if num in t and den in t else None

        row = {"shape": name, "M": m, "K": k, "N": n, "max_abs_err": err, "errors": errors,
               **{f"{f}_ms": v * 1e3 for f, v in t.items()},
               "dense_tflops": flops / t["dense"] / 1e12,
               "speedup_cslt": ratio("dense", "cslt"),
               "speedup_cslt_mm": ratio("dense", "cslt_mm"),
               "speedup_cslt_xw": ratio("dense", "cslt_xw"),
               "speedup_pallas": ratio("dense", "pallas"),
               "compress_over_dense": ratio("compress", "dense")}
        rows.append(row)
        print(f"gemm {name}: " + ", ".join(f"{f} {v * 1e3:.3f} ms" for f, v in t.items()), flush=True)
    return rows


def bench_layer(smoke: bool, runs: int) -> list[dict[str, Any]]:
    rows = []
    for d in ((32,) if smoke else (1024, 4096)):
        t_tokens = 64 if smoke else TOKENS
        kx, kw, kd = jax.random.split(jax.random.key(1), 3)
        x = jax.random.normal(kx, (t_tokens, d), jnp.bfloat16)
        dy = jax.random.normal(kd, (t_tokens, 4 * d), jnp.bfloat16)
        w_f = pruned(kw, (d, 4 * d), 0)  # forward: 2:4 along K = d
        w_b = pruned(kw, (d, 4 * d), 1)  # grad-input: 2:4 along O = 4d
        fns = {
            "fwd_dense": (jax.jit(lambda x, w: x @ w), (x, w_f)),
            "fwd_cslt": (jax.jit(lambda x, w: cusparselt.matmul(x, w, sparse="rhs")), (x, w_f)),
            "gin_dense": (jax.jit(lambda dy, w: dy @ w.T), (dy, w_b)),
            "gin_cslt": (jax.jit(lambda dy, w: cusparselt.matmul(dy, w, sparse="rhs",
                                                                 transpose_rhs=True)), (dy, w_b)),
            "gw_dense": (jax.jit(lambda x, dy: x.T @ dy), (x, dy)),
        }
        ok, errors = probe({k: (lambda f=f, a=a: f(*a)) for k, (f, a) in fns.items()})
        t = timeit(ok, runs)
        row = {"d": d, "tokens": t_tokens, **{f"{k}_ms": v * 1e3 for k, v in t.items()},
               "speedup_fwd": t["fwd_dense"] / t["fwd_cslt"] if "fwd_cslt" in t else None,
               "speedup_gin": t["gin_dense"] / t["gin_cslt"] if "gin_cslt" in t else None,
               "errors": errors}
        rows.append(row)
        print(f"layer d={d}: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in t.items()), flush=True)
    return rows


def bench_train_step(smoke: bool, runs: int) -> list[dict[str, Any]]:
    import fst_jax

    rows = []
    for d in ((32,) if smoke else (1024, 4096)):
        t_tokens = 64 if smoke else TOKENS
        k1, k2, kx = jax.random.split(jax.random.key(2), 3)
        params = {"w1": jax.random.normal(k1, (d, 4 * d), jnp.float32) / np.sqrt(d),
                  "w2": jax.random.normal(k2, (4 * d, d), jnp.float32) / np.sqrt(4 * d)}
        x = jax.random.normal(kx, (t_tokens, d), jnp.bfloat16)

        def loss(p, x):
            h = jax.nn.gelu(x @ p["w1"].astype(jnp.bfloat16))
            y = x + h @ p["w2"].astype(jnp.bfloat16)
            return jnp.mean(jnp.square(y.astype(jnp.float32)))

        def step_of(fn):
            @jax.jit
            def step(p, x):
                g = jax.grad(fn)(p, x)
                return jax.tree.map(lambda a, b: a - 1e-3 * b, p, g)
            return step

        variants = {"dense": step_of(loss)}
        notes = {}
        for backend in ("xla", "cusparselt"):
            try:
                cfg = fst_jax.FSTConfig(skip_first=False, skip_last=False, backend=backend)
                variants[f"fst_{backend}"] = step_of(fst_jax.sparsify(loss, cfg))
                jax.block_until_ready(variants[f"fst_{backend}"](params, x))
            except Exception as e:  # noqa: BLE001 - e.g. the extension not built
                variants.pop(f"fst_{backend}", None)
                notes[backend] = f"{type(e).__name__}: {str(e)[:300]}"
        t = timeit({k: (lambda s=s: s(params, x)) for k, s in variants.items()}, runs)
        row = {"d": d, "tokens": t_tokens, **{f"{k}_ms": v * 1e3 for k, v in t.items()},
               **{f"speedup_{k}": t["dense"] / v for k, v in t.items() if k != "dense"},
               "notes": notes}
        rows.append(row)
        print(f"train_step d={d}: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in t.items())
              + (f" ({notes})" if notes else ""), flush=True)
    return rows


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def md(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = [c for c in rows[0] if not isinstance(rows[0][c], dict)]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}"
        return "" if v is None else str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    extra = [f"* {r.get('shape', r.get('d'))}: {c} = {r[c]}" for r in rows for c in r
             if isinstance(r[c], dict) and r[c]]
    return "\n".join(out + ([""] + extra if extra else [])) + "\n"


def write(out: Path, section: str, rows: Any, meta: dict[str, Any], error: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{section}.json").write_text(json.dumps({"meta": meta, "rows": rows, "error": error},
                                                    indent=1, default=str))
    text = f"## {section}\n\n{meta['device']}, jax {meta['jax']}, smoke={meta['smoke']}\n\n"
    text += md(rows) if rows else ""
    if error:
        text += f"\n**error**: `{error.splitlines()[-1] if error else ''}`\n"
    (out / f"{section}.md").write_text(text)


SECTIONS = {"gemm": bench_gemm, "layer": bench_layer, "train_step": bench_train_step}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cusparselt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/cusparselt"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any backend")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
    args = parser.parse_args(argv)
    if not args.smoke:
        ok, reason = cusparselt.available()
        if not ok:
            try:
                cusparselt.load()
                ok, reason = cusparselt.available()
            except cusparselt.BuildError as e:
                reason = str(e)
        if not ok:
            print(f"benchmarks.cusparselt: cuSPARSELt is not available: {reason}", file=sys.stderr)
            return 2
    runs = args.runs or (1 if args.smoke else 10)
    meta = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "smoke": args.smoke, "runs": runs, "argv": sys.argv}
    status = 0
    emulate = _ops._emulate_off_cuda() if args.smoke and not on_gpu() else _null()
    with emulate:
        for section in args.sections:
            t0 = time.perf_counter()
            try:
                rows = SECTIONS[section](args.smoke, runs)
                write(args.out, section, rows, {**meta, "seconds": time.perf_counter() - t0})
            except Exception:  # noqa: BLE001 - keep the other sections
                status = 1
                err = traceback.format_exc()
                print(err, file=sys.stderr)
                write(args.out, section, [], meta, err)
    return status


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
