"""Rotating activation patterns (issue 14): masks, draws and the compact grad-weight product.

References are written here from DESIGN.md §1 and from the authors' code
(github.com/WeixiangXu/FST, Sparse_Conv_Extension_CUDA/src/cuda/sparse_conv_cuda.cpp, lines
356–377), independently of the implementation.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fst_jax._masks import (
    AUTHORS_PATTERNS,
    TOKEN_PATTERNS,
    draw_pattern,
    pattern_phase,
    rotating_token_mask,
    token_mask,
)
from fst_jax._rotate import (
    compact_layout,
    parts_grad_weight,
    select_parts,
    from_parts,
)

# ---------------------------------------------------------------------------------------------
# References.


def authors_columns_mask(num_k: int, num_p: int, rand_flag: float) -> np.ndarray:
    """The authors' zeroing of the im2col matrix ``columns[K, L]``, transcribed (keep = True)."""
    keep = np.ones((num_k, num_p), bool)
    if rand_flag <= 1 / 4:
        view = keep.reshape(-1, 4)  # columns.view({-1, 4}) (a view: writes go through)
        view[0::2, 0::2] = False
        view[1::2, 1::2] = False
    elif rand_flag <= 2 / 4:
        keep[:, 0::2] = False
    elif rand_flag <= 3 / 4:
        keep[0::2, 0::2] = False
        keep[1::2, 1::2] = False
    else:
        keep[1::2, 0::2] = False
        keep[0::2, 1::2] = False
    return keep


AUTHORS_FLAGS = (0.1, 0.4, 0.6, 0.9)  # one rand_flag in each quarter, the authors' order


def ref_keep(name: str, p: np.ndarray, k: np.ndarray, n: int) -> np.ndarray:
    """DESIGN.md §1 / issue 14's four patterns (and two complements) over flat p, k; N tokens."""
    alt = (p + p // 4 + k * ((n // 4) % 2)) % 2 == 1
    return {
        "alternating": alt,
        "anti_alternating": ~alt,
        "odd": p % 2 == 1,
        "even": p % 2 == 0,
        "anti_checkerboard": (k + p) % 2 == 1,
        "checkerboard": (k + p) % 2 == 0,
    }[name]


def ref_mask(shape, token_axis, contracting_axes, batch_axes, name):
    """The mask over an activation: p row-major over the free axes (token innermost)."""
    nd = len(shape)
    t = token_axis % nd
    k_axes = [a % nd for a in contracting_axes]
    b_axes = [a % nd for a in batch_axes]
    free = [a for a in range(nd) if a not in k_axes + b_axes and a != t] + [t]
    idx = np.indices(shape)
    p = np.zeros(shape, np.int64)
    for a in free:
        p = p * shape[a] + idx[a]
    k = np.zeros(shape, np.int64)
    for a in k_axes:
        k = k * shape[a] + idx[a]
    n = math.prod(shape[a] for a in free)
    return ref_keep(name, p, k, n)


def ref_grad_weight(a, w_shape, dy, dn, weight_side, keep, scale):
    """(M ⊙ A)ᵀ·dY' in float64 with numpy's einsum: dY' rolled by one along t, within sequences."""
    a64 = np.where(keep, np.asarray(a, np.float64), 0.0)
    (lc, rc), (lb, rb) = dn
    a_c, a_b, w_c, w_b = (rc, rb, lc, lb) if weight_side == 0 else (lc, lb, rc, rb)
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    a_sub = [next(letters) for _ in range(a64.ndim)]
    w_sub = [next(letters) for _ in w_shape]
    for i, j in zip(a_c, w_c):
        w_sub[j] = a_sub[i]
    for i, j in zip(a_b, w_b):
        w_sub[j] = a_sub[i]
    a_free = [a_sub[i] for i in range(a64.ndim) if i not in tuple(a_c) + tuple(a_b)]
    w_free = [w_sub[j] for j in range(len(w_shape)) if j not in tuple(w_c) + tuple(w_b)]
    out_sub = [a_sub[i] for i in a_b] + (w_free + a_free if weight_side == 0 else a_free + w_free)
    t_out = out_sub.index(a_free[-1])
    dy64 = np.asarray(dy, np.float64)
    dy_shift = dy64 + scale * np.roll(dy64, 1, axis=t_out)
    spec = f"{''.join(a_sub)},{''.join(out_sub)}->{''.join(w_sub)}"
    return np.einsum(spec, a64, dy_shift)


# Layouts: (act shape, weight shape, dimension_numbers, weight_side).
LAYOUTS = {
    "2d": ((16, 8), (8, 12), (((1,), (0,)), ((), ())), 1),
    "3d": ((2, 8, 8), (8, 4), (((2,), (0,)), ((), ())), 1),
    "3d_T4_odd_groups": ((3, 4, 8), (8, 4), (((2,), (0,)), ((), ())), 1),  # N/4 odd
    "3d_T_odd": ((2, 5, 8), (8, 4), (((2,), (0,)), ((), ())), 1),
    "3d_N_odd": ((3, 7, 4), (4, 8), (((2,), (0,)), ((), ())), 1),
    "3d_T6": ((2, 6, 8), (8, 4), (((2,), (0,)), ((), ())), 1),  # N = 12: groups cross sequences
    "weight_lhs": ((2, 6, 8), (4, 8), (((1,), (2,)), ((), ())), 0),  # Y = W·Aᵀ: [O, B, T]
    "contract_first": ((8, 10), (8, 4), (((0,), (0,)), ((), ())), 1),  # A: [K, N]
    "two_contract": ((6, 2, 4), (2, 4, 4), (((1, 2), (0, 1)), ((), ())), 1),  # K = 2·4
    "batch_dims": ((3, 6, 8), (3, 8, 4), (((2,), (1,)), ((0,), (0,))), 1),  # per-batch problems
    "wide_out": ((2, 4, 8), (8, 2, 4), (((2,), (0,)), ((), ())), 1),  # weight free dims (2, 4)
}


def act_axes(layout):
    """(token_axis, contracting_axes, batch_axes) of the activation, from the dimension numbers."""
    a_shape, _, ((lc, rc), (lb, rb)), side = layout
    a_c, a_b = (rc, rb) if side == 0 else (lc, lb)
    free = [a for a in range(len(a_shape)) if a not in tuple(a_c) + tuple(a_b)]
    return free[-1], tuple(a_c), tuple(a_b)


def operands(layout, seed=0, dtype=jnp.float32):
    a_shape, w_shape, dn, side = layout
    ka, kd = jax.random.split(jax.random.key(seed))
    a = jax.random.normal(ka, a_shape, dtype)
    lhs_rhs = (jnp.zeros(w_shape, dtype), a) if side == 0 else (a, jnp.zeros(w_shape, dtype))
    out = jax.eval_shape(lambda l, r: jax.lax.dot_general(l, r, dn), *lhs_rhs)
    dy = jax.random.normal(kd, out.shape, dtype)
    return a, dy


# ---------------------------------------------------------------------------------------------
# The masks.


@pytest.mark.parametrize("num_k,num_p", [(4, 8), (3, 12), (6, 16), (5, 4), (2, 24)])
def test_authors_four_patterns_match_their_code(num_k, num_p):
    """A 2-D activation [L, K] (tokens, contraction) is their columns[K, L] transposed."""
    for c, flag in enumerate(AUTHORS_FLAGS):
        theirs = authors_columns_mask(num_k, num_p, flag)
        ours = rotating_token_mask((num_p, num_k), token_axis=0, contracting_axes=(1,), choice=c)
        np.testing.assert_array_equal(np.asarray(ours).T, theirs, err_msg=AUTHORS_PATTERNS[c])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_pattern_matches_the_reference(name):
    a_shape = LAYOUTS[name][0]
    t, k_axes, b_axes = act_axes(LAYOUTS[name])
    for c, pat in enumerate(TOKEN_PATTERNS):
        got = rotating_token_mask(a_shape, token_axis=t, contracting_axes=k_axes, batch_axes=b_axes,
                                  choice=jnp.int32(c), patterns=TOKEN_PATTERNS)
        want = ref_mask(a_shape, t, k_axes, b_axes, pat)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=pat)


@pytest.mark.parametrize("shape", [(2, 8, 4), (3, 5, 4), (1, 7, 6), (4, 4), (5, 9, 2)])
def test_every_draw_keeps_two_of_every_four_along_p(shape):
    t_axis = len(shape) - 2
    n = math.prod(shape[:-1])
    for c in range(len(TOKEN_PATTERNS)):
        m = np.asarray(rotating_token_mask(shape, token_axis=t_axis, contracting_axes=(-1,),
                                           choice=c, patterns=TOKEN_PATTERNS))
        flat = m.reshape(n, shape[-1])  # [p, k]
        full = flat[: n - n % 4].reshape(-1, 4, shape[-1])
        assert (full.sum(1) == 2).all(), TOKEN_PATTERNS[c]
        pairs = flat[: n - n % 2].reshape(-1, 2, shape[-1])
        assert (pairs.sum(1) == 1).all(), TOKEN_PATTERNS[c]


def test_fixed_patterns_agree_with_token_mask_for_even_T():
    shape = (3, 8, 4, 8)  # [B, H, W, C]: t = W (axis 2), k = C
    for pat in ("checkerboard", "even", "odd"):
        fixed = token_mask(shape, token_axis=2, contracting_axes=(3,), pattern=pat)
        rot = rotating_token_mask(shape, token_axis=2, contracting_axes=(3,), choice=0,
                                  patterns=(pat,))
        np.testing.assert_array_equal(np.asarray(rot), np.asarray(fixed))


def test_every_entry_is_kept_by_some_authors_pattern():
    """The point of rotating: each entry feeds the grad-weight product in 1 to 3 of the 4 draws."""
    shape = (2, 8, 8)
    count = sum(np.asarray(rotating_token_mask(shape, token_axis=1, contracting_axes=(2,), choice=c))
                .astype(int) for c in range(4))
    assert count.min() >= 1 and count.max() <= 3


def test_pattern_phase_table():
    table = pattern_phase(TOKEN_PATTERNS, num_tokens=8)
    assert table.shape == (6, 2, 2) and table.dtype == np.int32
    np.testing.assert_array_equal(table[0] ^ table[5], np.ones((2, 2)))  # complements
    np.testing.assert_array_equal(table[2] ^ table[3], np.ones((2, 2)))
    assert pattern_phase(("alternating",), 12)[0, 1].tolist() == [0, 1]  # N/4 odd: row k=1 flips


def test_mask_errors():
    with pytest.raises(ValueError, match="not valid"):
        rotating_token_mask((4, 4), token_axis=0, contracting_axes=(1,), choice=0, patterns=("x",))
    with pytest.raises(ValueError, match="sequence"):
        rotating_token_mask((4, 4), token_axis=0, contracting_axes=(1,), choice=0, patterns="odd")
    with pytest.raises(ValueError, match="out of range"):
        rotating_token_mask((4, 4), token_axis=0, contracting_axes=(1,), choice=4)
    with pytest.raises(ValueError, match="also a contracting"):
        rotating_token_mask((4, 4), token_axis=1, contracting_axes=(1,), choice=0)
    with pytest.raises(ValueError, match="scalar"):
        rotating_token_mask((4, 4), token_axis=0, contracting_axes=(1,), choice=jnp.zeros(2, int))


def test_traced_choice_compiles_once():
    f = jax.jit(lambda c: rotating_token_mask((2, 8, 4), token_axis=1, contracting_axes=(2,),
                                              choice=c))
    outs = [np.asarray(f(jnp.int32(c))) for c in range(4)]
    assert f._cache_size() == 1
    assert len({o.tobytes() for o in outs}) == 4


# ---------------------------------------------------------------------------------------------
# The draw.


def test_draw_is_deterministic_and_keyed():
    key = jax.random.key(3)
    raw = jax.random.key_data(key)
    for layer in range(5):
        assert int(draw_pattern(key, layer, 4)) == int(draw_pattern(key, layer, 4))
        assert int(draw_pattern(raw, layer, 4)) == int(draw_pattern(key, layer, 4))
        assert int(draw_pattern(11, layer, 4)) == int(draw_pattern(jnp.int32(11), layer, 4))
    jitted = jax.jit(draw_pattern, static_argnums=2)
    assert int(jitted(jnp.int32(11), 2, 4)) == int(draw_pattern(11, 2, 4))
    assert jnp.asarray(draw_pattern(11, 2, 4)).dtype == jnp.int32


def test_draw_is_uniform_and_independent_across_layers_and_steps():
    steps, layers = jnp.arange(500), jnp.arange(4)
    draws = np.asarray(jax.vmap(lambda s: jax.vmap(lambda l: draw_pattern(s, l, 4))(layers))(steps))
    assert draws.min() == 0 and draws.max() == 3
    counts = np.bincount(draws.ravel(), minlength=4)
    assert (abs(counts - 500) < 100).all(), counts  # 2000 draws, ~500 each (sd ≈ 19)
    same = (draws[:, 0] == draws[:, 1]).mean()  # independent layers agree ~1/4 of the steps
    assert 0.15 < same < 0.35, same
    assert len(set(draws[:, 0].tolist())) == 4  # a layer's pattern changes from step to step


def test_draw_errors():
    with pytest.raises(TypeError, match="PRNG key"):
        draw_pattern(jnp.float32(1.0), 0, 4)
    with pytest.raises(ValueError, match="at least 1"):
        draw_pattern(0, 0, 0)
    assert int(draw_pattern(5, 0, 1)) == 0


# ---------------------------------------------------------------------------------------------
# The compact grad-weight product.


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_compact_equals_masked_reference_for_every_draw(name, scale):
    layout = LAYOUTS[name]
    a_shape, w_shape, dn, side = layout
    t, k_axes, b_axes = act_axes(layout)
    a, dy = operands(layout)
    lay = compact_layout(a_shape, w_shape, dn, side)
    assert lay.token_axis == t

    @jax.jit
    def compact(a, dy, c):
        parts = select_parts(a, c, lay, TOKEN_PATTERNS)
        dw = parts_grad_weight(parts, c, dy, lay, weight_dtype=jnp.float32, scale=scale,
                                          patterns=TOKEN_PATTERNS,
                                          precision=jax.lax.Precision.HIGHEST)
        return parts, from_parts(parts, c, lay, TOKEN_PATTERNS), dw

    for c, pat in enumerate(TOKEN_PATTERNS):
        keep = ref_mask(a_shape, t, k_axes, b_axes, pat)
        parts, rebuilt, dw = compact(a, dy, jnp.int32(c))
        np.testing.assert_array_equal(np.asarray(rebuilt), np.where(keep, np.asarray(a), 0.0))
        want = ref_grad_weight(a, w_shape, dy, dn, side, keep, scale)
        assert dw.shape == tuple(w_shape) and dw.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(dw), want, rtol=1e-5, atol=1e-5, err_msg=pat)
        n = lay.num_tokens
        assert parts.size == a.size // n * (n + n % 2) // 2  # half the activation (+1 row if N odd)
    assert compact._cache_size() == 1  # one compiled function served all six patterns


def test_compact_keeps_dtypes_and_precision_settings():
    a_shape, w_shape, dn, side = LAYOUTS["3d"]
    a, dy = operands(LAYOUTS["3d"], dtype=jnp.bfloat16)
    lay = compact_layout(a_shape, w_shape, dn, side)
    parts = select_parts(a, 1, lay)
    assert parts.dtype == jnp.bfloat16 and parts.size * 2 == a.size
    dw = parts_grad_weight(parts, 1, dy, lay, weight_dtype=jnp.bfloat16, scale=0.03,
                                      preferred_element_type=jnp.float32)
    assert dw.dtype == jnp.bfloat16
    keep = ref_mask(a_shape, 1, (2,), (), "odd")
    want = ref_grad_weight(a.astype(jnp.float32), w_shape, dy.astype(jnp.float32), dn, side, keep,
                           0.03)
    np.testing.assert_allclose(np.asarray(dw, np.float32), want, rtol=2e-2, atol=2e-2)


def test_compact_has_no_branches_over_gemms():
    a_shape, w_shape, dn, side = LAYOUTS["3d"]
    lay = compact_layout(a_shape, w_shape, dn, side)
    a, dy = operands(LAYOUTS["3d"])

    def step(a, dy, c):
        return parts_grad_weight(select_parts(a, c, lay), c, dy, lay,
                                            weight_dtype=jnp.float32, scale=0.03)

    jaxpr = str(jax.make_jaxpr(step)(a, dy, jnp.int32(0)))
    assert "cond" not in jaxpr and "switch" not in jaxpr
    assert jaxpr.count("dot_general") == 1


def test_same_step_same_gradient_different_steps_differ():
    """A training-step-like function of a traced step: one compile; same step, same dW."""
    layout = LAYOUTS["3d"]
    a_shape, w_shape, dn, side = layout
    lay = compact_layout(a_shape, w_shape, dn, side)
    a, dy = operands(layout)

    @jax.jit
    def grad_w(a, dy, step):
        dws = []
        for layer in range(2):
            c = draw_pattern(step, layer, len(AUTHORS_PATTERNS))
            parts = select_parts(a, c, lay)
            dws.append(parts_grad_weight(parts, c, dy, lay, weight_dtype=jnp.float32,
                                                    scale=0.03))
        return jnp.stack(dws)

    first = np.asarray(grad_w(a, dy, jnp.int32(0)))
    np.testing.assert_array_equal(np.asarray(grad_w(a, dy, jnp.int32(0))), first)
    results = [np.asarray(grad_w(a, dy, jnp.int32(s))) for s in range(1, 16)]
    assert grad_w._cache_size() == 1
    assert any(not np.array_equal(r[0], first[0]) for r in results)  # layer 0 changes over steps
    assert any(not np.array_equal(r[0], r[1]) for r in results)  # layers draw independently


def test_compact_under_vmap_over_keys():
    """Per-example keys (a vmapped step) batch the choice; each lane equals its own draw."""
    layout = LAYOUTS["2d"]
    a_shape, w_shape, dn, side = layout
    lay = compact_layout(a_shape, w_shape, dn, side)
    a, dy = operands(layout)

    def grad_w(step):
        c = draw_pattern(step, 0, 4)
        return parts_grad_weight(select_parts(a, c, lay), c, dy, lay,
                                            weight_dtype=jnp.float32, scale=0.5)

    steps = jnp.arange(6)
    batched = jax.vmap(grad_w)(steps)
    for s in range(6):
        np.testing.assert_allclose(np.asarray(batched[s]), np.asarray(grad_w(jnp.int32(s))),
                                   rtol=1e-6, atol=1e-6)


def test_layout_errors():
    with pytest.raises(ValueError, match="must be even"):
        compact_layout((4, 3), (3, 4), (((1,), (0,)), ((), ())), 1)
    with pytest.raises(ValueError, match="innermost free axis"):
        compact_layout((2, 4, 8), (8, 4), (((2,), (0,)), ((), ())), 1, token_axis=0)
    with pytest.raises(ValueError, match="no free"):
        compact_layout((8,), (8, 4), (((0,), (0,)), ((), ())), 1)


@pytest.mark.parametrize("patterns", [("even", "odd"), ("checkerboard", "anti_checkerboard")])
def test_other_pattern_sets(patterns):
    layout = LAYOUTS["3d_T_odd"]
    a_shape, w_shape, dn, side = layout
    lay = compact_layout(a_shape, w_shape, dn, side)
    a, dy = operands(layout)
    for c, pat in enumerate(patterns):
        dw = parts_grad_weight(select_parts(a, c, lay, patterns), c, dy, lay,
                                          weight_dtype=jnp.float32, scale=1.0, patterns=patterns,
                                          precision="highest")
        keep = ref_mask(a_shape, 1, (2,), (), pat)
        np.testing.assert_allclose(np.asarray(dw), ref_grad_weight(a, w_shape, dy, dn, side, keep, 1.0),
                                   rtol=1e-5, atol=1e-5)


def test_wiring_into_a_custom_vjp_with_a_traced_step():
    """The wiring the sparse matmul needs: the choice enters the custom_vjp as an int32 primal
    (cotangent None), the forward saves the compact half, the backward forms dW from it."""
    a_shape, w_shape, dn, side = LAYOUTS["3d"]
    lay = compact_layout(a_shape, w_shape, dn, side)

    @jax.custom_vjp
    def matmul(a, w, choice):
        return jax.lax.dot_general(a, w, dn)

    def fwd(a, w, choice):
        return matmul(a, w, choice), (select_parts(a, choice, lay), w, choice)

    def bwd(res, dy):
        parts, w, choice = res
        d_w = parts_grad_weight(parts, choice, dy, lay, weight_dtype=w.dtype, scale=0.03)
        d_a = jnp.einsum("bto,ko->btk", dy, w)
        return d_a, d_w, None

    matmul.defvjp(fwd, bwd)

    def loss(w, a, step):
        choice = draw_pattern(step, 0, len(AUTHORS_PATTERNS))
        return (matmul(a, w, choice) ** 2).sum()

    a, _ = operands(LAYOUTS["3d"])
    w = jax.random.normal(jax.random.key(5), w_shape)
    grad = jax.jit(jax.grad(loss))
    for step in range(6):
        got = grad(w, a, jnp.int32(step))
        c = int(draw_pattern(step, 0, 4))
        keep = ref_mask(a_shape, 1, (2,), (), AUTHORS_PATTERNS[c])
        dy = 2 * np.einsum("btk,ko->bto", np.asarray(a, np.float64), np.asarray(w, np.float64))
        want = ref_grad_weight(a, w_shape, dy, dn, side, keep, 0.03)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-3)
    assert grad._cache_size() == 1
