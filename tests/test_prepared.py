"""One prepared weight per step (issue 11, 5g): each weight's masks are computed once per step —
outside the loops it is invariant in, shared by every matmul of it and by SR-STE — and never again
in the backward pass. Checked on the equations of ``jax.make_jaxpr(jax.grad(...))``: every forward
or grad-input mask is one call of the jitted ``_mask_2to4``, counted at its nesting depth."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import fst_jax

CFG = fst_jax.FSTConfig(skip_first=False, skip_last=False)  # SR-STE on (the default λ)


def mask_calls(fn, *args):
    """{nesting depth: number of ``_mask_2to4`` calls} in the jaxpr of ``jax.grad(fn)``; depth 1 is
    the body of sparsify's jit, deeper ones are inside loop or call bodies."""
    out: dict[int, int] = {}

    def walk(jaxpr, depth):
        for e in jaxpr.eqns:
            if e.params.get("name") == "_mask_2to4" and e.invars:  # (not a constant it lifted)
                out[depth] = out.get(depth, 0) + 1
                continue
            for v in e.params.values():
                for s in v if isinstance(v, tuple) else (v,):
                    inner = getattr(s, "jaxpr", s)
                    if hasattr(inner, "eqns"):
                        walk(inner, depth + 1)

    walk(jax.make_jaxpr(jax.grad(fn))(*args).jaxpr, 0)
    return out


def params_and_xs():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    p = {"wx": jax.random.normal(k1, (8, 16)), "wh": jax.random.normal(k2, (16, 16)) / 4}
    return p, jax.random.normal(k3, (5, 4, 8))


def rnn_scan(p, xs):
    def cell(h, x):
        h = jnp.tanh(x @ p["wx"] + h @ p["wh"])
        return h, h

    h, _ = lax.scan(cell, jnp.zeros((4, 16)), xs)
    return jnp.sum(h**2) + jnp.sum(xs[0] @ p["wx"])  # wx used inside and outside the loop


def rnn_unrolled(p, xs):
    h = jnp.zeros((4, 16))
    for t in range(xs.shape[0]):
        h = jnp.tanh(xs[t] @ p["wx"] + h @ p["wh"])
    return jnp.sum(h**2) + jnp.sum(xs[0] @ p["wx"])


def test_loop_invariant_weights_are_prepared_once_outside_the_scan():
    p, xs = params_and_xs()
    # two weights x (forward mask + grad-input mask), at the top level only: none in the forward
    # or backward scan body, and wx's two uses (in the loop and after it) share one preparation
    assert mask_calls(fst_jax.sparsify(rnn_scan, CFG), p, xs) == {1: 4}
    assert mask_calls(fst_jax.sparsify(rnn_unrolled, CFG), p, xs) == {1: 4}  # 6 uses of wx, 5 of wh


def test_hoisting_keeps_the_values():
    p, xs = params_and_xs()
    g_scan = jax.grad(fst_jax.sparsify(rnn_scan, CFG))(p, xs)
    g_unrolled = jax.grad(fst_jax.sparsify(rnn_unrolled, CFG))(p, xs)
    for k in p:
        np.testing.assert_allclose(g_scan[k], g_unrolled[k], rtol=2e-5, atol=2e-6)
    # SR-STE counted once per entry of each weight, however many uses: the dropped entries' gradient
    # differs from the no-SR-STE one by exactly λ·W
    g0 = jax.grad(fst_jax.sparsify(rnn_scan, CFG.replace(sr_ste=0.0)))(p, xs)
    kept = np.asarray(fst_jax.forward_masks(rnn_scan, CFG)(p, xs).tree["wh"])
    diff = np.asarray(g_scan["wh"] - g0["wh"])
    # (float32 cancellation in the difference of two gradients: ~4e-8; counted twice would be ~1e-5)
    np.testing.assert_allclose(diff[~kept], CFG.sr_ste * np.asarray(p["wh"])[~kept], rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(diff[kept], 0.0, atol=1e-7)


def test_fori_loop_and_jit_bodies_are_hoisted_too():
    p, xs = params_and_xs()

    def fori(p, xs):
        body = jax.jit(lambda t, h: jnp.tanh(xs[t] @ p["wx"] + h @ p["wh"]))
        return jnp.sum(lax.fori_loop(0, xs.shape[0], body, jnp.zeros((4, 16))) ** 2)

    # (reverse-mode of a while loop needs a fixed trip count: fori_loop with static bounds is a scan)
    assert mask_calls(fst_jax.sparsify(fori, CFG), p, xs) == {1: 4}

    def cond(p, xs):
        return jnp.sum(lax.cond(xs[0, 0, 0] > 0, lambda x: x @ p["wx"], lambda x: -(x @ p["wx"]), xs[0]) ** 2)

    # a cond's operand is not a view of the parameters (the analysis does not look through it): each
    # branch prepares its weight itself, and only the branch taken runs
    assert mask_calls(fst_jax.sparsify(cond, CFG), p, xs) == {2: 4}


def test_stacked_layers_are_prepared_once_per_layer_in_the_forward_scan_only():
    k1, k2 = jax.random.split(jax.random.key(1))
    stacked = jax.random.normal(k1, (3, 16, 16)) / 4
    x = jax.random.normal(k2, (4, 16))

    def layers(w, x):
        h, _ = lax.scan(lambda h, w_l: (jnp.tanh(h @ w_l), None), x, w)
        return jnp.sum(h**2)

    # each layer's slice is a different weight: prepared inside the forward scan body (2 masks per
    # iteration, the body nested one level deeper); the backward scan recomputes none. SR-STE in
    # parameter space reads its forward masks once more, at the top level (vmapped over the layers).
    assert mask_calls(fst_jax.sparsify(layers, CFG), stacked, x) == {1: 1, 2: 2}
    assert mask_calls(fst_jax.sparsify(layers, CFG.replace(sr_ste=0.0)), stacked, x) == {2: 2}
