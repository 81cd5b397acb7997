"""The documentation covers the public API, and the notebooks are stored clean.

The Sphinx build itself (``python -m sphinx -W -b html docs docs/_build/html``, which executes the
notebooks) runs in CI after the tests; these checks are the cheap part: every public name has an
autodoc entry in ``docs/``, every autodoc entry names something that exists, and the notebooks
are committed without outputs and are listed in the docs.
"""

import importlib
import json
import re
import types
from pathlib import Path

import pytest

import fst_jax

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
NOTEBOOKS = ROOT / "notebooks"

# Public submodules whose ``__all__`` is documented besides ``fst_jax.__all__``.
SUBMODULES = ("fst_jax.optax", "fst_jax.kernels", "fst_jax.cusparselt", "fst_jax.models",
              "fst_jax.train", "fst_jax.text")
NOTEBOOK_NAMES = ("01_quickstart", "02_training", "03_kernels")

# ``.. autofunction:: fst_jax.x`` (reStructuredText) and ```{autofunction} fst_jax.x (MyST).
_DIRECTIVE = re.compile(
    r"^\s*(?:\.\.\s+auto(?P<kind1>\w+)::|`{3,}\{auto(?P<kind2>\w+)\})\s+(?P<target>[\w.]+)\s*$",
    re.MULTILINE,
)


def _doc_sources(docs: Path) -> list[Path]:
    skip = {"_build", "jupyter_execute", "notebooks"}  # build outputs and copied notebooks
    return [
        p
        for p in sorted(docs.rglob("*"))
        if p.suffix in (".rst", ".md") and not skip & set(p.relative_to(docs).parts)
    ]


def _autodoc_targets(docs: Path = DOCS) -> dict[str, str]:
    """``{target: kind}`` of every autodoc directive in the docs sources."""
    out = {}
    for path in _doc_sources(docs):
        for m in _DIRECTIVE.finditer(path.read_text(encoding="utf-8")):
            out[m["target"]] = m["kind1"] or m["kind2"]
    return out


def _public_names() -> list[str]:
    """The fully qualified public names: ``fst_jax.__all__`` and the submodules' ``__all__``."""
    names, modules = [], list(SUBMODULES)
    for name in fst_jax.__all__:
        if isinstance(getattr(fst_jax, name), types.ModuleType):
            modules.append(getattr(fst_jax, name).__name__)
        else:
            names.append(f"fst_jax.{name}")
    for mod_name in dict.fromkeys(modules):
        mod = importlib.import_module(mod_name)
        assert hasattr(mod, "__all__"), f"{mod_name} has no __all__: list its public names"
        names.append(mod_name)  # the module itself: an automodule entry with its docstring
        names += [f"{mod_name}.{n}" for n in mod.__all__]
    return names


def _resolve(target: str) -> object:
    """The object a dotted name means, attributes first (as autodoc reads it): in
    ``fst_jax.kernels.sparse_matmul`` the function shadows the submodule of the same name."""
    parts = target.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=2):
        obj = getattr(obj, part) if hasattr(obj, part) else importlib.import_module(
            ".".join(parts[:i])
        )
    return obj


def test_the_docs_have_sources():
    assert (DOCS / "conf.py").is_file()
    assert len(_autodoc_targets()) > 20


def test_every_public_name_has_an_autodoc_entry():
    targets = _autodoc_targets()
    missing = [n for n in _public_names() if n not in targets]
    assert not missing, (
        f"public names without an autodoc entry in docs/: {missing}; add e.g. "
        f"'.. autofunction:: {missing[0]}' to docs/api.rst"
    )


def test_modules_are_automodule_entries():
    targets = _autodoc_targets()
    for name in _public_names():
        if isinstance(_resolve(name), types.ModuleType):
            assert targets.get(name) == "module", f"{name}: document it with automodule"


def test_every_autodoc_entry_names_an_existing_object():
    for target in _autodoc_targets():
        try:
            _resolve(target)
        except (ImportError, AttributeError) as e:
            pytest.fail(f"docs/ documents {target}, which does not exist: {e}")


def test_the_check_sees_a_missing_name(tmp_path):
    (tmp_path / "api.rst").write_text(".. autofunction:: fst_jax.sparsify\n")
    (tmp_path / "page.md").write_text("```{autoclass} fst_jax.FSTConfig\n```\n")
    (tmp_path / "_build").mkdir()
    (tmp_path / "_build" / "old.rst").write_text(".. autofunction:: fst_jax.report\n")
    targets = _autodoc_targets(tmp_path)
    assert targets == {"fst_jax.sparsify": "function", "fst_jax.FSTConfig": "class"}
    assert "fst_jax.report" in set(_public_names()) - set(targets)


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebooks_are_stored_without_outputs(name):
    path = NOTEBOOKS / f"{name}.ipynb"
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{path} has no code cells"
    for i, cell in enumerate(code):
        assert cell["outputs"] == [] and cell["execution_count"] is None, (
            f"{path}: code cell {i} is stored with outputs; clear them (the docs build runs it)"
        )


def test_notebooks_are_in_the_docs():
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^notebooks/(\w+)$", index, re.MULTILINE))
    assert listed == {p.stem for p in NOTEBOOKS.glob("*.ipynb")} == set(NOTEBOOK_NAMES)
