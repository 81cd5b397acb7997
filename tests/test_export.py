"""forward_masks / prune_params: a dense forward with the pruned parameters is the FST forward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fst_jax

NO_SKIP = fst_jax.FSTConfig(skip_first=False, skip_last=False)


def _normal(rng, *shape, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape), dtype)


def _init(model, x):
    """Flax parameters drawn with numpy (no jax.random compile per shape)."""
    rng = np.random.default_rng(x.size)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(s.shape[-1]), s.dtype), shapes)


def _assert_same_forward(fn, cfg, params, *args):
    """The masks export everything, and fn(pruned params) == sparsify(fn)(params) to float rounding
    (the two programs are different jaxprs, which XLA may fuse differently)."""
    masks = fst_jax.forward_masks(fn, cfg)(params, *args)
    assert not masks.not_exportable, masks.not_exportable
    dense = jax.jit(fn)(fst_jax.prune_params(params, masks), *args)
    fst = jax.jit(fst_jax.sparsify(fn, cfg))(params, *args)
    unpruned = jax.jit(fn)(params, *args)
    for d, s, u in zip(jax.tree.leaves(dense), jax.tree.leaves(fst), jax.tree.leaves(unpruned)):
        np.testing.assert_allclose(np.asarray(d), np.asarray(s), rtol=2e-6, atol=2e-6)
        assert not np.allclose(np.asarray(u), np.asarray(s), rtol=1e-4, atol=1e-4)  # the masks changed the forward
    return masks


def _assert_half(masks, *paths):
    counts = masks.sparsity()
    assert sorted(counts) == sorted(paths)
    for p in paths:
        kept, total = counts[p]
        assert kept * 2 == total, (p, kept, total)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for f in (32, 32, 32):
            x = nn.relu(nn.Dense(f)(x))
        return nn.Dense(8)(x)


def test_flax_mlp_default_config_skips_first_and_last():
    rng = np.random.default_rng(0)
    x = _normal(rng, 2, 8, 16)
    model = MLP()
    params = _init(model, x)
    masks = _assert_same_forward(model.apply, fst_jax.FSTConfig(), params, x)
    _assert_half(masks, "['params']['Dense_1']['kernel']", "['params']['Dense_2']['kernel']")
    tree = masks.tree["params"]
    assert tree["Dense_0"]["kernel"] is None and tree["Dense_3"]["kernel"] is None
    assert "skip_first" in masks.unmasked["['params']['Dense_0']['kernel']"]
    assert "skip_last" in masks.unmasked["['params']['Dense_3']['kernel']"]
    assert masks.unmasked["['params']['Dense_1']['bias']"] == "not a weight of any matmul"
    # Dense_1's kernel [32, 32] is 2:4 along its input axis (K), per output column.
    k = np.asarray(tree["Dense_1"]["kernel"])
    assert (k.reshape(8, 4, 32).sum(axis=1) == 2).all()
    text = str(masks)
    assert "['params']['Dense_1']['kernel']  (32,32)  2:4 from matmul #1" in text
    assert "2 of 8 parameters masked, 0 not exportable; 1024 of 2048 entries kept (0.5)" in text


class Block(nn.Module):
    """Attention-ish: 3-D DenseGeneral kernels, einsum between activations, a bf16 MLP."""

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((2, 8), name="q")(x)
        k = nn.DenseGeneral((2, 8), name="k")(x)
        v = nn.DenseGeneral((2, 8), name="v")(x)
        att = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k), axis=-1)
        o = nn.DenseGeneral(16, axis=(-2, -1), name="o")(jnp.einsum("bhts,bshd->bthd", att, v))
        h = nn.gelu(nn.Dense(32, dtype=jnp.bfloat16, name="up")(x + o))
        return nn.Dense(16, dtype=jnp.bfloat16, name="down")(h).astype(jnp.float32)


def test_transformer_block_dense_general_and_bf16():
    rng = np.random.default_rng(1)
    x = _normal(rng, 2, 8, 16)
    params = _init(Block(), x)
    masks = _assert_same_forward(Block().apply, NO_SKIP, params, x)
    kernels = [f"['params']['{n}']['kernel']" for n in ("q", "k", "v", "o", "up", "down")]
    _assert_half(masks, *kernels)
    assert masks.tree["params"]["o"]["kernel"].shape == (2, 8, 16)
    # "o" contracts (heads, head_dim): the 2:4 groups run along the flattened K = 16 axis... of
    # which the last contracting axis is head_dim, groups of 4 along it, per (head, output).
    o = np.asarray(masks.tree["params"]["o"]["kernel"])
    assert (o.reshape(2, 2, 4, 16).sum(axis=2) == 2).all()


def test_bf16_cast_mask_is_computed_on_the_cast_operand():
    # In f32 the two largest of the first group are entries 2 and 3; in bf16 entries 0, 2 and 3 are
    # all 1.0, and the tie keeps the lower indices 0 and 2.
    col = np.array([1 - 2**-12, 0.5, 1.0, 1 + 2**-10, 1, 2, 3, 4], np.float32)
    w = jnp.asarray(np.stack([col, -col], axis=1))
    f = lambda w, x: x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)  # noqa: E731
    x = _normal(np.random.default_rng(2), 3, 8)
    masks = _assert_same_forward(f, NO_SKIP, w, x)
    np.testing.assert_array_equal(np.asarray(masks.tree[:4, 0]), [True, False, True, False])
    np.testing.assert_array_equal(np.asarray(masks.tree), np.asarray(fst_jax.mask_2to4(w.astype(jnp.bfloat16), 0)))
    assert not np.array_equal(np.asarray(masks.tree), np.asarray(fst_jax.mask_2to4(w, 0)))


@pytest.mark.parametrize("grad_input", ["prune_output_dim", "transposable"])
def test_transposed_weight(grad_input):
    rng = np.random.default_rng(3)
    w, x = _normal(rng, 12, 8), _normal(rng, 5, 8)
    cfg = fst_jax.FSTConfig(skip_first=False, skip_last=False, grad_input=grad_input)
    masks = _assert_same_forward(lambda w, x: x @ w.T, cfg, w, x)
    want = fst_jax.mask_2to4(w, axis=1) if grad_input != "transposable" else \
        fst_jax.transposable_mask_2to4(w, axes=(1, 0))  # the forward uses the transposable mask
    np.testing.assert_array_equal(np.asarray(masks.tree), np.asarray(want))


def test_broadcast_weight_and_k_not_multiple_of_4():
    def f(p, x):  # a broadcast weight in a batched matmul, then a K=6 layer left dense
        h = jnp.einsum("bk,bko->bo", x, jnp.broadcast_to(p["a"], (3, 8, 6)))
        return jnp.tanh(h) @ p["b"]

    rng = np.random.default_rng(11)
    params = {"a": _normal(rng, 8, 6), "b": _normal(rng, 6, 4)}
    masks = _assert_same_forward(f, NO_SKIP, params, _normal(rng, 3, 8))
    _assert_half(masks, "['a']")
    assert masks.tree["b"] is None and masks.unmasked["['b']"] == "matmul #1 forward is dense: K=6 not divisible by 4"


class Convs(nn.Module):
    ndim: int

    @nn.compact
    def __call__(self, x):
        for f in (8, 8, 4):
            x = nn.tanh(nn.Conv(f, (3,) * self.ndim)(x))
        return x


@pytest.mark.parametrize("ndim", [1, 2])
def test_conv_kernels(ndim):
    rng = np.random.default_rng(4)
    x = _normal(rng, 2, *(6,) * ndim, 4)
    params = _init(Convs(ndim), x)
    masks = _assert_same_forward(Convs(ndim).apply, NO_SKIP, params, x)
    _assert_half(masks, *(f"['params']['Conv_{i}']['kernel']" for i in range(3)))
    k = np.asarray(masks.tree["params"]["Conv_1"]["kernel"])  # [*window, in=8, out=8]
    assert (k.reshape(*k.shape[:-2], 2, 4, 8).sum(axis=-2) == 2).all()  # 2:4 over input channels


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.tanh(nn.Dense(16)(x)), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16)(x)
        x, _ = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()(x, None)
        return nn.Dense(4)(x)


def test_flax_nn_scan_over_stacked_layers():
    rng = np.random.default_rng(5)
    x = _normal(rng, 2, 4, 8)
    params = _init(Scanned(), x)
    masks = _assert_same_forward(Scanned().apply, fst_jax.FSTConfig(), params, x)
    _assert_half(masks, "['params']['ScanScanBlock_0']['Dense_0']['kernel']")
    stacked = np.asarray(masks.tree["params"]["ScanScanBlock_0"]["Dense_0"]["kernel"])  # [3, 16, 16]
    for layer in range(3):  # each layer's slice carries its own mask
        w = params["params"]["ScanScanBlock_0"]["Dense_0"]["kernel"][layer]
        np.testing.assert_array_equal(stacked[layer], np.asarray(fst_jax.mask_2to4(w, axis=0)))


def test_lax_scan_with_sliced_and_reshaped_stack_under_jit():
    def f(ws, x):
        def body(h, w):
            return jnp.tanh(h @ jax.jit(lambda w: w.reshape(8, 8).T)(w)), None
        return lax.scan(body, x, ws[1:])[0]

    rng = np.random.default_rng(6)
    ws, x = _normal(rng, 4, 2, 4, 8), _normal(rng, 3, 8)
    masks = _assert_same_forward(f, NO_SKIP, ws, x)
    m = np.asarray(masks.tree)
    assert m[0].all()  # ws[0] is never read: kept whole
    for i in (1, 2, 3):
        np.testing.assert_array_equal(m[i].reshape(8, 8), np.asarray(fst_jax.mask_2to4(ws[i].reshape(8, 8), 1)))


def test_fused_weight_sliced_into_disjoint_parts_and_shared_weight():
    def f(p, x):
        q, k = p["qk"][:, :8], p["qk"][:, 8:]
        h = jnp.tanh(x @ q) * jnp.tanh(x @ k)
        return jnp.tanh(jnp.tanh(h @ p["w"]) @ p["w"])  # one weight, two sparse matmuls, one mask

    rng = np.random.default_rng(7)
    params = {"qk": _normal(rng, 8, 16), "w": _normal(rng, 8, 8)}
    masks = _assert_same_forward(f, NO_SKIP, params, _normal(rng, 3, 8))
    _assert_half(masks, "['qk']", "['w']")
    assert masks.used_by == {"['qk']": (0, 1), "['w']": (2, 3)}


def test_params_argnums_tuple_gives_the_grad_structure():
    f = lambda a, x, b: x @ a @ b  # noqa: E731
    rng = np.random.default_rng(8)
    a, x, b = _normal(rng, 4, 4), _normal(rng, 2, 4), _normal(rng, 4, 4)
    masks = fst_jax.forward_masks(f, NO_SKIP, params_argnums=(2, 0))(a, x, b)
    assert masks.paths == ("[0]", "[2]")
    np.testing.assert_array_equal(np.asarray(masks.tree[0]), np.asarray(fst_jax.mask_2to4(b, 0)))
    np.testing.assert_array_equal(np.asarray(masks.tree[1]), np.asarray(fst_jax.mask_2to4(a, 0)))


@pytest.mark.parametrize("body, leaves, op", [
    (lambda p, x: x @ (p["w"] * 2), ["['w']"], "mul"),
    (lambda p, x: x @ (p["w"] + p["b"]), ["['b']", "['w']"], "add"),
    (lambda p, x: x @ p["w"][p["i"]], ["['i']", "['w']"], "dynamic_slice"),
    (lambda p, x: lax.fori_loop(0, 2, lambda i, h: jnp.tanh(h @ p["w"][i]), x), ["['w']"],
     "dynamic_slice with computed indices"),
    (lambda p, x: x @ jnp.take(p["w"], jnp.array([0, 1, 2, 3]), axis=0), ["['w']"], "gather"),
    (lambda p, x: lax.cond(jnp.sum(x) > 0, lambda h: h @ p["w"], lambda h: -h, x), ["['w']"], "cond"),
])
def test_not_exportable_names_the_op(body, leaves, op):
    rng = np.random.default_rng(9)
    params = {"b": _normal(rng, 4, 4), "i": jnp.int32(0), "w": _normal(rng, 4, 4)}
    if op.startswith("dynamic_slice"):
        params["w"] = _normal(rng, 2, 4, 4)
    masks = fst_jax.forward_masks(body, NO_SKIP)(params, _normal(rng, 3, 4))
    assert sorted(masks.not_exportable) == leaves
    for leaf in leaves:
        assert op in masks.not_exportable[leaf] and "sparse matmul #0" in masks.not_exportable[leaf]
        assert masks.tree[leaf[2:-2]] is None
        assert f"{leaf}" in str(masks) and "not exportable: " in str(masks)


def test_weight_also_used_outside_the_sparse_products_is_not_exportable():
    f = lambda w, x: x @ w + jnp.sum(w)  # noqa: E731
    masks = fst_jax.forward_masks(f, NO_SKIP)(jnp.ones((4, 4)), jnp.ones((2, 4)))
    assert masks.tree is None
    assert masks.not_exportable[""].startswith("also used by reduce_sum")
    g = lambda w, x: jnp.tanh(x @ w) @ w  # noqa: E731  first matmul dense, second sparse
    masks = fst_jax.forward_masks(g, fst_jax.FSTConfig(skip_last=False))(jnp.ones((4, 4)), jnp.ones((2, 4)))
    assert "matmul #0 (dense: first weight matmul (skip_first))" in masks.not_exportable[""]


def test_conflicting_masks_are_not_exportable():
    f = lambda w, x: jnp.tanh(x @ w) @ w.T  # noqa: E731  2:4 along w's rows, then along its columns
    w = _normal(np.random.default_rng(10), 4, 4)
    masks = fst_jax.forward_masks(f, NO_SKIP)(w, jnp.ones((2, 4)))
    assert masks.tree is None
    assert "different forward masks" in masks.not_exportable[""] and "#0, #1" in masks.not_exportable[""]


def test_prune_params_errors():
    params = {"b": jnp.ones(3), "w": jnp.ones((4, 4))}
    with pytest.raises(ValueError, match="structure of params"):
        fst_jax.prune_params(params, {"w": None})
    with pytest.raises(ValueError, match=r"mask at \['w'\] has shape \(4, 2\) but the parameter has shape \(4, 4\)"):
        fst_jax.prune_params(params, {"b": None, "w": jnp.ones((4, 2), bool)})
    with pytest.raises(TypeError, match=r"mask at \['w'\] must be a bool array, got float32"):
        fst_jax.prune_params(params, {"b": None, "w": jnp.ones((4, 4))})
    pruned = fst_jax.prune_params(params, {"b": None, "w": jnp.eye(4, dtype=bool)})
    np.testing.assert_array_equal(np.asarray(pruned["w"]), np.eye(4))
    assert pruned["b"] is params["b"]


def test_forward_masks_needs_parameter_values():
    S = jax.ShapeDtypeStruct
    run = fst_jax.forward_masks(lambda w, x: x @ w, NO_SKIP)
    with pytest.raises(TypeError, match="needs the parameters' values, but the parameter <root> is a ShapeDtypeStruct"):
        run(S((4, 4), jnp.float32), jnp.ones((2, 4)))
    with pytest.raises(TypeError, match="config must be an fst_jax.FSTConfig"):
        fst_jax.forward_masks(lambda w, x: x @ w, {"forward": True})
    masks = run(jnp.ones((4, 4)), S((2, 4), jnp.float32))  # the other arguments: shapes suffice
    _assert_half(masks, "")


def test_while_loop_invariant_weight_is_exported():
    """A weight read by a while loop's body as a loop constant sees the same mask at every
    iteration: it is exported (a carried value would not be)."""
    def f(p, x):
        return lax.while_loop(lambda c: c[1] < 2, lambda c: (jnp.tanh(c[0] @ p["w"]), c[1] + 1), (x, 0))[0]

    rng = np.random.default_rng(3)
    params = {"w": _normal(rng, 8, 8)}
    masks = _assert_same_forward(f, NO_SKIP, params, _normal(rng, 3, 8))
    np.testing.assert_array_equal(np.asarray(masks.tree["w"]), np.asarray(fst_jax.mask_2to4(params["w"], axis=0)))
