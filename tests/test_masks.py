"""Property tests of fst_jax._masks against independent numpy references."""

import functools
import math

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings

import references

from fst_jax._masks import (
    TRANSPOSABLE_PATTERNS,
    apply_mask,
    gradient_shift,
    mask_2to4,
    token_mask,
    transposable_mask_2to4,
)

FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
TIES = (0.0, -0.0, 1.0, -1.0, 2.0, -2.0)
SPECIALS = (math.nan, math.inf, -math.inf, 0.0, 1.0, -2.0)
# Multiples of 1/8 with at most 8 significant bits: exact in bf16, f16 and f32, and so are the
# sums of 8 of them, so float32 scores in the implementation equal float64 scores here.
EXACT = st.integers(-255, 255).map(lambda i: i / 8)


# ---------------------------------------------------------------------------------------------
# References: tests/references.py (numpy, from DESIGN.md §1), and an enumeration of the
# transposable patterns by brute force, independent of both the library and the references.


def brute_force_patterns() -> np.ndarray:
    """All 4x4 0/1 matrices with two ones per row and column, in decreasing binary order.

    Entry (0, 0) is the most significant bit; decreasing binary order is the documented
    lexicographic order over the row pairs (0,1) > (0,2) > ... > (2,3).
    """
    bits = (np.arange(2**16)[::-1, None] >> np.arange(15, -1, -1)) & 1
    p = bits.reshape(-1, 4, 4).astype(bool)
    return p[(p.sum(-1) == 2).all(-1) & (p.sum(-2) == 2).all(-1)]


PATTERNS = brute_force_patterns()


def tiles_of(a: np.ndarray, axes: tuple[int, int]) -> np.ndarray:
    """[..., K, ..., O, ...] -> [batch..., K/4, O/4, 4, 4]."""
    a = np.moveaxis(a, axes, (-2, -1))
    *batch, k, o = a.shape
    return a.reshape(*batch, k // 4, 4, o // 4, 4).swapaxes(-3, -2)


def pattern_scores(x: np.ndarray, axes: tuple[int, int]) -> np.ndarray:
    """Σ|w| kept by each of the 90 patterns, per tile: [batch..., K/4, O/4, 90]."""
    t = tiles_of(references.magnitude(x), axes)
    return np.where(PATTERNS, t[..., None, :, :], 0.0).sum((-2, -1))


def kept_per_group(mask: np.ndarray, axis: int) -> np.ndarray:
    m = np.moveaxis(np.asarray(mask), axis, -1)
    return m.reshape(*m.shape[:-1], -1, 4).sum(-1)


# ---------------------------------------------------------------------------------------------
# Strategies.


@st.composite
def grouped_arrays(draw, elements, dtypes=FLOAT_DTYPES, max_ndim=4):
    """(x as a jax array, axis): x.shape[axis] a multiple of 4, axis possibly negative."""
    ndim = draw(st.integers(1, max_ndim))
    axis = draw(st.integers(-ndim, ndim - 1))
    shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
    shape[axis] = 4 * draw(st.integers(1, 3))
    values = draw(hnp.arrays(np.float64, shape, elements=elements))
    dtype = draw(st.sampled_from(dtypes))
    return jnp.asarray(values).astype(dtype), axis


@st.composite
def tiled_arrays(draw, elements, dtypes=FLOAT_DTYPES):
    """(x, (k_axis, o_axis)): distinct axes in either order, both lengths multiples of 4."""
    ndim = draw(st.integers(2, 4))
    k_axis, o_axis = draw(st.permutations(range(ndim)))[:2]
    shape = [draw(st.integers(1, 2)) for _ in range(ndim)]
    shape[k_axis] = 4 * draw(st.integers(1, 2))
    shape[o_axis] = 4 * draw(st.integers(1, 2))
    k_axis -= draw(st.sampled_from((0, ndim)))
    o_axis -= draw(st.sampled_from((0, ndim)))
    values = draw(hnp.arrays(np.float64, shape, elements=elements))
    dtype = draw(st.sampled_from(dtypes))
    return jnp.asarray(values).astype(dtype), (k_axis, o_axis)


# ---------------------------------------------------------------------------------------------
# mask_2to4


def check_mask_2to4(x, axis):
    mask = mask_2to4(x, axis)
    assert mask.dtype == jnp.bool_ and mask.shape == x.shape
    assert (kept_per_group(mask, axis) == 2).all()
    np.testing.assert_array_equal(mask, references.mask_2to4(np.asarray(x), axis))


@settings(max_examples=30)
@given(grouped_arrays(st.floats(width=16)))
def test_mask_2to4_keeps_largest(case):
    check_mask_2to4(*case)


@settings(max_examples=30)
@given(grouped_arrays(st.sampled_from(TIES)))
def test_mask_2to4_ties_keep_lower_index(case):
    check_mask_2to4(*case)


@settings(max_examples=30)
@given(grouped_arrays(st.sampled_from(SPECIALS)))
def test_mask_2to4_nan_and_inf_are_largest(case):
    check_mask_2to4(*case)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_mask_2to4_zeros_and_examples(dtype):
    zeros = jnp.zeros((3, 8), dtype)
    np.testing.assert_array_equal(mask_2to4(zeros), np.tile([1, 1, 0, 0], (3, 2)).astype(bool))
    x = jnp.array([1.0, jnp.nan, -jnp.inf, 5.0, jnp.nan, 0.0, jnp.nan, jnp.inf], dtype)
    np.testing.assert_array_equal(mask_2to4(x), [0, 1, 1, 0, 1, 0, 1, 0])


@settings(max_examples=30)
@given(grouped_arrays(st.integers(-128, 127), dtypes=(jnp.int8, jnp.int32)))
def test_mask_2to4_integers(case):
    check_mask_2to4(*case)


@settings(max_examples=10)
@given(grouped_arrays(st.sampled_from(TIES + SPECIALS)))
def test_mask_2to4_jit_equals_eager(case):
    x, axis = case
    jitted = jax.jit(mask_2to4, static_argnums=1)(x, axis)
    np.testing.assert_array_equal(jitted, mask_2to4(x, axis))


def test_mask_2to4_errors():
    with pytest.raises(ValueError, match=r"\(2, 6\).*axis 1.*multiple of 4"):
        mask_2to4(jnp.ones((2, 6)))
    with pytest.raises(ValueError, match=r"\(8, 3\).*axis 1.*multiple of 4"):
        mask_2to4(jnp.ones((8, 3)), axis=-1)
    with pytest.raises(ValueError, match="out of range"):
        mask_2to4(jnp.ones((8, 4)), axis=2)
    with pytest.raises(ValueError, match="out of range"):
        mask_2to4(jnp.ones((8, 4)), axis=-3)


# ---------------------------------------------------------------------------------------------
# apply_mask


@given(
    hnp.arrays(np.float32, (3, 8), elements=st.sampled_from(SPECIALS)),
    hnp.arrays(np.bool_, (3, 8)),
    st.sampled_from(FLOAT_DTYPES),
)
def test_apply_mask_drops_nan(x, mask, dtype):
    x = jnp.asarray(x).astype(dtype)
    out = apply_mask(x, jnp.asarray(mask))
    assert out.dtype == x.dtype and out.shape == x.shape
    out = np.asarray(out).astype(np.float64)
    assert (out[~mask] == 0).all()
    np.testing.assert_array_equal(out[mask], np.asarray(x).astype(np.float64)[mask])


# ---------------------------------------------------------------------------------------------
# transposable_mask_2to4


def test_pattern_table():
    assert TRANSPOSABLE_PATTERNS.shape == (90, 4, 4) and TRANSPOSABLE_PATTERNS.dtype == np.bool_
    assert len({p.tobytes() for p in TRANSPOSABLE_PATTERNS}) == 90
    assert (TRANSPOSABLE_PATTERNS.sum(-1) == 2).all() and (TRANSPOSABLE_PATTERNS.sum(-2) == 2).all()
    np.testing.assert_array_equal(TRANSPOSABLE_PATTERNS, PATTERNS)  # the documented order
    np.testing.assert_array_equal(references.PATTERNS, PATTERNS)  # the references enumerate the same


def check_transposable(x, axes):
    mask = np.asarray(transposable_mask_2to4(x, axes))
    assert mask.dtype == np.bool_ and mask.shape == x.shape
    assert (kept_per_group(mask, axes[0]) == 2).all() and (kept_per_group(mask, axes[1]) == 2).all()
    scores = pattern_scores(np.asarray(x), axes)
    chosen = np.where(tiles_of(mask, axes), tiles_of(references.magnitude(np.asarray(x)), axes), 0.0)
    np.testing.assert_array_equal(chosen.sum((-2, -1)), scores.max(-1))  # maximises Σ|w|
    np.testing.assert_array_equal(mask, references.transposable_mask(np.asarray(x), *axes))  # first maximiser


@settings(max_examples=20)
@given(tiled_arrays(EXACT))
def test_transposable_maximises_sum(case):
    check_transposable(*case)


@settings(max_examples=20)
@given(tiled_arrays(st.sampled_from(TIES)))
def test_transposable_ties_first_pattern(case):
    check_transposable(*case)


@settings(max_examples=20)
@given(tiled_arrays(st.sampled_from(SPECIALS) | EXACT))
def test_transposable_nan_counts_as_inf(case):
    check_transposable(*case)


@settings(max_examples=8)
@given(tiled_arrays(st.sampled_from(SPECIALS) | EXACT))
def test_transposable_jit_equals_eager(case):
    x, axes = case
    jitted = jax.jit(transposable_mask_2to4, static_argnums=1)(x, axes)
    np.testing.assert_array_equal(jitted, transposable_mask_2to4(x, axes))


def test_transposable_examples():
    # A NaN scores +inf, so every pattern keeping it ties at +inf and the first of those wins,
    # whatever the other entries: rows keep (0,3), (0,1), (1,2), (2,3), and (3, 0) is dropped.
    w = jnp.zeros((4, 4)).at[0, 3].set(jnp.nan).at[3, 0].set(1.0)
    first_with_03 = PATTERNS[np.flatnonzero(PATTERNS[:, 0, 3])[0]]
    rows = [[1, 0, 0, 1], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    np.testing.assert_array_equal(first_with_03, rows)
    np.testing.assert_array_equal(transposable_mask_2to4(w), first_with_03)
    # Finite values: the only pattern keeping all four corners wins.
    w = jnp.array([[9.0, 0, 0, -1], [0, 0, 0, 0], [0, 0, 0, 0], [-1, 0, 0, 9]])
    np.testing.assert_array_equal(
        transposable_mask_2to4(w), [[1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]]
    )
    # All zeros: the first pattern, rows keep (0,1), (0,1), (2,3), (2,3).
    zeros = jnp.zeros((4, 8))
    np.testing.assert_array_equal(transposable_mask_2to4(zeros), np.tile(PATTERNS[0], 2))
    # axes=(o, k) is the transpose problem of axes=(k, o).
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 12)), jnp.float32)
    np.testing.assert_array_equal(
        transposable_mask_2to4(x, axes=(-1, -2)),
        np.swapaxes(transposable_mask_2to4(jnp.swapaxes(x, -1, -2)), -1, -2),
    )


def test_transposable_errors():
    with pytest.raises(ValueError, match=r"\(4, 6\).*multiples of 4"):
        transposable_mask_2to4(jnp.ones((4, 6)))
    with pytest.raises(ValueError, match=r"\(6, 4, 4\).*\(0, 2\).*multiples of 4"):
        transposable_mask_2to4(jnp.ones((6, 4, 4)), axes=(0, 2))
    with pytest.raises(ValueError, match="distinct"):
        transposable_mask_2to4(jnp.ones((4, 4)), axes=(1, -1))
    with pytest.raises(ValueError, match="out of range"):
        transposable_mask_2to4(jnp.ones((4, 4)), axes=(0, 2))


# ---------------------------------------------------------------------------------------------
# token_mask


@st.composite
def token_cases(draw, token_len=st.integers(1, 5)):
    ndim = draw(st.integers(1, 4))
    shape = [draw(st.integers(1, 4)) for _ in range(ndim)]
    axes = draw(st.permutations(range(ndim)))
    token_axis, contracting = axes[0], axes[1 : 1 + draw(st.integers(0, ndim - 1))]
    shape[token_axis] = draw(token_len)
    negate = draw(st.booleans())
    pattern = draw(st.sampled_from(("checkerboard", "even", "odd")))
    return tuple(shape), token_axis - ndim * negate, token_axis, contracting, pattern


@given(token_cases())
def test_token_mask_matches_reference(case):
    shape, token_axis, t, contracting, pattern = case
    mask = token_mask(shape, token_axis=token_axis, contracting_axes=contracting, pattern=pattern)
    assert mask.dtype == jnp.bool_ and mask.shape == shape
    np.testing.assert_array_equal(mask, references.fixed_mask(shape, t, tuple(contracting), pattern))


@given(token_cases(token_len=st.sampled_from((4, 8, 12))))
def test_token_mask_keeps_two_of_four_tokens(case):
    shape, token_axis, _, contracting, pattern = case
    mask = token_mask(shape, token_axis=token_axis, contracting_axes=contracting, pattern=pattern)
    assert (kept_per_group(mask, token_axis) == 2).all()


def test_token_mask_unsorted_contracting_axes():
    # k = i3 * shape[1] + i1 has the parity of i1 here (shape[1] = 4), while the sorted order's
    # k = i1 * shape[3] + i3 has the parity of i1 + i3 (shape[3] = 3): the order matters.
    shape = (2, 4, 4, 3)
    expected = np.zeros(shape, bool)
    for i0, i1, i2, i3 in np.ndindex(*shape):
        expected[i0, i1, i2, i3] = (i2 + i3 * 4 + i1) % 2 == 0
    kwargs = dict(token_axis=2, contracting_axes=(3, 1), pattern="checkerboard")
    np.testing.assert_array_equal(token_mask(shape, **kwargs), expected)
    jitted = jax.jit(functools.partial(token_mask, shape, **kwargs))  # static shape: jit-able
    np.testing.assert_array_equal(jitted(), expected)


def test_token_mask_errors():
    with pytest.raises(ValueError, match="'checkerboard', 'even', 'odd'"):
        token_mask((4, 4), token_axis=0, contracting_axes=(1,), pattern="random")
    with pytest.raises(ValueError, match="token_axis"):
        token_mask((4, 4), token_axis=1, contracting_axes=(-1,), pattern="even")
    with pytest.raises(ValueError, match="out of range"):
        token_mask((4, 4), token_axis=2, contracting_axes=(1,), pattern="even")
    with pytest.raises(ValueError, match="out of range"):
        token_mask((4, 4), token_axis=0, contracting_axes=(-3,), pattern="even")
    with pytest.raises(ValueError, match="repeats"):
        token_mask((4, 4, 4), token_axis=0, contracting_axes=(1, -2), pattern="even")


# ---------------------------------------------------------------------------------------------
# gradient_shift


def to_dtype(x: np.ndarray, dtype) -> np.ndarray:
    return x.astype(ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.dtype(dtype))


@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=5),
        elements=st.floats(-1e3, 1e3, width=16),
    ),
    st.data(),
    st.sampled_from(FLOAT_DTYPES),
    st.floats(-2.0, 2.0, width=16),
)
def test_gradient_shift_matches_roll(values, data, dtype, scale):
    axis = data.draw(st.integers(-values.ndim, values.ndim - 1))
    dy = jnp.asarray(values).astype(dtype)
    out = gradient_shift(dy, axis, scale)
    assert out.dtype == dy.dtype and out.shape == dy.shape
    dy32 = np.asarray(dy).astype(np.float32)
    expected = dy32 + np.float32(scale) * np.roll(dy32, 1, axis)  # f32, then cast back
    np.testing.assert_array_equal(np.asarray(out), to_dtype(expected, dtype))


def test_gradient_shift_wraps():
    dy = jnp.arange(8.0).reshape(2, 4)
    # [[0, 1, 2, 3], [4, 5, 6, 7]]: t = 0 adds t = 3 (axis 1); row 0 adds row 1 (axis 0).
    np.testing.assert_array_equal(gradient_shift(dy, 1, 0.5), [[1.5, 1, 2.5, 4], [7.5, 7, 8.5, 10]])
    np.testing.assert_array_equal(gradient_shift(dy, 0, 1.0), [[4, 6, 8, 10], [4, 6, 8, 10]])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("scale", [0, 0.0, -0.0])
def test_gradient_shift_zero_scale_is_identity(dtype, scale):
    dy = jnp.array([[1.0, jnp.nan, -0.0, 3.0e-3], [jnp.inf, 2.0, 5.0, -1.0]], dtype)
    out = gradient_shift(dy, -1, scale)
    assert out.dtype == dy.dtype
    np.testing.assert_array_equal(np.asarray(out).view(np.uint8), np.asarray(dy).view(np.uint8))


def test_gradient_shift_errors():
    with pytest.raises(ValueError, match="out of range"):
        gradient_shift(jnp.ones((4, 4)), 2, 0.5)
