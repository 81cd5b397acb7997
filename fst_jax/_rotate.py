"""Compact grad-weight product by per-pair token selection (rotating patterns, the checkerboard).

The grad-weight product of FST is ``dW = (M ⊙ A)ᵀ · dY'`` with ``dY'[t] = dY[t] + s·dY[t−1]``
(:func:`fst_jax._masks.gradient_shift`) and ``M`` one of the half-token patterns of
:func:`fst_jax._masks.rotating_token_mask`, drawn per layer per step (:func:`~fst_jax._masks.draw_pattern`).
Every pattern keeps, for each parity ``κ = k % 2`` of the flat contraction index and each pair of
tokens ``(2j, 2j+1)`` of the flat token index ``p``, exactly one token: ``2j + phase``, where the
phase depends only on the pattern, ``κ`` and the group parity ``(j // 2) % 2``. So the kept half is

    part[κ][j, k'] = A[2j + phase(choice, κ, j), 2k' + κ]        (two [N/2, K/2] quarters)

an elementwise select between the even and the odd token of each pair with a *traced* phase, and

    dW[κ::2, :] = part[κ]ᵀ · dY'[2j + phase(choice, κ, j), :]     (one batched GEMM over κ)

One compiled function serves every draw: the choice only moves a select, never a shape, and no
``lax.switch`` picks between GEMMs. The fixed checkerboard's compact product runs here too, as
the one-pattern set with a constant choice (:attr:`fst_jax._dot.GemmPlan.pair_select`), so a
rotating pattern costs what the fixed checkerboard costs, whatever pattern is drawn.

Layouts follow ``dot_general``: :func:`compact_layout` reads the activation's free, contracting and
batch axes from the ``dimension_numbers`` and which side the weight is on, and every function
works on the canonical ``[batch, N, K]`` view of the activation (``N`` the flat token count over
its free dims, token axis innermost; ``K`` the flat contraction count). For the usual ``[N, K]`` and
``[B, T, K]`` activations times a ``[K, O]`` weight that view is a reshape, not a transpose. Any
``N`` works, odd ``T`` and odd ``N`` included (an odd count is padded with one zero token to pair
up; where the drawn phase keeps the pad, token ``N−1`` is dropped, as the mask says, and the pad
adds zero). ``K`` must be even (it is: the sparse weight's contracting dim is a multiple of 4).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fst_jax import _masks

__all__ = [
    "CompactLayout",
    "compact_layout",
    "from_parts",
    "parts_grad_weight",
    "select_parts",
]


@dataclasses.dataclass(frozen=True)
class CompactLayout:
    """Static layout of one ``dot_general`` for the rotating compact product (hashable).

    Attributes:
      act_shape: the activation's shape.
      weight_shape: the weight's shape.
      act_perm: the activation's axes in canonical order ``[batch, free (token last), contract]``.
      out_perm: the output's (``dY``'s) axes in canonical order ``[batch, act free, weight free]``.
      weight_perm: the weight's axes in canonical order ``[batch, contract, free]``.
      token_axis: the activation's token axis (its innermost free axis).
      t_out_axis: the token axis in the output.
      batch: the number of independent problems (product of the batch dims; 1 if none).
      num_tokens: ``N``, the flat token count of one problem.
      num_k: ``K``, the flat contraction count (even).
      num_o: ``O``, the flat count of the weight's free dims.
    """

    act_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    act_perm: tuple[int, ...]
    out_perm: tuple[int, ...]
    weight_perm: tuple[int, ...]
    token_axis: int
    t_out_axis: int
    batch: int
    num_tokens: int
    num_k: int
    num_o: int

    @property
    def num_pairs(self) -> int:
        """``ceil(N / 2)``: the kept tokens per contraction row."""
        return (self.num_tokens + 1) // 2

    def phase_table(self, patterns: Sequence[str]) -> np.ndarray:
        """:func:`fst_jax._masks.pattern_phase` for this layout's token count."""
        return _masks.pattern_phase(patterns, self.num_tokens)


def compact_layout(
    act_shape: Sequence[int],
    weight_shape: Sequence[int],
    dimension_numbers: Any,
    weight_side: int,
    token_axis: int | None = None,
) -> CompactLayout:
    """The static layout of ``dot_general(lhs, rhs, dimension_numbers)`` for the compact product.

    Args:
      act_shape: the activation operand's shape.
      weight_shape: the weight operand's shape.
      dimension_numbers: the ``dot_general``'s ``((lhs_contract, rhs_contract), (lhs_batch,
        rhs_batch))``.
      weight_side: 0 if the weight is the lhs, 1 if it is the rhs.
      token_axis: the activation's token axis, if given; it must be its innermost free axis (the
        default).

    Returns:
      A :class:`CompactLayout`.

    Raises:
      ValueError: if the activation has no free axis, ``token_axis`` is not its innermost free
        axis, or the flat contraction count ``K`` is odd.

    Example:
      >>> from fst_jax._rotate import compact_layout
      >>> lay = compact_layout((2, 5, 8), (8, 4), (((2,), (0,)), ((), ())), weight_side=1)
      >>> lay.num_tokens, lay.num_k, lay.num_o, lay.token_axis, lay.t_out_axis
      (10, 8, 4, 1, 1)
    """
    act_shape = tuple(operator.index(d) for d in act_shape)
    weight_shape = tuple(operator.index(d) for d in weight_shape)
    (lc, rc), (lb, rb) = dimension_numbers
    if weight_side not in (0, 1):
        raise ValueError(f"compact_layout: weight_side={weight_side!r} must be 0 or 1")
    a_c, w_c = (tuple(rc), tuple(lc)) if weight_side == 0 else (tuple(lc), tuple(rc))
    a_b, w_b = (tuple(rb), tuple(lb)) if weight_side == 0 else (tuple(lb), tuple(rb))
    a_free = tuple(a for a in range(len(act_shape)) if a not in a_c + a_b)
    w_free = tuple(a for a in range(len(weight_shape)) if a not in w_c + w_b)
    if not a_free:
        raise ValueError(f"compact_layout: the activation {act_shape} has no free (token) axis")
    t_axis = a_free[-1]
    if token_axis is not None and token_axis % len(act_shape) != t_axis:
        raise ValueError(
            f"compact_layout: token_axis={token_axis} is not the activation's innermost free axis "
            f"({t_axis})"
        )
    num_k = math.prod(act_shape[a] for a in a_c)
    if num_k % 2:
        raise ValueError(f"compact_layout: the flat contraction count K={num_k} must be even")
    nb = len(a_b)
    # dot_general's output: [batch, lhs free, rhs free].
    a_out = tuple(range(nb, nb + len(a_free)))
    w_out = tuple(range(nb + len(a_free), nb + len(a_free) + len(w_free)))
    if weight_side == 0:
        w_out = tuple(range(nb, nb + len(w_free)))
        a_out = tuple(range(nb + len(w_free), nb + len(w_free) + len(a_free)))
    return CompactLayout(
        act_shape=act_shape,
        weight_shape=weight_shape,
        act_perm=a_b + a_free + a_c,
        out_perm=tuple(range(nb)) + a_out + w_out,
        weight_perm=w_b + w_c + w_free,
        token_axis=t_axis,
        t_out_axis=a_out[-1],
        batch=math.prod(act_shape[a] for a in a_b),
        num_tokens=math.prod(act_shape[a] for a in a_free),
        num_k=num_k,
        num_o=math.prod(weight_shape[a] for a in w_free),
    )


def _pairs(x: jax.Array, n: int) -> jax.Array:
    """``[B, N, C] → [B, ceil(N/2), 2, C]``, padding one zero token when ``N`` is odd."""
    if n % 2:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
    return x.reshape(x.shape[0], x.shape[1] // 2, 2, x.shape[2])


def _phases(layout: CompactLayout, patterns: Sequence[str], choice: int | jax.Array) -> Any:
    """A bool ``[2, 1, ceil(N/2), 1]``: for row parity κ, true where pair ``j`` keeps its odd token.

    A numpy array when ``choice`` is a Python int (the fixed checkerboard's constant choice): no
    traced ops, and :func:`_uniform` can turn the selects into plain slices."""
    table = layout.phase_table(patterns)
    g_odd = (np.arange(layout.num_pairs) // 2) % 2 == 1
    if isinstance(choice, int):
        return np.stack([table[choice, kappa][g_odd.astype(int)][None, :, None] == 1 for kappa in (0, 1)])
    return jnp.stack([_masks._phase_of(table, choice, jnp.bool_(kappa), jnp.asarray(g_odd))[None, :, None] == 1
                      for kappa in (0, 1)])


def _uniform(odd: Any) -> tuple[int, int] | None:
    """The kept token of every pair, per row parity κ, when :func:`_phases` is static and the same
    for every pair (the fixed checkerboard: (0, 1)); else None."""
    if not isinstance(odd, np.ndarray) or not all((o == o.flat[0]).all() for o in odd):
        return None
    return int(odd[0].flat[0]), int(odd[1].flat[0])


def _pick(odd: Any, even_tok: jax.Array, odd_tok: jax.Array) -> jax.Array:
    """Per row parity κ, ``odd_tok`` where pair ``j`` keeps its odd token, else ``even_tok``.

    ``even_tok`` and ``odd_tok`` are ``[2, ..., J, C]`` (one per κ; leading axes broadcast against
    ``odd``, from :func:`_phases`), and so is the result. The one place that chooses the form: a
    static phase that is the same for every pair (the fixed checkerboard) is a slice, anything else
    an elementwise select."""
    uniform = _uniform(odd)
    if uniform is None:
        return jnp.where(odd, odd_tok, even_tok)
    return jnp.stack([(odd_tok if phase else even_tok)[kappa] for kappa, phase in enumerate(uniform)])


def _per_kappa(x: jax.Array) -> jax.Array:
    """``x`` seen once per row parity κ: ``[2, *x.shape]`` (a broadcast, no copy)."""
    return jnp.broadcast_to(x, (2, *x.shape))


def _uncanonical(x: jax.Array, shape: tuple[int, ...], perm: tuple[int, ...]) -> jax.Array:
    """``x`` in canonical order (``transpose(·, perm)`` of an array of ``shape``) back to ``shape``."""
    return jnp.transpose(x.reshape(tuple(shape[a] for a in perm)), np.argsort(perm))


def _checked(fn: str, choice: int | jax.Array, patterns: Sequence[str]) -> tuple[Any, tuple[str, ...]]:
    """``choice`` (a Python int stays one: static; else an int32 scalar array) and ``patterns``
    validated, or a ``ValueError`` naming ``fn``."""
    patterns = _masks._check_patterns(fn, patterns)
    return _masks._check_choice(fn, choice, len(patterns)), patterns


def select_parts(
    a: jax.Array,
    choice: int | jax.Array,
    layout: CompactLayout,
    patterns: Sequence[str] = _masks.AUTHORS_PATTERNS,
) -> jax.Array:
    """The kept half of the activation, what the forward pass saves: ``[2, batch, ceil(N/2), K/2]``.

    Entry ``[κ, b, j, k']`` is ``A[b, p = 2j + phase, k = 2k' + κ]`` in the canonical ``[batch, N, K]``
    view, the phase being that of ``patterns[choice]`` for rows of parity ``κ`` and pair ``j``
    (:func:`fst_jax._masks.pattern_phase`). Half the bytes of ``a`` (plus one token row when ``N`` is
    odd), whichever pattern is drawn.

    Args:
      a: the activation, of shape ``layout.act_shape``.
      choice: the pattern index (an int or a traced int32 scalar from
        :func:`fst_jax._masks.draw_pattern`).
      layout: from :func:`compact_layout`.
      patterns: the pattern set ``choice`` indexes.

    Returns:
      The kept entries, of ``a``'s dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from fst_jax._rotate import compact_layout, select_parts
      >>> a = jnp.arange(16.0).reshape(8, 2)  # 8 tokens, K = 2
      >>> lay = compact_layout(a.shape, (2, 4), (((1,), (0,)), ((), ())), weight_side=1)
      >>> print(select_parts(a, 3, lay)[:, 0, :, 0])  # "checkerboard": κ=0 keeps even p
      [[ 0.  4.  8. 12.]
       [ 3.  7. 11. 15.]]
    """
    choice, patterns = _checked("select_parts", choice, patterns)
    if tuple(a.shape) != layout.act_shape:
        raise ValueError(f"select_parts: a has shape {a.shape}, the layout {layout.act_shape}")
    x = jnp.transpose(a, layout.act_perm).reshape(layout.batch, layout.num_tokens, layout.num_k)
    x = _pairs(x, layout.num_tokens)  # [B, J, 2, K]
    x = jnp.moveaxis(x.reshape(*x.shape[:3], layout.num_k // 2, 2), -1, 0)  # [κ, B, J, 2, K/2]
    return _pick(_phases(layout, patterns, choice), x[..., 0, :], x[..., 1, :])


def from_parts(
    parts: jax.Array,
    choice: int | jax.Array,
    layout: CompactLayout,
    patterns: Sequence[str] = _masks.AUTHORS_PATTERNS,
) -> jax.Array:
    """The masked activation ``M ⊙ A`` rebuilt from :func:`select_parts` (zeros elsewhere).

    Args:
      parts: from :func:`select_parts` with the same ``choice``, ``layout`` and
        ``patterns``.
      choice: the pattern index.
      layout: from :func:`compact_layout`.
      patterns: the pattern set.

    Returns:
      An array of ``layout.act_shape`` and ``parts``' dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from fst_jax._rotate import compact_layout, select_parts, from_parts
      >>> a = jnp.ones((3, 4))  # 3 tokens (odd), K = 4
      >>> lay = compact_layout(a.shape, (4, 4), (((1,), (0,)), ((), ())), weight_side=1)
      >>> print(from_parts(select_parts(a, 2, lay), 2, lay).astype(int))
      [[0 1 0 1]
       [1 0 1 0]
       [0 1 0 1]]
    """
    choice, patterns = _checked("from_parts", choice, patterns)
    odd, zeros = _phases(layout, patterns, choice), jnp.zeros_like(parts)  # parts: [κ, B, J, K/2]
    x = jnp.stack([_pick(odd, parts, zeros), _pick(odd, zeros, parts)], axis=3)  # [κ, B, J, 2, K/2]
    x = jnp.moveaxis(x, 0, -1)  # [B, J, 2, K/2, κ]
    x = x.reshape(layout.batch, 2 * layout.num_pairs, layout.num_k)[:, : layout.num_tokens]
    return _uncanonical(x, layout.act_shape, layout.act_perm)


def _kept_gradients(dy: jax.Array, layout: CompactLayout, patterns: Sequence[str],
                    choice: jax.Array, scale: float | jax.Array) -> jax.Array:
    """``dY'`` at the kept token of each pair, for each row parity: ``[2, batch, ceil(N/2), O]``.

    With an even token count per sequence the pairs lie within sequences, and each kept token's
    ``dY'`` is formed from the pair's own two tokens (``dY'[2j+1] = dY[2j+1] + s·dY[2j]``) or from
    the previous pair's odd token (``dY'[2j] = dY[2j] + s·dY[2j−1]``, wrapping within the
    sequence): one pass over ``dY``, no full ``dY'``. Otherwise (odd ``T``: pairs straddle
    sequences) the full ``dY'`` is formed first. Same arithmetic as
    :func:`fst_jax._masks.gradient_shift` either way, so the values agree bit for bit.
    """
    odd = _phases(layout, patterns, choice)  # [κ, 1, J, 1]
    shape = (layout.batch, layout.num_tokens, layout.num_o)
    t = layout.act_shape[layout.token_axis]
    no_shift = isinstance(scale, (int, float, np.number)) and scale == 0
    if t % 2:
        g = _masks.gradient_shift(dy, layout.t_out_axis, scale)
        pairs = _pairs(jnp.transpose(g, layout.out_perm).reshape(shape), layout.num_tokens)
        return _pick(odd, _per_kappa(pairs[..., 0, :]), _per_kappa(pairs[..., 1, :]))
    g = jnp.transpose(dy, layout.out_perm).reshape(
        layout.batch, layout.num_tokens // t, t // 2, 2, layout.num_o)  # [B, sequences, T/2, 2, O]
    even_tok, odd_tok = g[:, :, :, 0], g[:, :, :, 1]
    if not no_shift:
        wide = jnp.promote_types(dy.dtype, jnp.float32)
        prev = jnp.roll(odd_tok, 1, axis=2)  # dY[t − 1] of each even t, within its sequence
        even_tok, odd_tok = (
            (even_tok.astype(wide) + scale * prev.astype(wide)).astype(dy.dtype),
            (odd_tok.astype(wide) + scale * even_tok.astype(wide)).astype(dy.dtype),
        )
    half = (layout.batch, layout.num_pairs, layout.num_o)  # not stacked into pairs: that is a copy
    return _pick(odd, _per_kappa(even_tok.reshape(half)), _per_kappa(odd_tok.reshape(half)))


def parts_grad_weight(
    parts: jax.Array,
    choice: int | jax.Array,
    dy: jax.Array,
    layout: CompactLayout,
    *,
    weight_dtype: Any,
    scale: float | jax.Array,
    patterns: Sequence[str] = _masks.AUTHORS_PATTERNS,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``dW = (M ⊙ A)ᵀ · dY'`` from the kept half of the activation, in the weight's layout.

    ``dY' = gradient_shift(dY, t_out_axis, scale)`` (wrapping within each sequence), gathered at
    the kept token of each pair for each row parity ``κ``; then one ``dot_general`` batched over
    ``κ`` (and the problem's batch dims) contracts the ``N/2`` kept tokens, and the two ``K/2``
    halves are interleaved back. Like JAX's transpose rule of ``dot_general``, the product takes
    ``precision`` and ``preferred_element_type`` and the result is cast to ``weight_dtype``.

    Args:
      parts: from :func:`select_parts` (same ``choice``, ``layout``, ``patterns``).
      choice: the pattern index.
      dy: the output gradient, in the ``dot_general``'s output layout.
      layout: from :func:`compact_layout`.
      weight_dtype: the dtype of the weight (of the returned gradient).
      scale: the restore scale ``s`` of the gradient shift.
      patterns: the pattern set.
      precision: the ``dot_general``'s ``precision``.
      preferred_element_type: the ``dot_general``'s ``preferred_element_type``.

    Returns:
      The weight gradient, of shape ``layout.weight_shape`` and dtype ``weight_dtype``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fst_jax._masks import apply_mask, gradient_shift, rotating_token_mask
      >>> from fst_jax._rotate import (compact_layout, parts_grad_weight,
      ...                              select_parts)
      >>> a = jax.random.normal(jax.random.key(0), (2, 6, 8))  # [B, T, K]
      >>> dy = jax.random.normal(jax.random.key(1), (2, 6, 4))  # [B, T, O]
      >>> dn = (((2,), (0,)), ((), ()))
      >>> lay = compact_layout(a.shape, (8, 4), dn, weight_side=1)
      >>> choice = jnp.int32(0)  # "alternating"
      >>> dw = parts_grad_weight(select_parts(a, choice, lay), choice, dy,
      ...                                   lay, weight_dtype=jnp.float32, scale=0.5)
      >>> m = rotating_token_mask(a.shape, token_axis=1, contracting_axes=(2,), choice=choice)
      >>> ref = jnp.einsum("btk,bto->ko", apply_mask(a, m), gradient_shift(dy, 1, 0.5))
      >>> bool(jnp.allclose(dw, ref, atol=1e-5))
      True
    """
    choice, patterns = _checked("parts_grad_weight", choice, patterns)
    dys = _kept_gradients(dy, layout, patterns, choice, scale)  # [κ, B, J, O]
    dw = lax.dot_general(parts, dys, (((2,), (2,)), ((0, 1), (0, 1))), precision=precision,
                         preferred_element_type=preferred_element_type)  # [κ, B, K/2, O]
    dw = jnp.transpose(dw, (1, 2, 0, 3)).reshape(layout.batch, layout.num_k, layout.num_o)
    return _uncanonical(dw, layout.weight_shape, layout.weight_perm).astype(weight_dtype)
