"""The 2:4 model an FST run trained: exported with the public API and evaluated as a dense model.

FST trains dense master weights, but only the entries its forward 2:4 masks keep ever act in the
forward pass; the dropped ones are not decayed to zero. The model FST trained is therefore the
*pruned* one. :func:`evaluate_pruned` exports it the way a user would —
:func:`fst_jax.forward_masks` then :func:`fst_jax.prune_params` — and evaluates it with the plain
(dense, not sparsified) predict function. Its test accuracy is the one the sparsified predict
function reports during training; ``fst-jax train`` checks that and says which weights were
pruned and which stayed dense.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

import fst_jax
from fst_jax._config import FSTConfig
from fst_jax.train.data import Dataset
from fst_jax.train.loop import Params, PredictFn, _all_examples, _eval_fn

__all__ = ["PrunedModel", "evaluate_pruned", "mask_parts"]


@dataclasses.dataclass(frozen=True)
class PrunedModel:
    """The exported 2:4 model of an FST run and its accuracy, evaluated dense.

    Attributes:
      train_loss: the loss on the whole training set, dense predict on the pruned parameters.
      test_loss: the loss on the test set, likewise.
      test_accuracy: the test accuracy, likewise.
      pruned: the parameter paths (``jax.tree_util.keystr``) pruned 2:4, in parameter order.
      kept: entries kept of the pruned parameters' entries (half, for 2:4 masks).
      total: entries of the pruned parameters.
      dense_weights: path -> why, for every weight of a matmul left dense (the first and last
        layer by default), as :class:`fst_jax.Masks` says it.
      others: the paths of the parameters that are not the weight of any matmul (biases, norm
        scales, embeddings added to an activation), kept as they are.
      not_exportable: path -> why, for weights a sparse forward product prunes that no pruned
        parameter reproduces (empty for the main job's models). When it is not empty, the pruned
        model is not the model FST trained.

    Example:
      >>> from fst_jax.train import PrunedModel
      >>> m = PrunedModel(0.1, 0.2, 0.9, pruned=("['w1']",), kept=8, total=16,
      ...                 dense_weights={"['w0']": "first weight matmul"}, others=("['b']",))
      >>> print(m.summary())
      1 of 2 weights pruned 2:4 (8 of 16 entries kept), the rest dense: ['w0'] (first weight matmul); 1 other parameter (biases, norm scales, embeddings) as it is
    """

    train_loss: float
    test_loss: float
    test_accuracy: float
    pruned: tuple[str, ...]
    kept: int
    total: int
    dense_weights: Mapping[str, str]
    others: tuple[str, ...]
    not_exportable: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        """One line: which weights were pruned and which evaluated dense, and why."""
        n_weights = len(self.pruned) + len(self.dense_weights) + len(self.not_exportable)
        text = f"{len(self.pruned)} of {n_weights} weights pruned 2:4"
        if self.total:
            text += f" ({self.kept} of {self.total} entries kept)"
        if self.dense_weights:
            text += ", the rest dense: " + ", ".join(
                f"{p} ({why})" for p, why in self.dense_weights.items()
            )
        if self.others:
            n = len(self.others)
            text += (f"; {n} other parameter{'' if n == 1 else 's'} (biases, norm scales, "
                     f"embeddings) as {'it is' if n == 1 else 'they are'}")
        if self.not_exportable:
            text += "; NOT EXPORTABLE (kept whole, so this is not the model FST trained): " + ", ".join(
                f"{p} ({why})" for p, why in self.not_exportable.items()
            )
        return text


def _reason(why: str) -> str:
    """``"matmul #0 forward is dense: first weight matmul (skip_first)"`` -> the part after
    ``"dense: "``, the reason a reader wants; other texts as they are."""
    head, sep, tail = why.partition("dense: ")
    return tail if sep and "forward" in head else why


def evaluate_pruned(
    predict_fn: PredictFn,
    config: FSTConfig | None,
    params: Params,
    data: Dataset,
    *,
    cache: dict[Any, Any] | None = None,
) -> PrunedModel:
    """Exports the 2:4 model of FST-trained ``params`` and evaluates it with the dense predict.

    ``masks = fst_jax.forward_masks(predict_fn, config)(params, x)`` (``x`` only by its shape),
    ``pruned = fst_jax.prune_params(params, masks)``, then ``predict_fn(pruned, x)`` — the plain
    function, not sparsified — over the training and test sets, as training evaluates.

    Args:
      predict_fn: ``predict_fn(params, x) -> logits``, the function *before*
        :func:`fst_jax.sparsify`.
      config: the :class:`~fst_jax.FSTConfig` the FST run trained with (``None``: the default).
      params: the trained parameters (concrete arrays).
      data: the data set.
      cache: a dict to keep the jitted evaluation in, for the next call with the same
        ``predict_fn`` and shapes (another seed).

    Returns:
      The :class:`PrunedModel`: its losses and test accuracy, and which weights were pruned.

    Example:
      >>> import fst_jax
      >>> from fst_jax.train import evaluate_pruned, init_model, load_digits_dataset
      >>> data = load_digits_dataset("mlp")
      >>> params, predict = init_model("mlp", 16, 2, data.x_train, seed=0)
      >>> m = evaluate_pruned(predict, fst_jax.FSTConfig(), params, data)
      >>> m.pruned, m.kept / m.total
      (("['Dense_1']['kernel']",), 0.5)
      >>> sparse_acc = fst_jax.sparsify(lambda p, x: (predict(p, x).argmax(-1) == data.y_test).mean())
      >>> bool(m.test_accuracy == float(sparse_acc(params, data.x_test)))
      True
    """
    config = FSTConfig() if config is None else config
    x_all, y_all = _all_examples(data)
    n_train = len(data.x_train)
    masks = fst_jax.forward_masks(predict_fn, config)(
        params, jax.ShapeDtypeStruct(x_all.shape, x_all.dtype)
    )
    pruned_params = fst_jax.prune_params(params, masks)
    key = (
        predict_fn,
        n_train,
        jax.tree_util.tree_structure(params),
        tuple((leaf.shape, str(leaf.dtype)) for leaf in jax.tree_util.tree_leaves(params)),
        x_all.shape,
        str(x_all.dtype),
    )
    if cache is not None and key in cache:
        evaluate = cache[key]
    else:
        evaluate = jax.jit(_eval_fn(predict_fn, n_train))
        if cache is not None:
            cache[key] = evaluate
    train_loss, test_loss, test_acc = evaluate(pruned_params, x_all, y_all)

    return PrunedModel(
        train_loss=float(train_loss),
        test_loss=float(test_loss),
        test_accuracy=float(test_acc),
        **mask_parts(params, masks),
    )


def mask_parts(params: Params, masks: Any) -> dict[str, Any]:
    """Which parameters a :class:`fst_jax.Masks` prunes, leaves dense (and why), or leaves alone.

    Args:
      params: the parameters the masks were computed for.
      masks: :func:`fst_jax.forward_masks`'s result for them.

    Returns:
      The :class:`PrunedModel` fields ``pruned``, ``kept``, ``total``, ``dense_weights``,
      ``others`` and ``not_exportable``, by name.

    Example:
      >>> import fst_jax, jax.numpy as jnp
      >>> from fst_jax.train.pruned import mask_parts
      >>> def f(p, x):
      ...     return jnp.tanh(jnp.tanh(jnp.tanh(x @ p["a"]) @ p["b"]) @ p["c"]).sum()
      >>> params = {k: jnp.ones((8, 8)) for k in "abc"}
      >>> parts = mask_parts(params, fst_jax.forward_masks(f)(params, jnp.ones((4, 8))))
      >>> parts["pruned"], parts["kept"], sorted(parts["dense_weights"])
      (("['b']",), 32, ["['a']", "['c']"])
    """
    # Only the documented parts of Masks: .tree (params' structure, None = kept whole),
    # .not_exportable and, for the reasons, .unmasked (path -> why no mask).
    mask_leaves = jax.tree_util.tree_leaves(masks.tree, is_leaf=lambda x: x is None)
    param_leaves = jax.tree_util.tree_leaves_with_path(params)
    not_exportable = dict(masks.not_exportable)
    unmasked = dict(getattr(masks, "unmasked", {}))
    pruned, dense_weights, others, kept, total = [], {}, [], 0, 0
    for (key_path, _), mask in zip(param_leaves, mask_leaves, strict=True):
        path = jax.tree_util.keystr(key_path)
        if mask is not None:
            pruned.append(path)
            kept += int(np.sum(np.asarray(mask)))
            total += int(np.size(mask))
        elif path in not_exportable:
            continue
        elif "not a weight" in unmasked.get(path, ""):
            others.append(path)
        else:
            dense_weights[path] = _reason(unmasked.get(path, "dense in the forward product"))
    return {"pruned": tuple(pruned), "kept": kept, "total": total, "dense_weights": dense_weights,
            "others": tuple(others), "not_exportable": not_exportable}
