"""sparsify composes with JAX transformations and control flow, on one and on 8 simulated devices."""

import functools

import chex

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fst_jax
from references import count_sparse_matmuls

CFG = fst_jax.FSTConfig(skip_first=False, skip_last=False, restore_scale=0.5, sr_ste=1e-2)
D, L = 16, 3


def layer(h, w):
    return jnp.tanh(h @ w)


def loss(params, x):
    h = x
    for w in params:
        h = layer(h, w)
    return jnp.mean(h**2)


def make(batch=8, seq=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), L + 1)
    params = [jax.random.normal(k, (D, D)) / np.sqrt(D) for k in keys[:L]]
    x = jax.random.normal(keys[-1], (batch, seq, D))
    return params, x


def close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol), a, b)


def sparse_value_and_grad(fn=loss, cfg=CFG):
    return jax.value_and_grad(fst_jax.sparsify(fn, cfg))


def test_rewrites_and_differs_from_dense():
    params, x = make()
    assert count_sparse_matmuls(jax.make_jaxpr(fst_jax.sparsify(loss, CFG))(params, x)) == L
    _, g_dense = jax.value_and_grad(loss)(params, x)
    _, g_fst = sparse_value_and_grad()(params, x)
    assert not np.allclose(g_dense[1], g_fst[1])


def test_jit_equals_eager():
    params, x = make()
    close(jax.jit(sparse_value_and_grad())(params, x), sparse_value_and_grad()(params, x))


def test_vmap_of_grad_equals_per_example():
    params, x = make()
    xs = x.reshape(4, 2, 8, D)
    g = jax.vmap(jax.grad(fst_jax.sparsify(loss, CFG)), in_axes=(None, 0))(params, xs)
    ref = [jax.grad(fst_jax.sparsify(loss, CFG))(params, xs[i]) for i in range(4)]
    close(g, jax.tree.map(lambda *a: jnp.stack(a), *ref))


def test_sparsify_of_vmap():
    params, x = make()
    f = lambda p, xs: jnp.mean(jax.vmap(lambda xi: loss(p, xi))(xs))  # noqa: E731
    xs = x.reshape(4, 2, 8, D)
    vg = jax.value_and_grad(fst_jax.sparsify(f, CFG))(params, xs)
    ref = [jax.value_and_grad(fst_jax.sparsify(loss, CFG))(params, xs[i]) for i in range(4)]
    close(vg, jax.tree.map(lambda *a: jnp.mean(jnp.stack(a), 0), *ref), rtol=1e-4)


def scan_loss(stacked, x):
    h, _ = lax.scan(lambda h, w: (layer(h, w), None), x, stacked)
    return jnp.mean(h**2)


def test_scan_over_stacked_layers_equals_unrolled():
    params, x = make()
    stacked = jnp.stack(params)
    vg = jax.jit(sparse_value_and_grad(scan_loss))(stacked, x)
    v, g = sparse_value_and_grad()(params, x)
    close(vg, (v, jnp.stack(g)))
    rows = fst_jax.report(scan_loss, CFG)(stacked, x).rows
    assert len(rows) == 1 and rows[0].trips == L and rows[0].forward == "sparse"


def test_remat_equals_plain():
    params, x = make()
    remat_loss = lambda p, x: loss.__wrapped__(p, x) if False else _remat_loss(p, x)  # noqa: E731
    close(jax.jit(sparse_value_and_grad(remat_loss))(params, x), sparse_value_and_grad()(params, x))


def _remat_loss(params, x):
    h = x
    for w in params:
        h = jax.checkpoint(layer)(h, w)
    return jnp.mean(h**2)


def test_cond_and_jit_inside_equal_plain():
    params, x = make()

    def f(params, x):
        h = lax.cond(jnp.sum(x) > -1e9, lambda h: layer(h, params[0]), lambda h: h, x)
        h = jax.jit(layer)(h, params[1])
        return jnp.mean(layer(h, params[2]) ** 2)

    assert count_sparse_matmuls(jax.make_jaxpr(fst_jax.sparsify(f, CFG))(params, x)) == L
    close(jax.jit(sparse_value_and_grad(f))(params, x), sparse_value_and_grad()(params, x))


def test_while_loop_forward_equals_unrolled():
    params, x = make()
    w = params[0]

    def f(w, x):
        _, h = lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, layer(c[1], w)), (0, x))
        return jnp.mean(h**2)

    assert "custom_vjp_call" in str(jax.make_jaxpr(fst_jax.sparsify(f, CFG))(w, x))
    close(jax.jit(fst_jax.sparsify(f, CFG))(w, x), fst_jax.sparsify(loss, CFG)([w] * 3, x))
    assert fst_jax.report(f, CFG)(w, x).rows[0].trips is None


def _shards(x, n=8):
    return x.reshape(n, x.shape[0] // n, *x.shape[1:])


def test_pmap_of_sparsify_equals_single_device():
    params, x = make(batch=16)

    @functools.partial(jax.pmap, axis_name="d", in_axes=(None, 0))
    def step(params, xb):
        v, g = sparse_value_and_grad()(params, xb)
        return lax.pmean(v, "d"), lax.pmean(g, "d")

    v, g = step(params, _shards(x))
    close((v[0], jax.tree.map(lambda a: a[0], g)), sparse_value_and_grad()(params, x), rtol=1e-4)


NO_SR = CFG.replace(sr_ste=0.0)


def _assert_decay_counted(g, g0, params, times):
    """g - g0 is the SR-STE term counted `times` times (once per device when gradients are summed)."""
    decay = [CFG.sr_ste * jnp.where(fst_jax.mask_2to4(w, axis=0), 0.0, w) for w in params]
    close(jax.tree.map(lambda a, b: a - b, g, g0), [times * d for d in decay], rtol=1e-3, atol=1e-6)


def test_sparsify_of_pmap():
    params, x = make(batch=16)

    def f(params, xs):
        return jnp.mean(jax.pmap(lambda xb: loss(params, xb))(xs))

    assert "custom_vjp_call" in str(jax.make_jaxpr(fst_jax.sparsify(f, CFG))(params, _shards(x)))
    vg0 = jax.value_and_grad(fst_jax.sparsify(f, NO_SR))(params, _shards(x))
    close(vg0, sparse_value_and_grad(cfg=NO_SR)(params, x), rtol=1e-4)
    g = jax.grad(fst_jax.sparsify(f, CFG))(params, _shards(x))
    _assert_decay_counted(g, vg0[1], params, 8)


def _mesh(shape=(8,), names=("d",)):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _data_parallel(fn, mesh):
    """value_and_grad of the mean loss over batch shards, inside shard_map."""
    def step(params, xb):
        return jax.value_and_grad(lambda p: lax.pmean(fn(p, xb), "d"))(params)
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("d")), out_specs=P()))


def test_shard_map_of_sparsify_equals_single_device():
    params, x = make(batch=16)
    mesh = _mesh()
    vg0 = _data_parallel(fst_jax.sparsify(loss, NO_SR), mesh)(params, x)
    close(vg0, sparse_value_and_grad(cfg=NO_SR)(params, x), rtol=1e-4)
    _, g = _data_parallel(fst_jax.sparsify(loss, CFG), mesh)(params, x)
    _assert_decay_counted(g, vg0[1], params, 8)


def test_sparsify_of_shard_map_equals_single_device():
    params, x = make(batch=16)
    mesh = _mesh()

    def f(params, x):
        body = lambda p, xb: lax.pmean(loss(p, xb), "d")  # noqa: E731
        return jax.shard_map(body, mesh=mesh, in_specs=(P(), P("d")), out_specs=P())(params, x)

    assert "custom_vjp_call" in str(jax.make_jaxpr(fst_jax.sparsify(f, CFG))(params, x))
    vg0 = jax.jit(jax.value_and_grad(fst_jax.sparsify(f, NO_SR)))(params, x)
    close(vg0, sparse_value_and_grad(cfg=NO_SR)(params, x), rtol=1e-4)
    g = jax.jit(jax.grad(fst_jax.sparsify(f, CFG)))(params, x)
    _assert_decay_counted(g, vg0[1], params, 8)


def test_jit_with_named_sharding_data_and_model_parallel():
    params, x = make(batch=16)
    mesh = _mesh((4, 2), ("data", "model"))
    p_sh = [NamedSharding(mesh, P(None, "model"))] * L
    x_sh = NamedSharding(mesh, P("data"))
    f = jax.jit(sparse_value_and_grad(), in_shardings=(p_sh, x_sh))
    out = f(jax.device_put(params, p_sh), jax.device_put(x, x_sh))
    close(out, sparse_value_and_grad()(params, x), rtol=1e-4)


def test_sparsify_twice_does_not_rewrite_twice():
    params, x = make()
    once = fst_jax.sparsify(loss, CFG)
    twice = fst_jax.sparsify(once, CFG)
    assert count_sparse_matmuls(jax.make_jaxpr(twice)(params, x)) == L
    close(jax.value_and_grad(twice)(params, x), jax.value_and_grad(once)(params, x), rtol=0, atol=0)
    rows = fst_jax.report(once, CFG)(params, x).rows
    assert rows and all("inner fst_jax.sparsify" in r.forward for r in rows)


def test_cache_does_not_retrace():
    params, x = make()
    calls = []

    def counted(params, x):
        calls.append(1)
        return loss(params, x)

    f = fst_jax.sparsify(counted, CFG)
    a = f(params, x)
    b = f(params, x)
    assert len(calls) == 1 and float(a) == float(b)
    f(params, x[:4])
    assert len(calls) == 2
    g = jax.jit(jax.grad(f))
    g(params, x)
    g(params, jnp.ones_like(x))
    assert len(calls) == 2  # tracers under jit(grad) have the same avals: the cached trace serves


def test_cache_with_chex_max_traces():
    params, x = make()
    f = fst_jax.sparsify(chex.assert_max_traces(loss, n=1), CFG)
    for _ in range(3):
        f(params, x)
        jax.grad(f)(params, x)


@pytest.mark.parametrize("fwd", [
    lambda f, p, x: jax.jvp(f, (p, x), (p, x)),
    lambda f, p, x: jax.jacfwd(f)(p, x),
    lambda f, p, x: jax.hessian(f)(p, x),
])
def test_forward_mode_error_names_fst_jax(fwd):
    params, x = make()
    with pytest.raises(TypeError, match="fst_jax.sparsify does not support forward-mode"):
        fwd(fst_jax.sparsify(loss, CFG), params, x)


def test_keyword_arguments_and_pytree_outputs():
    params, x = make()

    def f(params, *, x, scale):
        return {"loss": loss(params, x) * scale, "n": jnp.asarray(x.shape[0])}

    sf = fst_jax.sparsify(f, CFG, static_argnames="scale")
    out = sf(params, x=x, scale=2.0)
    assert set(out) == {"loss", "n"}
    close(out["loss"], 2.0 * fst_jax.sparsify(loss, CFG)(params, x))


def test_weight_through_casts_transposes_and_slices():
    params, x = make()

    def f(p, x):
        w0 = p[0].astype(jnp.bfloat16).astype(jnp.float32)
        w1 = jnp.transpose(p[1]).T.reshape(D // 2, 2 * D).reshape(D, D)
        w2 = jnp.concatenate([p[2][:, :8], p[2][:, 8:]], axis=1)
        return loss([w0, w1, w2], x)

    rows = fst_jax.report(f, CFG)(params, x).rows
    assert [r.param_path for r in rows] == ["[0]", "[1]", "[2]"]
    assert all(r.forward == "sparse" for r in rows)


def test_closed_over_constant_is_neutral():
    params, x = make()
    const = np.full((D, D), 0.5, np.float32)
    rows = fst_jax.report(lambda p, x: jnp.sum(x @ (p[0] * const) @ const), CFG)(params, x).rows
    assert rows[0].weight == "rhs" and rows[0].forward == "sparse"
    assert rows[1].forward == "dense: constant operand"


@pytest.mark.parametrize("mode", ["masked", "compact"])
def test_explicit_sharding_mesh(mode):
    """Under an explicit-sharding mesh the sharding types of every value must line up."""
    stacked, x = jnp.stack(make()[0]), make()[1]
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    cfg = CFG.replace(mode=mode)

    def scan_loss(stacked, x):
        h, _ = lax.scan(lambda h, w: (layer(h, w), None), x, stacked)
        return jnp.mean(h**2)

    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        out = jax.jit(sparse_value_and_grad(scan_loss, cfg))(stacked, xs)
    close(out, sparse_value_and_grad(scan_loss, cfg)(stacked, x), rtol=1e-4)


def test_avals_and_weak_types_preserved():
    params, x = make()

    def f(w, x, s):
        inner = jax.jit(lambda h, s: (layer(h, w) * s, s + 1))
        h, s2 = inner(x, s)
        return jnp.sum(h), s2

    j0 = jax.make_jaxpr(f)(params[0], x, 2.0)
    j1 = jax.make_jaxpr(fst_jax.sparsify(f, CFG))(params[0], x, 2.0)
    assert "custom_vjp_call" in str(j1)
    assert [(a.shape, a.dtype, a.weak_type) for a in j1.out_avals] == \
        [(a.shape, a.dtype, a.weak_type) for a in j0.out_avals]
    assert j1.out_avals[1].weak_type
