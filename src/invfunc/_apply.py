"""Applying a block: run it once, hand it to the Function, free its inputs."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch

from . import _compat
from ._autograd import _EAGER_APPLY, _BlockFunction, _BlockFunctionEager, rebuild
from ._choices import Checksum
from ._compat import swap_memory
from ._errors import FreedTensorError, InvfuncError
from ._explain import _reports
from ._replay import AutocastState, RngState, Tracer, cuda_devices, no_cast_cache, sharded
from ._state import _TENSOR_SLOT, BlockState, _describe, _is_wrapped
from ._storage import Freed, StorageHandle, _rebuild_guarded, free_reason, is_freed
from ._verify import Fingerprint
from ._vjp import _functorch_active

__all__ = ["Pending", "apply_block", "free_call_inputs"]


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
        sizes = [h, x.size(d) - h]  # halves of unequal sizes when x's is odd
        storage = self.out.untyped_storage()
        if into is not None:
            # x's memory, through a tensor with its own version counter: x's is shared
            # with the producer's saved output, which a write must not look modified
            m1, m2 = into.view().split_with_sizes(sizes, d)
            if g is not None:
                m2.add_(g)  # x2 is there already
            m1.copy_(y1)
            del m1, m2
            swap_memory(storage, into.storage)
            if storage.device.type == "cuda":
                # the memory belongs to the pool of the stream the input was made on; the
                # output is used on this one: freeing it must wait for this stream's work,
                # as freeing the input would have (StorageHandle.free)
                self.out.record_stream(torch.cuda.current_stream(storage.device))
            return
        storage.resize_(x.numel() * x.element_size())
        m1, m2 = x.new_empty(0).set_(storage, 0, x.size(), x.stride()).split_with_sizes(sizes, d)
        m1.copy_(y1)
        x2 = x.detach().narrow(d, h, sizes[1])
        if g is not None:
            torch.add(x2, g, out=m2)
        else:
            m2.copy_(x2)


class Sections:
    """How a block's forward is run, section by section (a coupling's F and G; a generic
    block is one section): the RNG state before each (NOTE [Recording and replaying a
    block]) and, for a recorded block, its tracer and the checksums of each section's
    outputs (NOTE [Recompute divergence]). ``block._run`` enters ``sections(name)``
    around each section and hands its outputs to ``sections.output(name, ...)``."""

    __slots__ = ("checksums", "devices", "exact", "random", "rng", "tracer")

    def __init__(self, devices: list[int], tracer: Tracer | None, random: bool) -> None:
        self.devices = devices
        self.tracer = tracer
        self.random = random  # a static block that draws random numbers
        self.rng: dict[str, RngState] = {}
        self.checksums: dict[str, list[Checksum | None]] = {}
        self.exact: list[float] | None = None  # NOTE [Exact couplings], rule 6: the input's checksum

    def __call__(self, name: str) -> AbstractContextManager[None]:
        if self.tracer is not None:
            return self._recorded(name)
        if self.random:
            self.rng[name] = RngState(self.devices)
        return _NO_CONTEXT

    @contextmanager
    def _recorded(self, name: str) -> Iterator[None]:
        assert self.tracer is not None
        self.rng[name] = RngState(self.devices)
        with self.tracer.section(name), self.tracer:
            yield

    def output(self, name: str, *outs: torch.Tensor) -> None:
        """A recorded section's outputs, checksummed before anything is written over them."""
        if self.tracer is not None:
            self.checksums[name] = [Checksum(t) if Checksum.supports(t) else None for t in outs]


def _check_data(block: Any, data: Sequence[Any], n_data: int) -> None:
    """Data inputs are tensors a Function can take, not freed past rebuilding."""
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


def _run_forward(
    block: Any, args: Sequence[Any], sections: Sections
) -> tuple[tuple[torch.Tensor, ...], bool, Pending | None]:
    """Run the block once under no_grad: (outputs, whether it returned one tensor, the
    output still to assemble, NOTE [Outputs in the memory of the input they replace])."""
    with torch.no_grad(), no_cast_cache():
        if not block._section_outputs:
            with sections(block._sections[0]):
                out = block._run(args, sections)
        else:
            out = block._run(args, sections)
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
    if not block._section_outputs:
        sections.output(block._sections[0], *outs)
    return outs, single, pending


def _captured(
    static: dict[str, tuple[list[torch.Tensor], bool]] | None,
    tracer: Tracer | None,
    known: set[int],
) -> tuple[list[torch.Tensor], dict[str, list[int]]]:
    """The tensors the block read besides its arguments, and, per section, their indices."""
    captured: list[torch.Tensor] = []
    where: dict[int, int] = {}
    sections: dict[str, list[int]] = {}
    seen_by_section = (
        {name: {id(p): p for p in ps} for name, (ps, _) in static.items()}
        if static is not None
        else tracer.sections  # type: ignore[union-attr]
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
    return captured, sections


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
    _check_data(block, data, n_data)
    param_tensors = [p for p in params if isinstance(p, torch.Tensor)]
    static = block._static_sections()
    # the CUDA generators to capture: those of the devices the block's tensors are on;
    # a recorded block (captured tensors unknown yet) adds the current device
    devices = cuda_devices(
        [*data, *param_tensors, *(p for ps, _ in static.values() for p in ps)]
        if static is not None
        else [*data, *param_tensors],
        current=static is None,
    )
    tracer = None
    if static is None:
        tracer = Tracer()
        tracer.start_recording(data)
    sections = Sections(devices, tracer, static is not None and any(r for _, r in static.values()))
    outs, single, pending = _run_forward(block, args, sections)
    if not torch.is_grad_enabled():
        if pending is not None:
            pending.finish(None)
        return outs, single, None
    known = {id(t) for t in data}
    known.update(id(p) for p in param_tensors)
    captured, reads = _captured(static, tracer, known)
    if (
        not captured
        and not any(t.requires_grad for t in data)
        and not any(p.requires_grad for p in param_tensors)
    ):
        if pending is not None:
            pending.finish(None)
        return outs, single, None  # nothing requires grad: a plain call
    state = BlockState(block)
    if label is not None:
        state.name = label  # errors say which block of the call
    _fill_state(state, sections, data, params, outs, captured, reads, mode=mode, policy=policy)
    state.autocast = autocast
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


def _fill_state(
    state: BlockState,
    sections: Sections,
    data: Sequence[torch.Tensor],
    params: Sequence[Any],
    outs: Sequence[torch.Tensor],
    captured: list[torch.Tensor],
    reads: dict[str, list[int]],
    *,
    mode: str,
    policy: tuple[str, float | None],
) -> None:
    """What the backward needs to know of the forward that just ran."""
    block, tracer, rng = state.block, sections.tracer, sections.rng
    if tracer is not None:
        for name, gens in tracer.generators.items():
            if gens and name in rng:
                rng[name].user = list(gens.values())
    first = rng.get(block._sections[0])
    state.rng = None if first is None or all(r.unchanged() for r in rng.values()) else rng
    state.exact = sections.exact
    state.n_out = len(outs) - (block._ladj is True)  # the log-det is not saved (NOTE [Log-determinants])
    state.n_data = len(data)
    state.param_template = [_TENSOR_SLOT if isinstance(p, torch.Tensor) else p for p in params]
    state.n_explicit = sum(isinstance(p, torch.Tensor) for p in params)
    state.captured = captured
    state.sections = reads
    state.static = tracer is None
    if tracer is not None:
        state.updates, state.update_refs, state.norms = tracer.updates, tracer._update_refs, tracer.norms
        state.choices = None if tracer.unreplayable else tracer.choices
        state.checksums = sections.checksums
        _report_choices(state)
    else:
        state.updates, state.update_refs, state.norms = set(), [], False
        state.choices = state.checksums = None
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


def _report_choices(state: BlockState) -> None:
    """Tell explain() how many discrete choices the block keeps, and their bytes."""
    if state.reports and state.choices:
        kept = [c for cs in state.choices.values() for c in cs]
        if kept:
            nbytes = sum(c.nbytes for c in kept)
            for rep in state.reports:
                rep.choices.append((state.name, len(kept), nbytes))


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


def report_kept(
    label: str,
    data: Sequence[Any],
    mode: str,
    keep: Callable[[int, torch.Tensor], bool],
    leaves: Callable[[int, torch.Tensor], bool],
) -> None:
    """Tell explain() why each data input of a call that freed none of them is kept: the
    mode is "checkpoint", or the block that received them ran as a plain call."""
    reports = _reports()
    if not reports:
        return
    for i, t in enumerate(data):
        if not isinstance(t, torch.Tensor):
            continue
        if mode == "checkpoint":
            why = "mode='checkpoint' keeps the inputs"
        else:
            why = _kept_reason(i, t, keep, leaves) or (
                "nothing the block reads requires grad: it ran as a plain call"
            )
        for rep in reports:
            rep.kept.append((label, i, why))


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
                state.live[i] = (weakref.ref(t), _compat.version(t))
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
