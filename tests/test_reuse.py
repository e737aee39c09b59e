"""Memory the backward reuses: the caller's boundaries nobody holds any more, and
incoming gradients nobody holds (NOTE [Caller's boundaries nobody holds], NOTE
[Incoming gradients nobody holds]).

Each reuse is checked both ways: it happens where nothing else can see the memory
(counted by spying on the engine), and wherever the caller can still reach the tensor
(a variable, a hook's closure, a foreign autograd node, a stored gradient) the values
are exactly those of plain autograd after the backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
import torch
from tests._util import F64, assert_all_close, freed, mlp

import invfunc as inv
from invfunc import _autograd, _compat, _coupling
from invfunc._reuse import INPLACE_GRADS
from invfunc._storage import StorageHandle

DEPTH = 5

# NOTE [Torch versions]: these optimisations are off where this torch lacks what they need
NEEDS_SWAP = pytest.mark.skipif(
    not _compat.CAN_SWAP, reason="moving memory between storages needs UntypedStorage._swap_data_ptr_"
)
NEEDS_INPLACE_GRADS = pytest.mark.skipif(
    not INPLACE_GRADS, reason="this torch's autograd engine holds incoming gradients: never written over"
)


@pytest.fixture
def adopts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts memory moved from a block's output into its rebuilt input."""
    count = [0]
    original = StorageHandle.adopt

    def counting(self: StorageHandle, other: StorageHandle) -> None:
        count[0] += 1
        original(self, other)

    monkeypatch.setattr(StorageHandle, "adopt", counting)
    return count


@pytest.fixture
def in_place(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts gradients written over the incoming gradient's memory."""
    count = [0]
    original = _coupling._alone

    def counting(t: torch.Tensor, n: int) -> bool:
        ok = original(t, n)
        count[0] += ok
        return ok

    monkeypatch.setattr(_coupling, "_alone", counting)
    return count


def _blocks(pair: bool = False) -> tuple[list[inv.Invertible], list[torch.Tensor]]:
    torch.manual_seed(0)
    blocks = [inv.couple(mlp(3).double(), mlp(3).double()) for _ in range(DEPTH)]
    params = [p for b in blocks for m in (b.F, b.G) for p in m.parameters()]  # type: ignore[attr-defined]
    return blocks, params


def _per_block(
    blocks: list[inv.Invertible],
    params: list[torch.Tensor],
    x: torch.Tensor,
    *,
    invertible: bool,
    keep: Callable[[int, torch.Tensor], None] = lambda k, h: None,
) -> list[torch.Tensor]:
    """Gradients of a chain run with one call per block; ``keep`` sees every boundary."""
    x = x.detach().requires_grad_()
    h = x * 1
    for k, b in enumerate(blocks):
        h = inv.invertible_call(b, h) if invertible else b(h)
        if k < len(blocks) - 1:
            keep(k, h)
    wrt = [x, *params]
    return list(torch.autograd.grad(h.square().sum(), wrt))


@NEEDS_SWAP
def test_boundaries_nobody_holds_lend_their_memory(adopts: list[int]) -> None:
    blocks, params = _blocks()
    x = torch.randn(4, 6, dtype=torch.float64)
    want = _per_block(blocks, params, x, invertible=False)
    got = _per_block(blocks, params, x, invertible=True)
    assert_all_close(got, want, **F64)
    assert adopts[0] == DEPTH - 1  # every boundary between two calls


def _hold_in_list(store: list[torch.Tensor]) -> Callable[[int, torch.Tensor], None]:
    return lambda k, h: store.append(h)


def _hold_in_hook(store: list[torch.Tensor]) -> Callable[[int, torch.Tensor], None]:
    def keep(k: int, h: torch.Tensor) -> None:
        # the closure holds h; the hook reads it after the backward has passed it
        h.register_hook(lambda g, h=h: store.append(h))

    return keep


def _hold_alias(store: list[torch.Tensor]) -> Callable[[int, torch.Tensor], None]:
    def keep(k: int, h: torch.Tensor) -> None:
        # a hook run between two backwards keeps a detached alias, not h itself
        h.register_hook(lambda g, h=h: store.append(h.detach()))

    return keep


@pytest.mark.parametrize("holder", [_hold_in_list, _hold_in_hook, _hold_alias])
def test_boundaries_the_caller_holds_keep_their_values(
    holder: Callable[[list[torch.Tensor]], Callable[[int, torch.Tensor], None]], adopts: list[int]
) -> None:
    blocks, params = _blocks()
    x = torch.randn(4, 6, dtype=torch.float64)
    plain: list[torch.Tensor] = []
    mine: list[torch.Tensor] = []
    want = _per_block(blocks, params, x, invertible=False, keep=holder(plain))
    got = _per_block(blocks, params, x, invertible=True, keep=holder(mine))
    assert_all_close(got, want, **F64)
    assert len(mine) == len(plain) == DEPTH - 1
    assert_all_close([t.clone() for t in mine], plain, **F64)
    if holder is not _hold_alias:
        assert adopts[0] == 0


def test_boundary_saved_by_a_foreign_node_keeps_its_values(adopts: list[int]) -> None:
    # h * w saves h itself (its TensorImpl, not its storage): a later backward through
    # that product alone reads h, so h's memory is not lent, though nobody names h.
    blocks, params = _blocks()
    x = torch.randn(4, 6, dtype=torch.float64)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    sides: list[torch.Tensor] = []

    def keep(k: int, h: torch.Tensor) -> None:
        sides.append((h * w).sum())

    got = _per_block(blocks, params, x, invertible=True, keep=keep)
    side_got = torch.autograd.grad(sum(sides), w)[0]
    sides.clear()
    want = _per_block(blocks, params, x, invertible=False, keep=keep)
    side_want = torch.autograd.grad(sum(sides), w)[0]
    assert_all_close(got, want, **F64)
    torch.testing.assert_close(side_got, side_want, **F64)
    assert adopts[0] == 0


@NEEDS_SWAP
def test_lent_boundaries_are_refilled_by_a_second_backward(adopts: list[int]) -> None:
    blocks, params = _blocks()
    x = torch.randn(4, 6, dtype=torch.float64)
    want = _per_block(blocks, params, x, invertible=False)
    xi = x.detach().requires_grad_()
    h = xi * 1
    for b in blocks:
        h = inv.invertible_call(b, h)
    loss = h.square().sum()
    first = torch.autograd.grad(loss, [xi, *params], retain_graph=True)
    second = torch.autograd.grad(loss, [xi, *params])
    assert_all_close(list(first), want, **F64)
    assert_all_close(list(second), want, **F64)
    # the first block's input (the caller's x * 1) stays refilled after the first backward,
    # so the first block's second backward rebuilds it into fresh memory: one move fewer
    assert adopts[0] == 2 * (DEPTH - 1) - 1


# -- incoming gradients -------------------------------------------------------------------


def _chain_grads(
    run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, wrt: list[torch.Tensor]
) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    return list(torch.autograd.grad(run(x * 1).square().sum(), [x, *wrt]))


class _Probe(torch.autograd.Function):
    seen: ClassVar[list[bool]] = []

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        _Probe.seen.append(_autograd._unheld(grads)[0])  # as _BlockFunction.backward asks
        return grads[0]


def _writes_over_gradients_now() -> bool:
    """Whether a backward in this process would write over an incoming gradient now: after
    test_compile's failed ``torch.compile(fullgraph=True)`` (torch 2.15 on Python 3.13)
    the reference counts in a backward differ, which turns the writes off for the rest of
    the process (safely: the gradients are then added out of place)."""
    _Probe.seen.clear()
    (_Probe.apply(torch.zeros(2, requires_grad=True)) * 2).sum().backward()  # type: ignore[no-untyped-call]
    return _Probe.seen == [True]


@NEEDS_INPLACE_GRADS
@pytest.mark.parametrize("spelling", ["one call", "per block"])
def test_gradients_are_written_over_incoming_ones_nobody_holds(spelling: str, in_place: list[int]) -> None:
    if not _writes_over_gradients_now():
        pytest.skip("writes over incoming gradients are off in this process (after an earlier torch.compile)")
    blocks, params = _blocks()
    net = inv.chain(*blocks)

    def run(h: torch.Tensor) -> torch.Tensor:
        if spelling == "one call":
            return inv.invertible_call(net, h)  # type: ignore[no-any-return]
        for b in blocks:
            h = inv.invertible_call(b, h)
        return h

    x = torch.randn(4, 6, dtype=torch.float64)
    assert_all_close(_chain_grads(run, x, params), _chain_grads(net, x, params), **F64)
    assert in_place[0] > DEPTH


def _stored_gradients(invertible: bool, how: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients, and what a hook of kind ``how`` stored during the backward."""
    blocks, params = _blocks()
    store: list[torch.Tensor] = []
    handles = []
    if how == "module hook":
        for b in blocks:
            handles.append(b.G.register_full_backward_hook(lambda m, gi, go: store.append(go[0])))  # type: ignore[attr-defined]
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    h = x * 1
    for b in blocks:
        h = inv.invertible_call(b, h) if invertible else b(h)
        if how == "tensor hook":
            h.register_hook(store.append)
        elif how == "retain_grad":
            h.retain_grad()
            store.append(h)
        elif how == "node post hook" and invertible:
            h.grad_fn.register_hook(lambda gi, go: store.append(go[0]))  # type: ignore[union-attr]
    grads = list(torch.autograd.grad(h.square().sum(), [x, *params]))
    for handle in handles:
        handle.remove()
    stored = [t.grad if how == "retain_grad" else t for t in store]
    return grads, [t.clone() for t in stored]  # type: ignore[union-attr]


@pytest.mark.parametrize("how", ["tensor hook", "retain_grad", "module hook", "node post hook"])
def test_gradients_the_caller_stored_keep_their_values(how: str) -> None:
    got, got_stored = _stored_gradients(True, how)
    # a post hook on the block's node sees what a tensor hook on its output sees
    want, want_stored = _stored_gradients(False, "tensor hook" if how == "node post hook" else how)
    assert_all_close(got, want, **F64)
    assert got_stored and len(got_stored) == len(want_stored)
    assert_all_close(got_stored, want_stored, **F64)


def test_grad_outputs_passed_in_are_not_written() -> None:
    blocks, params = _blocks()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    h = x * 1
    for b in blocks:
        h = inv.invertible_call(b, h)
    v = torch.randn(4, 6, dtype=torch.float64)
    before = v.clone()
    got = torch.autograd.grad(h, [x, *params], grad_outputs=v)
    assert torch.equal(v, before)
    h = x * 1
    for b in blocks:
        h = b(h)
    want = torch.autograd.grad(h, [x, *params], grad_outputs=v)
    assert_all_close(list(got), list(want), **F64)


def _pass_through_pairs() -> Iterator[tuple[str, Callable[[torch.Tensor], torch.Tensor], torch.Tensor]]:
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    yield "captured full-shape bias", (lambda t: t + b), b
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    yield "identity of the input", (lambda t: t * 1 + w), w


@pytest.mark.parametrize("spelling", ["one call", "per block"])
def test_gradients_passed_through_unchanged_are_not_overwritten(spelling: str) -> None:
    # G(y) = y + b hands its incoming gradient to b unchanged (AddBackward passes it on):
    # b's gradient aliases the coupling's gy2, which must not then be written over.
    for _name, fn, leaf in _pass_through_pairs():
        blocks = [inv.couple(fn, fn) for _ in range(3)]
        net = inv.chain(*blocks)

        def run(
            h: torch.Tensor, blocks: list[inv.Invertible] = blocks, net: inv.Invertible = net
        ) -> torch.Tensor:
            if spelling == "one call":
                return inv.invertible_call(net, h)  # type: ignore[no-any-return]
            for blk in blocks:
                h = inv.invertible_call(blk, h)
            return h

        x = torch.randn(4, 6, dtype=torch.float64)
        assert_all_close(_chain_grads(run, x, [leaf]), _chain_grads(net, x, [leaf]), **F64)


@pytest.mark.parametrize("modes", [("checkpoint", "invertible"), ("invertible", "checkpoint")])
def test_mixed_modes_per_block_and_a_second_backward(modes: tuple[str, str]) -> None:
    blocks, params = _blocks()
    x = torch.randn(4, 6, dtype=torch.float64)
    want = _per_block(blocks, params, x, invertible=False)
    xi = x.detach().requires_grad_()
    h = xi * 1
    for k, b in enumerate(blocks):
        h = inv.invertible_call(b, h, mode=modes[k % 2])
    loss = h.square().sum()
    for retain in (True, False):
        got = torch.autograd.grad(loss, [xi, *params], retain_graph=retain)
        assert_all_close(list(got), want, **F64)


def _pair_grads(
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, invertible: bool
) -> list[torch.Tensor]:
    """Gradients of ``loss(y1, y2)`` for a chain run with one call per block on pairs."""
    blocks, params = _blocks()
    xi = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    xi.requires_grad_()
    h = (xi[:, :3] * 1, xi[:, 3:] * 1)
    for b in blocks:
        h = inv.invertible_call(b, *h) if invertible else b(*h)
    return list(torch.autograd.grad(loss(*h), [xi, *params]))


@NEEDS_SWAP
def test_pair_boundaries_nobody_holds_lend_their_memory(adopts: list[int]) -> None:
    def loss(y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        return y1.square().sum() + y2.square().sum()

    assert_all_close(_pair_grads(loss, invertible=True), _pair_grads(loss, invertible=False), **F64)
    assert adopts[0] == 2 * (DEPTH - 1)  # both halves of every boundary between two calls


@pytest.mark.parametrize("one_sided", [False, True])
def test_one_gradient_tensor_handed_to_two_calls(one_sided: bool) -> None:
    # AddBackward hands the very same gradient tensor to both summands: the call whose
    # backward runs first must not write over what the other still reads.
    torch.manual_seed(0)
    blocks = [inv.couple(mlp(3).double(), None if one_sided else mlp(3).double()) for _ in range(4)]
    params = [p for b in blocks for m in (b.F, b.G) if m is not None for p in m.parameters()]  # type: ignore[attr-defined]
    x = torch.randn(4, 6, dtype=torch.float64)

    def grads(call: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        xi = x.detach().requires_grad_()
        a, b = xi * 1, xi * 2
        for blk in blocks[:2]:
            a = call(blk, a)
        for blk in blocks[2:]:
            b = call(blk, b)
        return list(torch.autograd.grad((a + b).sum(), [xi, *params]))

    assert_all_close(grads(inv.invertible_call), grads(lambda blk, h: blk(h)), **F64)


def test_one_gradient_tensor_for_both_halves_of_a_pair() -> None:
    # (y1 + y2).sum(): y1 and y2 get the same gradient tensor; writing gz1 into it would
    # change gy2 under the coupling's feet.
    def loss(y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        return (y1 + y2).sum()

    assert_all_close(_pair_grads(loss, invertible=True), _pair_grads(loss, invertible=False), **F64)


# -- the forward: sums written into F's and G's outputs (NOTE [Outputs nobody holds]) ----

Fn = Callable[[torch.Tensor], torch.Tensor]


@pytest.fixture(autouse=True)
def _reuse_small(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests' tensors are small: let the forward reuse memory of any size."""
    monkeypatch.setattr(_coupling, "REUSE_MIN_BYTES", 0)


def _recording(fn: Fn, seen: list[int]) -> Fn:
    def run(x: torch.Tensor) -> torch.Tensor:
        out = fn(x)
        seen.append(out.data_ptr())
        return out

    return run


def test_pair_outputs_are_written_into_outputs_nobody_holds() -> None:
    torch.manual_seed(0)
    F, G = mlp(3).double(), mlp(3).double()
    f_ptrs: list[int] = []
    g_ptrs: list[int] = []
    block = inv.couple(_recording(F, f_ptrs), _recording(G, g_ptrs))
    x1 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y1, y2 = inv.invertible_call(block, x1, x2)
    assert (y1.data_ptr(), y2.data_ptr()) == (f_ptrs[0], g_ptrs[0])  # no fresh memory for the sums
    ref1 = x1 + F(x2)
    assert_all_close(y1, ref1, **F64)
    assert_all_close(y2, x2 + G(ref1), **F64)
    wrt = [x1, x2, *F.parameters(), *G.parameters()]
    got = torch.autograd.grad((y1 * y2).sum(), wrt)
    want = torch.autograd.grad((ref1 * (x2 + G(ref1))).sum(), wrt)
    for a, b in zip(got, want):
        assert_all_close(a, b, **F64)


def _keep_in_list(store: list[torch.Tensor]) -> Callable[[Fn], Fn]:
    def wrap(fn: Fn) -> Fn:
        def run(x: torch.Tensor) -> torch.Tensor:
            out = fn(x)
            store.append(out)
            return out

        return run

    return wrap


def _keep_by_hook(store: list[torch.Tensor]) -> Callable[[torch.nn.Module], torch.nn.Module]:
    def wrap(m: torch.nn.Module) -> torch.nn.Module:
        m.register_forward_hook(lambda mod, args, out: store.append(out))
        return m

    return wrap


def _keep_alias(store: list[torch.Tensor]) -> Callable[[Fn], Fn]:
    def wrap(fn: Fn) -> Fn:
        def run(x: torch.Tensor) -> torch.Tensor:
            out = fn(x)
            store.append(out.view(out.shape) if len(store) % 2 else out.detach())  # a view holds
            # its base's TensorImpl; a detached alias holds only its storage
            return out

        return run

    return wrap


@pytest.mark.parametrize("holder", [_keep_in_list, _keep_by_hook, _keep_alias])
def test_outputs_someone_holds_keep_their_values(holder: Callable[..., Callable[..., object]]) -> None:
    torch.manual_seed(0)
    F, G = mlp(3).double(), mlp(3).double()
    store: list[torch.Tensor] = []
    wrap = holder(store)
    block = inv.couple(wrap(F), wrap(G))  # type: ignore[arg-type]
    x1 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y1, y2 = inv.invertible_call(block, x1, x2)
    with torch.no_grad():
        f = F(x2)
        assert_all_close(store[0], f, **F64)  # still F's output, not the sum written over it
        assert_all_close(store[1], G(x1 + f), **F64)
    assert store[0].data_ptr() != y1.data_ptr() and store[1].data_ptr() != y2.data_ptr()


def test_outputs_held_weakly_keep_their_values() -> None:
    import weakref

    torch.manual_seed(0)
    F, G = mlp(3).double(), mlp(3).double()
    refs: list[weakref.ref[torch.Tensor]] = []

    def f(x: torch.Tensor) -> torch.Tensor:
        out = F(x)
        refs.append(weakref.ref(out))
        return out

    block = inv.couple(f, G)
    x1 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y1, _ = inv.invertible_call(block, x1, x2)
    held = refs[0]()
    assert held is None or torch.equal(held, F(x2).detach())  # never the sum written over it
    assert held is not y1


def test_outputs_of_another_dtype_are_not_written_over() -> None:
    torch.manual_seed(0)
    F, G = mlp(3), mlp(3)  # float32 halves of a float64 stream: the sums promote
    block = inv.couple(lambda x: F(x.float()), lambda x: G(x.float()))
    x1 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y1, y2 = inv.invertible_call(block, x1, x2)
    assert y1.dtype == y2.dtype == torch.float64
    ref1 = x1 + F(x2.float())
    assert_all_close(y1, ref1, **F64)
    assert_all_close(y2, x2 + G(ref1.float()), **F64)


# -- the forward: a single tensor's output in the memory of the input it replaces ---------
# (NOTE [Outputs in the memory of the input they replace])


def _one_block(one_sided: bool = False) -> tuple[inv.Invertible, list[torch.Tensor]]:
    torch.manual_seed(0)
    F, G = mlp(3).double(), mlp(3).double()
    block = inv.couple(F) if one_sided else inv.couple(F, G)
    return block, [*F.parameters(), *([] if one_sided else G.parameters())]


@NEEDS_SWAP
@pytest.mark.parametrize("one_sided", [False, True])
def test_output_takes_the_memory_of_the_input_it_frees(one_sided: bool) -> None:
    block, params = _one_block(one_sided)
    x0 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    h = x0 * 2  # a boundary the call may free
    where = h.data_ptr()
    y = inv.invertible_call(block, h)
    assert y.data_ptr() == where  # no fresh memory for the output
    assert freed(h)
    assert_all_close(y, block(x0 * 2), **F64)
    got = torch.autograd.grad(y.square().sum(), [x0, *params])
    want = torch.autograd.grad(block(x0 * 2).square().sum(), [x0, *params])
    assert_all_close(got, want, **F64)


def test_a_lent_input_is_rebuilt_when_read() -> None:
    block, params = _one_block()
    x0 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    h = x0 * 2
    y = inv.invertible_call(block, h)
    y_before = y.detach().clone()
    assert_all_close(h * 1, x0 * 2, **F64)  # read: rebuilt from y by the inverse
    assert torch.equal(y, y_before)  # and the output is untouched by the rebuild
    got = torch.autograd.grad((y.square().sum() + h.sum()), [x0, *params])
    ref_h = x0 * 2
    want = torch.autograd.grad((block(ref_h).square().sum() + ref_h.sum()), [x0, *params])
    assert_all_close(got, want, **F64)


def _hold_view(h: torch.Tensor) -> object:
    return h[:1]


def _hold_alias(h: torch.Tensor) -> object:
    return h.detach()


@pytest.mark.parametrize(
    "how", ["keep=", "a view", "a detached alias", "a leaf not named in free=", "no grad needed"]
)
def test_an_input_that_is_kept_keeps_its_memory_and_values(how: str) -> None:
    block, params = _one_block()
    x0 = torch.randn(4, 6, dtype=torch.float64, requires_grad=how != "no grad needed")
    h = x0 if how == "a leaf not named in free=" else x0 * 2
    held = _hold_view(h) if how == "a view" else _hold_alias(h) if how == "a detached alias" else None
    before = h.detach().clone()
    where = h.data_ptr()
    if how == "no grad needed":
        for p in params:
            p.requires_grad_(False)
    y = inv.invertible_call(block, h, keep=[0] if how == "keep=" else [])
    assert y.data_ptr() != where and not freed(h)
    assert torch.equal(h.detach(), before)  # never written
    if held is not None:
        assert held.data_ptr() == where  # type: ignore[attr-defined]
    assert_all_close(y, block(before), **F64)


def test_lending_under_verify_and_explain() -> None:
    block, _ = _one_block()
    x0 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    h = x0 * 2
    with inv.explain() as rep:
        y = inv.invertible_call(block, h, verify="raise")
    assert [n for *_, n in rep.freed] == [h.numel() * h.element_size()]
    y.square().sum().backward()  # the drift check compares with the input before it lent its memory
    assert x0.grad is not None


@NEEDS_SWAP
def test_a_chain_of_one_calls_with_a_second_backward() -> None:
    blocks, params = _blocks()
    x0 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    h = x0 * 1
    ptrs = []
    for b in blocks:
        ptrs.append(h.data_ptr())
        h = inv.invertible_call(b, h)
    assert h.data_ptr() == ptrs[0]  # one buffer passed down the whole stack
    loss = h.square().sum()
    got1 = torch.autograd.grad(loss, [x0, *params], retain_graph=True)
    got2 = torch.autograd.grad(loss, [x0, *params])
    ref = x0 * 1
    for b in blocks:
        ref = b(ref)
    want = torch.autograd.grad(ref.square().sum(), [x0, *params])
    assert_all_close(got1, want, **F64)
    assert_all_close(got2, want, **F64)


def test_small_tensors_get_fresh_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    # below REUSE_MIN_BYTES an allocation costs less than the checks
    monkeypatch.setattr(_coupling, "REUSE_MIN_BYTES", 1 << 16)
    block, _ = _one_block()
    h = torch.randn(4, 6, dtype=torch.float64, requires_grad=True) * 2
    where = h.data_ptr()
    y = inv.invertible_call(block, h)
    assert y.data_ptr() != where and freed(h)


@NEEDS_SWAP
def test_a_large_input_lends_its_memory_at_the_default_threshold() -> None:
    torch.manual_seed(0)
    n = (1 << 16) // 8  # float64 halves of 64 KiB each
    block = inv.couple(torch.tanh, torch.sin)
    h = torch.randn(1, 2 * n, dtype=torch.float64, requires_grad=True) * 2
    where = h.data_ptr()
    y = inv.invertible_call(block, h)
    assert y.data_ptr() == where


@NEEDS_SWAP
def test_boundaries_inside_a_mixed_chain_lend_their_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    # a chain that is not all couplings runs on single tensors (no pairs inside): each
    # coupling after the first puts its output into the memory of its input
    from invfunc import _apply

    lent = [0]
    finish = _apply.Pending.finish

    def counting(self: _apply.Pending, into: StorageHandle | None) -> None:
        lent[0] += into is not None
        finish(self, into)

    monkeypatch.setattr(_apply.Pending, "finish", counting)
    torch.manual_seed(0)
    couplings = [inv.couple(mlp(3).double(), mlp(3).double()) for _ in range(3)]
    flip = inv.invertible(lambda x: x.flip(1), inverse=lambda y: y.flip(1))
    net = inv.chain(couplings[0], flip, couplings[1], flip, couplings[2])
    params = [p for b in couplings for m in (b.F, b.G) for p in m.parameters()]  # type: ignore[attr-defined]
    x0 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    y = inv.invertible_call(net, x0 * 2)
    assert lent[0] == 2  # the couplings after a flip; the first one's input is the caller's
    got = torch.autograd.grad(y.square().sum(), [x0, *params])
    want = torch.autograd.grad(net(x0 * 2).square().sum(), [x0, *params])
    assert_all_close(got, want, **F64)


def test_a_view_between_blocks_of_a_chain_is_not_written_over() -> None:
    # the boundary after a block that returns a view of its input shares the storage of
    # the block before's output: it is kept (a view is never freed), so never written
    torch.manual_seed(0)
    couplings = [inv.couple(mlp(3).double(), mlp(3).double()) for _ in range(2)]
    same = inv.invertible(lambda x: x.view(x.shape), inverse=lambda y: y.view(y.shape))
    flip = inv.invertible(lambda x: x.flip(1), inverse=lambda y: y.flip(1))
    net = inv.chain(couplings[0], flip, same, couplings[1])
    params = [p for b in couplings for m in (b.F, b.G) for p in m.parameters()]  # type: ignore[attr-defined]
    x0 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    with inv.explain() as rep:
        y = inv.invertible_call(net, x0 * 2)
    assert any("view" in why for *_, why in rep.kept)
    got = torch.autograd.grad(y.square().sum(), [x0, *params])
    want = torch.autograd.grad(net(x0 * 2).square().sum(), [x0, *params])
    assert_all_close(got, want, **F64)
