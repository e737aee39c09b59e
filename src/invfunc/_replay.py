"""What a block's forward saw, and how to replay it: tensors, RNG, autocast, state updates.

NOTE [Recording and replaying a block]

1. A block's forward runs once under ``no_grad`` inside :class:`Tracer` in *record*
   mode. Every tensor argument that requires grad is an *external* tensor (inputs,
   parameters of modules, tensors captured by closures): nothing created under
   ``no_grad`` requires grad. They are recorded in order of first use, per section
   (a coupling records F and G separately).
2. In-place ops whose target was not produced inside the block (BatchNorm's
   ``num_batches_tracked``) are recorded as *external updates*.
3. In *replay* mode (the inverse and the recompute in backward) the same tracer maps
   every recorded external tensor, by identity, to the primal that stands for it, so
   the block is a pure function of its inputs and parameters for ``torch.func.vjp``;
   external updates are skipped and batch-norm running statistics are not updated
   again, so state updates once per step.
4. RNG: the CPU (and CUDA) generator states before each section are captured. If a
   section drew no random numbers its state is dropped; otherwise replays run from it
   inside a fork that restores the caller's generator afterwards.
5. Autocast: the forward's autocast state is captured and re-entered for replays.

NOTE [Static discovery]

Recording costs a Python call per op. For a coupling whose F and G are trees of
built-in modules (Linear, Conv, activations, LayerNorm, Dropout, ...; no subclass, no
hook) what the forward reads is known without running it: the modules' parameters.
Such blocks skip the tracer, and skip RNG capture unless a random module (Dropout,
RReLU) is in training mode. BatchNorm and any user-defined module are recorded.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ._choices import _PYTHON_VALUES, Choice, Mismatch, choice_of, is_choice, may_choose, replay_choice
from ._compat import DeviceContext as _DeviceContext
from ._compat import fsdp_module_type, global_module_hooks, module_children, module_parameters, real_tensors
from ._compat import function_modes as _function_modes
from ._compat import is_wrapped as _is_wrapped

__all__ = ["AutocastState", "RngState", "Tracer"]

_Tensor = torch.Tensor
_CLAIM = 1 << 62  # offset that keeps claimed positions apart from claimed ids
_NORM_FUNCS = {
    torch.nn.functional.batch_norm: (1, 2, 5, "running_mean", "running_var", "training"),
    torch.batch_norm: (3, 4, 5, "running_mean", "running_var", "training"),
    torch.nn.functional.instance_norm: (1, 2, 5, "running_mean", "running_var", "use_input_stats"),
    torch.instance_norm: (3, 4, 5, "running_mean", "running_var", "use_input_stats"),
}
# Functions that only read metadata: cheap, and never worth recording.
_INPLACE_EXCLUDED = {"__setstate__", "requires_grad_", "retain_grad", "share_memory_"}


def _is_inplace(func: Callable[..., Any]) -> bool:
    name = getattr(func, "__name__", "")
    return name.endswith("_") and not name.endswith("__") and name not in _INPLACE_EXCLUDED


def _update_target(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """The tensor an op writes into, if any: the first argument of an in-place op, or ``out=``."""
    return args[0] if args and _is_inplace(func) else kwargs.get("out")


class Tracer(TorchFunctionMode):
    """Records external tensors of a block's forward, or substitutes them in a replay."""

    def __init__(self) -> None:
        super().__init__()
        self.recording = True
        self.sections: dict[str, dict[int, _Tensor]] = {}
        self._section: dict[int, _Tensor] = {}
        self.produced: set[int] = set()
        self.updates: set[int] = set()
        self._update_refs: list[_Tensor] = []
        self.subst: dict[int, _Tensor] = {}
        self.norms = False  # a batch/instance norm ran: replays must not update its statistics
        self.check: Callable[[str], Exception] | None = None
        self.expected: list[tuple[_Tensor, _Tensor]] = []
        self.claimed: set[int] = set()
        self.known: set[int] = set()
        # per section: user generators (``generator=`` of random ops) and their state at
        # first use, replayed with the section (the default generators are in RngState)
        self.generators: dict[str, dict[int, tuple[torch.Generator, _Tensor]]] = {}
        self._generators: dict[int, tuple[torch.Generator, _Tensor]] = {}
        # NOTE [Discrete choices]: per section, the choices of the forward in order; in a
        # replay, the ones to hand back, how many were handed back, and what to call when
        # the replay makes other choices
        self.choices: dict[str, list[Choice]] = {}
        self._choices: list[Choice] = []
        self.replayed: list[Choice] | None = None
        self.cursor = 0
        self.changed = 0
        self.on_mismatch: Callable[[str], None] | None = None
        self.on_done: Callable[[int], None] | None = None
        self.paused = False  # NOTE [One-time work inside a block]
        self.unreplayable = False

    # -- recording ----------------------------------------------------------------
    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Record the external tensors of a part of the block under ``name``."""
        previous, previous_gens, previous_choices = self._section, self._generators, self._choices
        self._section = self.sections.setdefault(name, {})
        self._generators = self.generators.setdefault(name, {})
        self._choices = self.choices.setdefault(name, [])
        try:
            yield
        finally:
            self._section, self._generators, self._choices = previous, previous_gens, previous_choices

    def start_recording(self, inputs: Sequence[object]) -> None:
        self.recording = True
        self.sections = {}
        self._section = self.sections.setdefault("", {})
        self.generators = {}
        self._generators = self.generators.setdefault("", {})
        self.choices = {}
        self._choices = self.choices.setdefault("", [])
        # inputs count as produced: they are not captured, and in-place ops on them are
        # not external state updates
        self.produced = {id(t) for t in inputs if isinstance(t, _Tensor)}

    def start_replay(
        self,
        subst: dict[int, _Tensor],
        *,
        inputs: Sequence[object] = (),
        expected: Sequence[tuple[_Tensor, _Tensor]] | None = None,
        check: Callable[[str], Exception] | None = None,
        known: Sequence[_Tensor] = (),
    ) -> None:
        """Replay: map external tensors to stand-ins.

        ``subst`` maps by identity. With ``check`` set, every other external tensor that
        requires grad is resolved too (NOTE [Recording and replaying a block], rule 3):
        with ``expected`` — (recorded tensor, stand-in) pairs in first-use order — it takes
        the next unclaimed recorded tensor of the same shape and dtype (the forward read a
        tensor that has since been swapped, as ``functional_call`` does); otherwise, or if
        none fits, ``check(description)`` is raised.
        """
        self.recording = False
        self.subst = subst
        self.check = check
        self.expected = list(expected or ())
        self.claimed = set()
        self.known = {id(t) for t in known}
        self.produced = {id(t) for t in inputs if isinstance(t, _Tensor)}
        self.produced.update(id(v) for v in subst.values())

    def replay_choices(
        self,
        choices: list[Choice],
        on_mismatch: Callable[[str], None],
        on_done: Callable[[int], None],
    ) -> None:
        """Hand ``choices`` back, in order, to the ops of the replay that make a choice
        (NOTE [Discrete choices], rule 3). ``on_mismatch(description)`` is called once if
        the replay makes other choices (rule 4), and the replay then goes on with its own;
        ``on_done(changed)`` at the end, with how many results differed from the replay's own."""
        self.replayed = choices
        self.cursor = 0
        self.changed = 0
        self.on_mismatch = on_mismatch
        self.on_done = on_done

    def __enter__(self) -> Tracer:
        _ACTIVE.stack.append(self)
        return super().__enter__()  # type: ignore[no-untyped-call,no-any-return]

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        _ACTIVE.stack.pop()
        super().__exit__(exc_type, exc, tb)  # type: ignore[no-untyped-call]
        if exc_type is not None or self.on_mismatch is None:
            return
        if self.replayed is not None and self.cursor != len(self.replayed):
            n, k = len(self.replayed), self.cursor
            self._mismatch(f"the forward made {n} discrete choice(s), the recompute {k}")
        if self.on_done is not None:
            self.on_done(self.changed)

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if kwargs is None:
            kwargs = {}
        if self.paused:
            return func(*args, **kwargs)
        if self.recording:
            return self._record(func, args, kwargs)
        return self._replay(func, args, kwargs)

    def _record(self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        section = self._section
        produced = self.produced
        for a in args:
            if type(a) in (list, tuple):
                for b in a:
                    if isinstance(b, _Tensor) and b.requires_grad and id(b) not in produced:
                        section.setdefault(id(b), b)
            elif isinstance(a, _Tensor) and a.requires_grad and id(a) not in produced:
                section.setdefault(id(a), a)
        for a in kwargs.values():
            if isinstance(a, _Tensor) and a.requires_grad and id(a) not in produced:
                section.setdefault(id(a), a)
        gen = kwargs.get("generator")
        if isinstance(gen, torch.Generator) and id(gen) not in self._generators:
            self._generators[id(gen)] = (gen, gen.get_state())
        if func in _NORM_FUNCS:
            self.norms = True
        target = _update_target(func, args, kwargs)
        if isinstance(target, _Tensor) and id(target) not in self.produced:
            self.updates.add(id(target))
            self._update_refs.append(target)
        out = func(*args, **kwargs)
        self._mark_produced(out)
        if may_choose(func, out):
            choice = choice_of(func, args, kwargs, out)
            if choice is not None:
                if any(_is_wrapped(p.data) for _, p in choice.results or ()):
                    self.unreplayable = True  # made under a torch.func transform: not kept
                else:
                    self._choices.append(choice)
        return out

    def _mark_produced(self, out: Any) -> None:
        """Remember the tensors an op returned: tensors made inside the block are not external
        (a tuple may be a named one: ``torch.return_types.topk``)."""
        if isinstance(out, _Tensor):
            self.produced.add(id(out))
        elif isinstance(out, (list, tuple)):
            self.produced.update(id(o) for o in out if isinstance(o, _Tensor))

    def _replay(self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        subst = self.subst
        if self.updates:
            target = _update_target(func, args, kwargs)
            if target is not None and id(target) in self.updates:
                return target  # an external state update (in place or out=) already applied in the forward
        if self.check is not None:
            self._resolve(args, kwargs)
        if subst:
            new_args = []
            for a in args:
                if type(a) in (list, tuple):
                    a = type(a)(subst.get(id(b), b) for b in a)
                elif isinstance(a, _Tensor):
                    a = subst.get(id(a), a)
                new_args.append(a)
            args = new_args
            if kwargs:
                kwargs = {
                    k: (subst.get(id(v), v) if isinstance(v, _Tensor) else v) for k, v in kwargs.items()
                }
        norm = _NORM_FUNCS.get(func)
        if norm is not None:
            args, kwargs = _without_running_stats(norm, list(args), kwargs)
        replayed = self.replayed
        if replayed is not None and getattr(func, "__name__", "") in _PYTHON_VALUES:
            if is_choice(func, args, kwargs, None):  # a Python value: not read again
                return self._replay_choice(func, args, kwargs, None)
        out = func(*args, **kwargs)
        if self.check is not None:
            self._mark_produced(out)
        if replayed is not None and may_choose(func, out):
            if is_choice(func, args, kwargs, out):
                out = self._replay_choice(func, args, kwargs, out)
                if self.check is not None:
                    self._mark_produced(out)
        return out

    def _replay_choice(
        self, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], out: Any
    ) -> Any:
        replayed = self.replayed
        assert replayed is not None
        k = self.cursor
        if k >= len(replayed):
            self._mismatch(f"it made more discrete choices than the forward's {len(replayed)}")
            return func(*args, **kwargs) if out is None else out
        try:
            value, changed = replay_choice(replayed[k], func, args, kwargs, out)
        except Mismatch as e:
            self._mismatch(f"its discrete choice {k + 1} is another op or shape ({e})")
            return func(*args, **kwargs) if out is None else out
        self.cursor = k + 1
        self.changed += changed
        return value

    def _mismatch(self, what: str) -> None:
        """Stop replaying choices and report the first mismatch (rule 4)."""
        self.replayed = None
        if self.on_mismatch is not None:
            self.on_mismatch(what)

    def _resolve(self, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        """Give every external tensor of this op a stand-in (see :meth:`start_replay`)."""
        for a in (*args, *kwargs.values()):
            for t in a if type(a) in (list, tuple) else (a,):
                if not isinstance(t, _Tensor) or not t.requires_grad:
                    continue
                key = id(t)
                if key in self.produced or key in self.claimed or key in self.subst or key in self.known:
                    continue
                for k, (orig, _) in enumerate(self.expected):
                    if orig is t:
                        self.claimed.add(key)
                        self.claimed.add(k + _CLAIM)
                        break
                else:
                    self._claim_by_position(t)

    def _claim_by_position(self, t: _Tensor) -> None:
        for k, (orig, stand_in) in enumerate(self.expected):
            if k + _CLAIM in self.claimed or orig.shape != t.shape or orig.dtype != t.dtype:
                continue
            self.claimed.update((id(t), k + _CLAIM))
            self.subst[id(t)] = stand_in
            return
        assert self.check is not None
        raise self.check(
            f"the block read a tensor of shape {tuple(t.shape)} and dtype {t.dtype} that it did not "
            "read in the forward"
        )


def _without_running_stats(
    spec: tuple[int, int, int, str, str, str], args: list[Any], kwargs: dict[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """Drop running statistics from a norm call that uses batch statistics.

    With batch statistics the running ones only receive an update, which must not
    happen twice; the result is the same without them.
    """
    i_mean, i_var, i_train, k_mean, k_var, k_train = spec
    training = args[i_train] if len(args) > i_train else kwargs.get(k_train, False)
    if not training:
        return args, kwargs
    for i, k in ((i_mean, k_mean), (i_var, k_var)):
        if len(args) > i:
            args[i] = None
        elif k in kwargs:
            kwargs = {**kwargs, k: None}
    return args, kwargs


class _Active(threading.local):
    def __init__(self) -> None:
        self.stack: list[Tracer] = []


_ACTIVE = _Active()


@contextlib.contextmanager
def untraced() -> Iterator[None]:
    """Run one-time work inside a block unrecorded.

    NOTE [One-time work inside a block]: some work runs in a block's first forward only,
    guarded by state it sets (an op's data-dependent initialisation: ActNorm sets its
    scale from the first batch). The recompute in backward skips it, so its discrete
    choices (a check that reads a value) would not be made again and would read as a
    recompute that diverged, and its in-place writes as state updates to skip. Run under
    ``untraced()``, the block's tracer (if any, in this thread) neither records nor
    replays it; the work must finish before the block reads what it writes (the reads
    are recorded after it). Outside a recorded block it does nothing."""
    tracer = _ACTIVE.stack[-1] if _ACTIVE.stack else None
    if tracer is None:
        yield
        return
    old, tracer.paused = tracer.paused, True
    try:
        yield
    finally:
        tracer.paused = old


_RNG_LOCK = threading.RLock()


class RngState:
    """Generator states of the CPU and of the CUDA devices a block touches."""

    __slots__ = ("cpu", "cuda", "user")

    def __init__(self, cuda_devices: Sequence[int]) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = [(d, torch.cuda.get_rng_state(d)) for d in cuda_devices]
        # user generators the region drew from, with their states before (Tracer.generators)
        self.user: list[tuple[torch.Generator, _Tensor]] = []

    def unchanged(self) -> bool:
        """True if no random number was drawn since this state was captured."""
        if self.user:
            return False
        with real_tensors():  # generator states are real tensors, even under FakeTensorMode
            if not torch.equal(self.cpu, torch.get_rng_state()):
                return False
            return all(torch.equal(s, torch.cuda.get_rng_state(d)) for d, s in self.cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, s in self.cuda:
            torch.cuda.set_rng_state(s, d)
        for g, s in self.user:
            g.set_state(s)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run a region from this state and leave the caller's generators untouched.

        Replays hold a process-wide lock: two threads replaying at once would otherwise
        draw each other's numbers from the shared default generator."""
        with _RNG_LOCK:
            saved = RngState([d for d, _ in self.cuda])
            saved.user = [(g, g.get_state()) for g, _ in self.user]
            self.restore()
            try:
                yield
            finally:
                saved.restore()


def cuda_devices(tensors: Sequence[object], *, current: bool = False) -> list[int]:
    """The CUDA devices of ``tensors``, and the current device if ``current`` and CUDA is
    initialized (random ops on it need not touch any of the tensors)."""
    devices = {t.device.index or 0 for t in tensors if isinstance(t, _Tensor) and t.is_cuda}
    if current and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        devices.add(torch.cuda.current_device())
    return sorted(devices)


class AutocastState:
    """The autocast state and default-device context of the forward, re-entered for
    replays in backward."""

    __slots__ = ("device_ctx", "settings")

    def __init__(self) -> None:
        self.settings = [
            (dev, torch.get_autocast_dtype(dev)) for dev in ("cpu", "cuda") if torch.is_autocast_enabled(dev)
        ]
        # a default-device context (``with torch.device(...)``) of the forward, re-entered
        # too, so that factory calls inside a block make their tensors where they did
        self.device_ctx = next(
            (m for m in reversed(_function_modes()) if isinstance(m, _DeviceContext)),  # type: ignore[no-untyped-call]
            None,
        )

    def replay(self) -> contextlib.AbstractContextManager[None]:
        if (
            not self.settings
            and self.device_ctx is None
            and not torch.is_autocast_enabled("cpu")
            and not torch.is_autocast_enabled("cuda")
        ):
            return contextlib.nullcontext()  # nothing to change: the common case, kept cheap
        return self._replay()

    @contextlib.contextmanager
    def _replay(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if self.device_ctx is not None:
                stack.enter_context(self.device_ctx)
            for dev in ("cpu", "cuda"):
                if torch.is_autocast_enabled(dev):
                    stack.enter_context(torch.autocast(dev, enabled=False))
            for dev, dtype in self.settings:
                # (no cache: see no_cast_cache; a replay's casts are made afresh)
                stack.enter_context(torch.autocast(dev, dtype=dtype, cache_enabled=False))
            yield


@contextlib.contextmanager
def no_cast_cache() -> Iterator[None]:
    """Autocast's cache of casts turned off for a region (the engine's forward under
    no_grad): a cast made there has no graph, and torch 2.4 keeps it in the cache for the
    rest of the autocast region, where the backward's recompute would read it and the
    parameters behind it get no gradient (newer torch does not cache under no_grad)."""
    if not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
        yield
        return
    old = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(old)


# -- static discovery ---------------------------------------------------------------------

_nn = torch.nn
#: Built-in modules whose forward reads only their own parameters and buffers, draws no
#: random numbers and updates no state.
_PURE_MODULES: frozenset[type] = frozenset(
    {
        _nn.Sequential,
        _nn.Identity,
        _nn.Linear,
        _nn.Bilinear,
        _nn.Conv1d,
        _nn.Conv2d,
        _nn.Conv3d,
        _nn.ConvTranspose1d,
        _nn.ConvTranspose2d,
        _nn.ConvTranspose3d,
        _nn.ReLU,
        _nn.ReLU6,
        _nn.Tanh,
        _nn.Sigmoid,
        _nn.GELU,
        _nn.SiLU,
        _nn.Mish,
        _nn.LeakyReLU,
        _nn.ELU,
        _nn.SELU,
        _nn.CELU,
        _nn.Softplus,
        _nn.Softsign,
        _nn.Hardtanh,
        _nn.Hardswish,
        _nn.Hardsigmoid,
        _nn.PReLU,
        _nn.Tanhshrink,
        _nn.Softmax,
        _nn.LogSoftmax,
        _nn.LayerNorm,
        _nn.GroupNorm,
        _nn.Flatten,
        _nn.Unflatten,
        _nn.MaxPool1d,
        _nn.MaxPool2d,
        _nn.AvgPool1d,
        _nn.AvgPool2d,
        _nn.AdaptiveAvgPool1d,
        _nn.AdaptiveAvgPool2d,
        _nn.ZeroPad2d,
        _nn.Upsample,
    }
)
#: Built-in modules that draw random numbers in training mode.
_RANDOM_MODULES: frozenset[type] = frozenset(
    {
        _nn.Dropout,
        _nn.Dropout1d,
        _nn.Dropout2d,
        _nn.Dropout3d,
        _nn.AlphaDropout,
        _nn.FeatureAlphaDropout,
        _nn.RReLU,
    }
)


def static_reads(fn: object) -> tuple[list[_Tensor], bool] | None:
    """What a module tree reads, without running it: (parameters that require grad, whether
    it draws random numbers), or None if that cannot be known statically.

    Only trees of the built-in modules above, with no hooks, qualify (NOTE [Static
    discovery]): anything else is recorded by running it under :class:`Tracer`. This
    walk runs on every forward of a block (PyTorch offers no cheap way to see that a
    module tree changed), so it is written for speed.
    """
    if not isinstance(fn, _nn.Module):
        return None
    _MODE_DEPENDENT.pop(fn, None)
    if global_module_hooks():
        return None
    params: dict[int, _Tensor] = {}
    slots: list[tuple[_nn.Module, str]] = []
    random = False
    modal: list[_nn.Module] = []
    pure, draws = _PURE_MODULES, _RANDOM_MODULES
    for m in _modules(fn):
        kind = type(m)
        if kind not in pure:
            if kind not in draws:
                return None
            random = random or m.training
            modal.append(m)
        attrs = m.__dict__
        if attrs["_forward_hooks"] or attrs["_forward_pre_hooks"]:
            return None
        # a weight set as a plain attribute (FSDP1's flat parameters), or a buffer that needs
        # grad: record the block instead. The built-ins above name theirs weight and bias.
        if ("weight" in attrs and isinstance(attrs["weight"], _Tensor)) or (
            "bias" in attrs and isinstance(attrs["bias"], _Tensor)
        ):
            return None
        buffers = attrs["_buffers"]
        if buffers and any(b is not None and b.requires_grad for b in buffers.values()):
            return None
        for name, p in attrs["_parameters"].items():
            if p is not None and p.requires_grad and id(p) not in params:
                params[id(p)] = p
                slots.append((m, name))
    _SLOTS[fn] = slots
    _MODE_DEPENDENT[fn] = modal
    return list(params.values()), random


# module -> [(submodule, parameter name)] from its last static_reads, so a replay can
# re-read the same parameter slots without walking the module tree again.
_SLOTS: weakref.WeakKeyDictionary[_nn.Module, list[tuple[_nn.Module, str]]] = weakref.WeakKeyDictionary()


# module -> its mode-dependent modules, found by the static_reads of the current forward
# (every forward of a block runs static_reads before asking); absent when not static.
_MODE_DEPENDENT: weakref.WeakKeyDictionary[_nn.Module, list[_nn.Module]] = weakref.WeakKeyDictionary()


def reread(fn: _nn.Module) -> list[_Tensor] | None:
    """The tensors now in the parameter slots that :func:`static_reads` found in ``fn``."""
    slots = _SLOTS.get(fn)
    if slots is None:
        got = static_reads(fn)
        return None if got is None else got[0]
    now = [module_parameters(m).get(name) for m, name in slots]
    return None if any(p is None for p in now) else now  # type: ignore[return-value]


def sharded(modules: Sequence[_nn.Module]) -> _nn.Module | None:
    """A module wrapped by FSDP2's ``fully_shard`` among ``modules``, if any."""
    kind = fsdp_module_type()  # None: a build without torch.distributed, or before FSDP2
    if kind is None:
        return None
    return next((m for m in modules if isinstance(m, kind)), None)


def mode_dependent(fn: object) -> list[_nn.Module]:
    """The modules in ``fn`` whose result may depend on train/eval mode: everything but the
    pure built-ins (a user-defined module may branch on ``self.training``)."""
    if not isinstance(fn, _nn.Module):
        return []
    known = _MODE_DEPENDENT.get(fn)  # from this forward's static_reads, when the tree is static
    if known is not None:
        return known
    return [m for m in _modules(fn) if type(m) not in _PURE_MODULES]


def _modules(root: _nn.Module) -> list[_nn.Module]:
    """``root.modules()`` (each module once, parents first) without building the dotted
    names that ``named_modules`` makes: this walk is on the forward's hot path."""
    out = [root]
    seen = {id(root)}
    i = 0
    while i < len(out):
        for child in module_children(out[i]).values():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                out.append(child)
        i += 1
    return out
