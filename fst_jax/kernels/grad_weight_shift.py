"""The compact grad-weight product with the gradient shift fused in (Pallas, Triton lowering).

For ``a: [B, T, K]`` (the activation, ``t`` its token axis) and ``dy: [B, T, O]``:

    dW[k, o] = Σ_{b, t : keep(t, k)} a[b, t, k] · dY'[b, t, o]
    dY'[b, t] = dY[b, t] + scale · dY[b, (t − 1) mod T]      (float32, cast to dy's dtype)

with ``keep`` the fixed token mask of :func:`fst_jax.token_mask`: ``"even"`` keeps ``t % 2 == 0``,
``"odd"`` keeps ``t % 2 == 1``, ``"checkerboard"`` keeps ``(t + k) % 2 == 0``. This is the
masked product ``(M ⊙ A)ᵀ · dY'`` of :mod:`fst_jax._dot`, computed over the kept tokens only (half
the FLOPs), without writing ``dY'`` to memory.

**Kernel.** The wrapper views ``a`` and ``dy`` as ``[B·T, K]`` and ``[B·T, O]`` (row
``r = b·T + t``; ``T`` even, so ``t`` and ``r`` have the same parity). A program owns one
``[block_k, block_o]`` tile of ``dW`` and loops over the kept rows ``r = 2i + p`` in steps of
``block_t``: it loads those rows of ``a`` and of ``dy``, and the rows ``r − 1`` of ``dy``
(``r + T − 1`` when ``t = 0``: the shift wraps within each sequence), forms ``dY'`` in float32,
casts it to ``dy``'s dtype, and accumulates ``a_keptᵀ · dY'`` in float32. ``"even"`` / ``"odd"``:
one phase ``p`` and all ``k``. ``"checkerboard"``: two phases, phase ``p`` contracting the ``k`` of
parity ``p`` only (two ``[block_k/2, block_o]`` accumulators, stored to the even / odd rows of
the tile). Rows past ``B·T`` in the last step are zeroed with ``where`` (NaN-safe).

**Block constraints.** ``block_k``, ``block_o``, ``block_t``: powers of two ``>= 16``
(``block_k >= 32`` for ``"checkerboard"``): the smallest ``tt.dot`` is 16 in every dimension.
``block_k`` and ``block_o`` are clipped to their dimension rounded up to a power of two, and
``K``, ``O`` are zero-padded to whole blocks in the wrapper (no copy when they divide).
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from fst_jax import _masks
from fst_jax.kernels.prune_compress import (
    check_block,
    check_float,
    compiler_params,
    fit_block,
    pad_to,
)

__all__ = ["grad_weight_shift"]

_PATTERNS = ("checkerboard", "even", "odd")


def _shifted_rows(dy_ref, r, cols, *, scale: float, seq_len: int):
    """``dY'`` at rows ``r``: ``dY[r] + scale·dY[r − 1]`` (wrapping within each sequence), formed in
    float32 from two loads of ``dY`` and cast to its dtype."""
    dy = dy_ref[r, cols]
    if scale == 0:
        return dy
    prev = jnp.where(r % seq_len == 0, r + (seq_len - 1), r - 1)
    shifted = dy.astype(jnp.float32) + scale * dy_ref[prev, cols].astype(jnp.float32)
    return shifted.astype(dy.dtype)


def _grad_weight_shift_kernel(a_ref, dy_ref, dw_ref, *, pattern: str, scale: float,
                              seq_len: int, block_t: int, precision):
    """One [block_k, block_o] tile of dW; a_ref / dy_ref hold all B·T rows of the tile's columns."""
    block_k, block_o = dw_ref.shape
    split_k = pattern == "checkerboard"
    k_out = block_k // 2 if split_k else block_k
    kept = a_ref.shape[0] // 2  # kept rows per phase
    step_rows = jnp.arange(block_t, dtype=jnp.int32)[:, None]
    cols_o = jnp.arange(block_o, dtype=jnp.int32)[None, :]
    for p in (0, 1) if split_k else (int(pattern == "odd"),):
        k_idx = jnp.arange(k_out, dtype=jnp.int32)
        k_idx = 2 * k_idx + p if split_k else k_idx  # the columns of a / rows of dW of this phase

        def step(s, acc, p=p, cols_k=k_idx[None, :]):
            i = s * block_t + step_rows
            valid = i < kept
            r = 2 * jnp.minimum(i, kept - 1) + p  # row b·T + t of a kept token; clamped in bounds
            a = jnp.where(valid, a_ref[r, cols_k], 0)
            dy = _shifted_rows(dy_ref, r, cols_o, scale=scale, seq_len=seq_len)
            dy = jnp.where(valid, dy, 0)  # zeroes past-the-end rows, NaN-safe
            return acc + lax.dot_general(a, dy, (((0,), (0,)), ((), ())), precision=precision,
                                         preferred_element_type=jnp.float32)

        acc = lax.fori_loop(0, pl.cdiv(kept, block_t), step,
                            jnp.zeros((k_out, block_o), jnp.float32))
        dw_ref[k_idx[:, None], cols_o] = acc.astype(dw_ref.dtype)


def grad_weight_shift(
    a: jax.Array,
    dy: jax.Array,
    pattern: str,
    scale: float,
    *,
    interpret: bool = False,
    block_k: int = 64,
    block_o: int = 64,
    block_t: int = 32,
    precision: lax.PrecisionLike = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:
    """``dW = (M ⊙ A)ᵀ · dY'`` over the kept tokens, with the gradient shift fused in.

    The formula is in this module's docstring: ``dY'[t] = dY[t] + scale·dY[(t−1) mod T]`` (per
    sequence, in float32, cast to ``dy``'s dtype), ``M`` the fixed token mask ``pattern``, summed
    over ``B`` and ``T`` with float32 accumulation. A 2-D activation ``[N, K]`` (the example axis
    as tokens) is ``a[None]``, ``dy[None]``.

    Args:
      a: the activation ``[B, T, K]``; float32, bfloat16 or float16.
      dy: the output gradient ``[B, T, O]``, ``a``'s dtype.
      pattern: ``"checkerboard"``, ``"even"`` or ``"odd"``.
      scale: the restore scale ``s`` (a Python or NumPy number; 0 skips the shift).
      interpret: run the kernel in the Pallas interpreter (any backend) instead of on a GPU.
      block_k: rows of ``dW`` per program; a power of two ``>= 16`` (``>= 32`` for the
        checkerboard).
      block_o: columns of ``dW`` per program; a power of two ``>= 16``.
      block_t: kept tokens per step of a program's loop; a power of two ``>= 16``.
      precision: the in-kernel ``dot`` precision, as for :func:`jax.lax.dot` (hashable: ``None``,
        a :class:`jax.lax.Precision` or a pair of them). For float32 inputs the Triton lowering
        reads ``None``, ``DEFAULT`` and ``HIGH`` as TF32 and ``HIGHEST`` as IEEE float32.
      num_warps: Triton warps per program.
      num_stages: Triton pipelining stages.

    Returns:
      ``dW [K, O]`` in ``a``'s dtype.

    Raises:
      TypeError: for unsupported or mismatched dtypes, or a ``scale`` that is not a number.
      ValueError: for an unknown pattern, mismatched shapes, an odd ``T``, or invalid blocks.

    Example:
      >>> import jax.numpy as jnp
      >>> from fst_jax.kernels import grad_weight_shift
      >>> a = jnp.ones((1, 4, 2))
      >>> dy = jnp.arange(4.0).reshape(1, 4, 1)
      >>> print(grad_weight_shift(a, dy, "even", 0.5, interpret=True))  # dY' = [1.5, 1, 2.5, 4]
      [[4.]
       [4.]]
    """
    fn = "grad_weight_shift"
    a, dy = jnp.asarray(a), jnp.asarray(dy)
    scale = _check_args(fn, a, dy, pattern, scale)
    min_k = 32 if pattern == "checkerboard" else 16
    block_k = check_block(fn, "block_k", block_k, min_k)
    block_o = check_block(fn, "block_o", block_o, 16)
    block_t = check_block(fn, "block_t", block_t, 16)
    (n_b, t, k), o = a.shape, dy.shape[2]
    if n_b * t == 0 or k == 0 or o == 0:
        return jnp.zeros((k, o), a.dtype)
    return _grad_weight_shift(a, dy, pattern=pattern, scale=scale, interpret=interpret,
                              block_k=block_k, block_o=block_o, block_t=block_t,
                              precision=precision, num_warps=num_warps, num_stages=num_stages)


def _check_args(fn: str, a: jax.Array, dy: jax.Array, pattern: str, scale: float) -> float:
    """Validates the arguments; returns ``scale`` as a Python float."""
    if not isinstance(pattern, str) or pattern not in _PATTERNS:
        raise ValueError(f"{fn}: pattern={pattern!r} is not valid; allowed values: "
                         + ", ".join(repr(p) for p in _PATTERNS))
    if not isinstance(scale, (numbers.Real, np.number)):
        raise TypeError(f"{fn}: scale={scale!r} must be a Python or NumPy number (a static value)")
    check_float(fn, "a", a)
    if dy.dtype != a.dtype:
        raise TypeError(f"{fn}: argument dy has dtype {dy.dtype}; it must match a ({a.dtype})")
    if a.ndim != 3 or dy.ndim != 3 or a.shape[:2] != dy.shape[:2]:
        raise ValueError(f"{fn}: arguments a {a.shape} and dy {dy.shape} must be [B, T, K] and "
                         "[B, T, O] with the same B and T")
    if a.shape[1] % 2:
        raise ValueError(f"{fn}: argument a has shape {a.shape}; the token count T = "
                         f"{a.shape[1]} must be even")
    return float(scale)


@functools.partial(jax.jit, static_argnames=(
    "pattern", "scale", "interpret", "block_k", "block_o", "block_t", "precision", "num_warps",
    "num_stages"))
def _grad_weight_shift(a, dy, *, pattern, scale, interpret, block_k, block_o, block_t, precision,
                       num_warps, num_stages):
    (n_b, t, k), o = a.shape, dy.shape[2]
    bk = fit_block(block_k, k, 32 if pattern == "checkerboard" else 16)
    bo = fit_block(block_o, o, 16)
    a2 = pad_to(a.reshape(n_b * t, k), (1, bk))
    dy2 = pad_to(dy.reshape(n_b * t, o), (1, bo))
    n_rows, (k_p, o_p) = a2.shape[0], (a2.shape[1], dy2.shape[1])
    kernel = functools.partial(_grad_weight_shift_kernel, pattern=pattern, scale=scale,
                               seq_len=t, block_t=block_t, precision=precision)
    dw = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((k_p, o_p), a.dtype),
        grid=(k_p // bk, o_p // bo),
        in_specs=[pl.BlockSpec((n_rows, bk), lambda i, j: (0, i)),
                  pl.BlockSpec((n_rows, bo), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bk, bo), lambda i, j: (i, j)),
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="fst_grad_weight_shift",
    )(a2, dy2)
    return dw[:k, :o]


def _reference(a: jax.Array, dy: jax.Array, pattern: str, scale: float, *,
               precision: lax.PrecisionLike = None) -> jax.Array:
    """:func:`grad_weight_shift` in pure ``jax.numpy``: the masked product of :mod:`fst_jax._dot`."""
    a, dy = jnp.asarray(a), jnp.asarray(dy)
    _check_args("grad_weight_shift", a, dy, pattern, scale)
    mask = _masks.token_mask(a.shape, token_axis=1, contracting_axes=(2,), pattern=pattern)
    a_masked = _masks.apply_mask(a, mask)
    dy_shifted = _masks.gradient_shift(dy, axis=1, scale=scale)
    dw = lax.dot_general(a_masked, dy_shifted, (((0, 1), (0, 1)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)
    return dw.astype(a.dtype)
