"""``FSTConfig(backend="cusparselt")`` through ``sparsify``: which products reach the custom calls,
the CUDA lowering of a training step, values equal to the XLA path (with the jnp emulation of the
custom calls on the CPU), fallbacks reported with their reason, and the clear error without a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import fst_jax
from fst_jax._compat import lower_for_cuda
from cusparselt_helpers import custom_calls, emulated

CFG = fst_jax.FSTConfig(skip_first=False, skip_last=False, backend="cusparselt", restore_scale=0.5)
BF = jnp.bfloat16


def loss(p, x):
    """Three layouts: a plain [K, O] weight, a DenseGeneral-style [D, H, Dh] kernel, a weight used
    transposed ([O, K] as stored)."""
    h = jnp.tanh(x @ p["w1"])
    h = jnp.einsum("btd,dhk->bthk", h, p["w2"])
    h = jnp.tanh(h.reshape(h.shape[:2] + (-1,)))
    return jnp.mean((h @ p["w3"].T).astype(jnp.float32) ** 2)


def make(dtype=BF, seed=0):
    rng = np.random.default_rng(seed)
    p = {"w1": rng.normal(size=(32, 64)) / 6, "w2": rng.normal(size=(64, 4, 16)) / 8, "w3": rng.normal(size=(32, 64)) / 8}
    p = {k: jnp.asarray(v, dtype) for k, v in p.items()}
    return p, jnp.asarray(rng.normal(size=(2, 16, 32)), dtype)


def assert_emulated_equals_xla(fn, cfg, *args):
    """Value and gradients of ``sparsify(fn, cfg)`` with the emulated custom calls equal the XLA
    path's: the pruned operands come from fst_jax's own masks (bf16 operands, f32 accumulation:
    equal to bf16 rounding)."""
    step = lambda c: jax.jit(jax.value_and_grad(fst_jax.sparsify(fn, c), argnums=(0, 1)))  # noqa: E731
    want = step(cfg.replace(backend="xla"))(*args)
    with emulated():
        got = step(cfg)(*args)
    assert_close(got, want)


def assert_close(got, want):
    """Equal to bf16 rounding: 2 % of each value, or 1 % of the array's largest magnitude (scaled,
    so that a wrong product in gradients of ~1e-2 cannot hide under an absolute tolerance)."""
    def check(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=1e-2 * float(np.max(np.abs(b))))
    jax.tree.map(check, got, want)


def test_report_shows_the_backend_of_every_product():
    p, x = make()
    rows = fst_jax.report(loss, CFG)(p, x).rows
    assert [r.backends for r in rows] == [("cusparselt", "none", "xla")] + [("cusparselt", "cusparselt", "xla")] * 2
    rep = fst_jax.report(loss, CFG)(p, x)
    assert rep.flops_executed == rep.flops_fst  # forward, grad-input on the sparse tensor cores, grad-weight compact
    assert "sparse cusparselt" in str(rep)


def test_ineligible_matmuls_run_on_xla_with_the_reason():
    p, x = make(jnp.float32)
    rows = fst_jax.report(loss, CFG)(p, x).rows
    assert all(r.backends[0] == "xla" and "float32" in r.backend_note for r in rows)
    assert "on xla: cusparselt: float32 x float32" in str(fst_jax.report(loss, CFG)(p, x))
    hi = lambda w, x: jnp.sum(jnp.dot(x, w, precision="highest"))  # noqa: E731
    row = fst_jax.report(hi, CFG)(jnp.ones((8, 8), BF), jnp.ones((4, 8), BF)).rows[0]
    assert row.backends[0] == "xla" and "precision" in row.backend_note
    batched = lambda w, x: jnp.sum(jnp.einsum("bk,bko->bo", x, jnp.broadcast_to(w, (4, 8, 8))))  # noqa: E731
    assert fst_jax.report(batched, CFG)(jnp.ones((8, 8), BF), jnp.ones((4, 8), BF)).rows[0].backends[0] == "xla"


def test_auto_is_xla_without_a_gpu_and_says_why():
    p, x = make()
    rows = fst_jax.report(loss, CFG.replace(backend="auto"))(p, x).rows
    assert all(r.backends[0] == "xla" and r.backend_note.startswith("auto: no GPU") for r in rows)


def test_training_step_lowers_for_cuda_to_the_custom_calls():
    """Forward (3) and grad-input (2: the first layer's input is data) products are cuSPARSELt
    calls; the only dot_generals left are the compact grad-weight products (for the checkerboard,
    one GEMM per layer batched over the two parities)."""
    p, x = make()
    text = lower_for_cuda(jax.grad(fst_jax.sparsify(loss, CFG)), p, x)
    calls = custom_calls(text)
    assert calls.count("fst_cslt_matmul") == 5 and calls.count("fst_cslt_compress") == 5
    assert text.count("stablehlo.dot_general") == 3  # one batched GEMM over both parities per layer
    text = lower_for_cuda(jax.grad(fst_jax.sparsify(loss, CFG.replace(backend="xla"))), p, x)
    assert "fst_cslt" not in text


@pytest.mark.parametrize("mode", ["compact", "masked"])
def test_values_equal_the_xla_path_emulated(mode):
    assert_emulated_equals_xla(loss, CFG.replace(mode=mode), *make())


def test_weight_on_the_lhs_emulated():
    cfg = CFG.replace(restore_scale=0.0)
    f = lambda w, x: jnp.sum(jnp.tanh(jnp.einsum("ok,bk->ob", w, x)).astype(jnp.float32))  # noqa: E731
    w = jnp.asarray(np.random.default_rng(1).normal(size=(16, 32)) / 6, BF)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 32)), BF)
    assert fst_jax.report(f, cfg)(w, x).rows[0].backends[0] == "cusparselt"
    assert_emulated_equals_xla(f, cfg, w, x)


def test_data_parallel_step_lowers_without_gathering_the_batch():
    """Batch sharded over 8 devices, weights replicated: the custom calls are partition-aware."""
    mesh = Mesh(np.array(jax.devices("cpu")[:8]), ("data",))
    p, x = make()
    x = jnp.concatenate([x] * 4)  # 8 sequences: one per device
    xs, ps = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    step = jax.jit(jax.grad(fst_jax.sparsify(loss, CFG)), in_shardings=(ps, xs))
    text = step.trace(jax.device_put(p, ps), jax.device_put(x, xs)).lower(lowering_platforms=("cuda",)).as_text()
    assert "fst_cslt_matmul" in text or "CustomSPMDPartitioning" in text
    assert "all_gather" not in text and "all-gather" not in text


def test_running_without_a_gpu_raises_a_clear_error():
    p, x = make()
    with pytest.raises(RuntimeError, match="cuSPARSELt"):
        jax.jit(jax.grad(fst_jax.sparsify(loss, CFG)))(p, x)


MVUE = CFG.replace(grad_weight="mvue")


def test_mvue_grad_weight_runs_on_the_sparse_tensor_cores():
    """With ``grad_weight="mvue"`` the sampled ``dY`` (2:4 along the tokens) is the sparse operand
    of the grad-weight product: all three products on cuSPARSELt, half the FLOPs executed."""
    p, x = make()
    rep = fst_jax.report(loss, MVUE)(p, x)
    assert [r.backends for r in rep.rows] == [("cusparselt", "none", "cusparselt")] + [("cusparselt",) * 3] * 2
    assert rep.flops_executed == rep.flops_fst
    assert "sparse dY" in rep.rows[0].grad_weight
    sparse_loss = fst_jax.sparsify(loss, MVUE)
    text = lower_for_cuda(jax.grad(lambda p, x, k: sparse_loss(p, x, fst_key=k)), p, x, jax.random.key(0))
    calls = custom_calls(text)
    assert calls.count("fst_cslt_matmul") == 5 + 3 and calls.count("fst_cslt_compress") == 5 + 3
    assert "stablehlo.dot_general" not in text  # no GEMM left on XLA


@pytest.mark.parametrize("weight_on_lhs", [False, True])
def test_mvue_grad_weight_emulated_equals_xla(weight_on_lhs):
    """The same sample, the same gradient: the sparse-operand product equals XLA's dense GEMM on
    the sampled dY (both layouts of the weight: [K, O] and [O, K] as stored, and on the lhs)."""
    if weight_on_lhs:
        f = lambda w, x: jnp.sum(jnp.tanh(jnp.einsum("ok,btk->obt", w, x)).astype(jnp.float32))  # noqa: E731
        args = (jnp.asarray(np.random.default_rng(1).normal(size=(16, 32)) / 6, BF),
                jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 32)), BF))
    else:
        f, args = loss, make()
    key = jax.random.key(3)
    step = lambda c: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda *a: fst_jax.sparsify(f, c)(*a, fst_key=key), argnums=(0, 1)))
    want = step(MVUE.replace(backend="xla"))(*args)
    with emulated():
        got = step(MVUE)(*args)
    assert_close(got, want)


def test_mvue_with_tokens_not_innermost_stays_on_xla_with_the_reason():
    """Tokens on the outer free axis ([T, B, D] with token_axis=0): the sample's groups of 4 are not
    groups of the flattened rows, so the grad-weight product runs on XLA and the report says why."""
    cfg = MVUE.replace(token_axis=0)
    f = lambda w, x: jnp.sum(jnp.tanh(x @ w).astype(jnp.float32))  # noqa: E731
    w, x = jnp.ones((32, 16), BF), jnp.ones((8, 2, 32), BF)
    row = fst_jax.report(f, cfg)(w, x).rows[0]
    assert row.backends == ("cusparselt", "none", "xla")
    assert "innermost" in row.backend_note
