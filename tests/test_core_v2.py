"""Issue 11 (transform core v2): the recipe's bookkeeping on real-model patterns, arguments as JAX
users pass them, the eager cache, forward mode, per-layer rules, pruned parameters, the report.

Every expected value is computed here from DESIGN.md §1 in plain numpy / jnp (masks from
``tests/references.py``), never through fst_jax internals. The library is driven only through its
public API (``sparsify``, ``report``, ``forward_masks``, ``prune_params``, ``pruned_params``,
``FSTConfig``, ``Rule``, ``fst_jax.optax.sr_ste``).

Conventions of the reference layer ``y = x @ w`` (``x: [B, T, K]``, ``w: [K, N]``), DESIGN.md §1:

* forward: ``W_f = W ⊙ mask_2to4(W, K)``; grad-input: ``W_b = W_f ⊙ mask_2to4(W_f, N)``,
  ``dX = dY·W_bᵀ``;
* grad-weight ("fixed_mask"): ``dW = (M ⊙ X)ᵀ·dY'`` with ``dY'[b, t] = dY[b, t] + s·dY[b, t−1]``
  (wrapping within each sequence) and ``M`` indexed by the flattened free-dim position
  ``p = b·T + t``: checkerboard keeps ``(p + k) % 2 == 0``, even ``p % 2 == 0``, odd ``p % 2 == 1``;
* SR-STE: ``dW += λ·(1 − mask_f) ⊙ W``, once per weight entry per step.

Small stand-ins for the real-model patterns the issue lists are written in the tests: an
RMSNorm-style scale einsum before the first layer (penzai), a scanned RNN cell (Haiku LSTM), a
shared layer used 2× and 3× (ALBERT), split gate kernels (Haiku GRU/LSTM) and concatenated gate
kernels (Flax OptimizedLSTMCell), a 17-token ViT-style input (16 patches + CLS), an int8 input, a
time-major input, a ``train: bool`` argument, a string auxiliary output.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fst_jax
import fst_jax.optax
from references import count_sparse_matmuls, mask_2to4

ALL = fst_jax.FSTConfig(skip_first=False, skip_last=False, sr_ste=0.0, restore_scale=0.5)
IDENTITY = ALL.replace(forward=False, grad_input="dense", grad_weight="dense")
S = jax.ShapeDtypeStruct
LAM = 0.1  # SR-STE coefficient large enough to see next to the loss gradient


# ------------------------------------------------------------------------------------------------
# Helpers and the reference (plain numpy / jnp, from DESIGN.md §1)
# ------------------------------------------------------------------------------------------------


def _normal(seed: int, *shape: int, scale: float = 1.0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def m24(x: Any, axis: int) -> jax.Array:
    """The 2:4 magnitude mask of the spec (numpy reference), as a jnp bool array."""
    return jnp.asarray(mask_2to4(np.asarray(x), axis))


def close(a: Any, b: Any, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol), a, b)


def differs(a: Any, b: Any) -> bool:
    return not np.allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def flat_keep(b: int, t: int, k: int, pattern: str) -> np.ndarray:
    """M[b, t, k] of the fixed token mask, indexed by p = b·T + t (DESIGN.md §1)."""
    p = np.arange(b)[:, None, None] * t + np.arange(t)[None, :, None]
    kk = np.arange(k)[None, None, :]
    if pattern == "checkerboard":
        keep = (p + kk) % 2 == 0
    elif pattern == "even":
        keep = np.broadcast_to(p % 2 == 0, (b, t, k))
    elif pattern == "odd":
        keep = np.broadcast_to(p % 2 == 1, (b, t, k))
    else:
        raise ValueError(pattern)
    return np.broadcast_to(keep, (b, t, k))


def per_sequence_keep(b: int, t: int, k: int, pattern: str) -> np.ndarray:
    """Today's per-sequence mask, indexed by t alone (equal to flat_keep for even T)."""
    tt = np.arange(t)[None, :, None]
    kk = np.arange(k)[None, None, :]
    if pattern == "checkerboard":
        keep = (tt + kk) % 2 == 0
    else:
        keep = tt % 2 == (0 if pattern == "even" else 1)
    return np.broadcast_to(keep, (b, t, k))


def shift(dy: jax.Array, s: float, axis: int = 1) -> jax.Array:
    """dY'[t] = dY[t] + s·dY[t−1], wrapping within each sequence, in f32."""
    dy32 = dy.astype(jnp.float32)
    return (dy32 + s * jnp.roll(dy32, 1, axis=axis)).astype(dy.dtype)


def ref_layer(w, x, dy, *, forward=True, grad_input="prune_output_dim", grad_weight="fixed_mask",
              pattern="checkerboard", s=0.5, sr_ste=0.0, keep=None):
    """(Y, dW, dX) of ``y = x @ w`` with ``x: [B, T, K]`` (token axis 1), per DESIGN.md §1."""
    b, t, k = x.shape
    x32 = x.astype(jnp.float32)
    mask_f = m24(w, 0) if forward else None
    w_f = w if mask_f is None else jnp.where(mask_f, w, 0.0)
    w_b = jnp.where(m24(w_f, 1), w_f, 0.0) if grad_input == "prune_output_dim" else w_f
    y = x32 @ w_f
    dx = dy @ w_b.T
    if grad_weight == "fixed_mask":
        m = flat_keep(b, t, k, pattern) if keep is None else keep
        dw = jnp.einsum("btk,btn->kn", jnp.where(m, x32, 0.0), shift(dy, s))
    elif grad_weight == "dense":
        dw = jnp.einsum("btk,btn->kn", x32, dy)
    else:
        raise ValueError(grad_weight)
    if sr_ste and mask_f is not None:
        dw = dw + sr_ste * jnp.where(mask_f, 0.0, w)
    return y, dw, dx


def run_layer(cfg, w, x, dy, fn=lambda w, x: x @ w):
    """(Y, dW, dX) of sparsify(fn, cfg) through jax.vjp."""
    y, pull = jax.vjp(fst_jax.sparsify(fn, cfg), w, x)
    dw, dx = pull(dy)
    return y, dw, dx


def primitive_names(jaxpr: Any) -> list[str]:
    """Every equation's primitive name, recursing into sub-jaxprs in the equations' params."""
    names: list[str] = []

    def subs(v: Any):
        if hasattr(v, "eqns"):  # Jaxpr
            yield v
        elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):  # ClosedJaxpr
            yield v.jaxpr
        elif isinstance(v, (tuple, list)):
            for u in v:
                yield from subs(u)

    def walk(j: Any) -> None:
        for eqn in j.eqns:
            names.append(eqn.primitive.name)
            for v in eqn.params.values():
                for sub in subs(v):
                    walk(sub)

    walk(jaxpr.jaxpr if hasattr(jaxpr, "jaxpr") else jaxpr)
    return names


def n_custom_vjp(fn, *args) -> int:
    """The FST sparse matmuls (custom_vjps holding a matmul; the SR-STE identity has none)."""
    return count_sparse_matmuls(jax.make_jaxpr(fn)(*args))


def row_for(rows, path: str):
    (row,) = [r for r in rows if r.param_path == path]
    return row


def mlp(params, x):
    for w in params[:-1]:
        x = jnp.tanh(x @ w)
    return jnp.mean((x @ params[-1]) ** 2)


# ------------------------------------------------------------------------------------------------
# 5a. skip_first / skip_last count only real layers: RMSNorm-style scale einsum (penzai)
# ------------------------------------------------------------------------------------------------


def rmsnorm_model(p, x):
    h = x * lax.rsqrt(jnp.mean(x**2, axis=-1, keepdims=True) + 1e-6)
    h = jnp.einsum("btd,d->btd", h, p["scale"])  # a dot_general with no contracting dim
    h = jnp.tanh(h @ p["w1"])
    h = jnp.tanh(h @ p["w2"])
    return h @ p["w3"]


def _rms_params():
    return {"scale": 1.0 + _normal(0, 8, scale=0.1), "w1": _normal(1, 8, 16), "w2": _normal(2, 16, 16),
            "w3": _normal(3, 16, 8)}


def test_rmsnorm_scale_einsum_does_not_consume_skip_first():
    """5a: an einsum("btd,d->btd") scale before the first layer is not a layer: w1 stays dense
    (skip_first), w2 is sparse, w3 dense (skip_last)."""
    p, x = _rms_params(), _normal(4, 2, 4, 8)
    rows = fst_jax.report(rmsnorm_model)(p, x).rows
    r1, r2, r3 = (row_for(rows, f"['{k}']") for k in ("w1", "w2", "w3"))
    assert r1.forward.startswith("dense") and "skip_first" in r1.forward, r1.forward
    assert r2.forward == "sparse", r2.forward
    assert r3.forward.startswith("dense") and "skip_last" in r3.forward, r3.forward
    # Numerically: only w2 is pruned in the forward product.
    pruned = dict(p, w2=jnp.where(m24(p["w2"], 0), p["w2"], 0.0))
    close(fst_jax.sparsify(rmsnorm_model)(p, x), rmsnorm_model(pruned, x))


def test_integer_weight_matmul_does_not_consume_skip_first():
    """5a: an integer matmul (int weight, e.g. a one-hot lookup table) before the first layer is
    not a float layer: w1 stays dense (skip_first), w2 is sparse."""
    def model(p, ids):
        onehot = (ids[..., None] == jnp.arange(8)[None, None]).astype(jnp.int32)
        h = (onehot @ p["table"]).astype(jnp.float32)  # int32 x int32
        h = jnp.tanh(h @ p["w1"])
        h = jnp.tanh(h @ p["w2"])
        return h @ p["w3"]

    p = {"table": S((8, 8), jnp.int32), "w1": S((8, 16), jnp.float32), "w2": S((16, 16), jnp.float32),
         "w3": S((16, 8), jnp.float32)}
    rows = fst_jax.report(model)(p, S((2, 4), jnp.int32)).rows
    assert rows[0].forward.startswith("dense")  # the int32 x int32 lookup
    r1, r2, r3 = (row_for(rows, f"['{k}']") for k in ("w1", "w2", "w3"))
    assert "skip_first" in r1.forward, r1.forward
    assert r2.forward == "sparse", r2.forward
    assert "skip_last" in r3.forward, r3.forward


# ------------------------------------------------------------------------------------------------
# 5b. int8 activation x f32 weight is a float matmul
# ------------------------------------------------------------------------------------------------


def _int8(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).integers(-8, 8, size=shape), jnp.int8)


@pytest.mark.parametrize("matmul", [
    lambda w, x: x @ w,
    lambda w, x: jnp.matmul(x, w, preferred_element_type=jnp.float32),
    lambda w, x: lax.dot_general(x, w, (((2,), (0,)), ((), ())), preferred_element_type=jnp.float32),
], ids=["at", "jnp.matmul", "dot_general"])
def test_int8_activation_times_float_weight_is_sparse(matmul):
    """5b: x_int8 @ w_f32 (one mixed-dtype dot_general) is decided as a float matmul: forward is
    x.astype(f32) @ (w ⊙ mask_2to4(w, K)), and the grad-weight product follows the recipe."""
    w, x = _normal(0, 16, 12), _int8(1, 2, 8, 16)
    rows = fst_jax.report(matmul, ALL)(w, x).rows
    assert rows[0].forward == "sparse" and rows[0].grad_weight.startswith("sparse"), rows[0]
    sf = fst_jax.sparsify(matmul, ALL)
    y, pull = jax.vjp(lambda w: sf(w, x), w)
    assert y.dtype == jnp.float32
    close(y, x.astype(jnp.float32) @ jnp.where(m24(w, 0), w, 0.0))
    dy = _normal(2, 2, 8, 12)
    (dw,) = pull(dy)
    close(dw, ref_layer(w, x, dy, s=0.5)[1])


def test_int8_input_mlp_default_config_skips_only_first_and_last():
    """5b: a 4-layer MLP on an int8 input keeps 2 sparse layers (the int8 layer is the first)."""
    params = [_normal(i, 16, 16, scale=0.25) for i in range(4)]
    x = _int8(9, 2, 8, 16)
    rows = fst_jax.report(mlp)(params, x).rows
    fwd = [r.forward for r in rows]
    assert fwd[0].startswith("dense") and "skip_first" in fwd[0], fwd
    assert fwd[1:3] == ["sparse", "sparse"], fwd
    assert fwd[3].startswith("dense") and "skip_last" in fwd[3], fwd


# ------------------------------------------------------------------------------------------------
# 5c. SR-STE once per weight entry per step
# ------------------------------------------------------------------------------------------------

SR0 = fst_jax.FSTConfig(skip_first=False, skip_last=False, forward=True, restore_scale=0.5, sr_ste=0.0)
SR1 = SR0.replace(sr_ste=LAM)


def _sr_ste_delta(fn, params, *args):
    g1 = jax.grad(fst_jax.sparsify(fn, SR1))(params, *args)
    g0 = jax.grad(fst_jax.sparsify(fn, SR0))(params, *args)
    return jax.tree.map(lambda a, b: a - b, g1, g0)


def _term(w, axis=0):
    return LAM * jnp.where(m24(w, axis), 0.0, w)


def rnn(p, xs):
    """A scanned RNN cell over time-major xs [T, B, D] (Haiku LSTM/GRU stand-in)."""
    def cell(h, x_t):
        h = jnp.tanh(x_t @ p["wx"] + h @ p["wh"])
        return h, h

    _, hs = lax.scan(cell, jnp.zeros((xs.shape[1], p["wh"].shape[0])), xs)
    return jnp.mean(hs**2)


def test_sr_ste_once_for_a_scanned_rnn_cell():
    """5c: a weight used by a lax.scan over T=5 time steps gets λ(1−m)⊙W once, not 5 times."""
    p = {"wx": _normal(0, 8, 8, scale=0.3), "wh": _normal(1, 8, 8, scale=0.3)}
    xs = _normal(2, 5, 4, 8)
    delta = _sr_ste_delta(rnn, p, xs)
    close(delta, {"wx": _term(p["wx"]), "wh": _term(p["wh"])}, atol=1e-6)


@pytest.mark.parametrize("uses", [2, 3])
def test_sr_ste_once_for_a_shared_layer(uses):
    """5c: one weight used 2× (a weight used twice) and 3× (ALBERT's shared layer) gets the term
    once."""
    def shared(p, x):
        h = x @ p["embed"]
        for _ in range(uses):
            h = jnp.tanh(h @ p["layer"])
        return jnp.mean(h**2)

    p = {"embed": _normal(0, 8, 8, scale=0.3), "layer": _normal(1, 8, 8, scale=0.3)}
    delta = _sr_ste_delta(shared, p, _normal(2, 2, 4, 8))
    close(delta, {"embed": _term(p["embed"]), "layer": _term(p["layer"])}, atol=1e-6)


def test_sr_ste_once_per_layer_for_a_stacked_weight_scanned_over_layers():
    """5c: a stacked [L, D, D] weight sliced by a scan over layers gets the term once per layer,
    i.e. once per entry."""
    def stacked(ws, x):
        h, _ = lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)
        return jnp.mean(h**2)

    ws = _normal(0, 3, 8, 8, scale=0.3)
    delta = _sr_ste_delta(stacked, ws, _normal(1, 2, 4, 8))
    close(delta, jnp.stack([_term(ws[i]) for i in range(3)]), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# 5d. forward_masks follows split and concatenate
# ------------------------------------------------------------------------------------------------


def _assert_export_equals_sparse_forward(fn, cfg, params, *args):
    masks = fst_jax.forward_masks(fn, cfg)(params, *args)
    assert not masks.not_exportable, masks.not_exportable
    dense = jax.jit(fn)(fst_jax.prune_params(params, masks), *args)
    fst = jax.jit(fst_jax.sparsify(fn, cfg))(params, *args)
    for d, s in zip(jax.tree.leaves(dense), jax.tree.leaves(fst), strict=True):
        np.testing.assert_array_equal(np.asarray(d), np.asarray(s))
    return masks


def lstm_split(p, x):
    """Haiku-style: one [D, 3D] kernel split into 3 gates, each used by its own matmul."""
    a, b, c = jnp.split(p["w"], 3, axis=1)
    return jax.nn.sigmoid(x @ a) * jnp.tanh(x @ b) + x @ c


def gru_split(p, x):
    """Haiku GRU's w_h: an uneven split [D, 3H] -> [D, 2H] (gates) and [D, H] (candidate)."""
    gates, cand = jnp.split(p["w"], [16], axis=1)
    z, r = jnp.split(jax.nn.sigmoid(x @ gates), 2, axis=-1)
    return z * jnp.tanh(r * (x @ cand))


def k_split(p, x):
    """A kernel split along its contracting axis, the halves used on two inputs."""
    top, bottom = jnp.split(p["w"], 2, axis=0)
    return jnp.tanh(x[..., :8] @ top) + jnp.tanh(x[..., 8:] @ bottom)


@pytest.mark.parametrize("fn, w_shape, x_shape", [
    (lstm_split, (8, 24), (2, 4, 8)),
    (gru_split, (8, 24), (2, 4, 8)),
    (k_split, (16, 8), (2, 4, 16)),
], ids=["split3", "split_uneven", "split_K"])
def test_forward_masks_follow_split(fn, w_shape, x_shape):
    """5d: forward_masks follows a multi-output split; the mask per leaf is 2:4 along each
    part's K, and prune_params + a plain forward equals the sparsified forward."""
    p, x = {"w": _normal(0, *w_shape)}, _normal(1, *x_shape)
    masks = _assert_export_equals_sparse_forward(fn, ALL, p, x)
    if fn is k_split:
        want = jnp.concatenate([m24(p["w"][:8], 0), m24(p["w"][8:], 0)], axis=0)
    else:
        want = m24(p["w"], 0)  # K is axis 0 of every column block
    np.testing.assert_array_equal(np.asarray(masks.tree["w"]), np.asarray(want))


def lstm_concat(p, x):
    """Flax OptimizedLSTMCell-style: 4 gate kernels [D, H] concatenated to [D, 4H], one matmul."""
    w = jnp.concatenate([p["i"], p["f"], p["g"], p["o"]], axis=1)
    i, f, g, o = jnp.split(x @ w, 4, axis=-1)
    return jax.nn.sigmoid(f) * jnp.tanh(g) * jax.nn.sigmoid(i) + jax.nn.sigmoid(o)


def test_forward_masks_follow_concatenate_gate_kernels():
    """5d: forward_masks follows concatenate: per leaf, the 2:4 mask of each gate kernel."""
    p = {k: _normal(i, 8, 8) for i, k in enumerate("ifgo")}
    masks = _assert_export_equals_sparse_forward(lstm_concat, ALL, p, _normal(9, 2, 4, 8))
    for k in "ifgo":
        np.testing.assert_array_equal(np.asarray(masks.tree[k]), np.asarray(m24(p[k], 0)), err_msg=k)


def test_forward_masks_follow_concatenate_along_k():
    """5d: input and hidden kernels concatenated along K ([x, h] @ [Wx; Wh])."""
    def cell(p, x):
        h = jnp.tanh(x)
        return jnp.concatenate([x, h], axis=-1) @ jnp.concatenate([p["wx"], p["wh"]], axis=0)

    p = {"wx": _normal(0, 8, 12), "wh": _normal(1, 8, 12)}
    masks = _assert_export_equals_sparse_forward(cell, ALL, p, _normal(2, 2, 4, 8))
    full = m24(jnp.concatenate([p["wx"], p["wh"]], axis=0), 0)
    np.testing.assert_array_equal(np.asarray(masks.tree["wx"]), np.asarray(full[:8]))
    np.testing.assert_array_equal(np.asarray(masks.tree["wh"]), np.asarray(full[8:]))


def test_forward_masks_op_it_cannot_invert_is_named():
    """5d: a weight reached through an op it cannot invert (w * 2) stays not exportable, the op
    named."""
    p = {"w": _normal(0, 8, 8)}
    masks = fst_jax.forward_masks(lambda p, x: x @ (p["w"] * 2), ALL)(p, _normal(1, 2, 8))
    assert "['w']" in masks.not_exportable and "mul" in masks.not_exportable["['w']"]


# ------------------------------------------------------------------------------------------------
# 5e. grad-weight sparse for any token count >= 2, pattern indexed by p = b·T + t
# ------------------------------------------------------------------------------------------------


def test_reference_flat_mask_is_2to4_along_p_and_per_sequence_for_even_t():
    """5e (the reference itself): M indexed by p is exactly 2 of every 4 along the flattened
    free dims for any T, and equals the per-sequence pattern for even T."""
    for t in (2, 3, 5, 8, 17):
        for pattern in ("checkerboard", "even", "odd"):
            m = flat_keep(4, t, 8, pattern).reshape(4 * t, 8)
            assert (m.reshape(t, 4, 8).sum(axis=1) == 2).all(), (t, pattern)
            if t % 2 == 0:
                np.testing.assert_array_equal(flat_keep(4, t, 8, pattern), per_sequence_keep(4, t, 8, pattern))


@pytest.mark.parametrize("t", [2, 3, 17])
def test_odd_and_small_token_counts_report_sparse(t):
    """5e: grad-weight is sparse for T = 2, 3, 17; the report gives the token axis and length."""
    row = fst_jax.report(lambda w, x: x @ w, ALL)(S((16, 12), jnp.float32), S((2, t, 16), jnp.float32)).rows[0]
    assert row.grad_weight.startswith("sparse"), row.grad_weight
    assert row.tokens == t
    assert row.token_axis is not None and row.token_axis % 3 == 1


@pytest.mark.parametrize("mode", ["masked", "compact"])
@pytest.mark.parametrize("t", [2, 3, 17])
def test_odd_token_grad_weight_reference(t, mode):
    """5e: at T = 2, 3, 17, dW = (M ⊙ A)ᵀ·dY' with M by p = b·T + t and the shift wrapping
    within each sequence, in masked and compact mode."""
    w, x, dy = _normal(0, 16, 12), _normal(1, 2, t, 16), _normal(2, 2, t, 12)
    cfg = ALL.replace(mode=mode)
    got = run_layer(cfg, w, x, dy)
    want = ref_layer(w, x, dy, s=0.5)
    for name, g, e in zip(("Y", "dW", "dX"), got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5, err_msg=name)
    assert differs(got[1], ref_layer(w, x, dy, grad_weight="dense")[1])


@pytest.mark.parametrize("pattern", ["checkerboard", "even", "odd"])
def test_odd_token_patterns_17_tokens(pattern):
    """5e: every pattern at T = 17 (odd), B = 3: the kept set follows p = b·T + t."""
    w, x, dy = _normal(0, 8, 8), _normal(1, 3, 17, 8), _normal(2, 3, 17, 8)
    got = run_layer(ALL.replace(pattern=pattern, restore_scale=0.25), w, x, dy)
    want = ref_layer(w, x, dy, pattern=pattern, s=0.25)
    close(got, want)
    # Indexing by t alone would give a different product for odd T (here the reference differs).
    assert differs(want[1], ref_layer(w, x, dy, pattern=pattern, s=0.25,
                                      keep=per_sequence_keep(3, 17, 8, pattern))[1])


def test_even_token_count_is_the_per_sequence_pattern():
    """5e: for even T the p-indexed pattern is today's per-sequence pattern."""
    w, x, dy = _normal(0, 16, 12), _normal(1, 2, 8, 16), _normal(2, 2, 8, 12)
    got = run_layer(ALL, w, x, dy)
    close(got, ref_layer(w, x, dy, s=0.5, keep=per_sequence_keep(2, 8, 16, "checkerboard")))


class _ViT:
    """A ViT-style stand-in: 16 patches + CLS = 17 tokens; embed dense (skip_first), a sparse
    block, a dense head (skip_last)."""

    @staticmethod
    def apply(p, patches):
        tok = patches @ p["embed"]  # [B, 16, D]
        cls = jnp.broadcast_to(p["cls"], (tok.shape[0], 1, tok.shape[2]))
        h = jnp.concatenate([cls, tok], axis=1) + p["pos"][None]  # [B, 17, D]
        h = h + jnp.tanh(h @ p["mlp"])
        return jnp.mean((h[:, 0] @ p["head"]) ** 2)

    @staticmethod
    def params():
        return {"embed": _normal(0, 12, 8, scale=0.3), "cls": _normal(1, 8), "pos": _normal(2, 17, 8, scale=0.1),
                "mlp": _normal(3, 8, 8, scale=0.3), "head": _normal(4, 8, 4, scale=0.3)}


def test_vit_17_tokens_masked_equals_compact_and_reports_sparse():
    """5e: a ViT-style [B, 17, D] hidden layer: grad-weight sparse, masked == compact."""
    p, patches = _ViT.params(), _normal(5, 2, 16, 12)
    cfg = fst_jax.FSTConfig(restore_scale=0.5)
    row = row_for(fst_jax.report(_ViT.apply, cfg)(p, patches).rows, "['mlp']")
    assert row.forward == "sparse" and row.grad_weight.startswith("sparse"), row
    assert row.tokens == 17
    g_masked = jax.grad(fst_jax.sparsify(_ViT.apply, cfg.replace(mode="masked")))(p, patches)
    g_compact = jax.grad(fst_jax.sparsify(_ViT.apply, cfg.replace(mode="compact")))(p, patches)
    close(g_masked, g_compact)
    g_dense_gw = jax.grad(fst_jax.sparsify(_ViT.apply, cfg.replace(grad_weight="dense")))(p, patches)
    assert differs(g_masked["mlp"], g_dense_gw["mlp"])


@pytest.mark.parametrize("mode", ["masked", "compact"])
@pytest.mark.parametrize("width", [7, 10], ids=["5_positions", "8_positions"])
def test_conv_odd_output_positions(mode, width):
    """5e (convolutions): 1-D NWC conv with 5 output positions per image: dW is the im2col
    product with M indexed by p = n·P + pos and k = input channel, the shift wrapping per image
    (8 positions: today's per-image pattern, which checks the reference itself)."""
    n, cin, cout, taps = 2, 8, 12, 3
    pos = width - taps + 1  # VALID: 5 or 8 output positions
    w, x, dy = _normal(0, taps, cin, cout), _normal(1, n, width, cin), _normal(2, n, pos, cout)

    def conv(w, x):
        return lax.conv_general_dilated(x, w, (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"))

    got = run_layer(ALL.replace(mode=mode), w, x, dy, fn=conv)
    w_f = jnp.where(m24(w, 1), w, 0.0)  # 2:4 over input channels
    w_b = jnp.where(m24(w_f, 2), w_f, 0.0)  # grad-input: re-pruned over output channels
    _, pull_x = jax.vjp(lambda x_: conv(w_b, x_), x)
    patches = jnp.stack([x[:, j:j + pos, :] for j in range(taps)], axis=2)  # [n, pos, tap, cin]
    keep = flat_keep(n, pos, cin, "checkerboard")[:, :, None, :]
    dw = jnp.einsum("nptc,npo->tco", jnp.where(keep, patches, 0.0), shift(dy, 0.5))
    close(got, (conv(w_f, x), dw, pull_x(dy)[0]))


# ------------------------------------------------------------------------------------------------
# 5f. token_axis
# ------------------------------------------------------------------------------------------------


def test_token_axis_time_major_equals_batch_major():
    """5f: a time-major [T, B, D] input with token_axis=0 gives the batch-major gradient
    (transposed data); token_axis=-3 is the same axis; the default on time-major differs."""
    t, b = 8, 2
    w, x_bm, dy_bm = _normal(0, 16, 12), _normal(1, b, t, 16), _normal(2, b, t, 12)
    x_tm, dy_tm = x_bm.transpose(1, 0, 2), dy_bm.transpose(1, 0, 2)
    y_bm, dw_bm, dx_bm = run_layer(ALL, w, x_bm, dy_bm)
    close((y_bm, dw_bm, dx_bm), ref_layer(w, x_bm, dy_bm, s=0.5))
    for axis in (0, -3):
        y_tm, dw_tm, dx_tm = run_layer(ALL.replace(token_axis=axis), w, x_tm, dy_tm)
        close((y_tm.transpose(1, 0, 2), dw_tm, dx_tm.transpose(1, 0, 2)), (y_bm, dw_bm, dx_bm))
    _, dw_default, _ = run_layer(ALL, w, x_tm, dy_tm)  # masks along B: not the sequence
    assert differs(dw_default, dw_bm)


def test_token_axis_per_layer_rule_override_and_report():
    """5f + 6: a Rule override sets token_axis for one layer; the report shows the axis used."""
    t, b = 8, 2

    def two(p, x_tm, x_bm):
        return x_tm @ p["tm"], x_bm @ p["bm"]

    p = {"tm": _normal(0, 16, 12), "bm": _normal(1, 16, 12)}
    x_bm, dy_bm = _normal(2, b, t, 16), _normal(3, b, t, 12)
    x2, dy2 = _normal(4, b, t, 16), _normal(5, b, t, 12)
    x_tm, dy_tm = x_bm.transpose(1, 0, 2), dy_bm.transpose(1, 0, 2)
    cfg = ALL.replace(rules=(fst_jax.Rule(pattern=r"\['tm'\]", overrides={"token_axis": 0}),))
    _, pull = jax.vjp(lambda p: fst_jax.sparsify(two, cfg)(p, x_tm, x2), p)
    (g,) = pull((dy_tm, dy2))
    close(g["tm"], ref_layer(p["tm"], x_bm, dy_bm, s=0.5)[1])
    close(g["bm"], ref_layer(p["bm"], x2, dy2, s=0.5)[1])
    rows = fst_jax.report(two, cfg)(p, x_tm, x2).rows
    r_tm, r_bm = row_for(rows, "['tm']"), row_for(rows, "['bm']")
    assert r_tm.token_axis % 3 == 0 and r_tm.tokens == t
    assert r_bm.token_axis % 3 == 1 and r_bm.tokens == t
    r_default = row_for(fst_jax.report(two, ALL)(p, x_tm, x2).rows, "['tm']")
    assert r_default.token_axis % 3 == 1 and r_default.tokens == b
    assert "tok" in str(fst_jax.report(two, cfg)(p, x_tm, x2)).lower()  # the table shows the axis


def test_token_axis_2d_input_and_config_validation():
    """5f: a 2-D [N, K] input's token axis is 0 (N tokens); FSTConfig.token_axis is validated."""
    row = fst_jax.report(lambda w, x: x @ w, ALL)(S((16, 12), jnp.float32), S((6, 16), jnp.float32)).rows[0]
    assert row.token_axis == 0 and row.tokens == 6
    assert fst_jax.FSTConfig().token_axis is None
    assert fst_jax.FSTConfig(token_axis=-1).token_axis == -1
    for bad in (1.5, "0"):
        with pytest.raises(ValueError, match="FSTConfig.token_axis"):
            fst_jax.FSTConfig(token_axis=bad)


# ------------------------------------------------------------------------------------------------
# 6. Per-layer rules: full_match and overrides
# ------------------------------------------------------------------------------------------------


def _scoped(params, x):
    for name in ("Dense_0", "Dense_1", "Dense_2", "Dense_10"):
        with jax.named_scope(name):
            x = jnp.tanh(x @ params[name])
    return jnp.sum(x)


_SCOPED = {k: S((8, 8), jnp.float32) for k in ("Dense_0", "Dense_1", "Dense_2", "Dense_10")}


def test_rule_full_match_on_name_stack():
    """6: full_match=True uses re.fullmatch: Dense_1 does not match Dense_10 (re.search does)."""
    x = S((2, 4, 8), jnp.float32)
    search = ALL.replace(rules=(fst_jax.Rule(pattern="Dense_1", action="dense", on="name_stack"),))
    full = ALL.replace(rules=(fst_jax.Rule(pattern="Dense_1", action="dense", on="name_stack", full_match=True),))
    dense_by = lambda cfg: {r.name_stack for r in fst_jax.report(_scoped, cfg)(_SCOPED, x).rows  # noqa: E731
                            if r.forward.startswith("dense")}
    assert dense_by(search) == {"Dense_1", "Dense_10"}
    assert dense_by(full) == {"Dense_1"}
    assert fst_jax.Rule(pattern="x").full_match is False


def test_rule_full_match_on_param_path():
    """6: full_match on the parameter path matches the whole keystr."""
    x = S((2, 4, 8), jnp.float32)
    cfg = ALL.replace(rules=(fst_jax.Rule(pattern=r"\['Dense_1'\]", action="dense", full_match=True),))
    dense = {r.param_path for r in fst_jax.report(_scoped, cfg)(_SCOPED, x).rows if r.forward.startswith("dense")}
    assert dense == {"['Dense_1']"}
    cfg = ALL.replace(rules=(fst_jax.Rule(pattern=r"Dense_1", action="dense", full_match=True),))
    assert all(r.forward == "sparse" for r in fst_jax.report(_scoped, cfg)(_SCOPED, x).rows)


def test_rule_overrides_per_layer_fields():
    """6: Rule overrides (forward, grad_input, pattern, restore_scale) apply to the matched layer
    only; the first matching rule wins."""
    def two(p, x):
        return x @ p["a"], x @ p["b"]

    p = {"a": _normal(0, 16, 12), "b": _normal(1, 16, 12)}
    x, dya, dyb = _normal(2, 2, 8, 16), _normal(3, 2, 8, 12), _normal(4, 2, 8, 12)
    over = {"forward": False, "grad_input": "dense", "pattern": "odd", "restore_scale": 0.0}
    cfg = ALL.replace(rules=(fst_jax.Rule(pattern=r"\['b'\]", overrides=over),
                             fst_jax.Rule(pattern=r"\['b'\]", action="dense")))
    (ya, yb), pull = jax.vjp(fst_jax.sparsify(two, cfg), p, x)
    g, dx = pull((dya, dyb))
    ra = ref_layer(p["a"], x, dya, s=0.5)
    rb = ref_layer(p["b"], x, dyb, forward=False, grad_input="dense", pattern="odd", s=0.0)
    close((ya, g["a"]), (ra[0], ra[1]))
    close((yb, g["b"]), (rb[0], rb[1]))
    close(dx, ra[2] + rb[2])
    rows = fst_jax.report(two, cfg)(p, x).rows
    assert row_for(rows, "['a']").forward == "sparse"
    assert row_for(rows, "['b']").forward.startswith("dense")
    assert row_for(rows, "['b']").grad_weight.startswith("sparse")


def test_rule_overrides_grad_weight_dense_and_dense_action_still_works():
    """6: overrides={'grad_weight': 'dense'} keeps the other products sparse;
    Rule(pattern=..., action='dense') keeps working."""
    w, x, dy = _normal(0, 16, 12), _normal(1, 2, 8, 16), _normal(2, 2, 8, 12)
    cfg = ALL.replace(rules=(fst_jax.Rule(pattern=".*", overrides={"grad_weight": "dense"}),))
    close(run_layer(cfg, w, x, dy), ref_layer(w, x, dy, grad_weight="dense"))
    cfg = ALL.replace(rules=(fst_jax.Rule(pattern=".*", action="dense"),))
    close(run_layer(cfg, w, x, dy), ref_layer(w, x, dy, forward=False, grad_input="dense", grad_weight="dense"))


@pytest.mark.parametrize("kwargs", [
    dict(overrides={"colour": "red"}),
    dict(overrides={"pattern": "diagonal"}),
    dict(overrides={"restore_scale": float("nan")}),
    dict(overrides={"token_axis": 1.5}),
    dict(action="dense", overrides={"pattern": "even"}),
], ids=["unknown_key", "bad_pattern", "nan_scale", "bad_token_axis", "dense_with_overrides"])
def test_rule_overrides_validation(kwargs):
    """6: overrides are validated like FSTConfig; unknown keys and action='dense' with overrides
    are ValueErrors."""
    with pytest.raises(ValueError):
        fst_jax.Rule(pattern="x", **kwargs)


def test_rule_with_overrides_is_hashable():
    """6: a config carrying rules with overrides is still hashable (a static jit argument)."""
    r1 = fst_jax.Rule(pattern="x", overrides={"pattern": "even", "restore_scale": 1.0})
    r2 = fst_jax.Rule(pattern="x", overrides={"restore_scale": 1.0, "pattern": "even"})
    assert hash(fst_jax.FSTConfig(rules=(r1,))) == hash(fst_jax.FSTConfig(rules=(r2,)))


# ------------------------------------------------------------------------------------------------
# 8. restore_scale validated
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_restore_scale_must_be_finite(value):
    """8: restore_scale NaN / ±inf is a ValueError naming the field."""
    with pytest.raises(ValueError, match="FSTConfig.restore_scale"):
        fst_jax.FSTConfig(restore_scale=value)


# ------------------------------------------------------------------------------------------------
# 4. Arguments as JAX users pass them
# ------------------------------------------------------------------------------------------------


def _train_loss(params, x, train):
    h = jnp.tanh(x @ params[0])
    if train:  # a Python flag in Python control flow, as Flax's `train`/`deterministic`
        h = h * 0.5
    return jnp.mean((h @ params[1]) ** 2)


def _two_params():
    return [_normal(0, 8, 8, scale=0.3), _normal(1, 8, 8, scale=0.3)]


def test_python_bool_argument_is_static():
    """4: sparsify(loss)(p, x, True) works like jax.grad(loss)(p, x, True), positional or keyword."""
    p, x = _two_params(), _normal(2, 2, 4, 8)
    for train in (True, False):
        close(jax.grad(fst_jax.sparsify(_train_loss, IDENTITY))(p, x, train), jax.grad(_train_loss)(p, x, train))
        close(jax.grad(fst_jax.sparsify(_train_loss, IDENTITY))(p, x, train=train),
              jax.grad(_train_loss)(p, x, train=train))
    sf = fst_jax.sparsify(_train_loss, ALL)
    assert differs(jax.grad(sf)(p, x, True)[0], jax.grad(sf)(p, x, False)[0])


def test_python_str_none_and_bool_leaves_are_static():
    """4: bool, str and None leaves inside a non-parameter pytree argument are static."""
    def loss(params, batch):
        h = batch["x"] @ params[0]
        h = jnp.tanh(h) if batch["act"] == "tanh" else jax.nn.relu(h)
        if batch["mask"] is not None:
            h = h * batch["mask"]
        if not batch["deterministic"]:
            h = h * 0.5
        return jnp.mean((h @ params[1]) ** 2)

    p, x = _two_params(), _normal(2, 2, 4, 8)
    for act, mask, det in (("tanh", None, True), ("relu", jnp.ones((2, 4, 8)), False)):
        batch = {"x": x, "act": act, "mask": mask, "deterministic": det}
        close(jax.grad(fst_jax.sparsify(loss, IDENTITY))(p, batch), jax.grad(loss)(p, batch))


def test_python_int_and_float_arguments_are_traced_without_retracing():
    """4: an eager int step counter (and a float) is traced like jax.jit does: steps 0..4 with the
    same shapes trace fn once."""
    traces = []

    def loss(w, x, step, lr_scale):
        traces.append(1)
        return jnp.mean((x @ w) ** 2) * (1.0 + 0.1 * step) * lr_scale

    w, x = _normal(0, 8, 8), _normal(1, 2, 4, 8)
    sf = fst_jax.sparsify(loss, ALL)
    base = float(sf(w, x, 0, 1.0))
    g_base = jax.grad(sf)(w, x, 0, 1.0)
    for step in range(5):
        close(sf(w, x, step, 2.0), 2.0 * (1.0 + 0.1 * step) * base)
        close(jax.grad(sf)(w, x, step, 2.0), 2.0 * (1.0 + 0.1 * step) * g_base, atol=1e-5)
    assert len(traces) == 1, len(traces)


@pytest.mark.parametrize("how", ["if", "range", "kwarg"])
def test_traced_int_in_python_control_flow_names_the_argument(how):
    """4: a traced int used in Python control flow fails with an error naming the argument and
    static_argnames; static_argnums / static_argnames make it work."""
    def loss(w, x, num_layers):
        h = x
        if how == "if":
            if num_layers > 1:
                h = jnp.tanh(h @ w)
        else:
            for _ in range(num_layers):
                h = jnp.tanh(h @ w)
        return jnp.sum(h @ w)

    w, x = _normal(0, 8, 8), _normal(1, 2, 4, 8)
    sf = fst_jax.sparsify(loss, ALL)
    with pytest.raises(TypeError) as info:
        if how == "kwarg":
            sf(w, x, num_layers=2)
        else:
            sf(w, x, 2)
    msg = str(info.value)
    assert "static_argnames" in msg, msg
    if how == "kwarg":
        assert "num_layers" in msg, msg
    else:
        assert "args[2]" in msg or "num_layers" in msg, msg
    ok = fst_jax.sparsify(loss, IDENTITY, static_argnames="num_layers")(w, x, num_layers=2)
    close(ok, loss(w, x, 2))
    ok = fst_jax.sparsify(loss, IDENTITY, static_argnums=2)(w, x, 2)
    close(ok, loss(w, x, 2))


def test_non_array_aux_passes_through_value_and_grad():
    """4: jax.value_and_grad(sparsify(f), has_aux=True) with a str and an int in aux works and
    returns them as plain JAX does."""
    def f(w, x):
        y = x @ w
        return jnp.mean(y**2), {"name": "abc", "n": 3, "y": y}

    w, x = _normal(0, 8, 8), _normal(1, 2, 4, 8)
    (v_ref, aux_ref), g_ref = jax.value_and_grad(f, has_aux=True)(w, x)
    (v, aux), g = jax.value_and_grad(fst_jax.sparsify(f, IDENTITY), has_aux=True)(w, x)
    assert aux["name"] == aux_ref["name"] == "abc"
    assert aux["n"] == aux_ref["n"] == 3 and type(aux["n"]) is type(aux_ref["n"])
    close((v, g, aux["y"]), (v_ref, g_ref, aux_ref["y"]))
    g2, aux2 = jax.grad(fst_jax.sparsify(f, ALL), has_aux=True)(w, x)
    assert aux2["name"] == "abc" and aux2["n"] == 3 and g2.shape == w.shape


# ------------------------------------------------------------------------------------------------
# 3. The cache keeps the rewrite; the key includes the trace context
# ------------------------------------------------------------------------------------------------

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch


class _CountCompiles:
    def __enter__(self):
        self.n = 0

        def listener(event, duration, **kwargs):
            if event == BACKEND_COMPILE_EVENT:
                self.n += 1

        self._listener = listener
        jax.monitoring.register_event_duration_secs_listener(listener)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listener)


@jax.jit
def _inner_layer(h, w):
    return jnp.tanh(h @ w)


def _loss_with_inner_jit(params, x):
    h = _inner_layer(x, params[0])
    h = _inner_layer(h, params[1])
    h = jnp.tanh(h @ params[2])
    return jnp.mean((h @ params[3]) ** 2)


def test_second_eager_call_compiles_nothing():
    """3: a second eager jax.grad(sparsify(loss)) with the same shapes compiles nothing (with an
    inner jax.jit in the loss); plain JAX as the control."""
    params = [_normal(i, 8, 8, scale=0.3) for i in range(4)]
    x = _normal(9, 2, 4, 8)
    x2 = x + 1.0
    with _CountCompiles() as sanity:  # the listener sees a fresh compilation
        jax.jit(lambda v: v * 3.0 + 1.0)(jnp.ones((3, 5, 7)))
    assert sanity.n >= 1
    grad_plain = jax.grad(_loss_with_inner_jit)
    grad_plain(params, x)
    with _CountCompiles() as plain:
        grad_plain(params, x2)
    assert plain.n == 0  # the control: plain eager JAX does not recompile
    grad_fst = jax.grad(fst_jax.sparsify(_loss_with_inner_jit, fst_jax.FSTConfig(restore_scale=0.5)))
    first = grad_fst(params, x)
    with _CountCompiles() as second_call:
        second = grad_fst(params, x)
    with _CountCompiles() as third_call:
        grad_fst(params, x2)
    assert (second_call.n, third_call.n) == (0, 0), "XLA compilations on the second and third eager calls"
    close(first, second, rtol=0, atol=0)


def test_cache_key_includes_x64_context():
    """3: under jax.enable_x64 after a normal call, an int output is int64 as jax.jit gives."""
    def f(w, x):
        y = x @ w
        return jnp.sum(y), jnp.argmax(y), jnp.arange(3)

    w, x = _normal(0, 8, 8), _normal(1, 2, 8)
    sf = fst_jax.sparsify(f, ALL)
    normal = sf(w, x)
    assert normal[1].dtype == jax.jit(f)(w, x)[1].dtype
    with jax.enable_x64(True):
        want = jax.jit(f)(w, x)
        got = sf(w, x)
        assert want[1].dtype == jnp.int64
        assert [o.dtype for o in got] == [o.dtype for o in want]
    assert sf(w, x)[1].dtype == normal[1].dtype


# ------------------------------------------------------------------------------------------------
# 2. Forward mode; matmuls dense in all three products are left as they are
# ------------------------------------------------------------------------------------------------


def _mlp_params(n):
    return [_normal(i, 8, 8, scale=0.3) for i in range(n)]


@pytest.mark.parametrize("fwd", [
    lambda f, p, x: jax.jvp(f, (p, x), (p, x)),
    lambda f, p, x: jax.jacfwd(f)(p, x),
    lambda f, p, x: jax.hessian(f)(p, x),
], ids=["jvp", "jacfwd", "hessian"])
def test_forward_mode_through_a_sparse_matmul_raises_fst_error(fwd):
    """2: jvp, jacfwd and hessian of a function with a sparse matmul raise an fst_jax error."""
    with pytest.raises(Exception, match="fst_jax"):
        fwd(fst_jax.sparsify(mlp, ALL), _mlp_params(3), _normal(9, 2, 8))


def test_all_dense_function_supports_jvp():
    """2: the default config on a 2-layer MLP leaves both matmuls dense (first, last): jvp works
    and equals plain jvp."""
    p, x = _mlp_params(2), _normal(9, 2, 4, 8)
    tp, tx = _mlp_params(2)[::-1], _normal(10, 2, 4, 8)
    got = jax.jvp(fst_jax.sparsify(mlp), (p, x), (tp, tx))
    close(got, jax.jvp(mlp, (p, x), (tp, tx)))


def test_dense_matmuls_are_not_routed_through_custom_vjp():
    """2: with the default config a 3-layer MLP has one custom_vjp (the sparse middle layer),
    counted structurally over the jaxpr's equations and sub-jaxprs."""
    p, x = _mlp_params(3), _normal(9, 2, 4, 8)
    assert n_custom_vjp(fst_jax.sparsify(mlp), p, x) == 1
    assert n_custom_vjp(fst_jax.sparsify(mlp, ALL), p, x) == 3
    every_dense = ALL.replace(rules=(fst_jax.Rule(pattern=".*", action="dense"),))
    assert n_custom_vjp(fst_jax.sparsify(mlp, every_dense), p, x) == 0
    # Inside a jit and a scan too.
    def nested(p, x):
        h = jax.jit(lambda h: jnp.tanh(h @ p[0]))(x)
        h, _ = lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, jnp.stack(p[1:3]))
        return jnp.sum(h @ p[3])

    p4 = _mlp_params(4)
    assert n_custom_vjp(fst_jax.sparsify(nested), p4, x) == 1  # the scanned layer only


# ------------------------------------------------------------------------------------------------
# 7. pruned_params; Masks accepted where its .tree is
# ------------------------------------------------------------------------------------------------


def test_pruned_params_give_the_sparsified_forward():
    """7: fst_jax.pruned_params returns the 2:4 model: fn(pruned, x) == sparsify(fn)(params, x)."""
    params = {f"Dense_{i}": {"kernel": _normal(i, 8, 8, scale=0.3), "bias": _normal(10 + i, 8)} for i in range(3)}

    def model(p, x):
        for i in range(3):
            x = jnp.tanh(x @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"][None, None])
        return x

    x = _normal(9, 2, 4, 8)
    pruned = fst_jax.pruned_params(model)(params, x)
    assert jax.tree.structure(pruned) == jax.tree.structure(params)
    k1 = params["Dense_1"]["kernel"]
    np.testing.assert_array_equal(np.asarray(pruned["Dense_1"]["kernel"]), np.asarray(jnp.where(m24(k1, 0), k1, 0.0)))
    for name in ("Dense_0", "Dense_2"):  # skip_first / skip_last: unpruned
        np.testing.assert_array_equal(np.asarray(pruned[name]["kernel"]), np.asarray(params[name]["kernel"]))
    for i in range(3):
        bias = f"Dense_{i}"
        np.testing.assert_array_equal(np.asarray(pruned[bias]["bias"]), np.asarray(params[bias]["bias"]))
    np.testing.assert_array_equal(np.asarray(jax.jit(model)(pruned, x)),
                                  np.asarray(jax.jit(fst_jax.sparsify(model))(params, x)))


def test_pruned_params_with_config_and_argnums():
    """7: pruned_params takes the config, params_argnums and static arguments."""
    def f(x, w, act):
        return jnp.tanh(x @ w) if act == "tanh" else x @ w

    w, x = _normal(0, 8, 8), _normal(1, 2, 8)
    pruned = fst_jax.pruned_params(f, ALL, params_argnums=1, static_argnums=2)(x, w, "tanh")
    np.testing.assert_array_equal(np.asarray(pruned), np.asarray(jnp.where(m24(w, 0), w, 0.0)))


def test_prune_params_and_optax_sr_ste_accept_masks():
    """7: prune_params and fst_jax.optax.sr_ste accept a Masks as well as its .tree."""
    p, x = _mlp_params(3), _normal(9, 2, 8)
    masks = fst_jax.forward_masks(mlp)(p, x)
    a, b = fst_jax.prune_params(p, masks), fst_jax.prune_params(p, masks.tree)
    close(a, b, rtol=0, atol=0)
    updates = _mlp_params(3)[::-1]
    results = []
    for m in (masks, masks.tree):
        tx = fst_jax.optax.sr_ste(m, LAM)
        results.append(tx.update(updates, tx.init(p), p)[0])
    close(results[0], results[1], rtol=0, atol=0)
    want = [updates[0], updates[1] + _term(p[1]), updates[2]]
    close(results[0], want, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# 8. Report: FLOPs of data operands, width
# ------------------------------------------------------------------------------------------------


def test_report_flops_skip_grad_input_of_data():
    """8: no grad-input product for an operand that is pure data: the first layer's
    flops_dense is forward + grad-weight, a hidden layer's all three."""
    def two(p, x):
        return jnp.sum(jnp.tanh(x @ p[0]) @ p[1])

    b, t, k, n, o = 2, 4, 8, 16, 12
    rows = fst_jax.report(two, ALL)([S((k, n), jnp.float32), S((n, o), jnp.float32)], S((b, t, k), jnp.float32)).rows
    assert rows[0].flops_dense == 2 * (2 * b * t * k * n)
    assert rows[1].flops_dense == 3 * (2 * b * t * n * o)


def test_report_lines_fit_120_columns():
    """8: str(report) lines are at most 120 characters by default, with long paths and shapes."""
    params = {"params": {f"encoder_layer_{i}": {"self_attention": {"query_projection": {
        "kernel": S((16, 16), jnp.bfloat16)}}} for i in range(3)}}

    def model(p, x):
        for i in range(3):
            with jax.named_scope(f"TransformerEncoder/encoder_layer_{i}/self_attention/query_projection"):
                x = jnp.tanh(x @ p["params"][f"encoder_layer_{i}"]["self_attention"]["query_projection"]["kernel"])
        return jnp.sum(x)

    text = str(fst_jax.report(model)(params, S((4, 32, 16), jnp.bfloat16)))
    too_long = [line for line in text.splitlines() if len(line) > 120]
    assert not too_long, "\n".join(too_long)
    assert "query_projection" in text or "encoder_layer" in text
