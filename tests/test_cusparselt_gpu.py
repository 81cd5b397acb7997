"""The cuSPARSELt ops on a GPU: values, layouts, vmap/scan, poisoned outputs, plan cache.

Runs only where jax has an NVIDIA GPU of compute capability 8.x or 9.x (``scripts/gpu_check.sh``
runs it with ``JAX_PLATFORMS=cuda,cpu``); skipped elsewhere with the reason. Every call here is
traced inside ``cusparselt.debug(poison=True)``: the handlers fill their outputs with NaN before
cuSPARSELt writes them, so an element left unwritten fails the comparisons.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fst_jax import cusparselt
from fst_jax.cusparselt import _ops
from cusparselt_helpers import LAYOUTS, operands


def _gpu_reason() -> str | None:
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return "no CUDA GPU (these tests run on the GPU machine: scripts/gpu_check.sh)"
    cc = str(getattr(gpus[0], "compute_capability", "?"))
    if cc.split(".")[0] not in ("8", "9"):
        return f"{gpus[0].device_kind} has compute capability {cc}; cuSPARSELt's 2:4 path needs 8.x/9.x"
    return None


pytestmark = pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))

SHAPES = [(64, 128, 32), (128, 64, 256), (48, 80, 112), (20, 36, 12), (1000, 520, 72)]
TOL = {jnp.bfloat16: 2e-2, jnp.float16: 4e-3}


@pytest.fixture(scope="module", autouse=True)
def loaded():
    cusparselt.load()
    ok, reason = cusparselt.available()
    assert ok, reason


def close(got, want, dtype, k):
    tol = TOL[dtype] * math.sqrt(k)
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all(), "NaN in the output: an element was not written (poisoned)"
    np.testing.assert_allclose(got, want, atol=tol, rtol=TOL[dtype])


def call(fn):
    with cusparselt.debug(poison=True):
        return jax.jit(fn)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("mkn", SHAPES)
def test_sparse_matmul_values(dtype, mkn):
    w, b = operands("lhs", False, False, *mkn, dtype)
    got = call(cusparselt.sparse_matmul)(w, b)
    close(got, cusparselt._reference(w, b), dtype, mkn[1])
    close(got, jax.jit(jnp.dot)(w, b), dtype, mkn[1])  # XLA's masked path on the same GPU


@pytest.mark.parametrize("sparse,tl,tr", LAYOUTS)
@pytest.mark.parametrize("mkn", [(128, 64, 96), (40, 52, 24)])
def test_layouts(sparse, tl, tr, mkn):
    lhs, rhs = operands(sparse, tl, tr, *mkn)
    kw = dict(sparse=sparse, transpose_lhs=tl, transpose_rhs=tr)
    got = call(lambda a, b: cusparselt.matmul(a, b, **kw))(lhs, rhs)
    close(got, cusparselt._matmul_reference(lhs, rhs, **kw), jnp.bfloat16, mkn[1])


def test_deterministic_and_bitwise_repeatable():
    w, b = operands("lhs", False, False, 256, 512, 128)
    f = call(cusparselt.sparse_matmul)
    first = np.asarray(f(w, b))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(f(w, b)), first)


@pytest.mark.parametrize("sparse,tl,tr", [("rhs", False, False), ("rhs", False, True),
                                          ("lhs", False, False), ("lhs", True, True)])
def test_vmap_folds(sparse, tl, tr):
    lhs, rhs = operands(sparse, tl, tr, 32, 64, 48, batch=(4,))
    kw = dict(sparse=sparse, transpose_lhs=tl, transpose_rhs=tr)
    axes = (0, None) if sparse == "rhs" else (None, 0)
    args = (lhs, rhs[0]) if sparse == "rhs" else (lhs[0], rhs)
    before = cusparselt.plan_cache_stats()["compress_calls"]
    got = call(jax.vmap(lambda a, b: cusparselt.matmul(a, b, **kw), axes))(*args)
    got.block_until_ready()
    assert cusparselt.plan_cache_stats()["compress_calls"] == before + 1  # one compression
    want = jax.vmap(lambda a, b: cusparselt._matmul_reference(a, b, **kw), axes)(*args)
    close(got, want, jnp.bfloat16, 64)
    both = call(jax.vmap(lambda a, b: cusparselt.matmul(a, b, **kw)))(lhs, rhs)
    close(both, jax.vmap(lambda a, b: cusparselt._matmul_reference(a, b, **kw))(lhs, rhs),
          jnp.bfloat16, 64)


def test_scan_and_remat():
    xs, ws = operands("rhs", False, False, 64, 128, 32, batch=(3,))

    def body(c, xw):
        y = jax.checkpoint(lambda x, w: cusparselt.matmul(x, w, sparse="rhs"))(*xw)
        return c + jnp.sum(y.astype(jnp.float32)), y

    total, ys = call(lambda a, b: jax.lax.scan(body, 0.0, (a, b)))(xs, ws)
    want = jax.vmap(lambda a, b: cusparselt._matmul_reference(a, b, sparse="rhs"))(xs, ws)
    close(ys, want, jnp.bfloat16, 128)


def test_plan_cache_is_reused_across_calls_and_functions():
    w, b = operands("lhs", False, False, 96, 160, 224)
    f = call(cusparselt.sparse_matmul)
    f(w, b).block_until_ready()
    s1 = cusparselt.plan_cache_stats()
    for _ in range(3):
        f(w, b).block_until_ready()
    g = call(lambda w, b: cusparselt.sparse_matmul(w, b) * 1)  # another jit, same shapes
    g(w, b).block_until_ready()
    s2 = cusparselt.plan_cache_stats()
    assert s2["plan_inits"] == s1["plan_inits"], (s1, s2)
    assert s2["plan_hits"] >= s1["plan_hits"] + 4 and s2["matmul_calls"] == s1["matmul_calls"] + 4
    assert s2["handle_inits"] == 1
    f(*operands("lhs", False, False, 96, 160, 256)).block_until_ready()  # a new shape: one plan
    assert cusparselt.plan_cache_stats()["plan_inits"] == s2["plan_inits"] + 1


def test_algorithm_search_runs_and_is_checked():
    w, b = operands("lhs", False, False, 512, 512, 512)
    got = call(lambda w, b: cusparselt.sparse_matmul(w, b, algorithm="search"))(w, b)
    close(got, cusparselt._reference(w, b), jnp.bfloat16, 512)
    assert cusparselt.plan_cache_stats()["searches"] >= 1


def test_prune_check_rejects_a_dense_operand():
    w, b = operands("lhs", False, False, 64, 64, 64)
    with cusparselt.debug(poison=True, check=True):
        ok = jax.jit(cusparselt.sparse_matmul)(w, b)
        close(ok, cusparselt._reference(w, b), jnp.bfloat16, 64)
        dense_w = jnp.ones_like(w)
        with pytest.raises(Exception, match="not 2:4"):
            jax.jit(lambda w, b: cusparselt.sparse_matmul(w, b) + 0)(dense_w, b).block_until_ready()


def test_compressed_capacity_covers_the_library_size():
    for n, k in ((16, 16), (64, 128), (4096, 4096), (12288, 4096), (1008, 528)):
        for dtype in (jnp.bfloat16, jnp.float16):
            for row in (True, False):
                size = _ops.compressed_size(n, k, dtype, row_major=row)
                assert 0 < size <= _ops._compressed_capacity(n, k, dtype), (n, k, dtype, row, size)
