"""The peer: torch's cuSPARSELt ops at the shapes of ``benchmarks.cusparselt`` (own process).

``python -m benchmarks.cusparselt_torch --out DIR`` writes ``DIR/torch.json`` and
``DIR/torch.md``: per shape, torch's dense ``A @ B``, ``torch._cslt_compress(A)`` and
``torch._cslt_sparse_mm(compressed, B)`` (bf16, warmed up, CUDA events), and the two combined
(compression included, like ``fst_jax.cusparselt.sparse_matmul``). Run it in its own process
(torch and JAX would otherwise compete for GPU memory). Without torch or a GPU it writes the
reason and exits 2. ``--smoke``: the tiny shapes only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from benchmarks.cusparselt import gemm_shapes, md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cusparselt_torch")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/cusparselt"))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    def done(rows, meta, error=None, status=0):
        (args.out / "torch.json").write_text(json.dumps({"meta": meta, "rows": rows, "error": error},
                                                        indent=1))
        text = f"## torch peer\n\n{meta}\n\n" + (md(rows) if rows else "") + (
            f"\n**not run**: {error}\n" if error else "")
        (args.out / "torch.md").write_text(text)
        print(text)
        return status

    try:
        import torch
    except ImportError as e:
        return done([], {}, f"no torch: {e}", 2)
    if not torch.cuda.is_available():
        return done([], {"torch": torch.__version__}, "no CUDA GPU for torch", 2)
    meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name(),
            "cusparselt": getattr(torch.backends.cusparselt, "version", lambda: None)()}

    def time_ms(fn, runs):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 5)
        return statistics.median(times)

    rows = []
    for name, m, k, n in gemm_shapes(args.smoke):
        if m % 16 or k % 16 or n % 16:
            continue
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        a = a * torch.tensor([1, 1, 0, 0], device="cuda", dtype=a.dtype).repeat(m, k // 4)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        row = {"shape": name, "M": m, "K": k, "N": n}
        try:
            comp = torch._cslt_compress(a)
            row["dense_ms"] = time_ms(lambda: a @ b, args.runs)
            row["compress_ms"] = time_ms(lambda: torch._cslt_compress(a), args.runs)
            row["cslt_mm_ms"] = time_ms(lambda: torch._cslt_sparse_mm(comp, b), args.runs)
            row["cslt_ms"] = time_ms(lambda: torch._cslt_sparse_mm(torch._cslt_compress(a), b),
                                     args.runs)
            err = (torch._cslt_sparse_mm(comp, b).float() - (a @ b).float()).abs().max().item()
            row["max_abs_err"] = err
            row["speedup_cslt_mm"] = row["dense_ms"] / row["cslt_mm_ms"]
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(row, flush=True)
    return done(rows, meta)


if __name__ == "__main__":
    sys.exit(main())
