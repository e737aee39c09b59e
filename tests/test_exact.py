"""Exact couplings (NOTE [Exact couplings]): the inverse is exact to the bit, and
invertible_call's outputs and gradients are bitwise those of a plain call of the same
exact model, at any depth; bad ranges and broken determinism are errors, not drift."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import invfunc as inv


def _mlp(h: int, dtype: torch.dtype) -> nn.Module:
    return nn.Sequential(nn.Linear(h, h), nn.Tanh(), nn.Linear(h, h)).to(dtype)


def _net(
    depth: int, dtype: torch.dtype, h: int = 4, **kw: Any
) -> tuple[list[inv.Invertible], list[torch.Tensor]]:
    torch.manual_seed(depth)
    blocks = [inv.couple(_mlp(h, dtype), _mlp(h, dtype), exact=True, **kw) for _ in range(depth)]
    params = [p for b in blocks for m in (b.F, b.G) for p in m.parameters()]  # type: ignore[attr-defined]
    return blocks, params


def _on_grid(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.round(x * 2.0**k) / 2.0**k


def _loss(y: torch.Tensor) -> torch.Tensor:
    return (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sin().sum()


def _run(how: str, blocks: list[inv.Invertible], h: torch.Tensor) -> torch.Tensor:
    if how == "plain":
        return inv.chain(*blocks)(h)  # type: ignore[no-any-return]
    if how == "one call":
        return inv.invertible_call(inv.chain(*blocks), h)  # type: ignore[no-any-return]
    for b in blocks:  # one call per block
        h = inv.invertible_call(b, h)
    return h


def _grads(
    how: str, blocks: list[inv.Invertible], x: torch.Tensor, params: list[torch.Tensor], ask: str
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    wrt = [x, *params]
    y = _run(how, blocks, x * 1.0)
    if ask == "autograd.grad":
        return y.detach(), list(torch.autograd.grad(_loss(y), wrt))
    for t in wrt:
        t.grad = None
    _loss(y).backward()
    return y.detach(), [t.grad.clone() for t in wrt]  # type: ignore[union-attr]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("depth", [1, 16, 256])
@pytest.mark.parametrize("how", ["one call", "per block"])
@pytest.mark.parametrize("ask", ["backward", "autograd.grad"])
def test_outputs_and_gradients_are_bitwise_plain(dtype: torch.dtype, depth: int, how: str, ask: str) -> None:
    if depth == 256 and (how, ask) != ("one call", "backward"):
        pytest.skip("depth 256 once per dtype (the suite's time); 16 covers the other ways")
    blocks, params = _net(depth, dtype)
    x = torch.randn(6, 8, dtype=dtype, requires_grad=True)
    y_want, want = _grads("plain", blocks, x, params, ask)
    y_got, got = _grads(how, blocks, x, params, ask)
    assert torch.equal(y_got, y_want)
    assert len(got) == len(want) and all(g.abs().sum() > 0 for g in want)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("dtype,k", [(torch.float32, 16), (torch.float64, 32)])
def test_the_inverse_is_exact_at_depth_256(dtype: torch.dtype, k: int) -> None:
    blocks, _ = _net(256, dtype)
    net = inv.chain(*blocks)
    x = torch.randn(5, 8, dtype=dtype)
    with torch.no_grad():
        y = net(x)
        assert torch.equal(net.inverse(y), _on_grid(x, k))  # the rounded input, to the bit
        assert torch.equal(net(net.inverse(y)), y)


def test_a_freed_input_is_rebuilt_to_the_bit() -> None:
    blocks, _ = _net(8, torch.float32)
    x = torch.randn(4, 8, requires_grad=True)
    h = _on_grid(x, 16)  # an intermediate on the grid: freed, rebuilt, refilled
    want = h.detach().clone()
    y = inv.invertible_call(inv.chain(*blocks), h)
    assert h.untyped_storage().nbytes() == 0
    y.sum().backward()
    assert torch.equal(h.detach(), want)


def test_bf16_autocast_inside_f_and_g_with_a_float32_stream() -> None:
    """F and G compute in bfloat16 under autocast; their outputs land on the float32
    stream's grid, and the rebuilt input and every gradient are still bitwise plain."""
    blocks, params = _net(16, torch.float32, h=8)
    x = torch.randn(6, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_want, want = _grads("plain", blocks, x, params, "backward")
        y_got, got = _grads("one call", blocks, x, params, "backward")
    assert y_got.dtype == torch.float32
    assert torch.equal(y_got, y_want)
    # F's output lands on the float32 stream's grid (2^-16), not on bfloat16's (2^-3)
    xq = _on_grid(x.detach(), 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        f = blocks[0](xq)[:, :8] - xq[:, :8]
    assert torch.equal(f, _on_grid(f, 16)) and not torch.equal(f, _on_grid(f, 3))
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_exact_stream_is_freed_and_bitwise(dtype: torch.dtype) -> None:
    """A float stream in half precision is kept (checkpoint) because it drifts; an exact
    one does not drift, so it is freed, and still bitwise plain."""
    blocks, params = _net(8, dtype)
    for b in blocks:  # small F and G: the half-precision grids hold values below 32
        for m in (b.F, b.G):  # type: ignore[attr-defined]
            with torch.no_grad():
                m[-1].weight.mul_(0.1)
    x = torch.randn(4, 8).to(dtype).requires_grad_()
    h = x * 1.0
    with inv.explain() as report:
        y = inv.invertible_call(inv.chain(*blocks), h)
    assert report.freed and h.untyped_storage().nbytes() == 0
    got = torch.autograd.grad(_loss(y), [x, *params])
    y_want = inv.chain(*blocks)(x * 1.0)
    want = torch.autograd.grad(_loss(y_want), [x, *params])
    assert torch.equal(y.detach(), y_want.detach())
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_values_past_the_range_are_an_error_naming_exact_and_the_range() -> None:
    block = inv.couple(lambda h: h * 1000.0, lambda h: h, exact=True)
    with pytest.raises(inv.InvfuncError, match=r"exact=True keeps values below 256 .* F's output reached"):
        block(torch.ones(2, 4))
    with pytest.raises(inv.InvfuncError, match=r"the input reached inf"):
        inv.couple(nn.Linear(2, 2), nn.Linear(2, 2), exact=True)(torch.tensor([[1.0, float("inf"), 0, 0]]))
    wide = inv.couple(lambda h: h * 1000.0, lambda h: h, exact=4096.0)  # a declared range: coarser grid
    x = torch.ones(2, 4)
    assert torch.equal(wide.inverse(wide(x)), x)
    with pytest.raises(ValueError, match=r"exact= must be True, False, or the largest magnitude"):
        inv.couple(nn.Linear(2, 2), exact=-1.0)


def test_a_nondeterministic_f_is_detected_not_silent() -> None:
    """NOTE [Exact couplings], rule 6: F giving other bits in the backward (here a hidden
    counter, as a nondeterministic kernel or another thread count would) raises."""
    calls = [0]
    lin = nn.Linear(2, 2)

    def flaky(h: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return lin(h) + 2.0**-10 * calls[0]

    block = inv.couple(flaky, nn.Linear(2, 2), exact=True)
    x = torch.randn(3, 4, requires_grad=True)
    y = inv.invertible_call(block, x * 1.0)
    with pytest.raises(inv.InvfuncError, match=r"exact=True, but the rebuilt input is not bit-identical"):
        y.sum().backward()


def test_float_couplings_drift_where_exact_ones_do_not() -> None:
    """The point of exactness, measured: at depth 64 in float32 the float coupling's
    gradients differ from plain autograd's, the exact coupling's do not."""
    torch.manual_seed(0)
    errors = {}
    for exact in (False, True):
        blocks = [inv.couple(_mlp(4, torch.float32), _mlp(4, torch.float32), exact=exact) for _ in range(64)]
        params = [p for b in blocks for m in (b.F, b.G) for p in m.parameters()]  # type: ignore[attr-defined]
        x = torch.randn(6, 8, requires_grad=True)
        _, want = _grads("plain", blocks, x, params, "autograd.grad")
        _, got = _grads("one call", blocks, x, params, "autograd.grad")
        errors[exact] = max(float((g - w).abs().max()) for g, w in zip(got, want))
    assert errors[True] == 0.0 and errors[False] > 0.0


def test_a_recorded_exact_coupling_keeps_no_choices() -> None:
    """The grid's rounding inside a recorded F (a closure) is not one of F's discrete
    choices: nothing is kept from the forward for the backward but the output."""
    lin, lin2 = nn.Linear(2, 2), nn.Linear(2, 2)
    block = inv.couple(lambda h: torch.tanh(lin(h)), lambda h: lin2(h), exact=True)
    x = torch.randn(3, 4, requires_grad=True)
    with inv.explain() as report:
        y = inv.invertible_call(block, x * 1.0)
        y.sum().backward()
    assert report.freed and not report.choices and not report.diverged


def test_torch_func_grad_is_bitwise_too() -> None:
    blocks, _ = _net(6, torch.float64)
    net = inv.chain(*blocks)
    x = torch.randn(3, 8, dtype=torch.float64)

    def f(v: torch.Tensor, call: bool) -> torch.Tensor:
        return _loss(inv.invertible_call(net, v * 1.0) if call else net(v * 1.0))

    assert torch.equal(torch.func.grad(f)(x, True), torch.func.grad(f)(x, False))


@pytest.mark.parametrize("exact", [True, False])
def test_backward_inside_its_own_autocast_region_reaches_every_parameter(exact: bool) -> None:
    """The engine's no-grad forward must not leave graph-less casts in autocast's cache (torch
    2.4 caches them for the region): the backward's recompute, inside the same region, would
    read them and the parameters would get no gradient."""
    torch.manual_seed(0)
    blocks = [inv.couple(_mlp(8, torch.float32), _mlp(8, torch.float32), exact=exact) for _ in range(3)]
    params = [p for b in blocks for m in (b.F, b.G) for p in m.parameters()]  # type: ignore[attr-defined]
    x = torch.randn(4, 16)
    got = []
    for call in (True, False):  # invertible_call first, each in a region of its own
        x0 = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = inv.invertible_call(inv.chain(*blocks), x0 * 1) if call else inv.chain(*blocks)(x0 * 1)
            got.append(torch.autograd.grad(y.square().sum(), [x0, *params], allow_unused=True))
    assert all(g is not None for g in got[0])
    if exact:
        assert all(torch.equal(a, b) for a, b in zip(*got))
    else:
        assert all(torch.allclose(a, b, rtol=1e-2, atol=1e-3) for a, b in zip(*got))


def test_an_output_changed_in_place_is_rounded_again() -> None:
    """NOTE [Exact couplings], rule 5: every exact coupling rounds its input, so an output
    edited in place off the grid is put back on it by the next one, as a plain call does."""
    blocks, _ = _net(2, torch.float32)
    x = torch.randn(4, 8, requires_grad=True)
    y = inv.invertible_call(blocks[0], x * 1.0)
    with torch.no_grad():
        y.add_(2.0**-20)  # off the grid now
    z = inv.invertible_call(blocks[1], y)
    assert torch.equal(z.detach(), blocks[1](y.detach()))  # the plain call rounds its input
    assert torch.equal(z.detach(), _on_grid(z.detach(), 16))
