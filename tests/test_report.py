"""What stays dense stays dense, and the report says why, for every reason of DESIGN.md §1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fst_jax
from references import count_sparse_matmuls

ALL = fst_jax.FSTConfig(skip_first=False, skip_last=False)
S = jax.ShapeDtypeStruct


def rows(fn, *args, cfg=ALL, **kw):
    return fst_jax.report(fn, cfg, **kw)(*args).rows


def f32(*shape):
    return S(shape, jnp.float32)


def n_custom(fn, *args, cfg=ALL):
    concrete = [jnp.zeros(a.shape, a.dtype) if isinstance(a, S) else a for a in args]
    return count_sparse_matmuls(jax.make_jaxpr(fst_jax.sparsify(fn, cfg))(*concrete))


def test_two_activations_attention_scores():
    def f(w, x):
        q = x @ w
        return jnp.sum(jnp.einsum("btd,bsd->bts", q, x))

    r = rows(f, f32(8, 8), f32(2, 8, 8))
    assert r[0].forward == "sparse"
    assert r[1].weight is None and r[1].forward == "dense: two activations (no weight operand)"
    assert n_custom(f, f32(8, 8), f32(2, 8, 8)) == 1


def test_two_weights_and_constant_operand():
    def f(p, x):
        w = p["a"] @ p["b"]  # weight x weight
        c = jnp.ones((8, 8)) @ jnp.ones((8, 8))  # built from constants only: not a weight
        return jnp.sum((x @ w) @ c)

    r = rows(f, {"a": f32(8, 8), "b": f32(8, 8)}, f32(2, 8, 8))
    reasons = [x.forward for x in r]
    assert reasons == ["dense: two weights", "dense: constant operand", "sparse", "dense: constant operand"]
    assert r[2].param_path == "['a'] + ['b']"


def test_integer_matmul():
    f = lambda w, x: jnp.sum(x @ w)  # noqa: E731
    r = rows(f, S((8, 8), jnp.int32), S((2, 8, 8), jnp.int32))
    assert r[0].forward == "dense: integer or complex matmul"
    assert n_custom(f, S((8, 8), jnp.int32), S((2, 8, 8), jnp.int32)) == 0


@pytest.mark.parametrize("shape_w,shape_x,gemm,reason", [
    ((6, 8), (2, 8, 6), "all", "K=6 not divisible by 4"),
    ((8, 6), (2, 8, 8), "grad_input", "O_last=6 not divisible by 4"),
    ((8, 8), (2, 1, 8), "grad_weight", "1 token: fewer than 2"),
    ((8, 8), (8,), "grad_weight", "no token axis"),
    ((8,), (2, 8, 8), "grad_input", "the weight has no free (output) dimension"),
])
def test_divisibility_and_missing_axes(shape_w, shape_x, gemm, reason):
    r = rows(lambda w, x: jnp.sum(x @ w), f32(*shape_w), f32(*shape_x))[0]
    dense = ("forward", "grad_input", "grad_weight") if gemm == "all" else (gemm,)
    for g in ("forward", "grad_input", "grad_weight"):
        value = getattr(r, g)
        if g in dense:
            assert value == f"dense: {reason}", (g, value)
        else:
            assert value.startswith("sparse"), (g, value)


def test_custom_vjp_region_is_opaque():
    @jax.custom_vjp
    def my_dot(x, w):
        return x @ w

    my_dot.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].reshape(-1, 8).T @ g.reshape(-1, 8)))

    def f(w, x):
        return jnp.sum(my_dot(x, w) @ w)

    r = rows(f, f32(8, 8), f32(2, 8, 8))
    assert r[0].forward == "dense: inside a user custom_vjp/custom_jvp region (opaque)"
    assert r[1].forward == "sparse"
    w, x = jnp.eye(8), jnp.ones((2, 8, 8))
    np.testing.assert_array_equal(fst_jax.sparsify(f, ALL)(w, x), f(w, x))  # eye: 2:4 keeps diagonal


def test_custom_jvp_region_is_opaque():
    @jax.custom_jvp
    def act(h):
        return jnp.tanh(h @ jnp.ones((8, 8)))

    act.defjvp(lambda p, t: (act(p[0]), t[0]))
    r = rows(lambda w, x: jnp.sum(act(x @ w)), f32(8, 8), f32(2, 8, 8))
    assert [x.forward for x in r][0] == "sparse"
    assert "custom_vjp/custom_jvp" in r[1].forward


def mlp(params, x):
    for w in params:
        x = jnp.tanh(x @ w)
    return jnp.sum(x)


P3 = [f32(8, 8)] * 3
X = f32(2, 8, 8)


def test_first_and_last_by_default():
    r = rows(mlp, P3, X, cfg=fst_jax.FSTConfig())
    assert [x.forward for x in r] == ["dense: first weight matmul (skip_first)", "sparse",
                                      "dense: last weight matmul (skip_last)"]
    assert n_custom(mlp, P3, X, cfg=fst_jax.FSTConfig()) == 1  # dense in all three products: left as it is


def test_first_last_in_scan_is_one_equation():
    def f(stacked, x):
        h, _ = lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, stacked)
        return jnp.sum(h)

    r = rows(f, f32(4, 8, 8), X, cfg=fst_jax.FSTConfig())
    assert len(r) == 1 and r[0].trips == 4
    assert r[0].forward == "dense: first weight matmul (skip_first)"


def test_rules_override_skip_and_send_to_dense():
    cfg = fst_jax.FSTConfig(rules=(fst_jax.Rule(pattern=r"\[0\]", action="sparse"),
                                   fst_jax.Rule(pattern=r"\[1\]", action="dense")))
    r = rows(mlp, P3, X, cfg=cfg)
    assert r[0].forward == "sparse"
    assert r[1].forward == "dense: rule '\\\\[1\\\\]' sends it to dense"
    assert r[2].forward == "dense: last weight matmul (skip_last)"


def test_rule_on_name_stack():
    def f(params, x):
        with jax.named_scope("encoder"):
            x = jnp.tanh(x @ params[0])
        with jax.named_scope("head"):
            return jnp.sum(x @ params[1])

    cfg = ALL.replace(rules=(fst_jax.Rule(pattern="^head", action="dense", on="name_stack"),))
    r = rows(f, P3[:2], X, cfg=cfg)
    assert r[0].name_stack == "encoder" and r[0].forward == "sparse"
    assert r[1].forward.startswith("dense: rule")


def test_min_features_small_layer():
    r = rows(mlp, [f32(8, 64), f32(64, 64), f32(64, 8)], X, cfg=ALL.replace(min_features=32))
    assert [x.forward for x in r] == ["dense: small layer (K=8, O_last=64 < min_features=32)", "sparse",
                                      "dense: small layer (K=64, O_last=8 < min_features=32)"]


def test_config_dense_choices_are_reported():
    cfg = ALL.replace(forward=False, sr_ste=0.0, grad_input="dense", grad_weight="dense")
    r = rows(mlp, P3, X, cfg=cfg)[1]
    assert (r.forward, r.grad_input, r.grad_weight) == (
        "dense: forward=False", "dense: grad_input='dense'", "dense: grad_weight='dense'")
    assert r.flops_fst == r.flops_dense


def test_report_table_and_flops():
    rep = fst_jax.report(mlp)(P3, X)
    text = str(rep)
    for needle in ("forward", "grad_input", "grad_weight", "skip_first", "[1]", "2:4-sparse"):
        assert needle in text
    per_gemm = 2 * 2 * 8 * 8 * 8
    # the first layer's grad-input product is not computed: its activation is the data
    assert rep.flops_dense == (3 * 3 - 1) * per_gemm
    assert rep.flops_fst == rep.flops_dense - 3 * per_gemm // 2  # the middle layer: 3 products at half
    # XLA runs the forward and grad-input products on masked operands: only the compact
    # grad-weight product executes half its FLOPs
    assert rep.flops_executed == rep.flops_dense - per_gemm // 2
    assert all(r.source != "unknown" for r in rep.rows)


def test_report_flops_count_scan_trips():
    def f(stacked, x):
        h, _ = lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, stacked)
        return jnp.sum(h)

    r = rows(f, f32(5, 8, 8), X)[0]
    assert r.flops_dense == 3 * 5 * 2 * 2 * 8 * 8 * 8
