"""2:4 sparse matmuls on NVIDIA sparse tensor cores through cuSPARSELt (XLA FFI custom calls).

* :func:`sparse_matmul` ``(w, b)``: ``w [N, K]`` 2:4 along ``K`` times a dense ``b [K, M]``.
* :func:`matmul` ``(lhs, rhs, sparse=..., transpose_lhs=..., transpose_rhs=...)``: either
  operand structured, either transposed, without copies (what ``FSTConfig(backend="cusparselt")``
  calls for the forward and grad-input products).
* :func:`eligible` says whether an operand pair is one the ops take (dtypes, shapes);
  :func:`available` says whether the ops can run here; :func:`build` / :func:`load` build the
  C++ extension (``python -m fst_jax.cusparselt build``) and register its FFI targets for CUDA.

Each op is a compress custom call (``cusparseLtSpMMACompress2``) followed by a matmul custom call
(``cusparseLtMatmul``), float16 and bfloat16 only, float32 accumulation. The extension is built
from source on the user's machine (g++, the CUDA toolkit's headers, ``jax.ffi.include_dir()`` and
the ``nvidia-cusparselt-cu13`` wheel: ``pip install fst-jax[cusparselt]``) and cached by a hash of
its source and versions. Functions that call the ops lower for CUDA on any machine; they run only
on an NVIDIA GPU of compute capability 8.x or 9.x.
"""

from __future__ import annotations

from pathlib import Path

import jax

from fst_jax.cusparselt import _build, _ops
from fst_jax.cusparselt._build import BuildError
from fst_jax.cusparselt._ops import (  # noqa: F401 - the private names are for tests
    NO_GPU_MESSAGE,
    _matmul_reference,
    _reference,
    compressed_size,
    debug,
    eligible,
    matmul,
    plan_cache_stats,
    sparse_matmul,
)

__all__ = [
    "BuildError",
    "available",
    "build",
    "debug",
    "eligible",
    "load",
    "matmul",
    "plan_cache_stats",
    "sparse_matmul",
]

#: Compute capabilities whose sparse tensor cores cuSPARSELt's 2:4 kernels target here.
SUPPORTED_MAJOR_CC = (8, 9)


def build(*, force: bool = False, verbose: bool = False) -> Path:
    """Builds the C++ extension, or finds it in the cache, and returns the library's path.

    Needs a C++ compiler, the CUDA toolkit's headers and cuSPARSELt (see
    :mod:`fst_jax.cusparselt._build`); no GPU. The library is cached in ``$FST_JAX_CACHE``
    (default ``~/.cache/fst_jax``) by a hash of the source, the jax, CUDA and cuSPARSELt versions
    and the compiler, so a second call returns at once. Same as
    ``python -m fst_jax.cusparselt build``.

    Args:
      force: rebuild even when the cache has the library.
      verbose: print the compiler command.

    Returns:
      The path of the shared library.

    Raises:
      BuildError: naming what is missing (no compiler, no CUDA headers, no cuSPARSELt, a CUDA
        major version that differs from jax's GPU plugin), or with the compiler's errors.

    Example:
      >>> from fst_jax import cusparselt
      >>> try:
      ...     path = cusparselt.build()          # seconds the first time, then cached
      ... except cusparselt.BuildError as e:     # e.g. no CUDA toolkit on this machine
      ...     path = None
    """
    return _build.build(force=force, verbose=verbose)


def load(*, build_if_missing: bool = True) -> Path:
    """Loads the extension (building it first if asked and needed) and registers its FFI targets.

    The targets (``fst_cslt_compress``, ``fst_cslt_matmul``) are registered with
    ``jax.ffi.register_ffi_target(..., platform="CUDA")``; this works on a CPU-only jaxlib too,
    so functions calling the ops can be lowered (and, with a GPU, run). The ops call this
    themselves the first time they are traced with a GPU present.

    Args:
      build_if_missing: build the extension when the cache does not have it.

    Returns:
      The path of the loaded library.

    Raises:
      BuildError: when the library is missing (and not built) or cannot be loaded.

    Example:
      >>> from fst_jax import cusparselt
      >>> try:
      ...     path = cusparselt.load()           # works without a GPU: lowering needs no device
      ... except cusparselt.BuildError:          # no compiler, CUDA headers or cuSPARSELt here
      ...     path = None
    """
    path = _build.build() if build_if_missing else _build.library_path()
    jax.devices()  # initialize jax's backends first: its CUDA runtime is the one that gets loaded
    lib = _build.load_library(path)
    _ops.register(lib)
    return path


def available() -> tuple[bool, str]:
    """Whether the cuSPARSELt ops can run here, and why not.

    True when jax has a CUDA GPU of compute capability 8.x or 9.x (every GPU of the process),
    and the extension is already built (in the cache) and loads. Never starts a build: call
    :func:`build` (or ``python -m fst_jax.cusparselt build``) first. When True, the targets are
    registered.

    Returns:
      ``(ok, reason)``: ``reason`` is ``"ok"`` or says what is missing.

    Example:
      >>> from fst_jax import cusparselt
      >>> ok, reason = cusparselt.available()
      >>> ok or "GPU" in reason or "built" in reason or "cuSPARSELt" in reason
      True
    """
    gpus = _ops._gpus()
    if not gpus:
        return False, f"no CUDA GPU (jax backend: {jax.default_backend()})"
    for d in gpus:
        cc = getattr(d, "compute_capability", None)
        try:
            major = int(str(cc).split(".")[0])
        except ValueError:
            return False, f"cannot read the compute capability of {d} ({cc!r})"
        if major not in SUPPORTED_MAJOR_CC:
            return False, (f"{d.device_kind} has compute capability {cc}; cuSPARSELt's 2:4 "
                           "kernels are used on 8.x and 9.x")
    if _build.loaded_library() is not None:  # loaded earlier in this process
        _ops.register(_build.loaded_library())
        return True, "ok"
    try:
        path = _build.library_path()
        if not path.exists():
            return False, ("the cuSPARSELt extension is not built; run `python -m "
                           "fst_jax.cusparselt build`")
        _ops.register(_build.load_library(path))
    except BuildError as e:
        return False, str(e)
    return True, "ok"
