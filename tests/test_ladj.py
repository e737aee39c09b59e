"""Log-determinants through composition (NOTE [Log-determinants]): declared with
``ladj=True``, summed by chains, an extra output of the engine that keeps nothing alive."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import invfunc as inv
from _util import F64, assert_all_close, freed, saved_bytes

MODES = ["invertible", "checkpoint", "plain"]


def affine(c: int, *, seed: int) -> tuple[inv.Invertible, list[torch.Tensor]]:
    """``y = x * exp(s) + b`` per channel, with its log-det ``sum(s)`` per sample."""
    g = torch.Generator().manual_seed(seed)
    s = torch.nn.Parameter(0.3 * torch.randn(c, generator=g, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(c, generator=g, dtype=torch.float64))

    def fwd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * s.exp() + b, s.sum().expand(len(x))

    def bwd(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (y - b) * (-s).exp(), -s.sum().expand(len(y))

    return inv.invertible(fwd, inverse=bwd, ladj=True), [s, b]


def tanh_flow() -> inv.Invertible:
    """An elementwise bijection whose log-det depends on the input: ``y = x + 0.5 tanh(x)``
    has no closed-form inverse; Newton's method gives it in float64."""

    def fwd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.tanh(x)
        return x + 0.5 * t, torch.log1p(0.5 * (1 - t * t)).flatten(1).sum(1)

    def bwd(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = y.clone()
        for _ in range(60):
            t = torch.tanh(x)
            x = x - (x + 0.5 * t - y) / (1 + 0.5 * (1 - t * t))
        t = torch.tanh(x)
        return x, -torch.log1p(0.5 * (1 - t * t)).flatten(1).sum(1)

    return inv.invertible(fwd, inverse=bwd, ladj=True)


def flow(depth: int = 3, c: int = 6) -> tuple[inv.Invertible, list[torch.Tensor]]:
    torch.manual_seed(0)
    blocks: list[inv.Invertible] = []
    params: list[torch.Tensor] = []
    for k in range(depth):
        a, ps = affine(c, seed=k)
        lin = torch.nn.Linear(c // 2, c // 2).double()
        blocks += [a, inv.couple(lin, lin), tanh_flow()]
        params += [*ps, *lin.parameters()]
    return inv.chain(*blocks), params


def nll(out: Any) -> torch.Tensor:
    z, ladj = out
    return (0.5 * z.square().flatten(1).sum(1) - ladj).mean() + (z * ladj[:, None]).sin().mean()


def grads(
    run: Callable[[torch.Tensor], Any], x: torch.Tensor, params: list[torch.Tensor], how: str
) -> list[torch.Tensor]:
    wrt = [x, *params]
    if how == "autograd.grad":
        return list(torch.autograd.grad(nll(run(x * 1.0)), wrt))
    if how == "double backward":
        (gx,) = torch.autograd.grad(nll(run(x * 1.0)), x, create_graph=True)
        return list(torch.autograd.grad(gx.square().sum(), wrt))
    for t in wrt:
        t.grad = None
    nll(run(x * 1.0)).backward()
    return [t.grad.clone() for t in wrt]  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how", ["backward", "autograd.grad", "double backward"])
def test_gradients_through_outputs_and_ladj_are_plain(mode: str, how: str) -> None:
    net, params = flow()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    want = grads(net, x, params, how)
    got = grads(lambda h: inv.invertible_call(net, h, mode=mode), x, params, how)
    assert_all_close(got, want, **F64)


def test_one_call_per_block_and_torch_func_grad() -> None:
    net, params = flow(2)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)

    def per_block(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros(len(h), dtype=h.dtype)
        for b in net.blocks:  # type: ignore[attr-defined]
            out = inv.invertible_call(b, h)
            if b._ladj is True:
                h, ladj = out
                total = total + ladj
            else:
                h = out
        return h, total

    assert_all_close(grads(per_block, x, params, "backward"), grads(net, x, params, "backward"), **F64)

    def loss(h: torch.Tensor, call: bool) -> torch.Tensor:
        return nll(inv.invertible_call(net, h * 1.0) if call else net(h * 1.0))

    x0 = x.detach()
    torch.testing.assert_close(torch.func.grad(loss)(x0, True), torch.func.grad(loss)(x0, False), **F64)


def test_ladj_equals_log_abs_det_of_the_jacobian_per_sample() -> None:
    net, _ = flow(2, c=4)
    x = torch.randn(3, 4, dtype=torch.float64)
    _, ladj = inv.invertible_call(net, x)
    for i in range(len(x)):
        jac = torch.func.jacrev(lambda v: net(v[None])[0][0])(x[i])
        torch.testing.assert_close(ladj[i], torch.linalg.slogdet(jac)[1], **F64)


@pytest.mark.parametrize("mode", MODES)
def test_the_inverse_direction_samples_with_its_own_ladj(mode: str) -> None:
    net, params = flow()
    x = torch.randn(5, 6, dtype=torch.float64)
    z, ladj = net(x)
    back, ladj_inv = inv.invertible_call(net.inverse, z, mode=mode)
    torch.testing.assert_close(back, x, **F64)
    torch.testing.assert_close(ladj_inv, -ladj, **F64)
    zz = z.detach().requires_grad_()
    want = grads(net.inverse, zz, params, "autograd.grad")
    got = grads(lambda h: inv.invertible_call(net.inverse, h, mode=mode), zz, params, "autograd.grad")
    assert_all_close(got, want, **F64)


def test_intermediates_are_freed_and_memory_is_flat_in_depth() -> None:
    held = []
    for depth in (2, 8):
        net, _ = flow(depth, c=64)
        x = torch.randn(32, 64, dtype=torch.float64, requires_grad=True)
        h = x * 1.0
        z, ladj = inv.invertible_call(net, h)
        assert freed(h)
        held.append(saved_bytes(nll((z, ladj))))
    assert held[0] == held[1]


def test_volume_preserving_chains_return_data_alone() -> None:
    """Couplings and functions declared ladj=0 add no log-det; a chain of them returns its
    data alone, and one with a log-det member returns the sum of the members'."""
    lin = torch.nn.Linear(2, 2).double()
    neg = inv.invertible(lambda x: -x, inverse=lambda y: -y, ladj=0)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert isinstance(inv.chain(inv.couple(lin, lin), neg)(x), torch.Tensor)
    a, _ = affine(4, seed=0)
    _, ladj = inv.invertible_call(inv.chain(neg, a, inv.couple(lin), a), x * 1)
    torch.testing.assert_close(ladj, 2 * a(x)[1], **F64)


def test_a_member_of_unknown_log_det_is_refused() -> None:
    a, _ = affine(4, seed=0)
    mystery = inv.invertible(torch.exp, inverse=torch.log)
    with pytest.raises(TypeError, match=r"the log-det of exp is unknown.*ladj=True.*ladj=0"):
        inv.chain(a, inv.couple(torch.nn.Linear(2, 2)), mystery)


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda x: x * 2, r"declared with ladj=True, so it must return .* but it returned a Tensor"),
        (lambda x: (x * 2, torch.zeros(())), r"log-det of shape \(\) .* shape \(3,\)"),
        (lambda x: (x * 2, torch.zeros(3, 4)), r"log-det of shape \(3, 4\)"),
        (lambda x: (x * 2, torch.zeros(3, dtype=torch.long)), r"dtype torch.int64"),
    ],
    ids=["no tuple", "scalar", "per element", "integer"],
)
def test_a_malformed_log_det_is_a_clear_error(fn: Callable[..., Any], match: str) -> None:
    block = inv.invertible(fn, inverse=lambda y: y / 2, ladj=True)
    x = torch.randn(3, 4, requires_grad=True)
    for run in (block, lambda h: inv.invertible_call(block, h)):
        with pytest.raises((TypeError, ValueError), match=match):
            run(x * 1)


@pytest.mark.parametrize("bad", [False, 1, "yes", 0.0])
def test_the_ladj_option_is_checked(bad: object) -> None:
    with pytest.raises(ValueError, match=r"ladj must be True .* 0 .* or left out"):
        inv.invertible(lambda x: x, inverse=lambda y: y, ladj=bad)  # type: ignore[arg-type]


def test_a_split_with_a_log_det() -> None:
    """Two data outputs and a log-det; the inverse merges them."""

    def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a, b = x.chunk(2, 1)
        return a * 2, b.clone(), torch.full((len(x),), a.size(1) * 0.6931471805599453, dtype=x.dtype)

    def merge(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([a / 2, b], 1), torch.full((len(a),), -a.size(1) * 0.6931471805599453, dtype=a.dtype)

    block = inv.invertible(split, inverse=merge, ladj=True)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    a, b, ladj = inv.invertible_call(block, x * 1)
    assert block.n_outputs == 2 and block.inverse.n_inputs == 2
    back, ladj_inv = inv.invertible_call(block.inverse, a, b)
    torch.testing.assert_close(back, x, **F64)
    torch.testing.assert_close(ladj + ladj_inv, torch.zeros(3, dtype=torch.float64), **F64)
