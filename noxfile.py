"""Sessions: tests, doctests, lint, typecheck, docs, demo, bench.

Torch comes from ``$INVFUNC_TORCH`` (default: ``torch``). On machines whose pip sees a
local CPU wheel, pin it, e.g. ``INVFUNC_TORCH=torch==2.13.0 nox -s tests``.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH = os.environ.get("INVFUNC_TORCH", "torch")
PEERS = ["memcnn==1.5.2", "revlib==1.7.2", "invtorch==0.5.0", "numpy"]


def _install(session: nox.Session, *extras: str) -> None:
    session.install(TORCH)
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install("-e", spec)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite and every docstring example (doctests)."""
    _install(session, "testing")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def doctests(session: nox.Session) -> None:
    """Only the docstring examples."""
    _install(session, "testing")
    session.run("python", "-m", "pytest", "-q", "src/invfunc", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and format check."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package."""
    _install(session, "testing")
    session.install("mypy>=1.10")
    session.run("mypy", "src/invfunc")


@nox.session
def demo(session: nox.Session) -> None:
    """Train a reversible MLP under plain autograd, checkpointing and invfunc."""
    _install(session)
    session.run("python", "-m", "invfunc", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """The reference benchmark, side by side with the peers (installs them)."""
    _install(session)
    session.install("--no-deps", *PEERS)
    session.install("matplotlib", "tqdm")
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the Sphinx docs with warnings as errors."""
    _install(session, "docs")
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")
    session.run("python", "docs/check_examples.py")
