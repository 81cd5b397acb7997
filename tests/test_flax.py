"""fst_jax.sparsify on Flax models (linen and nnx), checked against the spec (DESIGN.md §1).

The expected values are computed here independently of fst_jax: the identity config must give
exactly the untransformed numbers, and the default recipe on a 3-layer MLP must match a manual
computation in which only the middle layer is sparse (the first and last weight matmuls are left
dense by default).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fst_jax
from references import count_sparse_matmuls, fixed_mask, mask_2to4, transposable_mask
from fst_jax import FSTConfig

IDENTITY = FSTConfig(
    forward=False, grad_input="dense", grad_weight="dense", sr_ste=0.0, skip_first=False, skip_last=False
)


def assert_trees_equal(got: Any, want: Any) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def check_identity(f, params, x) -> None:
    """Identity config: bit-identical outputs and grads (params and input); every matmul is dense in
    all three products, so none is routed through the custom_vjp."""
    sparse = fst_jax.sparsify(f, IDENTITY)
    y0, pull0 = jax.vjp(f, params, x)
    y1, pull1 = jax.vjp(sparse, params, x)
    assert_trees_equal(y1, y0)
    dy = _normal(1, y0.shape, y0.dtype)
    assert_trees_equal(pull1(dy), pull0(dy))
    assert count_sparse_matmuls(jax.make_jaxpr(sparse)(params, x)) == 0


@functools.cache
def _normal_pool(seed: int) -> np.ndarray:
    """Standard normals from a fixed jax.random key: drawn once, sliced per shape (no recompiles)."""
    return np.asarray(jax.random.normal(jax.random.key(seed), (4096,), jnp.float32))


def _normal(seed: int, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    return jnp.asarray(_normal_pool(seed)[: int(np.prod(shape))].reshape(shape), dtype=dtype)


def _x(shape: tuple[int, ...]) -> jax.Array:
    return _normal(0, shape)


@pytest.mark.parametrize(
    "module, x_shape",
    [
        (nn.Dense(12), (2, 8, 16)),
        (nn.DenseGeneral(features=(4, 8), axis=(-2, -1)), (2, 8, 4, 8)),
        (nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16), (2, 8, 16)),
    ],
    ids=["Dense", "DenseGeneral", "MultiHeadDotProductAttention"],
)
def test_linen_identity(module, x_shape):
    x = _x(x_shape)
    params = module.init(jax.random.key(2), x)
    check_identity(lambda p, x: module.apply(p, x), params, x)


def test_nnx_linear_identity():
    graphdef, state = nnx.split(nnx.Linear(16, 12, rngs=nnx.Rngs(0)))

    def loss(state, x):
        return nnx.merge(graphdef, state)(x)

    check_identity(loss, state, _x((2, 8, 16)))


# ------------------------------------------------------------------------------------------------
# Default recipe on a 3-layer MLP: only the middle weight matmul is sparse
# ------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(8)(x)


def _mlp_setup():
    x = _x((2, 8, 16))  # [B, T, K]: t is the sequence axis, T = 8
    params = MLP().init(jax.random.key(3), x)
    return params, x


def _apply(params, x):
    return MLP().apply(params, x)


def _loss(params, x):
    return jnp.mean(_apply(params, x) ** 2)


def _add_bias(y, b):
    return y + b.reshape((1,) * (y.ndim - 1) + b.shape)


def _dense(p, x):
    return _add_bias(x @ p["kernel"], p["bias"])


def _reference_grads(params, x, cfg: FSTConfig):
    """The spec's gradients with Dense_0 and Dense_2 dense and Dense_1 sparse, built by hand."""
    p = params["params"]
    w = p["Dense_1"]["kernel"]  # [K, O]
    if cfg.grad_input == "transposable":  # one mask, 2:4 along K and O, for both products
        mask_f = transposable_mask(w, 0, 1)
    else:
        mask_f = mask_2to4(w, 0) if cfg.forward else np.ones(w.shape, bool)
    w_f = jnp.where(mask_f, w, 0)
    w_b = jnp.where(mask_2to4(w_f, 1), w_f, 0) if cfg.grad_input == "prune_output_dim" else w_f

    h1, pull_head = jax.vjp(lambda p0: nn.relu(_dense(p0, x)), p["Dense_0"])
    y1 = _add_bias(h1 @ w_f, p["Dense_1"]["bias"])
    loss, pull_tail = jax.vjp(lambda y, p2: jnp.mean(_dense(p2, nn.relu(y)) ** 2), y1, p["Dense_2"])
    dy1, dp2 = pull_tail(jnp.ones_like(loss))

    dh1 = dy1 @ w_b.T
    if cfg.grad_weight == "fixed_mask":
        a_w = jnp.where(fixed_mask(h1.shape, 1, (2,), cfg.pattern), h1, 0)
        dy_w = dy1 + cfg.restore_scale * jnp.roll(dy1, 1, axis=1)
    elif cfg.grad_weight == "prune_grad_output":
        a_w, dy_w = h1, jnp.where(mask_2to4(dy1, 1), dy1, 0)
    else:
        a_w, dy_w = h1, dy1
    dw1 = jnp.einsum("btk,bto->ko", a_w, dy_w) + cfg.sr_ste * jnp.where(mask_f, 0, w)
    db1 = dy1.sum(axis=(0, 1))
    (dp0,) = pull_head(dh1)
    return {"params": {"Dense_0": dp0, "Dense_1": {"bias": db1, "kernel": dw1}, "Dense_2": dp2}}


def test_mlp_default_forward_sparsifies_only_the_middle_layer():
    params, x = _mlp_setup()
    got = fst_jax.sparsify(_apply)(params, x)
    masked = jax.tree.map(lambda v: v, params)  # a copy of the nested dicts
    kernel = params["params"]["Dense_1"]["kernel"]
    masked["params"]["Dense_1"]["kernel"] = jnp.where(mask_2to4(kernel, 0), kernel, 0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(_apply(masked, x)), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(got), np.asarray(_apply(params, x)), rtol=1e-3, atol=1e-4)


def test_mlp_default_grads():
    params, x = _mlp_setup()
    grads = jax.jit(jax.grad(fst_jax.sparsify(_loss)))(params, x)
    dense = jax.grad(_loss)(params, x)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params), strict=True):
        assert g.shape == p.shape and g.dtype == p.dtype
        assert np.isfinite(np.asarray(g)).all()
    mid, mid_dense = grads["params"]["Dense_1"]["kernel"], dense["params"]["Dense_1"]["kernel"]
    assert not np.allclose(np.asarray(mid), np.asarray(mid_dense), rtol=1e-3, atol=1e-6)


# Every branch of _reference_grads: each grad-input and grad-weight choice, the fixed patterns,
# forward off, SR-STE large enough to show, a negative restore scale, both modes.
RECIPES = {
    "default": FSTConfig(),
    "transposable": FSTConfig(grad_input="transposable", sr_ste=0.1),
    "grad_input_dense-even": FSTConfig(grad_input="dense", pattern="even", restore_scale=0.5),
    "no_forward-odd": FSTConfig(forward=False, sr_ste=0.0, pattern="odd", restore_scale=-0.5),
    "prune_grad_output": FSTConfig(grad_weight="prune_grad_output", sr_ste=0.1),
    "grad_weight_dense": FSTConfig(grad_weight="dense"),
    "masked": FSTConfig(mode="masked", restore_scale=0.5),
}


@pytest.mark.parametrize("cfg", RECIPES.values(), ids=RECIPES.keys())
def test_mlp_grads_match_the_reference(cfg):
    params, x = _mlp_setup()
    grads = jax.jit(jax.grad(fst_jax.sparsify(_loss, cfg)))(params, x)
    want = _reference_grads(params, x, cfg)
    assert jax.tree.structure(want) == jax.tree.structure(grads)
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(flat_want[path]), rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path)
        )
