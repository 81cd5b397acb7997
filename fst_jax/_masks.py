"""Masks of the FST recipe, in pure ``jax.numpy``: all jit-able, none data-dependent in shape.

* :func:`mask_2to4`: magnitude 2:4 along one axis (keep the 2 largest of every 4).
* :func:`apply_mask`: ``x ⊙ mask`` as ``jnp.where(mask, x, 0)``, so a dropped NaN never spreads.
* :func:`transposable_mask_2to4`: one mask that is 2:4 along two axes (best of the 90 4×4 patterns
  per tile, listed in :data:`TRANSPOSABLE_PATTERNS`).
* :func:`token_mask`: the fixed activation masks (``"checkerboard"``, ``"even"``, ``"odd"``).
* :func:`gradient_shift`: the information-restoration shift ``dY + s·roll(dY, 1)``.

Magnitude is ``|x|`` with NaN counted as ``+inf``. :func:`mask_2to4` breaks ties by the lower
index and uses pairwise comparisons only (no sort, ``top_k`` or gather), so that the same logic
ports to a Triton kernel.

Example:
  >>> import jax.numpy as jnp
  >>> from fst_jax._masks import apply_mask, mask_2to4
  >>> x = jnp.array([0.5, -3.0, 1.0, 2.0, jnp.nan, 0.0, 7.0, 0.0])
  >>> print(apply_mask(x, mask_2to4(x)))
  [ 0. -3.  0.  2. nan  0.  7.  0.]
"""

from __future__ import annotations

import functools
import itertools
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "TRANSPOSABLE_PATTERNS",
    "apply_mask",
    "gradient_shift",
    "mask_2to4",
    "token_mask",
    "transposable_mask_2to4",
]

_PAIRS: tuple[tuple[int, int], ...] = tuple(itertools.combinations(range(4), 2))
"""The 6 column pairs a row of a 2:4 tile can keep: (0,1), (0,2), (0,3), (1,2), (1,3), (2,3)."""

_PATTERN_ROWS: tuple[tuple[int, int, int, int], ...] = tuple(
    rows
    for rows in itertools.product(range(len(_PAIRS)), repeat=4)
    if all(sum(c in _PAIRS[q] for q in rows) == 2 for c in range(4))
)
"""For each transposable pattern, the index into ``_PAIRS`` of the pair each row keeps."""

TRANSPOSABLE_PATTERNS: np.ndarray = np.array(
    [[[c in _PAIRS[q] for c in range(4)] for q in rows] for rows in _PATTERN_ROWS], dtype=bool
)
"""The 90 4×4 0/1 patterns with exactly two ones per row and per column, shape ``(90, 4, 4)``.

Entry ``[p, r, c]`` says whether pattern ``p`` keeps row ``r`` (the ``k`` index within the tile)
and column ``c`` (the ``o`` index). The order is "lexicographic": each row's kept column pair is
taken from ``itertools.combinations(range(4), 2)``, i.e. (0,1), (0,2), (0,3), (1,2), (1,3), (2,3);
the patterns are ``itertools.product`` over the 4 rows (row 0 most significant), keeping those
with exactly two per column. Equivalently: reading a pattern's 16 entries row-major as a binary
number with entry (0, 0) most significant, the patterns are in decreasing order.
"""
TRANSPOSABLE_PATTERNS.flags.writeable = False


def _normalize_axis(fn: str, name: str, axis: int, ndim: int) -> int:
    axis = operator.index(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"{fn}: {name}={axis} is out of range for an array of rank {ndim}")
    return axis % ndim


def _magnitude(x: jax.Array) -> jax.Array:
    """``|x|`` in a dtype whose ``>`` orders magnitudes exactly; NaN becomes ``+inf``."""
    if jnp.issubdtype(x.dtype, jnp.inexact):
        mag = jnp.abs(x)
        return jnp.where(jnp.isnan(mag), jnp.inf, mag)
    if jnp.issubdtype(x.dtype, jnp.signedinteger):
        # abs(INT_MIN) wraps to INT_MIN; read as unsigned it is the true magnitude 2**(bits - 1).
        unsigned = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
        return lax.bitcast_convert_type(jnp.abs(x), unsigned)
    if jnp.issubdtype(x.dtype, jnp.unsignedinteger):
        return x
    raise TypeError(f"masks need a numeric (integer or floating) array, got dtype {x.dtype}")


def mask_2to4(x: jax.Array, axis: int = -1) -> jax.Array:
    """The magnitude 2:4 mask: in every 4 consecutive entries along ``axis``, keep the 2 largest.

    Groups start at index 0. Magnitude is ``|x|``, with NaN and ``±inf`` the largest; ties keep
    the lower index. Exactly 2 of every 4 entries are kept, whatever the values (all zeros
    included). The choice uses pairwise comparisons only: entry ``i`` of a group is kept when
    fewer than 2 entries ``j`` beat it, where ``j`` beats ``i`` if ``|x_j| > |x_i|``, or
    ``|x_j| == |x_i|`` and ``j < i``.

    Args:
      x: a floating or integer array.
      axis: the axis along which groups of 4 are formed; negative values count from the end.

    Returns:
      A bool array of ``x``'s shape, ``True`` where the entry is kept.

    Raises:
      ValueError: if ``axis`` is out of range, or ``x.shape[axis]`` is not a multiple of 4.

    Example:
      >>> import jax.numpy as jnp
      >>> from fst_jax._masks import mask_2to4
      >>> x = jnp.array([[0.5, -3.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
      >>> print(mask_2to4(x).astype(int))
      [[0 1 0 1]
       [1 1 0 0]]
    """
    x = jnp.asarray(x)
    axis = _normalize_axis("mask_2to4", "axis", axis, x.ndim)
    if x.shape[axis] % 4:
        raise ValueError(
            f"mask_2to4: argument x has shape {x.shape}; its length {x.shape[axis]} along "
            f"axis {axis} must be a multiple of 4"
        )
    return _mask_2to4(x, axis)


@functools.partial(jax.jit, static_argnums=1)
def _mask_2to4(x: jax.Array, axis: int) -> jax.Array:
    # Split `axis` into (groups, 4) in place: no transpose.
    shape = x.shape
    mag = _magnitude(x).reshape(shape[:axis] + (shape[axis] // 4, 4) + shape[axis + 1 :])
    entry = [lax.index_in_dim(mag, i, axis + 1, keepdims=False) for i in range(4)]
    keep = []
    for i in range(4):
        # j beats i: larger magnitude, or equal magnitude and lower index.
        beats = [entry[j] >= entry[i] if j < i else entry[j] > entry[i] for j in range(4) if j != i]
        keep.append(sum(b.astype(jnp.int32) for b in beats) < 2)
    return jnp.stack(keep, axis=axis + 1).reshape(shape)


def apply_mask(x: jax.Array, mask: jax.Array) -> jax.Array:
    """``x ⊙ mask``: ``x`` where ``mask`` is true, 0 elsewhere (a dropped NaN or inf gives 0).

    Args:
      x: any array.
      mask: a bool array of ``x``'s shape.

    Returns:
      An array of ``x``'s shape and dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from fst_jax._masks import apply_mask
      >>> print(apply_mask(jnp.array([jnp.nan, 2.0]), jnp.array([False, True])))
      [0. 2.]
    """
    return jnp.where(mask, x, jnp.zeros_like(x))


def transposable_mask_2to4(x: jax.Array, axes: tuple[int, int] = (-2, -1)) -> jax.Array:
    """A mask that is 2:4 along both ``axes``: the best of the 90 transposable patterns per tile.

    ``axes = (k_axis, o_axis)``. The ``(k, o)`` plane is cut into 4×4 tiles aligned at 0; every
    other axis is an independent batch. Each tile takes, of the 90 patterns in
    :data:`TRANSPOSABLE_PATTERNS` (two kept entries per row and per column), the one with the
    largest sum of kept magnitudes ``Σ|w|``; ties go to the first pattern in that table's order.
    NaN counts as ``+inf``, and sums follow IEEE arithmetic: every pattern that keeps a NaN or inf
    scores ``+inf``, so the first of those wins whatever the tile's other entries. Scores are
    summed in at least float32, as plain sums of magnitudes (never ``0 · inf``).

    Args:
      x: a floating (or integer) array.
      axes: ``(k_axis, o_axis)``, two distinct axes; negative values count from the end.

    Returns:
      A bool array of ``x``'s shape, ``True`` where the entry is kept.

    Raises:
      ValueError: if the axes are out of range or equal, or ``x.shape`` along either is not a
        multiple of 4.

    Example:
      >>> import jax.numpy as jnp
      >>> from fst_jax._masks import transposable_mask_2to4
      >>> w = jnp.arange(16.0).reshape(4, 4)
      >>> print(transposable_mask_2to4(w).astype(int))
      [[1 1 0 0]
       [1 1 0 0]
       [0 0 1 1]
       [0 0 1 1]]
    """
    x = jnp.asarray(x)
    if len(axes) != 2:
        raise ValueError(f"transposable_mask_2to4: axes={axes!r} must be a pair (k_axis, o_axis)")
    k_axis = _normalize_axis("transposable_mask_2to4", "axes[0]", axes[0], x.ndim)
    o_axis = _normalize_axis("transposable_mask_2to4", "axes[1]", axes[1], x.ndim)
    if k_axis == o_axis:
        raise ValueError(f"transposable_mask_2to4: axes={tuple(axes)} must be two distinct axes")
    if x.shape[k_axis] % 4 or x.shape[o_axis] % 4:
        raise ValueError(
            f"transposable_mask_2to4: argument x has shape {x.shape}; its lengths along axes "
            f"{tuple(axes)} must both be multiples of 4"
        )
    return _transposable_mask_2to4(x, k_axis, o_axis)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _transposable_mask_2to4(x: jax.Array, k_axis: int, o_axis: int) -> jax.Array:
    mag = jnp.moveaxis(_magnitude(x), (k_axis, o_axis), (-2, -1))
    mag = mag.astype(jnp.promote_types(mag.dtype, jnp.float32))
    *batch, k, o = mag.shape
    tiles = jnp.swapaxes(mag.reshape(*batch, k // 4, 4, o // 4, 4), -3, -2)  # [..., kt, ot, r, c]
    # Σ|w| of each row's 6 column pairs, then of each pattern's 4 row pairs: [..., kt, ot, 90].
    pair_sum = jnp.stack([tiles[..., a] + tiles[..., b] for a, b in _PAIRS], -1)  # [..., r, 6]
    row_pairs = np.array(_PATTERN_ROWS)  # (90, 4)
    scores = sum(pair_sum[..., r, row_pairs[:, r]] for r in range(4))
    best = jnp.argmax(scores, axis=-1)  # the first maximum: ties go to the earlier pattern
    chosen = jnp.take(jnp.asarray(TRANSPOSABLE_PATTERNS), best, axis=0)  # [..., kt, ot, r, c]
    mask = jnp.swapaxes(chosen, -3, -2).reshape(*batch, k, o)
    return jnp.moveaxis(mask, (-2, -1), (k_axis, o_axis))


_TOKEN_PATTERNS = ("checkerboard", "even", "odd")


def token_mask(
    shape: Sequence[int], *, token_axis: int, contracting_axes: Sequence[int], pattern: str
) -> jax.Array:
    """The fixed 2:4 activation mask along the token axis, for an activation of ``shape``.

    With ``t`` the index along ``token_axis`` and ``k`` the row-major flat index over
    ``contracting_axes`` taken in the order given (``contracting_axes=(3, 1)`` means
    ``k = i3 * shape[1] + i1``; no contracting axes means ``k = 0``):

    * ``"checkerboard"`` keeps ``(t + k) % 2 == 0``;
    * ``"even"`` keeps ``t % 2 == 0``;
    * ``"odd"`` keeps ``t % 2 == 1``.

    Each keeps exactly 2 of every 4 consecutive tokens. Only the parity of ``t + k`` matters, so
    the int32 index arithmetic stays exact even if ``k`` wraps around.

    Args:
      shape: the activation's shape.
      token_axis: the token axis ``t``; negative values count from the end.
      contracting_axes: the activation's contracting axes, outermost first; they must not include
        ``token_axis`` or repeat.
      pattern: ``"checkerboard"``, ``"even"`` or ``"odd"``.

    Returns:
      A bool array of ``shape``, ``True`` where the activation entry is kept.

    Raises:
      ValueError: for an unknown pattern, an axis out of range, a repeated contracting axis, or
        ``token_axis`` among ``contracting_axes``.

    Example:
      >>> from fst_jax._masks import token_mask
      >>> m = token_mask((4, 3), token_axis=0, contracting_axes=(1,), pattern="checkerboard")
      >>> print(m.astype(int))
      [[1 0 1]
       [0 1 0]
       [1 0 1]
       [0 1 0]]
    """
    if not isinstance(pattern, str) or pattern not in _TOKEN_PATTERNS:
        raise ValueError(
            f"token_mask: pattern={pattern!r} is not valid; allowed values: "
            + ", ".join(repr(p) for p in _TOKEN_PATTERNS)
        )
    shape = tuple(operator.index(d) for d in shape)
    ndim = len(shape)
    t_axis = _normalize_axis("token_mask", "token_axis", token_axis, ndim)
    k_axes = [_normalize_axis("token_mask", "contracting_axes", a, ndim) for a in contracting_axes]
    if len(set(k_axes)) != len(k_axes):
        raise ValueError(f"token_mask: contracting_axes={tuple(contracting_axes)} repeats an axis")
    if t_axis in k_axes:
        raise ValueError(
            f"token_mask: token_axis={token_axis} is also in contracting_axes="
            f"{tuple(contracting_axes)}"
        )
    return _token_mask(shape, t_axis, tuple(k_axes), pattern)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _token_mask(
    shape: tuple[int, ...], t_axis: int, k_axes: tuple[int, ...], pattern: str
) -> jax.Array:
    t = lax.broadcasted_iota(jnp.int32, shape, t_axis)
    if pattern == "even":
        return t % 2 == 0
    if pattern == "odd":
        return t % 2 == 1
    k = jnp.zeros(shape, jnp.int32)
    for a in k_axes:
        k = k * shape[a] + lax.broadcasted_iota(jnp.int32, shape, a)
    return (t + k) % 2 == 0


def gradient_shift(dy: jax.Array, axis: int, scale: float) -> jax.Array:
    """The information-restoration shift: ``dY'[t] = dY[t] + scale · dY[t-1]``, wrapping around.

    Computed as ``dy + scale * jnp.roll(dy, 1, axis)`` in float32 (or wider, if ``dy`` is wider)
    and cast back to ``dy``'s dtype. A ``scale`` equal to 0 (a Python or NumPy number) returns ``dy``
    itself, bit for bit (no ``0 · inf``).

    Args:
      dy: the output gradient.
      axis: the token axis; negative values count from the end.
      scale: the restore scale ``s``.

    Returns:
      An array of ``dy``'s shape and dtype.

    Raises:
      ValueError: if ``axis`` is out of range.

    Example:
      >>> import jax.numpy as jnp
      >>> from fst_jax._masks import gradient_shift
      >>> print(gradient_shift(jnp.array([1.0, 2.0, 4.0]), axis=0, scale=0.5))
      [3.  2.5 5. ]
    """
    dy = jnp.asarray(dy)
    axis = _normalize_axis("gradient_shift", "axis", axis, dy.ndim)
    if isinstance(scale, (int, float, np.number)) and scale == 0:
        return dy
    return _gradient_shift(dy, axis, scale)


@functools.partial(jax.jit, static_argnums=1)
def _gradient_shift(dy: jax.Array, axis: int, scale: float | jax.Array) -> jax.Array:
    wide = dy.astype(jnp.promote_types(dy.dtype, jnp.float32))
    return (wide + scale * jnp.roll(wide, 1, axis)).astype(dy.dtype)
