"""Rotating activation patterns through ``fst_jax.sparsify`` (issue 14, items 1-4).

The grad-weight mask of a sparse matmul is read off the gradient: with ``A = 1``, ``s = 0`` and
an output cotangent that is one-hot in the flat token index ``p`` along the output dim,
``dW[k, o] = M[p = o, k]``. Masks are checked against the reference of tests/test_patterns.py
(DESIGN.md §1's formulas), the draw against ``draw_pattern(fst_key, matmul index, len(set))``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fst_jax
from fst_jax._masks import AUTHORS_PATTERNS, _as_key, draw_pattern
from test_patterns import ref_grad_weight, ref_mask

B, T, K = 2, 8, 8
N = B * T  # flat tokens: the one-hot cotangent needs O = N (a multiple of 4)
ROT = fst_jax.FSTConfig(pattern="rotating", skip_first=False, skip_last=False, restore_scale=0.0, sr_ste=0.0,
                        mode="masked")


def probe(x, w):
    """sum((x @ w) ⊙ G) with G[b, t, o] = [o == b·T + t]: its weight gradient is (M ⊙ x)ᵀ laid out [K, N]."""
    g = jnp.eye(N, dtype=x.dtype).reshape(B, T, N)
    return jnp.sum((x @ w) * g)


def probe_loss(w, x):
    return probe(x, w)


def mask_of(dw):
    """The activation mask [B, T, K] read off a probe's weight gradient (A = 1)."""
    return np.asarray(dw).T.reshape(B, T, K) != 0


def ones():
    return jnp.ones((K, N)), jnp.ones((B, T, K))


def want_choice(key, index, n, iterations=()):
    """The documented draw: randint(layer key, n), the layer key fold_in(fst_key, index) with the
    iteration of every scan around the matmul folded in (outermost first)."""
    if not iterations:
        return int(draw_pattern(key, index, n))
    k = jax.random.fold_in(_as_key(key), index)
    for it in iterations:
        k = jax.random.fold_in(k, it)
    return int(jax.random.randint(k, (), 0, n, dtype=jnp.int32))


def want_mask(key, index=0, patterns=AUTHORS_PATTERNS, iterations=()):
    c = want_choice(key, index, len(patterns), iterations)
    return ref_mask((B, T, K), 1, (2,), (), patterns[c])


@pytest.mark.parametrize("mode", ["masked", "compact"])
@pytest.mark.parametrize("patterns", ["rotating", ("even", "odd"), ("alternating", "anti_alternating", "even")])
def test_each_draw_is_the_reference_mask_and_2_of_4_along_p(mode, patterns):
    cfg = ROT.replace(mode=mode, pattern=patterns)
    names = AUTHORS_PATTERNS if patterns == "rotating" else patterns
    grad = jax.jit(lambda w, x, s: jax.grad(fst_jax.sparsify(probe_loss, cfg))(w, x, fst_key=s))
    w, x = ones()
    seen = set()
    for step in range(12):
        m = mask_of(grad(w, x, jnp.int32(step)))
        np.testing.assert_array_equal(m, want_mask(step, 0, names))
        assert (m.reshape(N // 4, 4, K).sum(1) == 2).all()  # exactly 2 of every 4 along p, every k
        seen.add(int(draw_pattern(step, 0, len(names))))
    assert len(seen) > 1


def mlp(params, x):
    h = jnp.tanh(x @ params["w1"])
    h = jnp.tanh(h @ params["w2"])
    return jnp.mean((h @ params["w3"]) ** 2)


def mlp_params(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {"w1": jax.random.normal(k1, (K, 16)), "w2": jax.random.normal(k2, (16, 16)) / 4,
            "w3": jax.random.normal(k3, (16, 8))}


def attention(params, x):
    q, k, v = (x @ params[n] for n in ("q", "k", "v"))
    s = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / 4.0, axis=-1)
    h = jnp.einsum("bts,bsd->btd", s, v) @ params["o"]
    return jnp.mean((x + jnp.tanh(h @ params["up"]) @ params["down"]) ** 2)


def attention_params(seed=0):
    names = {"q": (16, 16), "k": (16, 16), "v": (16, 16), "o": (16, 16), "up": (16, 32), "down": (32, 16)}
    keys = jax.random.split(jax.random.key(seed), len(names))
    return {n: jax.random.normal(kk, s) / 4 for kk, (n, s) in zip(keys, names.items())}


MODELS = {"mlp": (mlp, mlp_params, (4, 6, K)), "mlp_odd_T": (mlp, mlp_params, (3, 5, K)),
          "attention": (attention, attention_params, (2, 8, 16))}


@pytest.mark.parametrize("model", list(MODELS))
def test_compact_equals_masked_for_every_draw(model):
    fn, init, x_shape = MODELS[model]
    params, x = init(), jax.random.normal(jax.random.key(9), x_shape)
    grads = {}
    for mode in ("masked", "compact"):
        cfg = fst_jax.FSTConfig(pattern="rotating", mode=mode, restore_scale=0.5)
        grads[mode] = jax.jit(lambda p, x, s, cfg=cfg: jax.grad(fst_jax.sparsify(fn, cfg))(p, x, fst_key=s))
    rep = fst_jax.report(fn, fst_jax.FSTConfig(pattern="rotating"))(params, x, fst_key=0)
    assert any("rotating(4), compact" in r.grad_weight for r in rep.rows)
    for step in range(8):  # 8 steps x several layers: every pattern is drawn somewhere
        a, b = (grads[m](params, x, jnp.int32(step)) for m in ("masked", "compact"))
        for leaf_a, leaf_b in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(leaf_a, leaf_b, rtol=2e-5, atol=2e-6)


def test_same_key_same_gradient_different_steps_differ():
    params, x = mlp_params(), jax.random.normal(jax.random.key(1), (4, 8, K))
    f = fst_jax.sparsify(mlp, fst_jax.FSTConfig(pattern="rotating"))
    grad = jax.jit(lambda p, x, key: jax.grad(f)(p, x, fst_key=key))
    key = jax.random.key(3)
    g1, g2 = grad(params, x, key), grad(params, x, key)
    np.testing.assert_array_equal(g1["w2"], g2["w2"])
    np.testing.assert_array_equal(grad(params, x, 5)["w2"], grad(params, x, jnp.int32(5))["w2"])
    by_step = [np.asarray(grad(params, x, jnp.int32(s))["w2"]) for s in range(6)]
    assert any(not np.array_equal(by_step[0], g) for g in by_step[1:])
    # a raw uint32[2] key is the same key
    np.testing.assert_array_equal(grad(params, x, jax.random.key_data(key))["w2"], g1["w2"])


def two_layers(params, x):
    return probe(x, params["a"]) + probe(x, params["b"])


def test_layers_draw_independently():
    cfg = ROT
    w, x = ones()
    params = {"a": w, "b": w}
    rep = fst_jax.report(two_layers, cfg)(params, x)
    idx = {r.param_path: r.index for r in rep.rows}
    grad = jax.jit(lambda p, x, s: jax.grad(fst_jax.sparsify(two_layers, cfg))(p, x, fst_key=s))
    pairs = []
    for step in range(16):
        g = grad(params, x, jnp.int32(step))
        for name in ("a", "b"):
            np.testing.assert_array_equal(mask_of(g[name]), want_mask(step, idx[f"['{name}']"]))
        pairs.append((int(draw_pattern(step, idx["['a']"], 4)), int(draw_pattern(step, idx["['b']"], 4))))
    assert any(a != b for a, b in pairs) and any(a == b for a, b in pairs)


def test_one_compile_serves_every_step():
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    params, x = mlp_params(), jax.random.normal(jax.random.key(1), (4, 8, K))
    f = fst_jax.sparsify(mlp, fst_jax.FSTConfig(pattern="rotating"))
    step_fn = jax.jit(lambda p, x, s: jax.grad(f)(p, x, fst_key=s))
    step_fn(params, x, jnp.int32(0)).popitem()[1].block_until_ready()
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for step in range(1, 6):
            jax.block_until_ready(step_fn(params, x, jnp.int32(step)))
        assert compiles == []
        # eager calls with a Python step counter: the key is traced, one compile for all steps
        jax.block_until_ready(f(params, x, fst_key=0))
        n = len(compiles)
        for step in range(1, 4):
            jax.block_until_ready(f(params, x, fst_key=step))
        assert len(compiles) == n
    finally:
        jax.monitoring.clear_event_listeners()


def test_missing_fst_key_is_a_clear_error_and_fixed_patterns_ignore_it():
    params, x = mlp_params(), jnp.ones((4, 8, K))
    f = fst_jax.sparsify(mlp, fst_jax.FSTConfig(pattern="rotating"))
    with pytest.raises(TypeError, match=r"fst_key.*fst_key=step"):
        jax.grad(f)(params, x)
    with pytest.raises(TypeError, match="fst_key"):
        f(params, x, fst_key=1.5)
    fixed = fst_jax.sparsify(mlp)
    np.testing.assert_array_equal(fixed(params, x), fixed(params, x, fst_key=3))
    np.testing.assert_array_equal(jax.grad(fixed)(params, x)["w2"], jax.grad(fixed)(params, x, fst_key=3)["w2"])
    # a rotating config whose rotating layers are all dense needs no key
    assert fst_jax.sparsify(lambda w, x: x @ w, fst_jax.FSTConfig(pattern="rotating"))(
        jnp.ones((8, 4)), jnp.ones((2, 8))).shape == (2, 4)


def test_forward_masks_report_and_forward_unaffected():
    params, x = mlp_params(), jax.random.normal(jax.random.key(1), (4, 8, K))
    rot, fixed = fst_jax.FSTConfig(pattern="rotating"), fst_jax.FSTConfig()
    m_rot = fst_jax.forward_masks(mlp, rot)(params, x, fst_key=3)
    m_fix = fst_jax.forward_masks(mlp, fixed)(params, x)
    for a, b in zip(jax.tree.leaves(m_rot.tree), jax.tree.leaves(m_fix.tree)):
        np.testing.assert_array_equal(a, b)
    pr = fst_jax.pruned_params(mlp, rot)(params, x, fst_key=3)
    np.testing.assert_allclose(fst_jax.sparsify(mlp, rot)(params, x, fst_key=7), mlp(pr, x), rtol=1e-6)
    np.testing.assert_array_equal(fst_jax.sparsify(mlp, rot)(params, x, fst_key=7),
                                  fst_jax.sparsify(mlp, fixed)(params, x))
    rep = fst_jax.report(mlp, rot)(params, x, fst_key=3)
    assert "fixed_mask, rotating(4), compact" in rep.table(full=True)
    assert "sparse rotating(4)" in str(rep)
    rep = fst_jax.report(mlp, rot.replace(pattern=("even", "odd"), mode="masked"))(params, x)
    assert "fixed_mask, rotating(2), masked" in rep.table(full=True)


def test_per_layer_rule_override():
    cfg = fst_jax.FSTConfig(skip_first=False, skip_last=False, restore_scale=0.0, sr_ste=0.0, rules=(
        fst_jax.Rule(pattern="b", overrides={"pattern": ["odd", "even"]}),))
    assert cfg.rules[0].overrides == (("pattern", ("odd", "even")),)
    w, x = ones()
    params = {"a": w, "b": w}
    rep = fst_jax.report(two_layers, cfg)(params, x)
    variants = {r.param_path: r.grad_weight for r in rep.rows}
    assert "rotating(2)" in variants["['b']"] and "checkerboard" in variants["['a']"]
    f = fst_jax.sparsify(two_layers, cfg)
    with pytest.raises(TypeError, match="fst_key"):
        jax.grad(f)(params, x)
    idx = {r.param_path: r.index for r in rep.rows}
    for step in range(4):
        g = jax.grad(f)(params, x, fst_key=step)
        np.testing.assert_array_equal(mask_of(g["b"]), want_mask(step, idx["['b']"], ("odd", "even")))
        np.testing.assert_array_equal(mask_of(g["a"]), ref_mask((B, T, K), 1, (2,), (), "checkerboard"))


def test_config_validation():
    assert fst_jax.FSTConfig(pattern="rotating").pattern == "rotating"
    assert fst_jax.FSTConfig(pattern=("alternating", "even")).pattern == ("alternating", "even")
    for bad, match in ((("even", "even"), "repeats"), (("diagonal",), "'diagonal' is not one"), ((), "non-empty"),
                       ("random", "rotating"), (3, "tuple of pattern names")):
        with pytest.raises(ValueError, match=match):
            fst_jax.FSTConfig(pattern=bad)
    with pytest.raises(ValueError, match="rotating"):
        fst_jax.Rule(pattern="x", overrides={"pattern": "spin"})
    hash(fst_jax.FSTConfig(pattern=["even", "odd"]))


# ---------------------------------------------------------------------------------------------
# Inside sub-jaxprs: the rewritten body closes over the drawn choice (closure conversion).


def in_scan(w, x):
    def body(c, xs):
        return c + probe(xs, w), None
    return lax.scan(body, 0.0, x[None])[0]


def in_scan_of_layers(ws, x):  # a scanned stack of 1 layer: the weight is a slice
    return lax.scan(lambda c, w: (c + probe(x, w), None), 0.0, ws[None])[0]


def in_jit(w, x):
    return jax.jit(probe)(x, w)


def in_remat(w, x):
    return jax.checkpoint(probe, policy=jax.checkpoint_policies.nothing_saveable)(x, w)


def in_cond(w, x):
    return lax.cond(jnp.sum(x) > 0, lambda x, w: probe(x, w), lambda x, w: jnp.zeros(()), x, w)


def in_switch(w, x):
    return lax.switch(1, [lambda x, w: jnp.zeros(()), lambda x, w: probe(x, w)], x, w)


def in_scan_of_jit(w, x):
    return lax.scan(lambda c, _: (c + jax.jit(probe)(x, w), None), 0.0, None, length=1)[0]


def in_fori(w, x):  # fori_loop with a static trip count is a scan
    return lax.fori_loop(0, 1, lambda i, c: c + probe(x, w), 0.0)


WRAPPED = {"scan": in_scan, "scan_of_layers": in_scan_of_layers, "jit": in_jit, "remat": in_remat,
           "cond": in_cond, "switch": in_switch, "scan_of_jit": in_scan_of_jit, "fori": in_fori}
IN_SCAN = {"scan", "scan_of_layers", "scan_of_jit", "fori"}  # one scan iteration (0) folded into the key


@pytest.mark.parametrize("mode", ["masked", "compact"])
@pytest.mark.parametrize("where", list(WRAPPED))
def test_rotating_inside_sub_jaxprs(where, mode):
    fn = WRAPPED[where]
    cfg = ROT.replace(mode=mode)
    w, x = ones()
    rep = fst_jax.report(fn, cfg)(w, x)
    (row,) = [r for r in rep.rows if r.weight is not None]
    grad = jax.jit(lambda w, x, s: jax.grad(fst_jax.sparsify(fn, cfg))(w, x, fst_key=s))
    iterations = (0,) if where in IN_SCAN else ()
    for step in range(4):
        np.testing.assert_array_equal(mask_of(grad(w, x, jnp.int32(step))), want_mask(step, row.index,
                                                                                     iterations=iterations))
    # values equal to a masked reference on random operands, with the shift
    cfg = cfg.replace(restore_scale=0.25)
    xr = jax.random.normal(jax.random.key(2), (B, T, K))
    wr = jax.random.normal(jax.random.key(3), (K, N))
    got = jax.grad(fst_jax.sparsify(fn, cfg))(wr, xr, fst_key=5)
    keep = want_mask(5, row.index, iterations=iterations)
    dy = np.eye(N).reshape(B, T, N)
    want = ref_grad_weight(xr, (K, N), dy, (((2,), (0,)), ((), ())), 1, keep, 0.25)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["masked", "compact"])
def test_each_scan_iteration_draws_anew(mode):
    """A scan over 2 stacked layers: layer i's mask is the draw with iteration i folded in, so the
    layers of a scanned stack draw independently (and the draw still changes with the step)."""
    cfg = ROT.replace(mode=mode)
    ws = jnp.ones((2, K, N))
    x = jnp.ones((B, T, K))

    def layers(ws, x):
        return lax.scan(lambda c, w: (c + probe(x, w), None), 0.0, ws)[0]

    (row,) = [r for r in fst_jax.report(layers, cfg)(ws, x).rows if r.weight is not None]
    grad = jax.jit(lambda ws, x, s: jax.grad(fst_jax.sparsify(layers, cfg))(ws, x, fst_key=s))
    pairs = []
    for step in range(8):
        g = grad(ws, x, jnp.int32(step))
        for i in range(2):
            np.testing.assert_array_equal(mask_of(g[i]), want_mask(step, row.index, iterations=(i,)))
        pairs.append(tuple(want_choice(step, row.index, 4, (i,)) for i in range(2)))
    assert any(a != b for a, b in pairs) and len(set(pairs)) > 1


def in_while(w, x):
    def body(c):
        i, acc = c
        return i + 1, acc + jnp.sum(x @ w)
    return lax.while_loop(lambda c: c[0] < 2, body, (0, 0.0))[1]


def test_rotating_inside_while_forward():
    """Reverse-mode AD does not go through while_loop; the rewritten loop runs and computes the
    2:4 forward (the choice is closed over, closure-converted by lax.while_loop)."""
    cfg = ROT.replace(forward=True)
    w, x = jax.random.normal(jax.random.key(3), (K, N)), jax.random.normal(jax.random.key(2), (B, T, K))
    got = fst_jax.sparsify(in_while, cfg)(w, x, fst_key=3)
    pruned = fst_jax.pruned_params(in_while, cfg)(w, x)
    np.testing.assert_allclose(got, in_while(pruned, x), rtol=1e-5)
    assert "rotating(4)" in fst_jax.report(in_while, cfg)(w, x).table(full=True)


def conv_loss(w, x):  # a 1x1 NHWC convolution: the same product as x[N, H·W, C] @ w
    y = lax.conv_general_dilated(x, w[None, None], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jnp.tanh(y) ** 2)


def flat_loss(w, x):
    return jnp.sum(jnp.tanh(x.reshape(x.shape[0], -1, x.shape[-1]) @ w) ** 2)


@pytest.mark.parametrize("hw", [(2, 4), (3, 3)])
def test_convolution_falls_back_to_masked_rotating(hw):
    cfg = fst_jax.FSTConfig(pattern="rotating", skip_first=False, skip_last=False, sr_ste=0.0, restore_scale=0.5)
    w = jax.random.normal(jax.random.key(0), (8, 8))
    x = jax.random.normal(jax.random.key(1), (3, *hw, 8))
    rep = fst_jax.report(conv_loss, cfg)(w, x)
    assert "rotating(4), masked (convolution)" in rep.rows[0].grad_weight
    conv_grad = jax.jit(lambda w, x, s: jax.grad(fst_jax.sparsify(conv_loss, cfg))(w, x, fst_key=s))
    flat_cfg = cfg.replace(mode="masked")
    flat_grad = jax.jit(lambda w, x, s: jax.grad(fst_jax.sparsify(flat_loss, flat_cfg))(w, x, fst_key=s))
    for step in range(6):
        got, want = conv_grad(w, x, jnp.int32(step)), flat_grad(w, x, jnp.int32(step))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_token_axis_not_innermost_falls_back_to_masked():
    cfg = ROT.replace(mode="compact", token_axis=0)
    w, x = ones()
    xt = jnp.swapaxes(x, 0, 1)  # time-major [T, B, K]

    def time_major(w, x):
        g = jnp.eye(N).reshape(B, T, N).swapaxes(0, 1)
        return jnp.sum((x @ w) * g)

    rep = fst_jax.report(time_major, cfg)(w, xt)
    assert "masked (token_axis not the innermost free axis)" in rep.rows[0].grad_weight
    dw = jax.grad(fst_jax.sparsify(time_major, cfg))(w, xt, fst_key=2)
    # p = b·T + t: the mask is the batch-major one, read back in the same [B, T] layout
    np.testing.assert_array_equal(mask_of(dw), want_mask(2))


def test_rotating_inside_shard_map_is_per_local_block():
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    cfg = fst_jax.FSTConfig(pattern="rotating", skip_first=False, skip_last=False, sr_ste=0.0)
    plain = lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)  # noqa: E731

    def sharded(w, x):
        body = lambda w, x: lax.psum(plain(w, x), "d")  # noqa: E731
        return jax.shard_map(body, mesh=mesh, in_specs=(P(), P("d")), out_specs=P())(w, x)

    w, x = jax.random.normal(jax.random.key(0), (8, 8)), jax.random.normal(jax.random.key(1), (4, 8, 8))
    g = jax.jit(lambda w, x, s: jax.grad(fst_jax.sparsify(plain, cfg))(w, x, fst_key=s))
    g_sharded = jax.jit(lambda w, x, s: jax.grad(fst_jax.sparsify(sharded, cfg))(w, x, fst_key=s))
    for step in range(3):
        want = g(w, x[:2], step) + g(w, x[2:], step)
        got = g_sharded(w, x, step)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rotating_compact_under_an_explicit_sharding_mesh_runs_masked():
    """A sharded activation type cannot take _rotate's canonical reshapes: the product runs masked,
    with the same gradient, and the report says why."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))
    cfg = ROT.replace(mode="compact", restore_scale=0.5)
    loss = lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)  # noqa: E731
    w, x = jax.random.normal(jax.random.key(0), (K, K)), jax.random.normal(jax.random.key(1), (B, T, K))
    want = jax.grad(fst_jax.sparsify(loss, cfg))(w, x, fst_key=3)
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("d")))
        got = jax.jit(jax.grad(fst_jax.sparsify(loss, cfg)))(w, xs, fst_key=3)
        rows = fst_jax.report(loss, cfg)(w, xs).rows
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert "masked (explicit-sharding mesh" in rows[0].grad_weight
    assert fst_jax.report(loss, cfg)(w, x).rows[0].grad_weight.endswith("compact)")


@pytest.mark.parametrize("pattern", ["rotating", "even,odd"])
def test_main_job_trains_with_a_rotating_pattern(tmp_path, pattern):
    import json

    from fst_jax.train import config_from_overrides, main

    assert config_from_overrides([f"pattern={pattern}"]).pattern == (
        "rotating" if pattern == "rotating" else ("even", "odd"))
    argv = ["--steps", "12", "--model", "mlp", "--width", "64", "--lr", "3e-3", "--quiet",
            "--config", f"pattern={pattern}", "--out", str(tmp_path)]
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    loss = results["runs"]["fst"]["curves"]["loss"]
    assert len(loss) == 12 and loss[-1] < loss[0]


def _primitives(jaxpr):
    from fst_jax._analysis import subjaxprs
    from fst_jax._compat import open_jaxpr

    out = set()
    for eqn in open_jaxpr(jaxpr)[0].eqns:
        out.add(eqn.primitive.name)
        for _, _, sub in subjaxprs(eqn.params):
            out |= _primitives(sub)
    return out


def test_compact_has_no_branch_over_gemms_and_vmaps_over_steps():
    params, x = mlp_params(), jax.random.normal(jax.random.key(1), (4, 8, K))
    f = fst_jax.sparsify(mlp, fst_jax.FSTConfig(pattern="rotating"))
    grad = lambda p, x, s: jax.grad(f)(p, x, fst_key=s)  # noqa: E731
    prims = _primitives(jax.make_jaxpr(grad)(params, x, jnp.int32(0)))
    assert "custom_vjp_call" in prims or "custom_vjp_call_jaxpr" in prims
    assert "cond" not in prims and "while" not in prims
    steps = jnp.arange(3, dtype=jnp.int32)
    batched = jax.jit(jax.vmap(grad, in_axes=(None, None, 0)))(params, x, steps)
    for i in range(3):
        np.testing.assert_allclose(batched["w2"][i], jax.jit(grad)(params, x, steps[i])["w2"], rtol=1e-5, atol=1e-6)
