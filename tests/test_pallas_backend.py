"""sparsify with backend="pallas" (interpret mode on CPU) gives the values and gradients of "xla"."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fst_jax
from fst_jax._compat import TRITON_DEPRECATION_FILTER

pytestmark = pytest.mark.filterwarnings(TRITON_DEPRECATION_FILTER)

BASE = fst_jax.FSTConfig(skip_first=False, skip_last=False, restore_scale=0.5, sr_ste=1e-2)
LAYOUTS = {
    "x@w": (lambda w, a: a @ w, (32, 16), (2, 8, 32)),
    "x@w.T": (lambda w, a: a @ w.T, (16, 32), (2, 8, 32)),
    "w_lhs": (lambda w, a: lax.dot_general(w, a, (((1,), (2,)), ((), ()))), (16, 32), (2, 8, 32)),
    "2d": (lambda w, a: a @ w, (32, 16), (16, 32)),
}
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


def vjp_all(fn, cfg, w, a):
    y, pull = jax.vjp(fst_jax.sparsify(fn, cfg), w, a)
    return y, pull(jax.random.normal(jax.random.key(3), y.shape, y.dtype))


def check(fn, cfg, ws, as_, dtype=jnp.float32):
    kw, ka = jax.random.split(jax.random.key(0))
    w, a = jax.random.normal(kw, ws, dtype), jax.random.normal(ka, as_, dtype)
    got = vjp_all(fn, cfg.replace(backend="pallas"), w, a)
    want = vjp_all(fn, cfg.replace(backend="xla"), w, a)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                                         rtol=TOL[dtype], atol=TOL[dtype]), got, want)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda w, a: jnp.sum(fst_jax.sparsify(fn, cfg.replace(backend="pallas"))(w, a)),
                                        argnums=(0, 1)))(w, a))
    return jaxpr


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mode,pattern", [("compact", "checkerboard"), ("compact", "even"), ("masked", "checkerboard")])
def test_pallas_equals_xla(layout, mode, pattern):
    fn, ws, as_ = LAYOUTS[layout]
    jaxpr = check(fn, BASE.replace(mode=mode, pattern=pattern), ws, as_)
    assert "pallas_call" in jaxpr


@pytest.mark.parametrize("grad_input", ["transposable", "dense"])
def test_pallas_grad_input_variants(grad_input):
    fn, ws, as_ = LAYOUTS["x@w"]
    check(fn, BASE.replace(grad_input=grad_input), ws, as_)


def test_pallas_bf16():
    fn, ws, as_ = LAYOUTS["x@w"]
    check(fn, BASE, ws, as_, jnp.bfloat16)


def test_pallas_falls_back_to_xla_for_other_layouts():
    fn = lambda w, a: jnp.einsum("btij,ijo->bto", a, w)  # noqa: E731 - two contracting dims
    jaxpr = check(fn, BASE, (2, 16, 16), (2, 8, 2, 16))
    assert "pallas_call" not in jaxpr


def test_auto_is_xla_on_cpu():
    fn, ws, as_ = LAYOUTS["x@w"]
    w, a = jnp.ones(ws), jnp.ones(as_)
    assert "pallas_call" not in str(jax.make_jaxpr(fst_jax.sparsify(fn, BASE.replace(backend="auto")))(w, a))
