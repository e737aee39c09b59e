"""Invertibles whose inputs and outputs differ in number or size: splits, merges, unequal
halves (NOTE [Data and parameters]); what a failed backward leaves behind."""

from __future__ import annotations

import pytest
import torch

import invfunc as inv
from _util import F64, assert_all_close, freed, mlp

D64 = torch.float64


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[:, :2] * 2.0, x[:, 2:] * 3.0


def _merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([a / 2.0, b / 3.0], 1)


SPLIT = inv.invertible(_split, inverse=_merge)


def _inputs(*shapes: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=D64) for s in shapes]


def _grads(
    fn: inv.Invertible, xs: list[torch.Tensor], wrt: list[torch.Tensor], mode: str, *args: torch.Tensor
) -> list[torch.Tensor]:
    """Gradients of a loss of ``invertible_call(fn, *(x * 1), *args)`` for xs and ``wrt``."""
    leaves = [x.clone().requires_grad_() for x in xs]
    out = inv.invertible_call(fn, *(x * 1 for x in leaves), *args, mode=mode)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum(
        (o * torch.linspace(0.5, 1.5, o.numel(), dtype=o.dtype).view_as(o)).square().sum() for o in outs
    )
    return list(torch.autograd.grad(loss, [*leaves, *wrt]))


def test_the_inverse_of_a_split_is_a_merge_of_two_inputs() -> None:
    # the example: the merge frees both its inputs and rebuilds them
    s = inv.invertible(
        lambda x: (x[:, :2].clone(), x[:, 2:].clone()), inverse=lambda a, b: torch.cat([a, b], 1)
    )
    assert s.n_inputs == 1 and s.inverse.n_outputs == 1
    x = torch.randn(4, 3, requires_grad=True)
    a, b = (x * 1)[:, :2].clone(), (x * 1)[:, 2:].clone()
    y = inv.invertible_call(s.inverse, a, b)
    assert freed(a) and freed(b)
    y.sum().backward()
    assert not freed(a) and not freed(b)
    torch.testing.assert_close(x.grad, torch.ones(4, 3))


@pytest.mark.parametrize("mode", list(inv.MODES))
@pytest.mark.parametrize("direction", ["split", "merge"])
def test_split_and_merge_gradients_are_plain(mode: str, direction: str) -> None:
    fn = SPLIT if direction == "split" else SPLIT.inverse
    xs = _inputs((5, 4)) if direction == "split" else _inputs((5, 2), (5, 2))
    assert_all_close(_grads(fn, xs, [], mode), _grads(fn, xs, [], "plain"), **F64)


@pytest.mark.parametrize("mode", list(inv.MODES))
def test_splits_and_merges_with_trailing_parameters(mode: str) -> None:
    def split(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, :2] * w.exp(), x[:, 2:].clone()

    def merge(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.cat([a * (-w).exp(), b], 1)

    s = inv.invertible(split, inverse=merge)
    w = torch.randn(2, dtype=D64, requires_grad=True)
    assert s.inverse.n_inputs == 2  # merge(a, b, w): 3 arguments, the last a parameter
    for fn, xs in ((s, _inputs((3, 5))), (s.inverse, _inputs((3, 2), (3, 3)))):
        assert_all_close(_grads(fn, xs, [w], mode, w), _grads(fn, xs, [w], "plain", w), **F64)
    x = torch.randn(3, 5, dtype=D64)
    torch.testing.assert_close(inv.inverse(s)(*s(x, w), w), x, **F64)


@pytest.mark.parametrize("mode", list(inv.MODES))
def test_a_chain_through_a_split_and_a_merge(mode: str) -> None:
    # split -> coupling of the pair -> merge, nested, and its inverse chain
    torch.manual_seed(0)
    body = inv.chain(SPLIT, inv.couple(mlp(2).double(), mlp(2).double()))
    net = inv.chain(body, SPLIT.inverse, inv.couple(mlp(2).double()))
    modules = [m for b in net.blocks for m in (getattr(b, "F", None), getattr(b, "G", None)) if m is not None]
    params = [p for m in modules for p in m.parameters()]
    xs = _inputs((6, 4))
    assert_all_close(_grads(net, xs, params, mode), _grads(net, xs, params, "plain"), **F64)
    y = net(xs[0]).detach()
    torch.testing.assert_close(net.inverse(y), xs[0], **F64)
    assert_all_close(_grads(net.inverse, [y], params, mode), _grads(net.inverse, [y], params, "plain"), **F64)


def test_every_input_of_a_merge_inside_a_chain_is_freed() -> None:
    net = inv.chain(SPLIT, SPLIT.inverse, SPLIT)  # 1 -> 2 -> 1 -> 2
    x = torch.randn(4, 4, requires_grad=True)
    with inv.explain() as report:
        a, b = inv.invertible_call(net, x * 1)
    # the caller's input, the pair between blocks 1 and 2, the tensor between 2 and 3
    assert sorted(report.freed) == [
        ("_split, block 1 of 3", 0, 64),
        ("_split, block 3 of 3", 0, 64),
        ("inverse(_split), block 2 of 3", 0, 32),
        ("inverse(_split), block 2 of 3", 1, 32),
    ]
    (a.sum() + b.sum()).backward()
    torch.testing.assert_close(x.grad, torch.tensor([2.0, 2.0, 3.0, 3.0]).expand(4, 4))


def test_arity_learnt_from_a_call_and_declared() -> None:
    # a variadic signature says nothing: the inverse needs n_outputs, or a call to learn it
    s = inv.invertible(lambda *xs: (xs[0][:, :1], xs[0][:, 1:]), inverse=lambda *ys: torch.cat(ys, 1))
    a, b = torch.randn(3, 1, requires_grad=True), torch.randn(3, 2, requires_grad=True)
    h1, h2 = a * 1, b * 1
    with pytest.raises(TypeError, match=r"2 arguments: cannot tell how many of them .* n_outputs=k"):
        inv.invertible_call(s.inverse, h1, h2)
    assert not freed(h1) and not freed(h2)  # refused before anything ran
    s(torch.randn(3, 3))  # a call shows it returns 2 tensors
    assert s.n_outputs == 2 and s.inverse.n_inputs == 2
    inv.invertible_call(s.inverse, h1, h2).sum().backward()
    declared = inv.invertible(
        lambda *xs: (xs[0][:, :1], xs[0][:, 1:]), inverse=lambda *ys: torch.cat(ys, 1), n_outputs=2
    )
    assert declared.inverse.n_inputs == 2


def test_a_merge_declared_as_one_input_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"If the function merges 2 inputs into one, declare n_inputs=2"):
        inv.invertible(lambda a, b: torch.cat([a, b], 1), inverse=lambda y: (y[:, :1], y[:, 1:]))
    merge = inv.invertible(
        lambda a, b: torch.cat([a, b], 1), inverse=lambda y: (y[:, :1], y[:, 1:]), n_inputs=2
    )
    a, b = torch.randn(2, 1, requires_grad=True), torch.randn(2, 2, requires_grad=True)
    h1, h2 = a * 1, b * 1
    inv.invertible_call(merge, h1, h2).sum().backward()  # both inputs are data: both freed and rebuilt
    torch.testing.assert_close(a.grad, torch.ones(2, 1))
    with pytest.raises(ValueError, match=r"its inverse must take the 3 output\(s\) \(n_outputs=3\)"):
        inv.invertible(lambda x: x, inverse=lambda y: y, n_outputs=3)


# -- couple with unequal halves ------------------------------------------------------------------


def _uneven(d1: int, d2: int) -> inv.Invertible:
    torch.manual_seed(0)
    F = torch.nn.Sequential(torch.nn.Linear(d2, 5), torch.nn.Tanh(), torch.nn.Linear(5, d1)).double()
    G = torch.nn.Sequential(torch.nn.Linear(d1, 5), torch.nn.Tanh(), torch.nn.Linear(5, d2)).double()
    return inv.couple(F, G)


@pytest.mark.parametrize("mode", list(inv.MODES))
@pytest.mark.parametrize("form", ["pair", "one tensor of odd width", "chain of odd width"])
def test_couple_takes_unequal_halves(mode: str, form: str) -> None:
    block = _uneven(2, 3)  # an odd width 5 is split 2 + 3 (n // 2, n - n // 2)
    params = [*block.F.parameters(), *block.G.parameters()]  # type: ignore[attr-defined]
    if form == "pair":
        fn, xs = block, _inputs((4, 2), (4, 3))
    elif form == "one tensor of odd width":
        fn, xs = block, _inputs((4, 5))
    else:
        fn, xs = inv.chain(block, block), _inputs((4, 5))
    assert_all_close(_grads(fn, xs, params, mode), _grads(fn, xs, params, "plain"), **F64)
    out = fn(*xs)
    back = fn.inverse(*out) if isinstance(out, tuple) else fn.inverse(out)
    for b, x in zip(back if isinstance(back, tuple) else (back,), xs):
        torch.testing.assert_close(b, x, **F64)


def test_unequal_halves_in_float32_at_a_size_that_reuses_memory() -> None:
    # large enough for the forward to write the output into the freed input's memory
    torch.manual_seed(0)
    block = inv.couple(torch.nn.Linear(65, 64), torch.nn.Linear(64, 65))
    x = torch.randn(512, 129)
    want = torch.autograd.grad(block(x.requires_grad_()).square().mean(), x)[0]
    h = x.detach().requires_grad_()
    y = inv.invertible_call(inv.chain(block, block), h * 1)
    got = torch.autograd.grad(y.square().mean(), h)[0]
    want = torch.autograd.grad(inv.chain(block, block)(x).square().mean(), x)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_half_of_the_wrong_shape_names_the_shape_it_must_have() -> None:
    block = inv.couple(torch.nn.Linear(3, 3), torch.nn.Linear(2, 3))  # F maps x2 (3) to 3, not x1's 2
    with pytest.raises(ValueError, match=r"F must return a tensor shaped like x1, \(4, 2\)"):
        block(torch.randn(4, 2), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"needs a size of at least 2"):
        inv.couple(torch.nn.Identity())(torch.randn(4, 1))


# -- failures in backward -----------------------------------------------------------------------


def test_an_inverse_that_raises_names_the_call_and_what_is_lost() -> None:
    def bad_inverse(y: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no inverse today")

    f = inv.invertible(lambda x: x * 2, inverse=bad_inverse)
    x = torch.randn(3, requires_grad=True)
    h = x * 1
    y = inv.invertible_call(f, h)
    assert freed(h)
    with pytest.raises(inv.InvfuncError) as info:
        y.sum().backward()
    msg = str(info.value)
    assert "invfunc.invertible_call(<lambda>) backward failed: RuntimeError: no inverse today" in msg
    assert (
        "input 0 (shape (3,)) of the call, freed after the forward, could not be rebuilt and is lost" in msg
    )
    with pytest.raises(
        inv.FreedTensorError, match=r"input 0 of invertible_call\(<lambda>\), was freed and is lost"
    ):
        h + 1


def test_a_failure_after_the_rebuild_says_the_input_was_rebuilt() -> None:
    calls = [0]

    def F(t: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] > 2:  # the recompute (G's first, in the fused backward)
            raise ValueError("F failed in the recompute")
        return t * 2

    block = inv.couple(F, lambda t: t * 3)
    x = torch.randn(2, 4, requires_grad=True)
    h = x * 1
    y = inv.invertible_call(block, h)
    calls[0] = 2
    with pytest.raises(
        inv.InvfuncError, match=r"backward failed: ValueError: F failed in the recompute"
    ) as info:
        y.sum().backward()
    # x2 was rebuilt in place when F failed, x1 not yet: the input is reported lost
    assert "input 0 (shape (2, 4)) of the call, freed after the forward, could not be rebuilt" in str(
        info.value
    )
    with pytest.raises(inv.FreedTensorError, match="is lost"):
        h.sum()


def test_a_rebuild_on_read_that_fails_raises_freed_tensor_error() -> None:
    f = inv.invertible(lambda x: x * 2, inverse=lambda y: (_ for _ in ()).throw(RuntimeError("nope")))
    h = torch.randn(3, requires_grad=True) * 1
    y = inv.invertible_call(f, h)
    with pytest.raises(
        inv.FreedTensorError, match=r"rebuilding it on this read failed \(RuntimeError: nope\)"
    ):
        h.sum()
    del y


# -- reading storage does not rebuild ------------------------------------------------------------


def test_storage_inspection_does_not_rebuild() -> None:
    block = inv.couple(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    x = torch.randn(3, 4, requires_grad=True)
    h = x * 1
    other = torch.zeros(1)
    y = inv.invertible_call(block, h)
    reads = [
        h.untyped_storage().nbytes(),
        h.storage().size(),  # MemCNN's and InvTorch's users check freeing this way
        h.data_ptr() >= 0,
        h.nbytes,
        h.is_set_to(other),
    ]
    assert reads[:2] == [0, 0] and reads[2] and reads[3] == 48 and reads[4] is False
    assert freed(h)  # none of them rebuilt it
    y.sum().backward()
    assert not freed(h)


def test_an_inverse_returning_too_few_tensors_names_the_call_and_the_fix() -> None:
    # a wrong arity found in backward: the inverse of a split returns one tensor, not two
    s = inv.invertible(lambda x: (x[:, :1] * 2, x[:, 1:] * 2), inverse=lambda a, b: torch.cat([a, b], 1))
    wrong = inv.invertible(s.inverse._fn, inverse=lambda y: y / 2, n_inputs=2)  # the split's halves
    a, b = (torch.randn(2, 1, requires_grad=True) * 1), (torch.randn(2, 2, requires_grad=True) * 1)
    y = inv.invertible_call(wrong, a, b)
    with pytest.raises(inv.InvfuncError) as info:
        y.sum().backward()
    msg = str(info.value)
    assert "the inverse returned a tensor of shape (2, 3) and dtype torch.float32 but the block has 2" in msg
    assert "input 0 (shape (2, 1)), input 1 (shape (2, 2)) of the call, freed after the forward, could" in msg
