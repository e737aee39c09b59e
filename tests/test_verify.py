"""Drift is visible: fingerprints of the forward's inputs against their reconstruction."""

from __future__ import annotations

import warnings

import pytest
import torch

import invfunc as inv
from _util import mlp, revnet


def _off_by(eps: float) -> inv.Invertible:
    return inv.invertible(lambda x: x * 2, inverse=lambda y: y / 2 + eps)


def test_wrong_inverse_raises_naming_the_block_and_the_error() -> None:
    net = inv.chain(_off_by(0.0), _off_by(1e-3), _off_by(0.0))
    x = torch.ones(8, dtype=torch.float64, requires_grad=True)
    y = inv.invertible_call(net, x * 1, verify="raise")
    msg = r"call\(<lambda>, block 2 of 3\) backward: input 0 was rebuilt .* relative error 5\.00e-04"
    with pytest.raises(inv.InvfuncError, match=msg):
        y.sum().backward()


def test_ambient_policy_warn_and_per_block_drift_report() -> None:
    net = inv.chain(_off_by(0.0), _off_by(1e-3))
    x = torch.ones(8, dtype=torch.float64, requires_grad=True)
    with inv.verify("warn"), inv.explain() as rep:
        y = inv.invertible_call(net, x * 1)
        with pytest.warns(inv.InvertibilityWarning, match="relative error"):
            y.sum().backward()
    errors = [err for _, _, err in rep.drift]
    assert len(errors) == 2  # one per block
    # backward walks blocks in reverse; the error of block 2's rebuild carries into block 1's
    assert errors[0] > 1e-4 and errors[1] > 1e-4


def test_off_records_nothing_and_accurate_inverses_pass() -> None:
    net, _ = revnet(6, 4)
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    with inv.explain() as rep:
        inv.invertible_call(net, x * 1).sum().backward()
    assert rep.drift == []
    with inv.verify("raise"), inv.explain() as rep, warnings.catch_warnings():
        warnings.simplefilter("error")
        inv.invertible_call(net, x * 1).sum().backward()
    # one entry per rebuilt input: 6 couplings on pairs (2 each); the split and the join
    # around them copy values and are not verified
    assert len(rep.drift) == 6 * 2 and max(e for _, _, e in rep.drift) < 1e-12


def test_coupling_with_an_inconsistent_F_is_caught() -> None:
    """F that is not a function of its input (a hidden state change) breaks the inverse."""
    torch.manual_seed(0)
    state = {"calls": 0}

    def F(h: torch.Tensor) -> torch.Tensor:
        state["calls"] += 1
        return h * (1.0 + 1e-3 * state["calls"])  # differs between forward and backward

    block = inv.couple(F, mlp(3).double())
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    y = inv.invertible_call(block, x * 1, verify="raise")
    # caught where F is recomputed on the rebuilt input, before the rebuilt input is compared
    with pytest.raises(inv.InvfuncError, match=r"couple\(F, Sequential\)\) backward: recomputing F on"):
        y.sum().backward()


def test_float32_depth_drift_is_reported_and_within_default_tolerance() -> None:
    net, _ = revnet(32, 16, dtype=torch.float32)
    x = torch.randn(16, 32, requires_grad=True)
    with inv.verify("raise"), inv.explain() as rep:
        inv.invertible_call(net, x * 1).square().mean().backward()
    worst = max(e for _, _, e in rep.drift)
    assert 0 < worst < 1e-4


def test_bad_policy() -> None:
    with pytest.raises(ValueError, match=r"invfunc.verify\(policy\): unknown verification policy 'loud'"):
        with inv.verify("loud"):  # type: ignore[arg-type]
            pass
    f = _off_by(0.0)
    with pytest.raises(ValueError, match=r"verify=\.\.\.\): unknown verification policy"):
        inv.invertible_call(f, torch.ones(2, requires_grad=True), verify="loud")
