"""The cuSPARSELt ops: ``jax.ffi.ffi_call`` into the handlers of ``cusparselt_ffi.cc``.

Layers, from the outside in (every public op goes through all of them):

1. :func:`matmul` checks arguments and calls a ``jax.custom_batching.custom_vmap`` function. Its
   batching rule folds a mapped dense operand into the token dimension ``M`` and calls the op
   once (one compression per call, never one per example); a mapped structured operand (a
   different weight per example) runs as a ``lax.map`` of the op. (``ffi_call``'s own
   ``vmap_method`` choices cannot fold an axis into ``M``; they are never reached.)
2. ``lax.platform_dependent``, so the choice is made per lowering platform: on CUDA the custom
   calls; on any other platform a primitive whose lowering raises an error naming cuSPARSELt
   and the missing GPU (when ``jit`` compiles the computation, before anything runs).
3. On CUDA, a ``custom_partitioning`` function, so that under a sharded ``jit`` the dense
   operand keeps its sharding along ``M`` (and the structured operand along ``N``) and each
   device runs the calls on its own shard: no all-gather of the batch. A sharded contracting
   dimension is replicated (gathered). Single-device and fully manual (``shard_map``, ``pmap``)
   contexts inline the calls; a device-less lowering (``AbstractMesh``) skips the wrapper.
4. The two FFI custom calls: compress, then matmul, with zero padding of every dimension to a
   multiple of 16 where needed (zero groups are valid 2:4 groups) and the output sliced.

The custom calls compute ``D[n, m] = A[n, k] @ B[k, m]`` with ``A`` the structured operand (2:4
along ``k``). A transposed operand or output is not copied: a row-major ``[r, c]`` buffer is the
column-major ``[c, r]`` matrix, and each of ``A``, ``B`` and ``D`` is passed with its order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Iterator
from typing import Literal

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec

from fst_jax.cusparselt import _build

#: Operand dtypes cuSPARSELt's 2:4 format covers (its 50 % format for float32 is 1:2).
DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
#: Every dimension handed to cuSPARSELt is a multiple of this (16-bit operands); the wrapper
#: zero-pads the others (zero groups are valid 2:4 groups) and slices the output.
ALIGN = 16

COMPRESS_TARGET = _build.TARGETS["compress"]
MATMUL_TARGET = _build.TARGETS["matmul"]


# ---------------------------------------------------------------------------------------------
# Debug options (read when a function is traced).


@dataclasses.dataclass(frozen=True)
class _Debug:
    poison: bool = False
    check: bool = False
    emulate: bool = False  # tests only: run a jnp emulation of the custom calls off CUDA


# A jit-cache-sensitive context: a function traced under other debug options is traced again.
_DEBUG_CTX = jax.make_user_context(default_value=_Debug(
    poison=os.environ.get("FST_JAX_CUSPARSELT_POISON", "") not in ("", "0"),
    check=os.environ.get("FST_JAX_CUSPARSELT_CHECK", "") not in ("", "0"),
))


def _debug() -> _Debug:
    return _DEBUG_CTX.value


@contextlib.contextmanager
def debug(*, poison: bool = True, check: bool = False) -> Iterator[None]:
    """Traces the ops inside this context with debug options.

    ``poison``: every output of the custom calls is filled with NaN (``0xFF`` bytes) on the
    stream before cuSPARSELt writes it, so an element the library leaves unwritten shows as NaN.
    ``check``: the structured operand is checked to be 2:4 (``cusparseLtSpMMAPruneCheck2``)
    before it is compressed; a violation fails the call (this synchronizes the stream).
    The options are part of ``jax.jit``'s cache key: a function traced without them is traced
    again inside the context. The environment variables ``FST_JAX_CUSPARSELT_POISON=1`` and
    ``FST_JAX_CUSPARSELT_CHECK=1`` set the defaults.

    Args:
      poison: fill outputs with NaN before they are written.
      check: verify the structured operand is 2:4 before compressing it.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fst_jax import cusparselt
      >>> from fst_jax._compat import lower_for_cuda
      >>> w = jax.ShapeDtypeStruct((16, 32), jnp.bfloat16)
      >>> b = jax.ShapeDtypeStruct((32, 16), jnp.bfloat16)
      >>> with cusparselt.debug(poison=True):
      ...     text = lower_for_cuda(cusparselt.sparse_matmul, w, b)
      >>> "poison = 1" in text
      True
    """
    with _DEBUG_CTX(dataclasses.replace(_debug(), poison=bool(poison), check=bool(check))):
        yield


@contextlib.contextmanager
def _emulate_off_cuda() -> Iterator[None]:
    """Tests only: off CUDA, run a pure-jnp emulation of the two custom calls (same buffers,
    orders and padding) instead of raising, so that the layout logic runs on a CPU."""
    with _DEBUG_CTX(dataclasses.replace(_debug(), emulate=True)):
        yield


# ---------------------------------------------------------------------------------------------
# Static description of one call.


@dataclasses.dataclass(frozen=True)
class _Params:
    """What the custom calls need, beyond the buffers (hashable: a static argument)."""

    sparse: str  # "lhs" or "rhs": which operand of the public op is 2:4 along the contraction
    transpose_lhs: bool
    transpose_rhs: bool
    algorithm: int  # fixed configuration id, or -1: search once per plan
    poison: bool
    check: bool
    emulate: bool


def _dims(lhs_shape, rhs_shape, p: _Params) -> tuple[int, int, int]:
    """(n, k, m) of the custom call: A is [n, k] (structured), B is [k, m], D is [n, m]."""
    lm, lk = lhs_shape[::-1] if p.transpose_lhs else lhs_shape
    rk, rn = rhs_shape[::-1] if p.transpose_rhs else rhs_shape
    if p.sparse == "lhs":  # out[lm, rn] = op(lhs) @ op(rhs); A = op(lhs)
        return lm, lk, rn
    return rn, rk, lm  # out^T[rn, lm] = op(rhs)^T @ op(lhs)^T; A = op(rhs)^T


def _orders(p: _Params) -> tuple[bool, bool, bool]:
    """(row_a, row_b, row_d): whether A, B and D are row-major in their buffers."""
    if p.sparse == "lhs":
        return not p.transpose_lhs, not p.transpose_rhs, True
    # A = op(rhs)^T: rhs is [k, n] row-major (A column-major) unless transposed ([n, k], row).
    # B = op(lhs)^T: lhs is [m, k] row-major (B column-major) unless transposed ([k, m], row).
    # D = out^T with out [m, n] row-major: column-major.
    return p.transpose_rhs, p.transpose_lhs, False


def _compressed_capacity(n: int, k: int, dtype) -> int:
    """Bytes reserved for cuSPARSELt's compressed ``[n, k]`` operand.

    The kept half of the values plus 2-bit metadata per kept value is ``9/16`` of the dense
    bytes for 16-bit types; rows and columns are rounded up to 128 and 64 KiB are added for any
    padding the library applies. The handler checks the library's own size against it.
    """
    itemsize = jnp.dtype(dtype).itemsize
    dense = _round_up(n, 128) * _round_up(k, 128) * itemsize
    return _round_up(dense * 9 // 16 + 65536, 256)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# ---------------------------------------------------------------------------------------------
# Layers 2 and 4: the per-platform choice, the custom calls (CUDA) and the off-CUDA branch.


def _ffi_compress(a_buf: jax.Array, n: int, k: int, row_a: bool, p: _Params) -> jax.Array:
    cap = _compressed_capacity(n, k, a_buf.dtype)
    return jax.ffi.ffi_call(
        COMPRESS_TARGET,
        jax.ShapeDtypeStruct((cap,), jnp.uint8),
        vmap_method="sequential",
    )(a_buf, n=np.int64(n), k=np.int64(k), row_a=np.int64(row_a), poison=np.int64(p.poison),
      check=np.int64(p.check))


def _ffi_matmul(c: jax.Array, b_buf: jax.Array, n: int, k: int, m: int, orders, p: _Params):
    row_a, row_b, row_d = orders
    d_shape = (n, m) if row_d else (m, n)
    return jax.ffi.ffi_call(
        MATMUL_TARGET,
        jax.ShapeDtypeStruct(d_shape, b_buf.dtype),
        vmap_method="sequential",
    )(c, b_buf, n=np.int64(n), k=np.int64(k), m=np.int64(m), row_a=np.int64(row_a),
      row_b=np.int64(row_b), row_d=np.int64(row_d), alg=np.int64(p.algorithm),
      poison=np.int64(p.poison))


def _emulated_compress(a_buf, n, k, row_a, p):
    """jnp stand-in for the compress call: values + metadata (fst_jax's own 2:4 format)."""
    from fst_jax.kernels import prune_compress

    a = a_buf if row_a else a_buf.T  # logical [n, k]
    values, meta = prune_compress._reference(a, axis=-1)
    flat = jnp.concatenate([lax.bitcast_convert_type(values, jnp.uint8).reshape(-1),
                            meta.reshape(-1)])
    cap = _compressed_capacity(n, k, a_buf.dtype)
    assert flat.shape[0] <= cap, (flat.shape, cap)
    return jnp.pad(flat, (0, cap - flat.shape[0]))


def _emulated_matmul(c, b_buf, n, k, m, orders, p):
    """jnp stand-in for the matmul call, reading the emulated compressed buffer."""
    from fst_jax.kernels import prune_compress

    row_a, row_b, row_d = orders
    dtype = b_buf.dtype
    nv = n * (k // 2) * dtype.itemsize
    values = lax.bitcast_convert_type(c[:nv].reshape(n, k // 2, dtype.itemsize), dtype)
    meta = c[nv:nv + n * (-(-k // 8))].reshape(n, -(-k // 8))
    a = prune_compress._decompress_reference(values, meta, axis=-1)
    b = b_buf if row_b else b_buf.T  # logical [k, m]
    d = jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype)
    return d if row_d else d.T


def _custom_call_path(lhs: jax.Array, rhs: jax.Array, p: _Params, compress_fn, matmul_fn):
    """The two calls on the buffers as they are (pads dims to ALIGN where needed)."""
    n, k, m = _dims(lhs.shape, rhs.shape, p)
    row_a, row_b, row_d = _orders(p)
    a_buf, b_buf = (lhs, rhs) if p.sparse == "lhs" else (rhs, lhs)
    n_p, k_p, m_p = (_round_up(x, ALIGN) for x in (n, k, m))
    if (n_p, k_p) != (n, k):
        pad = ((0, n_p - n), (0, k_p - k)) if row_a else ((0, k_p - k), (0, n_p - n))
        a_buf = jnp.pad(a_buf, pad)
    if (k_p, m_p) != (k, m):
        pad = ((0, k_p - k), (0, m_p - m)) if row_b else ((0, m_p - m), (0, k_p - k))
        b_buf = jnp.pad(b_buf, pad)
    c = compress_fn(a_buf, n_p, k_p, row_a, p)
    d = matmul_fn(c, b_buf, n_p, k_p, m_p, (row_a, row_b, row_d), p)
    if (n_p, m_p) != (n, m):
        d = d[:n, :m] if row_d else d[:m, :n]
    # D is [n, m] row-major or [m, n] (= D^T) row-major: the public output.
    return d


def _no_gpu(lhs: jax.Array, rhs: jax.Array, p: _Params):
    """Off CUDA: a primitive whose lowering raises :data:`NO_GPU_MESSAGE` (so ``jit`` fails when
    it compiles the computation for a CPU, before anything runs)."""
    n, k, m = _dims(lhs.shape, rhs.shape, p)
    shape = (n, m) if p.sparse == "lhs" else (m, n)
    return _no_gpu_p.bind(lhs, rhs, shape=shape, dtype=jnp.dtype(lhs.dtype))


_no_gpu_p = jex_core.Primitive("fst_cusparselt_no_gpu")
_no_gpu_p.def_abstract_eval(lambda lhs, rhs, *, shape, dtype: jax.core.ShapedArray(shape, dtype))


def _no_gpu_impl(*args, shape, dtype):
    raise RuntimeError(NO_GPU_MESSAGE)


_no_gpu_p.def_impl(_no_gpu_impl)


def _no_gpu_lowering(ctx, *args, shape, dtype):
    platforms = ", ".join(ctx.module_context.platforms)
    raise RuntimeError(f"{NO_GPU_MESSAGE} (the computation is being compiled for: {platforms})")


mlir.register_lowering(_no_gpu_p, _no_gpu_lowering)


NO_GPU_MESSAGE = (
    "fst_jax.cusparselt: cuSPARSELt runs only on an NVIDIA GPU (compute capability 8.x or 9.x), "
    "and this computation is not running on one (no CUDA GPU). Run it on a GPU, or use the XLA "
    "path (FSTConfig(backend='xla'), or fst_jax.cusparselt._reference)."
)


def _cuda_impl(lhs: jax.Array, rhs: jax.Array, p: _Params) -> jax.Array:
    return _custom_call_path(lhs, rhs, p, _ffi_compress, _ffi_matmul)


def _emulated_impl(lhs: jax.Array, rhs: jax.Array, p: _Params) -> jax.Array:
    return _custom_call_path(lhs, rhs, p, _emulated_compress, _emulated_matmul)


def _platform_impl(lhs: jax.Array, rhs: jax.Array, p: _Params) -> jax.Array:
    """The custom calls on CUDA (partitioned); elsewhere the error (or, in tests, the emulation).

    The error branch is a primitive whose lowering raises: no host callback (one inside a
    partitioned body would be lowered during SPMD partitioning, where its Python callable is not
    kept alive, and jax >= 0.11 cannot lower callbacks without devices).
    """
    partition = _should_partition()
    cuda = _partitioned(p, _cuda_impl) if partition else functools.partial(_cuda_impl, p=p)
    if p.emulate:
        default = (_partitioned(p, _emulated_impl) if partition
                   else functools.partial(_emulated_impl, p=p))
    else:
        default = functools.partial(_no_gpu, p=p)
    return lax.platform_dependent(lhs, rhs, cuda=cuda, default=default)


def _should_partition() -> bool:
    """Whether to wrap the calls in ``custom_partitioning``: not inside a device-less lowering
    (an ``AbstractMesh`` context, as ``_compat.lower_for_cuda`` uses on jax >= 0.11, where
    ``custom_partitioning`` cannot lower) nor inside a mesh of one device (nothing to partition).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return True
    return mesh.size > 1 and getattr(mesh, "abstract_device", None) is None


# ---------------------------------------------------------------------------------------------
# Layer 3 (CUDA): partitioning.


def _factor_axes(p: _Params) -> tuple[tuple[str, str], tuple[str, str], tuple[str, str]]:
    """Einsum-style factor names of (lhs dims, rhs dims, out dims)."""
    lhs = ("k", "m") if p.transpose_lhs else ("m", "k")
    rhs = ("n", "k") if p.transpose_rhs else ("k", "n")
    if p.sparse == "lhs":  # out[lm, rn]: call the lhs rows "n" and rhs cols "m"
        swap = {"m": "n", "n": "m"}
        lhs = tuple(swap.get(f, f) for f in lhs)
        rhs = tuple(swap.get(f, f) for f in rhs)
        return lhs, rhs, ("n", "m")
    return lhs, rhs, ("m", "n")


def _spec_of(sharding, ndim: int) -> tuple:
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return (None,) * ndim
    return tuple(spec) + (None,) * (ndim - len(spec))


def _shardings(p: _Params, mesh, lhs_sharding, rhs_sharding):
    """(lhs, rhs, out) NamedShardings: keep m and n sharded, replicate k."""
    (lf, rf, of) = _factor_axes(p)
    factor_spec: dict[str, object] = {}
    for factors, sh in ((lf, lhs_sharding), (rf, rhs_sharding)):
        for f, s in zip(factors, _spec_of(sh, 2)):
            if f != "k" and s is not None:
                factor_spec.setdefault(f, s)

    def mesh_axes(s):
        return set(s) if isinstance(s, tuple) else {s}

    if "m" in factor_spec and "n" in factor_spec and (
        mesh_axes(factor_spec["m"]) & mesh_axes(factor_spec["n"])
    ):
        del factor_spec["n"]  # the same mesh axis on both: keep the (batch) m sharding
    make = lambda factors: NamedSharding(mesh, PartitionSpec(*(factor_spec.get(f) for f in factors)))  # noqa: E731
    return make(lf), make(rf), make(of)


@functools.lru_cache(maxsize=None)
def _partitioned(p: _Params, impl):
    """``impl(lhs, rhs, p)`` as a ``custom_partitioning`` function (see the module docstring)."""

    def fn(lhs, rhs):
        return impl(lhs, rhs, p)

    cp = custom_partitioning(fn)

    def infer(mesh, arg_shapes, result_shape):
        return _shardings(p, mesh, arg_shapes[0].sharding, arg_shapes[1].sharding)[2]

    def partition(mesh, arg_shapes, result_shape):
        lhs_s, rhs_s, out_s = _shardings(p, mesh, arg_shapes[0].sharding, arg_shapes[1].sharding)

        def lower_fn(lhs, rhs):
            return impl(lhs, rhs, p)

        return mesh, lower_fn, out_s, (lhs_s, rhs_s)

    lf, rf, of = _factor_axes(p)
    rule = f"{' '.join(lf)}, {' '.join(rf)} -> {' '.join(of)}"
    cp.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=rule)
    return cp


# ---------------------------------------------------------------------------------------------
# Layer 1: batching, and the public ops.


@functools.lru_cache(maxsize=None)
def _batchable(p: _Params):
    @jax.custom_batching.custom_vmap
    def op(lhs, rhs):
        return _platform_impl(lhs, rhs, p)

    @op.def_vmap
    def rule(axis_size, in_batched, lhs, rhs):
        lhs_b, rhs_b = in_batched
        sparse_b = rhs_b if p.sparse == "rhs" else lhs_b
        if sparse_b:  # a different structured operand per example: one call per example
            lhs_x = lhs if lhs_b else jnp.broadcast_to(lhs, (axis_size, *lhs.shape))
            rhs_x = rhs if rhs_b else jnp.broadcast_to(rhs, (axis_size, *rhs.shape))
            out = lax.map(lambda xs: _batchable(p)(*xs), (lhs_x, rhs_x))
            return out, True
        call = _batchable(p)
        if p.sparse == "rhs":  # dense lhs [B, M, K] (or [B, K, M] transposed): fold B into M
            b, r, c = lhs.shape
            if not p.transpose_lhs:
                out = call(lhs.reshape(b * r, c), rhs)  # [B*M, N]: free reshapes
                return out.reshape(b, r, -1), True
            folded = jnp.moveaxis(lhs, 0, 1).reshape(r, b * c)  # [K, B*M]
            return call(folded, rhs).reshape(b, c, -1), True
        # sparse lhs, dense rhs [B, K, M] (or [B, M, K] transposed); out [N, B*M]
        b, r, c = rhs.shape
        if p.transpose_rhs:
            out = call(lhs, rhs.reshape(b * r, c))  # rhs [B*M, K]: free
            m = r
        else:
            out = call(lhs, jnp.moveaxis(rhs, 0, 1).reshape(r, b * c))
            m = c
        return jnp.moveaxis(out.reshape(out.shape[0], b, m), 1, 0), True

    return op


def _check(fn: str, lhs, rhs, sparse: str, transpose_lhs: bool, transpose_rhs: bool) -> None:
    if sparse not in ("lhs", "rhs"):
        raise ValueError(f"{fn}: sparse must be 'lhs' or 'rhs', got {sparse!r}")
    for name, x in (("lhs", lhs), ("rhs", rhs)):
        if x.ndim != 2:
            raise ValueError(f"{fn}: {name} must be 2-D, got shape {x.shape}")
    if jnp.dtype(lhs.dtype) != jnp.dtype(rhs.dtype) or jnp.dtype(lhs.dtype) not in DTYPES:
        raise TypeError(
            f"{fn}: operands must both be float16 or both bfloat16 (cuSPARSELt's 2:4 format), got "
            f"{lhs.dtype} and {rhs.dtype}"
        )
    lk = lhs.shape[0] if transpose_lhs else lhs.shape[1]
    rk = rhs.shape[1] if transpose_rhs else rhs.shape[0]
    if lk != rk:
        raise ValueError(f"{fn}: contracting dimensions differ: {lhs.shape} x {rhs.shape} "
                         f"(transpose_lhs={transpose_lhs}, transpose_rhs={transpose_rhs})")
    if lk % 4:
        raise ValueError(f"{fn}: the contracting dimension ({lk}) must be a multiple of 4 (2:4 "
                         "groups)")


def eligible(
    lhs: jax.Array | jax.ShapeDtypeStruct,
    rhs: jax.Array | jax.ShapeDtypeStruct,
    *,
    sparse: Literal["lhs", "rhs"],
    transpose_lhs: bool = False,
    transpose_rhs: bool = False,
    preferred_element_type: jax.typing.DTypeLike | None = None,
) -> tuple[bool, str]:
    """Whether :func:`matmul` takes these operands (shapes and dtypes only), and why not.

    For a caller that routes a product to cuSPARSELt or to XLA: float16/bfloat16 operands of one
    dtype, 2-D, a contracting dimension that is a multiple of 4, and an output in the operands'
    dtype (``preferred_element_type`` ``None`` or that dtype). Dimensions that are not multiples
    of 16 are eligible (zero-padded, at the cost of a copy). Says nothing about the GPU: see
    :func:`fst_jax.cusparselt.available`.

    Returns:
      ``(ok, reason)``; ``reason`` is ``"ok"`` or names the rule that fails.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from fst_jax import cusparselt
      >>> x = jax.ShapeDtypeStruct((8192, 4096), jnp.bfloat16)
      >>> w = jax.ShapeDtypeStruct((4096, 1024), jnp.bfloat16)
      >>> cusparselt.eligible(x, w, sparse="rhs")
      (True, 'ok')
      >>> cusparselt.eligible(x, w, sparse="rhs", preferred_element_type=jnp.float32)[0]
      False
    """
    try:
        _check("fst_jax.cusparselt", lhs, rhs, sparse, transpose_lhs, transpose_rhs)
    except (TypeError, ValueError) as e:
        return False, str(e).removeprefix("fst_jax.cusparselt: ")
    if preferred_element_type is not None and jnp.dtype(preferred_element_type) != lhs.dtype:
        return False, (f"output dtype {jnp.dtype(preferred_element_type)} differs from the "
                       f"operands' {jnp.dtype(lhs.dtype)}")
    return True, "ok"


def _algorithm_id(algorithm: int | str) -> int:
    if algorithm == "search":
        return -1
    if isinstance(algorithm, (int, np.integer)) and not isinstance(algorithm, bool) and algorithm >= 0:
        return int(algorithm)
    raise ValueError(f"algorithm must be a configuration id >= 0 or 'search', got {algorithm!r}")


def matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    *,
    sparse: Literal["lhs", "rhs"],
    transpose_lhs: bool = False,
    transpose_rhs: bool = False,
    algorithm: int | Literal["search"] = 0,
    precision: lax.PrecisionLike = None,
) -> jax.Array:
    """``op(lhs) @ op(rhs)`` on the 2:4 sparse tensor cores, ``op(x) = x.T`` where asked.

    The ``sparse`` operand must already be 2:4 along the contracting dimension of ``op(x)``
    (pruned by the caller's mask); it is compressed by cuSPARSELt on every call, and the product
    accumulates in float32. Transposes are not copied: they become cuSPARSELt matrix orders.

    Args:
      lhs: ``[M, K]`` (``[K, M]`` with ``transpose_lhs``), float16 or bfloat16.
      rhs: ``[K, N]`` (``[N, K]`` with ``transpose_rhs``), the dtype of ``lhs``.
      sparse: which operand is 2:4 along ``K``.
      transpose_lhs: use ``lhs.T``.
      transpose_rhs: use ``rhs.T``.
      algorithm: cuSPARSELt's algorithm configuration id (default 0: fixed, so equal inputs give
        equal outputs), or ``"search"``: ``cusparseLtMatmulSearch`` once per shape, its choice
        kept and checked once against configuration 0.
      precision: accepted and ignored: 16-bit products are exact and accumulate in float32,
        which is what XLA computes for 16-bit operands at every precision.

    Returns:
      ``[M, N]`` in the operands' dtype.

    Raises:
      TypeError: for dtypes other than float16/bfloat16, or mismatched ones.
      ValueError: for non-2-D operands, mismatched contracting dimensions, or ``K % 4 != 0``.

    When the computation runs without a CUDA GPU it fails with an error naming cuSPARSELt and
    the missing GPU; it lowers for CUDA on any machine (``jax.jit(f).trace(...).lower(
    lowering_platforms=("cuda",))``).

    Example:
      >>> import jax.numpy as jnp
      >>> from fst_jax import cusparselt
      >>> x = jnp.ones((8, 4), jnp.bfloat16)                    # tokens x K
      >>> w = jnp.array([[1, 0], [0, 2], [3, 0], [0, 4]], jnp.bfloat16)  # K x N, 2:4 along K
      >>> print(cusparselt._reference(w.T, x.T).T[0])           # what matmul(x, w, sparse="rhs") gives
      [4 6]
    """
    del precision
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    _check("fst_jax.cusparselt.matmul", lhs, rhs, sparse, transpose_lhs, transpose_rhs)
    p = _Params(sparse=sparse, transpose_lhs=bool(transpose_lhs),
                transpose_rhs=bool(transpose_rhs), algorithm=_algorithm_id(algorithm),
                poison=_debug().poison, check=_debug().check, emulate=_debug().emulate)
    _ensure_registered()
    _fail_fast_if_eager_without_gpu(lhs, rhs, p)
    return _batchable(p)(lhs, rhs)


def sparse_matmul(
    w: jax.Array,
    b: jax.Array,
    *,
    precision: lax.PrecisionLike = None,
    algorithm: int | Literal["search"] = 0,
) -> jax.Array:
    """``w @ b`` with ``w [N, K]`` 2:4 along ``K`` (its last axis), on the sparse tensor cores.

    ``w`` must already be 2:4-pruned (by the caller's mask); ``b [K, M]`` is dense. Float16 and
    bfloat16 only; the products are exact and accumulate in float32, which is what XLA computes
    for 16-bit operands at every ``precision``, so ``precision`` is accepted for symmetry with
    :func:`jax.numpy.dot` and does not change the result. Under ``vmap`` over ``b`` the mapped
    axis is folded into ``M``: ``w`` is compressed once per call. See :func:`matmul` for
    transposed operands and a structured right-hand side.

    Args:
      w: ``[N, K]``, float16 or bfloat16, 2:4 along ``K``.
      b: ``[K, M]``, the dtype of ``w``.
      precision: accepted and ignored (see above).
      algorithm: as for :func:`matmul`.

    Returns:
      ``[N, M]``: ``w @ b`` in ``w``'s dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from fst_jax import cusparselt
      >>> w = jnp.array([[1.0, 0.0, 0.0, 2.0]], jnp.float16)   # 2:4 along K
      >>> b = jnp.arange(8, dtype=jnp.float16).reshape(4, 2)
      >>> print(cusparselt._reference(w, b))                    # sparse_matmul(w, b) on a GPU
      [[12. 15.]]
      >>> ok, reason = cusparselt.available()                   # False on a machine without a GPU
    """
    del precision
    return matmul(w, b, sparse="lhs", algorithm=algorithm)


def _reference(w: jax.Array, b: jax.Array, *, precision: lax.PrecisionLike = None,
               algorithm: int | str = 0) -> jax.Array:
    """:func:`sparse_matmul` in pure ``jax.numpy``: ``w @ b``, float32 accumulation."""
    del precision, algorithm
    w, b = jnp.asarray(w), jnp.asarray(b)
    return jnp.dot(w, b, preferred_element_type=jnp.float32).astype(w.dtype)


def _matmul_reference(lhs: jax.Array, rhs: jax.Array, *, sparse: str,
                      transpose_lhs: bool = False, transpose_rhs: bool = False,
                      algorithm: int | str = 0, precision: lax.PrecisionLike = None) -> jax.Array:
    """:func:`matmul` in pure ``jax.numpy``."""
    del sparse, algorithm, precision
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    a = lhs.T if transpose_lhs else lhs
    b = rhs.T if transpose_rhs else rhs
    return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(lhs.dtype)


# ---------------------------------------------------------------------------------------------
# Registration and availability.


_REGISTERED: dict[str, object] = {}


def register(lib) -> None:
    """Registers the library's handlers as FFI targets for the CUDA platform (once)."""
    if _REGISTERED.get("done"):
        return
    for symbol in _build.TARGETS.values():
        jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="CUDA")
    _REGISTERED["done"] = True


def _gpus() -> list:
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


def _ensure_registered() -> None:
    """At trace time: with a GPU, build (first use) and register, raising on failure; without
    one, register if the library is already built and otherwise leave it (lowering only)."""
    if _REGISTERED.get("done"):
        return
    if _gpus():
        from fst_jax.cusparselt import load

        load()
        return
    try:
        lib = _build.load_library()
        register(lib)
    except Exception:  # noqa: BLE001 - lowering for CUDA needs no registration
        pass


def _fail_fast_if_eager_without_gpu(lhs, rhs, p: _Params) -> None:
    if p.emulate or isinstance(lhs, jax.core.Tracer) or isinstance(rhs, jax.core.Tracer):
        return
    platforms = {d.platform for x in (lhs, rhs) for d in x.devices()}
    if platforms != {"gpu"} and platforms != {"cuda"}:
        raise RuntimeError(NO_GPU_MESSAGE)


def plan_cache_stats() -> dict[str, int]:
    """The handler's counters in this process.

    Handle, descriptor and plan set-ups and cache hits, compress and matmul calls, searches and
    rejected searches; all zero when the library is not loaded (or nothing ran: no GPU).

    Returns:
      ``{name: count}``.

    Example:
      >>> from fst_jax import cusparselt
      >>> stats = cusparselt.plan_cache_stats()
      >>> sorted(stats)[:3]
      ['compress_calls', 'desc_hits', 'desc_inits']
    """
    names = ["handle_inits", "plan_inits", "plan_hits", "desc_inits", "desc_hits",
             "compress_calls", "matmul_calls", "searches", "search_rejected"]
    lib = _build.loaded_library()
    if lib is None:
        return dict.fromkeys(names, 0)
    import ctypes

    n = lib.fst_cslt_num_counters()
    buf = (ctypes.c_int64 * n)()
    lib.fst_cslt_counters(buf)
    return {name: int(buf[i]) for i, name in enumerate(names[:n])}


def compressed_size(n: int, k: int, dtype: jax.typing.DTypeLike, *, row_major: bool = True) -> int:
    """cuSPARSELt's compressed size in bytes of an ``[n, k]`` operand (needs a GPU and the
    loaded library; -1 otherwise), next to what the op reserves (``_compressed_capacity``)."""
    lib = _build.loaded_library()
    if lib is None:
        return -1
    return int(lib.fst_cslt_compressed_size(n, k, int(jnp.dtype(dtype) == jnp.bfloat16),
                                            int(row_major)))

