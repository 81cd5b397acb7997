"""The minimum-variance unbiased 2:4 grad-weight (``FSTConfig(grad_weight="mvue")``, issue 14).

The sample is checked against a numpy reference written here from its definition: inclusion
probabilities ``p_i = min(1, c·|x_i|)`` with ``Σ p_i = 2`` per group of 4, a kept entry ``x_i / p_i``.
Through ``sparsify`` the sampled ``dY`` is read off the weight gradient: with the activation the
identity (``A = I``, T = K tokens), ``dW = Aᵀ·S(dY) = S(dY)``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fst_jax
from fst_jax._dot import MVUE_SEED, MVUE_SEEDS
from fst_jax._masks import _as_key, draw_pattern, mvue_2to4

T = 16  # tokens = K, so that the identity activation reads S(dY) off dW
O = 8
MVUE = fst_jax.FSTConfig(grad_weight="mvue", skip_first=False, skip_last=False, sr_ste=0.0)


def ref_probabilities(x: np.ndarray) -> np.ndarray:
    """Per group of 4 along the last axis: p = 2|x|/Σ|x|, or, when one entry would exceed 1, that
    entry 1 and the others |x|/(Σ|x| − max); an all-zero group 1/2 each."""
    g = np.abs(x.reshape(-1, 4)).astype(np.float64)
    p = np.empty_like(g)
    for r, row in enumerate(g):
        s = row.sum()
        if s == 0:
            p[r] = 0.5
        elif 2 * row.max() > s:
            top = int(np.argmax(row))
            p[r] = row / (s - row[top])
            p[r, top] = 1.0
        else:
            p[r] = 2 * row / s
    return p.reshape(x.shape)


def groups(x, axis):
    """x with ``axis`` moved last and split into groups of 4: [..., 4]."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    return x.reshape(-1, 4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_two_of_four_kept_values_are_x_over_p(dtype, axis):
    x = jax.random.normal(jax.random.key(0), (8, 12, 4), dtype)
    x = x.at[0, :4, 0].set(0).at[4:8, 0, 1].set(jnp.array([5.0, 0.1, 0.0, 0.2], dtype))  # zero and capped groups
    y = mvue_2to4(x, jax.random.key(1), axis)
    assert y.shape == x.shape and y.dtype == x.dtype
    xg, yg = groups(x, axis), groups(y, axis)
    p = ref_probabilities(xg)
    kept = yg != 0
    nonzero = (xg != 0).sum(1)
    np.testing.assert_array_equal(kept.sum(1), np.minimum(nonzero, 2))  # 2 of 4 (fewer only where x is 0)
    tol = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}[dtype]
    np.testing.assert_allclose(yg[kept], (xg / np.where(p > 0, p, 1))[kept], rtol=tol)
    # entries that are surely kept (p = 1) always are
    assert kept[np.isclose(p, 1.0) & (xg != 0)].all()


def test_inclusion_frequencies_match_the_reference_and_the_mean_is_x():
    x = jax.random.normal(jax.random.key(3), (5, 16)) * jnp.array([[1.0, 0.1, 3.0, 0.5] * 4])
    n = 20000
    ys = jax.vmap(lambda k: mvue_2to4(x, k))(jax.random.split(jax.random.key(4), n))
    freq = np.asarray((ys != 0).mean(0), np.float64)
    p = ref_probabilities(np.asarray(x))
    # binomial standard error of a frequency: sqrt(p(1-p)/n) <= 0.0036; 5 SE
    np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / n) + 1e-6)
    mean, se = np.asarray(ys.mean(0)), np.asarray(ys.std(0)) / np.sqrt(n)
    np.testing.assert_array_less(np.abs(mean - np.asarray(x)), 5 * se + 1e-5)


def test_same_key_same_sample_and_bad_input():
    x = jax.random.normal(jax.random.key(0), (4, 8))
    np.testing.assert_array_equal(mvue_2to4(x, jax.random.key(1)), mvue_2to4(x, jax.random.key(1)))
    assert not np.array_equal(mvue_2to4(x, jax.random.key(1)), mvue_2to4(x, jax.random.key(2)))
    with pytest.raises(ValueError, match=r"shape \(4, 8\).*length 4 along axis 0 must be a multiple of 4|"
                                         r"multiple of 4"):
        mvue_2to4(x[:3], jax.random.key(0), axis=0)
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        mvue_2to4(x, jax.random.key(0), axis=2)
    with pytest.raises(TypeError, match="floating"):
        mvue_2to4(jnp.ones((4,), jnp.int32), jax.random.key(0))


def probe_loss(w, x, g):
    """sum((x @ w) ⊙ g): dY = g."""
    return jnp.sum((x @ w) * g)


def probe():
    w = jax.random.normal(jax.random.key(0), (T, O))
    x = jnp.eye(T)[None]  # [1, T, K = T]: dW = S(dY)
    g = jax.random.normal(jax.random.key(1), (1, T, O))
    return w, x, g


def test_sparsify_grad_weight_is_the_sample_of_dy_along_tokens():
    w, x, g = probe()
    grad = jax.jit(lambda w, x, g, s: jax.grad(fst_jax.sparsify(probe_loss, MVUE))(w, x, g, fst_key=s))
    samples = []
    for step in range(4):
        dw = np.asarray(grad(w, x, g, jnp.int32(step)))  # [K = T, O]: S(dY)[t, o]
        gt = np.asarray(g[0]).T  # [O, T]: groups of 4 consecutive tokens per output channel
        st = dw.T
        kept = st != 0
        assert (kept.reshape(O, T // 4, 4).sum(-1) == 2).all()
        p = ref_probabilities(gt)
        np.testing.assert_allclose(st[kept], (gt / p)[kept], rtol=1e-5)
        samples.append(kept)
        # the sample is keyed by the layer's seed, drawn like a pattern index from fst_key
        seed = draw_pattern(step, 0, MVUE_SEEDS)
        want = mvue_2to4(g, jax.random.fold_in(jax.random.key(MVUE_SEED), seed), axis=1)
        np.testing.assert_array_equal(dw, np.asarray(want[0]))
    np.testing.assert_array_equal(grad(w, x, g, jnp.int32(2)), grad(w, x, g, jnp.int32(2)))
    assert len({s.tobytes() for s in samples}) > 1  # different steps draw different samples


def test_shard_map_shards_share_the_draw_unless_the_key_is_folded():
    """Inside shard_map every shard draws from the same fst_key (safe where the data is
    replicated); folding the shard's axis_index into the key gives independent samples."""
    from jax import lax
    from jax.sharding import PartitionSpec as P

    w, x, g = probe()
    # both shards see the same data; each its own copy of w, so that its gradient is not psum'd
    ws, xs, gs = jnp.stack([w, w]), jnp.concatenate([x, x]), jnp.concatenate([g, g])
    mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    grad = jax.grad(fst_jax.sparsify(probe_loss, MVUE))

    def per_shard(fold):
        def body(w, x, g):
            key = jax.random.key(7)
            return grad(w[0], x, g, fst_key=jax.random.fold_in(key, lax.axis_index("d")) if fold else key)[None]
        spec = P("d")
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec))(ws, xs, gs)

    same, folded = np.asarray(per_shard(False)), np.asarray(per_shard(True))
    np.testing.assert_array_equal(same[0], same[1])
    np.testing.assert_allclose(same[0], grad(w, x, g, fst_key=jax.random.key(7)), rtol=1e-6)
    assert (folded[0] != folded[1]).any()
    for dw in folded:
        assert ((dw.T != 0).reshape(O, T // 4, 4).sum(-1) == 2).all()


def test_sparsify_mvue_is_unbiased_and_forward_unaffected():
    w, x, g = probe()
    x = jax.random.normal(jax.random.key(2), (2, T, T))
    g = jnp.concatenate([g, g * 0.5])
    f = fst_jax.sparsify(probe_loss, MVUE)
    ref = jax.grad(fst_jax.sparsify(probe_loss, MVUE.replace(grad_weight="dense")))(w, x, g)
    n = 4000
    grads = jax.jit(jax.vmap(lambda s: jax.grad(f)(w, x, g, fst_key=s)))(jnp.arange(n))
    se = np.asarray(grads.std(0)) / np.sqrt(n)
    np.testing.assert_array_less(np.abs(np.asarray(grads.mean(0) - ref)), 5 * se + 1e-5)
    # the forward product does not use the sample
    np.testing.assert_array_equal(f(w, x, g, fst_key=0), f(w, x, g, fst_key=7))
    np.testing.assert_array_equal(f(w, x, g, fst_key=0), fst_jax.sparsify(probe_loss, MVUE.replace(
        grad_weight="fixed_mask"))(w, x, g))


def test_needs_key_report_and_dense_fallback():
    w, x, g = probe()
    f = fst_jax.sparsify(probe_loss, MVUE)
    with pytest.raises(TypeError, match=r"grad_weight='mvue'.*fst_key"):
        jax.grad(f)(w, x, g)
    assert MVUE.needs_fst_key and not fst_jax.FSTConfig().needs_fst_key
    rule = fst_jax.Rule(pattern=".*", overrides={"grad_weight": "mvue"})
    assert fst_jax.FSTConfig(rules=(rule,)).needs_fst_key
    rows = fst_jax.report(probe_loss, MVUE)(w, x, g).rows
    assert "mvue" in str(rows[0].decision.grad_weight)
    # T not a multiple of 4: the grad-weight product stays dense, with its reason; no key needed
    x6, g6 = jnp.ones((1, 6, T)), jnp.ones((1, 6, O))
    rows = fst_jax.report(probe_loss, MVUE)(w, x6, g6).rows
    assert not rows[0].decision.grad_weight.sparse
    assert "T=6 not divisible by 4 (mvue samples dY" in rows[0].grad_weight
    assert jax.grad(f)(w, x6, g6).shape == w.shape


def test_each_scan_iteration_samples_anew_and_a_convolution():
    w, x, g = probe()

    def layers(ws, x, g):  # a scan over 2 stacked layers, the same dY for both
        return jax.lax.scan(lambda c, w: (c + probe_loss(w, x, g), None), 0.0, ws)[0]

    ws = jnp.stack([w, w])
    dws = np.asarray(jax.grad(fst_jax.sparsify(layers, MVUE))(ws, x, g, fst_key=5))
    for i in range(2):  # layer i's seed: randint(fold_in(fold_in(fst_key, index), i), MVUE_SEEDS)
        k = jax.random.fold_in(jax.random.fold_in(_as_key(5), 0), i)
        seed = jax.random.randint(k, (), 0, MVUE_SEEDS, dtype=jnp.int32)
        want = mvue_2to4(g, jax.random.fold_in(jax.random.key(MVUE_SEED), seed), axis=1)
        np.testing.assert_array_equal(dws[i], np.asarray(want[0]))
    assert not np.array_equal(dws[0] != 0, dws[1] != 0)  # the layers sample independently

    def conv(k, img):
        return jnp.sum(jax.lax.conv_general_dilated(img, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO",
                                                                                               "NHWC")) ** 2)

    k = jax.random.normal(jax.random.key(0), (3, 3, 8, 8))
    img = jax.random.normal(jax.random.key(1), (2, 4, 4, 8))
    fc = fst_jax.sparsify(conv, MVUE)
    assert "mvue" in str(fst_jax.report(conv, MVUE)(k, img).rows[0].decision.grad_weight)
    n = 2000
    grads = jax.jit(jax.vmap(lambda s: jax.grad(fc)(k, img, fst_key=s)))(jnp.arange(n))
    ref = jax.grad(fst_jax.sparsify(conv, MVUE.replace(grad_weight="dense")))(k, img)
    se = np.asarray(grads.std(0)) / np.sqrt(n)
    np.testing.assert_array_less(np.abs(np.asarray(grads.mean(0) - ref)), 5 * se + 1e-4)


def test_main_job_trains_with_mvue(tmp_path):
    import json

    from fst_jax.train import main

    argv = ["--steps", "12", "--model", "mlp", "--width", "64", "--lr", "3e-3", "--quiet",
            "--config", "grad_weight=mvue", "--out", str(tmp_path)]
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    loss = results["runs"]["fst"]["curves"]["loss"]
    assert len(loss) == 12 and loss[-1] < loss[0]
