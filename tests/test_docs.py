"""Every example of the documentation pages runs (``docs/check_examples.py``), each page in
a fresh process, so the docs' claims are checked like the code's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
# every page, tutorials/ included; the ids are paths relative to docs/ ("tutorials/testing.md")
PAGES = sorted(
    p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if "_build" not in p.relative_to(DOCS).parts
)


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page: str) -> None:
    done = subprocess.run(
        [sys.executable, str(DOCS / "check_examples.py"), str(DOCS / page)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{page}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
