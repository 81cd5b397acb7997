"""2:4 magnitude pruning and compression in one pass, and its inverse (Pallas, Triton lowering).

:func:`prune_compress_2to4` keeps, in every group of 4 consecutive entries along ``axis``, the 2
of largest magnitude -- exactly :func:`fst_jax.mask_2to4`: NaN and ``±inf`` count as the largest,
ties keep the lower index, chosen by pairwise comparisons -- and returns them compressed.
:func:`decompress_2to4` expands them back to the dense ``x ⊙ mask`` (zeros elsewhere).

**Layout.** ``L = x.shape[axis]`` (a multiple of 4) holds ``G = L // 4`` groups; group ``g`` is
entries ``4g .. 4g+3``. Both outputs keep every other axis of ``x`` in place:

* ``values``: ``x``'s dtype and shape, with length ``L // 2`` along ``axis``. Entries ``2g`` and
  ``2g + 1`` are the two kept entries of group ``g``, in increasing index order.
* ``metadata``: ``uint8``, ``x``'s shape with length ``ceil(L / 8)`` along ``axis``; two groups
  per byte, one 4-bit nibble per group. Byte ``j`` holds group ``2j`` in bits 0-3 and group
  ``2j + 1`` in bits 4-7. A group's nibble is ``i0 | i1 << 2``, where ``i0 < i1`` are the
  positions (0-3) within the group of its two kept entries; so
  ``byte = i0[2j] | i1[2j] << 2 | i0[2j+1] << 4 | i1[2j+1] << 6``. When ``G`` is odd, the high
  nibble of the last byte describes a padding group of four zeros: positions 0 and 1, ``0x4``.
  (The same 2-bit indices, low bits first, as NVIDIA's sparse-tensor-core metadata; the word
  packing and interleaving that ``mma.sp`` expects are not applied.)

For example, the group ``[0.5, -3, 1, 2]`` keeps positions 1 and 3: values ``[-3, 2]``, nibble
``1 | 3 << 2 = 0xD``.

**Kernels.** Both kernels work on a 2-D view ``[rows, L]`` (the wrapper moves ``axis`` last and
flattens the others) in blocks of ``block = (rows, entries)``: both powers of two, entries ≥ 8.
Blocks are clipped to the (power-of-two-rounded) array, and the array is zero-padded up to whole
blocks. Each program loads its block as 8 strided slices (entry ``8j + p``, ``p = 0..7``, two
groups per metadata byte), picks the top 2 of each group with pairwise comparisons and
``where`` selects (the Triton lowering has no sort, ``top_k`` or gather), and stores values and
metadata with strided stores: no reshapes or concatenations on chip.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from fst_jax import _masks

__all__ = ["decompress_2to4", "prune_compress_2to4"]

#: Input dtypes the kernels support.
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
#: The metadata dtype.
METADATA_DTYPE = jnp.dtype(jnp.uint8)


# ---------------------------------------------------------------------------------------------
# Kernels.


def _top2(x: list[jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(first, second, i0, i1): the kept entries of a group ``x[0..3]`` and their positions."""
    mag = []
    for xi in x:
        m = jnp.abs(xi.astype(jnp.float32))
        mag.append(jnp.where(jnp.isnan(m), jnp.inf, m))
    keep = []
    for i in range(4):  # j beats i: larger magnitude, or equal magnitude and lower index
        beats = [(mag[j] >= mag[i]) if j < i else (mag[j] > mag[i]) for j in range(4) if j != i]
        keep.append(sum(b.astype(jnp.int32) for b in beats) < 2)
    first = jnp.where(keep[0], x[0], jnp.where(keep[1], x[1], x[2]))
    second = jnp.where(keep[3], x[3], jnp.where(keep[2], x[2], x[1]))
    i0 = jnp.where(keep[0], 0, jnp.where(keep[1], 1, 2)).astype(jnp.int32)
    i1 = jnp.where(keep[3], 3, jnp.where(keep[2], 2, 1)).astype(jnp.int32)
    return first, second, i0, i1


def _prune_compress_kernel(x_ref, values_ref, meta_ref):
    """One [rows, entries] block: 8 strided slices in, 4 strided value slices + 1 byte slice out."""
    n_rows, n_bytes = meta_ref.shape
    rows = jnp.arange(n_rows, dtype=jnp.int32)[:, None]
    j = jnp.arange(n_bytes, dtype=jnp.int32)[None, :]
    byte = jnp.zeros((n_rows, n_bytes), jnp.int32)
    for half in range(2):  # group 2j + half
        first, second, i0, i1 = _top2([x_ref[rows, 8 * j + 4 * half + p] for p in range(4)])
        values_ref[rows, 4 * j + 2 * half] = first
        values_ref[rows, 4 * j + 2 * half + 1] = second
        byte = byte | ((i0 | (i1 << 2)) << (4 * half))
    meta_ref[...] = byte.astype(meta_ref.dtype)


def _decompress_kernel(values_ref, meta_ref, out_ref):
    """One [rows, entries] block: each of the 8 entries of a byte is a where-select of 2 values."""
    n_rows, n_bytes = meta_ref.shape
    rows = jnp.arange(n_rows, dtype=jnp.int32)[:, None]
    j = jnp.arange(n_bytes, dtype=jnp.int32)[None, :]
    byte = meta_ref[...].astype(jnp.int32)
    for half in range(2):
        nibble = byte >> (4 * half)
        i0, i1 = nibble & 3, (nibble >> 2) & 3
        v0 = values_ref[rows, 4 * j + 2 * half]
        v1 = values_ref[rows, 4 * j + 2 * half + 1]
        zero = jnp.zeros_like(v0)
        for p in range(4):
            out_ref[rows, 8 * j + 4 * half + p] = jnp.where(i0 == p, v0, jnp.where(i1 == p, v1, zero))


# ---------------------------------------------------------------------------------------------
# Helpers shared by the kernels' wrappers.


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_block(fn: str, name: str, value: int, minimum: int) -> int:
    """``value`` as an int, or a ValueError unless it is a power of two ≥ ``minimum``."""
    value = operator.index(value)
    if not _is_pow2(value) or value < minimum:
        raise ValueError(f"{fn}: {name}={value} must be a power of two >= {minimum}")
    return value


def fit_block(block: int, size: int, minimum: int) -> int:
    """The block used for a dimension of ``size``: ``block``, clipped to the dimension rounded up
    to a power of two (at least ``minimum``)."""
    return min(block, max(minimum, pl.next_power_of_2(max(size, 1))))


def pad_to(x: jax.Array, multiples: tuple[int, ...]) -> jax.Array:
    """Zero-pads every axis of ``x`` at the end up to a multiple of ``multiples`` (a no-op when
    already aligned)."""
    widths = [(0, -n % m) for n, m in zip(x.shape, multiples, strict=True)]
    return jnp.pad(x, widths) if any(w for _, w in widths) else x


def check_float(fn: str, name: str, x: jax.Array) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: argument {name} has dtype {x.dtype}; supported: float32, bfloat16, float16"
        )


def compiler_params(num_warps: int, num_stages: int) -> pltriton.CompilerParams:
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _to_2d(x: jax.Array, axis: int) -> jax.Array:
    x = jnp.moveaxis(x, axis, -1)
    return x.reshape(-1, x.shape[-1])


def _from_2d(x2: jax.Array, shape: tuple[int, ...], axis: int, length: int) -> jax.Array:
    moved = (*shape[:axis], *shape[axis + 1 :], length)
    return jnp.moveaxis(x2.reshape(moved), -1, axis)


# ---------------------------------------------------------------------------------------------
# Public ops.


def prune_compress_2to4(
    x: jax.Array,
    axis: int = -1,
    *,
    interpret: bool = False,
    block: tuple[int, int] = (16, 256),
    num_warps: int = 4,
    num_stages: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Prunes ``x`` to 2:4 along ``axis`` by magnitude and compresses it, in one pass.

    The kept entries are those of :func:`fst_jax.mask_2to4` (``axis``): exactly 2 of every 4,
    NaN and inf the largest, ties to the lower index. The layout of ``values`` and ``metadata``
    is in this module's docstring.

    Args:
      x: a float32, bfloat16 or float16 array; ``x.shape[axis]`` a multiple of 4.
      axis: the axis along which groups of 4 are formed; negative values count from the end.
      interpret: run the kernel in the Pallas interpreter (any backend) instead of on a GPU.
      block: ``(rows, entries)`` of one program's block of the ``[rows, L]`` view: powers of two,
        ``entries >= 8``; clipped to the array.
      num_warps: Triton warps per program.
      num_stages: Triton pipelining stages.

    Returns:
      ``(values, metadata)``: ``values`` of ``x``'s dtype and shape with ``L // 2`` along
      ``axis``; ``metadata`` uint8, ``ceil(L / 8)`` along ``axis``.

    Raises:
      TypeError: if ``x`` is not float32, bfloat16 or float16.
      ValueError: if ``axis`` is out of range, ``x.shape[axis]`` is not a multiple of 4, or
        ``block`` is not valid.

    Example:
      >>> import jax.numpy as jnp
      >>> from fst_jax.kernels import prune_compress_2to4
      >>> x = jnp.array([[0.5, -3.0, 1.0, 2.0, jnp.nan, 0.0, 7.0, 0.0]])
      >>> values, metadata = prune_compress_2to4(x, interpret=True)
      >>> print(values, hex(int(metadata[0, 0])))
      [[-3.  2. nan  7.]] 0x8d
    """
    fn = "prune_compress_2to4"
    x = jnp.asarray(x)
    check_float(fn, "x", x)
    axis = _masks._normalize_axis(fn, "axis", axis, x.ndim)
    length = x.shape[axis]
    if length % 4:
        raise ValueError(
            f"{fn}: argument x has shape {x.shape}; its length {length} along axis {axis} must be "
            "a multiple of 4"
        )
    block_rows = check_block(fn, "block[0]", block[0], 1)
    block_cols = check_block(fn, "block[1]", block[1], 8)
    n_bytes = -(-length // 8)
    if x.size == 0:
        return (_from_2d(jnp.zeros((0, length // 2), x.dtype), x.shape, axis, length // 2),
                _from_2d(jnp.zeros((0, n_bytes), METADATA_DTYPE), x.shape, axis, n_bytes))
    x2 = _to_2d(x, axis)
    values, metadata = _prune_compress_2d(
        x2, interpret=interpret, block_rows=block_rows, block_cols=block_cols,
        num_warps=num_warps, num_stages=num_stages)
    return (_from_2d(values, x.shape, axis, length // 2),
            _from_2d(metadata, x.shape, axis, n_bytes))


@functools.partial(jax.jit, static_argnames=(
    "interpret", "block_rows", "block_cols", "num_warps", "num_stages"))
def _prune_compress_2d(x2, *, interpret, block_rows, block_cols, num_warps, num_stages):
    n_rows, length = x2.shape
    br = fit_block(block_rows, n_rows, 1)
    bl = fit_block(block_cols, length, 8)
    xp = pad_to(x2, (br, bl))
    rows_p, cols_p = xp.shape
    values, metadata = pl.pallas_call(
        _prune_compress_kernel,
        out_shape=(jax.ShapeDtypeStruct((rows_p, cols_p // 2), x2.dtype),
                   jax.ShapeDtypeStruct((rows_p, cols_p // 8), METADATA_DTYPE)),
        grid=(rows_p // br, cols_p // bl),
        in_specs=[pl.BlockSpec((br, bl), lambda i, j: (i, j))],
        out_specs=(pl.BlockSpec((br, bl // 2), lambda i, j: (i, j)),
                   pl.BlockSpec((br, bl // 8), lambda i, j: (i, j))),
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="fst_prune_compress_2to4",
    )(xp)
    return values[:n_rows, : length // 2], metadata[:n_rows, : -(-length // 8)]


def decompress_2to4(
    values: jax.Array,
    metadata: jax.Array,
    axis: int = -1,
    *,
    interpret: bool = False,
    block: tuple[int, int] = (16, 256),
    num_warps: int = 4,
    num_stages: int = 1,
) -> jax.Array:
    """Expands the output of :func:`prune_compress_2to4` back to dense: ``x ⊙ mask_2to4(x)``.

    Args:
      values: the kept values, ``L // 2`` along ``axis`` (float32, bfloat16 or float16).
      metadata: uint8, ``values``'s shape with ``ceil(L / 8)`` along ``axis``.
      axis: the compressed axis; negative values count from the end.
      interpret: run the kernel in the Pallas interpreter (any backend) instead of on a GPU.
      block: ``(rows, entries)`` of one program's block of the dense ``[rows, L]`` view: powers of
        two, ``entries >= 8``; clipped to the array.
      num_warps: Triton warps per program.
      num_stages: Triton pipelining stages.

    Returns:
      The dense array: ``values``'s dtype, length ``L`` along ``axis``, zeros where dropped.

    Raises:
      TypeError: for a values dtype other than float32, bfloat16, float16, or metadata not uint8.
      ValueError: if ``axis`` is out of range, the length of ``values`` along it is odd, or the
        shapes of ``values`` and ``metadata`` do not match.

    Example:
      >>> import jax.numpy as jnp
      >>> from fst_jax.kernels import decompress_2to4
      >>> values = jnp.array([[-3.0, 2.0, 5.0, 7.0]])
      >>> metadata = jnp.array([[0x8D]], jnp.uint8)
      >>> print(decompress_2to4(values, metadata, interpret=True))
      [[ 0. -3.  0.  2.  5.  0.  7.  0.]]
    """
    fn = "decompress_2to4"
    values, metadata = jnp.asarray(values), jnp.asarray(metadata)
    check_float(fn, "values", values)
    _check_metadata(fn, values, metadata, axis)
    axis = _masks._normalize_axis(fn, "axis", axis, values.ndim)
    length = 2 * values.shape[axis]
    block_rows = check_block(fn, "block[0]", block[0], 1)
    block_cols = check_block(fn, "block[1]", block[1], 8)
    if values.size == 0:
        return _from_2d(jnp.zeros((0, length), values.dtype), values.shape, axis, length)
    dense = _decompress_2d(
        _to_2d(values, axis), _to_2d(metadata, axis), interpret=interpret,
        block_rows=block_rows, block_cols=block_cols, num_warps=num_warps, num_stages=num_stages)
    return _from_2d(dense, values.shape, axis, length)


def _check_metadata(fn: str, values: jax.Array, metadata: jax.Array, axis: int) -> None:
    """Checks ``metadata`` against ``values`` compressed along ``axis``."""
    axis = _masks._normalize_axis(fn, "axis", axis, values.ndim)
    if values.shape[axis] % 2:
        raise ValueError(
            f"{fn}: argument values has shape {values.shape}; its length {values.shape[axis]} "
            f"along axis {axis} must be even (half a multiple of 4)"
        )
    if metadata.dtype != METADATA_DTYPE:
        raise TypeError(f"{fn}: argument metadata has dtype {metadata.dtype}; expected uint8")
    want = list(values.shape)
    want[axis] = -(-values.shape[axis] // 4)
    if metadata.shape != tuple(want):
        raise ValueError(
            f"{fn}: argument metadata has shape {metadata.shape}; for values of shape "
            f"{values.shape} compressed along axis {axis} it must be {tuple(want)}"
        )


@functools.partial(jax.jit, static_argnames=(
    "interpret", "block_rows", "block_cols", "num_warps", "num_stages"))
def _decompress_2d(values, metadata, *, interpret, block_rows, block_cols, num_warps, num_stages):
    n_rows, half = values.shape
    br = fit_block(block_rows, n_rows, 1)
    bl = fit_block(block_cols, 2 * half, 8)
    vp = pad_to(values, (br, bl // 2))
    mp = pad_to(metadata, (br, bl // 8))
    rows_p, half_p = vp.shape
    dense = pl.pallas_call(
        _decompress_kernel,
        out_shape=jax.ShapeDtypeStruct((rows_p, 2 * half_p), values.dtype),
        grid=(rows_p // br, 2 * half_p // bl),
        in_specs=[pl.BlockSpec((br, bl // 2), lambda i, j: (i, j)),
                  pl.BlockSpec((br, bl // 8), lambda i, j: (i, j))],
        out_specs=pl.BlockSpec((br, bl), lambda i, j: (i, j)),
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="fst_decompress_2to4",
    )(vp, mp)
    return dense[:n_rows, : 2 * half]


# ---------------------------------------------------------------------------------------------
# References (pure jnp, the same signatures minus the kernel options).


def _reference(x: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """:func:`prune_compress_2to4` in pure ``jax.numpy``, from :func:`fst_jax.mask_2to4`."""
    x = jnp.asarray(x)
    axis = _masks._normalize_axis("prune_compress_2to4", "axis", axis, x.ndim)
    keep = _masks.mask_2to4(x, axis)
    xm, km = jnp.moveaxis(x, axis, -1), jnp.moveaxis(keep, axis, -1)
    groups, kept = xm.reshape(*xm.shape[:-1], -1, 4), km.reshape(*km.shape[:-1], -1, 4)
    k = [kept[..., p] for p in range(4)]
    g = [groups[..., p] for p in range(4)]
    first = jnp.where(k[0], g[0], jnp.where(k[1], g[1], g[2]))
    second = jnp.where(k[3], g[3], jnp.where(k[2], g[2], g[1]))
    i0 = jnp.where(k[0], 0, jnp.where(k[1], 1, 2))
    i1 = jnp.where(k[3], 3, jnp.where(k[2], 2, 1))
    values = jnp.stack([first, second], -1).reshape(*xm.shape[:-1], -1)
    nibble = (i0 | i1 << 2).astype(jnp.int32)
    if nibble.shape[-1] % 2:  # a padding group of zeros keeps positions 0 and 1
        nibble = jnp.concatenate([nibble, jnp.full((*nibble.shape[:-1], 1), 0x4, jnp.int32)], -1)
    metadata = (nibble[..., 0::2] | nibble[..., 1::2] << 4).astype(METADATA_DTYPE)
    return jnp.moveaxis(values, -1, axis), jnp.moveaxis(metadata, -1, axis)


def _decompress_reference(values: jax.Array, metadata: jax.Array, axis: int = -1) -> jax.Array:
    """:func:`decompress_2to4` in pure ``jax.numpy``."""
    values, metadata = jnp.asarray(values), jnp.asarray(metadata)
    _check_metadata("decompress_2to4", values, metadata, axis)
    axis = _masks._normalize_axis("decompress_2to4", "axis", axis, values.ndim)
    vm, mm = jnp.moveaxis(values, axis, -1), jnp.moveaxis(metadata, axis, -1)
    n_groups = vm.shape[-1] // 2
    byte = mm.astype(jnp.int32)
    nibbles = jnp.stack([byte & 0xF, byte >> 4], -1).reshape(*mm.shape[:-1], -1)[..., :n_groups]
    i0, i1 = (nibbles & 3)[..., None], ((nibbles >> 2) & 3)[..., None]  # [..., G, 1]
    pairs = vm.reshape(*vm.shape[:-1], n_groups, 2)
    pos = jax.lax.broadcasted_iota(jnp.int32, (*pairs.shape[:-1], 4), pairs.ndim - 1)
    zero = jnp.zeros((), values.dtype)
    dense = jnp.where(i0 == pos, pairs[..., :1], jnp.where(i1 == pos, pairs[..., 1:], zero))
    return jnp.moveaxis(dense.reshape(*vm.shape[:-1], 4 * n_groups), -1, axis)
