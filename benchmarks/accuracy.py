"""Accuracy study of fst_jax: dense vs FST (2:4 fully sparse training), paired over seeds.

Run from the repository root::

    python -m benchmarks.accuracy --suite all          # main grid + ablation, 5 seeds; appends to RESULTS.md
    python -m benchmarks.accuracy --suite ablation     # the ablation only
    python -m benchmarks.accuracy --quick --no-append  # smoke run: 1 seed, 30 steps, tiny models

Every run is one seed of one variant of ``fst-jax train`` (same data, initialization, batch
order, optimizer and train step as :func:`fst_jax.train.main`), run through
:mod:`fst_jax.train`'s functions by :class:`Runner`. A dense run and an FST run of the same
seed share their initialization and batches (a pair). Per setting the study reports the final
test accuracy of each variant (mean ± std over seeds) and the paired difference FST − dense with
its standard error (``stdev(differences) / √N``).

Parity rule (from the accuracy issue): ``|dense − FST| <= max(0.5 pt, 2 standard errors of the
paired difference)``. With one seed there is no standard error, and the rule falls back to 0.5 pt
(marked ``(1 seed)``).

Suites:

``main``
    datasets ``digits`` and ``mnist1d`` × :data:`MODELS` × widths 64 and 256, the default
    ``FSTConfig``, AdamW (lr 1e-3, warm-up + cosine), batch 128, :data:`STEPS` steps.
    ``--datasets/--models/--widths`` select a sub-grid.
``ablation``
    the variants of :data:`ABLATION_VARIANTS` (the paper's ablation: forward only, + grad-input,
    + grad-weight without and with restoration; ``restore_scale`` 0/0.03/0.5/1; each pattern;
    ``prune_grad_output``; ``sr_ste`` sweeps for AdamW and SGD; ``min_features``) at each of
    :data:`ABLATION_SETTINGS` (or each ``--ablation-setting DATASET MODEL WIDTH``, repeatable;
    ``--ablation-variants`` picks variants). Every variant of a setting is paired with the same
    dense runs. With more than one setting, a last table lists every setting by variant (the
    paired difference, **miss** / ↑ off parity) and counts the settings at parity or ahead.
    ``--read-only`` trains nothing: it tabulates the runs found under ``DIR/runs``, each row over
    the seeds whose dense and FST runs are both there.

Outputs: markdown tables on stdout, ``DIR/accuracy.json`` (rewritten after every setting),
``DIR/accuracy.png`` (paired differences with 2-SE error bars), ``DIR/curves.png`` (test
accuracy vs step of each main setting, dense and FST), ``DIR/runs/*.json`` (one per
run: a later invocation reads finished runs back instead of retraining them, so an interrupted
study resumes; ``--fresh`` retrains) and, unless ``--quick`` or ``--no-append``, a dated section
appended to ``benchmarks/RESULTS.md`` with the command, machine and load.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import optax
from tqdm import tqdm

import fst_jax
from fst_jax.train import DEFAULT_STEPS, mean_std_se

from benchmarks.run import RESULTS_MD, _loadavg, append_section, machine_info, machine_lines, md_table  # noqa: F401

PARITY_PT = 0.5  # percentage points
DATASETS = ("digits", "mnist1d")
MODELS = ("mlp", "mlp_nnx", "cnn", "transformer", "resnet")
WIDTHS = (64, 256)
# The ResNet's width is its channel count: every block is two k=3 convolutions over all positions,
# so width 256 would cost ~60x the MLP's step on this CPU; it runs at 32 and 64.
MODEL_WIDTHS = {"resnet": (32, 64)}
BATCH_SIZE = 128
# Training steps per data set: fst-jax train's defaults, enough for the dense models to fit the
# training set (MNIST-1D 2000 steps of 128 = 64 epochs; digits 500 steps = 44 epochs).
STEPS = DEFAULT_STEPS
# Where the ablation runs: the MLP at width 256 and the CNN at width 64 (the largest gap of the
# first study), both on MNIST-1D (digits is too easy to separate the variants).
ABLATION_SETTINGS = (("mnist1d", "mlp", 256), ("mnist1d", "cnn", 64))

_NO_SKIP = ["skip_first=false", "skip_last=false"]
# name -> (description, --config overrides, optimizer); the paper's ablation and the sweeps.
ABLATION_VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "forward_only": ("forward only (SR-STE)", ["grad_input=dense", "grad_weight=dense"], "adamw"),
    "forward_only_sr_ste_2e-2": ("forward only, sr_ste=2e-2",
                                 ["grad_input=dense", "grad_weight=dense", "sr_ste=2e-2"], "adamw"),
    "grad_input": ("+ grad-input", ["grad_weight=dense"], "adamw"),
    "restore_0": ("+ grad-weight, fixed mask, no restoration (restore_scale=0)", ["restore_scale=0"], "adamw"),
    "default": ("+ restoration, restore_scale=0.03 (default)", [], "adamw"),
    "restore_0.5": ("restore_scale=0.5", ["restore_scale=0.5"], "adamw"),
    "restore_1": ("restore_scale=1", ["restore_scale=1.0"], "adamw"),
    "pattern_even": ("pattern=even", ["pattern=even"], "adamw"),
    "pattern_odd": ("pattern=odd", ["pattern=odd"], "adamw"),
    "rotating": ("pattern=rotating (the authors' 4 patterns, drawn per layer and step)",
                 ["pattern=rotating"], "adamw"),
    "rotating_ceo": ("pattern=checkerboard,even,odd (rotating)", ["pattern=checkerboard,even,odd"], "adamw"),
    "prune_grad_output": ("grad_weight=prune_grad_output (saliency)", ["grad_weight=prune_grad_output"], "adamw"),
    "mvue": ("grad_weight=mvue (unbiased 2:4 sample of dY)", ["grad_weight=mvue"], "adamw"),
    "transposable": ("grad_input=transposable (one mask for forward and grad-input)",
                     ["grad_input=transposable"], "adamw"),
    "transposable_mvue": ("grad_input=transposable, grad_weight=mvue",
                          ["grad_input=transposable", "grad_weight=mvue"], "adamw"),
    "gi_dense_mvue": ("grad_input=dense, grad_weight=mvue", ["grad_input=dense", "grad_weight=mvue"], "adamw"),
    "mvue_sr_ste_0": ("grad_weight=mvue, sr_ste=0", ["grad_weight=mvue", "sr_ste=0"], "adamw"),
    "mvue_sr_ste_2e-3": ("grad_weight=mvue, sr_ste=2e-3", ["grad_weight=mvue", "sr_ste=2e-3"], "adamw"),
    "mvue_sr_ste_2e-2": ("grad_weight=mvue, sr_ste=2e-2", ["grad_weight=mvue", "sr_ste=2e-2"], "adamw"),
    "sr_ste_0": ("sr_ste=0", ["sr_ste=0"], "adamw"),
    "sr_ste_2e-3": ("sr_ste=2e-3", ["sr_ste=2e-3"], "adamw"),
    "sr_ste_2e-2": ("sr_ste=2e-2", ["sr_ste=2e-2"], "adamw"),
    "sgd_sr_ste_0": ("SGD, sr_ste=0", ["sr_ste=0"], "sgd"),
    "sgd_sr_ste_2e-4": ("SGD, sr_ste=2e-4", ["sr_ste=2e-4"], "sgd"),
    "sgd_sr_ste_2e-3": ("SGD, sr_ste=2e-3", ["sr_ste=2e-3"], "sgd"),
    "sgd_sr_ste_2e-2": ("SGD, sr_ste=2e-2", ["sr_ste=2e-2"], "sgd"),
    "no_skip": ("first and last sparse too (skip_first/last=false)", _NO_SKIP, "adamw"),
    "no_skip_min_32": ("no skip, min_features=32", [*_NO_SKIP, "min_features=32"], "adamw"),
    "no_skip_min_64": ("no skip, min_features=64", [*_NO_SKIP, "min_features=64"], "adamw"),
    "no_skip_min_128": ("no skip, min_features=128", [*_NO_SKIP, "min_features=128"], "adamw"),
    "min_128": ("min_features=128", ["min_features=128"], "adamw"),
}
QUICK_STEPS = 30
QUICK_WIDTH = 16


def _setting(suite: str, name: str, dataset: str, model: str, width: int, *, config: Sequence[str] = (),
             optimizer: str = "adamw", description: str = "") -> dict[str, Any]:
    return {"suite": suite, "name": name, "dataset": dataset, "model": model, "width": width,
            "config": list(config), "optimizer": optimizer, "description": description or name}


def main_settings(datasets: Sequence[str], models: Sequence[str], widths: Sequence[int] | None,
                  quick: bool) -> list[dict[str, Any]]:
    """The settings of the main suite (two tiny ones with ``quick``)."""
    if quick:
        return [_setting("main", f"{d}/mlp/{QUICK_WIDTH}", d, "mlp", QUICK_WIDTH)
                for d in ("digits", "mnist1d")]
    return [_setting("main", f"{d}/{m}/{w}", d, m, w)
            for d in datasets for m in models for w in (widths or MODEL_WIDTHS.get(m, WIDTHS))]


def ablation_settings(dataset: str, model: str, width: int, quick: bool,
                      variants: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The variants of :data:`ABLATION_VARIANTS` (all, or ``variants``) at one setting.

    With ``quick``: two variants of a tiny digits MLP.
    """
    names = ("forward_only", "default") if quick else tuple(variants or ABLATION_VARIANTS)
    if quick:
        dataset, model, width = "digits", "mlp", QUICK_WIDTH
    out = []
    for n in names:
        desc, cfg, opt = ABLATION_VARIANTS[n]
        out.append(_setting("ablation", n, dataset, model, width, config=cfg, optimizer=opt,
                            description=desc))
    return out


def summarize(s: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """One row: accuracies (fractions) per variant, paired difference and the parity verdict."""
    acc = {v: [float(p["runs"][v]["final"]["test_accuracy"]) for p in results["per_seed"]]
           for v in ("dense", "fst")}
    diff = [f - d for f, d in zip(acc["fst"], acc["dense"], strict=True)]
    d = mean_std_se(diff)
    two_se_pt = 2 * 100 * d["stderr"] if d["stderr"] is not None else None
    threshold_pt = max(PARITY_PT, two_se_pt) if two_se_pt is not None else PARITY_PT
    return {
        **s,
        "depth": results["model"]["depth"],
        "steps": results["args"]["steps"],
        "batch_size": results["args"]["batch_size"],
        "lr": results["optimizer"]["lr"],
        "seeds": results["seeds"],
        "fst_config": results["config"],
        "dense": mean_std_se(acc["dense"]),
        "fst": mean_std_se(acc["fst"]),
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


def _standing(r: dict[str, Any]) -> str:
    """``"parity"``, ``"ahead"`` (FST better beyond the bound) or ``"behind"``: a row's verdict."""
    if r["parity"]:
        return "parity"
    return "ahead" if r["paired_difference"]["mean"] > 0 else "behind"


def _verdict(r: dict[str, Any]) -> str:
    v = {"parity": "yes", "ahead": "**no** (FST better)", "behind": "**no**"}[_standing(r)]
    return v + (" (1 seed)" if r["paired_difference"]["stderr"] is None else "")


def main_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the main suite."""
    body = [[r["dataset"], r["model"], r["width"], r["depth"], len(r["seeds"]), r["steps"],
             _pm(r["dense"]), _pm(r["fst"]), _diff(r["paired_difference"]),
             f"{r['threshold_pt']:.2f}", _verdict(r)] for r in rows]
    return md_table(["dataset", "model", "width", "depth", "seeds", "steps", "dense acc %",
                     "FST acc %", "FST − dense (pt, ± SE)", "parity bound (pt)", "parity"], body)


def grid_table(rows: Sequence[dict[str, Any]], seeds: int) -> str:
    """Markdown table of the ablation rows as settings × variants: ``FST − dense ± SE`` per cell,
    **miss** where not at parity with FST behind, ↑ where FST is ahead beyond the bound, the seed
    count where it is not ``seeds``, and a last row counting the cells at parity or ahead."""
    variants = list(dict.fromkeys(r["name"] for r in rows))
    settings = list(dict.fromkeys((r["dataset"], r["model"], r["width"]) for r in rows))
    cell = {((r["dataset"], r["model"], r["width"]), r["name"]): r for r in rows}

    def fmt(r: dict[str, Any] | None) -> str:
        if r is None:
            return "–"
        tag = {"parity": "", "ahead": " ↑", "behind": " **miss**"}[_standing(r)]
        k = len(r["seeds"])
        n = "" if k == seeds else f" ({k} seed{'s' * (k != 1)})"
        return _diff(r["paired_difference"]) + tag + n

    body = [[" / ".join(map(str, st)), *(fmt(cell.get((st, v))) for v in variants)] for st in settings]
    met = []
    for v in variants:
        measured = [cell[(st, v)] for st in settings if (st, v) in cell]
        met.append(f"{sum(_standing(r) != 'behind' for r in measured)} of {len(measured)}")
    body.append(["at parity or ahead", *met])
    return md_table(["setting", *variants], body)


def ablation_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the ablation."""
    body = [[r["description"],
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


def plot_curves(rows: Sequence[dict[str, Any]], path: Path) -> bool:
    """Test accuracy vs step, dense and FST, mean over seeds with a min-max band, one panel per row."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is optional
        return False
    if not rows:
        return False
    ncols = min(5, len(rows))
    nrows = -(-len(rows) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.5 * nrows), squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, rows):
        for color, variant in (("tab:blue", "dense"), ("tab:orange", "fst")):
            steps = r["curves"][variant][0][0]
            accs = [[100 * v for v in col] for col in zip(*(acc for _, acc in r["curves"][variant]))]
            mean = [sum(col) / len(col) for col in accs]
            ax.plot(steps, mean, color=color, label=variant, lw=1.2)
            ax.fill_between(steps, [min(c) for c in accs], [max(c) for c in accs], color=color, alpha=0.2)
        d = r["paired_difference"]
        ax.set_title(f"{r['dataset']} {r['model']} {r['width']}: {100 * d['mean']:+.2f} pt", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_ylim(max(0.0, min(100 * min(r["dense"]["values"] + r["fst"]["values"]) - 15, 90)), 100)
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("step", fontsize=9)
    fig.supylabel("test accuracy % (mean over seeds, min-max band)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=("main", "ablation", "all"), default="main")
    p.add_argument("--seeds", type=int, default=5, help="seeds per main setting (default: 5)")
    p.add_argument("--ablation-seeds", type=int, default=5, help="seeds per ablation variant (default: 5)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps (default per data set: {STEPS})")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--models", nargs="+", default=list(MODELS),
                   help=f"models of fst_jax.train (default: {' '.join(MODELS)})")
    p.add_argument("--widths", nargs="+", type=int, default=None,
                   help=f"widths of every model (default: {WIDTHS}, and {MODEL_WIDTHS})")
    p.add_argument("--ablation-setting", nargs=3, action="append", metavar=("DATASET", "MODEL", "WIDTH"),
                   help=f"where the ablation runs; repeatable (default: {ABLATION_SETTINGS})")
    p.add_argument("--ablation-variants", nargs="+", choices=tuple(ABLATION_VARIANTS), default=None,
                   help="a subset of the ablation variants (default: all)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: 1 seed, {QUICK_STEPS} steps, two tiny settings per suite")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/accuracy"))
    p.add_argument("--no-append", action="store_true", help="do not append to benchmarks/RESULTS.md")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--fresh", action="store_true",
                       help="retrain every run instead of reading finished runs back from --out/runs")
    cache.add_argument("--read-only", action="store_true",
                       help="train nothing: read finished runs back from --out/runs and leave a seed out of "
                            "a row where its dense or FST run is missing (rows with no pair are listed as "
                            "skipped)")
    p.add_argument("--note", action="append", default=[], help="a line added to the RESULTS.md section")
    return p


class Run(NamedTuple):
    """One run of :meth:`Runner.run`: its final metrics (``None`` when read-only mode did not find
    it), whether it was read back from disk, and its test-accuracy curve ``(steps, accuracies)``."""

    final: dict[str, Any] | None
    read_back: bool
    curve: tuple[list[int], list[float]] | None = None


class Runner:
    """Trains single (dataset, model, width, optimizer, steps, seed, variant) runs, cached on disk.

    One run is exactly what ``fst_jax.train.main`` does for one seed and one variant (same data,
    initialization, batch order, optimizer and jitted train step), done through
    :mod:`fst_jax.train`'s functions so that a dense run is trained once and shared by every FST
    variant of the same setting (a dense run does not depend on the ``FSTConfig``). Each run's
    final metrics go to ``DIR/runs/KEY.json``; a later invocation reads them back instead of
    retraining (``--fresh`` retrains), and the table marks rows that read any run back.
    """

    def __init__(self, out: Path, fresh: bool = False, read_only: bool = False) -> None:
        if fresh and read_only:
            raise ValueError("Runner: fresh=True retrains every run and read_only=True trains none: pass one")
        self.dir = out / "runs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fresh = fresh
        self.read_only = read_only
        self._data: dict[tuple[str, str], Any] = {}
        self._fns: dict[tuple, Any] = {}
        self.trained = self.read_back = 0  # runs trained; runs read back and used in a row

    def run(self, s: dict[str, Any], seed: int, variant: str, steps: int) -> Run:
        """One run, trained or read back from disk; ``Run(None, False)`` for a run not found in
        read-only mode."""
        from fst_jax import train

        depth = train.DEFAULT_DEPTH[s["model"]]
        key = {"dataset": s["dataset"], "model": s["model"], "width": s["width"], "depth": depth,
               "optimizer": s["optimizer"], "lr": train.DEFAULT_LR[s["optimizer"]], "steps": steps,
               "batch_size": BATCH_SIZE, "seed": seed, "variant": variant,
               "config": sorted(s["config"]) if variant == "fst" else None}
        name = "_".join(str(key[k]) for k in ("dataset", "model", "width", "optimizer", "steps", "seed",
                                               "variant"))
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
        path = self.dir / f"{name}_{digest}.json"
        if path.exists() and not self.fresh:
            saved = json.loads(path.read_text())
            return Run(saved["final"], True, (saved["eval_steps"], saved["test_accuracy"]))
        if self.read_only:
            return Run(None, False)
        dkey = (s["dataset"], s["model"])
        if dkey not in self._data:
            self._data[dkey] = train.load_dataset(*dkey)
        data = self._data[dkey]
        fkey = (s["dataset"], s["model"], s["width"], s["optimizer"], steps, variant, tuple(key["config"] or ()))
        if fkey not in self._fns:
            # The model functions of the first seed serve every seed, as in fst_jax.train.main.
            _, predict_fn = train.init_model(s["model"], s["width"], depth, data.x_train, seed,
                                             data.num_classes)

            def loss_fn(p: Any, x: Any, y: Any) -> Any:
                return optax.softmax_cross_entropy_with_integer_labels(predict_fn(p, x), y).mean()

            rotating = False
            if variant == "fst":
                config = train.config_from_overrides(s["config"])
                rotating = config.needs_fst_key  # the step number is the fst_key, as in fst-jax train
                loss_fn, predict_fn = fst_jax.sparsify(loss_fn, config), fst_jax.sparsify(predict_fn, config)
                if rotating:  # the forward product does not use the draw: any key evaluates the same
                    predict_fn = functools.partial(predict_fn, fst_key=0)
            tx = train.make_optimizer(s["optimizer"], key["lr"], steps)
            self._fns[fkey] = (loss_fn, predict_fn, tx, {}, rotating)
        loss_fn, predict_fn, tx, cache, rotating = self._fns[fkey]
        params, _ = train.init_model(s["model"], s["width"], depth, data.x_train, seed, data.num_classes)
        batches = train.batch_indices(len(data.x_train), BATCH_SIZE, steps, seed)
        _, result = train.train_run(variant, loss_fn, predict_fn, params, data, batches, tx,
                                    eval_every=max(1, steps // 10), quiet=True, cache=cache,
                                    fst_key=rotating)
        final = result.final()
        path.write_text(json.dumps({"key": key, "final": final,
                                    "eval_steps": result.eval_steps,
                                    "test_accuracy": result.test_accuracy}, indent=1) + "\n")
        self.trained += 1
        return Run(final, False, (result.eval_steps, result.test_accuracy))

    def setting(self, s: dict[str, Any], seeds: int, steps: int) -> tuple[dict[str, Any] | None, bool]:
        """``results`` for :func:`summarize` (``per_seed`` dense/FST pairs) and whether any was read
        back; in read-only mode only the seeds with both runs found (``None`` if there are none)."""
        from fst_jax import train

        per_seed, kept, any_back = [], [], False
        curves: dict[str, list[tuple[list[int], list[float]]]] = {"dense": [], "fst": []}
        for seed in range(seeds):
            found = {variant: self.run(s, seed, variant, steps) for variant in ("dense", "fst")}
            if any(r.final is None for r in found.values()):
                continue  # read-only, and a run of this pair is missing
            for variant, r in found.items():
                curves[variant].append(r.curve)
                self.read_back += r.read_back
            per_seed.append({"runs": {v: {"final": r.final} for v, r in found.items()}})
            any_back |= any(r.read_back for r in found.values())
            kept.append(seed)
        if not per_seed:
            return None, any_back
        results = {"per_seed": per_seed, "seeds": kept,
                   "model": {"depth": train.DEFAULT_DEPTH[s["model"]]},
                   "args": {"steps": steps, "batch_size": BATCH_SIZE},
                   "optimizer": {"lr": train.DEFAULT_LR[s["optimizer"]]},
                   "config": " ".join(s["config"]) or "(default)", "curves": curves}
        return results, any_back


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
    plan: list[tuple[dict[str, Any], int]] = []
    if args.suite in ("main", "all"):
        plan += [(s, seeds_main) for s in main_settings(args.datasets, args.models, args.widths, args.quick)]
    if args.suite in ("ablation", "all"):
        where = args.ablation_setting or ABLATION_SETTINGS
        for d, m, w in where[:1] if args.quick else where:
            plan += [(s, seeds_abl) for s in ablation_settings(d, m, int(w), args.quick, args.ablation_variants)]

    out: Path = args.out
    runner = Runner(out, fresh=args.fresh, read_only=args.read_only)
    skipped: list[str] = []
    report: dict[str, Any] = {"meta": meta, "parity_rule": (
        f"|FST - dense| <= max({PARITY_PT} pt, 2 * SE of the paired difference)"),
        "main": [], "ablation": []}
    bar = tqdm(plan, desc="settings", file=sys.stderr, dynamic_ncols=True)
    for s, n in bar:
        bar.set_postfix_str(f"{s['suite']}:{s['name']}")
        steps = QUICK_STEPS if args.quick else (args.steps or STEPS[s["dataset"]])
        t0 = time.perf_counter()
        results, reused = runner.setting(s, n, steps)
        if results is None:
            skipped.append(f"{s['dataset']}/{s['model']}/{s['width']}: {s['name']}")
            continue
        row = summarize(s, results)
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        row["reused"] = reused
        row["curves"] = results["curves"]
        report[s["suite"]].append(row)
        report["meta"]["wall_s"] = time.perf_counter() - t_start
        (out / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    bar.close()
    meta["runs_trained"], meta["runs_read_back"] = runner.trained, runner.read_back

    meta["loadavg_end"] = _loadavg()
    meta["wall_s"] = time.perf_counter() - t_start
    text = []
    if report["main"]:
        text.append("### Dense vs FST (default FSTConfig): final test accuracy\n\n" + main_table(report["main"]))
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in report["ablation"]:
        groups.setdefault((r["dataset"], r["model"], r["width"]), []).append(r)
    for (d, m, w), rows in groups.items():
        text.append(f"### Ablation: {d} / {m} / width {w}\n\n" + ablation_table(rows))
    if len(groups) > 1:
        text.append("### Ablation: every setting by variant\n\n" + grid_table(report["ablation"], seeds_abl))
    if skipped:
        text.append("Skipped (`--read-only`, no dense and FST run of the same seed found): " + "; ".join(skipped))
    body = "\n\n".join(text)
    print(body)
    (out / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    has_png = plot(report, out / "accuracy.png")
    plot_curves(report["main"], out / "curves.png")
    print(f"\nwrote {out / 'accuracy.json'}" + (f" and {out / 'accuracy.png'}" if has_png else ""))
    if not (args.quick or args.no_append):
        append_results(meta, body, args.note, out, has_png)
    return 0


def append_results(meta: dict[str, Any], body: str, notes: Sequence[str], out: Path, has_png: bool) -> None:
    """Appends a dated accuracy section to ``benchmarks/RESULTS.md``."""
    lines = machine_lines(meta) + [
        "accuracies in %, mean ± std over paired seeds (seeds 0..N-1); FST − dense is the mean "
        f"paired difference ± its standard error; parity: |FST − dense| <= max({PARITY_PT} pt, 2 SE)",
        f"runs trained by this invocation: {meta['runs_trained']}; read back from `{out / 'runs'}` "
        f"(trained by earlier invocations of the same command, same arguments per run): "
        f"{meta['runs_read_back']}; each setting's dense runs are shared by all its FST variants"]
    if has_png:
        lines.append(f"figure: `{out / 'accuracy.png'}` (regenerated by the command; not committed)")
    append_section(f"Accuracy study, {meta['date']}", [*lines, *notes], body)


if __name__ == "__main__":
    sys.exit(main())
