"""Optax transformations for FST training: :func:`sr_ste`, the optimizer-side form of SR-STE.

SR-STE (Zhou et al., 2021) pulls the weights that a 2:4 forward mask drops towards zero by adding
``λ·(1 − mask)⊙W`` to their gradient. :class:`fst_jax.FSTConfig` ``(sr_ste=λ)`` adds that term
inside the backward pass of every sparse weight matmul. Added there, the term is part of each
backward pass, but it does not depend on the loss: it ignores the cotangent's scale. So anything
that combines or rescales gradients *after* the backward pass acts on it too:

* data parallelism with per-device backward passes (``shard_map``, ``pmap``) whose gradients are
  summed with ``psum``: the term is counted once per device (``N·λ``);
* gradient accumulation that sums micro-batch gradients: once per micro-batch;
* loss scaling: the loss gradient is multiplied by the scale and the term is not, so unscaling
  divides the term by the scale (``λ / scale``); averaging divides it the same way.

:func:`sr_ste` adds the same term once, to the final gradient, in the optimizer. Use it with
``FSTConfig(sr_ste=0.0)`` whenever gradients are summed across devices or micro-batches, or
scaled: placed before the optimizer (``optax.chain(sr_ste(...), optax.sgd(...))``) it gives the
same update as ``FSTConfig(sr_ste=λ)`` on a single device without scaling.

This module is named after the library it extends; inside it, ``import optax`` is an absolute
import and means the optax package.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["sr_ste"]

Params = Any
Masks = Any  # a pytree of bool arrays shaped like the parameters; None leaves: no decay
MaskFn = Callable[[Params], Masks]


def _path_map(tree: Any, what: str) -> dict[str, Any]:
    """``{keystr(path): leaf}`` of ``tree`` (``None`` subtrees are empty in JAX: no leaves)."""
    try:
        leaves = jax.tree_util.tree_leaves_with_path(tree)
    except Exception as e:  # noqa: BLE001 - an unflattenable object: say which argument
        raise TypeError(f"sr_ste: the {what} are not a pytree: {e}") from e
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def _match(masks: Masks, params: Params) -> list[Any]:
    """The mask of each parameter leaf, in ``tree_leaves(params)`` order (``None``: no decay).

    Raises:
      ValueError: a mask leaf has no parameter at its path, a mask's shape differs from its
        parameter's, or a mask is not boolean.
    """
    param_paths = [
        jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)
    ]
    by_path = _path_map(masks, "masks")
    unknown = sorted(set(by_path) - set(param_paths))
    if unknown:
        shown = ", ".join(param_paths[:8]) + (", ..." if len(param_paths) > 8 else "")
        raise ValueError(
            f"sr_ste: the masks have leaves at {', '.join(unknown)}, which are not parameter "
            f"paths; the parameters' paths are: {shown}. Give the masks the parameters' tree "
            "structure (None, or a missing entry, for parameters without decay)"
        )
    out = []
    for path, param in zip(param_paths, jax.tree_util.tree_leaves(params), strict=True):
        mask = by_path.get(path)
        if mask is None:
            out.append(None)
            continue
        if not hasattr(mask, "shape") or not hasattr(mask, "dtype"):
            raise ValueError(
                f"sr_ste: the mask at {path} must be a bool array, got {type(mask).__name__}"
            )
        if mask.dtype != jnp.bool_:
            raise ValueError(
                f"sr_ste: the mask at {path} must be a bool array (True = kept by the forward "
                f"2:4 mask), got dtype {mask.dtype}"
            )
        if tuple(mask.shape) != tuple(jnp.shape(param)):
            raise ValueError(
                f"sr_ste: the mask at {path} has shape {tuple(mask.shape)}, but the parameter "
                f"has shape {tuple(jnp.shape(param))}"
            )
        out.append(mask)
    return out


def sr_ste(masks: Masks | MaskFn, weight_decay: float) -> optax.GradientTransformation:
    """SR-STE in the optimizer: adds ``weight_decay·(1 − mask)⊙params`` to the updates.

    The optimizer-side form of ``FSTConfig(sr_ste=weight_decay)`` (which adds the term inside
    the backward pass). Use it, with ``FSTConfig(sr_ste=0.0)``, when gradients are summed across
    devices (``psum`` of per-device gradients) or micro-batches, or scaled (loss scaling): the
    backward-pass term would then be counted once per device or micro-batch, or divided by the
    scale, while this transform adds it once to the final gradient. Chained *before* the
    optimizer it reproduces the backward-pass form exactly; chained after the optimizer's
    scaling (where ``optax.add_decayed_weights`` goes in AdamW) it is a decoupled decay.

    Masks follow :func:`fst_jax.mask_2to4`: ``True`` where the forward pass keeps the weight;
    the term acts on the ``False`` entries. For a linen ``nn.Dense`` kernel ``[K, O]`` the
    forward 2:4 mask is ``fst_jax.mask_2to4(kernel, axis=0)`` (groups along ``K``).

    Args:
      masks: a :class:`fst_jax.Masks` (what :func:`fst_jax.forward_masks` returns), or a
        pytree of bool arrays with the structure of the parameters (each of its
        parameter's shape), where a ``None`` leaf or a missing dict entry means "no decay"; or a
        callable ``params -> masks`` of that form, called on the current params at every update
        (for masks that follow the weights, as magnitude 2:4 masks do).
      weight_decay: ``λ >= 0``, the coefficient.

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params``.

    Raises:
      ValueError: ``weight_decay`` is negative or not finite; at ``init`` or ``update``: a mask
        leaf at a path that is not a parameter, a mask whose shape differs from its parameter's,
        a mask that is not boolean, or ``update`` called without ``params``.
      TypeError: ``masks`` (or what the callable returns) is not a pytree.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import fst_jax.optax
      >>> params = {"w": jnp.array([[1.0, -2.0], [3.0, 4.0]]), "b": jnp.array([1.0, 1.0])}
      >>> masks = {"w": jnp.array([[True, False], [False, True]]), "b": None}
      >>> tx = fst_jax.optax.sr_ste(masks, weight_decay=0.5)
      >>> grads = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> print(updates["w"])
      [[ 0.  -1. ]
       [ 1.5  0. ]]
      >>> print(updates["b"])
      [0. 0.]

      Masks from the current weights, chained before SGD:

      >>> import fst_jax
      >>> params = {"kernel": jnp.array([[1.0], [-4.0], [2.0], [0.5]])}  # a [K=4, O=1] kernel
      >>> forward_masks = lambda p: {"kernel": fst_jax.mask_2to4(p["kernel"], axis=0)}
      >>> tx = optax.chain(fst_jax.optax.sr_ste(forward_masks, weight_decay=0.5), optax.sgd(1.0))
      >>> grads = {"kernel": jnp.zeros((4, 1))}
      >>> updates, _ = tx.update(grads, tx.init(params), params)
      >>> print(optax.apply_updates(params, updates)["kernel"].ravel())
      [ 0.5  -4.    2.    0.25]
    """
    if (
        isinstance(weight_decay, bool)
        or not isinstance(weight_decay, (int, float))
        or not math.isfinite(weight_decay)
        or weight_decay < 0
    ):
        raise ValueError(f"sr_ste: weight_decay must be a finite float >= 0, got {weight_decay!r}")
    weight_decay = float(weight_decay)
    from fst_jax._export import Masks as _Masks  # noqa: PLC0415

    if isinstance(masks, _Masks):  # what fst_jax.forward_masks returns
        masks = masks.tree
    mask_fn: MaskFn | None = masks if callable(masks) else None

    def current_masks(params: Params) -> list[Any]:
        return _match(mask_fn(params) if mask_fn is not None else masks, params)

    def init_fn(params: Params) -> optax.EmptyState:
        if mask_fn is None:
            _match(masks, params)  # fail early on a mismatched tree
        return optax.EmptyState()

    def update_fn(
        updates: optax.Updates, state: optax.EmptyState, params: Params | None = None
    ) -> tuple[optax.Updates, optax.EmptyState]:
        if params is None:
            raise ValueError(
                "sr_ste: the update needs the parameters: call tx.update(updates, state, params)"
            )
        leaf_masks = current_masks(params)
        u_leaves, treedef = jax.tree_util.tree_flatten(updates)
        p_treedef = jax.tree_util.tree_structure(params)
        if treedef != p_treedef:
            raise ValueError(
                "sr_ste: the updates and the params must have the same tree structure; got "
                f"updates {treedef} and params {p_treedef}"
            )
        p_leaves = jax.tree_util.tree_leaves(params)
        out = []
        for u, p, m in zip(u_leaves, p_leaves, leaf_masks, strict=True):
            if m is None:
                out.append(u)
                continue
            decay = weight_decay * jnp.where(m, jnp.zeros_like(p), p)
            out.append(u + decay.astype(u.dtype))
        return jax.tree_util.tree_unflatten(treedef, out), state

    return optax.GradientTransformation(init_fn, update_fn)
