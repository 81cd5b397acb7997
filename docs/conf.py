"""Sphinx configuration of the fst_jax documentation.

Build (from the repository root, with the ``docs`` extra installed)::

    python -m sphinx -W -b html docs docs/_build/html

Pages are MyST Markdown; pages with code cells and the notebooks of ``notebooks/`` are executed by
myst-nb at every build (a cell that raises fails the build). The notebooks are copied into
``docs/notebooks/`` (git-ignored) before the build, since Sphinx reads only its source folder.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent

# Document (and execute the pages against) this checkout of fst_jax, whatever is installed: the
# Jupyter kernels that execute the pages inherit PYTHONPATH.
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
)


def _copy_notebooks() -> None:
    """Copies ``notebooks/*.ipynb`` to ``docs/notebooks/``, removing copies without a source."""
    src, dst = ROOT / "notebooks", DOCS / "notebooks"
    dst.mkdir(exist_ok=True)
    sources = {p.name: p for p in src.glob("*.ipynb")}
    for stale in dst.glob("*.ipynb"):
        if stale.name not in sources:
            stale.unlink()
    for name, path in sources.items():
        target = dst / name
        if not target.exists() or target.read_bytes() != path.read_bytes():
            shutil.copyfile(path, target)


_copy_notebooks()

project = "fst_jax"
author = "fst_jax authors"
copyright = "2026, fst_jax authors"  # noqa: A001 - Sphinx's name

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
exclude_patterns = ["_build", "jupyter_execute", ".ipynb_checkpoints"]

# MyST and myst-nb.
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
nb_execution_mode = "force"  # run every notebook and executable page at every build
nb_execution_raise_on_error = True  # a cell that raises fails the build
nb_execution_show_tb = True  # ... and the log shows the traceback
nb_execution_timeout = 300  # seconds per cell
nb_kernel_rgx_aliases = {".*": "python3"}  # the Python that runs Sphinx (jupyter_client's rule)
nb_merge_streams = True

# API reference: Google-style docstrings.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields, not duplicate attribute entries
napoleon_use_rtype = False

html_theme = "alabaster"
html_title = "fst_jax"
html_theme_options = {"description": "Fully sparse (2:4) training for JAX", "page_width": "1180px"}
