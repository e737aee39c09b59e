"""Diagnosing a network block by block: :func:`check`.

NOTE [What check runs]

1. Block pass. The blocks of ``fn`` (a chain's blocks, nested chains flattened, each
   with the trailing arguments it takes) run in order, each on the actual output of the
   previous one (the first on the caller's data), as in a plain forward. Each block is
   run forward once under ``no_grad`` and recorded as the engine records it (NOTE
   [Recording and replaying a block]); its parameters and buffers are compared before
   and after (what changed is *stateful*); then, from the state after that forward and
   the random-generator states before it: a second forward, replayed as the backward
   replays it (random draws and state updates as in the engine: *rerun*); its inverse
   on its outputs (*inverse*); and its gradients under :func:`invfunc.invertible_call`
   against plain autograd, the block alone, with its input freed and rebuilt (*grads*).
2. Call pass. The whole of ``fn`` runs once under :func:`invfunc.invertible_call`
   (mode ``"invertible"``) on copies of the data passed as intermediates, so every
   block's input is freed and rebuilt, inside :func:`invfunc.explain` with drift
   verified (``verify="warn"``): the relative error of each block's input as rebuilt in
   backward from the network's output (*drift*: accumulated through the blocks after
   it), which inputs are kept and why, and recomputes that diverged.
3. Kept inputs of the first block are the caller's own: the freeing rules (NOTE
   [Freeing rules]) are applied to them without running anything; those of the other
   blocks come from the call pass.
4. Errors are relative: the largest elementwise error over the largest magnitude of
   the expected tensor. A block fails when an error passes ``rtol`` (default by dtype,
   :func:`invfunc.testing.default_rtol`), or when a run raises. Drift accumulates from the
   output down: a block fails on drift only where it first passes the tolerance (the
   block after it is within it); the blocks before it inherit it, noted, not failed, so
   the first failure names the block where the error enters.
5. Nothing of the caller's changes: every parameter and buffer of the modules ``fn``
   reaches, and every tensor it holds through closures (NOTE [Walking a function]), is
   saved first and restored after each run (values, the objects in their slots, version
   counters, ``.grad``); the default random generators are forked, and generators that
   blocks drew from with ``generator=`` are set back. Gradients are taken with
   :func:`torch.autograd.grad`, so no ``.grad`` is written. State outside what the walk
   reaches (a Python counter, a tensor reached through another module's attribute) is
   not restored.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._call import _labels, invertible_call
from ._chain import Chain
from ._core import Invertible, _name, split_ladj
from ._errors import InvfuncError
from ._explain import explain
from ._replay import RngState, Tracer, cuda_devices
from ._snapshot import Snapshot
from ._storage import free_reason
from ._walk import Reached, walk
from .testing._checks import default_rtol, find_parameters

__all__ = ["BlockCheck", "CheckReport", "check"]


@dataclass(frozen=True)
class BlockCheck:
    """What :func:`check` found for one block (NOTE [What check runs]).

    Errors are relative (the largest elementwise error over the largest magnitude of
    the expected tensor); None where the run did not happen.

    Attributes:
        index: the block's position in the flattened chain (``fn.blocks[index]``).
        name: the block as invfunc's errors name it (``"scale, block 3 of 5"``).
        inverse_error: ``inverse(block(x))`` against ``x``, the block alone.
        forward_error: a second forward on the same input, RNG and state, against the first.
        deterministic: whether ``forward_error`` is within ``rtol``.
        grad_error: gradients under ``invertible_call`` against plain autograd, the block alone.
        drift: the block's input as rebuilt in backward through the whole call.
        rtol: the tolerance the errors were held to.
        stateful: modules (or held tensors) whose parameters or buffers the forward
            changed, as ``"path (type)"``.
        captured: ``(name, shape)`` of the tensors the block holds besides its arguments
            (closures, globals, defaults); ``"(unnamed)"`` for a tensor requiring grad
            that it reads but that walking it does not reach.
        kept: ``(input index, reason)`` of the inputs a call would keep, not free.
        problems: what failed, with the numbers (empty: the block passes).
        notes: what is worth knowing but did not fail (inherited drift, ...).

    Examples:
        >>> import torch, invfunc as inv
        >>> shift = inv.invertible(lambda x: x + 1, inverse=lambda y: y - 1)
        >>> (block,) = inv.check(shift, torch.zeros(2, 3)).blocks
        >>> block.name, block.inverse_error, block.deterministic, block.ok
        ('<lambda>', 0.0, True, True)
    """

    index: int
    name: str
    inverse_error: float | None
    forward_error: float | None
    deterministic: bool | None
    grad_error: float | None
    drift: float | None
    rtol: float
    stateful: tuple[str, ...]
    captured: tuple[tuple[str, tuple[int, ...]], ...]
    kept: tuple[tuple[int, str], ...]
    problems: tuple[str, ...]
    notes: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when no check of this block failed."""
        return not self.problems


@dataclass(frozen=True)
class CheckReport:
    """The result of :func:`check`: one :class:`BlockCheck` per block, in chain order.

    ``str(report)`` is a table naming the blocks, followed by the details.

    Attributes:
        name: the function checked.
        blocks: one :class:`BlockCheck` per block.
        problems: failures of the whole call that no block accounts for.
        notes: remarks on the whole call.

    Examples:
        >>> import torch, invfunc as inv
        >>> shift = inv.invertible(lambda x: x + 1, inverse=lambda y: y - 1)
        >>> report = inv.check(inv.chain(shift, shift), torch.zeros(2, 3))
        >>> report.ok, report.first_failure, [b.name for b in report.blocks]
        (True, None, ['<lambda>, block 1 of 2', '<lambda>, block 2 of 2'])
    """

    name: str
    blocks: tuple[BlockCheck, ...]
    problems: tuple[str, ...]
    notes: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return not self.problems and all(b.ok for b in self.blocks)

    @property
    def first_failure(self) -> BlockCheck | None:
        """The first failing block in chain order, or None."""
        return next((b for b in self.blocks if not b.ok), None)

    def __str__(self) -> str:
        return _render(self)


def check(fn: Invertible, *args: Any, strict: bool = False, rtol: float | None = None) -> CheckReport:
    """Diagnose an invertible network block by block.

    Each block of ``fn`` (a chain's blocks, nested chains flattened) runs on the actual
    output of the block before it, and is checked for: the error of its inverse; whether
    a second forward from the same input, random and module state gives the same output
    (the backward relies on it: torch's random draws are replayed, a global counter is
    not); its gradients under :func:`invfunc.invertible_call` against plain autograd; the
    modules whose state its forward changes (BatchNorm, spectral norm, ActNorm's
    initialisation), the tensors it holds through closures, and which inputs a call
    keeps and why. The whole network then runs once under ``invertible_call``: the
    ``drift`` of each block's input as rebuilt in backward. NOTE [What check runs] in the
    source says exactly what runs. The caller's state is left as it was: parameters,
    buffers and held tensors are saved and restored (values, version counters,
    ``.grad``), random generators forked or set back; Python state (a counter) is not.

    Args:
        fn: an :class:`~invfunc.Invertible`.
        *args: its data inputs followed by its parameters, as for ``invertible_call``.
        strict: raise :class:`~invfunc.InvfuncError` naming the first failing block,
            what failed and the numbers, instead of returning a failing report.
        rtol: the relative tolerance; default by dtype: ``1e-10`` for float64, ``1e-4``
            for float32, ``1e-2`` for float16, ``5e-2`` for bfloat16.

    Returns:
        A :class:`CheckReport`: ``report.ok``, ``report.first_failure``,
        ``report.blocks`` (frozen :class:`BlockCheck` values); ``print(report)`` shows
        the table.

    Raises:
        InvfuncError: with ``strict=True``, if a check fails.
        TypeError: if ``fn`` is not an Invertible or a data input is not a tensor.
        ValueError: if ``rtol`` is not a positive number.

    Examples:
        >>> import torch, invfunc as inv
        >>> torch.manual_seed(0) is not None
        True
        >>> def block():
        ...     return inv.couple(torch.nn.Linear(2, 2).double(), torch.nn.Tanh())
        >>> twice = inv.invertible(lambda x: x * 2, inverse=lambda y: y / 2 + 1e-3)  # wrong
        >>> net = inv.chain(block(), block(), twice, block())
        >>> x = torch.randn(3, 4, dtype=torch.float64)
        >>> report = inv.check(net, x)
        >>> report.ok, report.first_failure.index, report.first_failure.name
        (False, 2, '<lambda>, block 3 of 4')
        >>> print(f"{report.blocks[2].inverse_error:.1e}")
        4.0e-04
        >>> report.blocks[0].kept
        ((0, 'it is a leaf (user data or a parameter); data leaves are freed only when named in free='),)

        ``strict=True`` raises, naming the block and the numbers:

        >>> try:
        ...     inv.check(net, x, strict=True)
        ... except inv.InvfuncError as e:
        ...     print(str(e)[:96])
        invfunc.check(chain(...), *args): <lambda>, block 3 of 4 (index 2) fails: inverse error 4.0e-04

        ``print(report)`` shows the table, then the details of each block (the
        drift of the blocks before the wrong one is its own, inherited):

        >>> print(report)
        invfunc.check(chain(...)): 4 block(s), FAILED at <lambda>, block 3 of 4 (index 2)
        #  block                               inverse  rerun    grads    drift   rtol
        0  couple(Linear, Tanh), block 1 of 4  ...      0  ...  9.3e-04  1e-10  ok
        1  couple(Linear, Tanh), block 2 of 4  ...      0  ...  5.5e-04  1e-10  ok
        2  <lambda>, block 3 of 4              4.0e-04      0        0  4.0e-04  1e-10  FAIL
        3  couple(Linear, Tanh), block 4 of 4  ...      0  ...  ...  1e-10  ok
          [0] couple(Linear, Tanh), block 1 of 4
        ...
    """
    where = f"invfunc.check({_name(fn)}, *args)"
    if not isinstance(fn, Invertible):
        raise TypeError(
            f"{where}: fn must be an Invertible, got {type(fn).__name__}; wrap it with "
            "invfunc.invertible(fn, inverse=...) or build it with invfunc.couple / invfunc.chain."
        )
    where = f"invfunc.check({_short(fn._name)}, *args)"
    if not args:
        raise TypeError(f"{where}: no inputs given; pass the data inputs, then any parameters.")
    if not isinstance(strict, bool):
        raise TypeError(f"{where}: strict= must be True or False, got {strict!r}.")
    if rtol is not None and (isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol > 0):
        raise ValueError(f"{where}: rtol= must be a positive number or None, got {rtol!r}.")
    fn._check_arity(args, "call")
    blocks, data, extras = fn._plan(args)
    for i, t in enumerate(data):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{where}: data input {i} must be a tensor, got {type(t).__name__}; non-tensor "
                f"arguments go after the {len(data)} data input(s)."
            )
    report = _Check(fn, blocks, data, tuple(args[len(data) :]), extras, rtol).run()
    if strict and not report.ok:
        raise InvfuncError(_strict_message(where, report))
    return report


# -- comparing ------------------------------------------------------------------------------------


def _relative(got: torch.Tensor | None, want: torch.Tensor | None, scale: float | None = None) -> float:
    """The largest elementwise error of ``got`` over the largest magnitude of ``want``
    (or ``scale``); a missing tensor counts as zeros, a shape mismatch or a NaN as inf."""
    if got is None and want is None:
        return 0.0
    if got is None or want is None:
        present = want if got is None else got
        assert present is not None
        got = torch.zeros_like(present) if got is None else got
        want = torch.zeros_like(present) if want is None else want
    if got.shape != want.shape:
        return math.inf
    if got.numel() == 0:
        return 0.0
    with torch.no_grad():
        if not (want.is_floating_point() or want.is_complex()):
            return 0.0 if torch.equal(got, want) else math.inf
        wide = torch.complex128 if want.is_complex() or got.is_complex() else torch.float64
        a, e = got.detach().to(wide), want.detach().to(wide)
        same = (a == e) | (torch.isnan(a) & torch.isnan(e))
        diff = torch.where(same, torch.zeros_like(e.real), torch.nan_to_num((a - e).abs(), nan=math.inf))
        worst = float(diff.max())
        if worst == 0.0:
            return 0.0
        finite = e.abs()[torch.isfinite(e)]
        top = scale if scale is not None else (float(finite.max()) if finite.numel() else 0.0)
    return worst / top if top > 0 else math.inf


def _largest(pairs: Iterable[tuple[torch.Tensor | None, torch.Tensor | None]]) -> tuple[float, int]:
    """The largest relative error among pairs (got, want), and the index of that pair."""
    worst, at = 0.0, -1
    for i, (g, w) in enumerate(pairs):
        err = _relative(g, w)
        if at < 0 or not err <= worst:
            worst, at = err, i
    return worst, at


def _as_tuple(out: Any) -> tuple[Any, ...]:
    return out if isinstance(out, tuple) else (out,)


def _data_out(block: Invertible, out: Any) -> tuple[torch.Tensor, ...]:
    """A block's data outputs: its log-det left out (NOTE [Log-determinants])."""
    return _as_tuple(split_ladj(out)[0] if block._ladj is True else out)


def _floating(t: object) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


def _replayer(recorded: Tracer) -> Tracer:
    """A tracer that replays a recorded forward as the backward does: its external state
    updates skipped, batch norms' running statistics not updated again."""
    tr = Tracer()
    tr.start_replay({})
    tr.updates = recorded.updates
    tr.norms = recorded.norms
    return tr


def _weights(outs: Sequence[Any]) -> list[torch.Tensor | None]:
    """Fixed random weights for a scalar loss over the floating-point outputs."""
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype)
        if _floating(o)
        else None
        for o in outs
    ]


def _loss(outs: Sequence[Any], weights: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    terms = [
        (o * w).real.sum() if o.is_complex() else (o * w).sum()
        for o, w in zip(outs, weights)
        if w is not None
    ]
    return sum(terms[1:], terms[0]) if terms else None


def _stand_ins(data: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Copies of the floating-point data as fresh leaves, and as intermediates made from them
    (``leaf * 1``) that a call frees and rebuilds; other data as it is."""
    leaves = [t.detach().clone().requires_grad_(True) if _floating(t) else t for t in data]
    return leaves, [leaf * 1 if _floating(leaf) else leaf for leaf in leaves]


def _raised(what: str, e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{what} raised {type(e).__name__}: {text}"


# -- the runs ---------------------------------------------------------------------------------------


@dataclass
class _Found:
    """What the runs found for one block, before the report is made (BlockCheck's fields)."""

    index: int
    name: str
    rtol: float
    inverse_error: float | None = None
    forward_error: float | None = None
    grad_error: float | None = None
    drift: float | None = None
    stateful: list[str] = field(default_factory=list)
    captured: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    kept: list[tuple[int, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def frozen(self) -> BlockCheck:
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(self).items()}
        fwd = self.forward_error
        return BlockCheck(**values, deterministic=None if fwd is None else fwd <= self.rtol)


class _Check:
    """One :func:`check`: the block pass, then the call pass (NOTE [What check runs])."""

    def __init__(
        self,
        fn: Invertible,
        blocks: list[Invertible],
        data: tuple[Any, ...],
        tail: tuple[Any, ...],
        extras: list[tuple[Any, ...]],
        rtol: float | None,
    ) -> None:
        self.fn, self.blocks, self.data, self.tail, self.extras = fn, blocks, data, tail, extras
        self.rtol = None if rtol is None else float(rtol)
        self.labels = _labels(blocks)
        self.roots = _roots(fn, blocks)
        tensors = [t for t in (*data, *tail) if isinstance(t, torch.Tensor)]
        self.devices = cuda_devices(tensors, current=True)
        self.generators: dict[int, tuple[torch.Generator, torch.Tensor]] = {}
        self.problems: list[str] = []
        self.notes: list[str] = []

    def run(self) -> CheckReport:
        kept = _caller_kept(self.data)  # before anything else shares the inputs' storage
        whole = Snapshot(walk(self.fn))
        try:
            with torch.random.fork_rng(devices=self.devices), warnings.catch_warnings(), torch.enable_grad():
                warnings.simplefilter("ignore")  # drift and divergence: the report has them
                start = RngState(self.devices)
                found = self._block_pass()
                found[0].kept.extend(kept)
                self._set_back(whole, start)
                self._call_pass(found)
        finally:
            self._set_back(whole, None)
        _judge_drift(found)
        return CheckReport(
            self.fn._name, tuple(f.frozen() for f in found), tuple(self.problems), tuple(self.notes)
        )

    def _set_back(self, whole: Snapshot, start: RngState | None) -> None:
        whole.restore()
        if start is not None:
            start.restore()
        for g, s in self.generators.values():
            g.set_state(s)

    def _block_pass(self) -> list[_Found]:
        found: list[_Found] = []
        cur: tuple[Any, ...] | None = tuple(
            t.detach() if isinstance(t, torch.Tensor) else t for t in self.data
        )
        for k, block in enumerate(self.blocks):
            tol = self.rtol if self.rtol is not None else default_rtol(*(cur or ()))
            f = _Found(k, self.labels[k], tol)
            found.append(f)
            if cur is None:
                f.problems.append("not checked: an earlier block's forward raised")
                continue
            cur = _Block(block, cur, self.extras[k], self.roots[k], f).run(self.devices, self.generators)
        return found

    def _call_pass(self, found: list[_Found]) -> None:
        """NOTE [What check runs], rule 2."""
        leaves, hs = _stand_ins(self.data)
        with explain() as rep:
            try:
                outs = _as_tuple(invertible_call(self.fn, *hs, *self.tail, mode="invertible", verify="warn"))
                loss = _loss(outs, _weights(outs))
                wrt = [leaf for leaf in leaves if _floating(leaf)]
                if loss is not None and loss.requires_grad and wrt:
                    torch.autograd.grad(loss, wrt, allow_unused=True)
            except Exception as e:
                self.problems.append(_raised("the whole call under invfunc.invertible_call", e))
        for label, i, why in rep.kept:
            k = self._block_of(label)
            if i < 0 or k is None:
                self.notes.append(f"{label}: the call keeps its inputs: {why}")
            elif i not in {j for j, _ in found[k].kept}:  # one reason per input, as a call gives
                found[k].kept.append((i, why))
        for label, _, err in rep.drift:
            k = self._block_of(label)
            if k is not None:
                d = found[k].drift
                found[k].drift = err if d is None or not err <= d else d
        for label, what, why in rep.diverged:
            k = self._block_of(label)
            note = f"its recompute in backward ({what}) did not reproduce the forward: {why}"
            (found[k].notes if k is not None else self.notes).append(note)

    def _block_of(self, label: str) -> int | None:
        """The block an explain() entry names (the split and join around a block are its own)."""
        for k, lab in enumerate(self.labels):
            if label == lab or label.startswith(lab + ": "):
                return k
        return None


class _Block:
    """The checks of one block on its input (NOTE [What check runs], rule 1)."""

    def __init__(
        self, block: Invertible, xs: tuple[Any, ...], extra: tuple[Any, ...], root: str, f: _Found
    ) -> None:
        self.block, self.xs, self.extra, self.root, self.f = block, xs, extra, root, f
        self.args = (*xs, *extra)
        self.tracer = Tracer()

    def run(
        self, devices: list[int], generators: dict[int, tuple[torch.Generator, torch.Tensor]]
    ) -> tuple[Any, ...] | None:
        """Run the checks; return the block's data outputs (None if its forward raised)."""
        f, tracer = self.f, self.tracer
        reached = list(walk(self.block, self.root))
        before = Snapshot(reached)
        self.rng = RngState(devices)
        tracer.start_recording(self.xs)
        try:
            with torch.no_grad(), tracer:
                out = self.block(*self.args)
        except Exception as e:
            f.problems.append(_raised("its forward", e))
            before.restore()
            return None
        for section in tracer.generators.values():
            for key, (g, s) in section.items():
                generators.setdefault(key, (g, s))  # its state before the check
                self.rng.user.append((g, s))
        self.after = before.again()
        f.stateful.extend(before.changed())
        if tracer.updates - before.ids:
            n = len(tracer.updates - before.ids)
            f.stateful.append(f"(unnamed: {n} tensor(s) written in place that check cannot restore)")
        f.captured.extend(_captured(reached, tracer, before.ids, self.args))
        ys = _data_out(self.block, out)
        steps: list[Callable[[], None]] = [
            lambda: self.rerun(_as_tuple(out)),
            lambda: self.inverse(ys),
            self.grads,
        ]
        for step in steps:
            try:
                step()
            finally:
                self.after.restore()  # each run starts from the state after the forward
        return ys

    def rerun(self, outs: tuple[Any, ...]) -> None:
        f = self.f
        try:
            with self.rng.replay(), torch.no_grad(), _replayer(self.tracer):
                again = _as_tuple(self.block(*self.args))
        except Exception as e:
            f.problems.append(_raised("a second forward", e))
            return
        err = _largest(zip(again, outs))[0] if len(again) == len(outs) else math.inf
        f.forward_error = err
        if not err <= f.rtol:
            f.problems.append(
                f"not deterministic: a second forward on the same input, random state and module state "
                f"differs from the first by {err:.1e} (rtol {f.rtol:.0e}), so its recompute in backward "
                "would too. It reads something invfunc does not replay (a global counter, Python's or "
                "numpy's random numbers, a nondeterministic kernel): draw random numbers with torch "
                "(replayed) or keep the block out of invertible_call (mode='plain')."
            )

    def inverse(self, ys: tuple[torch.Tensor, ...]) -> None:
        f, xs = self.f, self.xs
        try:
            with self.rng.replay(), torch.no_grad(), _replayer(self.tracer):
                back = _as_tuple(self.block._rebuild(ys, self.extra))
        except Exception as e:
            f.problems.append(_raised("its inverse", e))
            return
        if len(back) != len(xs):
            f.inverse_error = math.inf
            f.problems.append(f"its inverse returned {len(back)} tensor(s) for {len(xs)} data input(s).")
            return
        err, i = _largest(zip(back, xs))
        f.inverse_error = err
        if not err <= f.rtol:
            which = f" (input {i})" if len(xs) > 1 else ""
            f.problems.append(
                f"inverse error {err:.1e} > rtol {f.rtol:.0e}: inverse(block(x)) does not give back "
                f"x{which}, so the input rebuilt in backward, and the gradients, are off by as much. "
                "Fix the inverse, compute in a wider dtype, or run this block with mode='checkpoint'."
            )

    def grads(self) -> None:
        """The block under invertible_call against plain autograd, its input freed and rebuilt."""
        block, xs, extra = self.block, self.xs, self.extra
        named = [
            (f"argument {len(xs) + i}", t) for i, t in enumerate(extra) if _floating(t) and t.requires_grad
        ]
        seen = {id(t) for _, t in named}
        named += [(self.root + name[2:], t) for name, t in find_parameters(block) if id(t) not in seen]
        diff = [i for i, t in enumerate(xs) if _floating(t)]
        weights: list[torch.Tensor | None] = []

        def run(call: Callable[..., Any]) -> list[torch.Tensor | None]:
            leaves, hs = _stand_ins(xs)
            with self.rng.replay():
                outs = _as_tuple(call(*hs, *extra))
            weights[:] = weights or _weights(outs)
            loss = _loss(outs, weights)
            wrt = [leaves[i] for i in diff] + [t for _, t in named]
            if loss is None or not loss.requires_grad or not wrt:
                return [None] * len(wrt)
            return list(torch.autograd.grad(loss, wrt, allow_unused=True))

        try:
            want = run(block)
            self.after.restore()
            got = run(lambda *a: invertible_call(block, *a, mode="invertible", verify="warn"))
        except Exception as e:
            self.f.problems.append(_raised("its gradients", e))
            return
        _grad_error(want, got, [f"input {i}" for i in diff] + [n for n, _ in named], self.f)


def _roots(fn: Invertible, blocks: Sequence[Invertible]) -> list[str]:
    """How names of what each block holds start: as ``find_parameters`` names them."""
    if len(blocks) == 1 and blocks[0] is fn:
        return ["fn"]
    flat = isinstance(fn, Chain) and len(fn.blocks) == len(blocks)
    flat = flat and all(a is b for a, b in zip(fn.blocks, blocks))  # type: ignore[attr-defined]
    return [f"fn.blocks[{k}]" if flat else f"block {k}" for k in range(len(blocks))]


def _caller_kept(data: Sequence[Any]) -> list[tuple[int, str]]:
    """NOTE [What check runs], rule 3: why the caller's data inputs would be kept."""
    reasons = [(i, free_reason(t)) for i, t in enumerate(data) if isinstance(t, torch.Tensor)]
    return [(i, why) for i, why in reasons if why is not None]


def _captured(
    reached: Sequence[Reached], tracer: Tracer, known: set[int], args: Sequence[Any]
) -> list[tuple[str, tuple[int, ...]]]:
    """Tensors a block holds besides its modules, and those it read that walking misses."""
    out = [(path, tuple(t.shape)) for path, t, _ in reached if isinstance(t, torch.Tensor)]
    skip = known | {id(a) for a in args}
    read: dict[int, torch.Tensor] = {}
    for section in tracer.sections.values():
        read.update(section)
    out += [("(unnamed)", tuple(t.shape)) for key, t in read.items() if key not in skip]
    return out


def _grad_error(
    want: Sequence[torch.Tensor | None], got: Sequence[torch.Tensor | None], names: Sequence[str], f: _Found
) -> None:
    """Compare gradients on the block's scale, its largest plain gradient: a gradient that
    cancels to round-off (a bias before a batch norm) is not held to a relative error it
    cannot have. A gradient missing where plain autograd's is not zero is infinitely off."""
    tops = [float(w.detach().abs().max()) for w in want if w is not None and w.numel()]
    scale = max([t for t in tops if math.isfinite(t)], default=0.0)
    worst, at = 0.0, -1
    for i, (g, w) in enumerate(zip(got, want)):
        missing = g is None and w is not None and bool(w.detach().ne(0).any())
        err = math.inf if missing else _relative(g, w, scale=scale)
        if at < 0 or not err <= worst:
            worst, at = err, i
    f.grad_error = worst
    if not worst <= f.rtol:
        what = "is missing" if worst == math.inf else f"differs from plain autograd by {worst:.1e}"
        f.problems.append(
            f"gradient of {names[at]} under invertible_call {what} (rtol {f.rtol:.0e}, relative to the "
            "block's largest gradient). invfunc.testing.check_grads on this block shows where."
        )


def _judge_drift(found: list[_Found]) -> None:
    """NOTE [What check runs], rule 4: drift fails where it first passes the tolerance."""
    origin: int | None = None
    for k in reversed(range(len(found))):
        f = found[k]
        if f.drift is None or f.drift <= f.rtol:
            origin = None
            continue
        if origin is None:
            origin = k
            if f.inverse_error is not None and not f.inverse_error <= f.rtol:
                f.notes.append(f"drift {f.drift:.1e}: its own inverse error, carried into backward")
                continue
            f.problems.append(
                f"drift {f.drift:.1e} > rtol {f.rtol:.0e}: its input, rebuilt in backward from the "
                "network's output, is off by that much, and the blocks after it are within the tolerance. "
                "Improve this block's inverse (its conditioning), compute in float64, or keep its input "
                "(keep=, mode='checkpoint')."
            )
        else:
            f.notes.append(f"drift {f.drift:.1e}, inherited from {found[origin].name} (index {origin})")


# -- the report as text ------------------------------------------------------------------------------


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    return f"{v:.1e}"


def _short(name: str, width: int = 60) -> str:
    """A long name cut to ``width`` characters: ``chain(...)`` stays readable."""
    if len(name) <= width:
        return name
    cut = name.find("(")
    return name[: cut + 1] + "...)" if 0 < cut < width - 5 else name[: width - 3] + "..."


def _row(b: BlockCheck) -> list[str]:
    errors = (b.inverse_error, b.forward_error, b.grad_error, b.drift)
    return [str(b.index), b.name, *map(_num, errors), f"{b.rtol:.0e}", "ok" if b.ok else "FAIL"]


def _render(report: CheckReport) -> str:
    first = report.first_failure
    if report.ok:
        verdict = "ok"
    elif first is not None:
        verdict = f"FAILED at {first.name} (index {first.index})"
    else:
        verdict = "FAILED (the whole call)"
    lines = [f"invfunc.check({_short(report.name)}): {len(report.blocks)} block(s), {verdict}"]
    head = ["#", "block", "inverse", "rerun", "grads", "drift", "rtol", ""]
    rows = [_row(b) for b in report.blocks]
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
    for r in [head, *rows]:
        cells = [r[c].ljust(widths[c]) if c in (1, 7) else r[c].rjust(widths[c]) for c in range(len(r))]
        lines.append("  ".join(cells).rstrip())
    lines += _details(report)
    lines += textwrap.wrap(
        "Errors are relative. inverse: inverse(block(x)) against x; rerun: a second forward, same "
        "input, random and module state; grads: invertible_call against plain autograd, the block "
        "alone; drift: the block's input as rebuilt in backward through the whole call.",
        100,
    )
    return "\n".join(lines)


def _details(report: CheckReport) -> list[str]:
    lines: list[str] = []

    def add(text: str) -> None:
        lines.extend(textwrap.wrap(text, 100, initial_indent="    ", subsequent_indent="      "))

    for b in report.blocks:
        if not (b.problems or b.notes or b.stateful or b.captured or b.kept):
            continue
        lines.append(f"  [{b.index}] {b.name}")
        for p in b.problems:
            add(f"FAIL: {p}")
        for i, why in b.kept:
            add(f"kept: input {i}: {why}")
        if b.stateful:
            add("stateful: " + ", ".join(b.stateful))
        if b.captured:
            add("captured: " + ", ".join(f"{n} {s}" for n, s in b.captured))
        for n in b.notes:
            add(n)
    for p in report.problems:
        add(f"FAIL: {p}")
    for n in report.notes:
        add(n)
    return lines


def _strict_message(where: str, report: CheckReport) -> str:
    b = report.first_failure
    if b is None:
        what = "; ".join(report.problems)
        return f"{where}: {what}\n\n{report}"
    return f"{where}: {b.name} (index {b.index}) fails: {' '.join(b.problems)}\n\n{report}"
