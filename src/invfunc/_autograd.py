"""The one autograd.Function: a block applied with its inputs freed and rebuilt.

NOTE [One Function per block]

:func:`invfunc.invertible_call` applies :class:`_BlockFunction` once per block of
the composite (a chain is its blocks in a row). Each application

1. runs the block once under ``no_grad`` while a :class:`~invfunc._replay.Tracer`
   records the external tensors it reads (NOTE [Recording and replaying a block]);
   if nothing requires grad the result is returned as is: a plain call;
2. passes data inputs, parameters and captured tensors to ``apply`` so autograd
   routes a gradient to every one of them (``backward`` and ``autograd.grad``
   alike); the forward returns the outputs computed in step 1 (under ``torch.func``
   it recomputes them on the unwrapped tensors it is handed);
3. saves only the outputs (and parameters, which cost nothing), then frees the
   data inputs that may be freed (NOTE [Freeing rules]) — after the forward
   succeeded, so a forward that raises frees nothing;
4. in backward rebuilds the inputs from the outputs by the inverse, refills freed
   storages (NOTE [Refilling without a trace]), and takes the vector-Jacobian
   product of the block (NOTE [Two ways to a VJP]), under the forward's RNG and
   autocast state. With ``create_graph=True`` the rebuild is recorded, so double
   backward differentiates through it.

Because every block hands its parameter gradients to autograd as soon as it is
done, and a rebuilt tensor is freed again as soon as the block before it has used it,
memory stays flat in depth.

NOTE [Releasing rebuilt boundaries]

A boundary inside one call (block k's output, block k+1's input) is freed after the
forward and refilled by block k+1's backward. Block k needs it only until it has rebuilt
its own input; then it frees it again (``release_output``), through the handle block
k+1 keeps for the life of the graph. A second backward (``retain_graph=True``) refills
it again the same way, so even a retained graph stays flat. The caller's tensors (the
call's inputs) are refilled and then left alone: the caller may read them.

A coupling of pairs does better than free-then-refill: its rebuilt input half is written
straight into the memory of the output half it is computed from (``x2 = y2 - G(y1)``
into ``y2``'s memory, once nothing reads ``y2`` again), and that memory is then moved
into the input's freed storage (``spare_output`` / :meth:`StorageHandle.adopt`, a swap
of data pointers). The output's storage is left freed, as ``release_output`` would
leave it, and no fresh memory is touched: on CPU fresh memory costs a page fault per
4 KiB on first write, which was most of the coupling's extra time over checkpointing.
A block finds the handles that freed its outputs through ``BlockState.consumers``, filled
by every later block (of the same call or of a later call) that frees one of them.

NOTE [Caller's boundaries nobody holds]

With one call per block, block k's output is the caller's tensor: block k+1 frees it as
its input and refills it in its backward, and then the caller may read it, so it is
left alone. But usually nobody can: the caller's loop variable has moved on. At the end
of block k+1's backward its handle lets go of the tensor (``StorageHandle.let_go``) when
nothing but the handle holds the Python object, no C++ object holds its TensorImpl (a
foreign node that saved it: PyTorch keeps the Python object alive then, so this shows in
its reference count), and no other tensor shares its storage beyond block k's saved
output. The tensor object then dies, and the boundary is from then on like one inside
a call: block k moves its memory into its own input and leaves it freed, and a second
backward (``retain_graph=True``) refills it through the same handle.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch

from . import _compat
from ._errors import InvfuncError
from ._reuse import _unheld, movable
from ._state import BlockState, _replay_region
from ._storage import Freed
from ._vjp import _fast_path, block_vjp

__all__ = ["rebuild"]


def _no_input_as_is(
    outs: tuple[torch.Tensor, ...], inputs: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """Outputs that are inputs become views of them: autograd saves outputs, not inputs."""
    ids = {id(t) for t in inputs}
    if not any(id(o) in ids for o in outs):
        return outs
    return tuple(o.view_as(o) if id(o) in ids else o for o in outs)


class _BlockFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(state: BlockState, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        pre, seen = state.precomputed, state.seen
        state.precomputed = state.seen = None
        if pre is not None and seen is not None and all(a is b for a, b in zip(tensors, seen)):
            return _no_input_as_is(pre, tensors)
        # Under torch.func the forward receives unwrapped tensors: recompute on them.
        n_data, n_exp = state.n_data, state.n_explicit
        data = tensors[:n_data]
        explicit = tensors[n_data : n_data + n_exp]
        sections = state.block._sections
        tr = state.replay_tracer(
            tensors[n_data + n_exp :],
            sections[0] if len(sections) == 1 else None,
            tensors[: n_data + n_exp],
            whole=True,
        )
        with state.replay_rng(sections[0]), tr:
            out = state.block._fn(*data, *state.merge_params(explicit))
        outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        return _no_input_as_is(outs, tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        state: BlockState = inputs[0]
        tensors = inputs[1:]
        params = tensors[state.n_data :]
        outs = output[: state.n_out]  # the data outputs: a log-det is not needed to rebuild
        if state.kept:
            ctx.save_for_backward(*outs, *params, *tensors[: state.n_data])
        else:
            ctx.save_for_backward(*outs, *params)
        ctx.state = state
        state.ctx_ref = weakref.ref(ctx)
        nondiff = [o for o in output if not (o.is_floating_point() or o.is_complex())]
        if nondiff:
            ctx.mark_non_differentiable(*nondiff)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Any:
        raise InvfuncError(
            f"invfunc.invertible_call({ctx.state.name}): forward-mode AD (torch.func.jvp, "
            "torch.autograd.forward_ad) is not supported yet; run this call with mode='plain' "
            "(or inside `with invfunc.mode('plain'):`) to take a jvp."
        )

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        own = _unheld(grads)  # first: it counts references along the way here
        state: BlockState = ctx.state
        if state.modes is not None and tuple(m.training for m in state.modes[0]) != state.modes[1]:
            raise InvfuncError(
                f"invfunc.invertible_call({state.name}) backward: a module of the block switched between "
                "train and eval mode after the forward (e.g. model.eval() before loss.backward()). "
                "Rebuilding and differentiating it in the other mode (other dropout masks, other "
                "normalisation) would give a wrong gradient; switch modes after the backward."
            )
        saved = _saved_tensors(ctx, state)
        try:
            result = _block_backward(state, saved, grads, ctx.needs_input_grad[1:], own)
            state.release_unlinked()
        except Exception as e:
            raise _failed(state, e) from (e.__cause__ if isinstance(e, InvfuncError) else e)
        finally:
            state.drop_guarded()  # NOTE [Releasing rebuilt boundaries]
        return (None, *result)


class _BlockFunctionEager(torch.autograd.Function):
    """The same Function in the old ``forward(ctx, ...)`` form, used when no torch.func
    transform is active: ``apply`` then skips binding the arguments to a signature, which
    costs more than the rest of a small block's Python (NOTE [One Function per block])."""

    @staticmethod
    def forward(ctx: Any, state: BlockState, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        outs = _BlockFunction.forward(state, *tensors)
        _BlockFunction.setup_context(ctx, (state, *tensors), outs)
        return outs

    backward = _BlockFunction.backward
    jvp = _BlockFunction.jvp


for _fn in (_BlockFunction, _BlockFunctionEager):
    _compat.mark_backward_class(_fn, "_invfunc_saves_outputs")

# The C++ apply that Function.apply ends in for a Function without setup_context when no
# torch.func transform is active (after unwrapping tensors leaked from a transform).
try:
    _EAGER_APPLY = _compat.function_base_apply.__get__(None, _BlockFunctionEager)
except (AttributeError, TypeError):  # pragma: no cover - another torch layout
    _EAGER_APPLY = _BlockFunctionEager.apply


def _failed(state: BlockState, e: Exception) -> Exception:
    """The error a block's failed backward raises: what failed, in which call, and what
    became of the caller's inputs the call freed (rebuilt, or lost: reading one then
    raises FreedTensorError saying why)."""
    what = (
        str(e)
        if isinstance(e, InvfuncError)
        else (f"invfunc.invertible_call({state.name}) backward failed: {type(e).__name__}: {e}")
    )
    rebuilt, lost = [], []
    for i, h in enumerate(state.handles or ()):
        if h is None or h.tensor is None:
            continue  # not the caller's: a boundary inside the call
        shape = tuple(h.size)
        if h.freed or type(h.tensor) is Freed:  # (a rebuild written in place, not finished)
            lost.append(f"input {i} (shape {shape})")
            h.lose(
                f"invfunc: this tensor, input {i} of invertible_call({state.name}), was freed and is "
                f"lost: the backward that would rebuild it failed ({type(e).__name__}: {e})."
            )
        else:
            rebuilt.append(f"input {i} (shape {shape})")
    fate = []
    if rebuilt:
        fate.append(f"{', '.join(rebuilt)} of the call {'was' if len(rebuilt) == 1 else 'were'} rebuilt")
    if lost:
        fate.append(
            f"{', '.join(lost)} of the call, freed after the forward, could not be rebuilt and "
            f"{'is' if len(lost) == 1 else 'are'} lost (reading raises FreedTensorError); pass "
            "keep= to keep them, or rerun the forward"
        )
    msg = what + (f" [{'; '.join(fate)}.]" if fate else "")
    return type(e)(msg) if isinstance(e, InvfuncError) else InvfuncError(msg)


def _saved_tensors(ctx: Any, state: BlockState) -> tuple[torch.Tensor, ...]:
    try:
        return ctx.saved_tensors  # type: ignore[no-any-return]
    except RuntimeError as e:
        if "modified by an inplace operation" in str(e):
            raise InvfuncError(
                f"invfunc.invertible_call({state.name}) backward: an output or a parameter of the block "
                "was modified in place between the forward and the backward (for example "
                "optimizer.step() or an in-place edit before loss.backward()). Rebuilding the inputs "
                "from modified values would give wrong gradients; run the backward first, or clone "
                f"before editing. PyTorch said: {e}"
            ) from e
        raise


def _block_backward(
    state: BlockState,
    saved: tuple[torch.Tensor, ...],
    grads: Sequence[torch.Tensor],
    needs: Sequence[bool],
    own: Sequence[bool],
) -> list[torch.Tensor | None]:
    outs, explicit, captured, kept = state.unpack(saved)
    block = state.block
    with state.autocast.replay():
        fused = getattr(block, "_fused_backward", None)
        if kept is None and fused is not None:
            result = fused(state, outs, grads, explicit, captured, needs, own)
            if result is not None:  # (None: the block declined, for this call; the generic backward runs)
                return result  # type: ignore[no-any-return]
        elif fused is not None and getattr(block, "_fused_kept", False) and _fast_path(*outs, *grads):
            # mode "checkpoint": a coupling's backward from its kept inputs, F and G one
            # after the other (the generic one holds both recomputes' graphs at once)
            return fused(state, outs, grads, explicit, captured, needs, own, kept=kept)  # type: ignore[no-any-return]
        if kept is None:
            data = rebuild(state, outs, explicit, captured)
            return _generic_vjp(state, data, explicit, captured, grads, needs)
        result = _generic_vjp(state, kept, explicit, captured, grads, needs)
        if not torch.is_grad_enabled():
            state.release_output()  # as rebuild() does: later blocks refill it if asked again
        return result


def rebuild(
    state: BlockState,
    outs: Sequence[torch.Tensor],
    explicit: Sequence[torch.Tensor],
    captured: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, ...]:
    """The block's inputs rebuilt by its inverse; freed storages are refilled.

    NOTE [Kept inputs are used as they are]: an input that was not freed (a leaf, a view,
    one named in ``keep=``) and still holds what the forward read is used as it is, not
    rebuilt: its gradient is taken at the exact value even when the inverse drifts, and a
    block whose inputs were all kept skips its inverse. Only when the backward builds no
    graph of its own: with ``create_graph`` or under torch.func the rebuilt inputs carry
    the dependence on the outputs that gradients of gradients need."""
    record = torch.is_grad_enabled()
    live = state.live_inputs() if _fast_path(*outs) else [None] * state.n_data
    if all(t is not None for t in live):
        return tuple(live)  # type: ignore[arg-type]
    with (
        torch.set_grad_enabled(record),
        state.replay_rng(state.block._sections[0]),
        state.replay_tracer(captured, None, (*outs, *explicit)),
        _replay_region(),
    ):
        got = state.block._rebuild(outs, state.merge_params(explicit))
    rebuilt = list(state.check_rebuilt(got))
    del got
    # NOTE [Rebuilt inputs moved, not copied]: the inverse's result is written into the
    # input's freed storage, and the block is then differentiated at that storage, not at
    # the result: both alive would be one activation more than the input itself. When the
    # result is a fresh tensor nobody else holds, laid out as the input, its memory is
    # moved into the storage (a swap of data pointers: no copy, no fresh memory); else it
    # is copied, and let go. With create_graph the rebuilt inputs carry the graph that
    # gradients of gradients need, and are differentiated as they are.
    state.settle(rebuilt, move=None if record else movable)  # (its drift checked first)
    data = tuple(r if t is None else t for t, r in zip(live, rebuilt))
    del rebuilt
    if not record:  # with create_graph the rebuilt inputs hang on the outputs
        state.release_output()
    return data


def _generic_vjp(
    state: BlockState,
    data: Sequence[torch.Tensor],
    explicit: Sequence[torch.Tensor],
    captured: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    needs: Sequence[bool],
) -> list[torch.Tensor | None]:
    values: list[torch.Tensor] = [*data, *explicit, *captured]
    diff = [i for i, n in enumerate(needs) if n]
    result: list[torch.Tensor | None] = [None] * len(values)
    if not diff:
        return result
    n_data, n_pos = state.n_data, state.n_data + state.n_explicit
    block = state.block

    def call(vals: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = block._fn(*vals[:n_data], *state.merge_params(vals[n_data:n_pos]))
        return (out,) if isinstance(out, torch.Tensor) else tuple([*out])  # a tuple of its own

    _, pull = block_vjp(state, block._sections[0], call, values, diff, n_pos, whole=True, values_read=False)
    for i, g in zip(diff, pull(grads)):
        result[i] = g
    return result
