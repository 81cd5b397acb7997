"""Reference masks for the tests, written in numpy from DESIGN.md §1 (independent of fst_jax)."""

import itertools
from typing import Any

import numpy as np


def magnitude(x: Any) -> np.ndarray:
    """|x| in float64, NaN counted as +inf."""
    mag = np.abs(np.asarray(x, dtype=np.float64))
    return np.where(np.isnan(mag), np.inf, mag)


def mask_2to4(x: Any, axis: int) -> np.ndarray:
    """Keep the 2 largest-magnitude entries of every 4 consecutive ones along ``axis``.

    NaN counts as inf; ties keep the lower index (a stable sort of ``-|x|`` within each group).
    """
    mag = np.moveaxis(magnitude(x), axis, -1)
    n = mag.shape[-1]
    assert n % 4 == 0, n
    groups = mag.reshape(mag.shape[:-1] + (n // 4, 4))
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :2], True, axis=-1)
    return np.moveaxis(keep.reshape(mag.shape), -1, axis)


def _transposable_patterns() -> np.ndarray:
    """The 90 4×4 0/1 patterns with two ones per row and per column, in the spec's order."""
    pairs = list(itertools.combinations(range(4), 2))
    patterns = []
    for rows in itertools.product(pairs, repeat=4):  # row 0 most significant
        p = np.zeros((4, 4), dtype=bool)
        for r, cols in enumerate(rows):
            p[r, list(cols)] = True
        if (p.sum(axis=0) == 2).all():
            patterns.append(p)
    return np.stack(patterns)


#: The 90 transposable 4×4 patterns, in the spec's order (ties go to the first).
PATTERNS = _transposable_patterns()


def transposable_mask(w: Any, k_axis: int, o_axis: int) -> np.ndarray:
    """Per 4×4 tile of (K, O_last): the pattern of max Σ|w|, first one on ties (brute force)."""
    mag = np.moveaxis(magnitude(w), (k_axis, o_axis), (-2, -1))
    lead, (k, o) = mag.shape[:-2], mag.shape[-2:]
    assert k % 4 == 0 and o % 4 == 0, (k, o)
    tiles = mag.reshape(lead + (k // 4, 4, o // 4, 4)).swapaxes(-3, -2)  # (..., K/4, O/4, 4, 4)
    # Σ|w| over each pattern's entries, with where() so that inf·0 never makes a NaN.
    scores = np.where(PATTERNS, tiles[..., None, :, :], 0.0).sum(axis=(-2, -1))  # (..., 90)
    best = PATTERNS[np.argmax(scores, axis=-1)]  # argmax: the first maximum
    mask = best.swapaxes(-3, -2).reshape(lead + (k, o))
    return np.moveaxis(mask, (-2, -1), (k_axis, o_axis))


def fixed_mask(shape: tuple[int, ...], t_axis: int, contract_axes: tuple[int, ...], pattern: str) -> np.ndarray:
    """The fixed activation mask M over an activation of ``shape``."""
    idx = np.indices(shape)
    t = idx[t_axis]
    k = np.zeros(shape, dtype=np.int64)
    for d in contract_axes:  # row-major over the contracting dims, dimension_numbers order
        k = k * shape[d] + idx[d]
    if pattern == "checkerboard":
        return (t + k) % 2 == 0
    if pattern == "even":
        return t % 2 == 0
    if pattern == "odd":
        return t % 2 == 1
    raise ValueError(pattern)


def _subjaxprs(eqn: Any) -> list[Any]:
    out = []
    for v in eqn.params.values():
        for j in v if isinstance(v, tuple) else (v,):
            inner = getattr(j, "jaxpr", j)
            if hasattr(inner, "eqns"):
                out.append(inner)
    return out


def _has_matmul(jaxpr: Any) -> bool:
    return any(e.primitive.name in ("dot_general", "conv_general_dilated") or any(map(_has_matmul, _subjaxprs(e)))
               for e in jaxpr.eqns)


def count_sparse_matmuls(closed: Any) -> int:
    """How many FST sparse matmuls a (closed) jaxpr holds: the ``custom_vjp_call`` equations that
    contain a matmul (the SR-STE identity on the parameters is a custom_vjp without one), counted
    structurally through every sub-jaxpr."""
    jaxpr = getattr(closed, "jaxpr", closed)
    n = 0
    for e in jaxpr.eqns:
        subs = _subjaxprs(e)
        if e.primitive.name.startswith("custom_vjp_call"):
            n += any(map(_has_matmul, subs))
        else:
            n += sum(map(count_sparse_matmuls, subs))
    return n
