"""The FST sparse matmul: one ``dot_general`` as a ``jax.custom_vjp`` with three 2:4 products.

``sparse_dot(lhs, rhs, plan)`` computes, for ``Y = A·W`` (the weight on either side):

* forward   ``Y  = A·W_f``                       ``W_f = W ⊙ mask_2to4(W, K)``
* grad-input ``dA = dY·W_bᵀ``                    ``W_b = W_f ⊙ mask_2to4(W_f, O_last)``
* grad-weight ``dW = (M ⊙ A)ᵀ·dY' + λ(1−m_f)⊙W``  ``dY'[t] = dY[t] + s·dY[t−1]``

with each product switched to its alternative or to dense by the static :class:`GemmPlan`. The
grad-input and grad-weight products are formed with ``jax.vjp`` of the original ``dot_general``
on the masked operands, so their layouts, precision and dtypes are exactly those of JAX's own
transpose rules; the masks are recomputed in the backward pass, not stored.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fst_jax import _masks

#: Name-stack marker of the regions this library creates; ``sparsify`` never rewrites them again.
MARKER = "fst_jax_sparse"


@dataclasses.dataclass(frozen=True)
class GemmPlan:
    """Static description of one rewritten ``dot_general``: what each of its GEMMs does.

    Axes are positions in the operand (``k_axis``, ``o_axis`` in the weight; ``t_axis`` and
    ``act_contract`` in the activation) and in the output (``t_out_axis``).
    """

    dot_params: tuple[tuple[str, Any], ...]  # the dot_general's own parameters, hashable
    weight_side: int  # 0: the weight is the lhs, 1: the rhs
    forward: bool
    grad_input: str  # "prune_output_dim" | "transposable" | "dense"
    grad_weight: str  # "fixed_mask" | "prune_grad_output" | "dense"
    k_axis: int
    o_axis: int | None
    t_axis: int | None
    t_out_axis: int | None
    act_contract: tuple[int, ...]
    pattern: str = "checkerboard"
    restore_scale: float = 0.0
    sr_ste: float = 0.0

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.dot_params)


def _dot(plan: GemmPlan, act: jax.Array, weight: jax.Array) -> jax.Array:
    lhs, rhs = (weight, act) if plan.weight_side == 0 else (act, weight)
    return lax.dot_general_p.bind(lhs, rhs, **plan.params)


def _forward_weight(plan: GemmPlan, w: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """(W_f, mask_f): the weight of the forward product and its mask (None when dense)."""
    if not plan.forward:
        return w, None
    if plan.grad_input == "transposable":
        mask = _masks.transposable_mask_2to4(w, axes=(plan.k_axis, plan.o_axis))
    else:
        mask = _masks.mask_2to4(w, axis=plan.k_axis)
    return _masks.apply_mask(w, mask), mask


def _backward_weight(plan: GemmPlan, w: jax.Array, w_f: jax.Array) -> jax.Array:
    """W_b: the weight of the grad-input product."""
    if plan.grad_input == "prune_output_dim":
        return _masks.apply_mask(w_f, _masks.mask_2to4(w_f, axis=plan.o_axis))
    if plan.grad_input == "transposable" and not plan.forward:
        return _masks.apply_mask(w, _masks.transposable_mask_2to4(w, axes=(plan.k_axis, plan.o_axis)))
    return w_f


def _grad_weight_operands(plan: GemmPlan, a: jax.Array, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(A', dY') such that dW = vjp_W(A'·W)(dY')."""
    if plan.grad_weight == "fixed_mask":
        mask = _masks.token_mask(a.shape, token_axis=plan.t_axis, contracting_axes=plan.act_contract,
                                 pattern=plan.pattern)
        return _masks.apply_mask(a, mask), _masks.gradient_shift(dy, plan.t_out_axis, plan.restore_scale)
    if plan.grad_weight == "prune_grad_output":
        return a, _masks.apply_mask(dy, _masks.mask_2to4(dy, axis=plan.t_out_axis))
    return a, dy


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _sparse_dot(act: jax.Array, weight: jax.Array, plan: GemmPlan) -> jax.Array:
    w_f, _ = _forward_weight(plan, weight)
    return _dot(plan, act, w_f)


def _sparse_dot_fwd(act: jax.Array, weight: jax.Array, plan: GemmPlan):
    return _sparse_dot(act, weight, plan), (act, weight)


def _sparse_dot_bwd(plan: GemmPlan, res: tuple[jax.Array, jax.Array], dy: jax.Array):
    act, weight = res
    w_f, mask_f = _forward_weight(plan, weight)
    w_b = _backward_weight(plan, weight, w_f)
    _, vjp_act = jax.vjp(lambda a: _dot(plan, a, w_b), act)
    (d_act,) = vjp_act(dy)
    a_g, dy_g = _grad_weight_operands(plan, act, dy)
    _, vjp_w = jax.vjp(lambda w: _dot(plan, a_g, w), weight)
    (d_w,) = vjp_w(dy_g)
    if plan.sr_ste and mask_f is not None:
        decay = plan.sr_ste * jnp.where(mask_f, jnp.zeros_like(weight), weight)
        d_w = d_w + decay.astype(d_w.dtype)
    return d_act, d_w


_sparse_dot.defvjp(_sparse_dot_fwd, _sparse_dot_bwd)


def sparse_dot(lhs: jax.Array, rhs: jax.Array, plan: GemmPlan) -> jax.Array:
    """``dot_general(lhs, rhs)`` with the FST products of ``plan`` (a :class:`GemmPlan`)."""
    act, weight = (rhs, lhs) if plan.weight_side == 0 else (lhs, rhs)
    with jax.named_scope(MARKER):
        return _sparse_dot(act, weight, plan)
