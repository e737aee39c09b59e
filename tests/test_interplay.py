"""Composition with the rest of PyTorch: anomaly mode, checkpointing, saved-tensor hooks,
module hooks, threads, and recovery after an error in backward."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.utils.checkpoint as ckpt

import invfunc as inv
from _util import F64, assert_all_close, grads_of, mlp, revnet


def test_detect_anomaly() -> None:
    net, params = revnet(3, 3)
    x = torch.randn(4, 6, dtype=torch.float64)
    want = grads_of(net, x, params, use_grad=True)
    with torch.autograd.detect_anomaly():
        got = grads_of(lambda h: inv.invertible_call(net, h), x, params, use_grad=True)
    assert_all_close(got, want, **F64)


@pytest.mark.parametrize("reentrant", [False, True])
def test_inside_a_checkpointed_region(reentrant: bool) -> None:
    net, params = revnet(3, 3)
    x = torch.randn(4, 6, dtype=torch.float64)

    def region(h: torch.Tensor) -> torch.Tensor:
        return inv.invertible_call(net, h.tanh()).sin()

    want = grads_of(lambda h: net(h.tanh()).sin(), x, params, use_grad=False)
    got = grads_of(lambda h: ckpt.checkpoint(region, h, use_reentrant=reentrant), x, params, use_grad=False)
    assert_all_close(got, want, **F64)


def test_checkpoint_inside_the_block() -> None:
    torch.manual_seed(0)
    F, G = mlp(3).double(), mlp(3).double()
    block = inv.couple(lambda h: ckpt.checkpoint(F, h, use_reentrant=False), G)
    ref = inv.couple(F, G)
    x = torch.randn(4, 6, dtype=torch.float64)
    params = [*F.parameters(), *G.parameters()]
    want = grads_of(ref, x, params, use_grad=True)
    got = grads_of(lambda h: inv.invertible_call(block, h), x, params, use_grad=True)
    assert_all_close(got, want, **F64)


def test_save_on_cpu_hooks_around_the_call() -> None:
    net, params = revnet(3, 3)
    x = torch.randn(4, 6, dtype=torch.float64)
    want = grads_of(net, x, params, use_grad=False)
    with torch.autograd.graph.save_on_cpu():
        got = grads_of(lambda h: inv.invertible_call(net, h), x, params, use_grad=False)
    assert_all_close(got, want, **F64)


def test_module_full_backward_hooks_fire_once_per_backward() -> None:
    torch.manual_seed(0)
    F, G = mlp(3).double(), mlp(3).double()
    calls: list[int] = []
    F.register_full_backward_hook(lambda m, gi, go: calls.append(1))
    block = inv.couple(F, G)  # a hook: F is recorded, not known statically
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    inv.invertible_call(block, x * 1).sum().backward()
    assert len(calls) == 1
    calls.clear()
    block(x * 1).sum().backward()
    assert len(calls) == 1


def test_error_in_the_inverse_propagates_and_the_next_call_works() -> None:
    fail = {"now": True}

    def inverse(y: torch.Tensor) -> torch.Tensor:
        if fail["now"]:
            raise RuntimeError("inverse exploded")
        return y / 3

    f = inv.invertible(lambda x: x * 3, inverse=inverse)
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="inverse exploded"):
        inv.invertible_call(f, x * 1).sum().backward()
    assert torch.equal(torch.get_rng_state(), rng)
    assert not inv._state.replaying()  # the replay marker was reset
    fail["now"] = False
    (g,) = torch.autograd.grad(inv.invertible_call(f, x * 1).sum(), x)
    torch.testing.assert_close(g, torch.full_like(x, 3.0))


def test_two_threads_train_concurrently_without_cross_talk() -> None:
    results: dict[int, list[torch.Tensor]] = {}
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            net, params = revnet(4, 4, seed=seed)
            x = torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            with inv.mode("invertible" if seed % 2 else "checkpoint"):
                got = grads_of(lambda h: inv.invertible_call(net, h), x, params, use_grad=True)
            results[seed] = [a - b for a, b in zip(got, grads_of(net, x, params, use_grad=True))]
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2, 3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(results) == 4
    assert max(d.abs().max().item() for diffs in results.values() for d in diffs) < 1e-10


def test_default_device_context_is_in_force_in_the_backward() -> None:
    devices: list[torch.device] = []

    def F(h: torch.Tensor) -> torch.Tensor:
        devices.append(torch.empty(0).device)
        return h * 2

    block = inv.couple(F)
    x = torch.randn(2, 4, requires_grad=True)
    with torch.device("meta"):
        pass  # entering and leaving a device context must not leak into the call
    y = inv.invertible_call(block, x * 1)
    y.sum().backward()
    assert devices and all(d.type == "cpu" for d in devices)


def test_default_device_context_of_the_forward_is_re_entered_in_the_backward() -> None:
    # F makes a tensor on the default device; the forward runs under a meta device
    # context, the backward outside it: the recompute must make it on meta again.
    def F(h: torch.Tensor) -> torch.Tensor:
        return h * torch.ones(h.shape[-1])

    block = inv.couple(F, lambda h: h * 2.0)
    grads = {}
    for mode in ("plain", "invertible"):
        with torch.device("meta"):
            x = torch.empty(2, 4, requires_grad=True)
            y = inv.invertible_call(block, x * 1, mode=mode)
        (g,) = torch.autograd.grad(y.sum(), [x])
        grads[mode] = g
    assert grads["invertible"].device.type == "meta" and grads["invertible"].shape == (2, 4)
