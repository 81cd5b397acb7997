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
