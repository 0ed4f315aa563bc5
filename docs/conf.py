"""Sphinx configuration of the esdmri documentation site.

Build it from the repository root with ``pip install -e ".[docs]"`` and::

    sphinx-build -W -b html docs docs/_build/html

The Markdown pages are read by MyST; the API pages are generated at build
time from the numpydoc docstrings (autosummary + autodoc + numpydoc), so they
cannot go out of date.
"""

import esdmri

project = "esdmri"
author = "the esdmri developers"
copyright = "the esdmri developers"  # noqa: A001 - Sphinx's name for it
release = version = esdmri.__version__

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "generated/**/README*"]

# MyST: headings get anchors so that "page.md#heading" links resolve.
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]

# API pages: one per module, written by autosummary into docs/generated/ on
# every build (the folder is not tracked).
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "show-inheritance": True,
                           "ignore-module-all": True}
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the numpydoc Parameters sections give the types

# numpydoc renders Parameters/Returns/References; the class member tables it
# would add repeat what autodoc's :members: already lists.
numpydoc_show_class_members = False
numpydoc_xref_param_type = False

intersphinx_mapping = {}  # offline build: no inventories are downloaded

html_theme = "alabaster"
html_title = f"esdmri {release}"
html_static_path = []


def _skip_foreign(app, what, name, obj, skip, options):
    """Leave out module members defined outside esdmri (e.g. an imported
    ``scipy.spatial.cKDTree``): the API pages document esdmri's own objects."""
    if what == "module":
        owner = getattr(obj, "__module__", None)
        if isinstance(owner, str) and not owner.startswith("esdmri"):
            return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_foreign)
