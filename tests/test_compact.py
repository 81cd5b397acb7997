"""Compact execution computes the masked numbers, saving only the kept half of the activation."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import fst_jax

BASE = fst_jax.FSTConfig(skip_first=False, skip_last=False, sr_ste=1e-2)
TOL = {jnp.float32: dict(rtol=2e-5, atol=2e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}

# (name, fn(w, a), weight shape, activation shape)
LAYOUTS = [
    ("x@w", lambda w, a: a @ w, (16, 12), (2, 8, 16)),
    ("w_lhs", lambda w, a: lax.dot_general(w, a, (((1,), (2,)), ((), ()))), (12, 16), (2, 8, 16)),
    ("x@w.T", lambda w, a: a @ w.T, (12, 16), (2, 8, 16)),
    ("two_contracting", lambda w, a: jnp.einsum("btij,ijo->bto", a, w), (2, 8, 12), (2, 8, 2, 8)),
    ("batch_dims", lambda w, a: jnp.einsum("hbk,hko->hbo", a, w), (2, 16, 8), (2, 12, 16)),
    ("2d", lambda w, a: a @ w, (16, 8), (12, 16)),
]


def cfgs(pattern, scale, mode):
    return BASE.replace(pattern=pattern, restore_scale=scale, mode=mode)


def vjp_all(fn, cfg, w, a, key=2):
    y, pull = jax.vjp(fst_jax.sparsify(fn, cfg), w, a)
    dy = jax.random.normal(jax.random.key(key), y.shape, y.dtype)
    return y, pull(dy)


def inputs(ws, as_, dtype=jnp.float32):
    kw, ka = jax.random.split(jax.random.key(0))
    return jax.random.normal(kw, ws, dtype), jax.random.normal(ka, as_, dtype)


def assert_close(a, b, dtype=jnp.float32):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(v, np.float32),
                                                         **TOL[dtype]), a, b)


@pytest.mark.parametrize("name,fn,ws,as_", LAYOUTS, ids=[x[0] for x in LAYOUTS])
@pytest.mark.parametrize("pattern", ["checkerboard", "even", "odd"])
@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_compact_equals_masked(name, fn, ws, as_, pattern, scale):
    w, a = inputs(ws, as_)
    masked = vjp_all(fn, cfgs(pattern, scale, "masked"), w, a)
    compact = vjp_all(fn, cfgs(pattern, scale, "compact"), w, a)
    assert_close(compact, masked)
    dense = vjp_all(fn, cfgs(pattern, scale, "masked").replace(grad_weight="dense"), w, a)
    assert not np.allclose(compact[1][0], dense[1][0])  # the grad-weight product is sparse


@pytest.mark.parametrize("pattern", ["checkerboard", "odd"])
def test_compact_equals_masked_bf16(pattern):
    _, fn, ws, as_ = LAYOUTS[0]
    w, a = inputs(ws, as_, jnp.bfloat16)
    compact = vjp_all(fn, cfgs(pattern, 0.5, "compact"), w, a)
    masked = vjp_all(fn, cfgs(pattern, 0.5, "masked"), w, a)
    assert compact[1][0].dtype == jnp.bfloat16
    assert_close(compact, masked, jnp.bfloat16)


def mlp(params, x):
    for w in params:
        x = jnp.tanh(x @ w)
    return jnp.mean(x**2)


def _params(n=3, d=16, batch=16, seed=0):
    keys = jax.random.split(jax.random.key(seed), n + 1)
    return [jax.random.normal(k, (d, d)) / 4 for k in keys[:n]], jax.random.normal(keys[-1], (batch, 8, d))


CHECKER = cfgs("checkerboard", 0.5, "compact")


def both(fn, transform=lambda f: f):
    """(compact, masked) of transform(value_and_grad(sparsify(fn)))."""
    return [transform(jax.value_and_grad(fst_jax.sparsify(fn, c))) for c in (CHECKER, CHECKER.replace(mode="masked"))]


def test_jit_vmap_scan_remat():
    params, x = _params()
    c, m = both(mlp, jax.jit)
    assert_close(c(params, x), m(params, x))
    c, m = both(mlp, lambda f: jax.vmap(f, in_axes=(None, 0)))
    assert_close(c(params, x.reshape(4, 4, 8, 16)), m(params, x.reshape(4, 4, 8, 16)))

    def scanned(stacked, x):
        h, _ = lax.scan(lambda h, w: (jax.checkpoint(lambda h, w: jnp.tanh(h @ w))(h, w), None), x, stacked)
        return jnp.mean(h**2)

    c, m = both(scanned, jax.jit)
    assert_close(c(jnp.stack(params), x), m(jnp.stack(params), x))


def test_eight_devices():
    params, x = _params()
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))

    def dp(f):
        step = lambda p, xb: jax.value_and_grad(lambda p: lax.pmean(fst_jax.sparsify(mlp, f)(p, xb), "d"))(p)  # noqa: E731
        return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("d")), out_specs=P()))

    no_sr = CHECKER.replace(sr_ste=0.0)
    assert_close(dp(no_sr)(params, x), dp(no_sr.replace(mode="masked"))(params, x))
    single = jax.value_and_grad(fst_jax.sparsify(mlp, no_sr))(params, x)
    assert_close(dp(no_sr)(params, x), single)


def residual_bytes(fn, cfg, *args):
    """Bytes of the arrays that jax.vjp keeps for the backward pass (the leaves of its closure)."""
    _, pull = jax.vjp(fst_jax.sparsify(fn, cfg) if cfg else fn, *args)
    return sum(leaf.nbytes for leaf in jax.tree.leaves(pull) if hasattr(leaf, "nbytes"))


@pytest.mark.parametrize("pattern", ["checkerboard", "even"])
def test_compact_saves_half_the_activation(pattern):
    w = jnp.ones((64, 64))
    a = jax.random.normal(jax.random.key(0), (8, 32, 64))
    fn = lambda w, a: a @ w  # noqa: E731
    masked = residual_bytes(fn, cfgs(pattern, 0.5, "masked"), w, a)
    compact = residual_bytes(fn, cfgs(pattern, 0.5, "compact"), w, a)
    # the weight is prepared once per step: the backward pass keeps the weight and two bool masks
    # (the grad-input weight's, SR-STE's dropped entries), one byte per entry, and recomputes none
    masks = 2 * w.size
    assert masked == a.nbytes + w.nbytes + masks
    assert compact == a.nbytes // 2 + w.nbytes + masks


def test_compact_report_and_fallbacks():
    S = jax.ShapeDtypeStruct
    r = fst_jax.report(lambda w, a: a @ w, CHECKER)(S((16, 16), jnp.float32), S((2, 8, 16), jnp.float32)).rows[0]
    assert r.grad_weight == "sparse (fixed_mask, checkerboard, compact)"
    # grad_weight != fixed_mask: compact has nothing to compact, and computes the masked numbers.
    w, a = inputs((16, 12), (2, 8, 16))
    for gw in ("prune_grad_output", "dense"):
        fn = LAYOUTS[0][1]
        assert_close(vjp_all(fn, CHECKER.replace(grad_weight=gw), w, a),
                     vjp_all(fn, CHECKER.replace(grad_weight=gw, mode="masked"), w, a))




@pytest.mark.parametrize("pattern", ["checkerboard", "odd"])
@pytest.mark.parametrize("x_shape", [(4, 8, 6, 16), (4, 8, 5, 16)], ids=["stripes", "odd_width"])
def test_compact_pointwise_conv_saves_half_the_input(pattern, x_shape):
    def conv(w, x):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    x = jnp.asarray(np.random.default_rng(0).standard_normal(x_shape), jnp.float32)
    w1, w3 = jnp.ones((1, 1, 16, 16)), jnp.ones((3, 3, 16, 16))
    kept = 2 * w1.size  # two bool masks per weight (see test_compact_saves_half_the_activation)
    assert residual_bytes(conv, cfgs(pattern, 0.5, "masked"), w1, x) == x.nbytes + w1.nbytes + kept
    assert residual_bytes(conv, cfgs(pattern, 0.5, "compact"), w1, x) == x.nbytes // 2 + w1.nbytes + kept
    # A 3x3 window reads every input position from some kept output position: all of it is saved.
    assert residual_bytes(conv, cfgs(pattern, 0.5, "compact"), w3, x) == x.nbytes + w3.nbytes + 2 * w3.size
