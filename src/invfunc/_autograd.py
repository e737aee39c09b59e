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

import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

from . import _verify
from ._errors import FreedTensorError, InvfuncError
from ._replay import AutocastState, RngState, Tracer, cuda_devices, sharded
from ._storage import Freed, StorageHandle, _rebuild_guarded, _use_count, free_reason, is_freed
from ._verify import Fingerprint

__all__ = ["BlockState", "apply_block", "explain", "replaying", "section_vjp"]

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_local = threading.local()


def replaying() -> bool:
    """True while a block is re-run in backward: nested invertible calls are plain then,
    so that the outer block's recompute sees (and differentiates) everything they read."""
    return getattr(_local, "depth", 0) > 0


class _ReplayRegion:
    """Marks a replay (see :func:`replaying`); a plain class: entered twice per block."""

    __slots__ = ()

    def __enter__(self) -> None:
        _local.depth = getattr(_local, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        _local.depth -= 1


_REGION = _ReplayRegion()


def _replay_region() -> _ReplayRegion:
    return _REGION


class BlockState:
    """Everything a block's backward needs besides the saved tensors."""

    __slots__ = (
        "__weakref__",
        "autocast",
        "block",
        "captured",
        "consumers",
        "ctx_ref",
        "handles",
        "in_meta",
        "kept",
        "lent",
        "live",
        "modes",
        "n_data",
        "n_explicit",
        "n_out",
        "name",
        "next_ref",
        "norms",
        "param_template",
        "policy",
        "precomputed",
        "prints",
        "reports",
        "rng",
        "sections",
        "seen",
        "static",
        "update_refs",
        "updates",
    )
    block: Any
    name: str
    n_out: int
    n_data: int
    param_template: list[Any]
    n_explicit: int
    captured: list[torch.Tensor]
    sections: dict[str, list[int]]
    rng: dict[str, RngState] | None
    autocast: AutocastState
    updates: set[int]
    update_refs: list[torch.Tensor]
    norms: bool
    in_meta: list[tuple[torch.Size | None, torch.dtype]]  # None: a nested tensor
    kept: bool
    modes: tuple[list[torch.nn.Module], tuple[bool, ...]] | None
    static: bool
    prints: list[Fingerprint | None] | None
    policy: tuple[str, float | None]

    def __init__(self, block: Any) -> None:
        self.block = block
        self.name: str = block._name
        self.handles: list[StorageHandle | None] | None = None
        self.precomputed: tuple[torch.Tensor, ...] | None = None
        self.seen: tuple[torch.Tensor, ...] | None = None
        self.ctx_ref: Callable[[], Any] | None = None
        self.next_ref: Callable[[], BlockState | None] | None = None
        # per output: the handle of a later block that freed it (NOTE [Releasing rebuilt boundaries])
        self.consumers: list[weakref.ref[StorageHandle] | None] | None = None
        self.prints = None
        self.reports: tuple[_Explain, ...] = tuple(_reports())  # explain() regions of the forward
        # inputs that were not freed: a weak reference and the version seen in the forward
        self.live: list[tuple[weakref.ref[torch.Tensor], int] | None] | None = None
        # the handle of the data input whose memory now holds the output (NOTE [Outputs in
        # the memory of the input they replace]); _free_inputs finishes freeing it
        self.lent: StorageHandle | None = None

    def live_inputs(self) -> list[torch.Tensor | None]:
        """The data inputs that were kept (not freed) and still hold the values the forward
        read, detached; None for the others (NOTE [Kept inputs are used as they are])."""
        out: list[torch.Tensor | None] = [None] * self.n_data
        for i, entry in enumerate(self.live or ()):
            t = entry[0]() if entry is not None else None
            if t is not None and type(t) is torch.Tensor and t._version == entry[1] and not is_freed(t):  # type: ignore[index]
                out[i] = t.detach()
        return out

    # -- helpers used by blocks' backward -----------------------------------------
    def replay_rng(self, section: str) -> Any:
        if self.rng is None:
            return nullcontext()
        return self.rng[section].replay()

    def replay_tracer(
        self, captured_now: Sequence[torch.Tensor], section: str | None = None, inputs: Sequence[object] = ()
    ) -> Any:
        """The context a replay of ``section`` (None: the inverse) runs in.

        The recorded captured tensors are replaced by ``captured_now`` (stand-ins,
        primals, or themselves). A block may read other tensor objects than in the
        forward (``torch.func.functional_call`` swaps parameters only while it runs):
        static blocks find them again by module structure, recorded blocks by order of
        first use (NOTE [Recording and replaying a block]); a tensor that cannot be
        matched is an error, never a silently wrong gradient.
        """
        now = list(captured_now) if captured_now else list(self.captured)
        subst = {id(o): n for o, n in zip(self.captured, now) if o is not n}
        if self.static:
            names = [section] if section is not None else list(self.sections)
            for name in names:
                idx = self.sections.get(name, [])
                reads = self.block._static_reads(name)
                if reads is None or len(reads) != len(idx):
                    raise self.swap_error(
                        f"the parameters of its modules changed since the forward ({len(idx)} recorded)"
                    )
                for t, i in zip(reads, idx):
                    if t is not now[i]:
                        if t.shape != now[i].shape or t.dtype != now[i].dtype:
                            raise self.swap_error(
                                f"the block read a parameter of shape {tuple(t.shape)} that it did not "
                                "read in the forward"
                            )
                        subst[id(t)] = now[i]
            if not subst and not self.updates and not self.norms:
                return nullcontext()
            tr = Tracer()
            tr.start_replay(subst)
        else:
            order = self.sections.get(section, []) if section is not None else []
            tr = Tracer()
            tr.start_replay(
                subst,
                inputs=inputs,
                expected=[(self.captured[i], now[i]) for i in order] if section is not None else None,
                check=self.swap_error,
                known=[o for o, n in zip(self.captured, now) if o is n],
            )
        tr.updates = self.updates
        tr.norms = self.norms
        return tr

    def swap_error(self, what: str) -> InvfuncError:
        return InvfuncError(
            f"invfunc.invertible_call({self.name}) backward: {what}, so rebuilding it would use other "
            "values than the forward did. "
            "This happens when parameters are swapped only around the forward (e.g. "
            "torch.func.functional_call outside the block) or between forward and backward (FSDP1 "
            "with use_orig_params=True): swap them inside the block's function, wrap the whole "
            "call instead, or use mode='plain' for this call."
        )

    def unpack(
        self, saved: Sequence[torch.Tensor]
    ) -> tuple[
        Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[torch.Tensor] | None
    ]:
        """The saved tensors as (outputs, explicit parameters, captured tensors, kept inputs
        or None), in the order ``setup_context`` saved them."""
        a = self.n_out
        b = a + self.n_explicit
        c = b + len(self.captured)
        return saved[:a], saved[a:b], saved[b:c], (saved[c:] if self.kept else None)

    def merge_params(self, explicit: Sequence[torch.Tensor]) -> list[Any]:
        it = iter(explicit)
        return [next(it) if p is _TENSOR_SLOT else p for p in self.param_template]

    def check_rebuilt(self, rebuilt: Any) -> tuple[torch.Tensor, ...]:
        got = (rebuilt,) if isinstance(rebuilt, torch.Tensor) else rebuilt
        if not isinstance(got, (tuple, list)) or len(got) != len(self.in_meta):
            raise InvfuncError(
                f"invfunc.invertible_call({self.name}) backward: the inverse returned "
                f"{_describe(rebuilt)} but the block has {len(self.in_meta)} data input(s); "
                "make the inverse return one tensor per data input, in order."
            )
        for i, (t, (shape, dtype)) in enumerate(zip(got, self.in_meta)):
            if (
                not isinstance(t, torch.Tensor)
                or (shape is not None and t.shape != shape)
                or t.dtype != dtype
            ):
                raise InvfuncError(
                    f"invfunc.invertible_call({self.name}) backward: the inverse rebuilt input {i} as "
                    f"{_describe(t)}, but the forward received shape {tuple(shape or ())} and dtype {dtype}; "
                    "check that the inverse really inverts the function."
                )
        return tuple(got)

    def check_drift(self, rebuilt: Sequence[torch.Tensor]) -> None:
        """Compare rebuilt inputs with the forward's fingerprints (NOTE [Fingerprints])."""
        if self.prints is not None:
            policy, rtol = self.policy
            reports = [r for r in self.reports if r.open]
            _verify.check(self.name, self.prints, rebuilt, policy, rtol, reports)  # type: ignore[arg-type]

    def link(self, j: int, handle: StorageHandle) -> None:
        """Output ``j`` was freed by a later block, through ``handle``."""
        if self.consumers is None:
            self.consumers = [None] * self.n_out
        self.consumers[j] = weakref.ref(handle)
        handle.linked = True

    def _released(self) -> Iterator[tuple[int, StorageHandle]]:
        """The handles of this block's outputs that are this library's to free again: a
        boundary inside a call, or a caller's tensor nobody holds any more."""
        for j, ref in enumerate(self.consumers or ()):
            h = ref() if ref is not None else None
            if h is not None and h.tensor is None and not h.freed:
                yield j, h

    def release_output(self) -> None:
        """This block's backward no longer needs its outputs: free them again where a later
        block freed them and nobody else holds them (NOTE [Releasing rebuilt boundaries])."""
        for _, h in self._released():
            h.free(None)

    def spare_output(self, j: int, out: torch.Tensor, into: StorageHandle | None) -> StorageHandle | None:
        """The handle of output ``j`` if its memory may be taken for the freed input ``into``
        (NOTE [Releasing rebuilt boundaries]): :meth:`release_output` would free it, it is
        laid out exactly as ``into``, and refilled."""
        if into is None or not into.freed:
            return None
        h = next((h for i, h in self._released() if i == j), None)
        if h is None or h is into:
            return None
        if (h.nbytes, h.size, h.stride, h.dtype) != (into.nbytes, into.size, into.stride, into.dtype):
            return None
        if h.storage.device != into.storage.device or h.storage._cdata != out.untyped_storage()._cdata:
            return None
        return h

    def drop_guarded(self) -> None:
        """After backward, the caller's tensors stay refilled: forget their handles, unless
        nothing but this library can reach them any more and the block that produced them
        may free them again (NOTE [Caller's boundaries nobody holds])."""
        if self.handles is not None:
            kept = [
                h if h is not None and (h.tensor is None or (h.linked and h.let_go())) else None
                for h in self.handles
            ]
            self.handles = kept if any(h is not None for h in kept) else None

    def restore_guards(self) -> None:
        """Finish refills written in place through :meth:`StorageHandle.view`."""
        for h in self.handles or ():
            if h is not None:
                h.refill()

    def refill(self, rebuilt: Sequence[torch.Tensor]) -> None:
        if self.handles is None:
            return
        done: set[int] = set()
        for h, t in zip(self.handles, rebuilt):
            if h is not None and id(h) not in done:
                done.add(id(h))
                if h.freed:
                    h.refill(t.detach())
                else:
                    h.refill()


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)}"
    return f"a {type(x).__name__}"


def _fast_path(*tensors: torch.Tensor) -> bool:
    """True when backward needs no graph of its own: out= writes are allowed."""
    if torch.is_grad_enabled():
        return False
    return not _functorch_active() or not any(_is_wrapped(t) for t in tensors)


_functorch_active = torch._C._are_functorch_transforms_active


def block_vjp(
    state: BlockState,
    section: str,
    call: Callable[[Sequence[torch.Tensor]], tuple[torch.Tensor, ...]],
    values: Sequence[torch.Tensor],
    diff: Sequence[int],
    n_positional: int,
    captured_slots: Sequence[int] | None = None,
) -> tuple[tuple[torch.Tensor, ...], Callable[[Sequence[torch.Tensor]], list[torch.Tensor | None]]]:
    """Run ``call(values)`` and return its outputs and a pullback over ``values[i] for i in diff``.

    ``values`` are the ``n_positional`` tensors ``call`` passes explicitly, then the
    captured tensors the block reads through closures (``captured_slots`` gives their
    indices in ``state.captured``; default all, in order).

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
        hooked = any(values[i]._backward_hooks for i in diff if i >= n_positional)
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
            state.replay_tracer(now, section, vals[:n_positional]),
            _replay_region(),
        ):
            outs = call(vals)
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
        with state.replay_tracer(now, section, vals[:n_positional]), _replay_region():
            return call(vals)

    with state.replay_rng(section):
        outs, vjp_fn = torch.func.vjp(pure, *[values[i] for i in diff])  # type: ignore[misc]

    def pullback(cts: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        return list(vjp_fn(tuple(cts)))

    return outs, pullback


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
        out._base is None
        and _use_count(storage._cdata) == 3
        and storage.nbytes() == out.numel() * out.element_size()
    ):
        storage.resize_(0)


def section_vjp(
    state: BlockState,
    fn: Callable[..., Any],
    section: str,
    x: torch.Tensor,
    captured_now: Sequence[torch.Tensor],
    needs: Sequence[bool],
) -> tuple[
    torch.Tensor, Callable[[torch.Tensor], tuple[torch.Tensor | None, list[tuple[int, torch.Tensor]]]]
]:
    """``fn(x)`` and its VJP over ``x`` and the captured tensors ``fn`` reads.

    Returns the output and a function mapping a cotangent to (grad of x, [(index of
    captured tensor, grad)]). Used by couplings to evaluate F and G once each.
    """
    slots = state.sections.get(section, [])
    idx = [i for i in slots if needs[i]]
    values = [x, *(captured_now[i] for i in slots)]
    diff = [0, *(1 + k for k, i in enumerate(slots) if needs[i])]
    outs, pull = block_vjp(state, section, lambda v: (fn(v[0]),), values, diff, 1, slots)

    def pullback(g: torch.Tensor) -> tuple[torch.Tensor | None, list[tuple[int, torch.Tensor]]]:
        grads = pull((g,))
        return grads[0], [(i, gi) for i, gi in zip(idx, grads[1:]) if gi is not None]

    return outs[0], pullback


try:  # the engine call behind torch.autograd.grad, without its Python-side checks (~35 us a call)
    from torch.autograd.graph import _engine_run_backward
except ImportError:  # pragma: no cover - older or newer torch
    _engine_run_backward = None  # type: ignore[assignment]


def _grad(
    roots: Sequence[torch.Tensor], wrt: Sequence[torch.Tensor], cts: Sequence[torch.Tensor]
) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(roots, wrt, cts, allow_unused=True)`` for the fast path, whose
    arguments are known to be well formed (tensors of matching shapes, no graph to keep)."""
    if _engine_run_backward is None:
        return torch.autograd.grad(roots, wrt, cts, allow_unused=True)
    return _engine_run_backward(tuple(roots), tuple(cts), False, False, tuple(wrt), True, False)  # type: ignore[no-any-return]


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
            tensors[n_data + n_exp :], sections[0] if len(sections) == 1 else None, tensors[: n_data + n_exp]
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
        if state.kept:
            ctx.save_for_backward(*output, *params, *tensors[: state.n_data])
        else:
            ctx.save_for_backward(*output, *params)
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
    _fn._backward_cls._invfunc_saves_outputs = True  # type: ignore[attr-defined]

# The C++ apply that Function.apply ends in for a Function without setup_context when no
# torch.func transform is active (after unwrapping tensors leaked from a transform).
try:
    _EAGER_APPLY = torch._C._FunctionBase.__dict__["apply"].__get__(None, _BlockFunctionEager)
except (KeyError, AttributeError, TypeError):  # pragma: no cover - another torch layout
    _EAGER_APPLY = _BlockFunctionEager.apply


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
        or g._use_count() != 1  # type: ignore[attr-defined]
        or g.requires_grad
        or g._is_view()
        or _is_wrapped(g)
    ):
        return False
    storage = g.untyped_storage()
    return (
        _use_count(storage._cdata) == 2  # g's and ``storage``
        and g.storage_offset() == 0
        and storage.nbytes() == g.numel() * g.element_size()
        and g.is_contiguous()
        and weakref.getweakrefcount(g) == 0
        and not (g.is_inference() or g._is_zerotensor() or g.is_conj() or g.is_neg())
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
            return fused(state, outs, grads, explicit, captured, needs, own)  # type: ignore[no-any-return]
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
    data = state.check_rebuilt(got)
    state.check_drift(data)
    state.refill(data)
    data = tuple(r if t is None else t for t, r in zip(live, data))
    if not torch.is_grad_enabled():  # with create_graph the rebuilt inputs hang on the outputs
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
        return (out,) if isinstance(out, torch.Tensor) else tuple(out)

    _, pull = block_vjp(state, block._sections[0], call, values, diff, n_pos)
    for i, g in zip(diff, pull(grads)):
        result[i] = g
    return result


# -- applying a block -----------------------------------------------------------------


_TENSOR_SLOT = object()  # marks where a tensor parameter goes in BlockState.param_template


class _Explain:
    def __init__(self) -> None:
        self.kept: list[tuple[str, int, str]] = []
        self.freed: list[tuple[str, int, int]] = []
        self.drift: list[tuple[str, int, float]] = []
        self.open = True


class _OpenReports(threading.local):
    def __init__(self) -> None:
        self.reports: list[_Explain] = []


_LOCAL_REPORTS = _OpenReports()


def _reports() -> list[_Explain]:
    """The explain() regions open in this thread (calls report where they run; a
    backward reports drift to the regions its forward ran in, while they are open)."""
    return _LOCAL_REPORTS.reports


@contextmanager
def explain() -> Iterator[_Explain]:
    """Collect, for every invertible call in the region, which inputs were freed or kept and why.

    Yields an object with three lists: ``freed`` of ``(call, input index, bytes)``,
    ``kept`` of ``(call, input index, reason)`` and, for calls made in the region under
    :func:`invfunc.verify` whose backward runs before it closes, ``drift`` of
    ``(call, input index, relative error of the rebuilt input)``. The region covers the
    calls of the thread that opened it (as :func:`invfunc.mode` and
    :func:`invfunc.verify` do), wherever their backward runs.

    Examples:
        >>> import torch, invfunc as inv
        >>> block = inv.couple(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> x = torch.randn(3, 4, requires_grad=True)
        >>> with inv.explain() as report:
        ...     y = inv.invertible_call(block, x)       # a leaf: kept
        ...     z = inv.invertible_call(block, y * 2)   # a temporary: freed
        >>> for call, index, reason in report.kept:
        ...     print(index, reason)
        0 it is a leaf (user data or a parameter); data leaves are freed only when named in free=
        >>> report.freed
        [('couple(Linear, Linear)', 0, 48)]
    """
    rep = _Explain()
    _reports().append(rep)
    try:
        yield rep
    finally:
        rep.open = False
        _reports().remove(rep)


def _materialize(state: BlockState | None) -> None:
    """Refill ``state``'s freed inputs now, from its outputs (rebuilding those first if a
    later block of the same chain freed them, and freeing them again after)."""
    ctx = state.ctx_ref() if state is not None and state.ctx_ref is not None else None
    if state is None or ctx is None or state.handles is None:
        raise FreedTensorError(
            "invfunc: a tensor freed by invertible_call was read after its graph was dropped; "
            "its value is lost. Pass it in keep= (or clone it) if you need it after the call."
        )
    nxt = state.next_ref() if state.next_ref is not None else None
    transient = [h for h in (nxt.handles or ()) if h is not None and h.freed] if nxt is not None else []
    if transient:
        _materialize(nxt)
    try:
        saved = ctx.saved_tensors
    except RuntimeError as e:
        raise FreedTensorError(
            f"invfunc.invertible_call({state.name}): a freed input was read but the outputs needed "
            f"to rebuild it are gone ({e}). Pass it in keep= if you need it after the call."
        ) from e
    outs, explicit, captured, _ = state.unpack(saved)
    with torch.no_grad(), state.autocast.replay():
        rebuild(state, outs, explicit, captured)
    del saved, outs
    for h in transient:
        h.free(None)


def _rebuild_on_access(state_ref: weakref.ref[BlockState]) -> Callable[[], None]:
    def rebuild_now() -> None:
        state = state_ref()
        _materialize(state)
        assert state is not None
        state.handles = None  # kept from now on

    return rebuild_now


_NO_CONTEXT = nullcontext()


class Pending:
    """A coupling's single-tensor output ``y = cat(y1, x2 + g)`` not yet assembled.

    NOTE [Outputs in the memory of the input they replace]: with one call per block, or
    between the blocks of a call, the input ``x`` of a coupling is freed right after the
    block ran, and its output ``y``, of
    the same shape, needs as much fresh memory (on CPU a page fault per 4 KiB). So the
    block's output is first an empty shell (a tensor on a storage of no bytes) that goes
    through the autograd Function; only then, when ``x`` turns out freed, ``y`` is written
    into ``x``'s memory (``x2 += g`` in place, ``y1`` copied over ``x1``) and that memory is
    moved to ``y``'s storage, leaving ``x``'s storage as freeing leaves it. Nothing of
    ``x`` is written before its freeing is certain and every check that can fail has
    passed; when it is kept, ``y`` gets fresh memory. ``y1`` was computed apart (into F's
    output when nobody holds it), so that G reads a contiguous half."""

    __slots__ = ("d", "g", "out", "x", "y1")

    def __init__(self, x: torch.Tensor, y1: torch.Tensor, g: torch.Tensor | None, d: int) -> None:
        self.x, self.y1, self.g, self.d = x, y1, g, d
        self.out = torch.empty_like(x)  # x is contiguous: its layout; left untouched, so
        self.out.untyped_storage().resize_(0)  # its pages were never faulted in

    def finish(self, into: StorageHandle | None) -> None:
        """Write the output into ``into`` (the freed input's handle, before its memory is
        released) and move that memory to the output; or, with None, into fresh memory."""
        x, y1, g, d = self.x, self.y1, self.g, self.d
        self.x = self.y1 = self.g = None  # type: ignore[assignment]
        h = y1.size(d)
        storage = self.out.untyped_storage()
        if into is not None:
            # x's memory, through a tensor with its own version counter: x's is shared
            # with the producer's saved output, which a write must not look modified
            m1, m2 = into.view().split_with_sizes([h, h], d)
            if g is not None:
                m2.add_(g)  # x2 is there already
            m1.copy_(y1)
            del m1, m2
            storage._swap_data_ptr_(into.storage)  # type: ignore[attr-defined]
            if storage.device.type == "cuda":
                # the memory belongs to the pool of the stream the input was made on; the
                # output is used on this one: freeing it must wait for this stream's work,
                # as freeing the input would have (StorageHandle.free)
                self.out.record_stream(torch.cuda.current_stream(storage.device))
            return
        storage.resize_(x.numel() * x.element_size())
        m1, m2 = x.new_empty(0).set_(storage, 0, x.size(), x.stride()).split_with_sizes([h, h], d)
        m1.copy_(y1)
        x2 = x.detach().narrow(d, h, h)
        if g is not None:
            torch.add(x2, g, out=m2)
        else:
            m2.copy_(x2)


def _no_section(name: str) -> AbstractContextManager[None]:
    return _NO_CONTEXT


def apply_block(
    block: Any,
    args: Sequence[Any],
    *,
    mode: str,
    guard: bool,
    keep: Callable[[int, torch.Tensor], bool],
    autocast: AutocastState,
    leaves: Callable[[int, torch.Tensor], bool] | None = None,
    previous: BlockState | None = None,
    policy: tuple[str, float | None] = ("off", None),
    label: str | None = None,
    lend: Callable[[int, torch.Tensor], bool] | None = None,
) -> tuple[Any, bool, BlockState | None]:
    """Run one block; return (outputs as a tuple, whether it returned a single tensor, its state).

    ``leaves`` says which leaf inputs may be freed (those created inside the call); the
    caller's own inputs are freed by :func:`free_call_inputs` once every block ran.
    ``lend`` is given when the data inputs are freed right after this block (the caller's,
    in a call of one block; any between blocks): the ``leaves`` of that freeing. A single
    input it will free may then lend its memory to the output (NOTE [Outputs in the
    memory of the input they replace])."""
    n_data = block._n_data(args)
    data = tuple(args[:n_data])
    params = args[n_data:]
    for i, t in enumerate(data):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"invfunc.invertible_call({block._name}, ...): data input {i} must be a tensor, got "
                f"{type(t).__name__}; non-tensor arguments go after the {n_data} data input(s)."
            )
        if t.is_nested and t.layout == torch.strided:
            raise InvfuncError(
                f"invfunc.invertible_call({block._name}, ...): data input {i} is a NestedTensor of the "
                "strided layout, which a custom autograd.Function cannot take; build it with "
                "layout=torch.jagged, or run this call with mode='plain'."
            )
        if type(t) is Freed:
            _rebuild_guarded(t)
        elif is_freed(t):
            raise FreedTensorError(
                f"invfunc.invertible_call({block._name}, ...): data input {i} has no storage: it was freed "
                "by an earlier invertible call and cannot be read. Pass it in keep= there, or clone it."
            )
    param_tensors = [p for p in params if isinstance(p, torch.Tensor)]
    state = BlockState(block)
    if label is not None:
        state.name = label  # errors say which block of the call
    rng: dict[str, RngState] = {}
    static = block._static_sections()
    # the CUDA generators to capture: those of the devices the block's tensors are on;
    # a recorded block (captured tensors unknown yet) adds the current device
    devices = cuda_devices(
        [*data, *param_tensors, *(p for ps, _ in static.values() for p in ps)]
        if static is not None
        else [*data, *param_tensors],
        current=static is None,
    )
    section: Callable[[str], AbstractContextManager[None]]
    if static is not None:  # NOTE [Static discovery]
        if any(r for _, r in static.values()):

            def section(name: str) -> AbstractContextManager[None]:
                rng[name] = RngState(devices)
                return _NO_CONTEXT

        else:
            section = _no_section
    else:
        tracer = Tracer()
        tracer.start_recording(data)

        @contextmanager
        def section(name: str) -> Iterator[None]:
            rng[name] = RngState(devices)
            with tracer.section(name), tracer:
                yield

    with torch.no_grad():
        if len(block._sections) == 1:
            with section(block._sections[0]):
                out = block._run(args, section)
        else:
            out = block._run(args, section)
        pending = None
        if type(out) is Pending:
            pending = out
            out = pending.out
    single = isinstance(out, torch.Tensor)
    outs = (out,) if single else out
    if not isinstance(outs, tuple) or not all(isinstance(o, torch.Tensor) for o in outs):
        raise TypeError(
            f"invfunc.invertible_call({block._name}, ...): the block returned {_describe(out)}; an "
            "invertible function must return a tensor or a tuple of tensors."
        )
    if not torch.is_grad_enabled():
        if pending is not None:
            pending.finish(None)
        return outs, single, None
    known = {id(t) for t in data}
    known.update(id(p) for p in param_tensors)
    captured: list[torch.Tensor] = []
    where: dict[int, int] = {}
    sections: dict[str, list[int]] = {}
    seen_by_section = (
        {name: {id(p): p for p in ps} for name, (ps, _) in static.items()}
        if static is not None
        else tracer.sections
    )
    for name, seen in seen_by_section.items():
        idx = sections.setdefault(name, [])
        for key, t in seen.items():
            if key in known:
                continue
            if key not in where:
                where[key] = len(captured)
                captured.append(t)
            idx.append(where[key])
    if (
        not captured
        and not any(t.requires_grad for t in data)
        and not any(p.requires_grad for p in param_tensors)
    ):
        if pending is not None:
            pending.finish(None)
        return outs, single, None  # nothing requires grad: a plain call
    if static is None:
        for name, gens in tracer.generators.items():
            if gens and name in rng:
                rng[name].user = list(gens.values())
    first = rng.get(block._sections[0])
    state.rng = None if first is None or all(r.unchanged() for r in rng.values()) else rng
    state.n_out = len(outs)
    state.n_data = n_data
    state.param_template = [_TENSOR_SLOT if isinstance(p, torch.Tensor) else p for p in params]
    state.n_explicit = len(param_tensors)
    state.captured = captured
    state.sections = sections
    state.autocast = autocast
    state.static = static is not None
    if static is None:
        state.updates, state.update_refs, state.norms = tracer.updates, tracer._update_refs, tracer.norms
    else:
        state.updates, state.update_refs, state.norms = set(), [], False
    state.in_meta = [(None if t.is_nested else t.shape, t.dtype) for t in data]
    state.kept = mode == "checkpoint"
    mods = block._mode_dependent()
    if mods and not state.static:
        wrapped = sharded(mods)
        if wrapped is not None:
            raise InvfuncError(
                f"invfunc.invertible_call({state.name}): {type(wrapped).__name__} inside the block is "
                "wrapped by fully_shard (FSDP2), whose hooks reduce its gradients while invfunc is "
                "still computing them in the backward. Apply fully_shard to a module that contains the "
                "whole invertible call instead (supported), or run this call with mode='plain'."
            )
    state.modes = (mods, tuple(m.training for m in mods)) if mods else None
    state.policy = policy
    exact = getattr(block, "_exact", False)  # an inverse made of copies: nothing to verify
    state.prints = (
        [Fingerprint(t) if Fingerprint.supports(t) else None for t in data]
        if policy[0] != "off" and not (state.kept or exact)
        else None
    )
    inputs = (*data, *param_tensors, *captured)
    state.precomputed = outs
    state.seen = inputs
    if _functorch_active():
        result = _BlockFunction.apply(state, *inputs)  # type: ignore[no-untyped-call]
    elif any(_is_wrapped(t) for t in inputs):  # a tensor leaked from a transform: apply unwraps it
        result = _BlockFunctionEager.apply(state, *inputs)  # type: ignore[no-untyped-call]
    else:  # Function.apply's Python wrapper does nothing more here (~3 us a call)
        result = _EAGER_APPLY(state, *inputs)
    if pending is not None:
        x = data[0]
        if mode == "invertible" and lend is not None and _kept_reason(0, x, keep, lend) is None:
            state.lent = StorageHandle(x, guard)
        pending.finish(state.lent)
    if previous is not None:
        previous.next_ref = weakref.ref(state)
    if mode == "invertible" and not guard:
        _free_inputs(state, data, guard, keep, leaves)
    return result, single, state


def _producer(t: torch.Tensor) -> BlockState | None:
    """The state of the invertible block whose output ``t`` is, if any."""
    fn = t.grad_fn
    if fn is None or not getattr(type(fn), "_invfunc_saves_outputs", False):
        return None
    state = getattr(fn, "state", None)
    return state if isinstance(state, BlockState) else None


def free_call_inputs(
    state: BlockState,
    data: Sequence[Any],
    keep: Callable[[int, torch.Tensor], bool],
    leaves: Callable[[int, torch.Tensor], bool],
) -> None:
    """Free the caller's inputs of a whole call, once every block's forward succeeded;
    ``leaves`` says which leaf inputs the caller asked to free (``free=``)."""
    _free_inputs(state, list(data[: state.n_data]), True, keep, leaves)


def _kept_reason(
    i: int,
    t: torch.Tensor,
    keep: Callable[[int, torch.Tensor], bool],
    leaves: Callable[[int, torch.Tensor], bool] | None,
) -> str | None:
    """Why data input ``i`` is kept, or None if it is freed (NOTE [Freeing rules])."""
    return "named in keep=" if keep(i, t) else free_reason(t, leaf_ok=leaves is not None and leaves(i, t))


def _free_inputs(
    state: BlockState,
    data: Sequence[torch.Tensor],
    guard: bool,
    keep: Callable[[int, torch.Tensor], bool],
    leaves: Callable[[int, torch.Tensor], bool] | None = None,
) -> None:
    handles: list[StorageHandle | None] = [None] * len(data)
    by_id: dict[int, StorageHandle] = {}
    rebuild_cb = _rebuild_on_access(weakref.ref(state)) if guard else None
    reports = _reports()
    for i, t in enumerate(data):
        if id(t) in by_id:
            handles[i] = by_id[id(t)]
            continue
        lent = state.lent if i == 0 else None
        # (a lent input was decided already, and its memory moved to the output)
        reason = None if lent is not None else _kept_reason(i, t, keep, leaves)
        if reason is not None:
            for rep in reports:
                rep.kept.append((state.name, i, reason))
            if type(t) is torch.Tensor and not t.is_inference():  # inference tensors have no version
                if state.live is None:
                    state.live = [None] * len(data)
                state.live[i] = (weakref.ref(t), t._version)
            continue
        h = lent if lent is not None else StorageHandle(t, guard)
        producer = _producer(t)
        if producer is not None:
            producer.link(t.output_nr, h)
        for rep in reports:
            rep.freed.append((state.name, i, h.nbytes))
        by_id[id(t)] = h
        handles[i] = h
    if by_id:
        state.handles = handles
        for h in by_id.values():
            h.free(rebuild_cb)  # type: ignore[arg-type]
