"""Smoke tests of the example scripts in ``examples/``: each trains for a few steps at a
tiny size, under plain autograd and under ``invertible_call``, and the two agree."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import invfunc as inv
from _util import script

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    """The script ``examples/<name>.py`` as a module (``examples/`` is not a package)."""
    with script(EXAMPLES / f"{name}.py", "example") as module:
        return module


@pytest.fixture(scope="module")
def flow_2d():
    return load("flow_2d")


@pytest.fixture(scope="module")
def glow():
    return load("glow_images")


@pytest.fixture(scope="module")
def irevnet():
    return load("irevnet")


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def assert_same_curves(plain: list[float], invertible: list[float], tol: float = 1e-10) -> None:
    assert len(plain) == len(invertible)
    gap = max(abs(a - b) for a, b in zip(plain, invertible))
    assert gap < tol, f"the loss curves differ by {gap:.1e}"


def test_flow_2d_curves_agree_in_float64(flow_2d, float64):
    _, plain = flow_2d.train("plain", 12, batch=64)
    _, invertible = flow_2d.train("invertible", 12, batch=64)
    assert_same_curves(plain, invertible)
    assert plain[-1] < plain[0]


def test_glow_curves_agree_in_float64(glow, float64):
    kwargs = dict(steps=12, batch=16, depth=1, hidden=8, size=8, lr=5e-3)
    _, plain = glow.train("plain", **kwargs)
    flow, invertible = glow.train("invertible", **kwargs)
    assert_same_curves(plain, invertible)
    assert all(math.isfinite(v) for v in plain)
    assert sum(plain[-3:]) < sum(plain[:3])  # bits/dim falls
    *zs, ladj = flow(glow.dequantize(glow.images(4, torch.Generator().manual_seed(0), 16), torch.Generator()))
    # two scales, half of the channels factored out after the first
    assert [tuple(z.shape) for z in zs] == [(4, 2, 8, 8), (4, 8, 4, 4)] and ladj.shape == (4,)
    assert [z.shape[1:] for z in zs] == glow.latent_shapes(16)
    assert glow.round_trip_error(flow) < 1e-10


def test_glow_three_scales_factor_out_twice(glow, float64):
    kwargs = dict(steps=6, batch=16, depth=1, hidden=8, size=8, lr=5e-3, scales=3)
    _, plain = glow.train("plain", **kwargs)
    flow, invertible = glow.train("invertible", **kwargs)
    assert_same_curves(plain, invertible)
    assert plain[-1] < plain[0]
    x = glow.dequantize(glow.images(4, torch.Generator().manual_seed(0), 8), torch.Generator())
    *zs, ladj = flow(x)
    assert [z.shape[1:] for z in zs] == glow.latent_shapes(8, scales=3) == [(2, 4, 4), (4, 2, 2), (16, 1, 1)]
    back, ladj_inv = flow.inverse(*zs)
    assert (back - x).abs().max() < 1e-10 and (ladj + ladj_inv).abs().max() < 1e-10
    assert glow.sample(flow, 3, size=8, scales=3).shape == (3, 1, 8, 8)


def test_glow_data_and_samples(glow):
    k = glow.images(8, torch.Generator().manual_seed(0))
    assert k.shape == (8, 1, 16, 16)
    assert k.min() >= 0 and k.max() <= glow.N_BINS - 1 and torch.equal(k, k.round())
    assert torch.equal(k, glow.images(8, torch.Generator().manual_seed(0)))  # deterministic
    x = glow.dequantize(k, torch.Generator().manual_seed(0))
    assert x.min() >= -0.5 and x.max() < 0.5
    torch.manual_seed(0)
    flow = glow.build(depth=1, hidden=8)
    with torch.no_grad():
        flow(x)  # ActNorm's initialisation
    samples = glow.sample(flow, 4)
    assert samples.shape == (4, 1, 16, 16) and samples.min() >= 0 and samples.max() <= 1


def test_glow_main_writes_the_plot(glow, tmp_path, capsys):
    pytest.importorskip("matplotlib")  # (the plot needs it; the rest of the examples do not)
    path = tmp_path / "samples.png"
    glow.main(["--steps", "3", "--batch", "8", "--depth", "1", "--hidden", "8", "--plot", str(path)])
    assert path.stat().st_size > 0
    out = capsys.readouterr().out
    assert "plain" in out and "invertible" in out and "largest difference" in out


def test_irevnet_curves_agree_in_float64(irevnet, float64):
    kwargs = dict(steps=15, batch=32, depth=1, hidden=8, lr=1e-2)
    _, plain = irevnet.train("plain", **kwargs)
    model, invertible = irevnet.train("invertible", **kwargs)
    assert_same_curves(plain, invertible)
    assert sum(plain[-3:]) < sum(plain[:3])  # the loss falls
    assert 0 <= irevnet.accuracy(model, 60) <= 1


def test_irevnet_features_are_invertible(irevnet, float64):
    torch.manual_seed(0)
    model = irevnet.IRevNet(depth=1, hidden=8)
    x, labels = irevnet.patterns(8, torch.Generator().manual_seed(0))
    assert x.shape == (8, 3, 16, 16) and set(labels.tolist()) <= {0, 1, 2}
    with torch.no_grad():
        features = model.flow(x)
    assert features.shape == (8, 48, 4, 4)  # 768 numbers, as many as the input
    assert (irevnet.reconstruct(model, x) - x).abs().max() < 1e-10


def test_irevnet_frees_the_extractors_activations(irevnet):
    torch.manual_seed(0)
    model = irevnet.IRevNet(depth=1, hidden=8)
    x, labels = irevnet.patterns(8, torch.Generator().manual_seed(0))
    with inv.explain() as report:
        loss = torch.nn.functional.cross_entropy(model(x), labels)
    # every block's input but perhaps the batch itself (the squeeze stem needs no grad)
    assert len(report.freed) >= len(model.flow.blocks) - 1
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
