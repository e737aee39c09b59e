"""DistributedDataParallel (gloo, two local processes on 127.0.0.1) gives a single process's gradients.

One launch of ``_ddp_worker.py`` runs every configuration (5 steps each); each test checks
its own lines: ``OK``, ``FAIL`` (gradients differ from one process under plain autograd
by more than 1e-10) or ``ERROR`` (the configuration raised).
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FLAGS = ("find_unused_parameters", "gradient_as_bucket_view", "static_graph")


@pytest.fixture(scope="module")
def ddp_lines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """``{"<kind>:<flags set, comma-separated>": "OK ..." | "FAIL ..." | "ERROR ..."}``."""
    tmp = tmp_path_factory.mktemp("ddp")
    out = subprocess.run(
        [sys.executable, str(HERE / "_ddp_worker.py"), str(tmp / "store"), str(tmp / "grads.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [
        line.split("\t") for line in out.stdout.splitlines() if line.startswith(("OK\t", "FAIL\t", "ERROR\t"))
    ]
    return {name: " ".join((status, name, detail)) for status, name, detail in lines}


def _names(kind: str, allowed: Callable[[set[str]], bool] = lambda flags: True) -> set[str]:
    """The configuration names of ``kind`` for every flag set ``allowed`` accepts."""
    sets = [set(c) for n in range(len(FLAGS) + 1) for c in itertools.combinations(FLAGS, n)]
    return {f"{kind}:" + ",".join(sorted(s)) for s in sets if allowed(s)}


def _check(lines: dict[str, str], names: set[str]) -> None:
    missing = names - lines.keys()
    assert not missing, f"not run: {sorted(missing)}"
    bad = [lines[n] for n in sorted(names) if not lines[n].startswith("OK")]
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_ddp_matches_single_process_over_the_option_matrix(ddp_lines: dict[str, str]) -> None:
    def needs_flag(flags: set[str]) -> bool:
        # the model has an unused parameter: DDP requires find_unused_parameters or static_graph
        return bool(flags & {"find_unused_parameters", "static_graph"})

    names = _names("one call", needs_flag) | _names("same block twice", needs_flag)
    names |= _names("dynamic", lambda s: needs_flag(s) and "static_graph" not in s)
    assert len(names) == 6 + 6 + 2
    _check(ddp_lines, names)


@pytest.mark.slow
def test_ddp_default_flags_when_every_parameter_is_used(ddp_lines: dict[str, str]) -> None:
    names = _names("all used")
    assert "all used:" in names  # DDP(model) with its defaults
    _check(ddp_lines, names)


@pytest.mark.slow
def test_ddp_one_block_in_two_calls(ddp_lines: dict[str, str]) -> None:
    # block 0 is called by two separate invertible_call's: its parameters get two gradients
    _check(ddp_lines, _names("two calls"))


@pytest.mark.slow
def test_ddp_shared_weights(ddp_lines: dict[str, str]) -> None:
    # one Linear is F of block 0 and G of block 1
    _check(ddp_lines, _names("shared weights"))


@pytest.mark.slow
def test_ddp_no_sync_gradient_accumulation(ddp_lines: dict[str, str]) -> None:
    # 2 micro-batches under no_sync(), then one synchronised backward, for 5 steps; DDP itself
    # cannot run no_sync() with static_graph=True (see _ddp_worker.runs)
    _check(ddp_lines, _names("no_sync", lambda s: "static_graph" not in s))


@pytest.mark.slow
def test_ddp_through_as_module(ddp_lines: dict[str, str]) -> None:
    # the chain is called through inv.as_module, whose modules the DDP model also holds
    _check(ddp_lines, _names("as_module"))
