"""Vector-Jacobian products of a block re-run in backward (NOTE [Two ways to a VJP])."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import _compat
from ._reuse import _MOVABLE_REFS, _refs_in
from ._state import BlockState, _is_wrapped, _replay_region
from ._storage import _use_count

__all__ = ["accumulate", "block_vjp", "drop_if_unread", "section_vjp"]


def _fast_path(*tensors: torch.Tensor) -> bool:
    """True when backward needs no graph of its own: out= writes are allowed."""
    if torch.is_grad_enabled():
        return False
    return not _functorch_active() or not any(_is_wrapped(t) for t in tensors)


_functorch_active = _compat.functorch_active


def block_vjp(
    state: BlockState,
    section: str,
    call: Callable[[Sequence[torch.Tensor]], tuple[torch.Tensor, ...]],
    values: Sequence[torch.Tensor],
    diff: Sequence[int],
    n_positional: int,
    captured_slots: Sequence[int] | None = None,
    *,
    whole: bool = False,
    values_read: bool = True,
) -> tuple[tuple[torch.Tensor, ...], Callable[[Sequence[torch.Tensor]], list[torch.Tensor | None]]]:
    """Run ``call(values)`` and return its outputs and a pullback over ``values[i] for i in diff``.

    ``values`` are the ``n_positional`` tensors ``call`` passes explicitly, then the
    captured tensors the block reads through closures (``captured_slots`` gives their
    indices in ``state.captured``; default all, in order). ``call`` runs ``section``, or
    the whole block if ``whole``: it makes the forward's discrete choices again (NOTE
    [Discrete choices]) and its outputs are compared with the forward's checksums (NOTE
    [Recompute divergence]). With ``values_read=False`` the caller needs only the
    pullback: outputs that nothing in the recompute's graph saved are freed at once
    (their storages left empty) instead of living until the pullback ran.

    NOTE [Two ways to a VJP]: when backward builds no graph and no ``torch.func``
    transform is active, the block is re-run under ``enable_grad`` and differentiated
    with ``torch.autograd.grad`` (the captured tensors are the very objects the block
    reads). Otherwise (``create_graph=True``, ``torch.func``) it is ``torch.func.vjp``
    of the block made pure by substituting the captured tensors (NOTE [Recording and
    replaying a block]), which is itself differentiable and transformable.
    """
    slots = range(len(state.captured)) if captured_slots is None else captured_slots
    originals = state.captured
    if _fast_path(*values):
        # A captured tensor with hooks is differentiated through a detached stand-in, so
        # its hooks fire once, when autograd hands it this block's gradient; the others
        # are differentiated directly (no substitution needed: cheaper).
        hooked = any(_compat.has_backward_hooks(values[i]) for i in diff if i >= n_positional)
        vals = list(values)
        for i in diff:
            if hooked or i < n_positional:
                vals[i] = vals[i].detach().requires_grad_()
        now: Sequence[torch.Tensor] = ()
        if hooked:
            now = list(originals)
            for j, slot in enumerate(slots):
                now[slot] = vals[n_positional + j]
        with (
            state.replay_rng(section),
            torch.enable_grad(),
            state.replay_tracer(now, section, vals[:n_positional], whole),
            _replay_region(),
        ):
            outs = call(vals)
        if state.checksums is not None:
            _check(state, section, whole, outs)
        if not values_read and not _compat.saved_tensors_hooks_active():
            for i in range(len(outs)):
                _drop_unsaved(outs, i)
        n_wrt = len(diff)
        live = [i for i, o in enumerate(outs) if o.requires_grad]
        # single use: the pullback lets go of the graph and the outputs as soon as it ran
        held = [([outs[i] for i in live], [vals[i] for i in diff])]

        def fast_pullback(cts: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
            roots, wrt = held.pop()
            if not roots or not wrt:
                return [None] * n_wrt
            return list(_grad(roots, wrt, [cts[i] for i in live]))

        detached = tuple(o.detach() for o in outs)
        del outs, vals
        return detached, fast_pullback

    def pure(*diff_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vals = list(values)
        for i, v in zip(diff, diff_values):
            vals[i] = v
        now = list(originals)
        for j, slot in enumerate(slots):
            now[slot] = vals[n_positional + j]
        with state.replay_tracer(now, section, vals[:n_positional], whole), _replay_region():
            return call(vals)

    with state.replay_rng(section):
        outs, vjp_fn = torch.func.vjp(pure, *[values[i] for i in diff])  # type: ignore[misc]
    if state.checksums is not None:
        _check(state, section, whole, outs)

    def pullback(cts: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        return list(vjp_fn(tuple(cts)))

    return outs, pullback


def _check(state: BlockState, section: str, whole: bool, outs: Sequence[torch.Tensor]) -> None:
    """Compare a recompute with the forward (NOTE [Recompute divergence]): a section's own
    outputs, or the whole block's when the block is one section (``_section_outputs``)."""
    if not whole or not state.block._section_outputs:
        state.check_recompute(section, outs)


def _drop_unsaved(outs: Sequence[torch.Tensor], i: int) -> None:
    """Free the storage of the recomputed output ``outs[i]`` if nothing can read it: no
    node of the graph saved it (a node that saved it as an input holds its TensorImpl; one
    that saved it as its result, an alias of its storage), no Python reference but
    ``outs``'s (a forward hook or a cache in the user's function that kept it adds one),
    no weak reference, no view, its storage its own. The graph needs only its metadata
    to start the pullback. ``outs`` must be a tuple of the caller's own."""
    if _refs_in(outs, i) != _MOVABLE_REFS:
        return
    out = outs[i]
    if type(out) is not torch.Tensor or out.layout != torch.strided or out.is_nested or out.is_meta:
        return
    storage = out.untyped_storage()
    if (
        _compat.tensor_use_count(out) == 1
        and weakref.getweakrefcount(out) == 0
        and _compat.base_of(out) is None
        and _use_count(_compat.storage_key(storage)) == 2  # out, and ``storage`` itself
        and storage.nbytes() == out.numel() * out.element_size()
    ):
        storage.resize_(0)


def drop_if_unread(out: torch.Tensor) -> None:
    """Free the storage of a recomputed output whose values are no longer needed.

    ``out`` is the detached alias of an output of :func:`block_vjp` whose pullback has
    not run yet. Its values were used (to rebuild the input); the pullback needs only its
    graph, unless some node saved it (a final ``tanh`` saves its result). It is freed only
    when nothing but the output and this alias hold its storage.
    """
    storage = out.untyped_storage()
    # the alias, the output held by the pullback, and ``storage`` itself
    if (
        _compat.base_of(out) is None
        and _use_count(_compat.storage_key(storage)) == 3
        and storage.nbytes() == out.numel() * out.element_size()
    ):
        storage.resize_(0)


def section_vjp(
    state: BlockState,
    fn: Callable[..., Any],
    section: str,
    x: torch.Tensor,
    explicit: Sequence[torch.Tensor],
    captured_now: Sequence[torch.Tensor],
    needs: Sequence[bool],
    *,
    n_out: int = 1,
) -> tuple[Any, Callable[[Any], tuple[torch.Tensor | None, list[tuple[int, torch.Tensor]]]]]:
    """``fn(x, *rest)`` and its VJP over ``x``, the explicit tensors of ``rest`` and the
    captured tensors ``fn`` reads.

    ``rest`` is the block's per-call arguments, ``state.merge_params(explicit)``; ``needs``
    says which of ``[*explicit, *captured_now]`` want a gradient. Returns the output and
    a function mapping a cotangent to (grad of x, [(index in ``[*explicit,
    *captured_now]``, grad)]). With ``n_out`` > 1, ``fn`` returns a tuple of that many
    tensors, and the output and the cotangent are tuples. Used by couplings to evaluate
    F and G (an affine coupling's net) once each.
    """
    n_exp = len(explicit)
    slots = state.sections.get(section, [])
    wanted = [j for j in range(n_exp) if needs[j]] + [n_exp + i for i in slots if needs[n_exp + i]]
    values = [x, *explicit, *(captured_now[i] for i in slots)]
    diff = [
        0,
        *(1 + j for j in range(n_exp) if needs[j]),
        *(1 + n_exp + k for k, i in enumerate(slots) if needs[n_exp + i]),
    ]

    def call(v: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = fn(v[0], *state.merge_params(v[1 : 1 + n_exp]))
        return (out,) if n_out == 1 else tuple(out)

    outs, pull = block_vjp(state, section, call, values, diff, 1 + n_exp, slots)

    def pullback(g: Any) -> tuple[torch.Tensor | None, list[tuple[int, torch.Tensor]]]:
        grads = pull((g,) if n_out == 1 else g)
        return grads[0], [(i, gi) for i, gi in zip(wanted, grads[1:]) if gi is not None]

    return (outs[0] if n_out == 1 else outs), pullback


def accumulate(into: list[torch.Tensor | None], pairs: Sequence[tuple[int, torch.Tensor]]) -> None:
    """Add a section's ``(index, gradient)`` pairs (from :func:`section_vjp`'s pullback)
    into ``into``: a tensor that several sections read (F and G) gets their sum."""
    for i, g in pairs:
        old = into[i]
        into[i] = g if old is None else old + g


# the engine call behind torch.autograd.grad, without its Python-side checks (~35 us a call)
_engine_run_backward = _compat.engine_run_backward


def _grad(
    roots: Sequence[torch.Tensor], wrt: Sequence[torch.Tensor], cts: Sequence[torch.Tensor]
) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(roots, wrt, cts, allow_unused=True)`` for the fast path, whose
    arguments are known to be well formed (tensors of matching shapes, no graph to keep)."""
    if _engine_run_backward is None:
        return torch.autograd.grad(roots, wrt, cts, allow_unused=True)
    return _engine_run_backward(tuple(roots), tuple(cts), False, False, tuple(wrt), True, False)  # type: ignore[no-any-return]
