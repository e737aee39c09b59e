"""The benchmark harness's own arithmetic (the benchmarks themselves run outside CI)."""

from __future__ import annotations

import doctest
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from _util import script

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def run():
    with script(BENCH / "run.py", "bench") as module:
        yield module


@pytest.fixture(scope="module")
def exact():
    with script(BENCH / "exact.py", "bench") as module:
        yield module


@pytest.fixture(scope="module")
def flows():
    with script(BENCH / "flows.py", "bench") as module:
        yield module


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


def test_flows_runs_the_invfunc_configurations_and_writes_its_report(flows, tmp_path: Path) -> None:
    # the peers (FrEIA, normflows) are not installed in CI: the invfunc rows only, tiny sizes
    configs = [c for c in flows.CONFIGS if c not in flows.PEERS]
    tiny = ["--depths", "2", "--batch", "2", "--channels", "4", "--size", "8", "--hidden", "8"]
    assert flows.main([*tiny, "--steps", "1", "--configs", *configs, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "flows.json").read_text())["results"]
    assert [r["config"] for r in rows] == configs
    assert all(r["status"] == "ok" and r["grads_match"] for r in rows)
    # the same flow on the same weights: the same NLL in every configuration
    assert max(r["loss"] for r in rows) - min(r["loss"] for r in rows) < 1e-5
    assert all(r["grad_diff"] < 1e-4 for r in rows)
    assert "| invfunc (one call)" in (tmp_path / "flows.md").read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "flows.png").stat().st_size > 10_000


@pytest.mark.parametrize("config", ["freia", "freia-checkpoint", "normflows"])
def test_flows_peers_compute_the_same_nll_and_gradients(flows, config: str) -> None:
    pytest.importorskip(flows.PEERS[config][0])

    def step(c: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        work = flows.build(config=c, depth=2, batch=2, channels=4, size=8, hidden=8)
        x = work.data.clone().requires_grad_()
        loss = work.model(x).square().mean()
        loss.backward()
        return [loss.detach(), x.grad, *(p.grad for p in work.params[: 2 * flows.SUBNET_PARAMS])]

    for got, want in zip(step(config), step("plain")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_exact_drift_is_zero_for_exact_couplings_and_writes_its_report(exact, tmp_path: Path) -> None:
    tiny = ["--depths", "1", "4", "--seeds", "2", "--train-steps", "3", "--train-batch", "16"]
    assert exact.main([*tiny, "--train-blocks", "2", "--train-width", "4", "--out", str(tmp_path)]) == 0
    blob = json.loads((tmp_path / "exact.json").read_text())
    rows = {(r["variant"], r["depth"]): r for r in blob["drift"]}
    assert set(rows) == {(v, d) for v in exact.VARIANTS for d in (1, 4)}
    for (variant, _), r in rows.items():
        assert r["ok"] == 2 and r["freed"]
        if exact.VARIANTS[variant][1]:  # exact: zero everywhere, bitwise on every seed
            assert r["bitwise"] == 2 and all(r[k] == 0 for k in ("rebuilt", "roundtrip", "grad_plain"))
    assert rows["float", 4]["rebuilt"] > 0  # a float coupling drifts
    runs = blob["training"]["runs"]
    assert runs["exact invertible_call"]["bitwise_plain"] and len(runs["exact plain"]["losses"]) == 3
    assert "| float32, couple(F, G, exact=True)" in (tmp_path / "exact.md").read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "exact.png").stat().st_size > 10_000
