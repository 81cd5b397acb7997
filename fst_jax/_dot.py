"""The FST sparse matmul: one ``dot_general`` (or convolution) as a ``jax.custom_vjp`` with three
2:4 products.

``sparse_dot(lhs, rhs, plan)`` computes, for ``Y = A·W`` (the weight on either side):

* forward   ``Y  = A·W_f``                       ``W_f = W ⊙ mask_2to4(W, K)``
* grad-input ``dA = dY·W_bᵀ``                    ``W_b = W_f ⊙ mask_2to4(W_f, O_last)``
* grad-weight ``dW = (M ⊙ A)ᵀ·dY' + λ(1−m_f)⊙W``  ``dY'[t] = dY[t] + s·dY[t−1]``

with each product switched to its alternative or to dense by the static :class:`GemmPlan`. The
weight is **prepared** once (:func:`prepare`: the masks and ``W_f``, with the straight-through
estimator as its derivative), and the matmul (:func:`_fst_dot`, one ``custom_vjp`` for fixed and
rotating patterns) takes ``W_f`` and the bool mask of ``W_b``: the backward pass keeps the weight
and that mask, and recomputes no mask. :mod:`fst_jax._transform` prepares a loop-invariant weight
once outside its loop and shares it between the matmuls that use it. The grad-input and
grad-weight products are formed with ``jax.vjp`` of the original ``dot_general`` /
``conv_general_dilated`` on the masked operands, so their layouts, precision and dtypes are
exactly those of JAX's own transpose rules.

Compact mode computes the grad-weight product from the kept half of the tokens only: strided
slices of a matmul's activation, or for a convolution backward-filter convolutions over sub-grids
of the kept output positions (doubled strides). Matmuls and 1×1 stride-1 unpadded convolutions
save only the kept half of the activation; other convolutions save their whole input, which their
overlapping windows read.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fst_jax import _compat, _masks, _rotate
from fst_jax._analysis import MARKER


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
    grad_weight: str  # "fixed_mask" | "prune_grad_output" | "mvue" | "dense"
    k_axis: int
    o_axis: int | None
    t_axis: int | None
    t_out_axis: int | None
    act_contract: tuple[int, ...]
    pattern: str = "checkerboard"
    restore_scale: float = 0.0
    sr_ste: float = 0.0
    mode: str = "masked"  # "compact": grad-weight over the kept half of the tokens only
    backend: str = "xla"  # "pallas": the Pallas kernels where the layout allows; "cusparselt": the
    # forward and grad-input products (and the mvue grad-weight: sparse_dy) on the 2:4 sparse
    # tensor cores (see cusparselt_ineligible)
    conv: bool = False  # a conv_general_dilated (weight = kernel = rhs) rather than a dot_general
    t_out_axes: tuple[int, ...] = ()  # conv: the output's spatial axes, flattened row-major into t
    act_free: tuple[int, ...] = ()  # the activation's free axes (t among them), for p = b·T + t
    tokens: int = 0  # T: the token axis' length (conv: output positions per image)
    patterns: tuple[str, ...] = ()  # a rotating set: the grad-weight pattern is drawn per step
    act_shape: tuple[int, ...] = ()  # the activation's shape (for the layout of pair_select)
    sharded: bool = False  # the activation's type carries an explicit-sharding mesh axis

    @property
    def rotating(self) -> bool:
        """Whether the grad-weight token mask is drawn per step from ``patterns`` (a traced choice
        enters :func:`rotating_dot` as an operand)."""
        return bool(self.patterns) and self.grad_weight == "fixed_mask"

    @property
    def keyed(self) -> bool:
        """Whether the matmul draws from ``fst_key``: a rotating pattern (the drawn index enters as
        ``choice``) or the ``"mvue"`` grad-weight (``choice`` is the layer's drawn seed)."""
        return self.rotating or self.grad_weight == "mvue"

    @property
    def pair_select(self) -> bool:
        """Whether the compact grad-weight product runs through :mod:`fst_jax._rotate` (the kept
        half as two quarters selected per token pair, one batched GEMM over the two parities): a
        rotating pattern, or the fixed checkerboard (its one pattern, a constant choice; except on
        the Pallas backend, whose kernel fuses the fixed pattern's shift), on a matmul whose token
        axis is the activation's innermost free axis and whose activation type is not sharded
        (:mod:`fst_jax._rotate`'s canonical reshapes need an unsharded type). Elsewhere a rotating
        pattern runs masked and the fixed checkerboard as two strided quarter GEMMs."""
        innermost = (self.mode == "compact" and not self.conv and self.t_axis is not None
                     and bool(self.act_free) and self.t_axis == self.act_free[-1] and not self.sharded)
        return innermost and (self.rotating or (self.compact and self.pattern == "checkerboard"
                                                and self.backend != "pallas"))

    @property
    def compact_patterns(self) -> tuple[str, ...]:
        """The pattern set :mod:`fst_jax._rotate` draws from (the fixed pattern alone if not rotating)."""
        return self.patterns if self.rotating else (self.pattern,)

    @property
    def sparse_dy(self) -> bool:
        """Whether the ``"mvue"`` grad-weight product runs on the 2:4 sparse tensor cores with the
        sampled ``dY`` as the sparse operand (:func:`_cslt_grad_weight`): the cuSPARSELt backend
        and the token axis the activation's innermost free axis, so that each group of 4 tokens
        the sample keeps 2 of is a group of 4 consecutive rows of the flattened product."""
        return (self.grad_weight == "mvue" and self.backend == "cusparselt" and self.t_axis is not None
                and bool(self.act_free) and self.t_axis == self.act_free[-1])

    @property
    def compact(self) -> bool:
        """Whether the grad-weight product runs over the kept tokens (output positions) only: the
        kept half is a strided slice when T is even; an odd T runs masked."""
        return (self.mode == "compact" and self.grad_weight == "fixed_mask" and self.tokens % 2 == 0
                and not self.patterns)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.dot_params)


def _dot(plan: GemmPlan, act: jax.Array, weight: jax.Array) -> jax.Array:
    """The original product (``dot_general`` or ``conv_general_dilated``) on the given operands."""
    lhs, rhs = (weight, act) if plan.weight_side == 0 else (act, weight)
    prim = lax.conv_general_dilated_p if plan.conv else lax.dot_general_p
    return prim.bind(lhs, rhs, **plan.params)


class WeightSpec(NamedTuple):
    """What a weight's prepared forms depend on (static): the matmuls that agree on it can share
    one :func:`prepare` of the same weight."""

    forward: bool
    grad_input: str
    k_axis: int
    o_axis: int | None
    sr_ste: float  # > 0: SR-STE added in :func:`prepare` 's backward pass (the weight is not a view)


def weight_spec(plan: GemmPlan) -> WeightSpec:
    return WeightSpec(plan.forward, plan.grad_input, plan.k_axis, plan.o_axis, plan.sr_ste)


def _prepared(spec: WeightSpec, w: jax.Array, mask_f: jax.Array | None) -> tuple[jax.Array, Any, Any]:
    """(W_f, keep_b, mask_f): the weight of the forward product, the mask of the grad-input
    product's weight ``W_b = where(keep_b, W, 0)`` (None: ``W_b = W``) and the forward mask (None
    when the forward product is dense); ``mask_f`` is computed unless given."""
    transposable = spec.grad_input == "transposable"
    if spec.forward:
        if mask_f is None:
            mask_f = _masks.weight_mask(w, spec.k_axis, spec.o_axis, transposable)
        w_f = _masks.apply_mask(w, mask_f)
    else:
        w_f, mask_f = w, None
    if spec.grad_input == "prune_output_dim":
        keep_b = _masks.mask_2to4(w_f, axis=spec.o_axis)
        keep_b = keep_b if mask_f is None else jnp.logical_and(keep_b, mask_f)
    elif transposable and not spec.forward:
        keep_b = _masks.weight_mask(w, spec.k_axis, spec.o_axis, True)
    else:
        keep_b = mask_f
    return w_f, keep_b, mask_f


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _prepare(spec: WeightSpec, w: jax.Array, mask_f: Any) -> tuple[jax.Array, Any]:
    w_f, keep_b, _ = _prepared(spec, w, mask_f)
    return w_f, keep_b


def _prepare_fwd(spec: WeightSpec, w: jax.Array, mask_f: Any):
    w_f, keep_b, mask_f = _prepared(spec, w, mask_f)
    return (w_f, keep_b), ((w, mask_f) if spec.sr_ste and mask_f is not None else None)


def _prepare_bwd(spec: WeightSpec, res: Any, g: tuple[jax.Array, Any]):
    d_w = g[0]  # the straight-through estimator: the forward mask passes the gradient
    if res is not None:
        w, mask_f = res
        d_w = d_w + (spec.sr_ste * jnp.where(mask_f, jnp.zeros_like(w), w)).astype(d_w.dtype)
    return d_w, None


_prepare.defvjp(_prepare_fwd, _prepare_bwd)


def prepare(w: jax.Array, spec: WeightSpec, mask_f: jax.Array | None = None) -> tuple[jax.Array, jax.Array, Any]:
    """``(W, W_f, keep_b)``: the prepared weight of the matmuls that share ``spec``, computed once
    per step (a loop-invariant weight is prepared outside its loop, see :mod:`fst_jax._transform`).

    ``W_f`` is the forward product's weight; the grad-input product's is ``where(keep_b, W, 0)``,
    formed in the backward pass from the weight and this bool mask (``None``: ``W`` itself), so
    that the backward pass recomputes no mask and keeps one byte per entry rather than a weight.
    The derivative through ``W_f`` is the straight-through estimator (its cotangent passes to
    ``w`` unmasked), plus ``spec.sr_ste·(1 − mask_f)⊙W`` where SR-STE is not applied in parameter
    space. ``mask_f``: the forward mask when it was already computed (SR-STE in parameter space
    computes it first), so that no mask is computed twice.
    """
    with jax.named_scope(MARKER):
        w_f, keep_b = _prepare(spec, w, None if mask_f is None else lax.stop_gradient(mask_f))
    return w, w_f, keep_b


def _like_sharding(mask: jax.Array, like: jax.Array) -> jax.Array:
    """Gives a mask built from iota the sharding type of ``like`` (under an explicit-sharding mesh
    the mask starts replicated, and ``where`` needs matching shardings)."""
    want = jax.typeof(like).sharding.spec
    return mask if jax.typeof(mask).sharding.spec == want else jax.sharding.reshard(mask, want)


def typed_sharded(aval: Any) -> bool:
    """Whether a value's type (its aval: ``jax.typeof(x)``) carries a sharding (an
    explicit-sharding mesh axis on some dim)."""
    return any(s is not None for s in aval.sharding.spec)


def _flat_token_index(shape: tuple[int, ...], t_axis: int, free: tuple[int, ...]) -> jax.Array:
    """``p = b·T + t``: the token's position when the free axes are flattened with ``t`` innermost
    (``b`` the row-major index over the other free axes), broadcast to ``shape``."""
    b = jnp.zeros(shape, jnp.int32)
    for ax in free:
        if ax != t_axis:
            b = b * shape[ax] + lax.broadcasted_iota(jnp.int32, shape, ax)
    return b * shape[t_axis] + lax.broadcasted_iota(jnp.int32, shape, t_axis)


def _token_keep(plan: GemmPlan, shape: tuple[int, ...]) -> jax.Array:
    """The fixed 2:4 mask on the activation, indexed by ``p`` (equal to the per-sequence
    :func:`fst_jax.token_mask` when ``T`` is even)."""
    if plan.tokens % 2 == 0 or len(plan.act_free) <= 1:
        return _masks.token_mask(shape, token_axis=plan.t_axis, contracting_axes=plan.act_contract,
                                 pattern=plan.pattern)
    p = _flat_token_index(shape, plan.t_axis, plan.act_free)
    if plan.pattern == "even":
        return p % 2 == 0
    if plan.pattern == "odd":
        return p % 2 == 1
    k = jnp.zeros(shape, jnp.int32)
    for ax in plan.act_contract:
        k = k * shape[ax] + lax.broadcasted_iota(jnp.int32, shape, ax)
    return (p + k) % 2 == 0


MVUE_SEEDS = 2**31 - 1  # a layer's mvue seed is drawn like a pattern index from this many
MVUE_SEED = 0x4D565545  # the base key of the mvue samples: fold_in(key(MVUE_SEED), seed)


def _mvue(dy: jax.Array, axis: int, seed: jax.Array | None) -> jax.Array:
    """The minimum-variance unbiased 2:4 sample of ``dy`` along ``axis`` for a layer's drawn seed."""
    if seed is None:
        raise ValueError("fst_jax: a grad_weight='mvue' product needs its layer's drawn seed (the rewrite "
                         "draws it from fst_key); got none")
    return _masks.mvue_2to4(dy, jax.random.fold_in(jax.random.key(MVUE_SEED), seed), axis)


def _grad_weight_operands(plan: GemmPlan, a: jax.Array, dy: jax.Array,
                          seed: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(A', dY') such that dW = vjp_W(A'·W)(dY'); ``seed``: the layer's draw (mvue), else ``None``."""
    if plan.grad_weight == "fixed_mask":
        mask = _token_keep(plan, a.shape)
        a_kept = _masks.apply_mask(a, _like_sharding(mask, a))
        return a_kept, _masks.gradient_shift(dy, plan.t_out_axis, plan.restore_scale)
    if plan.grad_weight == "prune_grad_output":
        return a, _masks.apply_mask(dy, _masks.mask_2to4(dy, axis=plan.t_out_axis))
    if plan.grad_weight == "mvue":
        return a, _mvue(dy, plan.t_out_axis, seed)
    return a, dy


def _every_other(x: jax.Array, axis: int, phase: int) -> jax.Array:
    """``x[..., phase::2, ...]`` along ``axis``."""
    return lax.slice_in_dim(x, phase, x.shape[axis], stride=2, axis=axis)


def _unstride(x: jax.Array, axis: int, phase: int, length: int | None = None) -> jax.Array:
    """Inverse of :func:`_every_other` up to zeros: ``x`` 's entries at ``phase::2`` of an axis of
    ``length`` (default: twice as long)."""
    length = 2 * x.shape[axis] if length is None else length
    cfg = [(0, 0, 0)] * x.ndim
    cfg[axis] = (phase, length - phase - 2 * x.shape[axis] + 1, 1)
    return lax.pad(x, jnp.zeros((), x.dtype), cfg)


def _compact_parts(plan: GemmPlan, a: jax.Array) -> tuple[jax.Array, ...]:
    """The kept half of the activation: ``A[t even]`` or ``A[t odd]``; for the checkerboard,
    ``A[t even, k even]`` and ``A[t odd, k odd]`` (k's parity is that of the last contracting axis,
    whose length K is a multiple of 4)."""
    if plan.pattern != "checkerboard":
        return (_every_other(a, plan.t_axis, int(plan.pattern == "odd")),)
    c = plan.act_contract[-1]
    return tuple(_every_other(_every_other(a, plan.t_axis, p), c, p) for p in (0, 1))


def _from_compact(plan: GemmPlan, parts: tuple[jax.Array, ...]) -> jax.Array:
    """An activation-shaped array rebuilt from the kept parts (the masked activation)."""
    if plan.pattern != "checkerboard":
        return _unstride(parts[0], plan.t_axis, int(plan.pattern == "odd"))
    c = plan.act_contract[-1]
    return sum(_unstride(_unstride(x, c, p), plan.t_axis, p) for p, x in enumerate(parts))


def _shifted_tokens(dy: jax.Array, axis: int, phase: int, scale: float) -> jax.Array:
    """``gradient_shift(dy, axis, scale)[..., phase::2, ...]`` without computing the other half."""
    kept = _every_other(dy, axis, phase)
    if scale == 0:
        return kept
    prev = _every_other(dy, axis, 1 - phase)  # dY[t - 1] for the kept t
    if phase == 0:
        prev = jnp.roll(prev, 1, axis)
    wide = jnp.promote_types(dy.dtype, jnp.float32)
    return (kept.astype(wide) + scale * prev.astype(wide)).astype(dy.dtype)


def _compact_grad_weight(plan: GemmPlan, parts: tuple[jax.Array, ...], weight: jax.Array,
                         dy: jax.Array) -> jax.Array:
    """dW as dense GEMMs over the kept tokens: one half GEMM, or two quarter GEMMs for the
    checkerboard, interleaved along K."""
    def grad(a_part: jax.Array, w_part: jax.Array, dy_part: jax.Array) -> jax.Array:
        _, vjp_w = jax.vjp(lambda w: _dot(plan, a_part, w), w_part)
        return vjp_w(dy_part)[0]

    s, t_out = plan.restore_scale, plan.t_out_axis
    if plan.pattern != "checkerboard":
        phase = int(plan.pattern == "odd")
        return grad(parts[0], weight, _shifted_tokens(dy, t_out, phase, s))
    k = plan.k_axis
    halves = [grad(parts[p], _every_other(weight, k, p), _shifted_tokens(dy, t_out, p, s)) for p in (0, 1)]
    return jnp.stack(halves, axis=k + 1).reshape(weight.shape)


# ------------------------------------------------------------------------------------------------
# The Pallas path: plain matmuls (one contracting dim, no batch dims, a 2-D weight) in f32/bf16/f16.


def _kernel_layout(plan: GemmPlan, act: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array] | None:
    """(A as [M, K], W as [K, O]) when the Pallas kernels can run this product, else None."""
    if plan.conv or plan.backend != "pallas":
        return None
    a2 = jnp.moveaxis(act, plan.act_contract[0], -1)
    return a2.reshape(-1, a2.shape[-1]), (weight if plan.k_axis == 0 else weight.T)


def kernel_eligible(eqn: Any, side: int) -> bool:
    """Whether the Pallas kernels can run the forward and grad-input products of this matmul: a
    plain ``dot_general`` (one contracting dim, no batch dims, a 2-D weight) in one float dtype."""
    if eqn.primitive is not _compat.P["dot_general"]:
        return False
    (lc, _), (lb, rb) = eqn.params["dimension_numbers"]
    w, a = eqn.invars[side].aval, eqn.invars[1 - side].aval
    pet = eqn.params.get("preferred_element_type")
    return (not lb and not rb and len(lc) == 1 and w.ndim == 2 and a.ndim >= 2 and a.dtype == w.dtype
            and a.dtype in (jnp.float32, jnp.bfloat16, jnp.float16) and (pet is None or pet == a.dtype))


def cusparselt_ineligible(eqn: Any, side: int) -> str | None:
    """Why cuSPARSELt cannot run this matmul's forward and grad-input products (None: it can).

    It runs a plain matmul after collapsing contiguous dims to two: float16/bfloat16 operands of
    one dtype at default precision, no batch dims, the activation's contracting dims its last ones,
    the weight's contracting dims a leading or trailing block, both in increasing order (so the
    2:4 groups of the last contracting dim stay aligned in the collapsed ``K``; e.g. a Flax
    ``DenseGeneral`` kernel ``[D, H, Dh]``).
    """
    if eqn.primitive is not _compat.P["dot_general"]:
        return "a convolution"
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb:
        return "batch dimensions"
    w, a = eqn.invars[side].aval, eqn.invars[1 - side].aval
    w_c, a_c = (lc, rc) if side == 0 else (rc, lc)
    if w.dtype not in (jnp.float16, jnp.bfloat16) or a.dtype != w.dtype:
        return f"{a.dtype.name} x {w.dtype.name} (its 2:4 format is float16/bfloat16)"
    pet = eqn.params.get("preferred_element_type")
    if pet is not None and pet != w.dtype:
        return f"preferred_element_type={jnp.dtype(pet).name}"
    precision = eqn.params.get("precision")
    if precision is not None and any(p not in (None, lax.Precision.DEFAULT)
                                     for p in (precision if isinstance(precision, tuple) else (precision,))):
        return f"precision={precision}"
    order = sorted(range(len(a_c)), key=lambda i: a_c[i])
    a_sorted, w_sorted = [a_c[i] for i in order], [w_c[i] for i in order]
    if a_sorted != list(range(a.ndim - len(a_c), a.ndim)):
        return "the activation's contracting dims are not its last ones"
    if w_sorted != sorted(w_c) or not (w_sorted == list(range(len(w_c)))
                                      or w_sorted == list(range(w.ndim - len(w_c), w.ndim))):
        return "the weight's contracting dims are not a contiguous leading or trailing block"
    if a.ndim == len(a_c) or w.ndim == len(w_c):
        return "no free dimension"
    return None


def _cslt_operands(plan: GemmPlan, act: jax.Array, weight: jax.Array) -> tuple[int, int, bool, tuple, tuple]:
    """(K, O, weight is [K, O] (else [O, K]), the activation's and the weight's free shapes)."""
    (lc, rc), _ = plan.params["dimension_numbers"]
    w_c = lc if plan.weight_side == 0 else rc
    nk = len(w_c)
    k_first = sorted(w_c) == list(range(nk))
    w_free = weight.shape[nk:] if k_first else weight.shape[:weight.ndim - nk]
    a_free = act.shape[:act.ndim - nk]
    k = math.prod(act.shape[act.ndim - nk:])
    return k, math.prod(w_free), k_first, tuple(a_free), tuple(w_free)


def _cslt_forward(plan: GemmPlan, act: jax.Array, w_f: jax.Array) -> jax.Array:
    """``Y = A·W_f`` on the 2:4 sparse tensor cores (``W_f`` is 2:4 along ``K``)."""
    from fst_jax import cusparselt  # noqa: PLC0415 - only when asked for

    k, o, k_first, a_free, w_free = _cslt_operands(plan, act, w_f)
    a2 = act.reshape(-1, k)
    w2 = w_f.reshape((k, o) if k_first else (o, k))
    if plan.weight_side == 1:  # [M, O] = A2 · W
        return cusparselt.matmul(a2, w2, sparse="rhs", transpose_rhs=not k_first).reshape(*a_free, *w_free)
    # the weight on the lhs: [O, M] = Wᵀ · A2ᵀ, without a transposed copy
    return cusparselt.matmul(w2, a2, sparse="lhs", transpose_lhs=k_first, transpose_rhs=True).reshape(
        *w_free, *a_free)


def _cslt_grad_input(plan: GemmPlan, act: jax.Array, w_b: jax.Array, dy: jax.Array) -> jax.Array:
    """``dA = dY·W_bᵀ`` on the 2:4 sparse tensor cores (``W_b`` is 2:4 along ``O``)."""
    from fst_jax import cusparselt  # noqa: PLC0415

    k, o, k_first, _, _ = _cslt_operands(plan, act, w_b)
    w2 = w_b.reshape((k, o) if k_first else (o, k))
    if plan.weight_side == 1:
        d2, t_lhs = dy.reshape(-1, o), False
    else:
        d2, t_lhs = dy.reshape(o, -1), True
    return cusparselt.matmul(d2, w2, sparse="rhs", transpose_lhs=t_lhs, transpose_rhs=k_first).reshape(act.shape)


def _cslt_grad_weight(plan: GemmPlan, act: jax.Array, s_dy: jax.Array, weight: jax.Array) -> jax.Array:
    """``dW = Aᵀ·S(dY)`` on the 2:4 sparse tensor cores: the sampled ``S(dY)`` is the sparse
    operand, 2:4 along the tokens, the contracting dim of this product (:attr:`GemmPlan.sparse_dy`)."""
    from fst_jax import cusparselt  # noqa: PLC0415

    k, o, k_first, _, _ = _cslt_operands(plan, act, weight)
    a2 = act.reshape(-1, k)  # [M, K], M = the flattened tokens
    # S(dY) flattened as [M, O] (weight on the rhs) or [O, M] (on the lhs: dY is [O..., M...])
    d2, d_t = (s_dy.reshape(-1, o), False) if plan.weight_side == 1 else (s_dy.reshape(o, -1), True)
    if k_first:  # dW [K, O] = A2ᵀ · [M, O]
        d_w = cusparselt.matmul(a2, d2, sparse="rhs", transpose_lhs=True, transpose_rhs=d_t)
    else:  # dW [O, K] = [O, M] · A2
        d_w = cusparselt.matmul(d2, a2, sparse="lhs", transpose_lhs=not d_t)
    return d_w.reshape(weight.shape)


def _interpret() -> bool:
    return jax.default_backend() != "gpu"


def _kernel_product(plan: GemmPlan, w_rows: jax.Array, b: jax.Array) -> jax.Array:
    """``w_rows @ b`` for a ``w_rows`` that is 2:4 along its last axis, through the kernels."""
    from fst_jax import kernels  # noqa: PLC0415 - Pallas is imported only when asked for

    values, meta = kernels.prune_compress_2to4(w_rows, axis=-1, interpret=_interpret())
    return kernels.sparse_matmul(values, meta, b, precision=plan.params.get("precision"),
                                 interpret=_interpret())


def _forward_product(plan: GemmPlan, act: jax.Array, w_f: jax.Array) -> jax.Array:
    if plan.backend == "cusparselt" and plan.forward:
        return _cslt_forward(plan, act, w_f)
    layout = _kernel_layout(plan, act, w_f)
    if layout is None or not plan.forward:
        return _dot(plan, act, w_f)
    a2, w_ko = layout
    y_t = _kernel_product(plan, w_ko.T, a2.T)  # [O, M]: W_fᵀ is 2:4 along K, its last axis
    free = jnp.moveaxis(act, plan.act_contract[0], -1).shape[:-1]
    return y_t.T.reshape(*free, -1) if plan.weight_side == 1 else y_t.reshape(-1, *free)


def _grad_input_product(plan: GemmPlan, act: jax.Array, w_b: jax.Array, dy: jax.Array) -> jax.Array:
    if plan.backend == "cusparselt" and plan.grad_input != "dense":
        return _cslt_grad_input(plan, act, w_b, dy)
    layout = _kernel_layout(plan, act, w_b)
    if layout is None or plan.grad_input == "dense":
        _, vjp_act = jax.vjp(lambda a: _dot(plan, a, w_b), act)
        return vjp_act(dy)[0]
    _, w_ko = layout
    o = w_ko.shape[1]
    dy2 = dy.reshape(-1, o) if plan.weight_side == 1 else dy.reshape(o, -1).T  # [M, O]
    da_t = _kernel_product(plan, w_ko, dy2.T)  # [K, M]: W_b is 2:4 along O, its last axis
    moved = jnp.moveaxis(act, plan.act_contract[0], -1).shape
    return jnp.moveaxis(da_t.T.reshape(moved), -1, plan.act_contract[0]).astype(act.dtype)


def _kernel_grad_weight(plan: GemmPlan, act: jax.Array, weight: jax.Array, dy: jax.Array) -> jax.Array | None:
    """The compact grad-weight product through the fused shift kernel, or None where it does not
    apply (the weight on the lhs, the token axis not right before the contracting one)."""
    layout = _kernel_layout(plan, act, weight)
    if (layout is None or plan.weight_side != 1 or plan.act_contract[0] != act.ndim - 1
            or plan.t_axis != act.ndim - 2):
        return None
    from fst_jax import kernels  # noqa: PLC0415

    t, k = act.shape[-2:]
    d_w = kernels.grad_weight_shift(act.reshape(-1, t, k), dy.reshape(-1, t, dy.shape[-1]), plan.pattern,
                                    plan.restore_scale, precision=plan.params.get("precision"),
                                    interpret=_interpret())
    return d_w if plan.k_axis == 0 else d_w.T


# ------------------------------------------------------------------------------------------------
# Convolutions: the token axis t is the output position within each image, flattened row-major
# over the spatial axes; the fixed mask on the im2col columns M(t, k) (k = input channel) only
# selects output positions per input channel, so it moves onto the output gradient.


def _flat_tokens(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, Any]:
    """``x`` with ``axes`` moved to the end (in order) and flattened, and the inverse map."""
    ends = tuple(range(x.ndim - len(axes), x.ndim))
    moved = jnp.moveaxis(x, axes, ends)
    return moved.reshape(*moved.shape[:len(moved.shape) - len(axes)], -1), \
        lambda y: jnp.moveaxis(y.reshape(moved.shape), ends, axes)


def _conv_grad_weight(plan: GemmPlan, act: jax.Array, weight: jax.Array, dy: jax.Array,
                      seed: jax.Array) -> jax.Array:
    def grad(g: jax.Array) -> jax.Array:
        _, vjp_w = jax.vjp(lambda w: _dot(plan, act, w), weight)
        return vjp_w(g)[0]

    if plan.grad_weight == "dense":
        return grad(dy)
    flat, unflat = _flat_tokens(dy, plan.t_out_axes)
    if plan.grad_weight == "prune_grad_output":
        return grad(unflat(_masks.apply_mask(flat, _masks.mask_2to4(flat, axis=-1))))
    if plan.grad_weight == "mvue":
        return grad(unflat(_mvue(flat, -1, seed)))
    shifted = _masks.gradient_shift(flat, -1, plan.restore_scale)
    t = lax.broadcasted_iota(jnp.int32, flat.shape, flat.ndim - 1)
    if plan.tokens % 2:  # p = n·T + t over the images n of the batch
        out_spec = plan.params["dimension_numbers"].out_spec
        n_axis = 0 if out_spec[0] < out_spec[1] else 1
        t = t + plan.tokens * lax.broadcasted_iota(jnp.int32, flat.shape, n_axis)
    t = _like_sharding(t, flat)

    def tokens(parity: int) -> jax.Array:  # dY' at the kept output positions t % 2 == parity
        return unflat(jnp.where(t % 2 == parity, shifted, jnp.zeros_like(shifted)))

    if plan.pattern != "checkerboard":
        return grad(tokens(int(plan.pattern == "odd")))
    k = lax.broadcasted_iota(jnp.int32, weight.shape, plan.k_axis)  # the input channel
    return jnp.where(k % 2 == 0, grad(tokens(0)), grad(tokens(1)))


# Compact convolutions. The flat index t of an output position is Σ_i o_i·Π_{j>i} S_j, so its
# parity is that of Σ o_i over the trailing spatial dims after which every size is odd: stripes
# o_last ≡ p when the last size is even, a 2-D checkerboard when it is odd and the one before even,
# and so on. Each such set is a union of sub-grids with step 2 along those dims; over a sub-grid the
# convolution is the same convolution with doubled strides and a shifted start (padding_low −
# offset·stride), so its grad-weight is an ordinary (smaller) backward-filter convolution.


def _parities(plan: GemmPlan) -> tuple[int, ...]:
    """The parities of t that the grad-weight reads: per input-channel parity for the checkerboard."""
    return (0, 1) if plan.pattern == "checkerboard" else (int(plan.pattern == "odd"),)


def _subgrids(out_sizes: tuple[int, ...], parity: int) -> list[dict[int, int]]:
    """The output positions with ``t % 2 == parity`` as sub-grids: each a {spatial dim: offset}
    taking ``offset::2`` along those dims (all positions along the others)."""
    dims: list[int] = []
    for i in reversed(range(len(out_sizes))):
        if out_sizes[i] > 1:  # a size-1 dim's coordinate is always 0
            dims.insert(0, i)
        if out_sizes[i] % 2 == 0:  # the dims before it have an even weight in t
            break
    return [dict(zip(dims, off)) for off in itertools.product((0, 1), repeat=len(dims)) if sum(off) % 2 == parity]


def _conv_layout(plan: GemmPlan, out_sizes: tuple[int, ...]) -> list[tuple[int, dict[int, int]]]:
    """(parity, sub-grid) of every piece of the compact grad-weight, in a fixed order."""
    return [(p, g) for p in _parities(plan) for g in _subgrids(out_sizes, p)]


def _pointwise(plan: GemmPlan, weight: jax.Array) -> bool:
    """A 1×1 stride-1 unpadded convolution: each output position reads only the input position
    at the same place, so the kept output positions need only the kept half of the input."""
    p = plan.params
    rhs_spatial = p["dimension_numbers"].rhs_spec[2:]
    return (all(weight.shape[d] == 1 for d in rhs_spatial) and all(s == 1 for s in p["window_strides"])
            and all(tuple(pad) == (0, 0) for pad in p["padding"]))


def _conv_piece(plan: GemmPlan, x: jax.Array, parity: int, grid: dict[int, int], pointwise: bool) -> jax.Array:
    """The input that one piece's grad-weight convolution reads: the input channels of that parity
    (checkerboard), and for a pointwise convolution only the sub-grid's positions."""
    lhs_spec = plan.params["dimension_numbers"].lhs_spec
    if plan.pattern == "checkerboard":
        x = _every_other(x, lhs_spec[1], parity)
    if pointwise:
        for i, off in grid.items():
            x = _every_other(x, lhs_spec[2 + i], off)
    return x


def _conv_pieces(plan: GemmPlan, x: jax.Array, out_sizes: tuple[int, ...], pointwise: bool) -> tuple[jax.Array, ...]:
    return tuple(_conv_piece(plan, x, p, g, pointwise) for p, g in _conv_layout(plan, out_sizes))


def _conv_from_pieces(plan: GemmPlan, pieces: tuple[jax.Array, ...], weight: jax.Array,
                      out_sizes: tuple[int, ...]) -> jax.Array:
    """The masked input of a pointwise convolution (its spatial sizes are ``out_sizes``), rebuilt
    from its saved pieces: only its shape is read, by the grad-input product."""
    lhs_spec = plan.params["dimension_numbers"].lhs_spec
    full = None
    for x, (p, g) in zip(pieces, _conv_layout(plan, out_sizes)):
        if plan.pattern == "checkerboard":
            x = _unstride(x, lhs_spec[1], p, weight.shape[plan.k_axis])
        for d, off in g.items():
            x = _unstride(x, lhs_spec[2 + d], off, out_sizes[d])
        full = x if full is None else full + x
    return full


def _conv_compact_grad_weight(plan: GemmPlan, pieces: tuple[jax.Array, ...], weight: jax.Array, dy: jax.Array,
                              pointwise: bool) -> jax.Array:
    """dW from the kept output positions only: per piece (input-channel parity, sub-grid) one
    backward-filter convolution over the sub-grid; the pieces of a parity are summed (in f32), the
    two parities of the checkerboard interleaved along the input channels."""
    dn = plan.params["dimension_numbers"]
    out_sizes = tuple(dy.shape[a] for a in plan.t_out_axes)
    flat, unflat = _flat_tokens(dy, plan.t_out_axes)
    shifted = unflat(_masks.gradient_shift(flat, -1, plan.restore_scale))
    wide = jnp.promote_types(weight.dtype, jnp.float32)
    sums: dict[int, jax.Array] = {}
    for x, (p, grid) in zip(pieces, _conv_layout(plan, out_sizes)):
        w = _every_other(weight, plan.k_axis, p) if plan.pattern == "checkerboard" else weight
        g, strides, padding = shifted, list(plan.params["window_strides"]), list(plan.params["padding"])
        for i, off in grid.items():
            g = _every_other(g, dn.out_spec[2 + i], off)
            if not pointwise:  # start at the offset-th output position, step over every other one
                padding[i] = (padding[i][0] - off * strides[i], padding[i][1])
                strides[i] *= 2
        sub = dataclasses.replace(plan, dot_params=tuple(sorted(
            {**plan.params, "window_strides": tuple(strides), "padding": tuple(padding)}.items())))
        _, vjp_w = jax.vjp(lambda w, sub=sub, x=x: _dot(sub, x, w), w)
        d = vjp_w(g)[0]
        sums[p] = d if p not in sums else sums[p].astype(wide) + d.astype(wide)
    halves = [sums[p].astype(weight.dtype) for p in _parities(plan)]
    if plan.pattern != "checkerboard":
        return halves[0]
    return jnp.stack(halves, axis=plan.k_axis + 1).reshape(weight.shape)


def _conv_saved(plan: GemmPlan, act: jax.Array, weight: jax.Array) -> Any:
    """What a compact convolution keeps for the backward pass: the pieces of a pointwise one (half
    the input), else the whole input (overlapping windows read every input position)."""
    if not _pointwise(plan, weight):
        return act
    sizes = tuple(act.shape[d] for d in plan.params["dimension_numbers"].lhs_spec[2:])
    return _conv_pieces(plan, act, sizes, True)


# ------------------------------------------------------------------------------------------------
# Rotating patterns: the grad-weight token mask is pattern ``plan.patterns[choice]``, the choice an
# int32 primal operand (cotangent None) drawn once per matmul per step by the caller. The forward
# product does not read it; the backward pass forms dW from a p-indexed mask (masked) or from the
# kept half of the activation (compact, one compiled step for every draw, no switch over GEMMs).


def _batch_axes(plan: GemmPlan, ndim: int) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a not in plan.act_contract and a not in plan.act_free)


def _layout(plan: GemmPlan, act_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> _rotate.CompactLayout:
    return _rotate.compact_layout(act_shape, weight_shape, plan.params["dimension_numbers"], plan.weight_side,
                                  plan.t_axis)


def _conv_rotating_grad_weight(plan: GemmPlan, act: jax.Array, weight: jax.Array, dy: jax.Array,
                               choice: jax.Array) -> jax.Array:
    """dW of a convolution under the drawn pattern: ``p = n·T + t`` over the output positions of
    the batch (as the authors' im2col columns), ``k`` the input channel; one backward-filter
    convolution per input-channel parity, interleaved."""
    def grad(g: jax.Array) -> jax.Array:
        _, vjp_w = jax.vjp(lambda w: _dot(plan, act, w), weight)
        return vjp_w(g)[0]

    flat, unflat = _flat_tokens(dy, plan.t_out_axes)
    shifted = _masks.gradient_shift(flat, -1, plan.restore_scale)
    out_spec = plan.params["dimension_numbers"].out_spec
    n_axis = 0 if out_spec[0] < out_spec[1] else 1
    images = flat.shape[n_axis]
    t = lax.broadcasted_iota(jnp.int32, flat.shape, flat.ndim - 1)
    n = lax.broadcasted_iota(jnp.int32, flat.shape, n_axis)
    p8 = _like_sharding(((n % 8) * (plan.tokens % 8) + t) % 8, flat)  # only p mod 8 matters
    table = _masks.pattern_phase(plan.patterns, images * plan.tokens)
    halves = []
    for kappa in (0, 1):
        phase = _masks._phase_of(table, choice, jnp.bool_(kappa), p8 // 4 == 1)
        halves.append(grad(unflat(jnp.where(p8 % 2 == phase, shifted, jnp.zeros_like(shifted)))))
    k = lax.broadcasted_iota(jnp.int32, weight.shape, plan.k_axis)  # the input channel
    return jnp.where(k % 2 == 0, halves[0], halves[1])


def _rotating_grad_weight_masked(plan: GemmPlan, act: jax.Array, weight: jax.Array, dy: jax.Array,
                                 choice: jax.Array) -> jax.Array:
    if plan.conv:
        return _conv_rotating_grad_weight(plan, act, weight, dy, choice)
    mask = _masks.rotating_token_mask(act.shape, token_axis=plan.t_axis, contracting_axes=plan.act_contract,
                                      choice=choice, patterns=plan.patterns,
                                      batch_axes=_batch_axes(plan, act.ndim))
    a_kept = _masks.apply_mask(act, _like_sharding(mask, act))
    dy_g = _masks.gradient_shift(dy, plan.t_out_axis, plan.restore_scale)
    _, vjp_w = jax.vjp(lambda w: _dot(plan, a_kept, w), weight)
    return vjp_w(dy_g)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fst_dot(act: jax.Array, w: jax.Array, w_f: jax.Array, keep_b: Any, choice: jax.Array, plan: GemmPlan) -> jax.Array:
    return _forward_product(plan, act, w_f)


def _fst_dot_fwd(act: jax.Array, w: jax.Array, w_f: jax.Array, keep_b: Any, choice: jax.Array, plan: GemmPlan):
    if plan.pair_select:
        saved = _rotate.select_parts(act, choice if plan.rotating else 0,
                                               _layout(plan, act.shape, w_f.shape), plan.compact_patterns)
    elif plan.compact:
        saved = _conv_saved(plan, act, w_f) if plan.conv else _compact_parts(plan, act)
    else:
        saved = act
    return _fst_dot(act, w, w_f, keep_b, choice, plan), (saved, w, keep_b, choice)


def _fst_dot_bwd(plan: GemmPlan, res: tuple[Any, jax.Array, Any, jax.Array], dy: jax.Array):
    """(dA, None, dW, None, None): dW is the cotangent of ``W_f``, which :func:`prepare` passes on
    to the weight. Kept for the backward pass: the weight (a parameter, alive anyway, or its
    view) and the grad-input mask ``keep_b`` (bool); no mask is recomputed, and the grad-weight
    product reads the weight's shape and dtype only."""
    saved, weight, keep_b, choice = res
    w_b = weight if keep_b is None else _masks.apply_mask(weight, keep_b)
    # The grad-input product is linear in the activation: its value only fixes the shape (and,
    # in shard_map, the varying axes), so the compact modes pass the masked one.
    if plan.pair_select:
        lay = _layout(plan, plan.act_shape, weight.shape)
        choice = choice if plan.rotating else 0
        act = _rotate.from_parts(saved, choice, lay, plan.compact_patterns)
        d_w = _rotate.parts_grad_weight(
            saved, choice, dy, lay, weight_dtype=weight.dtype, scale=plan.restore_scale,
            patterns=plan.compact_patterns,
            precision=plan.params.get("precision"), preferred_element_type=plan.params.get("preferred_element_type"))
    elif plan.rotating:
        act = saved
        d_w = _rotating_grad_weight_masked(plan, act, weight, dy, choice)
    elif plan.compact and plan.conv:
        pointwise = _pointwise(plan, weight)
        out_sizes = tuple(dy.shape[a] for a in plan.t_out_axes)
        act = _conv_from_pieces(plan, saved, weight, out_sizes) if pointwise else saved
        pieces = saved if pointwise else _conv_pieces(plan, act, out_sizes, False)
        d_w = _conv_compact_grad_weight(plan, pieces, weight, dy, pointwise)
    elif plan.compact:
        act = _from_compact(plan, saved)
        d_w = _kernel_grad_weight(plan, act, weight, dy)
        if d_w is None:
            d_w = _compact_grad_weight(plan, saved, weight, dy)
    elif plan.conv:
        act = saved
        d_w = _conv_grad_weight(plan, act, weight, dy, choice)
    elif plan.sparse_dy:
        act = saved
        d_w = _cslt_grad_weight(plan, act, _mvue(dy, plan.t_out_axis, choice), weight)
    else:
        act = saved
        a_g, dy_g = _grad_weight_operands(plan, act, dy, choice)
        _, vjp_w = jax.vjp(lambda w: _dot(plan, a_g, w), weight)
        (d_w,) = vjp_w(dy_g)
    d_act = _grad_input_product(plan, act, w_b, dy)
    return d_act, None, d_w, None, None


_fst_dot.defvjp(_fst_dot_fwd, _fst_dot_bwd)


def sparse_dot(lhs: jax.Array, rhs: jax.Array, plan: GemmPlan, choice: jax.Array | None = None,
               prepared: tuple[jax.Array, jax.Array, Any] | None = None) -> jax.Array:
    """``dot_general(lhs, rhs)`` with the FST products of ``plan`` (a :class:`GemmPlan`).

    ``prepared``: the weight's :func:`prepare` when the caller prepared it once
    for several matmuls or outside a loop (the weight operand is then not read); otherwise the
    weight is prepared here. A keyed plan (:attr:`GemmPlan.keyed`) takes ``choice`` (an int32
    scalar, traced): a rotating plan's drawn pattern index, an ``"mvue"`` plan's drawn seed.
    """
    act, weight = (rhs, lhs) if plan.weight_side == 0 else (lhs, rhs)
    if plan.keyed and choice is None:
        raise ValueError("fst_jax: a keyed plan needs the drawn choice (internal error)")
    w, w_f, keep_b = prepared if prepared is not None else prepare(weight, weight_spec(plan))
    with jax.named_scope(MARKER):
        return _fst_dot(act, w, w_f, keep_b, jnp.asarray(choice if plan.keyed else 0, jnp.int32), plan)
