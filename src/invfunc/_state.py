"""What a block's backward needs besides the saved tensors: :class:`BlockState`."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from . import _compat, _verify
from ._choices import RECOMPUTE_RTOL, Checksum, Choice
from ._compat import storage_key
from ._errors import InvfuncError
from ._explain import _Explain, _reports
from ._replay import AutocastState, RngState, Tracer
from ._storage import StorageHandle, is_freed
from ._verify import Fingerprint

__all__ = ["BlockState", "replaying"]

_is_wrapped = _compat.is_wrapped
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
        "checksums",
        "choices",
        "consumers",
        "ctx_ref",
        "exact",
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
    exact: list[float] | None  # NOTE [Exact couplings], rule 6
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
    # NOTE [Discrete choices]: per section, the forward's choices (None: a static block)
    choices: dict[str, list[Choice]] | None
    # NOTE [Recompute divergence]: per recorded section, checksums of its outputs
    checksums: dict[str, list[Checksum | None]] | None

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
            if (
                t is not None
                and entry is not None
                and type(t) is torch.Tensor
                and _compat.version(t) == entry[1]
                and not is_freed(t)
            ):
                out[i] = t.detach()
        return out

    # -- helpers used by blocks' backward -----------------------------------------
    def replay_rng(self, section: str) -> Any:
        if self.rng is None:
            return nullcontext()
        return self.rng[section].replay()

    def replay_tracer(
        self,
        captured_now: Sequence[torch.Tensor],
        section: str | None = None,
        inputs: Sequence[object] = (),
        whole: bool = False,
    ) -> Any:
        """The context a replay of ``section`` (None: the inverse) runs in; ``whole``: the
        replay runs the whole block (every section, in order) as one call.

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
            choices = self.choices_for(section, whole)
            if choices is not None:
                what = self._what(None if whole else section)
                tr.replay_choices(choices, lambda why: self.diverged(what, why), self.replayed)
        tr.updates = self.updates
        tr.norms = self.norms
        return tr

    def choices_for(self, section: str | None, whole: bool) -> list[Choice] | None:
        """The forward's choices a replay of ``section`` makes again (NOTE [Discrete
        choices]); None when there is nothing to replay (a static block, the inverse)."""
        if self.choices is None or section is None:
            return None
        if whole:
            return [c for name in self.block._sections for c in self.choices.get(name, ())]
        return self.choices.get(section, [])

    def replayed(self, changed: int) -> None:
        """A replay handed back the forward's choices; ``changed`` of them differed from
        what the recompute chose itself (reported to explain())."""
        if changed:
            for rep in self._open_reports():
                rep.flipped.append((self.name, changed))

    def check_recompute(self, section: str, outs: Sequence[torch.Tensor]) -> None:
        """Compare a recomputed section's outputs with the forward's checksums (NOTE
        [Recompute divergence])."""
        sums = self.checksums.get(section) if self.checksums is not None else None
        if not sums:
            return
        for i, (c, t) in enumerate(zip(sums, outs)):
            if c is None or not Checksum.supports(t):
                continue
            err = c.error(t)
            tol = self.policy[1] or RECOMPUTE_RTOL.get(t.dtype, 1e-3)
            if not err <= tol:
                out = f"output {i}" if len(sums) > 1 else "its output"
                self.diverged(
                    self._what(section),
                    f"{out} moved by {err:.1e} of its magnitude (tolerance {tol:.0e} for {t.dtype})",
                )

    def _what(self, section: str | None) -> str:
        """How reports name what a replay of ``section`` runs (None: the whole block)."""
        return "the block" if section is None or len(self.block._sections) == 1 else section

    def _open_reports(self) -> list[_Explain]:
        """The explain() regions of the forward that are still open."""
        return [r for r in self.reports if r.open]

    def diverged(self, what: str, why: str) -> None:
        """The recompute of ``what`` is not the forward's computation: warn or raise."""
        _verify.diverged(self.name, what, why, self.policy[0], self._open_reports())  # type: ignore[arg-type]

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
            _verify.check(self.name, self.prints, rebuilt, policy, rtol, self._open_reports())  # type: ignore[arg-type]

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
        if into is None or not into.freed or not _compat.CAN_SWAP:  # NOTE [Torch versions], rule 3
            return None
        h = next((h for i, h in self._released() if i == j), None)
        if h is None or h is into:
            return None
        if (h.nbytes, h.size, h.stride, h.dtype) != (into.nbytes, into.size, into.stride, into.dtype):
            return None
        if h.storage.device != into.storage.device or storage_key(h.storage) != storage_key(
            out.untyped_storage()
        ):
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

    def release_unlinked(self) -> None:
        """After this block's backward (building no graph), free again the inputs between
        blocks that it refilled and that no block of this library produced (a block run in
        mode "plain", or as a plain call): nobody outside the call can reach them, their
        producer's backward does not read them (``reread``: it saved none of it), and no
        one else would free them until the graph dies (NOTE [Releasing rebuilt boundaries])."""
        if self.handles is None or torch.is_grad_enabled():
            return
        for h in self.handles:
            if h is not None and h.tensor is None and not h.linked and not h.reread and not h.freed:
                h.free(None)

    def restore_guards(self) -> None:
        """Finish refills written in place through :meth:`StorageHandle.view`."""
        for h in self.handles or ():
            if h is not None:
                h.refill()

    def settle(
        self, rebuilt: list[torch.Tensor], move: Callable[[list[torch.Tensor], int], bool] | None = None
    ) -> None:
        """The rebuilt inputs checked against the forward's fingerprints, then written into
        their freed storages (:meth:`check_drift`, then :meth:`refill`)."""
        self.check_drift(rebuilt)
        self.refill(rebuilt, move)

    def refill(
        self, rebuilt: Sequence[torch.Tensor], move: Callable[[list[torch.Tensor], int], bool] | None = None
    ) -> None:
        """Write the rebuilt inputs into their freed storages, each storage once.

        With ``move`` (NOTE [Rebuilt inputs moved, not copied]), ``rebuilt`` is a list
        whose entries are replaced by the refilled tensors, and an entry ``move(rebuilt,
        i)`` allows, laid out as the input, has its memory moved in instead of copied
        (``rebuilt[i]`` is read by index, never bound to a name: ``move`` counts its
        references)."""
        if self.handles is None:
            return
        done: dict[int, torch.Tensor] = {}
        for i, h in enumerate(self.handles):
            if h is None:
                continue
            if id(h) in done:  # the same tensor passed twice
                if move is not None:
                    rebuilt[i] = done[id(h)]  # type: ignore[index]
                continue
            if not h.freed:
                h.refill()
                if move is None:
                    done[id(h)] = rebuilt[i]
                continue
            if move is not None and _compat.CAN_SWAP and move(rebuilt, i) and h.fits(rebuilt[i]):  # type: ignore[arg-type]
                h.adopt_memory(rebuilt[i])
                h.refill()
            else:
                h.refill(rebuilt[i].detach())
            done[id(h)] = h.view() if move is not None else rebuilt[i]
            if move is not None:
                rebuilt[i] = done[id(h)]  # type: ignore[index]


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)}"
    return f"a {type(x).__name__}"


_TENSOR_SLOT = object()  # marks where a tensor parameter goes in BlockState.param_template
