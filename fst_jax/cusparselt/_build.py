"""Builds, caches and loads the cuSPARSELt XLA FFI extension (``cusparselt_ffi.cc``).

What a build needs, and where it is looked for (the first that exists wins):

* a C++17 compiler: ``$CXX``, else ``g++``, else ``c++``, else ``clang++`` on ``PATH``;
* the CUDA toolkit's headers and ``libcudart``: ``$CUDA_HOME`` (or ``$CUDA_PATH``), else
  ``/usr/local/cuda``, else the directory above the ``bin/`` that holds ``nvcc`` on ``PATH``;
* the XLA FFI headers: ``jax.ffi.include_dir()``;
* cuSPARSELt's header and ``libcusparseLt.so.0``: ``$CUSPARSELT_HOME`` (``include/`` and
  ``lib/``), else the ``nvidia-cusparselt-cu13`` wheel (``nvidia/cu13``) or the
  ``nvidia-cusparselt-cu12`` wheel (``nvidia/cusparselt``) in the current environment.

The library is cached in ``$FST_JAX_CACHE`` (default ``~/.cache/fst_jax``) under
``cusparselt/<key>/``, where the key hashes the source, the jax and jaxlib versions, the CUDA
toolkit version, the cuSPARSELt header version, the compiler and the flags: a second build with
the same inputs returns at once. Builds are serialized by a file lock, and the library is written
atomically.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import functools
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax

SOURCE = Path(__file__).with_name("cusparselt_ffi.cc")
LIB_NAME = "libfst_cusparselt.so"

#: (Python name, FFI target / exported symbol) of the handlers the library exports.
TARGETS = {"compress": "fst_cslt_compress", "matmul": "fst_cslt_matmul"}

# Warnings on for this project's source; the CUDA, XLA FFI and cuSPARSELt headers are system headers
# (-isystem), whose own warnings are not ours to fix.
_CXXFLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Wextra")


class BuildError(RuntimeError):
    """The cuSPARSELt extension cannot be built or loaded; the message says what is missing."""


@dataclasses.dataclass(frozen=True)
class Toolchain:
    """Everything a build uses, found by :func:`find_toolchain`."""

    cxx: str
    cuda_home: Path
    cuda_version: tuple[int, int]
    cuda_lib: Path
    ffi_include: Path
    cusparselt_include: Path
    cusparselt_lib: Path
    cusparselt_version: str

    def key(self) -> str:
        """The cache key: a hash of the source and of every version and flag of the build."""
        h = hashlib.sha256()
        h.update(SOURCE.read_bytes())
        for part in (
            jax.__version__,
            _jaxlib_version(),
            "cuda %d.%d" % self.cuda_version,
            self.cusparselt_version,
            self.cxx,
            _compiler_version(self.cxx),
            " ".join(_CXXFLAGS),
            str(self.cusparselt_lib),
            str(self.cuda_lib),
        ):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()[:20]


def cache_dir() -> Path:
    """``$FST_JAX_CACHE/cusparselt``, default ``~/.cache/fst_jax/cusparselt``."""
    root = os.environ.get("FST_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fst_jax"
    )
    return Path(root) / "cusparselt"


def _jaxlib_version() -> str:
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:  # noqa: BLE001
        return "unknown"


@functools.lru_cache(maxsize=None)
def _compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else ""
    except Exception:  # noqa: BLE001
        return ""


def _find_cxx() -> str:
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    for c in candidates:
        path = shutil.which(c)
        if path:
            return path
    raise BuildError(
        "fst_jax.cusparselt: no C++ compiler found (tried "
        + ", ".join(candidates)
        + " on PATH); install g++ (e.g. `apt-get install g++`) or set CXX"
    )


def _find_cuda_home() -> Path:
    tried = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            tried.append(f"${var}={os.environ[var]}")
            p = Path(os.environ[var])
            if (p / "include" / "cuda_runtime_api.h").exists():
                return p
    tried.append("/usr/local/cuda")
    if Path("/usr/local/cuda/include/cuda_runtime_api.h").exists():
        return Path("/usr/local/cuda")
    nvcc = shutil.which("nvcc")
    if nvcc:
        for cand in (Path(nvcc).resolve().parent.parent, Path(nvcc).parent.parent):
            tried.append(str(cand))
            if (cand / "include" / "cuda_runtime_api.h").exists():
                return cand
        # /usr/local/bin/nvcc may be a wrapper script: read the path it calls
        try:
            text = Path(nvcc).read_text(errors="ignore")[:4096]
            m = re.search(r"(/\S+)/bin/nvcc", text)
            if m and (Path(m[1]) / "include" / "cuda_runtime_api.h").exists():
                return Path(m[1])
        except OSError:
            pass
    else:
        tried.append("nvcc on PATH (not found)")
    raise BuildError(
        "fst_jax.cusparselt: no CUDA toolkit headers found (cuda_runtime_api.h; tried "
        + ", ".join(tried)
        + "); install the CUDA toolkit or set CUDA_HOME"
    )


def _cuda_version(cuda_home: Path) -> tuple[int, int]:
    text = (cuda_home / "include" / "cuda_runtime_api.h").read_text(errors="ignore")
    m = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", text)
    if not m:
        raise BuildError(f"fst_jax.cusparselt: cannot read CUDART_VERSION from {cuda_home}/include")
    v = int(m[1])
    return v // 1000, (v % 1000) // 10


def _cuda_lib(cuda_home: Path) -> Path:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        p = cuda_home / sub
        if any(p.glob("libcudart.so*")):
            return p
    raise BuildError(f"fst_jax.cusparselt: no libcudart.so under {cuda_home} (lib64/ or lib/)")


def _find_cusparselt(cuda_major: int) -> tuple[Path, Path]:
    """(include dir, lib dir) of cuSPARSELt."""
    tried = []
    if os.environ.get("CUSPARSELT_HOME"):
        root = Path(os.environ["CUSPARSELT_HOME"])
        tried.append(f"$CUSPARSELT_HOME={root}")
        for lib in (root / "lib", root / "lib64"):
            if (root / "include" / "cusparseLt.h").exists() and any(lib.glob("libcusparseLt.so*")):
                return root / "include", lib
    roots = []
    for entry in sys.path:
        if entry and Path(entry, "nvidia").is_dir():
            roots.append(Path(entry, "nvidia"))
    subdirs = [f"cu{cuda_major}", "cusparselt"]
    for root in dict.fromkeys(roots):
        for sub in subdirs:
            inc, lib = root / sub / "include", root / sub / "lib"
            tried.append(str(root / sub))
            if (inc / "cusparseLt.h").exists() and (lib / "libcusparseLt.so.0").exists():
                return inc, lib
    raise BuildError(
        "fst_jax.cusparselt: cuSPARSELt not found (looked for include/cusparseLt.h and "
        f"lib/libcusparseLt.so.0 in {', '.join(tried) or 'no nvidia/ package directory'}); "
        f"install it with `pip install nvidia-cusparselt-cu{cuda_major}` "
        "(or `pip install fst-jax[cusparselt]`), or set CUSPARSELT_HOME"
    )


def _cusparselt_version(include: Path) -> str:
    text = (include / "cusparseLt.h").read_text(errors="ignore")
    parts = [re.search(rf"#define\s+CUSPARSELT_VER_{p}\s+(\d+)", text) for p in
             ("MAJOR", "MINOR", "PATCH", "BUILD")]
    return ".".join(m[1] if m else "?" for m in parts)


def jaxlib_cuda_major() -> int | None:
    """The CUDA major version of the installed jax CUDA plugin (``jax-cuda13-plugin``...), if any."""
    for major in (13, 12, 11):
        for dist in (f"jax-cuda{major}-plugin", f"jax_cuda{major}_plugin", f"jax-cuda{major}-pjrt"):
            try:
                importlib.metadata.version(dist)
                return major
            except importlib.metadata.PackageNotFoundError:
                continue
    return None


def find_toolchain() -> Toolchain:
    """Finds the compiler, CUDA, the FFI headers and cuSPARSELt; raises :class:`BuildError`."""
    cxx = _find_cxx()
    cuda_home = _find_cuda_home()
    cuda_version = _cuda_version(cuda_home)
    plugin_major = jaxlib_cuda_major()
    if plugin_major is not None and plugin_major != cuda_version[0]:
        raise BuildError(
            f"fst_jax.cusparselt: the CUDA toolkit at {cuda_home} is CUDA {cuda_version[0]}, but "
            f"jax's GPU plugin is built for CUDA {plugin_major}; point CUDA_HOME at a CUDA "
            f"{plugin_major} toolkit (and install nvidia-cusparselt-cu{plugin_major})"
        )
    ffi_include = Path(jax.ffi.include_dir())
    if not (ffi_include / "xla" / "ffi" / "api" / "ffi.h").exists():
        raise BuildError(f"fst_jax.cusparselt: XLA FFI headers missing under {ffi_include}")
    inc, lib = _find_cusparselt(cuda_version[0])
    return Toolchain(
        cxx=cxx,
        cuda_home=cuda_home,
        cuda_version=cuda_version,
        cuda_lib=_cuda_lib(cuda_home),
        ffi_include=ffi_include,
        cusparselt_include=inc,
        cusparselt_lib=lib,
        cusparselt_version=_cusparselt_version(inc),
    )


def compile_command(tc: Toolchain, output: Path) -> list[str]:
    """The compiler command line that builds the library at ``output``."""
    return [
        tc.cxx,
        *_CXXFLAGS,
        "-isystem", str(tc.cuda_home / "include"),
        "-isystem", str(tc.ffi_include),
        "-isystem", str(tc.cusparselt_include),
        str(SOURCE),
        "-o",
        str(output),
        f"-L{tc.cusparselt_lib}",
        "-l:libcusparseLt.so.0",
        f"-L{tc.cuda_lib}",
        "-lcudart",
        f"-Wl,-rpath,{tc.cusparselt_lib}",
        f"-Wl,-rpath,{tc.cuda_lib}",
    ]


def library_path(tc: Toolchain | None = None) -> Path:
    """Where the library for the current toolchain is (or would be) cached."""
    tc = tc or find_toolchain()
    return cache_dir() / tc.key() / LIB_NAME


def build(*, force: bool = False, verbose: bool = False) -> Path:
    """Builds the extension (or finds it in the cache) and returns the library's path.

    Raises:
      BuildError: naming what is missing (compiler, CUDA headers, cuSPARSELt, a CUDA version
        mismatch), or with the compiler's output when compilation fails.
    """
    tc = find_toolchain()
    out = library_path(tc)
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if out.exists() and not force:
                return out
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
            cmd = compile_command(tc, Path(tmp))
            if verbose:
                print(" ".join(cmd), file=sys.stderr)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                os.unlink(tmp)
                raise BuildError(
                    "fst_jax.cusparselt: compiling the extension failed:\n$ "
                    + " ".join(cmd) + "\n" + proc.stderr[-6000:]
                )
            os.replace(tmp, out)
            (out.parent / "build.txt").write_text(
                " ".join(cmd) + f"\n# {time.perf_counter() - t0:.1f} s, jax {jax.__version__}, "
                f"CUDA {tc.cuda_version[0]}.{tc.cuda_version[1]}, cuSPARSELt {tc.cusparselt_version}\n"
            )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


_lock = threading.Lock()
_loaded: dict[str, object] = {}


def load_library(path: Path | None = None) -> ctypes.CDLL:
    """Loads the library with ctypes (cached per process); does not build it."""
    with _lock:
        if "lib" in _loaded:
            return _loaded["lib"]  # type: ignore[return-value]
        if path is None:
            path = library_path()
        if not Path(path).exists():
            raise BuildError(
                f"fst_jax.cusparselt: the extension is not built ({path} does not exist); run "
                "`python -m fst_jax.cusparselt build` or call fst_jax.cusparselt.build()"
            )
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise BuildError(f"fst_jax.cusparselt: cannot load {path}: {e}") from e
        lib.fst_cslt_compressed_size.restype = ctypes.c_int64
        lib.fst_cslt_compressed_size.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                                                 ctypes.c_int]
        lib.fst_cslt_counters.argtypes = [ctypes.POINTER(ctypes.c_int64)]
        _loaded["lib"] = lib
        _loaded["path"] = Path(path)
        return lib


def loaded_library() -> ctypes.CDLL | None:
    """The library if this process loaded it, else ``None``."""
    return _loaded.get("lib")  # type: ignore[return-value]
