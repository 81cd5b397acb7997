"""Accuracy study of fst_jax: dense vs FST (2:4 fully sparse training), paired over seeds.

Run from the repository root::

    python -m benchmarks.accuracy                      # main suite, 5 seeds; appends to RESULTS.md
    python -m benchmarks.accuracy --suite ablation     # the ablation (3 seeds by default)
    python -m benchmarks.accuracy --suite all --seeds 5 --ablation-seeds 5
    python -m benchmarks.accuracy --quick --no-append  # smoke run: 1 seed, 30 steps, tiny models

Each setting is one in-process call of ``fst_jax.train.main([... , "--quiet", "--out", SUBDIR])``,
which trains a dense and an FST model per seed from the same initialization on the same batches
(the pair shares its seed). This module reads each ``SUBDIR/results.json`` and reports, per
setting, the final test accuracy of each variant (mean ± std over seeds) and the paired
difference FST − dense with its standard error (``stdev(differences) / √N``).

Parity rule (from the accuracy issue): ``|dense − FST| <= max(0.5 pt, 2 standard errors of the
paired difference)``. With one seed there is no standard error, and the rule falls back to 0.5 pt
(marked ``(1 seed)``).

Suites:

``main``
    datasets ``digits`` and ``mnist1d`` × models ``mlp`` and ``cnn`` × widths 64 and 256, default
    training (``fst_jax.train`` defaults: 500 steps, batch 128, AdamW lr 1e-3 cosine) and the
    default ``FSTConfig``. ``--datasets/--models/--widths`` select a sub-grid.
``ablation``
    ``mnist1d`` / ``mlp`` / width 256 (``--ablation-setting`` changes it), AdamW, the variants of
    :data:`ABLATION_VARIANTS` (forward only, + grad-input, the full default, restore_scale=1,
    pattern=even, sr_ste 0 and 2e-2); ``--ablation-variants full`` adds the rest of the issue's
    protocol (:data:`ABLATION_VARIANTS_EXTRA`: restore_scale 0 and 0.5, pattern=odd,
    grad_weight=prune_grad_output, sr_ste 2e-3, SGD with sr_ste 0/2e-4/2e-3/2e-2, min_features
    32/64/128). Every variant is paired with the same dense runs (same
    seeds), so its difference vs dense is directly comparable.

Outputs: markdown tables on stdout, ``DIR/accuracy.json`` (rewritten after every setting, so an
interrupted run keeps what it finished), ``DIR/accuracy.png`` (paired differences with 2-SE error
bars) and, unless ``--quick`` or ``--no-append``, a dated section appended to
``benchmarks/RESULTS.md`` with the command, machine and load. ``--reuse`` skips settings whose
``results.json`` already exists in ``DIR`` with the same arguments (to resume or to combine runs).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks.run import RESULTS_MD, _loadavg, append_section, machine_info, machine_lines, md_table  # noqa: F401

PARITY_PT = 0.5  # percentage points
DATASETS = ("digits", "mnist1d")
MODELS = ("mlp", "cnn")
WIDTHS = (64, 256)
ABLATION_SETTING = ("mnist1d", "mlp", 256)

# name -> (description, --config overrides, optimizer)
ABLATION_VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "forward_only": ("forward only (SR-STE)", ["grad_input=dense", "grad_weight=dense"], "adamw"),
    "grad_input": ("+ grad-input", ["grad_weight=dense"], "adamw"),
    "default": ("+ grad-weight (full default)", [], "adamw"),
    "restore_1": ("default, restore_scale=1.0", ["restore_scale=1.0"], "adamw"),
    "pattern_even": ("default, pattern=even", ["pattern=even"], "adamw"),
    "sr_ste_0": ("default, sr_ste=0", ["sr_ste=0"], "adamw"),
    "sr_ste_2e-2": ("default, sr_ste=2e-2", ["sr_ste=2e-2"], "adamw"),
}
# The rest of the paper's ablation protocol (``--ablation-variants full`` runs both dicts).
ABLATION_VARIANTS_EXTRA: dict[str, tuple[str, list[str], str]] = {
    "restore_0": ("fixed mask, no restoration (restore_scale=0)", ["restore_scale=0"], "adamw"),
    "restore_0.5": ("default, restore_scale=0.5", ["restore_scale=0.5"], "adamw"),
    "pattern_odd": ("default, pattern=odd", ["pattern=odd"], "adamw"),
    "prune_grad_output": ("grad_weight=prune_grad_output", ["grad_weight=prune_grad_output"], "adamw"),
    "sr_ste_2e-3": ("default, sr_ste=2e-3", ["sr_ste=2e-3"], "adamw"),
    "sgd_sr_ste_0": ("SGD, sr_ste=0", ["sr_ste=0"], "sgd"),
    "sgd_sr_ste_2e-4": ("SGD, sr_ste=2e-4 (default)", [], "sgd"),
    "sgd_sr_ste_2e-3": ("SGD, sr_ste=2e-3", ["sr_ste=2e-3"], "sgd"),
    "sgd_sr_ste_2e-2": ("SGD, sr_ste=2e-2", ["sr_ste=2e-2"], "sgd"),
    "min_features_32": ("default, min_features=32", ["min_features=32"], "adamw"),
    "min_features_64": ("default, min_features=64", ["min_features=64"], "adamw"),
    "min_features_128": ("default, min_features=128", ["min_features=128"], "adamw"),
}
QUICK_STEPS = 30
QUICK_WIDTH = 16


def _setting(suite: str, name: str, dataset: str, model: str, width: int, *, config: Sequence[str] = (),
             optimizer: str = "adamw", description: str = "") -> dict[str, Any]:
    return {"suite": suite, "name": name, "dataset": dataset, "model": model, "width": width,
            "config": list(config), "optimizer": optimizer, "description": description or name}


def main_settings(datasets: Sequence[str], models: Sequence[str], widths: Sequence[int],
                  quick: bool) -> list[dict[str, Any]]:
    """The settings of the main suite (two tiny ones with ``quick``)."""
    if quick:
        return [_setting("main", f"{d}/mlp/{QUICK_WIDTH}", d, "mlp", QUICK_WIDTH)
                for d in ("digits", "mnist1d")]
    return [_setting("main", f"{d}/{m}/{w}", d, m, w)
            for d in datasets for m in models for w in widths]


def ablation_settings(dataset: str, model: str, width: int, quick: bool,
                      variants: str = "core") -> list[dict[str, Any]]:
    """The settings of the ablation (two tiny variants with ``quick``).

    ``variants="core"`` runs :data:`ABLATION_VARIANTS`; ``"full"`` adds
    :data:`ABLATION_VARIANTS_EXTRA` (the whole protocol of the accuracy issue).
    """
    table = {**ABLATION_VARIANTS, **(ABLATION_VARIANTS_EXTRA if variants == "full" else {})}
    names = ("forward_only", "default") if quick else tuple(table)
    if quick:
        dataset, model, width = "digits", "mlp", QUICK_WIDTH
    out = []
    for n in names:
        desc, cfg, opt = table[n]
        out.append(_setting("ablation", n, dataset, model, width, config=cfg, optimizer=opt,
                            description=desc))
    return out


def train_argv(s: dict[str, Any], seeds: int, steps: int | None, out: Path) -> list[str]:
    """The ``fst_jax.train.main`` arguments of setting ``s``."""
    argv = ["--dataset", s["dataset"], "--model", s["model"], "--width", str(s["width"]),
            "--optimizer", s["optimizer"], "--seeds", str(seeds), "--seed", "0"]
    if steps is not None:
        argv += ["--steps", str(steps)]
    if s["config"]:
        argv += ["--config", *s["config"]]
    return argv + ["--quiet", "--out", str(out)]


def _stats(values: Sequence[float]) -> dict[str, Any]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"values": list(values), "mean": mean, "std": std,
            "stderr": std / math.sqrt(n) if std is not None else None}


def summarize(s: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """One row: accuracies (fractions) per variant, paired difference and the parity verdict."""
    acc = {v: [float(p["runs"][v]["final"]["test_accuracy"]) for p in results["per_seed"]]
           for v in ("dense", "fst")}
    diff = [f - d for f, d in zip(acc["fst"], acc["dense"], strict=True)]
    d = _stats(diff)
    two_se_pt = 2 * 100 * d["stderr"] if d["stderr"] is not None else None
    threshold_pt = max(PARITY_PT, two_se_pt) if two_se_pt is not None else PARITY_PT
    return {
        **s,
        "depth": results["model"]["depth"],
        "num_params": results["model"]["num_params"],
        "steps": results["args"]["steps"],
        "batch_size": results["args"]["batch_size"],
        "lr": results["optimizer"]["lr"],
        "seeds": results["seeds"],
        "fst_config": results["config"],
        "flops_per_step": results["flops_per_step"],
        "dense": _stats(acc["dense"]),
        "fst": _stats(acc["fst"]),
        "paired_difference": d,
        "threshold_pt": threshold_pt,
        "parity": abs(100 * d["mean"]) <= threshold_pt,
    }


def _pm(st: dict[str, Any]) -> str:
    if st["std"] is None:
        return f"{100 * st['mean']:.2f}"
    return f"{100 * st['mean']:.2f} ± {100 * st['std']:.2f}"


def _diff(st: dict[str, Any]) -> str:
    if st["stderr"] is None:
        return f"{100 * st['mean']:+.2f}"
    return f"{100 * st['mean']:+.2f} ± {100 * st['stderr']:.2f}"


def _verdict(r: dict[str, Any]) -> str:
    v = "yes" if r["parity"] else "**no**"
    return v + (" (1 seed)" if r["paired_difference"]["stderr"] is None else "")


def main_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the main suite."""
    body = [[r["dataset"], r["model"], r["width"], r["depth"], len(r["seeds"]), r["steps"],
             _pm(r["dense"]), _pm(r["fst"]), _diff(r["paired_difference"]),
             f"{r['threshold_pt']:.2f}", _verdict(r)] for r in rows]
    return md_table(["dataset", "model", "width", "depth", "seeds", "steps", "dense acc %",
                     "FST acc %", "FST − dense (pt, ± SE)", "parity bound (pt)", "parity"], body)


def ablation_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the ablation."""
    body = [[r["description"] + (" (reused)" if r.get("reused") else ""),
             " ".join(r["config"]) or "(default)", r["optimizer"],
             len(r["seeds"]), r["steps"], _pm(r["dense"]), _pm(r["fst"]),
             _diff(r["paired_difference"]), f"{r['threshold_pt']:.2f}", _verdict(r)] for r in rows]
    return md_table(["variant", "--config", "optimizer", "seeds", "steps", "dense acc %",
                     "FST acc %", "FST − dense (pt, ± SE)", "parity bound (pt)", "parity"], body)


def plot(report: dict[str, Any], path: Path) -> bool:
    """Bar chart of the paired differences (pt) with 2-SE error bars, one panel per suite."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is optional
        return False
    suites = [k for k in ("main", "ablation") if report.get(k)]
    if not suites:
        return False
    fig, axes = plt.subplots(1, len(suites), figsize=(6.5 * len(suites), 4.5), squeeze=False)
    for ax, suite in zip(axes[0], suites, strict=True):
        rows = report[suite]
        labels = [r["name"] for r in rows]
        means = [100 * r["paired_difference"]["mean"] for r in rows]
        errs = [2 * 100 * (r["paired_difference"]["stderr"] or 0.0) for r in rows]
        colors = ["tab:green" if r["parity"] else "tab:red" for r in rows]
        ax.bar(range(len(rows)), means, yerr=errs, capsize=4, color=colors)
        ax.axhline(0, color="black", lw=0.8)
        for y in (-PARITY_PT, PARITY_PT):
            ax.axhline(y, color="gray", lw=0.8, ls="--")
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("FST − dense test accuracy (pt), ± 2 SE")
        ax.set_title(f"{suite} (green: parity, red: not; dashed: ±{PARITY_PT} pt)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=("main", "ablation", "all"), default="main")
    p.add_argument("--seeds", type=int, default=5, help="seeds per main setting (default: 5)")
    p.add_argument("--ablation-seeds", type=int, default=3, help="seeds per ablation variant (default: 3)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: fst_jax.train's, 500)")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--models", nargs="+", choices=("mlp", "cnn", "transformer", "mlp_nnx"),
                   default=list(MODELS))
    p.add_argument("--widths", nargs="+", type=int, default=list(WIDTHS))
    p.add_argument("--ablation-setting", nargs=3, metavar=("DATASET", "MODEL", "WIDTH"),
                   default=[str(v) for v in ABLATION_SETTING])
    p.add_argument("--ablation-variants", choices=("core", "full"), default="core",
                   help="core: the 7 variants of ABLATION_VARIANTS; full: the whole protocol "
                   "(restore_scale 0/0.5, pattern odd, prune_grad_output, sr_ste sweeps for AdamW "
                   "and SGD, min_features 32/64/128) (default: core)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: 1 seed, {QUICK_STEPS} steps, two tiny settings per suite")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/accuracy"))
    p.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    p.add_argument("--reuse", action="store_true",
                   help="skip settings whose results.json in --out has the same arguments")
    p.add_argument("--note", action="append", default=[], help="a line added to the RESULTS.md section")
    return p


def _run_setting(s: dict[str, Any], seeds: int, steps: int | None, out: Path, reuse: bool
                 ) -> tuple[dict[str, Any], float, bool]:
    from fst_jax import train

    sub = out / s["suite"] / s["name"].replace("/", "_")
    argv = train_argv(s, seeds, steps, sub)
    rfile = sub / "results.json"
    if reuse and rfile.exists():
        prev = json.loads(rfile.read_text())
        a = prev.get("args", {})
        want = train.build_parser().parse_args(argv)
        if all(a.get(k) == v for k, v in vars(want).items() if k not in ("out", "quiet")):
            return prev, 0.0, True
    t0 = time.perf_counter()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = train.main(argv)
    if rc != 0:
        raise RuntimeError(f"fst_jax.train.main({argv}) returned {rc}:\n{buf.getvalue()}")
    return json.loads(rfile.read_text()), time.perf_counter() - t0, False


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(args_in)
    if args.seeds < 1 or args.ablation_seeds < 1:
        raise SystemExit("--seeds and --ablation-seeds must be >= 1")
    t_start = time.perf_counter()
    meta = machine_info(args_in)
    meta["command"] = "python -m benchmarks.accuracy" + "".join(" " + shlex.quote(a) for a in args_in)
    seeds_main = 1 if args.quick else args.seeds
    seeds_abl = 1 if args.quick else args.ablation_seeds
    steps = QUICK_STEPS if args.quick else args.steps
    plan: list[tuple[dict[str, Any], int]] = []
    if args.suite in ("main", "all"):
        plan += [(s, seeds_main) for s in main_settings(args.datasets, args.models, args.widths, args.quick)]
    if args.suite in ("ablation", "all"):
        d, m, w = args.ablation_setting
        plan += [(s, seeds_abl) for s in ablation_settings(d, m, int(w), args.quick, args.ablation_variants)]

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"meta": meta, "parity_rule": (
        f"|FST - dense| <= max({PARITY_PT} pt, 2 * SE of the paired difference)"),
        "main": [], "ablation": []}
    bar = tqdm(plan, desc="settings", file=sys.stderr, dynamic_ncols=True)
    for s, n in bar:
        bar.set_postfix_str(f"{s['suite']}:{s['name']}")
        results, wall, reused = _run_setting(s, n, steps, out, args.reuse)
        row = summarize(s, results)
        row["wall_s"] = round(wall, 1)
        row["reused"] = reused
        row["results_json"] = str(out / s["suite"] / s["name"].replace("/", "_") / "results.json")
        report[s["suite"]].append(row)
        report["meta"]["wall_s"] = time.perf_counter() - t_start
        (out / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    bar.close()

    meta["loadavg_end"] = _loadavg()
    meta["wall_s"] = time.perf_counter() - t_start
    text = []
    if report["main"]:
        text.append("### Dense vs FST (default FSTConfig): final test accuracy\n\n" + main_table(report["main"]))
    if report["ablation"]:
        r0 = report["ablation"][0]
        text.append(f"### Ablation: {r0['dataset']} / {r0['model']} / width {r0['width']}\n\n"
                    + ablation_table(report["ablation"]))
    body = "\n\n".join(text)
    print(body)
    (out / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    has_png = plot(report, out / "accuracy.png")
    print(f"\nwrote {out / 'accuracy.json'}" + (f" and {out / 'accuracy.png'}" if has_png else ""))
    if not (args.quick or args.no_append):
        append_results(meta, body, args.note, out, has_png)
    return 0


def append_results(meta: dict[str, Any], body: str, notes: Sequence[str], out: Path, has_png: bool) -> None:
    """Appends a dated accuracy section to ``benchmarks/RESULTS.md``."""
    lines = machine_lines(meta) + [
        "accuracies in %, mean ± std over paired seeds (seeds 0..N-1); FST − dense is the mean "
        f"paired difference ± its standard error; parity: |FST − dense| <= max({PARITY_PT} pt, 2 SE)"]
    if has_png:
        lines.append(f"figure: `{out / 'accuracy.png'}` (regenerated by the command; not committed)")
    append_section(f"Accuracy study, {meta['date']}", [*lines, *notes], body)


if __name__ == "__main__":
    sys.exit(main())
