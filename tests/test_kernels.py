"""The Pallas kernels against their pure-jnp references, and lowered for CUDA on any machine.

Tests written once, run twice: :class:`TestKernels` runs the compiled kernels where a GPU is
present; :class:`TestKernelsInterpret` runs the same assertions in the Pallas interpreter
everywhere. The interpreter fills every output with NaN (floats) or the dtype's minimum
(integers; 0 for the uint8 metadata, which no real metadata byte is) before the kernel runs, so
an element a kernel fails to write shows up in the exact comparisons below;
:func:`test_interpreter_poisons_outputs` checks that this still holds.
"""

import importlib
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

import fst_jax
from fst_jax.kernels import decompress_2to4, grad_weight_shift, prune_compress_2to4, sparse_matmul
from fst_jax._compat import TRITON_DEPRECATION_FILTER, lower_for_cuda

# The submodules (their names are shadowed by the re-exported functions of the same name).
prune_compress_mod = importlib.import_module("fst_jax.kernels.prune_compress")
sparse_matmul_mod = importlib.import_module("fst_jax.kernels.sparse_matmul")
grad_weight_mod = importlib.import_module("fst_jax.kernels.grad_weight_shift")

# The references, jitted (one compilation instead of many eager ops).
PRUNE_COMPRESS_REF = jax.jit(prune_compress_mod._reference, static_argnums=1)
DECOMPRESS_REF = jax.jit(prune_compress_mod._decompress_reference, static_argnums=2)
SPARSE_MATMUL_REF = jax.jit(sparse_matmul_mod._reference, static_argnames="precision")
GRAD_WEIGHT_REF = jax.jit(grad_weight_mod._reference, static_argnums=(2, 3),
                          static_argnames="precision")

FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)
SPECIALS = (math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0, 2.0, -2.0)
PATTERNS = ("even", "odd", "checkerboard")
HIGHEST = jax.lax.Precision.HIGHEST


def tol(dtype, k, tf32=False):
    """Absolute and relative tolerance of a K-term float32-accumulated product, by output dtype.

    ``tf32``: float32 inputs multiplied in TF32 (the Triton default for float32 unless
    ``precision=HIGHEST``; the interpreter on CPU always multiplies in float32).
    """
    base = {jnp.float32: 1e-3 if tf32 else 2e-6, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}[dtype]
    return dict(atol=base * math.sqrt(k), rtol=base * math.sqrt(k))


def f64(x):
    return np.asarray(x).astype(np.float64)


def bits(x):
    """The bit patterns of a float array (distinguishes -0.0 from 0.0 and NaN payloads)."""
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def normal(key, shape, dtype):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(dtype)


def specials(key, shape, dtype):
    idx = jax.random.randint(jax.random.key(key), shape, 0, len(SPECIALS))
    return jnp.asarray(np.array(SPECIALS, np.float32))[idx].astype(dtype)


@pytest.mark.filterwarnings(TRITON_DEPRECATION_FILTER)  # jax >= 0.11, compiled on a GPU
class TestKernels:
    """Every kernel against its ``_reference``; compiled (GPU only) unless ``INTERPRET``."""

    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _needs_gpu(self):
        if not self.INTERPRET and jax.default_backend() != "gpu":
            pytest.skip("compiled Pallas-Triton kernels need a GPU (the interpret subclass runs)")

    def tol(self, dtype, k, precision):
        tf32 = not self.INTERPRET and precision != HIGHEST
        return tol(dtype, k, tf32=tf32)

    # -- prune_compress_2to4 / decompress_2to4 -------------------------------------------------

    @pytest.mark.parametrize(
        ("shape", "axis", "block", "dtype"),
        [
            ((64, 64), -1, (16, 256), jnp.float32),  # one block, clipped to the array
            ((20, 3, 44), 2, (8, 16), jnp.bfloat16),  # L = 44: odd group count, partial blocks
            ((12, 5, 2), 0, (4, 8), jnp.float32),  # compressed axis first, the others flattened
        ],
    )
    def test_prune_compress(self, shape, axis, block, dtype):
        x = normal(1, shape, dtype)
        self._check_prune_compress(x, axis, block)

    @pytest.mark.parametrize("dtype", FLOATS)
    def test_prune_compress_ties_nan_inf_zeros(self, dtype):
        """Exactly mask_2to4 on ties, ±0, NaN and ±inf; and on all-zero / all-NaN groups."""
        x = specials(2, (24, 40), dtype)
        x = x.at[0].set(0.0).at[1].set(jnp.nan).at[2].set(-jnp.inf).at[3, :8].set(-0.0)
        self._check_prune_compress(x, -1, (8, 16))

    def _check_prune_compress(self, x, axis, block):
        values, metadata = prune_compress_2to4(x, axis, interpret=self.INTERPRET, block=block)
        want_values, want_metadata = PRUNE_COMPRESS_REF(x, axis)
        assert values.dtype == x.dtype and metadata.dtype == jnp.uint8
        np.testing.assert_array_equal(bits(values), bits(want_values))
        np.testing.assert_array_equal(np.asarray(metadata), np.asarray(want_metadata))
        # The round trip is x ⊙ mask_2to4(x), bit for bit; the metadata alone is the mask.
        dense = decompress_2to4(values, metadata, axis, interpret=self.INTERPRET, block=block)
        mask = fst_jax.mask_2to4(x, axis)
        np.testing.assert_array_equal(bits(dense), bits(fst_jax.apply_mask(x, mask)))
        ones = DECOMPRESS_REF(jnp.ones_like(values), metadata, axis)
        np.testing.assert_array_equal(np.asarray(ones) != 0, np.asarray(mask))

    def test_decompress_matches_reference(self):
        values, metadata = PRUNE_COMPRESS_REF(normal(3, (6, 8, 24), jnp.bfloat16), 1)
        got = decompress_2to4(values, metadata, 1, interpret=self.INTERPRET, block=(16, 8))
        want = DECOMPRESS_REF(values, metadata, 1)
        np.testing.assert_array_equal(bits(got), bits(want))

    # -- sparse_matmul ---------------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("m", "k", "n", "blocks", "dtype"),
        [
            (64, 64, 64, dict(block_m=64, block_n=64, block_k=64, precision=HIGHEST), jnp.float32),
            (64, 64, 64, dict(block_m=32, block_n=16, block_k=64), jnp.bfloat16),
            (64, 64, 64, dict(), jnp.float16),
            (40, 136, 24, dict(block_m=16, block_n=16, block_k=64), jnp.float32),  # partial blocks
            (24, 68, 40, dict(block_m=16, block_n=32, block_k=64), jnp.bfloat16),  # K % 8 == 4
        ],
    )
    def test_sparse_matmul(self, dtype, m, k, n, blocks):
        a = normal(4, (m, k), dtype)
        b = normal(5, (k, n), dtype)
        values, metadata = PRUNE_COMPRESS_REF(a, -1)
        got = sparse_matmul(values, metadata, b, interpret=self.INTERPRET, **blocks)
        want = SPARSE_MATMUL_REF(values, metadata, b, precision=HIGHEST)
        assert got.shape == (m, n) and got.dtype == dtype
        tolerance = self.tol(dtype, k, blocks.get("precision"))
        np.testing.assert_allclose(f64(got), f64(want), **tolerance)
        # ... which is the masked dense product.
        dense = f64(fst_jax.apply_mask(a, fst_jax.mask_2to4(a))) @ f64(b)
        np.testing.assert_allclose(f64(got), dense, **tolerance)

    def test_sparse_matmul_preferred_element_type(self):
        a, b = normal(6, (32, 64), jnp.bfloat16), normal(7, (64, 32), jnp.bfloat16)
        values, metadata = PRUNE_COMPRESS_REF(a, -1)
        got = sparse_matmul(values, metadata, b, interpret=self.INTERPRET,
                            preferred_element_type=jnp.float32)
        want = sparse_matmul_mod._reference(values, metadata, b, preferred_element_type=jnp.float32)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(f64(got), f64(want), **tol(jnp.float32, 64))  # bf16 products

    # -- grad_weight_shift -----------------------------------------------------------------------

    @pytest.mark.parametrize("pattern", PATTERNS)
    @pytest.mark.parametrize(
        ("shape", "scale", "blocks", "dtype"),
        [
            ((2, 16, 64, 32), 0.03, dict(block_k=64, block_o=32, block_t=16), jnp.float32),
            ((2, 8, 32, 16), 0.5, dict(precision=HIGHEST), jnp.float32),
            ((3, 12, 40, 24), 1.0, dict(block_k=32, block_o=16, block_t=16), jnp.bfloat16),
            ((1, 8, 32, 16), 0.0, dict(), jnp.float16),  # no shift; B·T/2 < block_t
        ],
    )
    def test_grad_weight_shift(self, dtype, pattern, shape, scale, blocks):
        b, t, k, o = shape
        a, dy = normal(8, (b, t, k), dtype), normal(9, (b, t, o), dtype)
        got = grad_weight_shift(a, dy, pattern, scale, interpret=self.INTERPRET, **blocks)
        want = GRAD_WEIGHT_REF(a, dy, pattern, scale, precision=HIGHEST)
        assert got.shape == (k, o) and got.dtype == dtype
        np.testing.assert_allclose(f64(got), f64(want), **self.tol(dtype, b * t, blocks.get("precision")))


class TestKernelsInterpret(TestKernels):
    INTERPRET = True


def test_interpreter_poisons_outputs():
    """An output element the kernel never writes reads NaN / the integer minimum in interpret mode."""

    def kernel(x_ref, f_ref, i_ref):
        del x_ref, f_ref, i_ref

    f, i = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((16,), jnp.float32),
                   jax.ShapeDtypeStruct((16,), jnp.int32)),
        compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
        interpret=True,
    )(jnp.zeros((16,)))
    assert np.isnan(np.asarray(f)).all()
    assert (np.asarray(i) == np.iinfo(np.int32).min).all()


@pytest.mark.parametrize(("pattern", "mode"), [("checkerboard", "masked"), ("checkerboard", "compact"),
                                               ("odd", "compact")])
def test_grad_weight_reference_is_the_library_gradient(pattern, mode):
    """grad_weight_shift's reference is the weight gradient of fst_jax.sparsify (XLA backend)."""
    a, w, dy = normal(10, (2, 8, 16), jnp.float32), normal(11, (16, 12), jnp.float32), normal(
        12, (2, 8, 12), jnp.float32)
    cfg = fst_jax.FSTConfig(skip_first=False, skip_last=False, sr_ste=0.0, pattern=pattern,
                            restore_scale=0.5, mode=mode)
    _, pull = jax.vjp(lambda w: fst_jax.sparsify(lambda w, a: a @ w, cfg)(w, a), w)
    want = pull(dy)[0]
    got = grad_weight_mod._reference(a, dy, pattern, 0.5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **tol(jnp.float32, 16))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: prune_compress_2to4(jnp.zeros((4, 6))), "multiple of 4"),
        (lambda: prune_compress_2to4(jnp.zeros((4, 8)), block=(4, 12)), r"block\[1\]=12"),
        (lambda: prune_compress_2to4(jnp.zeros((4, 8)), axis=2), "axis=2"),
        (lambda: decompress_2to4(jnp.zeros((4, 4)), jnp.zeros((4, 2), jnp.uint8)), "metadata"),
        (lambda: sparse_matmul(jnp.zeros((4, 4)), jnp.zeros((4, 1), jnp.uint8), jnp.zeros((6, 2))),
         "argument b has shape"),
        (lambda: sparse_matmul(jnp.zeros((4, 4)), jnp.zeros((4, 1), jnp.uint8), jnp.zeros((8, 2)),
                               block_k=32), "block_k=32"),
        (lambda: grad_weight_shift(jnp.zeros((1, 6, 8)), jnp.zeros((1, 4, 8)), "even", 0.0),
         "same B and T"),
        (lambda: grad_weight_shift(jnp.zeros((1, 5, 8)), jnp.zeros((1, 5, 8)), "even", 0.0),
         "must be even"),
        (lambda: grad_weight_shift(jnp.zeros((1, 4, 8)), jnp.zeros((1, 4, 8)), "diag", 0.0),
         "pattern='diag'"),
        (lambda: grad_weight_shift(jnp.zeros((1, 4, 8)), jnp.zeros((1, 4, 8)), "checkerboard",
                                   0.0, block_k=16), "block_k=16"),
    ],
)
def test_invalid_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda: prune_compress_2to4(jnp.zeros((4, 8), jnp.int32)),
        lambda: sparse_matmul(jnp.zeros((4, 4)), jnp.zeros((4, 1), jnp.uint8),
                              jnp.zeros((8, 2), jnp.bfloat16)),
        lambda: grad_weight_shift(jnp.zeros((1, 4, 8)), jnp.zeros((1, 4, 8), jnp.float16), "odd", 0.0),
        lambda: grad_weight_shift(jnp.zeros((1, 4, 8)), jnp.zeros((1, 4, 8)), "odd", jnp.float32(1)),
    ],
)
def test_invalid_dtypes(call):
    with pytest.raises(TypeError):
        call()


# -- lowering for CUDA on any machine --------------------------------------------------------------


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


LOWERINGS = {
    "prune_compress_f32_16x256": (
        lambda x: prune_compress_2to4(x, block=(16, 256)), [_sds((512, 1024), jnp.float32)]),
    "prune_compress_bf16_32x64_axis0": (
        lambda x: prune_compress_2to4(x, 0, block=(32, 64), num_warps=2),
        [_sds((1000, 96), jnp.bfloat16)]),
    "decompress_f16_16x256": (
        lambda v, m: decompress_2to4(v, m, block=(16, 256)),
        [_sds((256, 512), jnp.float16), _sds((256, 128), jnp.uint8)]),
    "decompress_f32_64x32": (
        lambda v, m: decompress_2to4(v, m, block=(64, 32), num_warps=8),
        [_sds((100, 36), jnp.float32), _sds((100, 9), jnp.uint8)]),
    "sparse_matmul_bf16_64x64x128": (
        lambda v, m, b: sparse_matmul(v, m, b),
        [_sds((512, 512), jnp.bfloat16), _sds((512, 128), jnp.uint8), _sds((1024, 256), jnp.bfloat16)]),
    "sparse_matmul_f16_128x128x64_f32out": (
        lambda v, m, b: sparse_matmul(v, m, b, block_m=128, block_n=128, block_k=64, num_warps=8,
                                      num_stages=4, preferred_element_type=jnp.float32),
        [_sds((300, 100), jnp.float16), _sds((300, 25), jnp.uint8), _sds((200, 260), jnp.float16)]),
    "sparse_matmul_f32_16x32x256_highest": (
        lambda v, m, b: sparse_matmul(v, m, b, block_m=16, block_n=32, block_k=256, num_warps=2,
                                      precision=HIGHEST),
        [_sds((64, 256), jnp.float32), _sds((64, 64), jnp.uint8), _sds((512, 64), jnp.float32)]),
    "grad_weight_even_bf16_64x64x32": (
        lambda a, d: grad_weight_shift(a, d, "even", 0.03),
        [_sds((8, 128, 256), jnp.bfloat16), _sds((8, 128, 512), jnp.bfloat16)]),
    "grad_weight_checkerboard_f32_32x16x64_highest": (
        lambda a, d: grad_weight_shift(a, d, "checkerboard", 1.0, block_k=32, block_o=16,
                                       block_t=64, num_warps=2, precision=HIGHEST),
        [_sds((3, 20, 72), jnp.float32), _sds((3, 20, 40), jnp.float32)]),
    "grad_weight_odd_f32_tf32_64x32x32": (
        lambda a, d: grad_weight_shift(a, d, "odd", 0.03, block_o=32),
        [_sds((2, 64, 128), jnp.float32), _sds((2, 64, 96), jnp.float32)]),
    "grad_weight_odd_f16_128x128x16_noshift": (
        lambda a, d: grad_weight_shift(a, d, "odd", 0.0, block_k=128, block_o=128, block_t=16,
                                       num_warps=8),
        [_sds((4, 64, 256), jnp.float16), _sds((4, 64, 256), jnp.float16)]),
}


def _outside_kernels(text):
    """The lowered text without the serialized Triton modules (the custom calls' ``ir`` strings)."""
    return re.sub(r'\bir = "(?:[^"\\]|\\.)*"', 'ir = ""', text)


@pytest.mark.parametrize("name", sorted(LOWERINGS))
def test_lowers_for_cuda(name):
    fn, args = LOWERINGS[name]
    text = lower_for_cuda(fn, *args)
    assert "__gpu$xla.gpu.triton" in text
    outside = _outside_kernels(text)
    assert outside.count('ir = ""') == text.count("__gpu$xla.gpu.triton")  # every kernel stripped
    assert "dot_general" not in outside
