"""The cuSPARSELt backend on a machine without a GPU (what CI runs).

Builds the C++ extension against the ``nvidia-cusparselt-cu13`` wheel (once per session, then
cached), loads it with ctypes, registers its FFI targets on the CPU jaxlib, lowers functions that
call the ops for CUDA (single device and 8 simulated devices, sharded) and checks the custom
calls in the text; runs a pure-jnp emulation of the two custom calls (the same buffers, matrix
orders and padding) against the reference over every layout, under vmap and scan; and checks the
error when the ops run without a GPU. GPU-only tests: ``tests/test_cusparselt_gpu.py``.
"""

from __future__ import annotations

import ctypes
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fst_jax import cusparselt
from fst_jax._compat import lower_for_cuda
from fst_jax._masks import mask_2to4
from fst_jax.cusparselt import _build, _ops
from cusparselt_helpers import LAYOUTS, custom_calls, emulated, operands

COMPRESS, MATMUL = _build.TARGETS["compress"], _build.TARGETS["matmul"]
HAS_GPU = jax.default_backend() == "gpu"
cpu_only = pytest.mark.skipif(HAS_GPU, reason="checks the behaviour without a GPU")


def _toolchain_reason() -> str | None:
    try:
        _build.find_toolchain()
    except _build.BuildError as e:
        return str(e)
    return None


_MISSING = _toolchain_reason()
needs_toolchain = pytest.mark.skipif(
    _MISSING is not None and not os.environ.get("CI"),
    reason=f"cannot build the cuSPARSELt extension here: {_MISSING}",
)


@pytest.fixture(scope="session")
def library() -> tuple[str, float]:
    """(path, seconds): the extension, built (or found in the cache) once per session."""
    t0 = time.perf_counter()
    path = cusparselt.build()
    return str(path), time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# Build, load, register


@needs_toolchain
def test_extension_builds_and_is_cached(library):
    path, seconds = library
    assert os.path.exists(path) and path.startswith(str(_build.cache_dir()))
    t0 = time.perf_counter()
    assert str(cusparselt.build()) == path  # cached: no compiler run
    assert time.perf_counter() - t0 < 5
    print(f"build (or cache hit) took {seconds:.1f} s")


@needs_toolchain
def test_cache_key_covers_source_and_versions(library, monkeypatch, tmp_path):
    tc = _build.find_toolchain()
    key = tc.key()
    src = tmp_path / "x.cc"
    src.write_bytes(_build.SOURCE.read_bytes() + b"\n// changed\n")
    monkeypatch.setattr(_build, "SOURCE", src)
    assert tc.key() != key
    monkeypatch.setattr(jax, "__version__", "0.0.0")
    assert len({tc.key(), key}) == 2


@needs_toolchain
def test_library_loads_with_ctypes(library):
    lib = ctypes.CDLL(library[0])
    for symbol in (COMPRESS, MATMUL, "fst_cslt_counters", "fst_cslt_compressed_size"):
        assert hasattr(lib, symbol), symbol
    # cuSPARSELt itself loaded (no driver needed): its version matches the header it was built with
    major, minor, patch, _ = _build.find_toolchain().cusparselt_version.split(".")
    assert lib.fst_cslt_library_version() == int(major) * 1000000 + int(minor) * 100 + int(patch)
    lib.fst_cslt_compressed_size.restype = ctypes.c_int64
    assert lib.fst_cslt_compressed_size(64, 64, 0, 1) == -1  # no GPU: the handle cannot start


@needs_toolchain
def test_load_registers_the_targets_on_the_cpu_jaxlib(library):
    assert str(cusparselt.load(build_if_missing=False)) == library[0]
    cusparselt.load(build_if_missing=False)  # idempotent
    if not HAS_GPU:
        assert cusparselt.plan_cache_stats() == dict.fromkeys(cusparselt.plan_cache_stats(), 0)


@cpu_only
def test_available_is_false_without_a_gpu_and_never_builds(monkeypatch):
    def no_build(**_):
        raise AssertionError("available() must not build")

    monkeypatch.setattr(_build, "build", no_build)
    ok, reason = cusparselt.available()
    assert not ok and "GPU" in reason


def test_build_errors_name_what_is_missing(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(_build.BuildError, match="no C\\+\\+ compiler"):
        _build.find_toolchain()
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(_build, "jaxlib_cuda_major", lambda: 99)
    if _MISSING is None:
        with pytest.raises(_build.BuildError, match="CUDA 99"):
            _build.find_toolchain()
    monkeypatch.setattr(_build.sys, "path", [])
    monkeypatch.delenv("CUSPARSELT_HOME", raising=False)
    with pytest.raises(_build.BuildError, match="pip install nvidia-cusparselt-cu13"):
        _build._find_cusparselt(13)
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    monkeypatch.setattr(_build.Path, "exists", lambda self: False)
    monkeypatch.setattr(_build.shutil, "which", lambda name: None)
    with pytest.raises(_build.BuildError, match="no CUDA toolkit headers"):
        _build._find_cuda_home()


@needs_toolchain
def test_cli_build(library, capsys):
    from fst_jax.cusparselt.__main__ import main

    assert main(["build"]) == 0
    out = capsys.readouterr().out
    assert library[0] in out and "available: (" in out


# ------------------------------------------------------------------------------------------------
# Lowering for CUDA without a GPU


@pytest.mark.parametrize("sparse,tl,tr", LAYOUTS)
def test_lowers_for_cuda_to_the_custom_calls(sparse, tl, tr):
    lhs, rhs = operands(sparse, tl, tr, 32, 64, 48)
    text = lower_for_cuda(
        lambda a, b: cusparselt.matmul(a, b, sparse=sparse, transpose_lhs=tl, transpose_rhs=tr),
        lhs, rhs)
    assert custom_calls(text) == [COMPRESS, MATMUL]
    assert "dot_general" not in text and "transpose" not in text  # transposes are matrix orders
    row_a, row_b, row_d = _ops._orders(_ops._Params(sparse, tl, tr, 0, False, False, False))
    assert f"row_a = {int(row_a)} : i64" in text and f"row_d = {int(row_d)} : i64" in text


def test_sparse_matmul_lowers_for_cuda_with_padding():
    w, b = operands("lhs", False, False, 20, 36, 10, jnp.float16)  # no dim a multiple of 16
    text = lower_for_cuda(cusparselt.sparse_matmul, w, b)
    assert custom_calls(text) == [COMPRESS, MATMUL]
    assert "dot_general" not in text and "stablehlo.pad" in text
    assert "n = 32 : i64" in text and "k = 48 : i64" in text and "m = 16 : i64" in text


def test_lowers_for_cuda_under_vmap_with_one_compression():
    w, x = operands("rhs", False, False, 64, 32, 48)[::-1]
    xs = jnp.stack([x] * 5)  # [5, 64, 32] tokens x K
    fn = jax.vmap(lambda x: cusparselt.matmul(x, w, sparse="rhs"))
    text = lower_for_cuda(fn, xs)
    assert custom_calls(text) == [COMPRESS, MATMUL]
    assert "m = 320 : i64" in text  # the mapped axis folded into M
    # dense rhs of sparse_matmul mapped: still one call
    wl, b = operands("lhs", False, False, 16, 32, 24)
    text = lower_for_cuda(jax.vmap(lambda b: cusparselt.sparse_matmul(wl, b)), jnp.stack([b] * 3))
    assert custom_calls(text) == [COMPRESS, MATMUL] and "m = 80 : i64" in text  # 72 padded


def test_lowers_for_cuda_under_scan():
    w, x = operands("rhs", False, False, 16, 32, 48)

    def body(c, xi):
        return c, cusparselt.matmul(xi, x, sparse="rhs")

    text = lower_for_cuda(lambda ws: jax.lax.scan(body, 0, ws)[1], jnp.stack([w] * 3))
    assert custom_calls(text) == [COMPRESS, MATMUL]


def test_lowers_for_cuda_sharded_over_8_devices():
    """Data-parallel jit (batch sharded, weight replicated): the ops are partition-aware."""
    assert len(jax.devices("cpu")) >= 8, "conftest sets 8 simulated CPU devices"
    mesh = Mesh(np.array(jax.devices("cpu")[:8]), ("data",))
    xs, ws = NamedSharding(mesh, P("data", None)), NamedSharding(mesh, P())
    x, w = operands("rhs", False, False, 256, 64, 32)
    x, w = jax.device_put(x, xs), jax.device_put(w, ws)
    fn = jax.jit(lambda x, w: cusparselt.matmul(x, w, sparse="rhs"), in_shardings=(xs, ws),
                 out_shardings=xs)
    text = fn.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert "CustomSPMDPartitioning" in text and "dot_general" not in text
    assert "all_gather" not in text and "all-gather" not in text


def test_sharded_jit_runs_per_shard_without_gathering_the_batch():
    """The partitioning rule, compiled on 8 CPU devices with the emulated custom calls."""
    mesh = Mesh(np.array(jax.devices("cpu")[:8]), ("data",))
    xs, ws = NamedSharding(mesh, P("data", None)), NamedSharding(mesh, P())
    x, w = operands("rhs", False, False, 256, 64, 32)
    x, w = jax.device_put(x, xs), jax.device_put(w, ws)
    with emulated():
        fn = jax.jit(lambda x, w: cusparselt.matmul(x, w, sparse="rhs"), in_shardings=(xs, ws),
                     out_shardings=xs)
        hlo = fn.lower(x, w).compile().as_text()
        out = fn(x, w)
    assert "all-gather" not in hlo and "all-reduce" not in hlo
    assert "bf16[32,64]" in hlo  # each device multiplies its own 32 tokens
    assert out.sharding.is_equivalent_to(xs, 2)
    want = cusparselt._matmul_reference(x, w, sparse="rhs")
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(want, np.float32))


def test_shard_map_inlines_the_calls():
    mesh = Mesh(np.array(jax.devices("cpu")[:8]), ("data",))
    x, w = operands("rhs", False, False, 256, 64, 32)
    fn = jax.shard_map(lambda x, w: cusparselt.matmul(x, w, sparse="rhs"), mesh=mesh,
                       in_specs=(P("data"), P()), out_specs=P("data"))
    text = jax.jit(fn).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert custom_calls(text) == [COMPRESS, MATMUL] and "m = 32 : i64" in text


# ------------------------------------------------------------------------------------------------
# Values (reference; emulated custom calls)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_reference_is_the_dense_product(dtype):
    w, b = operands("lhs", False, False, 24, 32, 40, dtype)
    want = jnp.dot(w.astype(jnp.float32), b.astype(jnp.float32)).astype(dtype)
    np.testing.assert_array_equal(np.asarray(cusparselt._reference(w, b)), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(cusparselt._reference(w, b)), np.asarray(w @ b))


@pytest.mark.parametrize("sparse,tl,tr,mkn", [(*layout, (20, 36, 12)) for layout in LAYOUTS]
                         + [("rhs", False, False, (7, 4, 5)), ("lhs", True, False, (16, 32, 48))])
def test_emulated_custom_calls_equal_the_reference(sparse, tl, tr, mkn):
    """The buffers, matrix orders and padding the CUDA path hands to cuSPARSELt, emulated."""
    lhs, rhs = operands(sparse, tl, tr, *mkn)
    kw = dict(sparse=sparse, transpose_lhs=tl, transpose_rhs=tr)
    with emulated():
        got = jax.jit(lambda a, b: cusparselt.matmul(a, b, **kw))(lhs, rhs)
    want = cusparselt._matmul_reference(lhs, rhs, **kw)
    assert got.shape == want.shape == (mkn[0], mkn[2])
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("sparse,tl,tr", LAYOUTS)
def test_emulated_vmap_folds_and_matches(sparse, tl, tr):
    """vmap over the dense operand: folded into M (one call), every layout."""
    lhs, rhs = operands(sparse, tl, tr, 8, 16, 12, batch=(3,))
    kw = dict(sparse=sparse, transpose_lhs=tl, transpose_rhs=tr)
    axes = (0, None) if sparse == "rhs" else (None, 0)
    args = (lhs, rhs[0]) if sparse == "rhs" else (lhs[0], rhs)
    with emulated():
        got = jax.jit(jax.vmap(lambda a, b: cusparselt.matmul(a, b, **kw), axes))(*args)
    want = jax.vmap(lambda a, b: cusparselt._matmul_reference(a, b, **kw), axes)(*args)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_emulated_vmap_of_both_operands_and_nested():
    """A mapped structured operand runs one call per example (lax.map); nested vmaps fold twice."""
    lhs, rhs = operands("rhs", False, True, 8, 16, 12, batch=(3,))
    kw = dict(sparse="rhs", transpose_rhs=True)
    ref = lambda a, b: cusparselt._matmul_reference(a, b, **kw)  # noqa: E731
    with emulated():
        both = jax.jit(jax.vmap(lambda a, b: cusparselt.matmul(a, b, **kw)))(lhs, rhs)
        nested = jax.jit(jax.vmap(jax.vmap(lambda a, b: cusparselt.matmul(a, b, **kw),
                                           (0, None)), (0, None)))(
            jnp.stack([lhs, lhs]), rhs[0])
    np.testing.assert_array_equal(np.asarray(both, np.float32),
                                  np.asarray(jax.vmap(ref)(lhs, rhs), np.float32))
    want = jax.vmap(ref, (0, None))(lhs, rhs[0])
    np.testing.assert_array_equal(np.asarray(nested, np.float32),
                                  np.asarray(jnp.stack([want, want]), np.float32))


def test_emulated_scan_matches():
    lhs, rhs = operands("rhs", False, False, 16, 32, 8, batch=(4,))

    def step(c, ab):
        return c, cusparselt.matmul(*ab, sparse="rhs")

    with emulated():
        got = jax.jit(lambda a, b: jax.lax.scan(step, 0, (a, b))[1])(lhs, rhs)
    want = jax.vmap(lambda a, b: cusparselt._matmul_reference(a, b, sparse="rhs"))(lhs, rhs)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_compressed_capacity_holds_the_compressed_operand():
    for n, k in ((16, 16), (4096, 4096), (100, 36)):
        assert _ops._compressed_capacity(n, k, jnp.bfloat16) >= n * k * 2 * 9 // 16


# ------------------------------------------------------------------------------------------------
# Errors


@cpu_only
def test_running_without_a_gpu_raises_a_clear_error():
    w, b = operands("lhs", False, False, 16, 16, 16)
    with pytest.raises(RuntimeError, match="cuSPARSELt runs only on an NVIDIA GPU.*no CUDA GPU"):
        jax.jit(cusparselt.sparse_matmul)(w, b)
    with pytest.raises(RuntimeError, match="cuSPARSELt runs only on an NVIDIA GPU"):
        cusparselt.sparse_matmul(w, b)


def test_argument_errors():
    w, b = operands("lhs", False, False, 16, 16, 16)
    with pytest.raises(TypeError, match="float16 or both bfloat16"):
        cusparselt.sparse_matmul(w.astype(jnp.float32), b.astype(jnp.float32))
    with pytest.raises(TypeError):
        cusparselt.sparse_matmul(w, b.astype(jnp.float16))
    with pytest.raises(ValueError, match="multiple of 4"):
        cusparselt.sparse_matmul(w[:, :6], b[:6])
    with pytest.raises(ValueError, match="contracting dimensions differ"):
        cusparselt.sparse_matmul(w, b[:8])
    with pytest.raises(ValueError, match="'lhs' or 'rhs'"):
        cusparselt.matmul(w, b, sparse="both")
    with pytest.raises(ValueError, match="algorithm"):
        cusparselt.sparse_matmul(w, b, algorithm=-3)


def test_debug_options_reach_the_custom_calls():
    w, b = operands("lhs", False, False, 16, 16, 16)
    with cusparselt.debug(poison=True, check=True):
        text = lower_for_cuda(lambda w, b: cusparselt.sparse_matmul(w, b, algorithm="search"),
                              w, b)
    assert text.count("poison = 1 : i64") == 2 and "check = 1 : i64" in text
    assert "alg = -1 : i64" in text
    text = lower_for_cuda(cusparselt.sparse_matmul, w, b)
    assert "poison = 0 : i64" in text and "alg = 0 : i64" in text
    f = jax.jit(cusparselt.sparse_matmul)  # one jit object: the options are in its cache key
    plain = f.trace(w, b).lower(lowering_platforms=("cuda",)).as_text()
    with cusparselt.debug(poison=True):
        poisoned = f.trace(w, b).lower(lowering_platforms=("cuda",)).as_text()
    assert "poison = 0 : i64" in plain and "poison = 1 : i64" in poisoned


def test_eligible():
    x = jax.ShapeDtypeStruct((64, 32), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((32, 48), jnp.bfloat16)
    assert cusparselt.eligible(x, w, sparse="rhs") == (True, "ok")
    assert cusparselt.eligible(x, jax.ShapeDtypeStruct((48, 32), jnp.bfloat16), sparse="rhs",
                               transpose_rhs=True)[0]
    assert not cusparselt.eligible(x, w, sparse="rhs", preferred_element_type=jnp.float32)[0]
    f32 = jax.ShapeDtypeStruct((64, 32), jnp.float32)
    ok, reason = cusparselt.eligible(f32, w.update(dtype=jnp.float32), sparse="rhs")
    assert not ok and "float16" in reason
    ok, reason = cusparselt.eligible(jax.ShapeDtypeStruct((64, 6), jnp.bfloat16),
                                     jax.ShapeDtypeStruct((6, 8), jnp.bfloat16), sparse="rhs")
    assert not ok and "multiple of 4" in reason


class _FakeGpu:
    def __init__(self, cc):
        self.compute_capability, self.device_kind = cc, f"fake GPU sm_{cc}"


@needs_toolchain
def test_available_with_a_fake_gpu(library, monkeypatch, tmp_path):
    """available()'s rules, with jax's GPU list replaced: cc 8.x/9.x and a built library."""
    monkeypatch.setattr(_ops, "_gpus", lambda: [_FakeGpu("9.0")])
    assert cusparselt.available() == (True, "ok")
    monkeypatch.setattr(_ops, "_gpus", lambda: [_FakeGpu("9.0"), _FakeGpu("7.5")])
    ok, reason = cusparselt.available()
    assert not ok and "7.5" in reason
    monkeypatch.setattr(_ops, "_gpus", lambda: [_FakeGpu("8.6")])
    monkeypatch.setattr(_build, "_loaded", {})  # as in a fresh process
    monkeypatch.setenv("FST_JAX_CACHE", str(tmp_path))  # nothing built there
    ok, reason = cusparselt.available()
    assert not ok and "not built" in reason and "python -m fst_jax.cusparselt build" in reason
    assert not any(tmp_path.iterdir())  # and it did not build


def _fst_like_linear():
    """The wiring sparsify will use: forward and grad-input on cuSPARSELt inside a custom_vjp."""

    @jax.custom_vjp
    def linear(x, w):
        w_f = jnp.where(mask_2to4(w, axis=0), w, 0)  # 2:4 along K
        return cusparselt.matmul(x, w_f, sparse="rhs")

    def fwd(x, w):
        return linear(x, w), (x, w)

    def bwd(res, dy):
        x, w = res
        w_b = jnp.where(mask_2to4(w, axis=1), w, 0)  # 2:4 along O
        dx = cusparselt.matmul(dy, w_b, sparse="rhs", transpose_rhs=True)
        dw = jnp.dot(x.T, dy, preferred_element_type=jnp.float32).astype(w.dtype)
        return dx, dw

    linear.defvjp(fwd, bwd)
    return linear


def test_a_custom_vjp_training_step_lowers_for_cuda_under_remat_and_vmap():
    linear = _fst_like_linear()
    x = jax.ShapeDtypeStruct((4, 64, 32), jnp.bfloat16)  # [batch, tokens, K]
    w = jax.ShapeDtypeStruct((32, 48), jnp.bfloat16)

    def loss(w, x):
        y = jax.vmap(jax.checkpoint(linear), (0, None))(x, w)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    text = lower_for_cuda(jax.grad(loss, argnums=(0, 1)), w, x)
    calls = custom_calls(text)
    # the forward and the grad-input products, each a compress + matmul
    assert calls.count(COMPRESS) == calls.count(MATMUL) == 2, calls
    assert text.count("dot_general") == 1  # the grad-weight product only
    assert "m = 256 : i64" in text  # the vmapped batch folded into the tokens


def test_a_custom_vjp_training_step_matches_the_reference_emulated():
    linear = _fst_like_linear()
    x, w = operands("rhs", False, False, 64, 32, 48)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((32, 48)), jnp.bfloat16)

    def ref_linear(x, w):
        return jnp.dot(x, jnp.where(mask_2to4(w, axis=0), w, 0),
                       preferred_element_type=jnp.float32).astype(x.dtype)

    with emulated():
        y, pull = jax.vjp(linear, x, w)
        dy = jnp.ones_like(y)
        dx, _ = pull(dy)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref_linear(x, w), np.float32))
    w_b = jnp.where(mask_2to4(w, axis=1), w, 0)
    want_dx = jnp.dot(dy, w_b.T, preferred_element_type=jnp.float32).astype(x.dtype)
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(want_dx, np.float32))


def test_a_data_parallel_training_step_does_not_gather_the_batch():
    """grad of the custom_vjp wiring under a jit sharded over 8 CPU devices (emulated calls)."""
    linear = _fst_like_linear()
    mesh = Mesh(np.array(jax.devices("cpu")[:8]), ("data",))
    xs, ws = NamedSharding(mesh, P("data", None)), NamedSharding(mesh, P())
    x, _ = operands("rhs", False, False, 256, 32, 48)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((32, 48)), jnp.bfloat16)
    x, w = jax.device_put(x, xs), jax.device_put(w, ws)

    def loss(w, x):
        return jnp.sum(linear(x, w).astype(jnp.float32) ** 2)

    with emulated():
        step = jax.jit(jax.grad(loss, argnums=(0, 1)), in_shardings=(ws, xs))
        hlo = step.lower(w, x).compile().as_text()
        dw, dx = step(w, x)
    assert "all-gather" not in hlo  # the grad-weight sum is an all-reduce; tokens stay put
    assert dx.sharding.is_equivalent_to(xs, 2)
