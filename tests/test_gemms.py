"""Reference tests of the three FST products of one weight matmul (DESIGN.md §1).

Everything expected here is computed from the spec alone, independently of fst_jax: masks in
numpy, products with ``jax.vjp(lax.dot_general)`` on the masked operands. The library is driven
only through its public API, ``jax.vjp(fst_jax.sparsify(fn, config), W, A)``.

Conventions, restated from DESIGN.md §1, for ``Y = dot_general(lhs, rhs, dimension_numbers)``
with one operand the weight ``W`` (argument 0 of ``fn``) and the other the activation ``A``:

* ``K`` is the weight's last contracting dim in ``dimension_numbers`` order, ``O_last`` its last
  free dim, ``t`` the activation's last free dim and ``k`` the row-major flat index over the
  activation's contracting dims taken in ``dimension_numbers`` order.
* The output's dims are (batch dims, lhs free dims, rhs free dims), which says where ``t`` lands
  in ``Y``.
* ``mask_2to4(x, axis)`` keeps, in every group of 4 along ``axis``, the 2 entries of largest
  magnitude (NaN counts as inf; ties keep the lower index).
* forward: ``W_f = W ⊙ mask_2to4(W, K)`` (``W_f = W`` with ``forward=False``; ``W ⊙ T`` with the
  transposable mask ``T``).
* grad-input: ``dA = dY·W_bᵀ`` with ``W_b = W_f ⊙ mask_2to4(W_f, O_last)`` ("prune_output_dim") or
  ``W_b = W_f`` ("dense", "transposable").
* grad-weight: ``dW = Aᵀ·dY`` ("dense"); ``(M ⊙ A)ᵀ·dY'`` with ``dY'[t] = dY[t] + s·dY[t-1]`` (f32,
  wrapping) ("fixed_mask"); ``Aᵀ·(dY ⊙ mask_2to4(dY, t))`` ("prune_grad_output").
* SR-STE: ``dW += λ·(1 − mask_f) ⊙ W``.
* Left dense: ``K % 4 != 0`` (all three products), ``O_last % 4 != 0`` (grad-input),
  fewer than 2 tokens or no free dim in ``A`` (grad-weight; ``T % 4 != 0`` for
  ``prune_grad_output``, whose 2:4 groups run along the tokens).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fst_jax
from references import PATTERNS, count_sparse_matmuls, fixed_mask, mask_2to4, transposable_mask
from fst_jax import FSTConfig

# Reference masks (numpy, from the spec): tests/references.py

# ------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------

DimensionNumbers = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]


@dataclasses.dataclass(frozen=True)
class Layout:
    """One weight matmul: ``fn(w, a)`` as a user writes it, and the ``dot_general`` it means."""

    name: str
    w_shape: tuple[int, ...]
    a_shape: tuple[int, ...]
    weight_is_lhs: bool
    dimension_numbers: DimensionNumbers
    fn: Callable[[jax.Array, jax.Array], jax.Array]
    dtype: Any = jnp.float32
    preferred_element_type: Any = None

    def dot(self, w: jax.Array, a: jax.Array) -> jax.Array:
        lhs, rhs = (w, a) if self.weight_is_lhs else (a, w)
        return lax.dot_general(lhs, rhs, self.dimension_numbers, preferred_element_type=self.preferred_element_type)

    def _sides(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        (lc, rc), (lb, rb) = self.dimension_numbers
        if self.weight_is_lhs:
            return lc, lb, rc, rb
        return rc, rb, lc, lb

    @property
    def w_contract(self) -> tuple[int, ...]:
        return self._sides()[0]

    @property
    def a_contract(self) -> tuple[int, ...]:
        return self._sides()[2]

    @property
    def w_free(self) -> tuple[int, ...]:
        wc, wb, _, _ = self._sides()
        return tuple(d for d in range(len(self.w_shape)) if d not in wc and d not in wb)

    @property
    def a_free(self) -> tuple[int, ...]:
        _, _, ac, ab = self._sides()
        return tuple(d for d in range(len(self.a_shape)) if d not in ac and d not in ab)

    @property
    def k_axis(self) -> int:
        return self.w_contract[-1]

    @property
    def o_axis(self) -> int | None:
        return self.w_free[-1] if self.w_free else None

    @property
    def t_axis(self) -> int | None:
        return self.a_free[-1] if self.a_free else None

    @property
    def t_pos(self) -> int | None:
        """Where ``t`` lands in ``Y``: (batch dims, lhs free dims, rhs free dims)."""
        if self.t_axis is None:
            return None
        n_batch = len(self.dimension_numbers[1][0])
        before = len(self.w_free) if self.weight_is_lhs else 0
        return n_batch + before + len(self.a_free) - 1


def _matmul(w, a):
    return a @ w


def _weight_lhs(w, a):
    return lax.dot_general(w, a, (((1,), (2,)), ((), ())))


def _transposed(w, a):
    return a @ w.T


def _two_contracting(w, a):
    return jnp.einsum("btij,ijo->bto", a, w)


def _batch(w, a):
    return jnp.einsum("hbk,hko->hbo", a, w)


def _f32_acc(w, a):
    return lax.dot_general(a, w, (((2,), (0,)), ((), ())), preferred_element_type=jnp.float32)


_NT = (((2,), (0,)), ((), ()))

# K=16, O_last=12, T=8 everywhere, so that the three axes cannot be confused.
F32_LAYOUTS = [
    Layout("matmul", (16, 12), (2, 8, 16), False, _NT, _matmul),
    Layout("weight_lhs", (12, 16), (2, 8, 16), True, (((1,), (2,)), ((), ())), _weight_lhs),
    Layout("transposed", (12, 16), (2, 8, 16), False, (((2,), (1,)), ((), ())), _transposed),
    # I=3 on purpose: K is the *last* contracting dim (J=8), not the flattened I·J.
    Layout("two_contracting", (3, 8, 12), (2, 8, 3, 8), False, (((2, 3), (0, 1)), ((), ())), _two_contracting),
    # h is a dot_general batch dim; the token axis of A [H, B, K] is B.
    Layout("batch", (2, 16, 12), (2, 8, 16), False, (((2,), (1,)), ((0,), (0,))), _batch),
    Layout("2d", (16, 12), (8, 16), False, (((1,), (0,)), ((), ())), _matmul),
]
BF16_LAYOUTS = [
    Layout("matmul_bf16", (16, 12), (2, 8, 16), False, _NT, _matmul, dtype=jnp.bfloat16),
    Layout(
        "matmul_bf16_f32acc", (16, 12), (2, 8, 16), False, _NT, _f32_acc,
        dtype=jnp.bfloat16, preferred_element_type=jnp.float32,
    ),
]
ALL_LAYOUTS = F32_LAYOUTS + BF16_LAYOUTS


def _ids(layouts: list[Layout]) -> list[str]:
    return [lay.name for lay in layouts]


# ------------------------------------------------------------------------------------------------
# Configs, inputs, reference, runner
# ------------------------------------------------------------------------------------------------


def config(**changes: Any) -> FSTConfig:
    """A config that sparsifies a lone matmul (it is both first and last)."""
    base: dict[str, Any] = dict(skip_first=False, skip_last=False, sr_ste=0.0)
    base.update(changes)
    return FSTConfig(**base)


IDENTITY = config(forward=False, grad_input="dense", grad_weight="dense", sr_ste=0.0)


@functools.cache
def _normal_pool(seed: int) -> np.ndarray:
    """Standard normals from a fixed jax.random key: drawn once, sliced per shape (no recompiles)."""
    return np.asarray(jax.random.normal(jax.random.key(seed), (3, 4096), jnp.float32))


def _normal(seed: int, stream: int, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    n = int(np.prod(shape))
    return jnp.asarray(_normal_pool(seed)[stream, :n].reshape(shape), dtype=dtype)


def make_inputs(layout: Layout, seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    w = _normal(seed, 0, layout.w_shape, layout.dtype)
    a = _normal(seed, 1, layout.a_shape, layout.dtype)
    y = jax.eval_shape(layout.dot, w, a)
    dy = _normal(seed, 2, y.shape, y.dtype)
    return w, a, dy


def forward_mask(layout: Layout, cfg: FSTConfig, w: jax.Array) -> np.ndarray | None:
    """mask_f of the spec, or None where the forward product stays dense."""
    if layout.w_shape[layout.k_axis] % 4:
        return None
    if cfg.grad_input == "transposable":
        assert layout.o_axis is not None
        return transposable_mask(w, layout.k_axis, layout.o_axis)
    if cfg.forward:
        return mask_2to4(w, layout.k_axis)
    return None


def reference(layout: Layout, cfg: FSTConfig, w: jax.Array, a: jax.Array, dy: jax.Array):
    """(Y, dW, dA) of the spec, with the dense fallbacks."""
    k_ok = layout.w_shape[layout.k_axis] % 4 == 0
    o_ok = layout.o_axis is not None and layout.w_shape[layout.o_axis] % 4 == 0
    t = layout.a_shape[layout.t_axis] if layout.t_axis is not None else 0
    # the fixed mask needs 2 tokens (even counts here: per-sequence = p-indexed), 2:4 on dY needs groups of 4
    t_ok = t >= 2 and (cfg.grad_weight != "prune_grad_output" or t % 4 == 0)

    mask_f = forward_mask(layout, cfg, w)
    w_f = w if mask_f is None else jnp.where(mask_f, w, 0)
    if k_ok and cfg.grad_input == "prune_output_dim" and o_ok:
        w_b = jnp.where(mask_2to4(w_f, layout.o_axis), w_f, 0)
    else:
        w_b = w_f
    grad_weight = cfg.grad_weight if (k_ok and t_ok) else "dense"

    y = layout.dot(w_f, a)
    _, pull_a = jax.vjp(lambda a_: layout.dot(w_b, a_), a)
    (da,) = pull_a(dy)

    if grad_weight == "fixed_mask":
        m = fixed_mask(layout.a_shape, layout.t_axis, layout.a_contract, cfg.pattern)
        a_w = jnp.where(m, a, 0)
        dy32 = dy.astype(jnp.float32)
        dy_w = (dy32 + cfg.restore_scale * jnp.roll(dy32, 1, axis=layout.t_pos)).astype(dy.dtype)
    elif grad_weight == "prune_grad_output":
        a_w = a
        dy_w = jnp.where(mask_2to4(dy, layout.t_pos), dy, 0)
    else:
        a_w, dy_w = a, dy
    _, pull_w = jax.vjp(lambda w_: layout.dot(w_, a_w), w)
    (dw,) = pull_w(dy_w)

    if mask_f is not None and cfg.sr_ste:
        dw = dw + (cfg.sr_ste * jnp.where(mask_f, 0, w).astype(jnp.float32)).astype(dw.dtype)
    return y, dw, da


def run_sparse(layout: Layout, cfg: FSTConfig, w: jax.Array, a: jax.Array, dy: jax.Array):
    """(Y, dW, dA) from fst_jax."""
    y, pull = jax.vjp(fst_jax.sparsify(layout.fn, cfg), w, a)
    dw, da = pull(dy)
    return y, dw, da


def run_dense(layout: Layout, w: jax.Array, a: jax.Array, dy: jax.Array):
    """(Y, dW, dA) of the untransformed function."""
    y, pull = jax.vjp(layout.fn, w, a)
    dw, da = pull(dy)
    return y, dw, da


_TOL = {
    jnp.dtype(jnp.float32): dict(rtol=1e-5, atol=1e-5),
    jnp.dtype(jnp.bfloat16): dict(rtol=2e-2, atol=1e-1),
}


def assert_close(actual: jax.Array, expected: jax.Array, what: str) -> None:
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    np.testing.assert_allclose(
        np.asarray(actual, np.float32), np.asarray(expected, np.float32), err_msg=what, **_TOL[jnp.dtype(expected.dtype)]
    )


def assert_triple(got, want, tag: str) -> None:
    for name, g, e in zip(("Y", "dW", "dA"), got, want, strict=True):
        assert_close(g, e, f"{tag}: {name}")


def assert_differs(x: jax.Array, y: jax.Array, what: str) -> None:
    assert not np.allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=1e-3, atol=1e-3), what


# ------------------------------------------------------------------------------------------------
# The reference itself
# ------------------------------------------------------------------------------------------------


def test_reference_masks_are_well_formed():
    assert len(PATTERNS) == 90
    assert (PATTERNS.sum(axis=1) == 2).all() and (PATTERNS.sum(axis=2) == 2).all()
    # First pattern in the spec order: rows keep (0,1), (0,1), (2,3), (2,3).
    np.testing.assert_array_equal(PATTERNS[0], np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], bool))
    x = np.array([[1.0, -3.0, 3.0, 0.5, np.nan, 0.0, np.inf, 7.0, 2.0, 2.0, -2.0, 2.0]])
    np.testing.assert_array_equal(
        mask_2to4(x, 1)[0], [False, True, True, False, True, False, True, False, True, True, False, False]
    )
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 12))
    t = transposable_mask(w, 0, 1)
    assert (t.reshape(2, 4, 12).sum(1) == 2).all() and (t.reshape(8, 3, 4).sum(2) == 2).all()
    np.testing.assert_array_equal(transposable_mask(w.T, 1, 0), t.T)


@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=_ids(ALL_LAYOUTS))
def test_layout_table_matches_fn(layout):
    """The dot_general each layout names is the function it tests."""
    w, a, _ = make_inputs(layout)
    np.testing.assert_array_equal(np.asarray(layout.fn(w, a), np.float32), np.asarray(layout.dot(w, a), np.float32))


# ------------------------------------------------------------------------------------------------
# Identity config: bit-identical, and a custom_vjp is in place
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=_ids(ALL_LAYOUTS))
def test_identity_config_is_bit_identical(layout):
    w, a, dy = make_inputs(layout)
    got = run_sparse(layout, IDENTITY, w, a, dy)
    want = run_dense(layout, w, a, dy)
    for name, g, e in zip(("Y", "dW", "dA"), got, want, strict=True):
        assert g.dtype == e.dtype, name
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(e, np.float32), err_msg=name)
    # dense in all three products: the matmul is left as it is, not routed through the custom_vjp
    assert count_sparse_matmuls(jax.make_jaxpr(fst_jax.sparsify(layout.fn, IDENTITY))(w, a)) == 0


# ------------------------------------------------------------------------------------------------
# Forward and grad-input
# ------------------------------------------------------------------------------------------------

GRAD_INPUT_CASES = {
    "fwd-gi_dense": dict(forward=True, grad_input="dense"),
    "fwd-prune_output_dim": dict(forward=True, grad_input="prune_output_dim"),
    "nofwd-prune_output_dim": dict(forward=False, grad_input="prune_output_dim"),
    "transposable": dict(forward=True, grad_input="transposable"),
}


@pytest.mark.parametrize("case", list(GRAD_INPUT_CASES))
@pytest.mark.parametrize("layout", F32_LAYOUTS, ids=_ids(F32_LAYOUTS))
def test_forward_and_grad_input(layout, case):
    cfg = config(grad_weight="dense", **GRAD_INPUT_CASES[case])
    w, a, dy = make_inputs(layout)
    got = run_sparse(layout, cfg, w, a, dy)
    want = reference(layout, cfg, w, a, dy)
    assert_triple(got, want, f"{layout.name}/{case}")
    dense = run_dense(layout, w, a, dy)
    if cfg.forward:
        assert_differs(want[0], dense[0], "the forward product is sparse")
    assert_differs(want[2], dense[2], "the grad-input product is sparse")


# ------------------------------------------------------------------------------------------------
# Grad-weight
# ------------------------------------------------------------------------------------------------

GRAD_WEIGHT_CASES = {
    "dense": dict(grad_weight="dense"),
    "prune_grad_output": dict(grad_weight="prune_grad_output"),
    **{
        f"fixed_mask-{pattern}-s{s}": dict(grad_weight="fixed_mask", pattern=pattern, restore_scale=s)
        for pattern in ("checkerboard", "even", "odd")
        for s in (0.0, 0.5)
    },
}


@pytest.mark.parametrize("case", list(GRAD_WEIGHT_CASES))
@pytest.mark.parametrize("layout", F32_LAYOUTS, ids=_ids(F32_LAYOUTS))
def test_grad_weight(layout, case):
    cfg = config(forward=True, grad_input="prune_output_dim", **GRAD_WEIGHT_CASES[case])
    w, a, dy = make_inputs(layout)
    got = run_sparse(layout, cfg, w, a, dy)
    want = reference(layout, cfg, w, a, dy)
    assert_triple(got, want, f"{layout.name}/{case}")
    if cfg.grad_weight != "dense":
        assert_differs(want[1], run_dense(layout, w, a, dy)[1], "the grad-weight product is sparse")


@pytest.mark.parametrize("layout", BF16_LAYOUTS, ids=_ids(BF16_LAYOUTS))
@pytest.mark.parametrize(
    "case",
    [
        dict(forward=True, grad_input="prune_output_dim", grad_weight="fixed_mask", pattern="checkerboard", restore_scale=0.5),
        dict(forward=True, grad_input="transposable", grad_weight="prune_grad_output"),
        dict(forward=True, grad_input="dense", grad_weight="fixed_mask", pattern="odd", restore_scale=0.03),
    ],
    ids=["default_recipe", "transposable-prune_grad_output", "odd"],
)
def test_bf16(layout, case):
    cfg = config(**case)
    w, a, dy = make_inputs(layout)
    got = run_sparse(layout, cfg, w, a, dy)
    want = reference(layout, cfg, w, a, dy)
    assert_triple(got, want, layout.name)
    # The three products keep dot_general's dtypes.
    dense = run_dense(layout, w, a, dy)
    assert [x.dtype for x in got] == [x.dtype for x in dense]


# ------------------------------------------------------------------------------------------------
# SR-STE
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad_input", ["prune_output_dim", "transposable"])
@pytest.mark.parametrize("layout", F32_LAYOUTS, ids=_ids(F32_LAYOUTS))
def test_sr_ste_term(layout, grad_input):
    cfg0 = config(forward=True, grad_input=grad_input, grad_weight="fixed_mask", restore_scale=0.5, sr_ste=0.0)
    cfg1 = cfg0.replace(sr_ste=0.1)
    w, a, dy = make_inputs(layout)
    y0, dw0, da0 = run_sparse(layout, cfg0, w, a, dy)
    y1, dw1, da1 = run_sparse(layout, cfg1, w, a, dy)
    mask_f = forward_mask(layout, cfg1, w)
    term = 0.1 * np.where(mask_f, 0.0, np.asarray(w, np.float64))
    assert np.count_nonzero(term) == term.size // 2
    np.testing.assert_allclose(np.asarray(dw1 - dw0, np.float64), term, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y0))
    np.testing.assert_array_equal(np.asarray(da1), np.asarray(da0))
    assert_triple((y1, dw1, da1), reference(layout, cfg1, w, a, dy), f"{layout.name}/{grad_input}")


# ------------------------------------------------------------------------------------------------
# Masks on awkward values: ties and non-finite weights
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grad_input", ["prune_output_dim", "transposable"])
def test_ties_keep_the_lower_index(grad_input):
    """Integer-valued weights: many equal magnitudes, so the tie rules decide; products are exact."""
    layout = F32_LAYOUTS[0]
    w, a, dy = make_inputs(layout)
    # No zeros: tied candidates then differ in value, so a wrong tie-break changes the products.
    w = jnp.asarray(np.random.default_rng(7).choice([-2.0, -1.0, 1.0, 2.0], size=layout.w_shape), jnp.float32)
    a = jnp.round(a * 2)
    dy = jnp.round(dy * 2)
    cfg = config(forward=True, grad_input=grad_input, grad_weight="prune_grad_output", sr_ste=0.1)
    got = run_sparse(layout, cfg, w, a, dy)
    want = reference(layout, cfg, w, a, dy)
    assert_triple(got, want, grad_input)


def test_nan_counts_as_largest_and_dropped_nan_does_not_spread():
    layout = F32_LAYOUTS[0]  # a @ w, w [K=16, O=12]
    w, a, _ = make_inputs(layout)
    a = jnp.abs(a) + 0.1  # positive, so that kept infinities keep their sign
    w = np.array(w)
    w[0:4, 0] = [1.0, np.nan, 2.0, 3.0]  # keeps the NaN (index 1) and 3.0
    w[0:4, 4] = [-np.inf, 1.0, 2.0, 3.0]  # keeps -inf and 3.0
    w[0:4, 8] = [np.inf, np.inf, np.nan, 1.0]  # keeps the two infs; the NaN is dropped
    w = jnp.asarray(w)
    cfg = config(forward=True, grad_input="dense", grad_weight="dense")
    got = fst_jax.sparsify(layout.fn, cfg)(w, a)
    want = layout.dot(jnp.where(mask_2to4(w, 0), w, 0), a)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert np.isnan(np.asarray(got)[..., 0]).all()
    assert (np.asarray(got)[..., 4] == -np.inf).all()
    assert (np.asarray(got)[..., 8] == np.inf).all()
    assert np.isfinite(np.delete(np.asarray(got), [0, 4, 8], axis=-1)).all()


# ------------------------------------------------------------------------------------------------
# Dense fallbacks: the GEMM that cannot be sparsified falls back alone
# ------------------------------------------------------------------------------------------------

FALLBACK_CONFIG = config(
    forward=True, grad_input="prune_output_dim", grad_weight="fixed_mask", pattern="checkerboard", restore_scale=0.5
)


def test_fallback_k_not_divisible_by_4_all_dense():
    layout = Layout("k6", (6, 12), (2, 8, 6), False, _NT, _matmul)
    w, a, dy = make_inputs(layout)
    cfg = FALLBACK_CONFIG.replace(sr_ste=0.1)  # no forward mask, so nothing for SR-STE to act on
    got = run_sparse(layout, cfg, w, a, dy)
    assert_triple(got, run_dense(layout, w, a, dy), "K=6")
    # Same with the transposable mask asked for.
    got = run_sparse(layout, cfg.replace(grad_input="transposable"), w, a, dy)
    assert_triple(got, run_dense(layout, w, a, dy), "K=6 transposable")


def test_fallback_o_not_divisible_by_4_grad_input_dense():
    layout = Layout("o6", (16, 6), (2, 8, 16), False, _NT, _matmul)
    w, a, dy = make_inputs(layout)
    got = run_sparse(layout, FALLBACK_CONFIG, w, a, dy)
    want = reference(layout, FALLBACK_CONFIG, w, a, dy)
    assert_triple(got, want, "O=6")
    dense = run_dense(layout, w, a, dy)
    w_f = jnp.where(mask_2to4(w, 0), w, 0)
    assert_close(got[2], dy @ w_f.T, "dA = dY·W_fᵀ")
    assert_differs(got[0], dense[0], "forward stays sparse")
    assert_differs(got[1], dense[1], "grad-weight stays sparse")


@pytest.mark.parametrize(
    "layout",
    [
        Layout("t1", (16, 12), (2, 1, 16), False, _NT, _matmul),
        Layout("no_free_dim", (16, 12), (16,), False, (((0,), (0,)), ((), ())), _matmul),
    ],
    ids=["t1", "no_free_dim"],
)
def test_fallback_no_usable_token_axis_grad_weight_dense(layout):
    """One token, or none: the grad-weight product is dense; the other two stay sparse."""
    w, a, dy = make_inputs(layout)
    got = run_sparse(layout, FALLBACK_CONFIG, w, a, dy)
    want = reference(layout, FALLBACK_CONFIG, w, a, dy)
    assert_triple(got, want, layout.name)
    dense = run_dense(layout, w, a, dy)
    assert_close(got[1], dense[1], "dW = Aᵀ·dY")
    assert_differs(got[0], dense[0], "forward stays sparse")
    assert_differs(got[2], dense[2], "grad-input stays sparse")


# ------------------------------------------------------------------------------------------------
# Under jit
# ------------------------------------------------------------------------------------------------


def test_jit_matches_eager():
    layout = F32_LAYOUTS[0]
    cfg = config(forward=True, grad_input="prune_output_dim", grad_weight="fixed_mask", restore_scale=0.5, sr_ste=0.1)
    w, a, dy = make_inputs(layout)

    def vjp(w, a, dy):
        y, pull = jax.vjp(fst_jax.sparsify(layout.fn, cfg), w, a)
        return (y, *pull(dy))

    assert_triple(jax.jit(vjp)(w, a, dy), reference(layout, cfg, w, a, dy), "jit")


def test_six_tokens_fixed_mask_sparse_prune_grad_output_dense():
    """T = 6: the fixed pattern keeps 2 of every 4 along p for any count, so grad-weight is sparse;
    prune_grad_output groups the tokens by 4, so it falls back to dense."""
    layout = Layout("t6", (16, 12), (2, 6, 16), False, _NT, _matmul)
    w, a, dy = make_inputs(layout)
    for cfg in (FALLBACK_CONFIG, FALLBACK_CONFIG.replace(grad_weight="prune_grad_output")):
        assert_triple(run_sparse(layout, cfg, w, a, dy), reference(layout, cfg, w, a, dy), cfg.grad_weight)
    dense = run_dense(layout, w, a, dy)
    assert_differs(run_sparse(layout, FALLBACK_CONFIG, w, a, dy)[1], dense[1], "dW sparse at T=6")
