"""Composition with torch.func, double backward, gradcheck."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, jacrev, vjp, vmap

import invfunc as inv
from _util import F64, assert_all_close, mlp


def _block(dim: int = 1) -> tuple[inv.Invertible, torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    F, G = mlp(3).double(), mlp(3).double()
    return inv.couple(F, G, dim=dim), F, G


def test_func_grad_with_functional_call_swapping_parameters() -> None:
    _, F, G = _block()
    params = {k: v.detach() + 0.1 for k, v in F.named_parameters()}
    x = torch.randn(4, 6, dtype=torch.float64)

    def loss(p, xx, call):  # type: ignore[no-untyped-def]
        b = inv.couple(lambda h: functional_call(F, p, (h,)), G)
        return call(b, xx).square().sum()

    want = grad(loss, argnums=(0, 1))(params, x, lambda f, z: f(z))
    got = grad(loss, argnums=(0, 1))(params, x, inv.invertible_call)
    assert_all_close([*got[0].values(), got[1]], [*want[0].values(), want[1]], **F64)


def test_func_vjp_and_jacrev() -> None:
    block, _, _ = _block()
    x = torch.randn(2, 6, dtype=torch.float64)
    ct = torch.randn(2, 6, dtype=torch.float64)
    _, pull_a = vjp(block, x)
    _, pull_b = vjp(lambda z: inv.invertible_call(block, z), x)
    assert_all_close(pull_b(ct), pull_a(ct), **F64)
    assert_all_close([jacrev(lambda z: inv.invertible_call(block, z))(x)], [jacrev(block)(x)], **F64)


def test_vmap_of_grad() -> None:
    block, _, _ = _block(dim=-1)
    x = torch.randn(5, 6, dtype=torch.float64)
    want = vmap(grad(lambda z: block(z).square().sum()))(x)
    got = vmap(grad(lambda z: inv.invertible_call(block, z).square().sum()))(x)
    assert_all_close([got], [want], **F64)


def test_double_backward_and_gradient_penalty() -> None:
    block, F, G = _block()
    params = [*F.parameters(), *G.parameters()]
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)

    def run(call):  # type: ignore[no-untyped-def]
        y = call(x * 1)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), [x, *params])

    assert_all_close(run(lambda h: inv.invertible_call(block, h)), run(block), **F64)


def test_hessian() -> None:
    block, _, _ = _block()
    x = torch.randn(1, 6, dtype=torch.float64)
    want = torch.autograd.functional.hessian(lambda z: block(z).square().sum(), x)
    got = torch.autograd.functional.hessian(lambda z: inv.invertible_call(block, z).square().sum(), x)
    assert_all_close([got], [want], **F64)


def test_gradcheck_and_gradgradcheck() -> None:
    block, _, _ = _block()
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)

    def f(z: torch.Tensor) -> torch.Tensor:
        return inv.invertible_call(block, z.clone())  # a fresh intermediate each time: freed

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradcheck(f, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(f, (x,))


def test_nested_invertible_call_inside_a_block() -> None:
    inner, F, G = _block()
    outer = inv.couple(lambda h: inv.invertible_call(inner, torch.cat([h, h], 1))[:, :3])
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    params = [*F.parameters(), *G.parameters()]
    plain_outer = inv.couple(lambda h: inner(torch.cat([h, h], 1))[:, :3])
    want = torch.autograd.grad(plain_outer(x * 1).sum(), [x, *params])
    got = torch.autograd.grad(inv.invertible_call(outer, x * 1).sum(), [x, *params])
    assert_all_close(got, want, **F64)


def test_forward_mode_ad_is_a_clear_error_and_plain_mode_works() -> None:
    block, _, _ = _block()
    x = torch.randn(2, 6, dtype=torch.float64)
    t = torch.randn(2, 6, dtype=torch.float64)
    with pytest.raises(
        inv.InvfuncError, match=r"forward-mode AD .* is not supported yet; run this call with mode='plain'"
    ):
        torch.func.jvp(lambda z: inv.invertible_call(block, z), (x,), (t,))
    _, got = torch.func.jvp(lambda z: inv.invertible_call(block, z, mode="plain"), (x,), (t,))
    _, want = torch.func.jvp(block, (x,), (t,))
    assert_all_close([got], [want], **F64)


class _UserF(torch.nn.Module):
    """A user-defined module: recorded by running it (not known statically)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3).double()
        self.scale = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(h)) * self.scale


class _Model(torch.nn.Module):
    def __init__(self, user_defined: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.F = _UserF() if user_defined else mlp(3).double()
        self.G = _UserF() if user_defined else mlp(3).double()
        self.net = inv.chain(inv.couple(self.F, self.G), inv.couple(self.G, self.F))
        self.mode = "invertible"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return inv.invertible_call(self.net, x * 1, mode=self.mode).square().sum()


@pytest.mark.parametrize("user_defined", [False, True], ids=["built-in modules", "user module"])
@pytest.mark.parametrize("how", ["torch.func.grad", "autograd.grad"])
def test_functional_call_around_the_whole_model(user_defined: bool, how: str) -> None:
    """Parameters swapped only during the forward: backward must use the swapped ones."""
    model = _Model(user_defined)
    x = torch.randn(4, 6, dtype=torch.float64)
    params = {k: v.detach() + 0.5 for k, v in model.named_parameters()}

    def grads(mode: str) -> list[torch.Tensor]:
        model.mode = mode
        if how == "torch.func.grad":
            g = grad(lambda p: functional_call(model, p, (x,)))(params)
            return [g[k] for k in params]
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        return list(torch.autograd.grad(functional_call(model, leaves, (x,)), list(leaves.values())))

    assert_all_close(grads("invertible"), grads("plain"), **F64)


def test_a_tensor_swapped_in_that_cannot_be_matched_is_an_error() -> None:
    w = {"t": torch.randn(3, dtype=torch.float64, requires_grad=True)}
    block = inv.couple(lambda h: h * w["t"])  # recorded; reads w["t"] through a closure
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    y = inv.invertible_call(block, x * 1)
    w["t"] = torch.randn(4, dtype=torch.float64, requires_grad=True)  # rebound, other shape
    with pytest.raises(
        inv.InvfuncError, match=r"read a tensor of shape \(4,\) .* did not read in the forward"
    ):
        y.sum().backward()
