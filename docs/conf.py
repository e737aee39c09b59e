"""Sphinx configuration: MyST Markdown pages, autodoc with Google docstrings, furo."""

from __future__ import annotations

import os
import re
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.util import logging

import invfunc

project = "invfunc"
author = "invfunc contributors"
copyright = "invfunc contributors"
release = invfunc.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "myst_parser",
]

# Links into PyTorch's and Python's own documentation (torch.Tensor, nn.Module, ...).
# Offline (INVFUNC_DOCS_OFFLINE=1, as on machines without internet) the inventories are
# not fetched and such references stay plain text.
intersphinx_mapping = (
    {}
    if os.environ.get("INVFUNC_DOCS_OFFLINE")
    else {
        "python": ("https://docs.python.org/3", None),
        "torch": ("https://pytorch.org/docs/stable", None),
    }
)

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


def _check_api_complete(app: Sphinx) -> None:
    """Warn (an error under -W) for a public name that api.md does not document."""
    api = (Path(app.srcdir) / "api.md").read_text()
    documented = set(re.findall(r"^\.\. \w+:: invfunc\.(\w+)$|^\.\. py:data:: (\w+)$", api, re.M))
    names = {a or b for a, b in documented}
    for name in sorted(set(invfunc.__all__) - names):
        logging.getLogger(__name__).warning(
            "invfunc.%s is in invfunc.__all__ but not documented in docs/api.md; add an autodoc entry.",
            name,
        )


def setup(app: Sphinx) -> None:
    app.connect("autodoc-process-docstring", _plural_literals)
    app.connect("builder-inited", _check_api_complete)
