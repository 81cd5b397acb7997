"""Masks of the FST recipe, in pure ``jax.numpy``: all jit-able, none data-dependent in shape.

* :func:`mask_2to4`: magnitude 2:4 along one axis (keep the 2 largest of every 4).
* :func:`apply_mask`: ``x ⊙ mask`` as ``jnp.where(mask, x, 0)``, so a dropped NaN never spreads.
* :func:`transposable_mask_2to4`: one mask that is 2:4 along two axes (best of the 90 4×4 patterns
  per tile, listed in :data:`TRANSPOSABLE_PATTERNS`).
* :func:`token_mask`: the fixed activation masks (``"checkerboard"``, ``"even"``, ``"odd"``).
* :func:`gradient_shift`: the information-restoration shift ``dY + s·roll(dY, 1)``.
* :func:`mvue_2to4`: the minimum-variance unbiased 2:4 sampling of a gradient (random, keyed).
* :func:`rotating_token_mask` and :func:`draw_pattern`: the authors' rotating activation masks
  (one of a set of half-token patterns, :data:`TOKEN_PATTERNS`, drawn per layer per step from a
  key or step counter the caller passes); :func:`pattern_phase` is their common form.

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
import math
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "AUTHORS_PATTERNS",
    "TOKEN_PATTERNS",
    "TRANSPOSABLE_PATTERNS",
    "apply_mask",
    "draw_pattern",
    "gradient_shift",
    "mask_2to4",
    "mvue_2to4",
    "pattern_phase",
    "rotating_token_mask",
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
        return lax.select(jnp.isnan(mag), jnp.full_like(mag, jnp.inf), mag)
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
    x, mask = jnp.asarray(x), jnp.asarray(mask)
    if mask.dtype == jnp.bool_ and mask.shape == x.shape:
        # The select_n that jnp.where binds, without its jit wrapper (one call fewer to lower and
        # for XLA to inline per use).
        return lax.select(mask, x, jnp.zeros_like(x))
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


def weight_mask(w: jax.Array, k_axis: int, o_axis: int | None, transposable: bool) -> jax.Array:
    """The forward mask of a weight as its matmul sees it: 2:4 along ``k_axis``, or along both
    ``k_axis`` and ``o_axis`` when ``transposable`` (the one mask choice that the sparse matmul,
    SR-STE and the export share)."""
    if transposable:
        return transposable_mask_2to4(w, axes=(k_axis, o_axis))
    return mask_2to4(w, axis=k_axis)


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


# ------------------------------------------------------------------------------------------------
# Rotating activation patterns: the authors' per-layer, per-step draw of a half-token mask.

TOKEN_PATTERNS: tuple[str, ...] = (
    "alternating",
    "odd",
    "anti_checkerboard",
    "checkerboard",
    "even",
    "anti_alternating",
)
"""The half-token patterns :func:`rotating_token_mask` knows (see :func:`pattern_phase`)."""

AUTHORS_PATTERNS: tuple[str, ...] = TOKEN_PATTERNS[:4]
"""The four patterns the authors' code draws from, in its order (``rand_flag`` ≤ 1/4, ≤ 2/4, ≤ 3/4,
> 3/4): ``("alternating", "odd", "anti_checkerboard", "checkerboard")``."""

#: The fixed seed a step counter is folded into by :func:`draw_pattern` ("FST!" in ASCII).
def mvue_2to4(x: jax.Array, key: jax.Array, axis: int = -1) -> jax.Array:
    """The minimum-variance unbiased 2:4 sampling of ``x``: in every 4 consecutive entries along
    ``axis``, 2 are kept, rescaled so that the expectation over ``key`` is ``x`` itself.

    Entry ``i`` of a group is kept with probability ``p_i = min(1, c·|x_i|)``, ``c`` such that the
    ``p_i`` sum to 2 (the inclusion probabilities that minimise the variance of an unbiased 2-of-4
    sample), and a kept entry becomes ``x_i / p_i``; exactly 2 entries are chosen by systematic
    sampling (one uniform ``u`` per group; the entries whose intervals of the cumulative ``p``
    hold ``u`` and ``u + 1``). An all-zero group stays zero. Computed in float32 (or wider) and
    returned in ``x`` 's dtype. This is the estimator that 2:4 pre-training work applies to the
    gradient of the grad-weight product (Chmiel et al., ICLR 2023; Hu et al., ICML 2024).

    Args:
      x: a floating array.
      key: a PRNG key (``jax.random.key``); the same key gives the same sample.
      axis: the axis along which groups of 4 are formed; ``x.shape[axis] % 4 == 0``.

    Returns:
      An array of ``x`` 's shape and dtype with exactly 2 nonzeros (at most) in every group of 4.

    Raises:
      ValueError: if ``axis`` is out of range or ``x.shape[axis]`` is not a multiple of 4.
      TypeError: if ``x`` is not floating.

    Example:
      >>> import jax, jax.numpy as jnp, fst_jax
      >>> x = jnp.array([4.0, -2.0, 1.0, 1.0])
      >>> y = fst_jax.mvue_2to4(x, jax.random.key(0))
      >>> int((y != 0).sum())
      2
      >>> keys = jax.random.split(jax.random.key(1), 20000)
      >>> mean = jax.vmap(lambda k: fst_jax.mvue_2to4(x, k))(keys).mean(0)
      >>> bool(jnp.allclose(mean, x, atol=0.1))  # unbiased
      True
    """
    x = jnp.asarray(x)
    axis = _normalize_axis("mvue_2to4", "axis", axis, x.ndim)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"mvue_2to4: argument x must be a floating array, got dtype {x.dtype}")
    if x.shape[axis] % 4:
        raise ValueError(f"mvue_2to4: argument x has shape {x.shape}; its length {x.shape[axis]} along "
                         f"axis {axis} must be a multiple of 4")
    return _mvue_2to4(x, key, axis)


@functools.partial(jax.jit, static_argnums=2)
def _mvue_2to4(x: jax.Array, key: jax.Array, axis: int) -> jax.Array:
    shape = x.shape
    grouped = shape[:axis] + (shape[axis] // 4, 4) + shape[axis + 1:]
    g = axis + 1  # the axis within a group
    xg = x.astype(jnp.promote_types(x.dtype, jnp.float32)).reshape(grouped)
    mag = jnp.abs(xg)
    total = jnp.sum(mag, g, keepdims=True)
    top = jnp.max(mag, g, keepdims=True)
    # p = 2|x|/total, unless one entry would exceed 1 (2·top > total): it is kept surely, and the
    # other three share one draw, p = |x|/(total - top). At most one entry can exceed: top > rest.
    capped = 2 * top > total
    rest = total - top
    p_capped = jnp.where(mag == top, 1.0, mag / jnp.where(rest > 0, rest, 1.0))
    p = jnp.where(capped, p_capped, 2 * mag / jnp.where(total > 0, total, 1.0))
    p = jnp.where(total > 0, p, 0.5)
    # Systematic sampling: the boundaries b_0 <= b_1 <= b_2 of the cumulative p (b_3 = 2); u in
    # [0, 1) picks the entry whose interval holds u, u + 1 the one whose interval holds it. The
    # two are forced apart (one float rounding away at most), so exactly 2 are kept.
    bounds = jnp.cumsum(p, axis=g)
    u = jax.random.uniform(key, top.shape, p.dtype)
    below = lambda v: sum((lax.index_in_dim(bounds, j, g) <= v).astype(jnp.int32) for j in range(3))
    first = jnp.minimum(below(u), 2)
    second = jnp.maximum(below(u + 1), first + 1)
    idx = lax.broadcasted_iota(jnp.int32, grouped, g)
    keep = (idx == first) | (idx == second)
    out = jnp.where(keep & (p > 0), xg / jnp.where(p > 0, p, 1.0), 0.0)
    return out.reshape(shape).astype(x.dtype)


STEP_SEED = 0x46535421


def _pattern_bits(pattern: str, num_tokens: int) -> tuple[int, int, int]:
    """``(a, b, d)`` with ``phase = a ^ (b & k) ^ (d & g)`` (see :func:`pattern_phase`)."""
    c = (num_tokens // 4) % 2  # the authors' view(-1, 4) runs on over rows: their row k shifts g
    return {
        "alternating": (1, c, 1),
        "anti_alternating": (0, c, 1),
        "odd": (1, 0, 0),
        "even": (0, 0, 0),
        "checkerboard": (0, 1, 0),
        "anti_checkerboard": (1, 1, 0),
    }[pattern]


def _check_patterns(fn: str, patterns: Sequence[str]) -> tuple[str, ...]:
    if isinstance(patterns, str):
        raise ValueError(f"{fn}: patterns={patterns!r} must be a sequence of pattern names")
    patterns = tuple(patterns)
    if not patterns:
        raise ValueError(f"{fn}: patterns is empty")
    for name in patterns:
        if name not in TOKEN_PATTERNS:
            raise ValueError(
                f"{fn}: pattern {name!r} is not valid; allowed values: "
                + ", ".join(repr(p) for p in TOKEN_PATTERNS)
            )
    return patterns


def pattern_phase(patterns: Sequence[str], num_tokens: int) -> np.ndarray:
    """Every half-token pattern as one table: ``phase[c, k % 2, (p // 4) % 2]``.

    All the patterns have one form. With ``p`` the flat token index (row-major over the
    activation's free dims, the token axis innermost: ``p = b·T + t`` for ``[B, T, K]``), ``k`` the
    flat contraction index and ``N`` the number of tokens (the product of the free dims), pattern
    ``c`` keeps entry ``(p, k)`` when ``p % 2 == phase[c, k % 2, (p // 4) % 2]``. So in every pair of
    tokens ``(2j, 2j+1)`` exactly one is kept, for every ``k``: each pattern keeps exactly 2 of every
    4 consecutive tokens (an interleaved 1:2 pattern), whatever ``N``; a last, incomplete group
    keeps what the formula says.

    The patterns, with ``g = (p // 4) % 2`` and ``c_N = (N // 4) % 2``:

    * ``"alternating"`` keeps ``(p + g + c_N·k) % 2 == 1``: groups of 4 alternate ``{1,3}``,
      ``{0,2}``, ``{1,3}``, ... (``0101 1010 0101 ...``), the phase flipping from row ``k`` to
      ``k+1`` when ``N/4`` is odd. This is the authors' pattern 1.
    * ``"odd"`` keeps ``p % 2 == 1``: the authors' pattern 2.
    * ``"anti_checkerboard"`` keeps ``(p + k) % 2 == 1``: the authors' pattern 3.
    * ``"checkerboard"`` keeps ``(p + k) % 2 == 0``: the authors' pattern 4.
    * ``"even"`` keeps ``p % 2 == 0`` and ``"anti_alternating"`` the complement of
      ``"alternating"``: not the authors', for sets whose patterns complement each other.

    ``"checkerboard"``, ``"even"`` and ``"odd"`` are :func:`token_mask`'s fixed patterns (equal to
    them when the token count ``T`` is even, where ``p`` and ``t`` have the same parity).

    Source: the authors' ``sparse_conv_backward_parameters_cuda`` in
    ``Sparse_Conv_Extension_CUDA/src/cuda/sparse_conv_cuda.cpp``, lines 356–377 of
    github.com/WeixiangXu/FST at commit ``8fd0879``. It draws ``rand_flag = torch::rand(1)`` once
    per im2col chunk (one layer, one step) and zeroes entries of ``columns``, the im2col matrix of
    shape ``[K, L]`` (row ``k`` = the flat (Cin, kh, kw) index, column ``p`` = the output position
    ``(b·Hout + h)·Wout + w`` within the chunk, ``L`` tokens):

    1. ``rand_flag <= 1/4``: ``columns.view({-1,4})``, then rows ``0::2`` of that view zero
       columns ``0::2`` and rows ``1::2`` zero columns ``1::2``. Group ``(k·L + p) // 4`` keeps
       ``{1,3}`` when even, ``{0,2}`` when odd: ``"alternating"`` (for ``L % 4 == 0``; with
       ``L % 4 != 0`` their groups straddle rows and the mask is not 2:4 along ``p``, and the
       formula above is the extension that stays 2:4).
    2. ``rand_flag <= 2/4``: ``columns[:, 0::2] = 0``: ``"odd"``.
    3. ``rand_flag <= 3/4``: ``columns[0::2, 0::2] = 0`` and ``columns[1::2, 1::2] = 0``:
       ``"anti_checkerboard"``.
    4. otherwise: ``columns[1::2, 0::2] = 0`` and ``columns[0::2, 1::2] = 0``: ``"checkerboard"``.

    Args:
      patterns: pattern names from :data:`TOKEN_PATTERNS`.
      num_tokens: ``N``, the number of tokens of one grad-weight problem (only ``(N // 4) % 2``
        matters, for ``"alternating"`` and ``"anti_alternating"``).

    Returns:
      An int32 NumPy array of shape ``(len(patterns), 2, 2)`` with entries 0 or 1.

    Raises:
      ValueError: for an unknown pattern name or an empty ``patterns``.

    Example:
      >>> from fst_jax._masks import AUTHORS_PATTERNS, pattern_phase
      >>> pattern_phase(AUTHORS_PATTERNS, num_tokens=8)[:, 0, :].tolist()  # rows k even
      [[1, 0], [1, 1], [1, 1], [0, 0]]
    """
    patterns = _check_patterns("pattern_phase", patterns)
    table = np.zeros((len(patterns), 2, 2), np.int32)
    for c, name in enumerate(patterns):
        a, b, d = _pattern_bits(name, operator.index(num_tokens))
        for k in (0, 1):
            for g in (0, 1):
                table[c, k, g] = a ^ (b & k) ^ (d & g)
    return table


def _free_axes(fn: str, ndim: int, token_axis: int, contracting_axes: Sequence[int],
               batch_axes: Sequence[int]) -> tuple[int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(t_axis, k_axes, batch axes, free axes with t innermost), all normalised and checked."""
    t_axis = _normalize_axis(fn, "token_axis", token_axis, ndim)
    k_axes = tuple(_normalize_axis(fn, "contracting_axes", a, ndim) for a in contracting_axes)
    b_axes = tuple(_normalize_axis(fn, "batch_axes", a, ndim) for a in batch_axes)
    named = k_axes + b_axes
    if len(set(named)) != len(named):
        raise ValueError(
            f"{fn}: contracting_axes={tuple(contracting_axes)} and batch_axes={tuple(batch_axes)} "
            "repeat an axis"
        )
    if t_axis in named:
        raise ValueError(
            f"{fn}: token_axis={token_axis} is also a contracting or batch axis "
            f"(contracting_axes={tuple(contracting_axes)}, batch_axes={tuple(batch_axes)})"
        )
    free = tuple(a for a in range(ndim) if a not in named and a != t_axis) + (t_axis,)
    return t_axis, k_axes, b_axes, free


def rotating_token_mask(
    shape: Sequence[int],
    *,
    token_axis: int,
    contracting_axes: Sequence[int],
    choice: int | jax.Array,
    patterns: Sequence[str] = AUTHORS_PATTERNS,
    batch_axes: Sequence[int] = (),
) -> jax.Array:
    """The activation mask of pattern ``patterns[choice]``, with ``choice`` a (traced) integer.

    ``p`` is the row-major flat index over the activation's free dims (every axis that is neither
    contracting nor batch), taken in axis order with ``token_axis`` moved innermost (it is the
    innermost free axis in fst_jax's layouts, so ``p = b·T + t`` for ``[B, T, K]``); ``k`` is the
    row-major flat index over ``contracting_axes`` in the order given (``k = 0`` if none); ``N`` is
    the number of tokens (the product of the free dims). Batch axes are independent problems: each
    gets the same mask. Pattern ``c`` keeps ``p % 2 == phase[c, k % 2, (p // 4) % 2]`` with
    ``phase = pattern_phase(patterns, N)``: see :func:`pattern_phase` for the patterns, their
    formulas and the authors' code they come from. Every pattern keeps exactly 2 of every 4
    consecutive ``p`` for every ``k`` (and one of every pair ``(2j, 2j+1)``), for any token count.

    ``choice`` may be a traced int32 scalar (from :func:`draw_pattern`): one compiled function
    serves every draw. A Python or NumPy ``choice`` out of range is an error; a JAX array (traced or
    not) out of range is clamped to ``[0, len(patterns) - 1]``.

    Args:
      shape: the activation's shape.
      token_axis: the token axis ``t``; negative values count from the end.
      contracting_axes: the activation's contracting axes, outermost first.
      choice: the index of the pattern in ``patterns``: a Python int or an int32 scalar array.
      patterns: pattern names from :data:`TOKEN_PATTERNS`; default the authors' four,
        :data:`AUTHORS_PATTERNS`.
      batch_axes: the activation's ``dot_general`` batch axes (independent problems).

    Returns:
      A bool array of ``shape``, ``True`` where the activation entry is kept.

    Raises:
      ValueError: for an unknown or empty pattern set, an axis out of range or repeated,
        ``token_axis`` among the contracting or batch axes, or a Python or NumPy ``choice`` out
        of range.

    Example:
      >>> import jax.numpy as jnp
      >>> from fst_jax._masks import rotating_token_mask
      >>> for c in range(4):  # the authors' four patterns on 8 tokens x 2 contraction rows (k, p)
      ...     m = rotating_token_mask((8, 2), token_axis=0, contracting_axes=(1,), choice=c)
      ...     print(m.T.astype(int))
      [[0 1 0 1 1 0 1 0]
       [0 1 0 1 1 0 1 0]]
      [[0 1 0 1 0 1 0 1]
       [0 1 0 1 0 1 0 1]]
      [[0 1 0 1 0 1 0 1]
       [1 0 1 0 1 0 1 0]]
      [[1 0 1 0 1 0 1 0]
       [0 1 0 1 0 1 0 1]]
      >>> m = rotating_token_mask((2, 3, 4), token_axis=1, contracting_axes=(2,),
      ...                         choice=jnp.int32(1))  # "odd" over p = b·3 + t: odd T is fine
      >>> print(m[:, :, 0].astype(int))
      [[0 1 0]
       [1 0 1]]
    """
    patterns = _check_patterns("rotating_token_mask", patterns)
    shape = tuple(operator.index(d) for d in shape)
    _, k_axes, _, free = _free_axes("rotating_token_mask", len(shape), token_axis,
                                    contracting_axes, batch_axes)
    choice = _check_choice("rotating_token_mask", choice, len(patterns))
    return _rotating_token_mask(shape, free, k_axes, patterns, jnp.asarray(choice, jnp.int32))


def _check_choice(fn: str, choice: int | jax.Array, num_patterns: int) -> int | jax.Array:
    """A pattern index validated for a set of ``num_patterns``, or a ``ValueError`` naming ``fn``.

    A Python or NumPy integer (or 0-d NumPy array) is static: it must be in range and comes back
    as a Python ``int``. Anything else is a JAX value (traced or not): it must be a scalar and comes
    back as an int32 scalar array (out-of-range values are clamped where it is used).

    Example:
      >>> from fst_jax._masks import _check_choice
      >>> _check_choice("f", 2, num_patterns=4)
      2
      >>> _check_choice("f", 4, num_patterns=4)
      Traceback (most recent call last):
        ...
      ValueError: f: choice=4 is out of range for 4 patterns
    """
    static = isinstance(choice, (int, np.integer)) or (isinstance(choice, np.ndarray) and choice.ndim == 0)
    if static and not isinstance(choice, bool):
        if not 0 <= int(choice) < num_patterns:
            raise ValueError(f"{fn}: choice={int(choice)} is out of range for {num_patterns} patterns")
        return int(choice)
    choice = jnp.asarray(choice, jnp.int32)
    if choice.shape != ():
        raise ValueError(f"{fn}: choice must be a scalar, got shape {choice.shape}")
    return choice


def _phase_of(table: np.ndarray, choice: jax.Array, k_odd: jax.Array, g_odd: jax.Array) -> jax.Array:
    """``table[choice, k_odd, g_odd]`` as selects (fuses into the caller's loop, no gather)."""
    row = jnp.asarray(table)[jnp.clip(choice, 0, table.shape[0] - 1)]  # [2, 2], traced
    return jnp.where(k_odd, jnp.where(g_odd, row[1, 1], row[1, 0]),
                     jnp.where(g_odd, row[0, 1], row[0, 0]))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _rotating_token_mask(shape: tuple[int, ...], free: tuple[int, ...], k_axes: tuple[int, ...],
                         patterns: tuple[str, ...], choice: jax.Array) -> jax.Array:
    num_tokens = math.prod(shape[a] for a in free)
    # Only p mod 8 and k mod 2 matter: keep them reduced so int32 never wraps.
    p8 = jnp.zeros(shape, jnp.int32)
    for a in free:
        p8 = (p8 * (shape[a] % 8) + lax.broadcasted_iota(jnp.int32, shape, a)) % 8
    k2 = jnp.zeros(shape, jnp.int32)
    for a in k_axes:
        k2 = (k2 * (shape[a] % 2) + lax.broadcasted_iota(jnp.int32, shape, a)) % 2
    phase = _phase_of(pattern_phase(patterns, num_tokens), choice, k2 == 1, (p8 // 4) == 1)
    return (p8 % 2) == phase


def _as_key(key_or_step: jax.Array | int) -> jax.Array:
    """A typed PRNG key from a typed key, a raw ``uint32[2]`` key, or an integer step counter."""
    x = key_or_step
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        if x.shape != ():
            raise ValueError(f"draw_pattern: expected one PRNG key, got an array of shape {x.shape}")
        return x
    x = jnp.asarray(x)
    if x.dtype == jnp.uint32 and x.shape == (2,):
        return jax.random.wrap_key_data(x)
    if jnp.issubdtype(x.dtype, jnp.integer) and x.shape == ():
        return jax.random.fold_in(jax.random.key(STEP_SEED), x)
    raise TypeError(
        "draw_pattern: key_or_step must be a PRNG key (jax.random.key or a raw uint32[2] key) or "
        f"an integer step counter (a scalar); got dtype {x.dtype} and shape {x.shape}"
    )


def draw_pattern(key_or_step: jax.Array | int, layer_index: int | jax.Array,
                 num_patterns: int) -> jax.Array:
    """Draws a pattern index for one layer at one step: a traced int32 in ``[0, num_patterns)``.

    Deterministic in its inputs: the same key (or step) and layer give the same draw, so the same
    training step gives the same gradient. The key is ``key_or_step`` itself when it is a PRNG key
    (a typed ``jax.random.key`` or a raw ``uint32[2]`` key), or ``fold_in(key(STEP_SEED), step)``
    for an integer step counter (a Python int or an integer scalar, traced or not). Each layer
    folds its index in, ``fold_in(key, layer_index)``, so layers draw independently, and the draw
    is uniform: ``randint(key, (), 0, num_patterns)``. Works under ``jit`` and ``vmap``.

    Args:
      key_or_step: a PRNG key, or an integer step counter.
      layer_index: the layer's index (an int or an integer scalar), distinct per layer.
      num_patterns: the size of the pattern set (static, ≥ 1).

    Returns:
      An int32 scalar array, the index of the drawn pattern.

    Raises:
      TypeError: if ``key_or_step`` is neither a key nor an integer scalar.
      ValueError: if ``num_patterns < 1`` or a typed key array is not a single key.

    Example:
      >>> import jax
      >>> from fst_jax._masks import draw_pattern
      >>> a = [int(draw_pattern(7, layer, 4)) for layer in range(6)]  # step 7, six layers
      >>> a == [int(draw_pattern(7, layer, 4)) for layer in range(6)]  # deterministic
      True
      >>> draw = jax.jit(draw_pattern, static_argnums=2)(jax.random.key(0), 3, 4)
      >>> draw.dtype, draw.shape, 0 <= int(draw) < 4
      (dtype('int32'), (), True)
    """
    num_patterns = operator.index(num_patterns)
    if num_patterns < 1:
        raise ValueError(f"draw_pattern: num_patterns={num_patterns} must be at least 1")
    key = jax.random.fold_in(_as_key(key_or_step), layer_index)
    return jax.random.randint(key, (), 0, num_patterns, dtype=jnp.int32)
