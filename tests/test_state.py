"""Randomness replays, state updates once, autocast replays."""

from __future__ import annotations

import pytest
import torch

import invfunc as inv
from _util import F64, assert_all_close


def _dropout_net() -> tuple[inv.Invertible, list[torch.Tensor]]:
    torch.manual_seed(0)
    F = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.Tanh()).double()
    G = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.3)).double()
    rr = inv.couple(lambda h: torch.nn.functional.rrelu(h, training=True) + torch.randn_like(h) * 0.1)
    return inv.chain(inv.couple(F, G), rr, inv.couple(G, F)), [*F.parameters(), *G.parameters()]


@pytest.mark.parametrize("spelling", ["one call", "call per block"])
def test_dropout_and_random_ops_match_plain_under_the_same_seed(spelling: str) -> None:
    net, params = _dropout_net()
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)

    def run(call):  # type: ignore[no-untyped-def]
        torch.manual_seed(123)
        y = call(x * 1)
        grads = torch.autograd.grad(y.square().sum(), [x, *params])
        return [y.detach(), *grads, torch.rand(5)]  # the caller's stream after the step, too

    def per_block(h: torch.Tensor) -> torch.Tensor:
        for b in net.blocks:
            h = inv.invertible_call(b, h)
        return h

    want = run(net)
    got = run((lambda h: inv.invertible_call(net, h)) if spelling == "one call" else per_block)
    assert_all_close(got, want, **F64)


def test_rng_replay_leaves_the_generator_as_plain_autograd_does() -> None:
    net, _ = _dropout_net()
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    net(x * 1).sum().backward()
    want = torch.get_rng_state()
    torch.manual_seed(5)
    inv.invertible_call(net, x * 1).sum().backward()
    assert torch.equal(torch.get_rng_state(), want)


def test_batchnorm_statistics_update_once_per_step() -> None:
    torch.manual_seed(0)
    bn_a, bn_b = torch.nn.BatchNorm1d(3).double(), torch.nn.BatchNorm1d(3).double()
    lin = torch.nn.Linear(3, 3).double()
    x = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    plain = inv.couple(torch.nn.Sequential(lin, bn_a))
    ours = inv.couple(torch.nn.Sequential(lin, bn_b))
    want = torch.autograd.grad(plain(x * 1).square().sum(), [x, *lin.parameters(), *bn_a.parameters()])
    got = torch.autograd.grad(
        inv.invertible_call(ours, x * 1).square().sum(), [x, *lin.parameters(), *bn_b.parameters()]
    )
    assert_all_close(got, want, **F64)
    assert bn_b.num_batches_tracked.item() == 1
    torch.testing.assert_close(bn_b.running_mean, bn_a.running_mean, **F64)
    torch.testing.assert_close(bn_b.running_var, bn_a.running_var, **F64)


def test_batchnorm_in_eval_mode() -> None:
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm1d(3).double().eval()
    bn.running_mean.uniform_()
    block = inv.couple(torch.nn.Sequential(torch.nn.Linear(3, 3).double(), bn))
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(block(x * 1).sum(), x)
    got = torch.autograd.grad(inv.invertible_call(block, x * 1).sum(), x)
    assert_all_close(got, want, **F64)


def test_bf16_autocast_matches_plain_autocast() -> None:
    torch.manual_seed(0)
    F = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
    G = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
    net = inv.chain(inv.couple(F, G), inv.couple(G, F))
    params = [*F.parameters(), *G.parameters()]
    x = torch.randn(8, 32, requires_grad=True)

    def run(call):  # type: ignore[no-untyped-def]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = call(x * 1)
        assert y.dtype == torch.float32  # the coupling stream stays in float32
        return [y, *torch.autograd.grad(y.square().mean(), [x, *params])]

    want = run(net)
    got = run(lambda h: inv.invertible_call(net, h))
    assert_all_close(got, want, rtol=2e-2, atol=2e-2)


def test_backward_outside_the_autocast_region_replays_it() -> None:
    torch.manual_seed(0)
    seen = []

    def F(h: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.linear(h, torch.eye(4))
        seen.append(out.dtype)
        return out.float()

    block = inv.couple(F)
    x = torch.randn(2, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = inv.invertible_call(block, x * 1)
    y.sum().backward()
    assert seen and all(d == torch.bfloat16 for d in seen)


def test_train_eval_switch_between_forward_and_backward_is_detected() -> None:
    torch.manual_seed(0)
    F = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5)).double()
    block = inv.couple(F)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    y = inv.invertible_call(block, x * 1)
    F.eval()
    with pytest.raises(inv.InvfuncError, match=r"switched between train and eval mode"):
        y.sum().backward()
    F.train()
    inv.invertible_call(block, x * 1).sum().backward()  # no switch: fine


def test_eval_switch_of_pure_modules_is_harmless() -> None:
    torch.manual_seed(0)
    F = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh()).double()
    block = inv.couple(F)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    y = inv.invertible_call(block, x * 1)
    F.eval()  # Linear and Tanh do not depend on the mode
    (g,) = torch.autograd.grad(y.sum(), x)
    (want,) = torch.autograd.grad(block(x * 1).sum(), x)
    torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)


def test_user_generators_replay_like_the_default_one() -> None:
    # random ops drawing from a user torch.Generator (generator=g) inside F and G: the
    # replays draw the forward's numbers and leave g where plain autograd leaves it
    g = torch.Generator().manual_seed(5)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)

    def F(h: torch.Tensor) -> torch.Tensor:
        return h * w + 0.1 * torch.randn(h.shape, generator=g, dtype=h.dtype)

    def G(h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h) * torch.rand(h.shape, generator=g, dtype=h.dtype)

    block = inv.couple(F, G)
    results = {}
    for mode in ("plain", "invertible"):
        g.manual_seed(5)
        x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        x.requires_grad_()
        y = inv.invertible_call(block, x * 1, mode=mode)
        grads = torch.autograd.grad(y.square().sum(), [x, w])
        results[mode] = (grads, g.get_state())
    assert_all_close(results["invertible"][0], results["plain"][0], rtol=1e-10, atol=1e-12)
    assert torch.equal(results["invertible"][1], results["plain"][1])
