"""The generic block's backward holds the rebuilt input once (NOTE [Rebuilt inputs moved,
not copied]) and lets the recompute's unread outputs go; what anyone else can still read
is never touched. Peak memory is measured by the benchmark (``invfunc-generic``); these
tests check the mechanism deterministically, by where memory lives."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import invfunc as inv
from _util import F64, assert_all_close, freed
from invfunc import _compat


def generic(cache: list[torch.Tensor] | None = None) -> tuple[inv.Invertible, list[torch.Tensor]]:
    """An additive coupling written as a generic block; ``cache`` keeps the inverse's results."""
    F, G = torch.nn.Linear(64, 64).double(), torch.nn.Linear(64, 64).double()

    def fwd(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, 1)
        y1 = x1 + F(x2).tanh()
        return torch.cat([y1, x2 + G(y1).tanh()], 1)

    def bwd(y: torch.Tensor) -> torch.Tensor:
        y1, y2 = y.chunk(2, 1)
        x2 = y2 - G(y1).tanh()
        x = torch.cat([y1 - F(x2).tanh(), x2], 1)
        if cache is not None:
            cache.append(x)
        return x

    return inv.invertible(fwd, inverse=bwd), [*F.parameters(), *G.parameters()]


@pytest.mark.skipif(not _compat.CAN_SWAP, reason="this torch cannot move memory between storages")
def test_rebuilt_input_is_moved_into_the_freed_storage() -> None:
    """The inverse's result, which nobody holds, becomes the input's memory: no copy."""
    torch.manual_seed(0)
    block, _ = generic()
    ptrs: list[int] = []
    inverse = block._inv

    def spy(y: torch.Tensor) -> torch.Tensor:
        x = inverse(y)
        ptrs.append(x.data_ptr())
        return x

    block._inv = spy
    x = torch.randn(32, 128, dtype=torch.float64, requires_grad=True)
    h = x * 2
    y = inv.invertible_call(block, h)
    assert freed(h)
    y.square().sum().backward()
    assert len(ptrs) == 1 and h.data_ptr() == ptrs[0]
    torch.testing.assert_close(h, x * 2, **F64)


def test_a_rebuilt_input_someone_holds_is_copied_and_left_intact() -> None:
    torch.manual_seed(0)
    cache: list[torch.Tensor] = []
    block, _ = generic(cache)
    x = torch.randn(32, 128, dtype=torch.float64, requires_grad=True)
    h = x * 2
    inv.invertible_call(block, h).square().sum().backward()
    assert len(cache) == 1 and not freed(cache[0])
    assert cache[0].data_ptr() != h.data_ptr()
    torch.testing.assert_close(cache[0], x * 2, **F64)
    torch.testing.assert_close(h, x * 2, **F64)


def test_the_block_is_differentiated_at_the_refilled_storage() -> None:
    """The recompute reads the input where it was refilled: one copy of it is alive."""
    ptrs: list[int] = []

    def triple(t: torch.Tensor) -> torch.Tensor:
        ptrs.append(t.data_ptr())
        return t * 3

    block = inv.invertible(triple, inverse=lambda y: y / 3)
    x = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    h = x * 2
    inv.invertible_call(block, h).sum().backward()
    assert len(ptrs) == 2 and ptrs[1] == h.data_ptr()  # the forward, then the recompute


def test_recomputed_outputs_someone_kept_are_not_dropped() -> None:
    """The recompute's outputs are freed before the pullback only when nothing else can
    read them: a forward hook that keeps one still reads it afterwards."""
    lin = torch.nn.Linear(6, 6).double()
    kept: list[torch.Tensor] = []
    lin.register_forward_hook(lambda m, i, o: kept.append(o))
    block = inv.invertible(lin, inverse=lambda y: y)  # (the inverse is not used: checkpoint)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    inv.invertible_call(block, x * 1, mode="checkpoint").square().sum().backward()
    assert len(kept) == 2  # the forward, and the backward's recompute
    assert not freed(kept[1])
    torch.testing.assert_close(kept[1], lin(x).detach(), **F64)


@pytest.mark.parametrize("depth", [1, 4])
@pytest.mark.parametrize("use_grad", [False, True], ids=["backward", "autograd.grad"])
def test_generic_chain_gradients_are_plain(depth: int, use_grad: bool) -> None:
    torch.manual_seed(0)
    made = [generic() for _ in range(depth)]
    net = inv.chain(*(b for b, _ in made))
    wrt_params = [p for _, ps in made for p in ps]
    x = torch.randn(16, 128, dtype=torch.float64, requires_grad=True)

    def grads(run: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        wrt = [x, *wrt_params]
        loss = run(x * 2).square().sum()
        if use_grad:
            return list(torch.autograd.grad(loss, wrt))
        for t in wrt:
            t.grad = None
        loss.backward()
        return [t.grad.clone() for t in wrt]  # type: ignore[union-attr]

    assert_all_close(grads(lambda h: inv.invertible_call(net, h)), grads(net), **F64)
