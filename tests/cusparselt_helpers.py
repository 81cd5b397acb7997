"""What the cuSPARSELt test files share: operands, the CPU emulation of the custom calls, and the
custom-call targets of lowered text."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fst_jax._masks import mask_2to4
from fst_jax.cusparselt import _ops

#: (sparse operand, transpose_lhs, transpose_rhs): every layout the ops accept.
LAYOUTS = [(s, tl, tr) for s in ("lhs", "rhs") for tl in (False, True) for tr in (False, True)]


def operands(sparse: str, tl: bool, tr: bool, m: int, k: int, n: int, dtype: Any = jnp.bfloat16,
             seed: int = 0, batch: tuple[int, ...] = ()) -> tuple[jax.Array, jax.Array]:
    """(lhs, rhs) for ``matmul(lhs, rhs, sparse=..., transpose_lhs=tl, transpose_rhs=tr)``, the
    ``sparse`` one pruned 2:4 along k."""
    rng = np.random.default_rng(seed)
    lhs = rng.standard_normal((*batch, *((k, m) if tl else (m, k)))).astype(np.float32)
    rhs = rng.standard_normal((*batch, *((n, k) if tr else (k, n)))).astype(np.float32)
    if sparse == "lhs":
        lhs = lhs * np.asarray(mask_2to4(lhs, axis=-2 if tl else -1))
    else:
        rhs = rhs * np.asarray(mask_2to4(rhs, axis=-1 if tr else -2))
    return jnp.asarray(lhs, dtype), jnp.asarray(rhs, dtype)


@contextlib.contextmanager
def emulated() -> Iterator[None]:
    """On a CPU device, with the jnp emulation of the custom calls (also on a GPU machine)."""
    with jax.default_device(jax.devices("cpu")[0]), _ops._emulate_off_cuda():
        yield


def custom_calls(text: str) -> list[str]:
    """The targets of the ``stablehlo.custom_call`` s in lowered text, in order."""
    return re.findall(r"stablehlo\.custom_call @([\w$.]+)", text)
