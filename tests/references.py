"""Reference masks for the tests, written in numpy from DESIGN.md §1 (independent of fst_jax)."""

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
