"""Issue 11: the real-model patterns, as small Flax stand-ins (Flax LSTM scanned over time with
concatenated gate kernels, an ALBERT-style shared layer, a ViT with a CLS token, a `train` flag
driving dropout).

Expected values come from DESIGN.md §1 in plain jnp (masks from ``tests/references.py``), or from
the untransformed function with the identity config; fst_jax is driven through its public API.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import fst_jax
from references import mask_2to4

ALL = fst_jax.FSTConfig(skip_first=False, skip_last=False, sr_ste=0.0, restore_scale=0.5)
IDENTITY = ALL.replace(forward=False, grad_input="dense", grad_weight="dense")
LAM = 0.1


def _init(model, *args, scale=0.5, **kwargs):
    """Flax parameters drawn with numpy (no jax.random compile per shape)."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a, **kwargs), *args)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * scale / np.sqrt(s.shape[-1]), s.dtype),
                        shapes)


def _x(*shape, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def m24(x, axis):
    return jnp.asarray(mask_2to4(np.asarray(x), axis))


def close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol), a, b)


def _sr_ste_delta(fn, params, *args):
    """grad with sr_ste=λ minus grad with sr_ste=0, identical configs otherwise."""
    g1 = jax.grad(fst_jax.sparsify(fn, ALL.replace(sr_ste=LAM)))(params, *args)
    g0 = jax.grad(fst_jax.sparsify(fn, ALL))(params, *args)
    return jax.tree.map(lambda a, b: a - b, g1, g0)


def _term(w):
    """λ(1 − m)⊙W for a kernel [K, O] (2:4 along K)."""
    return LAM * jnp.where(m24(w, 0), 0.0, w)


# ------------------------------------------------------------------------------------------------
# Flax OptimizedLSTMCell under nn.RNN (a scan over time; gate kernels concatenated)
# ------------------------------------------------------------------------------------------------


class LSTM(nn.Module):
    @nn.compact
    def __call__(self, x):  # x [B, T, D]
        return nn.RNN(nn.OptimizedLSTMCell(8))(x)


def _lstm_loss(params, x):
    return jnp.mean(LSTM().apply(params, x) ** 2)


def _gate_kernels(params):
    cell = params["params"]["OptimizedLSTMCell_0"]
    return {name: sub["kernel"] for name, sub in cell.items()}


def test_flax_optimized_lstm_forward_masks_per_gate_kernel():
    """5d: the gate kernels Flax's OptimizedLSTMCell concatenates come back with their own 2:4
    masks, and prune_params + a plain forward equals the sparsified forward."""
    x = _x(2, 5, 8)
    params = _init(LSTM(), x)
    masks = fst_jax.forward_masks(LSTM().apply, ALL)(params, x)
    assert not masks.not_exportable, masks.not_exportable
    mask_kernels = _gate_kernels(masks.tree)
    kernels = _gate_kernels(params)
    assert len(kernels) == 8  # ii, if, ig, io, hi, hf, hg, ho
    for name, k in kernels.items():
        np.testing.assert_array_equal(np.asarray(mask_kernels[name]), np.asarray(m24(k, 0)), err_msg=name)
    dense = jax.jit(LSTM().apply)(fst_jax.prune_params(params, masks), x)
    fst = jax.jit(fst_jax.sparsify(LSTM().apply, ALL))(params, x)
    np.testing.assert_array_equal(np.asarray(dense), np.asarray(fst))


def test_flax_lstm_sr_ste_once_per_entry_over_time():
    """5c: the LSTM's kernels are used at each of T=5 steps; SR-STE adds λ(1−m)⊙W once."""
    x = _x(2, 5, 8)
    params = _init(LSTM(), x)
    delta = _sr_ste_delta(_lstm_loss, params, x)
    want = {name: _term(k) for name, k in _gate_kernels(params).items()}
    close(_gate_kernels(delta), want)


# ------------------------------------------------------------------------------------------------
# ALBERT-style shared layer
# ------------------------------------------------------------------------------------------------


class Albert(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16, name="embed")(x)
        shared = nn.Dense(16, name="shared")
        for _ in range(3):
            x = x + jnp.tanh(shared(x))
        return nn.Dense(4, name="head")(x)


def _albert_loss(params, x):
    return jnp.mean(Albert().apply(params, x) ** 2)


def test_albert_shared_layer_sr_ste_once_and_export():
    """5c + 5d: a layer shared three times gets the SR-STE term once and exports one mask."""
    x = _x(2, 4, 8)
    params = _init(Albert(), x)
    delta = _sr_ste_delta(_albert_loss, params, x)
    for name in ("embed", "shared", "head"):
        close(delta["params"][name]["kernel"], _term(params["params"][name]["kernel"]))
        close(delta["params"][name]["bias"], jnp.zeros_like(params["params"][name]["bias"]))
    masks = fst_jax.forward_masks(Albert().apply, ALL)(params, x)
    assert not masks.not_exportable, masks.not_exportable
    np.testing.assert_array_equal(np.asarray(masks.tree["params"]["shared"]["kernel"]),
                                  np.asarray(m24(params["params"]["shared"]["kernel"], 0)))


# ------------------------------------------------------------------------------------------------
# ViT with a CLS token: 16 patches + 1 = 17 tokens
# ------------------------------------------------------------------------------------------------


class ViT(nn.Module):
    @nn.compact
    def __call__(self, patches):  # [B, 16, P]
        h = nn.Dense(8, name="embed")(patches)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, 8))
        h = jnp.concatenate([jnp.broadcast_to(cls, (h.shape[0], 1, 8)), h], axis=1)  # [B, 17, 8]
        h = h + nn.Dense(8, name="mlp_out")(nn.gelu(nn.Dense(16, name="mlp_in")(h)))
        return nn.Dense(4, name="head")(h[:, 0])


def _vit_loss(params, patches):
    return jnp.mean(ViT().apply(params, patches) ** 2)


def test_vit_cls_token_grad_weight_sparse_masked_equals_compact():
    """5e: the MLP of a ViT with a CLS token (17 tokens) gets a sparse grad-weight product;
    masked and compact mode give the same gradients."""
    patches = _x(2, 16, 12)
    params = _init(ViT(), patches)
    cfg = fst_jax.FSTConfig(restore_scale=0.5)
    rows = fst_jax.report(_vit_loss, cfg)(params, patches).rows
    for name in ("mlp_in", "mlp_out"):
        (row,) = [r for r in rows if r.param_path == f"['params']['{name}']['kernel']"]
        assert row.forward == "sparse" and row.grad_weight.startswith("sparse"), row
        assert row.tokens == 17
    g_masked = jax.grad(fst_jax.sparsify(_vit_loss, cfg.replace(mode="masked")))(params, patches)
    g_compact = jax.grad(fst_jax.sparsify(_vit_loss, cfg.replace(mode="compact")))(params, patches)
    close(g_masked, g_compact, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# `train: bool` driving Flax dropout
# ------------------------------------------------------------------------------------------------


class DropoutMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = jnp.tanh(nn.Dense(16)(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(4)(x)


def _dropout_loss(params, x, train, key):
    out = DropoutMLP().apply(params, x, train, rngs={"dropout": key} if train else None)
    return jnp.mean(out**2)


def test_flax_train_flag_and_dropout_key():
    """4: loss(params, x, train: bool, key) with Flax dropout: the Python flag is static, the key
    is traced, as with jax.grad."""
    x = _x(2, 4, 8)
    params = _init(DropoutMLP(), x, train=False)
    key = jax.random.key(3)
    for train in (True, False):
        got = jax.value_and_grad(fst_jax.sparsify(_dropout_loss, IDENTITY))(params, x, train, key)
        close(got, jax.value_and_grad(_dropout_loss)(params, x, train, key))
    jax.grad(fst_jax.sparsify(_dropout_loss))(params, x, True, key)  # the default config runs too
