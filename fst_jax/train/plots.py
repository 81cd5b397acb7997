"""The main job's plots: loss and test-accuracy (or, for text, validation) curves of the dense and FST runs."""

from __future__ import annotations

import math
from collections.abc import Sequence
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
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    single = len(per_seed) == 1
    for i, variant in enumerate(per_seed[0].runs):
        color = f"C{i}"
        for j, s in enumerate(per_seed):
            r = s.runs[variant]
            first = j == 0
            if single:
                ax_loss.plot(
                    r.loss_steps, r.losses, color=color, alpha=0.35, linewidth=0.8,
                    label=f"{variant} (batch)",
                )
            ax_loss.plot(
                r.eval_steps, r.train_loss, color=color, marker="o", markersize=3,
                alpha=1.0 if single else 0.6,
                label=(f"{variant} (train set)" if single else variant) if first else None,
            )
            ax_acc.plot(
                r.eval_steps, r.test_accuracy, color=color, marker="o", markersize=3,
                alpha=1.0 if single else 0.6, label=variant if first else None,
            )
    seeds = f"seed {per_seed[0].seed}" if single else f"{len(per_seed)} seeds"
    ax_loss.set(xlabel="step", ylabel="cross-entropy", yscale="log", title=f"train loss ({seeds})")
    ax_acc.set(xlabel="step", ylabel="accuracy", title=f"test accuracy ({seeds})")
    ax_loss.legend()
    ax_acc.legend()
    fig.savefig(path, dpi=120)
    return True


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
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_bpc = fig.subplots(1, 2)
    single = len(per_seed) == 1
    for i, variant in enumerate(per_seed[0][1]):
        color = f"C{i}"
        for j, (_, runs) in enumerate(per_seed):
            r = runs[variant]
            if single:
                ax_loss.plot(r.loss_steps, r.losses, color=color, alpha=0.35, linewidth=0.8,
                             label=f"{variant} (batch)")
            label = variant if j == 0 else None
            ax_loss.plot(r.eval_steps, r.val_loss, color=color, marker="o", markersize=3,
                         label=f"{variant} (validation)" if single else label)
            ax_bpc.plot(r.eval_steps, [v / math.log(2) for v in r.val_loss], color=color,
                        marker="o", markersize=3, label=label)
    seeds = "1 seed" if single else f"{len(per_seed)} seeds"
    ax_loss.set(xlabel="step", ylabel="nats per character", title=f"loss ({seeds})")
    ax_bpc.set(xlabel="step", ylabel="bits per character", title=f"validation bits/char ({seeds})")
    ax_loss.legend()
    ax_bpc.legend()
    fig.savefig(path, dpi=120)
    return True
