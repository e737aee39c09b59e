"""The demo (``python -m invfunc``) is sound at every depth it suggests."""

from __future__ import annotations

import math

import pytest

import invfunc.__main__ as demo
from invfunc._measure import Measurement, measure


@pytest.mark.parametrize("depth", [8, 64, 256])
def test_the_demo_network_trains_at_every_depth(depth: int) -> None:
    # the demo's network (last layers started near zero), trained by invfunc as the demo does
    opts = {"config": "invfunc", "depth": depth, "batch": 16, "hidden": 16, "stable": True}
    m = measure("invfunc._measure:mlp_workload", options=opts, steps=4, lr=0.01)
    assert all(math.isfinite(loss) for loss in m.losses)
    assert m.losses[-1] < m.losses[0]


def test_the_benchmark_network_is_unchanged_and_diverges_where_the_demo_does_not() -> None:
    # without ``stable`` (the reference benchmark's network), depth 64 is what the demo fixed
    opts = {"config": "plain", "depth": 64, "batch": 16, "hidden": 16}
    m = measure("invfunc._measure:mlp_workload", options=opts, steps=4, lr=0.01)
    assert m.losses[-1] > m.losses[0] or not all(math.isfinite(x) for x in m.losses)


def test_a_non_finite_loss_is_an_error_of_the_demo(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def diverging(builder: str, **kwargs: object) -> Measurement:
        return Measurement(1.0, None, 0.1, (0.1,), (3.0, float("nan")), 1.0)

    monkeypatch.setattr(demo, "measure", diverging)
    assert demo.main(["--depth", "2", "--steps", "1"]) == 1
    out = capsys.readouterr().out
    assert "plain autograd: the loss is nan at step 1 (of 2, warm-up first): the training diverged" in out
    assert "| config" not in out  # no table: a diverged run is not a row
