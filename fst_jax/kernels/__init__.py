"""Pallas GPU kernels (Triton lowering) of fst_jax, each with a pure-jnp ``_reference``.

* :func:`prune_compress_2to4` / :func:`decompress_2to4`: the 2:4 magnitude mask and the
  compressed operand (kept values + 4-bit metadata per group) in one pass, and back.
* :func:`sparse_matmul`: ``[M, K] @ [K, N]`` with the lhs 2:4-compressed along ``K``, expanded on
  chip and multiplied with a dense ``dot`` (float32 accumulation).
* :func:`grad_weight_shift`: the compact grad-weight product over the kept tokens of a fixed
  token mask, with the gradient shift fused into the ``dY`` loads.

Every op takes ``interpret=True`` to run in the Pallas interpreter on any backend.
"""

from fst_jax.kernels.grad_weight_shift import grad_weight_shift as grad_weight_shift
from fst_jax.kernels.prune_compress import decompress_2to4 as decompress_2to4
from fst_jax.kernels.prune_compress import prune_compress_2to4 as prune_compress_2to4
from fst_jax.kernels.sparse_matmul import sparse_matmul as sparse_matmul

__all__ = [
    "decompress_2to4",
    "grad_weight_shift",
    "prune_compress_2to4",
    "sparse_matmul",
]
