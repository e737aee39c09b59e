"""Sessions: tests, tests-oldest, tests-matrix, doctests, lint, typecheck, docs, demo, bench,
bench-flows, bench-plan, bench-exact.

Torch comes from ``$INVFUNC_TORCH`` (default: ``torch``). On machines whose pip sees a
local CPU wheel, pin it, e.g. ``INVFUNC_TORCH=torch==2.13.0 nox -s tests``.
``tests-oldest`` runs the suite on the oldest supported torch (2.4.1); ``tests-matrix``
on Python 3.10 and 3.13 with the oldest, the newest (2.15.0) and the pinned torch.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH = os.environ.get("INVFUNC_TORCH", "torch")
#: The oldest PyTorch pyproject.toml admits, and the newest release, for the version sessions.
OLDEST_TORCH = os.environ.get("INVFUNC_TORCH_OLDEST", "torch==2.4.1")
NEWEST_TORCH = os.environ.get("INVFUNC_TORCH_NEWEST", "torch==2.15.0")
PEERS = ["memcnn==1.5.2", "revlib==1.7.2", "invtorch==0.5.0", "numpy"]
#: The flow libraries benchmarks/flows.py measures against (they bring numpy and scipy).
FLOW_PEERS = ["FrEIA==0.2", "normflows==1.7.3"]


def _install(session: nox.Session, *extras: str) -> None:
    session.install(TORCH)
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install("-e", spec)


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite and every docstring example (doctests)."""
    _install(session, "testing")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session(name="tests-oldest")
def tests_oldest(session: nox.Session) -> None:
    """The test suite on the oldest PyTorch the package supports (``$INVFUNC_TORCH_OLDEST``)."""
    session.install(OLDEST_TORCH)
    session.install("-e", ".[testing]")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


# The supported range, corner by corner: the oldest and newest Python with the oldest torch,
# the newest release and the pinned one. Torch 2.4 has no build for Python 3.13, and torch
# 2.15 none for Python 3.10.
_MATRIX = [
    ("3.10", OLDEST_TORCH),
    ("3.10", TORCH),
    ("3.13", NEWEST_TORCH),
    ("3.13", TORCH),
]


@nox.session(name="tests-matrix")
@nox.parametrize(("python", "torch"), _MATRIX)
def tests_matrix(session: nox.Session, torch: str) -> None:
    """The test suite on each corner of the supported Python and PyTorch versions."""
    session.install(torch)
    session.install("-e", ".[testing]")
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


@nox.session(name="bench-flows")
def bench_flows(session: nox.Session) -> None:
    """The flow benchmark (Glow-like steps), side by side with FrEIA and normflows (installs them)."""
    _install(session)
    session.install(*FLOW_PEERS)
    session.install("matplotlib")
    session.run("python", "benchmarks/flows.py", *session.posargs)


@nox.session(name="bench-plan")
def bench_plan(session: nox.Session) -> None:
    """The planning benchmark: invfunc.plan on a mixed network against the uniform policies."""
    _install(session)
    session.install("tqdm")
    session.run("python", "benchmarks/plan.py", *session.posargs)


@nox.session(name="bench-exact")
def bench_exact(session: nox.Session) -> None:
    """Exact couplings: drift by depth against float couplings, and a training run."""
    _install(session)
    session.install("matplotlib", "tqdm")
    session.run("python", "benchmarks/exact.py", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the Sphinx docs with warnings as errors."""
    _install(session, "docs")
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")
    session.run("python", "docs/check_examples.py")
