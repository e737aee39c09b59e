"""Every example of the documentation pages runs (``docs/check_examples.py``), each page in
a fresh process, so the docs' claims are checked like the code's."""

from __future__ import annotations

import itertools
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


def test_readme_first_example_trains() -> None:
    """The README's first example is a complete training loop whose loss goes down."""
    readme = DOCS.parent / "README.md"
    done = subprocess.run(
        [sys.executable, str(DOCS / "check_examples.py"), str(readme)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    losses = [float(line.rsplit(" ", 1)[1]) for line in done.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 5
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
