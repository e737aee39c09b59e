"""The benchmark harness's own arithmetic (the benchmarks themselves run outside CI)."""

from __future__ import annotations

import doctest
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def run():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_run", BENCH / "run.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def test_doctests(run):
    result = doctest.testmod(run)
    assert result.attempted > 0 and result.failed == 0


def test_ratios_are_paired_by_round(run):
    # plain autograd slows down by half in round 2; a configuration 20 % slower than it in
    # every round is 1.2 in every round, where a ratio of medians would say 1.44 / 1.2
    rows = [
        {"config": "plain", "depth": 4, "status": "ok", "round_ms": [100.0, 150.0, 150.0]},
        {"config": "a", "depth": 4, "status": "ok", "round_ms": [120.0, 180.0, 180.0]},
        {"config": "plain", "depth": 8, "status": "ok", "round_ms": [200.0, 200.0, 200.0]},
        {"config": "a", "depth": 8, "status": "ok", "round_ms": [300.0, None, 500.0]},
        {"config": "b", "depth": 8, "status": "error", "round_ms": []},
    ]
    run.paired_ratios(rows)
    assert rows[1]["round_ratio"] == [1.2, 1.2, 1.2] and rows[1]["time_ratio"] == pytest.approx(1.2)
    assert rows[1]["step_ms"] == 180.0
    # a failed round is left out of that row, not counted as zero
    assert rows[3]["round_ratio"] == [1.5, 2.5] and rows[3]["time_ratio"] == pytest.approx(2.0)
    assert rows[3]["step_ms"] == 400.0
    assert "time_ratio" not in rows[4]


def test_replot_draws_a_saved_table_again(run, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    copy = tmp_path / "tiny.json"
    copy.write_text((BENCH / "results" / "tiny.json").read_text())
    assert run.main(["--replot", str(copy)]) == 0
    assert (tmp_path / "tiny.png").stat().st_size > 10_000
