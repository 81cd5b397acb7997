"""Tests of :func:`fst_jax.optax.sr_ste`, the optimizer-side SR-STE term.

The reference is the spec (DESIGN.md §1, "Weight update"): SR-STE adds ``λ·(1 − mask_f)⊙W`` to
the weight gradient, where ``mask_f`` is the forward 2:4 mask (``True`` = kept). The transform
must add exactly that to the updates, and with ``FSTConfig(sr_ste=0)`` reproduce the
backward-pass form ``FSTConfig(sr_ste=λ)``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import fst_jax
import fst_jax.optax
from fst_jax import FSTConfig

LAM = 0.1  # large, so that the term is visible next to the loss gradient


def _rand(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _tree() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """params, updates and masks: a masked kernel, a None-masked bias, an unmasked (missing) w."""
    params = {
        "layer": {"kernel": _rand(0, (8, 4)), "bias": _rand(1, (4,))},
        "other": {"w": _rand(2, (4, 4))},
    }
    updates = jax.tree.map(lambda p: _rand(3, p.shape), params)
    masks = {
        "layer": {"kernel": np.random.default_rng(4).random((8, 4)) < 0.5, "bias": None},
    }
    return params, updates, masks


# ------------------------------------------------------------------------------------------------
# Arithmetic
# ------------------------------------------------------------------------------------------------


def test_exact_arithmetic_against_hand_computation() -> None:
    """kernel: u + λ·p where the mask is False, u where True; None and missing leaves: u."""
    params, updates, masks = _tree()
    tx = fst_jax.optax.sr_ste(masks, weight_decay=LAM)
    out, state = tx.update(updates, tx.init(params), params)
    kernel, mask = params["layer"]["kernel"], masks["layer"]["kernel"]
    expected = updates["layer"]["kernel"] + np.float32(LAM) * np.where(mask, np.float32(0), kernel)
    np.testing.assert_array_equal(np.asarray(out["layer"]["kernel"]), expected)
    # Spot-check one kept and one dropped entry by hand.
    kept, dropped = np.argwhere(mask)[0], np.argwhere(~mask)[0]
    u = updates["layer"]["kernel"]
    assert out["layer"]["kernel"][tuple(kept)] == u[tuple(kept)]
    assert out["layer"]["kernel"][tuple(dropped)] == np.float32(
        u[tuple(dropped)] + np.float32(LAM) * kernel[tuple(dropped)]
    )
    np.testing.assert_array_equal(np.asarray(out["layer"]["bias"]), updates["layer"]["bias"])
    np.testing.assert_array_equal(np.asarray(out["other"]["w"]), updates["other"]["w"])
    assert state == optax.EmptyState()


def test_callable_masks_equal_given_masks_and_jit() -> None:
    """A callable params → masks gives the same updates, eagerly and under jit."""
    params, updates, masks = _tree()
    given = fst_jax.optax.sr_ste(masks, LAM)
    fn = fst_jax.optax.sr_ste(lambda p: {"layer": {"kernel": masks["layer"]["kernel"]}}, LAM)
    a, _ = given.update(updates, given.init(params), params)
    b, _ = jax.jit(fn.update)(updates, fn.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_zero_weight_decay_is_identity() -> None:
    params, updates, masks = _tree()
    tx = fst_jax.optax.sr_ste(masks, 0.0)
    out, _ = tx.update(updates, tx.init(params), params)
    jax.tree.map(np.testing.assert_array_equal, out, updates)


def test_composes_with_chain_and_sgd() -> None:
    """chain(sr_ste, sgd(lr, momentum)): two steps equal the hand-written momentum SGD."""
    params, grads, masks = _tree()
    lr, mu = 0.05, 0.9
    tx = optax.chain(fst_jax.optax.sr_ste(masks, LAM), optax.sgd(lr, momentum=mu))
    state = tx.init(params)
    p = params
    trace = jax.tree.map(np.zeros_like, params)
    p_ref = params
    for _ in range(2):
        updates, state = jax.jit(tx.update)(grads, state, p)
        p = optax.apply_updates(p, updates)
        g = dict(grads, layer=dict(grads["layer"]))
        g["layer"]["kernel"] = grads["layer"]["kernel"] + LAM * np.where(
            masks["layer"]["kernel"], 0.0, p_ref["layer"]["kernel"]
        )
        trace = jax.tree.map(lambda t, gi: mu * t + gi, trace, g)
        p_ref = jax.tree.map(lambda q, t: q - lr * t, p_ref, trace)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7),
        p,
        p_ref,
    )


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_mask_at_unknown_path_is_an_error() -> None:
    params, updates, masks = _tree()
    bad = {"layer": {"kernal": masks["layer"]["kernel"]}}
    with pytest.raises(ValueError, match=r"\['layer'\]\['kernal'\].*not parameter paths"):
        fst_jax.optax.sr_ste(bad, LAM).init(params)
    # A mask for a whole subtree is not a parameter path either.
    with pytest.raises(ValueError, match=r"\['other'\]"):
        fst_jax.optax.sr_ste({"other": np.ones((4, 4), bool)}, LAM).init(params)


def test_mask_shape_and_dtype_errors() -> None:
    params, updates, _ = _tree()
    with pytest.raises(ValueError, match=r"\['layer'\]\['kernel'\] has shape \(4, 8\).*\(8, 4\)"):
        fst_jax.optax.sr_ste({"layer": {"kernel": np.ones((4, 8), bool)}}, LAM).init(params)
    with pytest.raises(ValueError, match="must be a bool array.*float32"):
        fst_jax.optax.sr_ste({"layer": {"kernel": np.ones((8, 4), np.float32)}}, LAM).init(params)
    # A callable's masks are checked at update time.
    tx = fst_jax.optax.sr_ste(lambda p: {"layer": {"kernel": jnp.ones((8, 8), bool)}}, LAM)
    with pytest.raises(ValueError, match="has shape"):
        tx.update(updates, tx.init(params), params)


def test_update_needs_params_and_matching_updates() -> None:
    params, updates, masks = _tree()
    tx = fst_jax.optax.sr_ste(masks, LAM)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(updates, tx.init(params))
    with pytest.raises(ValueError, match="same tree structure"):
        tx.update({"layer": updates["layer"]}, tx.init(params), params)


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf"), True, "0.1"])
def test_bad_weight_decay(bad: object) -> None:
    with pytest.raises(ValueError, match="weight_decay"):
        fst_jax.optax.sr_ste({}, bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Equivalence with the backward-pass form
# ------------------------------------------------------------------------------------------------


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(16)(x))
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(8)(x)


def _setup(batch: int = 2) -> tuple[Any, jax.Array]:
    x = jax.random.normal(jax.random.key(1), (batch, 8, 16))  # [B, T, K]
    params = _MLP().init(jax.random.key(3), x)["params"]
    return params, x


def _loss(params: Any, x: jax.Array) -> jax.Array:
    return jnp.mean(_MLP().apply({"params": params}, x) ** 2)


def _forward_masks(params: Any) -> dict[str, Any]:
    """The forward mask of the one sparse layer (the defaults leave the first and last dense)."""
    return {"Dense_1": {"kernel": fst_jax.mask_2to4(params["Dense_1"]["kernel"], axis=0)}}


def _sgd_steps(grad_fn: Any, tx: optax.GradientTransformation, params: Any, x: jax.Array,
               steps: int) -> Any:
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(grad_fn(params, x), state, params)
        params = optax.apply_updates(params, updates)
    return params


def _assert_close(a: Any, b: Any) -> None:
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6),
        a,
        b,
    )


def test_fstconfig_sr_ste_equals_transform_one_sgd_step() -> None:
    """FSTConfig(sr_ste=λ) + SGD == FSTConfig(sr_ste=0) + sr_ste(forward masks) + SGD."""
    params, x = _setup()
    sgd = optax.sgd(0.1)
    grad_in = jax.jit(jax.grad(fst_jax.sparsify(_loss, FSTConfig(sr_ste=LAM))))
    grad_out = jax.jit(jax.grad(fst_jax.sparsify(_loss, FSTConfig(sr_ste=0.0))))
    masks = _forward_masks(params)
    a = _sgd_steps(grad_in, sgd, params, x, 1)
    b = _sgd_steps(grad_out, optax.chain(fst_jax.optax.sr_ste(masks, LAM), sgd), params, x, 1)
    _assert_close(a, b)
    # The term matters: without it the step differs, in Dense_1's kernel only.
    c = _sgd_steps(grad_out, sgd, params, x, 1)
    assert not np.allclose(a["Dense_1"]["kernel"], c["Dense_1"]["kernel"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a["Dense_0"]["kernel"], c["Dense_0"]["kernel"])


def test_fstconfig_sr_ste_equals_transform_with_moving_masks() -> None:
    """Three momentum-SGD steps, masks recomputed from the current weights (a callable)."""
    params, x = _setup()
    sgd = optax.sgd(0.5, momentum=0.9)
    grad_in = jax.jit(jax.grad(fst_jax.sparsify(_loss, FSTConfig(sr_ste=LAM))))
    grad_out = jax.jit(jax.grad(fst_jax.sparsify(_loss, FSTConfig(sr_ste=0.0))))
    a = _sgd_steps(grad_in, sgd, params, x, 3)
    tx = optax.chain(fst_jax.optax.sr_ste(_forward_masks, LAM), sgd)
    b = _sgd_steps(grad_out, tx, params, x, 3)
    _assert_close(a, b)


def test_data_parallel_psum_counts_backward_term_per_device() -> None:
    """Why the transform exists: under shard_map data parallelism the backward-pass term is
    summed over the 8 devices, the transform's is added once and matches one device."""
    params, x = _setup(batch=16)
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))

    def data_parallel_grad(cfg: FSTConfig) -> Any:
        def step(p: Any, xb: jax.Array) -> Any:
            return jax.grad(lambda q: lax.pmean(fst_jax.sparsify(_loss, cfg)(q, xb), "d"))(p)

        return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("d")), out_specs=P()))

    single = jax.grad(fst_jax.sparsify(_loss, FSTConfig(sr_ste=LAM)))(params, x)
    dp_in = data_parallel_grad(FSTConfig(sr_ste=LAM))(params, x)
    dp_out = data_parallel_grad(FSTConfig(sr_ste=0.0))(params, x)
    tx = fst_jax.optax.sr_ste(_forward_masks(params), LAM)
    dp_fixed, _ = tx.update(dp_out, tx.init(params), params)
    _assert_close(dp_fixed, single)
    # The backward-pass form counts the term once per device: 8λ in all, 7λ too many.
    kernel = params["Dense_1"]["kernel"]
    extra = 7 * LAM * jnp.where(_forward_masks(params)["Dense_1"]["kernel"], 0.0, kernel)
    np.testing.assert_allclose(
        dp_in["Dense_1"]["kernel"], single["Dense_1"]["kernel"] + extra, rtol=1e-5, atol=1e-6
    )
