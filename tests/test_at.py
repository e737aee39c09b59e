"""``inv.at(index, fn)``: acting on some tensors and passing the others through (NOTE
[Acting at a position]), the way a multi-scale flow factors out its latents."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import invfunc as inv
from _util import F64, assert_all_close, saved_bytes
from invfunc import ops


def _net(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, c_out, 3, padding=1))


def _steps(c: int, n: int) -> list[inv.Invertible]:
    out: list[inv.Invertible] = []
    for _ in range(n):
        out += [ops.actnorm(c), ops.conv1x1(c), ops.affine_coupling(_net(c // 2, 2 * (c - c // 2)))]
    return out


def glow(depth: int) -> inv.Invertible:
    """Three scales; half of the channels factored out after the first two."""
    return inv.chain(
        ops.squeeze(2),
        *_steps(4, depth),
        ops.split(),
        inv.at(
            1,
            inv.chain(
                ops.squeeze(2), *_steps(8, depth), ops.split(), inv.at(1, inv.chain(*_steps(4, depth)))
            ),
        ),
    )


def _nll(out: Any) -> torch.Tensor:
    *zs, ladj = out
    return sum((0.5 * z.square()).flatten(1).sum(1) for z in zs).mean() - ladj.mean()  # type: ignore[no-any-return,union-attr]


@pytest.fixture
def f64() -> Any:
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def test_a_multiscale_flow_round_trips_with_its_log_det(f64: None) -> None:
    torch.manual_seed(0)
    flow = glow(2)
    x = torch.randn(3, 1, 8, 8)
    *zs, ladj = flow(x)
    assert [tuple(z.shape) for z in zs] == [(3, 2, 4, 4), (3, 4, 2, 2), (3, 4, 2, 2)]
    back, ladj_inv = flow.inverse(*zs)
    torch.testing.assert_close(back, x, **F64)
    torch.testing.assert_close(ladj_inv, -ladj, **F64)
    assert len(flow._flatten()) == 1 + 3 * 2 + 1 + 1 + 3 * 2 + 1 + 3 * 2  # every step a block


@pytest.mark.parametrize("mode", ["invertible", "checkpoint", "plain"])
def test_gradients_equal_plain_autograd(f64: None, mode: str) -> None:
    torch.manual_seed(1)
    flow = glow(2)
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    flow(x.detach())  # initialise the ActNorms
    wrt = [x, *inv.as_module(flow).parameters()]
    want = torch.autograd.grad(_nll(flow(x * 1.0)), wrt)
    h = x * 1.0
    out = inv.invertible_call(flow, h, mode=mode)
    assert (h.untyped_storage().nbytes() == 0) == (mode == "invertible")
    assert_all_close(torch.autograd.grad(_nll(out), wrt), want, **F64)
    # the sampling direction, memory-efficient too
    zs = [z.detach().requires_grad_() for z in flow(x.detach())[:-1]]
    want = torch.autograd.grad(_nll(flow.inverse(*(z * 1.0 for z in zs))), zs)
    got = torch.autograd.grad(_nll(inv.invertible_call(flow.inverse, *(z * 1.0 for z in zs), mode=mode)), zs)
    assert_all_close(got, want, **F64)


def test_memory_is_flat_in_depth_with_factored_out_latents() -> None:
    held = []
    for depth in (1, 4):
        torch.manual_seed(0)
        flow = glow(depth)
        x = torch.randn(4, 1, 16, 16, requires_grad=True)
        flow(x.detach())
        held.append(saved_bytes(_nll(inv.invertible_call(flow, x * 1.0))))
    assert held[0] == held[1]


def test_errors_name_the_block_and_the_fix() -> None:
    double = inv.invertible(lambda x: 2 * x, inverse=lambda y: y / 2)
    with pytest.raises(TypeError, match=r"at\(index, fn\): index must be an int >= 0"):
        inv.at(-1, double)
    with pytest.raises(TypeError, match=r"fn must be an Invertible"):
        inv.at(0, lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"at\(2, <lambda>\): acts on 1 tensor\(s\) from position 2, but was given 2"
    ):
        inv.at(2, double)(torch.ones(1), torch.ones(1))
    unknown = inv.invertible(lambda x: (x, x), inverse=lambda *ys: ys[0])
    with pytest.raises(TypeError, match=r"cannot tell how many of the 3 tensors inverse\(<lambda>\) takes"):
        inv.at(1, unknown).inverse(torch.ones(1), torch.ones(1), torch.ones(1))
    with pytest.raises(TypeError, match=r"takes no arguments after its data"):
        inv.chain(inv.at(0, double), inv.invertible(lambda x, w: x * w, inverse=lambda y, w: y / w))(
            torch.ones(1), torch.ones(1)
        )


def test_a_block_inside_at_keeps_its_own_backward() -> None:
    """NOTE [Acting at a position], rule 5: past the first block, ``at`` is unwrapped, so an
    affine coupling inside it evaluates its net once in backward, and the pass-through
    tensor is not copied or kept by the blocks it passes."""
    calls = [0]
    conv = _net(2, 4)

    def net(h: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return conv(h)  # type: ignore[no-any-return]

    flow = inv.chain(ops.split(), inv.at(1, inv.chain(ops.actnorm(4), ops.affine_coupling(net))))
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    flow(x.detach())
    with inv.explain() as report:
        z1, z2, ladj = inv.invertible_call(flow, x * 1.0)
    assert len(report.freed) == 3 and not report.kept  # the split's input, actnorm's, the coupling's
    calls[0] = 0
    (z1.sum() + z2.square().sum() - ladj.sum()).backward()
    assert calls[0] == 1
