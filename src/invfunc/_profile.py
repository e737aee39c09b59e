"""Measuring each block for :func:`invfunc.plan`: bytes kept in each mode, times, drift.

See NOTE [Bytes kept] in ``_plan.py`` for what is counted. Every block runs alone, through
:func:`invfunc.invertible_call`, on a leaf copy of the real output of the block before it;
the caller's state is restored afterwards (:class:`~invfunc._snapshot.Snapshot`, the
generators' states).
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch

from ._call import _labels, invertible_call
from ._compat import storage_key
from ._core import Invertible, split_ladj
from ._errors import InvertibilityWarning, InvfuncError
from ._explain import _reports
from ._plan import INV, ORDER, BlockProfile, Input, Output
from ._replay import RngState, cuda_devices
from ._snapshot import Snapshot
from ._storage import free_reason
from ._verify import DEFAULT_RTOL
from ._walk import walk

__all__ = ["Saved", "profile", "saved_storages"]


class Saved(NamedTuple):
    """What the autograd graph behind some tensors keeps (see :func:`saved_storages`)."""

    storages: dict[int, int]  # storage key -> live bytes
    leaves: list[torch.Tensor]  # the graph's leaves that require grad
    choices: int  # bytes of discrete choices invfunc blocks keep


def _node_tensors(node: Any) -> Iterator[torch.Tensor]:
    """The tensors one autograd node saved: a Function's ``saved_tensors`` and a built-in
    node's saved attributes (``_saved_self``, ``_saved_result``... as the autograd docs
    show them). One released, or a caller's freed input (its version advanced), holds no
    bytes: skipped."""
    try:
        yield from getattr(node, "saved_tensors", ())
    except RuntimeError:
        pass
    for name in dir(node):
        if not name.startswith("_saved_"):
            continue
        try:
            value = getattr(node, name)
        except RuntimeError:
            continue
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from (t for t in value if isinstance(t, torch.Tensor))


def saved_storages(outputs: Sequence[torch.Tensor]) -> Saved:
    """The storages the autograd nodes reachable from ``outputs`` saved for backward.

    Unique storages, counted at their live bytes (a freed one counts 0); the discrete
    choices of invfunc's blocks (argmax indices, masks) are added as bytes.

    Examples:
        >>> import torch
        >>> x = torch.randn(4, 4, requires_grad=True)
        >>> y = (x + 1).exp()             # exp saves its result; x + 1 saves nothing
        >>> s = saved_storages([y])
        >>> list(s.storages.values()), [t is x for t in s.leaves]
        ([64], [True])
    """
    seen: set[int] = set()
    alive: list[object] = []
    storages: dict[int, int] = {}
    leaves: dict[int, torch.Tensor] = {}
    choices = 0
    stack = [t.grad_fn for t in outputs if isinstance(t, torch.Tensor)]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        alive.append(node)  # (older torch makes a new wrapper per access: ids get reused)
        leaf = getattr(node, "variable", None)
        if isinstance(leaf, torch.Tensor):
            leaves[id(leaf)] = leaf
        for t in _node_tensors(node):
            s = t.untyped_storage()
            storages[storage_key(s)] = s.nbytes()
        state = getattr(node, "state", None) if getattr(type(node), "_invfunc_saves_outputs", False) else None
        for kept in (getattr(state, "choices", None) or {}).values():
            choices += sum(c.nbytes for c in kept)
        stack.extend(fn for fn, _ in node.next_functions)
    return Saved(storages, list(leaves.values()), choices)


def _key(t: torch.Tensor) -> int:
    return storage_key(t.untyped_storage())


@contextmanager
def _quiet() -> Iterator[None]:
    """Measuring reports nothing to open explain() regions and warns nothing (a drifting
    block run "invertible" warns of its recompute)."""
    reports = _reports()
    hidden = list(reports)
    reports.clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InvertibilityWarning)
            yield
    finally:
        reports[:] = hidden


def profile(fn: Invertible, args: Sequence[Any], *, repeat: int, where: str) -> tuple[BlockProfile, ...]:
    """Measure every block of ``fn`` on ``args`` (NOTE [Bytes kept] in ``_plan.py``)."""
    if torch.is_inference_mode_enabled():
        raise InvfuncError(
            f"{where}: called under torch.inference_mode, where nothing can be differentiated and so "
            "nothing can be measured; call it outside."
        )
    fn._check_arity(args, "invertible_call")
    blocks, data, extras = fn._plan(args)
    labels = _labels(blocks)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    devices = cuda_devices(tensors, current=True)
    snapshot = Snapshot(walk(fn))
    for t in (t for e in extras for t in e):
        if isinstance(t, torch.Tensor):
            snapshot.add(t)
    held = {_key(i.tensor) for i in snapshot.items if i.tensor.layout == torch.strided}
    user = RngState(devices)
    out: list[BlockProfile] = []
    try:
        with _quiet(), torch.enable_grad():
            cur: tuple[torch.Tensor, ...] = tuple(_template(t, where) for t in data)
            for k, block in enumerate(blocks):
                measured, cur = _block(block, cur, extras[k], labels[k], held, devices, repeat)
                out.append(measured)
    finally:
        user.restore()
        snapshot.restore()
    return tuple(out)


def _template(t: object, where: str) -> torch.Tensor:
    """A block's input as the measurements start from it: detached, requiring grad as it does."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            f"{where}: a data input is a {type(t).__name__}, not a tensor; non-tensor arguments go "
            "after the data inputs."
        )
    return t.detach().requires_grad_(t.requires_grad)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """A copy of a block's input the call may free, requiring grad as the input does."""
    return t.detach().clone().requires_grad_(t.requires_grad)


def _data_outputs(block: Invertible, out: Any) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(every output tensor, the data outputs: the next block's inputs; not the log-det)."""
    outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    data = split_ladj(outs)[0] if block._ladj is True else out
    return outs, (data,) if isinstance(data, torch.Tensor) else tuple(data)


class _Kept(NamedTuple):
    """One run of a block in one mode: its own bytes; per input, saved and returned as is;
    per data output, saved, freeable by the next block, and its bytes; the graph's leaves."""

    own: int
    inputs: list[bool]
    returned: list[bool]
    outputs: list[bool]
    freeable: list[bool]
    nbytes: list[int]
    leaves: list[torch.Tensor]


def _kept(
    block: Invertible, data: Sequence[torch.Tensor], extra: Sequence[Any], mode: str, state: set[int]
) -> tuple[_Kept, tuple[torch.Tensor, ...]]:
    """Run the block once in ``mode`` and count what its graph keeps (NOTE [Bytes kept])."""
    xs = [_leaf(t) for t in data]
    out = invertible_call(block, *xs, *extra, mode=mode, verify="off")
    outs, data_out = _data_outputs(block, out)
    del out
    # before the walk holds references to the storages (the rules count them)
    freeable = [free_reason(o, leaf_ok=o.grad_fn is None) is None for o in data_out]
    ins, got = [_key(x) for x in xs], [_key(o) for o in data_out]
    saved = saved_storages(outs)
    skip = state | {_key(t) for t in saved.leaves} | set(ins) | set(got)
    own = sum(n for key, n in saved.storages.items() if key not in skip) + saved.choices
    kept = _Kept(
        own=own,
        inputs=[key in saved.storages and key not in got for key in ins],
        returned=[key in got for key in ins],
        outputs=[key in saved.storages for key in got],
        freeable=freeable,
        nbytes=[o.untyped_storage().nbytes() for o in data_out],
        leaves=[t for t in saved.leaves if all(t is not x for x in xs)],
    )
    return kept, tuple(o.detach().requires_grad_(o.requires_grad) for o in data_out)


def _block(
    block: Invertible,
    data: tuple[torch.Tensor, ...],
    extra: tuple[Any, ...],
    name: str,
    state: set[int],
    devices: list[int],
    repeat: int,
) -> tuple[BlockProfile, tuple[torch.Tensor, ...]]:
    """One block's measurements, and its output: the next block's input."""
    start = RngState(devices)  # every run draws the same random numbers
    kept: dict[str, _Kept] = {}
    after: RngState | None = None
    values: tuple[torch.Tensor, ...] = ()
    for mode in ORDER:
        start.restore()
        kept[mode], outs = _kept(block, data, extra, mode, state)
        if mode == ORDER[0]:
            after, values = RngState(devices), outs  # as the next block finds them
    params = kept[ORDER[0]].leaves
    sync = _sync(devices)
    times = _steps(block, data, extra, params, start, sync, repeat)
    forward, inverse, recompute, drift = _parts(block, data, extra, start, sync, repeat)
    assert after is not None
    after.restore()
    plain = kept[ORDER[0]]
    dtype = next((t.dtype for t in data if t.is_floating_point()), torch.float32)
    measured = BlockProfile(
        name=name,
        saved={m: kept[m].own for m in ORDER},
        time=times,
        forward=forward,
        inverse=inverse,
        recompute=recompute,
        drift=drift,
        rtol=DEFAULT_RTOL.get(dtype, 1e-4),
        inputs=tuple(
            Input({m: kept[m].inputs[i] for m in ORDER}, any(kept[m].returned[i] for m in ORDER))
            for i in range(len(data))
        ),
        outputs=tuple(
            Output(n, {m: kept[m].outputs[i] for m in ORDER}, {m: kept[m].freeable[i] for m in ORDER})
            for i, n in enumerate(plain.nbytes)
        ),
    )
    return measured, values


def _sync(devices: Sequence[int]) -> Callable[[], None]:
    def sync() -> None:
        for d in devices:
            torch.cuda.synchronize(d)

    return sync


def _steps(
    block: Invertible,
    data: Sequence[torch.Tensor],
    extra: Sequence[Any],
    params: Sequence[torch.Tensor],
    rng: RngState,
    sync: Callable[[], None],
    repeat: int,
) -> dict[str, float]:
    """Median seconds of a forward and backward of the block in each mode, after a warm-up
    round; the modes take turns within each round, so that a burst of load on the machine
    slows them alike. ``torch.autograd.grad``: no ``.grad`` changes."""
    times: dict[str, list[float]] = {m: [] for m in ORDER}
    for i in range(repeat + 1):
        for mode in ORDER:
            seconds = _step(block, data, extra, mode, params, rng, sync)
            if i:
                times[mode].append(seconds)
    return {m: statistics.median(t) for m, t in times.items()}


def _step(
    block: Invertible,
    data: Sequence[torch.Tensor],
    extra: Sequence[Any],
    mode: str,
    params: Sequence[torch.Tensor],
    rng: RngState,
    sync: Callable[[], None],
) -> float:
    """Seconds of one forward and backward in ``mode`` ("invertible" frees the input)."""
    xs = [_leaf(t) for t in data]
    wrt = [*(x for x in xs if x.requires_grad), *params]
    rng.restore()
    sync()
    t0 = time.perf_counter()
    out = invertible_call(
        block, *xs, *extra, mode=mode, free=list(range(len(xs))) if mode == INV else [], verify="off"
    )
    outs = [o for o in _data_outputs(block, out)[0] if o.requires_grad]
    if outs and wrt:
        torch.autograd.grad(outs, wrt, [torch.ones_like(o) for o in outs], allow_unused=True)
    sync()
    return time.perf_counter() - t0


def _parts(
    block: Invertible,
    data: Sequence[torch.Tensor],
    extra: Sequence[Any],
    rng: RngState,
    sync: Callable[[], None],
    repeat: int,
) -> tuple[float, float, float, float]:
    """Median seconds of the forward and the inverse without grad, of the forward with
    grad (the recompute), and the drift of the rebuilt input."""
    forward, inverse, recompute = [], [], []
    rebuilt: Any = None
    for i in range(repeat + 1):
        rng.restore()
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            outs = _data_outputs(block, block(*data, *extra))[1]
        sync()
        t1 = time.perf_counter()
        with torch.no_grad():
            rebuilt = block.inverse(*outs, *extra)
        sync()
        t2 = time.perf_counter()
        xs = [_leaf(t) for t in data]
        rng.restore()
        sync()
        t3 = time.perf_counter()
        with torch.enable_grad():
            again = block(*xs, *extra)
        sync()
        t4 = time.perf_counter()
        del again, xs
        if i:
            forward.append(t1 - t0)
            inverse.append(t2 - t1)
            recompute.append(t4 - t3)
    if block._ladj is True:
        rebuilt = split_ladj(rebuilt)[0]
    got = (rebuilt,) if isinstance(rebuilt, torch.Tensor) else tuple(rebuilt)
    return (
        statistics.median(forward),
        statistics.median(inverse),
        statistics.median(recompute),
        drift(data, got),
    )


def drift(want: Sequence[torch.Tensor], got: Sequence[torch.Tensor]) -> float:
    """The largest relative error of ``got`` against ``want``: the largest elementwise
    error over the largest magnitude, per tensor (inf for NaN or a shape mismatch).

    Examples:
        >>> import torch
        >>> drift([torch.tensor([1.0, -4.0])], [torch.tensor([1.0, -3.9])])   # 0.1 / 4
        0.02499...
    """
    worst = 0.0
    if len(want) != len(got):
        return float("inf")
    for w, g in zip(want, got):
        if not isinstance(g, torch.Tensor) or g.shape != w.shape:
            return float("inf")
        if not (w.is_floating_point() or w.is_complex()):
            worst = max(worst, 0.0 if torch.equal(w, g) else float("inf"))
            continue
        w64, g64 = w.detach().to(torch.complex128 if w.is_complex() else torch.float64), g.detach()
        diff = float((g64.to(w64.dtype) - w64).abs().max()) if w.numel() else 0.0
        scale = float(w64.abs().max()) if w.numel() else 0.0
        err = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
        worst = max(worst, err if err == err else float("inf"))  # NaN: inf
    return worst
