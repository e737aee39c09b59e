"""Writing results into memory nobody else holds: incoming gradients and fresh outputs."""

from __future__ import annotations

import sys
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from ._compat import is_view, is_zero_tensor, storage_key, tensor_use_count
from ._state import _is_wrapped
from ._storage import _use_count

__all__ = ["REUSE_MIN_BYTES", "movable", "owned"]


def _refs(grads: tuple[torch.Tensor, ...]) -> list[int]:
    return [sys.getrefcount(g) for g in grads]


def _unheld(grads: tuple[torch.Tensor, ...]) -> tuple[bool, ...]:
    """Which incoming gradients nothing but this backward holds, so that it may write the
    input's gradient into them in place.

    NOTE [Incoming gradients nobody holds]: a block's backward returns gradients shaped
    like the gradients it receives, often as their sum with something (``gx2 = gy2 + ...``
    in a coupling). Writing that sum into ``gy2`` itself saves allocating fresh memory
    (on CPU a page fault per 4 KiB touched: a few percent of a step). It is done only when
    nobody else can see ``gy2``: as in PyTorch's own AccumulateGrad, its TensorImpl has one
    reference (a post hook on the node or a second consumer adds one), no other tensor
    shares its storage, no weak reference exists, and its Python object has only the
    references the call into ``backward`` itself makes (a tensor hook that kept it, or
    ``grad_outputs=`` the caller passed in, add one). That last count depends on the
    torch version; it is measured once with a probe Function (:func:`_probe_grad_refs`).
    No gradient is written in place while a graph of the backward is being built."""
    base = _GRAD_REFS[0] if _GRAD_REFS else None
    if base is None or torch.is_grad_enabled():
        return (False,) * len(grads)
    return tuple(n == base and _plain_buffer(g) for n, g in zip(_refs(grads), grads))


def _plain_buffer(g: torch.Tensor) -> bool:
    """A dense tensor alone on its whole storage, writable in place."""
    if (
        type(g) is not torch.Tensor
        or g.layout != torch.strided
        or tensor_use_count(g) != 1
        or g.requires_grad
        or is_view(g)
        or _is_wrapped(g)
    ):
        return False
    storage = g.untyped_storage()
    return (
        _use_count(storage_key(storage)) == 2  # g's and ``storage``
        and g.storage_offset() == 0
        and storage.nbytes() == g.numel() * g.element_size()
        and g.is_contiguous()
        and weakref.getweakrefcount(g) == 0
        and not (g.is_inference() or is_zero_tensor(g) or g.is_conj() or g.is_neg())
    )


def owned(t: torch.Tensor, like: torch.Tensor, refs: int) -> bool:
    """True when ``t``, just returned by a user's function, can be written over in place
    (with a result of ``like``'s dtype and device) without anyone noticing; ``refs`` is
    ``sys.getrefcount(t)`` taken in the caller's frame, as ``owned(t, like,
    sys.getrefcount(t))``.

    NOTE [Outputs nobody holds]: a coupling's ``y1 = x1 + F(x2)`` is written into F's
    output when nothing but the caller's local variable holds it: the same tensor facts
    as for an incoming gradient (:func:`_plain_buffer`: one TensorImpl reference, alone
    on its dense storage, no weak reference, not a view), and no Python reference but the
    caller's (a forward hook or a closure that kept it adds one; the count is measured at
    import, :data:`_OWNED_REFS`). The count is taken in the caller's frame, not in a
    function it calls: a frame-evaluation hook left installed (``torch.compile`` leaves
    one after a ``fullgraph=True`` failure) adds a reference to a callee's arguments.
    Float addition commutes, so ``f.add_(x1)`` holds the bits ``x1 + f`` would have;
    only the fresh memory is saved."""
    return refs == _OWNED_REFS and t.dtype == like.dtype and t.device == like.device and _plain_buffer(t)


def movable(seq: list[torch.Tensor], i: int) -> bool:
    """True when ``seq[i]``, a result of the user's inverse, is held by ``seq`` alone and
    alone on its dense storage, so that its memory may be moved into the storage it
    refills (NOTE [Rebuilt inputs moved, not copied]). The same tensor facts as
    :func:`owned`, and no Python reference but the list's (a cache in the user's inverse
    adds one; the count is measured at import, :data:`_MOVABLE_REFS`)."""
    return _refs_in(seq, i) == _MOVABLE_REFS and _plain_buffer(seq[i])


def _refs_in(seq: Sequence[torch.Tensor], i: int) -> int:
    return sys.getrefcount(seq[i])


def _probe_movable_refs() -> int:
    seq = [torch.empty(1)]
    return _refs_in(seq, 0)


_MOVABLE_REFS = _probe_movable_refs()


#: The smallest tensor (bytes) worth writing into memory that is already there rather
#: than allocating: a smaller one comes from the allocator's free lists with no page
#: faults, and the checks cost more (a few microseconds) than the allocation.
REUSE_MIN_BYTES = 1 << 16


def _echo(t: torch.Tensor, like: None, refs: int) -> int:
    return refs


def _probe_owned_refs() -> int:
    t = torch.empty(1)
    return _echo(t, None, sys.getrefcount(t))  # the same stack as owned(f, x, sys.getrefcount(f))


_OWNED_REFS = _probe_owned_refs()

_GRAD_REFS: list[int | None] = []


class _Probe(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        _GRAD_REFS.append(_refs(grads)[0])  # same call path and helper as _BlockFunction.backward
        if not _plain_buffer(grads[0]):  # torch 2.4's engine holds another reference: never alone
            _GRAD_REFS.append(None)
        return grads[0]


def _probe_grad_refs() -> None:
    """Measure the references an incoming gradient nobody else holds has on entry to a
    Function's backward (NOTE [Incoming gradients nobody holds]); run once, at import."""
    try:
        with torch.enable_grad(), torch.inference_mode(False):
            x = torch.zeros(2, requires_grad=True)
            (_Probe.apply(x) * 2).sum().backward()  # type: ignore[no-untyped-call]  # the gradient: a fresh product
    except Exception:  # pragma: no cover - then no gradient is ever written in place
        _GRAD_REFS.clear()
    if len(_GRAD_REFS) != 1:  # pragma: no cover
        _GRAD_REFS[:] = [None]


_probe_grad_refs()

#: Whether incoming gradients nobody holds can be written over in this torch (not in 2.4,
#: whose autograd engine keeps a reference of its own; NOTE [Torch versions]).
INPLACE_GRADS: bool = _GRAD_REFS[0] is not None
