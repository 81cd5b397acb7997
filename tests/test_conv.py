"""Convolutions: each FST product against an independent im2col reference written here."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fst_jax
from references import count_sparse_matmuls, mask_2to4

S = jax.ShapeDtypeStruct
ALL = fst_jax.FSTConfig(skip_first=False, skip_last=False, sr_ste=0.0)
IDENTITY = ALL.replace(forward=False, grad_input="dense", grad_weight="dense")


# Layouts: (lhs spec, rhs spec, out spec, x shape, w shape), 2-D or 1-D.
LAYOUTS = {
    "NHWC": (("NHWC", "HWIO", "NHWC"), (2, 8, 10, 8), (3, 3, 8, 12)),
    "NCHW": (("NCHW", "OIHW", "NCHW"), (2, 8, 8, 8), (12, 8, 3, 3)),
    "NWC": (("NWC", "WIO", "NWC"), (2, 16, 8), (3, 8, 12)),
}
GEOMETRY = {  # strides, padding, rhs_dilation
    "same": ((1, 1), "SAME", (1, 1)),
    "stride2_same": ((2, 2), "SAME", (1, 1)),
    "valid": ((1, 1), "VALID", (1, 1)),
    "dilated": ((1, 1), "SAME", (2, 2)),
}


def conv_fn(layout, geometry):
    dn, _, _ = LAYOUTS[layout]
    strides, padding, dil = GEOMETRY[geometry]
    nsp = len(dn[0]) - 2
    return lambda w, x: lax.conv_general_dilated(x, w, strides[:nsp], padding, rhs_dilation=dil[:nsp],
                                                 dimension_numbers=dn)


def to_nhwc(x, spec):  # any lhs/out layout -> N, spatial..., C
    return np.transpose(np.asarray(x), [spec.index("N"), *[i for i, c in enumerate(spec) if c not in "NC"],
                                        spec.index("C")])


def to_hwio(w, spec):
    return np.transpose(np.asarray(w), [*[i for i, c in enumerate(spec) if c not in "IO"], spec.index("I"),
                                        spec.index("O")])


def from_hwio(w, spec):
    order = [*[i for i, c in enumerate(spec) if c not in "IO"], spec.index("I"), spec.index("O")]
    return np.transpose(w, np.argsort(order))


def im2col_index(x_sp, w_sp, strides, padding, dil):
    """For each output position (row-major) and tap: the input position, or -1 for padding."""
    if padding == "SAME":
        out_sp = [-(-n // s) for n, s in zip(x_sp, strides)]
        pads = [max((o - 1) * s + (k - 1) * d + 1 - n, 0) for o, s, k, d, n in zip(out_sp, strides, w_sp, dil, x_sp)]
        lo = [p // 2 for p in pads]
    else:
        out_sp = [(n - (k - 1) * d - 1) // s + 1 for n, k, d, s in zip(x_sp, w_sp, dil, strides)]
        lo = [0] * len(x_sp)
    idx = np.full((int(np.prod(out_sp)), int(np.prod(w_sp))), -1)
    for t, o in enumerate(itertools.product(*map(range, out_sp))):
        for j, k in enumerate(itertools.product(*map(range, w_sp))):
            pos = [oi * s + ki * d - li for oi, s, ki, d, li in zip(o, strides, k, dil, lo)]
            if all(0 <= p < n for p, n in zip(pos, x_sp)):
                idx[t, j] = np.ravel_multi_index(pos, x_sp)
    return idx, out_sp


class Reference:
    """The FST products of DESIGN.md §1 for a convolution, through explicit im2col GEMMs."""

    def __init__(self, layout, geometry, w, x):
        dn, _, _ = LAYOUTS[layout]
        self.dn = dn
        strides, padding, dil = GEOMETRY[geometry]
        nsp = len(dn[0]) - 2
        self.w = to_hwio(w, dn[1])  # [taps..., I, O]
        xs = to_nhwc(x, dn[0])  # [N, spatial..., C]
        self.x_sp, self.cin = xs.shape[1:-1], xs.shape[-1]
        self.idx, self.out_sp = im2col_index(self.x_sp, self.w.shape[:-2], strides[:nsp], padding, dil[:nsp])
        self.x = xs

    def cols(self, xs):  # [N, T, taps, C]
        flat = jnp.asarray(xs).reshape(xs.shape[0], -1, self.cin)
        padded = jnp.concatenate([flat, jnp.zeros_like(flat[:, :1])], axis=1)
        return padded[:, np.where(self.idx < 0, flat.shape[1], self.idx)]

    def forward(self, xs, w_hwio):  # -> [N, T, O]
        wm = jnp.asarray(w_hwio).reshape(-1, self.cin, w_hwio.shape[-1])
        return jnp.einsum("ntjc,jco->nto", self.cols(xs), wm)

    def to_out_layout(self, y):  # [N, T, O] -> out spec
        y = np.asarray(y).reshape(y.shape[0], *self.out_sp, -1)
        spec = self.dn[2]
        order = [spec.index("N"), *[i for i, c in enumerate(spec) if c not in "NC"], spec.index("C")]
        return np.transpose(y, np.argsort(order))

    def from_out_layout(self, dy):  # out spec -> [N, T, O]
        d = to_nhwc(dy, self.dn[2])
        return d.reshape(d.shape[0], -1, d.shape[-1])

    def w_forward(self, forward=True):
        return self.w * mask_2to4(self.w, -2) if forward else self.w

    def products(self, dy, grad_input="prune_output_dim", grad_weight="fixed_mask", pattern="checkerboard", s=0.0):
        w_f = self.w_forward()
        y = self.forward(self.x, w_f)
        w_b = w_f * mask_2to4(w_f, -1) if grad_input == "prune_output_dim" else w_f
        dy_t = jnp.asarray(self.from_out_layout(dy))
        _, pull = jax.vjp(lambda xs: self.forward(xs, w_b), jnp.asarray(self.x))
        dx = pull(dy_t)[0]
        cols = np.asarray(self.cols(self.x))  # [N, T, taps, C]
        T = cols.shape[1]
        d = np.asarray(dy_t, np.float32)
        if T < 2:  # the fixed pattern needs two output positions
            grad_weight = "dense"
        if grad_weight == "fixed_mask":
            d = d + np.float32(s) * np.roll(d, 1, axis=1)
            # p = n·T + t: the position in the flattened batch of output positions (DESIGN.md §1)
            p = (np.arange(cols.shape[0])[:, None] * T + np.arange(T)[None, :])[:, :, None]
            k = np.arange(self.cin)[None, None, :]
            keep = {"checkerboard": (p + k) % 2 == 0, "even": (p % 2 == 0) | (k < 0),
                    "odd": (p % 2 == 1) | (k < 0)}[pattern]
            cols = cols * keep[:, :, None, :]
        elif grad_weight == "prune_grad_output":
            d = d * mask_2to4(d, 1)
        dw = np.einsum("ntjc,nto->jco", cols, d).reshape(self.w.shape)
        dx_layout = np.asarray(dx).reshape(self.x.shape)
        spec = self.dn[0]
        order = [spec.index("N"), *[i for i, c in enumerate(spec) if c not in "NC"], spec.index("C")]
        return self.to_out_layout(y), from_hwio(dw, self.dn[1]), np.transpose(dx_layout, np.argsort(order))


def data(layout, seed=0):
    """Weights, input and the seed of the output gradient (numpy: no compile per shape)."""
    _, xs, ws = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal(ws), jnp.float32), jnp.asarray(rng.standard_normal(xs), jnp.float32),
            seed + 1)


def vjp_jit(f, w, x, dy):
    """(y, dw, dx) of f under one jit (eager op-by-op dispatch is slow for convolutions)."""
    def go(w, x, dy):
        y, pull = jax.vjp(f, w, x)
        return (y, *pull(dy))
    return jax.jit(go)(w, x, dy)


def run(fn, cfg, w, x, kd):
    f = fst_jax.sparsify(fn, cfg)
    dy = jnp.asarray(np.random.default_rng(kd).standard_normal(jax.eval_shape(f, w, x).shape), jnp.float32)
    return (*vjp_jit(f, w, x, dy), dy)


def close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("layout,geometry", [("NHWC", "same"), ("NCHW", "stride2_same"), ("NWC", "dilated"),
                                             ("NHWC", "valid")])
def test_identity_is_bit_exact(layout, geometry):
    fn = conv_fn(layout, geometry)
    w, x, kd = data(layout)
    got = run(fn, IDENTITY, w, x, kd)
    for a, b in zip(got[:3], vjp_jit(fn, w, x, got[3])):
        np.testing.assert_array_equal(a, b)
    assert count_sparse_matmuls(jax.make_jaxpr(fst_jax.sparsify(fn, IDENTITY))(w, x)) == 0  # left as it is


CASES = [(lay, geo, "fixed_mask", "checkerboard", 0.5) for lay in LAYOUTS for geo in GEOMETRY] + [
    ("NHWC", "same", "fixed_mask", "checkerboard", 0.0), ("NCHW", "stride2_same", "fixed_mask", "even", 0.5),
    ("NWC", "dilated", "fixed_mask", "odd", 0.0), ("NHWC", "valid", "prune_grad_output", "checkerboard", 0.0),
    ("NCHW", "same", "dense", "checkerboard", 0.0),
]


@pytest.mark.parametrize("layout,geometry,grad_weight,pattern,s", CASES)
def test_products_match_im2col_reference(layout, geometry, grad_weight, pattern, s):
    fn = conv_fn(layout, geometry)
    w, x, kd = data(layout)
    cfg = ALL.replace(grad_weight=grad_weight, pattern=pattern, restore_scale=s)
    modes = ("compact", "masked") if grad_weight == "fixed_mask" else ("compact",)  # only fixed_mask compacts
    for mode in modes:
        y, dw, dx, dy = run(fn, cfg.replace(mode=mode), w, x, kd)
        ref = Reference(layout, geometry, w, x).products(dy, grad_weight=grad_weight, pattern=pattern, s=s)
        for got, want in zip((y, dw, dx), ref):
            close(got, want)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_grad_input_dense_and_compact_mode(layout):
    fn = conv_fn(layout, "same")
    w, x, kd = data(layout)
    y, dw, dx, dy = run(fn, ALL.replace(grad_input="dense", mode="masked"), w, x, kd)
    ref = Reference(layout, "same", w, x).products(dy, grad_input="dense", s=ALL.restore_scale)
    for got, want in zip((y, dw, dx), ref):
        close(got, want)
    compact = run(fn, ALL.replace(grad_input="dense", mode="compact"), w, x, kd)
    for got, want in zip(compact, (y, dw, dx, dy)):
        close(got, want)


def test_sr_ste_term():
    fn = conv_fn("NHWC", "same")
    w, x, kd = data("NHWC")
    _, dw0, _, _ = run(fn, ALL, w, x, kd)
    _, dw1, _, _ = run(fn, ALL.replace(sr_ste=0.1), w, x, kd)
    close(dw1 - dw0, 0.1 * np.where(mask_2to4(w, 2), 0.0, w))


def conv_rows(fn, w_shape, x_shape, **kw):
    return fst_jax.report(fn, ALL)(S(w_shape, jnp.float32), S(x_shape, jnp.float32), **kw).rows[0]


@pytest.mark.parametrize("kwargs,x_shape,w_shape,reason", [
    (dict(feature_group_count=2), (2, 8, 8, 8), (3, 3, 4, 8), "grouped or depthwise convolution"),
    (dict(feature_group_count=8), (2, 8, 8, 8), (3, 3, 1, 8), "grouped or depthwise convolution"),
    (dict(batch_group_count=2), (2, 8, 8, 8), (3, 3, 8, 8), "grouped or depthwise convolution"),
    (dict(lhs_dilation=(2, 2)), (2, 8, 8, 8), (3, 3, 8, 8), "transposed (lhs-dilated) convolution"),
    ({}, (2, 8, 8, 6), (3, 3, 6, 8), "K=6 not divisible by 4"),
])
def test_convolutions_left_dense(kwargs, x_shape, w_shape, reason):
    def fn(w, x):
        return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        **kwargs)

    r = conv_rows(fn, w_shape, x_shape)
    assert (r.forward, r.grad_input, r.grad_weight) == (f"dense: {reason}",) * 3
    w, x = jnp.ones(w_shape), jnp.ones(x_shape)
    np.testing.assert_array_equal(fst_jax.sparsify(fn, ALL)(w, x), fn(w, x))


def test_partial_fallbacks():
    fn = lambda w, x: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))  # noqa: E731
    r = conv_rows(fn, (3, 3, 8, 6), (2, 8, 8, 8))
    assert r.forward == "sparse" and r.grad_input == "dense: O_last=6 not divisible by 4"
    r = conv_rows(fn, (3, 3, 8, 8), (2, 3, 3, 8))  # 9 output positions per image
    assert r.forward == "sparse" and r.grad_weight == "sparse (fixed_mask, checkerboard, masked (odd T))"
    assert r.grad_input.startswith("sparse")


def test_composes_with_jit_vmap_and_pmap():
    fn = conv_fn("NHWC", "same")
    w, x, _ = data("NHWC")
    loss = lambda w, x: jnp.mean(jnp.tanh(fn(w, x)) ** 2)  # noqa: E731
    vg = jax.value_and_grad(fst_jax.sparsify(loss, ALL.replace(restore_scale=0.5)))
    ref = vg(w, x)
    jax.tree.map(close, jax.jit(vg)(w, x), ref)
    per = jax.vmap(vg, in_axes=(None, 0))(w, x[:, None])
    jax.tree.map(close, (per[0].mean(), per[1].mean(0)), ref)
    pm = jax.pmap(vg, in_axes=(None, 0))(w, x[:, None])
    jax.tree.map(close, (pm[0].mean(), pm[1].mean(0)), ref)


# Compact mode: the grad-weight from the kept half of the output positions. Output spatial sizes
# with an odd last size make the kept positions a 2-D (or 3-D) checkerboard instead of stripes.
COMPACT_GEOMETRY = [  # (dimension numbers, x shape, w shape, strides, padding, rhs_dilation)
    (("NHWC", "HWIO", "NHWC"), (2, 4, 7, 8), (3, 3, 8, 12), (1, 1), "SAME", (1, 1)),  # odd width
    (("NCHW", "OIHW", "NCHW"), (2, 8, 8, 5), (8, 8, 3, 3), (1, 1), ((2, 0), (1, 1)), (1, 2)),  # 8x3 out
    (("NHWC", "HWIO", "NHWC"), (2, 4, 6, 8), (1, 1, 8, 12), (1, 1), "VALID", (1, 1)),  # 1x1
    (("NCHW", "OIHW", "NCHW"), (2, 8, 4, 5), (12, 8, 1, 1), (1, 1), "VALID", (1, 1)),  # 1x1, odd width
    (("NWC", "WIO", "NWC"), (3, 12, 8), (1, 8, 8), (1,), "VALID", (1,)),  # 1x1, 1-D
    (("NHWC", "HWIO", "NHWC"), (2, 8, 8, 8), (1, 1, 8, 8), (2, 2), "VALID", (1, 1)),  # 1x1 strided
    (("NDHWC", "DHWIO", "NDHWC"), (1, 4, 3, 3, 8), (1, 3, 3, 8, 8), (1, 1, 1), "SAME", (1, 1, 1)),  # 3-D, 4x3x3 out
]


def general_conv(dn, strides, padding, dil):
    return lambda w, x: lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dil, dimension_numbers=dn)


def rand(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("dn,xs,ws,strides,padding,dil", COMPACT_GEOMETRY)
@pytest.mark.parametrize("pattern", ["checkerboard", "odd"])
def test_compact_equals_masked(dn, xs, ws, strides, padding, dil, pattern):
    fn = general_conv(dn, strides, padding, dil)
    w, x = rand(ws, 0), rand(xs, 1)
    cfg = ALL.replace(pattern=pattern, restore_scale=0.5)
    compact = run(fn, cfg, w, x, 2)
    for got, want in zip(compact, run(fn, cfg.replace(mode="masked"), w, x, 2)):
        close(got, want)
    dense = run(fn, cfg.replace(grad_weight="dense"), w, x, 2)
    assert not np.allclose(compact[1], dense[1], rtol=1e-3, atol=1e-3)  # the grad-weight is sparse


def _all_eqns(jaxpr):
    """Every equation of a jaxpr and of its sub-jaxprs (a jit's body, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for j in v if isinstance(v, tuple) else (v,):
                inner = getattr(j, "jaxpr", j)
                if hasattr(inner, "eqns"):
                    yield from _all_eqns(inner)


def grad_weight_flops(fn, cfg, w, x):
    """FLOPs of the backward-filter convolutions (those whose output is the weight's shape, up to
    the halved input channels of the checkerboard) in the backward pass of ``fn``."""
    y, pull = jax.vjp(fst_jax.sparsify(fn, cfg), w, x)
    total = 0
    for eqn in _all_eqns(jax.make_jaxpr(pull)(jnp.ones_like(y)).jaxpr):
        out = eqn.outvars[0].aval.shape
        if eqn.primitive is lax.conv_general_dilated_p and len(out) == w.ndim and math.prod(out) in (
                w.size, w.size // 2):
            rhs = eqn.invars[1].aval.shape
            total += 2 * math.prod(out) * math.prod(rhs) // rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
    return total


@pytest.mark.parametrize("index", [0, 1, 5])
def test_compact_grad_weight_does_half_the_flops(index):
    dn, xs, ws, strides, padding, dil = COMPACT_GEOMETRY[index]
    fn, w, x = general_conv(dn, strides, padding, dil), rand(ws, 0), rand(xs, 1)
    dense = grad_weight_flops(fn, ALL.replace(grad_weight="dense"), w, x)
    y = jax.eval_shape(fn, w, x)
    assert dense == 2 * y.size // w.shape[dn[1].index("O")] * w.size  # 2·N·T·(taps·I·O)
    assert grad_weight_flops(fn, ALL.replace(pattern="even", mode="masked"), w, x) == dense
    for pattern in ("checkerboard", "even"):
        assert grad_weight_flops(fn, ALL.replace(pattern=pattern), w, x) == dense // 2


def test_compact_under_jit_and_vmap():
    fn = general_conv(*[COMPACT_GEOMETRY[3][i] for i in (0, 3, 4, 5)])  # pointwise: saved pieces
    w, x = rand(COMPACT_GEOMETRY[3][2], 0), rand(COMPACT_GEOMETRY[3][1], 1)
    loss = lambda w, x: jnp.mean(jnp.tanh(fn(w, x)) ** 2)  # noqa: E731
    cfg = ALL.replace(restore_scale=0.5)
    compact, masked = (jax.value_and_grad(fst_jax.sparsify(loss, c)) for c in (cfg, cfg.replace(mode="masked")))
    jax.tree.map(close, jax.jit(compact)(w, x), masked(w, x))
    per = jax.jit(jax.vmap(compact, in_axes=(None, 0)))(w, x[:, None])
    jax.tree.map(close, per, jax.vmap(masked, in_axes=(None, 0))(w, x[:, None]))


def test_compact_report():
    fn = conv_fn("NHWC", "same")
    r = conv_rows(fn, (3, 3, 8, 12), (2, 8, 10, 8))
    assert r.grad_weight == "sparse (fixed_mask, checkerboard, compact)"
