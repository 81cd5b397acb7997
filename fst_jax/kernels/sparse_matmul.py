"""``[M, K] @ [K, N]`` with the lhs 2:4-compressed along ``K`` (Pallas, Triton lowering).

The lhs is given as the output of :func:`fst_jax.kernels.prune_compress_2to4` along its last
axis: ``values [M, K/2]`` and ``metadata uint8 [M, ceil(K/8)]`` (layout in
:mod:`fst_jax.kernels.prune_compress`). The kernel reads the compressed tiles -- half the lhs bytes
plus 1/16 of them in metadata -- expands them on chip and multiplies with a dense ``dot``
accumulating in float32. Pallas-Triton lowers ``dot`` only to dense ``tt.dot``, so on an H100 this
saves lhs memory traffic, not FLOPs; the 2:4 sparse tensor cores need cuSPARSELt or CUTLASS.

**Kernel.** A program computes one ``[block_m, block_n]`` output tile and loops over ``K`` in
steps of ``block_k``. For a step it loads, for the ``block_k / 4`` groups, the first and second
kept values (strided loads of ``values``) and the metadata nibbles, and builds the 4 dense
slices ``A[:, 4g + p]`` (``p = 0..3``) with ``where`` selects; it multiplies each with the
matching rows ``B[4g + p, :]`` (strided loads) -- four dots with a contraction of
``block_k / 4`` that together are the dense ``[block_m, block_k] @ [block_k, block_n]`` product,
summed in another order. No gathers, reshapes or concatenations on chip.

**Block constraints.** ``block_m``, ``block_n``, ``block_k``: powers of two; ``block_m``,
``block_n >= 16`` and ``block_k >= 64`` (each of the four dots contracts ``block_k / 4 >= 16``,
the smallest ``tt.dot``). Each block is clipped to its dimension rounded up to a power of two
(not below its minimum), and ``M``, ``N``, ``K`` are zero-padded to whole blocks in the wrapper
(no copy when they divide).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from fst_jax.kernels.prune_compress import (
    _check_metadata,
    _decompress_reference,
    check_block,
    check_float,
    compiler_params,
    fit_block,
    pad_to,
)

__all__ = ["sparse_matmul"]


def _sparse_matmul_kernel(values_ref, meta_ref, b_ref, out_ref, *, block_k: int, precision):
    """One [block_m, block_n] tile; refs hold the tile's rows/columns over the whole (padded) K."""
    block_m, block_n = out_ref.shape
    groups = block_k // 4
    rows = jnp.arange(block_m, dtype=jnp.int32)[:, None]
    g_row = jnp.arange(groups, dtype=jnp.int32)[None, :]  # group index, along the lhs columns
    g_col = jnp.arange(groups, dtype=jnp.int32)[:, None]  # group index, along the rhs rows
    cols = jnp.arange(block_n, dtype=jnp.int32)[None, :]

    def step(kb, acc):
        g = kb * groups + g_row
        nibble = meta_ref[rows, g >> 1].astype(jnp.int32) >> ((g & 1) << 2)
        i0, i1 = nibble & 3, (nibble >> 2) & 3
        v0, v1 = values_ref[rows, 2 * g], values_ref[rows, 2 * g + 1]
        zero = jnp.zeros_like(v0)
        for p in range(4):
            a_p = jnp.where(i0 == p, v0, jnp.where(i1 == p, v1, zero))  # A[:, 4g + p]
            b_p = b_ref[4 * (kb * groups + g_col) + p, cols]  # B[4g + p, :]
            acc = acc + jnp.dot(a_p, b_p, precision=precision, preferred_element_type=jnp.float32)
        return acc

    n_steps = b_ref.shape[0] // block_k
    acc = lax.fori_loop(0, n_steps, step, jnp.zeros((block_m, block_n), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def sparse_matmul(
    values: jax.Array,
    metadata: jax.Array,
    b: jax.Array,
    *,
    interpret: bool = False,
    block_m: int = 64,
    block_n: int = 64,
    block_k: int = 128,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jax.typing.DTypeLike | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> jax.Array:
    """``A @ b`` for a 2:4-sparse ``A [M, K]`` given compressed along ``K``.

    ``(values, metadata) = prune_compress_2to4(A, axis=-1)``. The product accumulates in
    float32; the output has ``values``'s dtype, or ``preferred_element_type``.

    Args:
      values: ``[M, K/2]`` kept values of ``A``; float32, bfloat16 or float16.
      metadata: ``uint8 [M, ceil(K/8)]``, the positions of the kept values.
      b: ``[K, N]``, the dtype of ``values``.
      interpret: run the kernel in the Pallas interpreter (any backend) instead of on a GPU.
      block_m: output rows per program; a power of two ``>= 16``.
      block_n: output columns per program; a power of two ``>= 16``.
      block_k: the ``K`` step of a program's loop; a power of two ``>= 64``.
      precision: the in-kernel ``dot`` precision, as for :func:`jax.lax.dot` (hashable: ``None``,
        a :class:`jax.lax.Precision` or a pair of them). For float32 inputs the Triton lowering
        reads ``None``, ``DEFAULT`` and ``HIGH`` as TF32 and ``HIGHEST`` as IEEE float32.
      preferred_element_type: the output dtype (default: ``values.dtype``).
      num_warps: Triton warps per program.
      num_stages: Triton pipelining stages.

    Returns:
      ``[M, N]``: ``decompress_2to4(values, metadata) @ b``.

    Raises:
      TypeError: for unsupported or mismatched dtypes.
      ValueError: for mismatched shapes or invalid block sizes.

    Example:
      >>> import jax.numpy as jnp
      >>> from fst_jax.kernels import prune_compress_2to4, sparse_matmul
      >>> a = jnp.array([[0.5, -3.0, 1.0, 2.0, 4.0, 0.0, 7.0, 0.0]])
      >>> values, metadata = prune_compress_2to4(a, interpret=True)
      >>> print(sparse_matmul(values, metadata, jnp.ones((8, 2)), interpret=True))
      [[10. 10.]]
    """
    fn = "sparse_matmul"
    values, metadata, b = jnp.asarray(values), jnp.asarray(metadata), jnp.asarray(b)
    _check_operands(fn, values, metadata, b)
    out_dtype = jnp.dtype(values.dtype if preferred_element_type is None else preferred_element_type)
    block_m = check_block(fn, "block_m", block_m, 16)
    block_n = check_block(fn, "block_n", block_n, 16)
    block_k = check_block(fn, "block_k", block_k, 64)
    m, n = values.shape[0], b.shape[1]
    if m == 0 or n == 0 or b.shape[0] == 0:
        return jnp.zeros((m, n), out_dtype)
    return _sparse_matmul(values, metadata, b, interpret=interpret, block_m=block_m,
                          block_n=block_n, block_k=block_k, precision=precision,
                          out_dtype=out_dtype, num_warps=num_warps, num_stages=num_stages)


def _check_operands(fn: str, values: jax.Array, metadata: jax.Array, b: jax.Array) -> None:
    check_float(fn, "values", values)
    if values.ndim != 2:
        raise ValueError(f"{fn}: argument values has shape {values.shape}; expected [M, K/2]")
    _check_metadata(fn, values, metadata, -1)
    k = 2 * values.shape[1]
    if b.ndim != 2 or b.shape[0] != k:
        raise ValueError(
            f"{fn}: argument b has shape {b.shape}; for values of shape {values.shape} it must be "
            f"[K, N] with K = {k}"
        )
    if b.dtype != values.dtype:
        raise TypeError(f"{fn}: argument b has dtype {b.dtype}; it must match values ({values.dtype})")


@functools.partial(jax.jit, static_argnames=(
    "interpret", "block_m", "block_n", "block_k", "precision", "out_dtype", "num_warps",
    "num_stages"))
def _sparse_matmul(values, metadata, b, *, interpret, block_m, block_n, block_k, precision,
                   out_dtype, num_warps, num_stages):
    (m, half), n = values.shape, b.shape[1]
    bm = fit_block(block_m, m, 16)
    bn = fit_block(block_n, n, 16)
    bk = fit_block(block_k, 2 * half, 64)
    values = pad_to(values, (bm, bk // 2))
    metadata = pad_to(metadata, (bm, bk // 8))
    b = pad_to(b, (bk, bn))
    (m_p, half_p), n_p = values.shape, b.shape[1]
    out = pl.pallas_call(
        functools.partial(_sparse_matmul_kernel, block_k=bk, precision=precision),
        out_shape=jax.ShapeDtypeStruct((m_p, n_p), out_dtype),
        grid=(m_p // bm, n_p // bn),
        in_specs=[pl.BlockSpec((bm, half_p), lambda i, j: (i, 0)),
                  pl.BlockSpec((bm, half_p // 4), lambda i, j: (i, 0)),
                  pl.BlockSpec((2 * half_p, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="fst_sparse_matmul",
    )(values, metadata, b)
    return out[:m, :n]


def _reference(
    values: jax.Array,
    metadata: jax.Array,
    b: jax.Array,
    *,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jax.typing.DTypeLike | None = None,
) -> jax.Array:
    """:func:`sparse_matmul` in pure ``jax.numpy``: decompress, then a float32-accumulated dot."""
    values, metadata, b = jnp.asarray(values), jnp.asarray(metadata), jnp.asarray(b)
    _check_operands("sparse_matmul", values, metadata, b)
    out_dtype = values.dtype if preferred_element_type is None else preferred_element_type
    a = _decompress_reference(values, metadata, axis=-1)
    return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32).astype(out_dtype)

