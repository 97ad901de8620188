"""Sphinx configuration for pyro_lvm (built warning-free by tests/test_docs.py)."""

project = "pyro_lvm"
author = "pyro_lvm developers"
release = "0.1.0"
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_enable_extensions = ["dollarmath"]
napoleon_numpy_docstring = True
napoleon_google_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"
html_theme = "alabaster"
exclude_patterns = ["_build"]
suppress_warnings = ["myst.header"]
nitpicky = False


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    # NamedTuple fields are documented in the class's Attributes section already
    doc = getattr(obj, "__doc__", None) or ""
    return True if doc.startswith("Alias for field number") else None


def setup(app):
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
