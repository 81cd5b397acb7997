"""The main job's statistics and results table: mean, standard deviation and standard error over
seeds, the paired difference FST − dense, and the text table ``fst-jax train`` prints."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from fst_jax.train.loop import SeedResult

__all__ = ["aggregate", "mean_std_se", "results_table"]


def mean_std_se(values: Sequence[float]) -> dict[str, Any]:
    """The mean, sample standard deviation and standard error of the mean of ``values``.

    Args:
      values: one number per seed (at least one).

    Returns:
      ``{"values": list(values), "mean", "std", "stderr"}``; ``std`` uses ``N − 1`` and is
      ``None`` for a single value, and so is ``stderr`` (``std / √N``).

    Raises:
      statistics.StatisticsError: ``values`` is empty.

    Example:
      >>> from fst_jax.train import mean_std_se
      >>> mean_std_se([1.0, 2.0, 3.0])
      {'values': [1.0, 2.0, 3.0], 'mean': 2.0, 'std': 1.0, 'stderr': 0.5773502691896258}
      >>> mean_std_se([0.5])["std"] is None
      True
    """
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else None
    return {
        "values": list(values),
        "mean": mean,
        "std": std,
        "stderr": std / math.sqrt(n) if std is not None else None,
    }


def aggregate(per_seed: Sequence[SeedResult], metric: str = "test_accuracy") -> dict[str, Any]:
    """Mean ± standard deviation of a final metric per variant, and the paired difference.

    The paired difference is ``fst − dense`` per seed (both runs of a seed share the
    initialization and the batch order); its standard error is ``stdev(differences) / √N``.
    Standard deviations use ``N − 1`` and are ``None`` for a single seed.

    Args:
      per_seed: the results of each seed.
      metric: a key of :meth:`RunResult.final`.

    Returns:
      ``{"num_seeds", "seeds", "metric", "variants": {variant: {"values", "mean", "std",
      "stderr"}}, "paired_difference": {"values", "mean", "std", "stderr"}}`` (the last only
      when both ``dense`` and ``fst`` ran).

    Raises:
      ValueError: ``per_seed`` is empty.

    Example:
      >>> from fst_jax.train import RunResult, SeedResult, aggregate
      >>> def run(variant, acc):
      ...     return RunResult(variant, train_loss=[0.0], test_loss=[0.0], test_accuracy=[acc])
      >>> seeds = [SeedResult(s, {"dense": run("dense", d), "fst": run("fst", f)})
      ...          for s, (d, f) in enumerate([(0.75, 0.625), (0.5, 0.5)])]
      >>> agg = aggregate(seeds)
      >>> agg["variants"]["dense"]["mean"], agg["paired_difference"]["mean"]
      (0.625, -0.0625)
    """
    if not per_seed:
        raise ValueError("aggregate needs at least one seed")
    variants = list(per_seed[0].runs)
    values = {v: [float(s.runs[v].final()[metric]) for s in per_seed] for v in variants}
    out: dict[str, Any] = {
        "num_seeds": len(per_seed),
        "seeds": [s.seed for s in per_seed],
        "metric": metric,
        "variants": {v: mean_std_se(values[v]) for v in variants},
    }
    if "dense" in values and "fst" in values:
        diffs = [f - d for f, d in zip(values["fst"], values["dense"], strict=True)]
        out["paired_difference"] = mean_std_se(diffs)
    return out


def _fmt_flops(flops: float | None) -> str:
    if flops is None:
        return "n/a"
    for unit, scale in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops:.0f} FLOP"


def _pm(stats: dict[str, Any]) -> str:
    if stats["std"] is None:
        return f"{stats['mean']:.4f}"
    return f"{stats['mean']:.4f} ± {stats['std']:.4f}"


def results_table(
    per_seed: Sequence[SeedResult], flops: dict[str, float | None], agg: dict[str, Any]
) -> str:
    """The results table ``fst-jax train`` prints.

    One row per variant and seed (final train loss, test accuracy, median step time, compile
    time, matmul FLOPs per step; and, when an FST run carries its exported 2:4 model, that
    model's test accuracy evaluated dense), then the FLOPs ratio, the accuracy over seeds, the
    paired difference, which weights the 2:4 model pruned, and whether its accuracy equals the
    FST run's.

    Args:
      per_seed: the results of each seed.
      flops: matmul FLOPs per step by variant (``None``: unknown).
      agg: :func:`aggregate` of ``per_seed``.

    Returns:
      The table, lines joined with ``"\\n"``.

    Example:
      >>> from fst_jax.train import RunResult, SeedResult, aggregate, results_table
      >>> run = lambda v, acc: RunResult(v, train_loss=[0.5], test_loss=[0.5], test_accuracy=[acc])
      >>> seeds = [SeedResult(0, {"dense": run("dense", 0.75), "fst": run("fst", 0.625)})]
      >>> print(results_table(seeds, {"dense": 4e6, "fst": 2e6}, aggregate(seeds)))
      variant  seed  final train loss  test acc  median step (ms)  compile (s)  matmul FLOPs/step
      -------------------------------------------------------------------------------------------
      dense       0            0.5000    0.7500               nan         0.00         4.00 MFLOP
      fst         0            0.5000    0.6250               nan         0.00         2.00 MFLOP
      FST/dense FLOPs per step: 0.500
      test accuracy over 1 seed (one seed: no spread): dense 0.7500, fst 0.6250
      paired difference fst − dense: -0.1250
    """
    header = (
        "variant",
        "seed",
        "final train loss",
        "test acc",
        "median step (ms)",
        "compile (s)",
        "matmul FLOPs/step",
    )
    with_pruned = any(r.pruned is not None for s in per_seed for r in s.runs.values())
    if with_pruned:
        header = (*header, "2:4 model test acc")
    rows = [header]
    for variant in per_seed[0].runs:
        for s in per_seed:
            f = s.runs[variant].final()
            rows.append(
                (
                    variant,
                    str(s.seed),
                    f"{f['train_loss']:.4f}",
                    f"{f['test_accuracy']:.4f}",
                    f"{f['median_step_ms']:.3f}",
                    f"{f['compile_s']:.2f}",
                    _fmt_flops(flops.get(variant)),
                )
            )
            if with_pruned:
                pruned = s.runs[variant].pruned
                rows[-1] += ("-" if pruned is None else f"{pruned.test_accuracy:.4f}",)
    widths = [max(len(row[j]) for row in rows) for j in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if j == 0 else c.rjust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    dense, fst = flops.get("dense"), flops.get("fst")
    if dense and fst is not None:
        lines.append(f"FST/dense FLOPs per step: {fst / dense:.3f}")
    n = agg["num_seeds"]
    spread = "mean ± std" if n > 1 else "one seed: no spread"
    lines.append(
        f"test accuracy over {n} seed{'s' if n > 1 else ''} ({spread}): "
        + ", ".join(f"{v} {_pm(st)}" for v, st in agg["variants"].items())
    )
    if "paired_difference" in agg:
        d = agg["paired_difference"]
        se = f" ± {d['stderr']:.4f} (standard error)" if d["stderr"] is not None else ""
        lines.append(f"paired difference fst − dense: {d['mean']:+.4f}{se}")
    if with_pruned:
        lines += _pruned_lines(per_seed)
    return "\n".join(lines)


def _pruned_lines(per_seed: Sequence[SeedResult]) -> list[str]:
    """What the 2:4 model is, and whether its accuracy is the FST run's, for each such run."""
    lines = []
    summaries: dict[str, list[str]] = {}
    for s in per_seed:
        for variant, r in s.runs.items():
            if r.pruned is None:
                continue
            summaries.setdefault(r.pruned.summary(), []).append(f"{variant} seed {s.seed}")
            if r.pruned.test_accuracy != r.test_accuracy[-1]:
                lines.append(
                    f"2:4 model of {variant} seed {s.seed}: test acc {r.pruned.test_accuracy:.4f} "
                    f"differs from the sparsified predict's {r.test_accuracy[-1]:.4f}"
                )
    if not lines:
        lines.append(
            "2:4 model test acc (fst_jax.forward_masks + prune_params, dense predict) = the FST "
            "run's test acc (sparsified predict), every seed"
        )
    for text, runs in summaries.items():
        which = "" if len(summaries) == 1 else f" ({', '.join(runs)})"
        lines.append(f"2:4 model{which}: {text}")
    return lines
