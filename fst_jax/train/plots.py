"""The main job's plots: loss and test-accuracy (or, for text, validation) curves of the dense and FST runs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fst_jax.train.loop import SeedResult

__all__ = ["plot_curves", "plot_text_curves"]


def plot_curves(per_seed: Sequence[SeedResult], path: Path) -> bool:
    """Writes the loss and accuracy curves to ``path`` (a PNG); False if matplotlib is missing.

    Left: the training loss (one seed: every batch's loss and the whole-training-set loss at each
    evaluation; several seeds: the training-set loss of every seed). Right: the test accuracy at
    each evaluation. One color per variant.

    Args:
      per_seed: the results of each seed.
      path: the file to write.

    Returns:
      True when the file was written, False when matplotlib is not installed.

    Example:
      >>> import tempfile
      >>> from pathlib import Path
      >>> from fst_jax.train import RunResult, SeedResult, plot_curves
      >>> run = RunResult("dense", loss_steps=[1, 2], losses=[2.0, 1.0], eval_steps=[0, 2],
      ...                 train_loss=[2.3, 1.1], test_loss=[2.3, 1.2], test_accuracy=[0.1, 0.6])
      >>> path = Path(tempfile.mkdtemp()) / "curves.png"
      >>> plot_curves([SeedResult(0, {"dense": run})], path), path.stat().st_size > 0
      (True, True)
    """
    return _curves([(s.seed, s.runs) for s in per_seed], path,
                   _Panel(lambda r: r.train_loss, "cross-entropy", "train loss", "train set", "log"),
                   _Panel(lambda r: r.test_accuracy, "accuracy", "test accuracy"))


def plot_text_curves(per_seed: Sequence[tuple[int, dict[str, Any]]], path: Path) -> bool:
    """Writes the language model's curves to ``path`` (a PNG); False if matplotlib is missing.

    Left: every step's training-batch loss (one seed) and the validation loss at each evaluation.
    Right: the validation bits per character. One color per variant; for FST the curves are the
    sparsified loss (its 2:4 forward), which the exported 2:4 model reproduces.

    Args:
      per_seed: ``(seed, {variant: fst_jax.train.lm.TextRun})`` per seed.
      path: the file to write.

    Returns:
      True when the file was written, False when matplotlib is not installed.

    Example:
      >>> import tempfile
      >>> from pathlib import Path
      >>> from fst_jax.train.lm import TextRun
      >>> from fst_jax.train.plots import plot_text_curves
      >>> run = TextRun("dense", loss_steps=[1, 2], losses=[4.0, 3.0], eval_steps=[0, 2],
      ...               val_loss=[4.6, 3.1])
      >>> path = Path(tempfile.mkdtemp()) / "curves.png"
      >>> plot_text_curves([(0, {"dense": run})], path), path.stat().st_size > 0
      (True, True)
    """
    return _curves(per_seed, path, _Panel(lambda r: r.val_loss, "nats per character", "loss", "validation"),
                   _Panel(lambda r: [v / math.log(2) for v in r.val_loss], "bits per character",
                          "validation bits/char"))


@dataclasses.dataclass(frozen=True)
class _Panel:
    """One panel: a value per evaluation step of a run, its axis label and title; ``what`` names
    the curve beside the batch losses when one seed is drawn (left panel)."""

    values: Callable[[Any], Sequence[float]]
    ylabel: str
    title: str
    what: str = ""
    yscale: str = "linear"


def _curves(per_seed: Sequence[tuple[int, dict[str, Any]]], path: Path, left: _Panel, right: _Panel) -> bool:
    """Two panels of curves per variant (one color each); with one seed, the left panel also shows
    every batch's loss."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    single = len(per_seed) == 1
    for i, variant in enumerate(per_seed[0][1]):
        color = f"C{i}"
        for j, (_, runs) in enumerate(per_seed):
            r = runs[variant]
            if single:
                axes[0].plot(r.loss_steps, r.losses, color=color, alpha=0.35, linewidth=0.8,
                             label=f"{variant} (batch)")
            for ax, panel in zip(axes, (left, right)):
                label = f"{variant} ({panel.what})" if single and panel.what else variant if j == 0 else None
                ax.plot(r.eval_steps, panel.values(r), color=color, marker="o", markersize=3,
                        alpha=1.0 if single else 0.6, label=label)
    seeds = f"seed {per_seed[0][0]}" if single else f"{len(per_seed)} seeds"
    for ax, panel in zip(axes, (left, right)):
        ax.set(xlabel="step", ylabel=panel.ylabel, yscale=panel.yscale, title=f"{panel.title} ({seeds})")
        ax.legend()
    fig.savefig(path, dpi=120)
    return True
