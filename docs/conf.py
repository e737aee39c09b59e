"""Sphinx configuration: MyST Markdown pages, autodoc with Google docstrings, furo."""

from __future__ import annotations

import re

from sphinx.application import Sphinx

import invfunc

project = "invfunc"
author = "invfunc contributors"
copyright = "invfunc contributors"
release = invfunc.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Google-style docstrings only.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"

# invfunc.testing.strategies imports hypothesis (the "testing" extra); build its page
# without it too.
try:
    import hypothesis  # noqa: F401
except ImportError:
    autodoc_mock_imports = ["hypothesis"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

html_theme = "furo"
html_title = f"invfunc {release}"
pygments_style = "sphinx"


_LITERAL = re.compile(r"(``[^`]+``)(\w?)")


def _plural_literals(
    app: Sphinx, what: str, name: str, obj: object, options: object, lines: list[str]
) -> None:
    """Let docstrings write ``nn.Module``s: reST needs an escaped space after a literal."""
    for i, line in enumerate(lines):
        lines[i] = _LITERAL.sub(lambda m: m[1] + ("\\ " if m[2] else "") + m[2], line)


def setup(app: Sphinx) -> None:
    app.connect("autodoc-process-docstring", _plural_literals)
