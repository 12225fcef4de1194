"""Sphinx configuration of the API reference, generated from the docstrings.

Built by ``tests/test_docs.py`` with warnings as errors (``-W``), or by hand:
``python -m sphinx -W -b html docs/api docs/api/_build``.
"""

project = "mcdrop"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
suppress_warnings = ["ref.python"]  # the same name re-exported at two paths is not an error here
html_theme = "alabaster"
exclude_patterns = ["_build"]
napoleon_use_ivar = True  # "Attributes:" as fields, so NamedTuple fields are not described twice
