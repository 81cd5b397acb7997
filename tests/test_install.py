"""The lean install: ``pip install fst-jax`` pulls only what the library imports.

The main job, the example models, the notebooks and the benchmarks need flax, optax, scikit-learn,
tqdm, matplotlib and mnist1d: they are the ``examples`` extra, and ``import fst_jax`` imports
none of them (``fst_jax.optax`` is imported on first use).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import fst_jax

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
# The modules that need an extra, and the extra; everything else in fst_jax/ is the library.
EXTRA_MODULES = {"optax.py": "optax", "models.py": "examples", "text.py": "examples", "train": "examples"}
# Import names that differ from the distribution names.
DIST_NAME = {"sklearn": "scikit-learn"}


def _names(requirements: list[str]) -> set[str]:
    """Distribution names (lower case) of PEP 508 requirement strings."""
    return {re.match(r"[A-Za-z0-9_.\-]+", r)[0].lower() for r in requirements}


def _extra(name: str) -> set[str]:
    """The distributions an extra pulls, following ``fst-jax[other]`` references."""
    out = set()
    for req in PYPROJECT["optional-dependencies"][name]:
        if m := re.fullmatch(r"fst-jax\[([\w,\s-]+)\]", req):
            for other in m[1].split(","):
                out |= _extra(other.strip())
        else:
            out |= _names([req])
    return out


def _third_party_imports(paths: list[Path]) -> dict[str, str]:
    """``{top-level module: where}`` of every import in ``paths`` that is neither the standard
    library nor fst_jax (at module level or inside functions)."""
    out = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top not in sys.stdlib_module_names and top != "fst_jax":
                    out.setdefault(top, f"{path.relative_to(ROOT)}:{node.lineno}")
    return out


def _library_files() -> list[Path]:
    pkg = ROOT / "fst_jax"
    return [
        p for p in sorted(pkg.rglob("*.py"))
        if p.relative_to(pkg).parts[0] not in EXTRA_MODULES
    ]


def test_import_fst_jax_imports_neither_optax_nor_flax() -> None:
    """``import fst_jax`` in a fresh interpreter leaves optax and flax (and the main job's other
    dependencies) unimported."""
    code = (
        "import fst_jax, sys; "
        "assert 'optax' not in sys.modules and 'flax' not in sys.modules, 'optax/flax imported'; "
        "bad = {'sklearn', 'tqdm', 'matplotlib', 'mnist1d'} & set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_fst_jax_optax_is_imported_on_first_use() -> None:
    """``fst_jax.optax.sr_ste`` works as an attribute and as ``from fst_jax import optax``."""
    code = (
        "import sys, fst_jax; assert 'fst_jax.optax' not in sys.modules; "
        "f = fst_jax.optax.sr_ste; assert 'optax' in sys.modules; "
        "from fst_jax import optax as o; assert o.sr_ste is f; "
        "import fst_jax.optax; assert fst_jax.optax is o"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    assert callable(fst_jax.optax.sr_ste)


def test_dependencies_are_what_the_library_imports() -> None:
    """The required dependencies are jax and numpy, and they cover every third-party import of
    the library's modules (everything but fst_jax.optax, fst_jax.models and fst_jax.train)."""
    required = _names(PYPROJECT["dependencies"])
    assert required == {"jax", "numpy"}
    imports = _third_party_imports(_library_files())
    with_jax = {"jaxlib"}  # installed with jax (fst_jax.cusparselt reads its CUDA plugin's version)
    missing = {m: where for m, where in imports.items() if DIST_NAME.get(m, m) not in required | with_jax}
    assert not missing, f"imported by the library but not in [project] dependencies: {missing}"


def test_extras_cover_the_examples_tests_and_docs() -> None:
    """``examples`` has what fst_jax.optax, fst_jax.models and fst_jax.train import; ``test``
    and ``docs`` include it (the tests and the notebooks run the main job's code)."""
    pkg = ROOT / "fst_jax"
    for where, extra in EXTRA_MODULES.items():
        path = pkg / where
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        needed = {DIST_NAME.get(m, m) for m in _third_party_imports(files)}
        have = _extra(extra) | _names(PYPROJECT["dependencies"])
        assert needed <= have, f"fst_jax/{where} imports {needed - have}, not in the {extra} extra"
    examples = _extra("examples")
    assert {"flax", "optax", "scikit-learn", "tqdm", "matplotlib", "mnist1d"} <= examples
    for extra in ("test", "docs"):
        assert examples <= _extra(extra), extra
    assert {"pytest", "hypothesis", "chex"} <= _extra("test")
    assert {"sphinx", "myst-nb"} <= _extra("docs")


def test_test_extra_covers_the_tests_and_benchmarks() -> None:
    """What the tests and the benchmarks they run import is in the ``test`` extra (or comes with
    jax: jaxlib, ml_dtypes)."""
    files = [ROOT / "conftest.py", *sorted((ROOT / "tests").glob("*.py")),
             *sorted((ROOT / "benchmarks").glob("*.py"))]
    local = {"benchmarks"} | {f.stem for f in (ROOT / "tests").glob("*.py")}  # the tests' own helpers
    with_jax = {"jaxlib", "ml_dtypes"}
    have = _extra("test") | _names(PYPROJECT["dependencies"]) | with_jax
    # the GPU benchmark's peer, run in its own process only where torch is installed (the GPU machine)
    optional_peers = {"torch"}
    missing = {m: where for m, where in _third_party_imports(files).items()
               if m not in local | optional_peers and DIST_NAME.get(m, m) not in have}
    assert not missing, f"imported by tests/benchmarks but not in the test extra: {missing}"
