"""Gradients equal plain autograd's: arguments, module parameters, captured tensors."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import invfunc as inv
from _util import F64, assert_all_close, grads_of, mlp, revnet


@pytest.mark.parametrize("depth", [1, 2, 8, 64])
@pytest.mark.parametrize("use_grad", [False, True], ids=["backward", "autograd.grad"])
@pytest.mark.parametrize("spelling", ["one call", "call per block", "checkpoint"])
def test_chain_of_couplings_matches_plain(depth: int, use_grad: bool, spelling: str) -> None:
    net, params = revnet(depth, 5)
    x = torch.randn(4, 10, dtype=torch.float64)

    def per_block(h: torch.Tensor) -> torch.Tensor:
        for b in net.blocks:
            h = inv.invertible_call(b, h)
        return h

    run = {
        "one call": lambda h: inv.invertible_call(net, h),
        "call per block": per_block,
        "checkpoint": lambda h: inv.invertible_call(net, h, mode="checkpoint"),
    }[spelling]
    want = grads_of(net, x, params, use_grad=use_grad)
    got = grads_of(run, x, params, use_grad=use_grad)
    assert_all_close(got, want, **F64)


def test_float32_within_reconstruction_error() -> None:
    net, params = revnet(16, 16, dtype=torch.float32)
    x = torch.randn(32, 32)
    want = grads_of(net, x, params, use_grad=False)
    got = grads_of(lambda h: inv.invertible_call(net, h), x, params, use_grad=False)
    assert_all_close(got, want, rtol=1e-4, atol=1e-5)


def test_pair_form_and_one_sided_coupling() -> None:
    torch.manual_seed(0)
    F, G = mlp(3).double(), mlp(3).double()
    net = inv.chain(inv.couple(F, G), inv.couple(G), inv.couple(F, G))
    params = [*F.parameters(), *G.parameters()]
    x1 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)

    def loss(run):  # type: ignore[no-untyped-def]
        y1, y2 = run(x1 * 1, x2 * 1)
        return y1.square().sum() + (y2 * 3).sin().sum()

    want = torch.autograd.grad(loss(net), [x1, x2, *params])
    got = torch.autograd.grad(loss(lambda a, b: inv.invertible_call(net, a, b)), [x1, x2, *params])
    assert_all_close(got, want, **F64)


def test_explicit_parameters_and_closures() -> None:
    torch.manual_seed(0)
    s = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    captured = torch.randn(3, dtype=torch.float64, requires_grad=True)
    scale = inv.invertible(lambda x, s: x * s.exp(), inverse=lambda y, s: y * (-s).exp())
    shift = inv.invertible(lambda x: x + b, inverse=lambda y: y - b)  # b captured by closure
    block = inv.couple(lambda h: torch.tanh(h * captured), lambda h: h * captured.sin())
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)

    def run(call):  # type: ignore[no-untyped-def]
        h = call(scale, x * 1, s)
        h = call(inv.chain(shift, block), h)
        return h.square().sum()

    want = torch.autograd.grad(run(lambda f, *a: f(*a)), [x, s, b, captured])
    got = torch.autograd.grad(run(inv.invertible_call), [x, s, b, captured])
    assert_all_close(got, want, **F64)


def test_captured_non_leaf_tensor_gets_gradient() -> None:
    w0 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    w = w0 * 2  # a non-leaf captured by the closure
    block = inv.couple(lambda h: h * w)
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(block(x * 1).sum(), [x, w0], retain_graph=True)
    got = torch.autograd.grad(inv.invertible_call(block, x * 1).sum(), [x, w0])
    assert_all_close(got, want, **F64)


def test_parameter_used_inside_and_outside_accumulates_once() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3).double()
    block = inv.couple(lin)
    calls = []
    lin.weight.register_hook(lambda g: calls.append(1))
    x = torch.randn(2, 6, dtype=torch.float64)
    y = inv.invertible_call(block, x * 1)
    loss = y.sum() + lin(x[:, :3]).sum()
    loss.backward()
    got, got_calls = lin.weight.grad.clone(), len(calls)
    lin.weight.grad = None
    calls.clear()
    (block(x).sum() + lin(x[:, :3]).sum()).backward()
    torch.testing.assert_close(got, lin.weight.grad, **F64)
    assert got_calls == len(calls)  # the hook fires as often as under plain autograd


def test_outputs_unused_by_the_loss() -> None:
    torch.manual_seed(0)
    F, G = mlp(3).double(), mlp(3).double()
    block = inv.couple(F, G)
    x1 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(block(x1 * 1, x2 * 1)[0].sum(), [x1, x2, *F.parameters()])
    got = torch.autograd.grad(inv.invertible_call(block, x1 * 1, x2 * 1)[0].sum(), [x1, x2, *F.parameters()])
    assert_all_close(got, want, **F64)


def test_inputs_not_requiring_grad_only_params_do() -> None:
    net, params = revnet(3, 4)
    x = torch.randn(3, 8, dtype=torch.float64)
    y = inv.invertible_call(net, x)
    assert y.requires_grad
    want = torch.autograd.grad(net(x).sum(), params)
    got = torch.autograd.grad(y.sum(), params)
    assert_all_close(got, want, **F64)


def test_retain_graph_second_and_third_backward() -> None:
    net, params = revnet(3, 4)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(net(x * 1).square().sum(), [x, *params])
    loss = inv.invertible_call(net, x * 1).square().sum()
    for _ in range(3):
        got = torch.autograd.grad(loss, [x, *params], retain_graph=True)
        assert_all_close(got, want, **F64)


def test_second_backward_without_retain_graph_raises_pytorch_error() -> None:
    net, _ = revnet(2, 4)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    loss = inv.invertible_call(net, x * 1).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_partial_backward_with_inputs() -> None:
    net, params = revnet(2, 4)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    inv.invertible_call(net, x * 1).square().sum().backward(inputs=[params[0]])
    got = params[0].grad.clone()
    assert x.grad is None and params[1].grad is None
    params[0].grad = None
    net(x * 1).square().sum().backward(inputs=[params[0]])
    torch.testing.assert_close(got, params[0].grad, **F64)


def test_multi_step_training_tracks_plain() -> None:
    net_a, pa = revnet(4, 8, seed=3)
    net_b, pb = revnet(4, 8, seed=3)
    opt_a, opt_b = torch.optim.SGD(pa, lr=0.1), torch.optim.SGD(pb, lr=0.1)
    torch.manual_seed(1)
    for _ in range(5):
        x = torch.randn(16, 16, dtype=torch.float64)
        for net, opt, call in ((net_a, opt_a, False), (net_b, opt_b, True)):
            opt.zero_grad()
            y = inv.invertible_call(net, x.tanh()) if call else net(x.tanh())
            y.square().mean().backward()
            opt.step()
    assert_all_close(pb, pa, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("container", ["list", "nested list", "dict", "dataclass"])
def test_tensors_in_containers_passed_as_parameters_get_plain_gradients(container: str) -> None:
    # catalogue item 8: containers of tensors after the data input reach the function
    # unchanged; their tensors are found while the forward runs, like captured tensors
    @dataclasses.dataclass
    class Scale:
        w: torch.Tensor

    def unwrap(ws: Any) -> torch.Tensor:
        if isinstance(ws, dict):
            return ws["w"]  # type: ignore[no-any-return]
        if isinstance(ws, Scale):
            return ws.w
        while isinstance(ws, list):
            ws = ws[0]
        return ws  # type: ignore[no-any-return]

    scale = inv.invertible(lambda x, ws, s: x * unwrap(ws) + s, inverse=lambda y, ws, s: (y - s) / unwrap(ws))
    torch.manual_seed(0)
    w = torch.rand(6, dtype=torch.float64, requires_grad=True)
    wrap = {
        "list": lambda t: [t],
        "nested list": lambda t: [[t]],
        "dict": lambda t: {"w": t},
        "dataclass": Scale,
    }
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    got = torch.autograd.grad(
        inv.invertible_call(scale, x * 1, wrap[container](w), 0.5).square().sum(), [x, w]
    )
    want = torch.autograd.grad(scale(x * 1, wrap[container](w), 0.5).square().sum(), [x, w])
    assert_all_close(got, want, rtol=1e-10, atol=1e-12)


def test_weight_set_as_a_plain_attribute_of_a_built_in_module_gets_its_gradient() -> None:
    # as FSDP1's flat parameters do: Linear.weight is a plain tensor attribute, not a
    # Parameter; static discovery must not miss it (it was a silent missing gradient)
    torch.manual_seed(0)
    F, G = torch.nn.Linear(4, 4).double(), torch.nn.Linear(4, 4).double()
    w = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    del F.weight
    F.weight = w * 1  # type: ignore[assignment]
    block = inv.couple(F, G)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    loss = inv.invertible_call(block, x * 1).square().sum()
    got = torch.autograd.grad(loss, [x, w, G.weight], retain_graph=True)  # w * 1 serves both runs
    want = torch.autograd.grad(block(x * 1).square().sum(), [x, w, G.weight])
    assert_all_close(got, want, **F64)


def test_parameter_replaced_between_forward_and_backward_is_a_clear_error() -> None:
    # as FSDP1 with use_orig_params does to a module it does not wrap itself
    F, G = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    y = inv.invertible_call(inv.couple(F, G), torch.randn(3, 8, requires_grad=True) * 1)
    w = F.weight
    del F.weight
    F.weight = w.view_as(w)  # type: ignore[assignment]
    with pytest.raises(inv.InvfuncError, match=r"parameters of its modules changed since the forward"):
        y.square().sum().backward()
