"""Sphinx configuration of jlora's documentation site (built by ``bash scripts/docs.sh``).

Sphinx + MyST-NB + sphinx-book-theme, as the JAX projects' sites are built: pages are MyST markdown,
tutorials are MyST markdown notebooks (jupytext) executed at build time on the CPU, and the API
reference comes from the docstrings (``docs/_ext/jlora_api.py``: one page per public module, every
name in its ``__all__``). The build is offline and treats every warning as an error
(``sphinx-build -W --keep-going -n``): a failed cell, a broken cross-reference, a docstring that
does not parse.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "_ext"))
sys.path.insert(0, os.path.dirname(HERE))  # jlora itself, also when it is not installed

import jlora  # noqa: E402

project = "jlora"
author = "the jlora authors"
copyright = "the jlora authors"
release = version = jlora.__version__

extensions = [
    "myst_nb",  # MyST markdown pages and notebooks (includes myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # Google-style docstrings
    "mathml",  # maths as MathML at build time (docs/_ext/mathml.py): no CDN, no JavaScript
    "sphinx_copybutton",
    "jlora_api",  # the `jlora-api` directive: a module's page from its __all__
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "**.ipynb_checkpoints", "README.md"]
templates_path: list[str] = []

# -- MyST ---------------------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3  # `[...](#checking-the-communication)` in docs/scaling.md

# -- Notebook execution -------------------------------------------------------------------------
# Every tutorial runs at build time, in a fresh kernel, offline on the CPU; a cell that raises or
# runs past the timeout fails the build. JLORA_DOCS_EXECUTE=off skips execution for layout work.
nb_execution_mode = "off" if os.environ.get("JLORA_DOCS_EXECUTE") == "off" else "force"
nb_execution_timeout = 240  # seconds per cell; each tutorial as a whole takes well under a minute
nb_execution_raise_on_error = True
nb_execution_show_tb = True  # the traceback in the build log when a cell fails
nb_merge_streams = True
nb_execution_excludepatterns: list[str] = []

# -- API reference ------------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_class_signature = "mixed"
autodoc_default_options = {"members": True}
autosummary_generate = False  # the tables link to entries on the module's own page
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True
napoleon_use_ivar = False
python_use_unqualified_type_names = True
add_module_names = False

# Nitpicky mode (-n) reports every cross-reference Sphinx cannot resolve, which is what catches a
# `:func:` to a name that was renamed or removed. The build is offline (no intersphinx), so
# references into other packages (jax, flax, optax, numpy, orbax, the standard library) cannot
# resolve and are not errors; references into jlora must resolve (docs/_ext/jlora_api.py maps the
# private modules' names, as annotations carry them, to the public ones).
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(?!jlora\b).*")]

html_math_renderer = "mathml"

# -- HTML ---------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"jlora {version}"
html_static_path: list[str] = []
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": True,  # each tutorial as .md and .ipynb
    "use_fullscreen_button": False,
    "use_repository_button": False,
    "home_page_in_toc": True,
}
html_last_updated_fmt = ""
html_copy_source = True
pygments_style = "default"
