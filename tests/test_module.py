"""``inv.as_module``: an Invertible in an ``nn.Module`` tree (NOTE [A module around a function])."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import invfunc as inv
from _util import F64, assert_all_close, freed


def revnet(depth: int = 3, width: int = 3) -> inv.Invertible:
    torch.manual_seed(0)
    mlp = lambda: nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width)).double()  # noqa: E731
    return inv.chain(*[inv.couple(mlp(), mlp()) for _ in range(depth)])


def apply(h: torch.Tensor, module: nn.Module) -> torch.Tensor:
    return module(h)


def test_parameters_reach_every_module_once() -> None:
    shared = nn.Linear(2, 2).double()
    scale = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    held = nn.Linear(2, 2).double()
    net = inv.chain(
        inv.couple(shared, shared),  # one module as F and G
        inv.invertible(
            lambda x: x * scale.exp(), inverse=lambda y: y * (-scale).exp()
        ),  # a closure's Parameter
        inv.couple(functools.partial(apply, module=held)),  # a module bound by partial
        inv.couple(shared, lambda h: held(h)),  # both again, one through a closure
    )
    model = inv.as_module(net)
    params = list(model.parameters())
    assert len(params) == len({id(p) for p in params}) == 5
    assert {id(p) for p in params} == {id(p) for p in [*shared.parameters(), scale, *held.parameters()]}
    names = [n for n, _ in model.named_parameters()]
    assert names == [
        "blocks.0.F.weight",
        "blocks.0.F.bias",
        "blocks.1.scale",
        "blocks.2.F.module.weight",
        "blocks.2.F.module.bias",
    ]
    assert "blocks.3.G.held.weight" in model.state_dict()  # state_dict names every place


def test_a_tensor_that_requires_grad_but_is_no_parameter_is_named() -> None:
    w = torch.zeros(4, requires_grad=True)
    net = inv.invertible(lambda x: x + w, inverse=lambda y: y - w)
    with pytest.warns(
        UserWarning, match=r"as_module\(<lambda>\): fn.w requires grad but is not an nn.Parameter"
    ):
        model = inv.as_module(net)
    assert list(model.parameters()) == []


def test_forward_is_the_memory_efficient_call_and_inverse_inverts() -> None:
    net = revnet()
    model = inv.as_module(net)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    h = x * 2
    y = model(h)
    assert freed(h)
    y.square().sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    net(x * 2).square().sum().backward()
    assert_all_close(got, [p.grad for p in model.parameters()], **F64)
    torch.testing.assert_close(model.inverse(model(x)), x, **F64)
    with inv.explain() as report:
        model(x * 2, mode="checkpoint")  # call options pass through
    assert report.freed == []


def test_to_state_dict_train_eval_and_sequential() -> None:
    torch.manual_seed(0)
    drop = nn.Dropout(0.5)
    net = inv.chain(
        inv.couple(nn.Sequential(nn.Linear(3, 3), drop), nn.Linear(3, 3)), inv.couple(nn.Linear(3, 3))
    )
    model = inv.as_module(net).double()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    x = torch.randn(5, 6, dtype=torch.float64)
    model.eval()
    assert not drop.training
    torch.testing.assert_close(model(x), net(x))  # eval: no dropout, the same function
    model.train()
    assert drop.training

    twin = inv.as_module(
        inv.chain(
            inv.couple(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)), nn.Linear(3, 3)),
            inv.couple(nn.Linear(3, 3)),
        )
    ).double()
    twin.load_state_dict(model.state_dict())
    model.eval(), twin.eval()
    torch.testing.assert_close(twin(x), model(x))

    seq = nn.Sequential(model, nn.Tanh(), inv.as_module(revnet(2)))
    opt = torch.optim.SGD(seq.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = seq(x * 1).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_functional_call_gives_plain_gradients() -> None:
    model = inv.as_module(revnet())
    x = torch.randn(4, 6, dtype=torch.float64)
    params = {k: v.detach() + 0.1 for k, v in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor], mode: str) -> torch.Tensor:
        return torch.func.functional_call(model, p, (x * 1,), {"mode": mode}).square().sum()

    got = torch.func.grad(loss)(params, "invertible")
    want = torch.func.grad(loss)(params, "plain")
    assert_all_close([got[k] for k in want], list(want.values()), **F64)


def test_deepcopy_is_independent() -> None:
    model = inv.as_module(
        inv.chain(revnet(2), inv.couple(functools.partial(apply, module=nn.Linear(3, 3).double())))
    )
    twin = copy.deepcopy(model)
    pairs = list(zip(model.parameters(), twin.parameters()))
    assert pairs and all(a is not b and torch.equal(a, b) for a, b in pairs)
    # the copy's function calls the copy's modules: training it leaves the original alone
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(twin.parameters(), lr=0.5)
    twin(torch.randn(4, 6, dtype=torch.float64)).square().sum().backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert not all(torch.equal(a, b) for a, b in zip(twin.parameters(), before))
    assert all(p.grad is None for p in model.parameters())


def test_deepcopy_refuses_a_module_held_by_a_closure() -> None:
    lin = nn.Linear(3, 3)

    def closes_over(m: nn.Module) -> inv.Invertible:
        return inv.couple(lambda h: m(h))

    model = inv.as_module(closes_over(lin))
    with pytest.raises(
        inv.InvfuncError,
        match=r"copy.deepcopy\(as_module\(couple\(<lambda>\)\)\): fn.F.m is reached through a closure",
    ):
        copy.deepcopy(model)


def test_not_an_invertible() -> None:
    with pytest.raises(TypeError, match=r"as_module\(fn\): fn must be an Invertible, got Linear"):
        inv.as_module(nn.Linear(2, 2))  # type: ignore[arg-type]


def test_repr_shows_the_structure() -> None:
    text = repr(inv.as_module(revnet(2)))
    assert "fn=chain(couple(Sequential, Sequential), couple(Sequential, Sequential))" in text
    assert "(blocks): ModuleList" in text and "(F): Sequential" in text
