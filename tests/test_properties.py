"""Properties of random invertible composites (invfunc.testing.strategies.composites).

For every drawn composite: the inverse inverts (block by block and as a whole); outputs
and the gradients of the inputs and of every parameter equal plain autograd's, with
``.backward()`` and ``torch.autograd.grad``, in every mode, for one ``invertible_call``
over the whole chain and for one call per block (with the forward's memory reuse on at
every size) — within 1e-10 relative in float64 and
within the reconstruction error in float32; inputs that may be freed are freed, the
others are reported kept, and all hold their values again after the backward.

The number of examples comes from the hypothesis profile (tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import invfunc as inv
from invfunc import _coupling
from invfunc.testing import check_grads, check_inverse
from invfunc.testing.strategies import Composite, composites


@pytest.fixture(autouse=True, scope="module")
def _reuse_every_size() -> Iterator[None]:
    """The composites' tensors are small: let the forward reuse memory at any size (NOTE
    [Outputs nobody holds], NOTE [Outputs in the memory of the input they replace]), so
    that the properties hold of that path too; the others cover small tensors."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_coupling, "REUSE_MIN_BYTES", 0)
        yield


F64 = composites(max_depth=5, width=3, batch=2, dtype=torch.float64)
F32 = composites(max_depth=5, width=3, batch=2, dtype=torch.float32)
F16 = composites(max_depth=5, width=3, batch=2, dtype=torch.float16)
RTOL_F64 = 1e-10
EPS_F32 = torch.finfo(torch.float32).eps


def as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def blocks(c: Composite) -> list[tuple[inv.Invertible, tuple[torch.Tensor, ...]]]:
    return list(zip(c.net.blocks, c.block_args))  # type: ignore[attr-defined]


def per_block(c: Composite, **kwargs: Any) -> Callable[..., Any]:
    """One invertible_call per block: ``for b in net.blocks: h = invfunc.invertible_call(b, h)``."""

    def call(*args: torch.Tensor) -> Any:
        h: Any = args  # the data inputs and the first block's arguments
        for block, _ in blocks(c):
            h = as_tuple(inv.invertible_call(block, *h, **kwargs))
        return h[0] if len(h) == 1 else h

    call.__qualname__ = "per_block"
    return call


def passes_through(block: inv.Invertible, form: str, i: int) -> bool:
    """Whether data input ``i`` of ``block`` comes out as an output (a one-sided pair coupling
    or its inverse returns its second input as is): such an input must not be freed."""
    one_sided = getattr(block, "G", 0) is None or getattr(block.inverse, "G", 0) is None
    return form == "pair" and i == 1 and one_sided


def loss_of(out: Any) -> Any:
    return sum((o * (k + 1)).sin().sum() for k, o in enumerate(as_tuple(out)))


def round_trip_error(c: Composite) -> float:
    """The relative error of inverting the whole composite, block by block."""
    with torch.no_grad():
        x = c.make_input()
        h = as_tuple(c.net(*x, *c.args))
        for block, args in reversed(blocks(c)):
            h = as_tuple(block.inverse(*h, *args))
        return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(h, x))


# -- round trip -------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", [F64, F32, F16], ids=["float64", "float32", "float16"])
@given(data=st.data())
def test_round_trip(strategy: Any, data: st.DataObject) -> None:
    c: Composite = data.draw(strategy)
    h = c.make_input()
    for block, args in blocks(c):
        check_inverse(block, *h, *args)
        h = as_tuple(block(*h, *args))
    check_inverse(c.net, *c.make_input(), *c.args)
    assert inv.inverse(c.net).inverse is c.net
    assert len(c.net.inverse.blocks) == len(c.net.blocks)  # type: ignore[attr-defined]


def test_inverse_of_a_chain_passes_its_arguments() -> None:
    scale = inv.invertible(lambda x, s: x * s.exp(), inverse=lambda y, s: y * (-s).exp())
    shift = inv.invertible(lambda x: x + 1, inverse=lambda y: y - 1)
    s = torch.randn(3, dtype=torch.float64)
    check_inverse(inv.chain(scale, shift), torch.randn(2, 3, dtype=torch.float64), s)


# -- gradients against plain autograd ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["invertible", "checkpoint", "plain"])
@given(c=F64)
def test_grads_one_call_float64(c: Composite, mode: str) -> None:
    check_grads(c.net, *c.make_input(), *c.args, mode=mode, params=c.params, rtol=RTOL_F64)


@given(c=F64)
def test_grads_call_per_block_float64(c: Composite) -> None:
    check_grads(c.net, *c.make_input(), *c.args, call=per_block(c), params=c.params, rtol=RTOL_F64)


@pytest.mark.parametrize("spelling", ["one call", "call per block"])
@given(c=F32)
def test_grads_float32_within_reconstruction_error(c: Composite, spelling: str) -> None:
    # measured: the gradient error stays below 7x the round-trip error; allow 100x
    rtol = 100 * max(round_trip_error(c), EPS_F32)
    # a guard against a vacuous tolerance; exp-scaled composites reach ~2e-6 round trip
    # under the "thorough" profile (1000 examples), hence 1e-3 rather than 1e-4
    assert rtol < 1e-3
    call = per_block(c) if spelling == "call per block" else None
    check_grads(c.net, *c.make_input(), *c.args, call=call, params=c.params, rtol=rtol)


# -- freeing ----------------------------------------------------------------------------------------


def shared(t: torch.Tensor, others: list[torch.Tensor]) -> bool:
    """Whether ``t``'s storage (not freed) is also another tensor's."""
    ptr = t.untyped_storage().data_ptr()
    return ptr != 0 and any(o is not t and o.untyped_storage().data_ptr() == ptr for o in others)


def check_freed(
    inputs: tuple[torch.Tensor, ...], aliased: list[bool], outputs: Any, report: Any, where: str
) -> None:
    """Every input the call may free is freed (and reported); the others are reported kept.

    An input may be freed unless it is a view, ``aliased`` says so (its storage is another
    tensor's the test holds), or an output of the call shares its storage.
    """
    freed = {i: n for _, i, n in report.freed}
    kept = {i: why for _, i, why in report.kept}
    for i, t in enumerate(inputs):
        if aliased[i] or t._is_view() or shared(t, list(as_tuple(outputs))):
            assert kept.get(i), f"{where}: input {i} is neither freed nor reported kept"
            continue
        nbytes = t.numel() * t.element_size()
        assert t.untyped_storage().nbytes() == 0, f"{where}: input {i} was not freed: {kept.get(i)}"
        assert freed.get(i) == nbytes, f"{where}: input {i}: report.freed says {freed.get(i)}, not {nbytes}"


def backward_and_check(
    c: Composite, out: Any, boundaries: list[tuple[torch.Tensor, torch.Tensor]], where: str
) -> None:
    """Backward; every parameter gets a gradient, every boundary tensor holds its value again."""
    loss_of(out).backward()
    for p in c.params:
        assert p.grad is not None, f"{where}: a parameter got no gradient"
        p.grad = None
    for k, (t, value) in enumerate(boundaries):
        assert t.untyped_storage().nbytes() > 0, f"{where}: boundary {k} is still freed after the backward"
        torch.testing.assert_close(
            t, value, rtol=1e-12, atol=1e-12, msg=lambda m, k=k: f"{where}: boundary {k}: {m}"
        )


@given(c=F64)
def test_one_call_frees_its_inputs(c: Composite) -> None:
    x = c.make_input()
    hs = tuple(t * 1 for t in x)  # intermediates: freeable
    values = [t.detach().clone() for t in hs]
    with inv.explain() as report:
        out = inv.invertible_call(c.net, *hs, *c.args)
    first = c.net.blocks[0]  # type: ignore[attr-defined]
    # an input passed through by the first block is aliased by that block's output
    aliased = [passes_through(first, c.form, i) for i in range(len(hs))]
    check_freed(hs, aliased, out, report, "one call")
    backward_and_check(c, out, list(zip(hs, values)), "one call")
    assert all(t.grad is not None for t in x)


@given(c=F64)
def test_call_per_block_frees_every_boundary(c: Composite) -> None:
    x = c.make_input()
    h: tuple[Any, ...] = tuple(t * 1 for t in x)
    boundaries: list[tuple[torch.Tensor, torch.Tensor]] = []
    for k, (block, args) in enumerate(blocks(c)):
        values = [t.detach().clone() for t in h]
        held = [*x, *h, *(t for t, _ in boundaries)]
        aliased = [shared(t, held) for t in h]
        with inv.explain() as report:
            out = inv.invertible_call(block, *h, *args)
        check_freed(h, aliased, out, report, f"block {k}")
        boundaries.extend(zip(h, values))
        h = as_tuple(out)
    backward_and_check(c, h, boundaries, "call per block")
    assert all(t.grad is not None for t in x)


@pytest.mark.parametrize("mode", ["checkpoint", "plain"])
@given(c=F64)
def test_other_modes_free_nothing(c: Composite, mode: str) -> None:
    hs = tuple(t * 1 for t in c.make_input())
    values = [t.detach().clone() for t in hs]
    with inv.explain() as report:
        out = inv.invertible_call(c.net, *hs, *c.args, mode=mode)
        out_per_block = per_block(c, mode=mode)(*hs, *c.args)
    assert report.freed == []
    assert all(t.untyped_storage().nbytes() > 0 for t in hs)
    for a, b in zip(as_tuple(out), as_tuple(out_per_block)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    backward_and_check(c, (*as_tuple(out), *as_tuple(out_per_block)), list(zip(hs, values)), mode)
