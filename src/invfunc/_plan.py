"""A mode per block, chosen from measurements: :func:`plan` and :class:`Plan`.

NOTE [A mode per block]

1. A :class:`Plan` is its function with one mode per block of its flattened chain
   (``fn._flatten()``, in block order). ``invertible_call(plan, *args)`` runs the blocks
   as the function's own call would, each in its mode: a "plain" block is called with
   ordinary autograd inside the loop, the others are applied as usual.
2. The caller's inputs are freed only when the first block is "invertible".
3. A chain of couplings runs with pairs inside (NOTE [Pairs inside a chain]) only when
   every block is "invertible": with other modes the split and join blocks would keep
   copies of the stream, which the measurements of :func:`plan` do not include.
4. A reason that makes a whole call keep its inputs (saved-tensor hooks, a half-precision
   stream, a torch that cannot free) turns its "invertible" blocks into "checkpoint" ones.
5. A plan's modes take precedence over the ambient :func:`invfunc.mode`; ``mode=`` given
   to ``invertible_call`` together with a plan is an error naming both.
6. Its inverse is the inverse function with the modes reversed (no measurements: they
   were taken in the forward direction). In a :func:`invfunc.chain` a plan counts as its
   function: the chain's call decides the modes; plan the whole chain instead.

NOTE [Bytes kept]

What :func:`plan` budgets is the bytes of activations held between the forward and the
backward, beyond parameters, the caller's inputs and the output. Measured, not estimated:
each block is run alone, in each mode, on the real output of the block before it (a leaf
copy), and the storages its autograd nodes save are walked (unique storages, live bytes),
as ``saved_tensors`` and the nodes' saved attributes hold them, plus the discrete choices
an invfunc block keeps (see "Discrete choices" in the sharp bits).

1. A block's *own* bytes in a mode: what its nodes save less the storages of parameters,
   buffers and tensors the function holds (:func:`invfunc.as_module` finds the same),
   the graph's leaves, the call's trailing arguments, its inputs and its outputs.
   "plain": every intermediate ordinary autograd saves. "checkpoint" and "invertible":
   nothing but discrete choices (the inputs and outputs they save are boundaries).
2. A *boundary*, block k's output and block k+1's input, is held when a node saves it
   (block k's, as its output: always in "checkpoint" and "invertible", in "plain" when
   its last op saves its result; or block k+1's, as its input: always in "checkpoint",
   in "plain" when an op reads it for its backward), unless block k+1 is "invertible"
   and frees it. Block k+1 frees it when the freeing rules allow (NOTE [Freeing rules]:
   not a view, not saved by a producer whose backward a rebuilt value could change, as
   a ReLU's; measured on block k's output in each of its modes), and when block k+1
   does not return it as is.
3. The caller's inputs (block 1's) and the call's outputs (the last block's) are not
   counted. A block's bytes in a table are its own bytes plus its input's, with the
   block before it in its planned mode: in the planned modes they add up to the total.
4. ``invertible_call(plan, *args)`` holds exactly the total: a test walks the whole
   plan's graph and counts the same bytes. A chain of couplings planned all
   "invertible" runs with pairs inside (NOTE [A mode per block], rule 3), which holds
   none either.
5. A block that returns an input as is (a view of it) passes one storage across two
   boundaries; it is counted at both: an over-estimate, never an under-estimate.
6. The peak of a training step adds to these bytes what the backward holds while it
   works on one block: its recompute (a coupling in "checkpoint" mode holds F's and G's
   intermediates at once, in "invertible" mode one at a time) and its gradients.

The drift of a block is the relative error of its input rebuilt by its inverse from its
exact output (largest error over the largest magnitude), measured once; rebuilt through
several "invertible" blocks in a row, errors add up.

NOTE [The search]

1. A block may be "invertible" only if its drift is at most ``max_drift`` (default: the
   tolerance of :func:`invfunc.verify` for its dtype, 1e-4 in float32, 1e-8 in float64).
2. The least-memory plan is found exactly: a dynamic program over the blocks whose state
   is the previous block's mode (the bytes of a boundary depend on both neighbours), the
   least bytes, then the least time. A block that is not "invertible" there is never
   made "invertible".
3. The plans for every budget form one path, which does not depend on the budget. It
   starts at the fastest plan (each block in its fastest mode: a step's time is the sum
   of the blocks' measured times, forward and backward, in their modes). Each step moves
   one block to a mode further along "plain" -> "checkpoint" -> "invertible", the move
   that costs the least time per byte saved among those that lower the total bytes. When
   no move lowers them, the path ends at the least-memory plan, if that holds less.
4. A budget takes the first plan on the path that fits; with none, the last one (the
   least-memory plan) and a warning. Along the path the bytes fall and no block leaves
   "invertible": a tighter budget never gives more bytes or fewer "invertible" blocks.
   The path is greedy, not the fastest plan for each budget (that choice is not
   monotone: two "checkpoint" blocks can fit where an "invertible" and a "plain" do).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ._core import Invertible, _name
from ._errors import check_choice
from ._modes import MODES

__all__ = ["BlockProfile", "Plan", "plan"]

INV, CKPT, PLAIN = "invertible", "checkpoint", "plain"
#: The modes in the order a block moves along the search's path (NOTE [The search], rule 3).
ORDER = (PLAIN, CKPT, INV)
_RANK = {m: i for i, m in enumerate(ORDER)}


@dataclasses.dataclass(frozen=True)
class Output:
    """One data output of a block, as the block after it receives it (NOTE [Bytes kept]).

    Attributes:
        nbytes: the bytes of its storage.
        saved: per mode of this block, whether this block's nodes save it.
        freeable: per mode of this block, whether the next block, "invertible", may free it.
    """

    nbytes: int
    saved: Mapping[str, bool]
    freeable: Mapping[str, bool]


@dataclasses.dataclass(frozen=True)
class Input:
    """One data input of a block (NOTE [Bytes kept]).

    Attributes:
        saved: per mode, whether the block's nodes save it.
        returned: the block returns it as is (an output shares its storage): never freed.
    """

    saved: Mapping[str, bool]
    returned: bool


@dataclasses.dataclass(frozen=True)
class BlockProfile:
    """What :func:`invfunc.plan` measured of one block (NOTE [Bytes kept] in ``_plan.py``).

    Attributes:
        name: the block, as errors and :func:`invfunc.explain` name it.
        saved: per mode, the bytes the block's own nodes keep beyond parameters, its
            inputs and its outputs (its intermediates in "plain").
        time: per mode, the median seconds of a forward and backward of the block alone.
        forward: median seconds of the forward without grad.
        inverse: median seconds of the inverse without grad.
        recompute: median seconds of the forward with grad (what a backward re-runs).
        drift: relative error of the input rebuilt by the inverse from the exact output.
        rtol: the drift tolerance of :func:`invfunc.verify` for the input's dtype, used
            when ``max_drift`` is not given.
        inputs: its data inputs (the previous block's outputs), how each mode keeps them.
        outputs: its data outputs, how each mode keeps them.

    Examples:
        >>> b = BlockProfile("f", {"plain": 64, "checkpoint": 0, "invertible": 0},
        ...                  {"plain": 1e-3, "checkpoint": 2e-3, "invertible": 2e-3},
        ...                  5e-4, 5e-4, 6e-4, 1e-7, 1e-4, (), ())
        >>> b.saved["plain"], b.drift <= b.rtol
        (64, True)
    """

    name: str
    saved: Mapping[str, int]
    time: Mapping[str, float]
    forward: float
    inverse: float
    recompute: float
    drift: float
    rtol: float
    inputs: tuple[Input, ...]
    outputs: tuple[Output, ...]


# -- the cost model (NOTE [Bytes kept]) --------------------------------------------------


def _boundary(before: BlockProfile, after: BlockProfile, a: str, b: str) -> int:
    """Bytes of the tensors between two blocks held for the backward, the first in mode
    ``a``, the second in mode ``b`` (NOTE [Bytes kept], rule 2)."""
    held = 0
    for out, inp in zip(before.outputs, after.inputs):
        freed = b == INV and out.freeable[a] and not inp.returned
        if not freed and (out.saved[a] or inp.saved[b]):
            held += out.nbytes
    return held


def _own(profile: Sequence[BlockProfile], k: int, before: str | None, m: str) -> int:
    """Block ``k``'s bytes in mode ``m``, its input's included, the block before it in
    mode ``before`` (NOTE [Bytes kept], rule 3)."""
    held = profile[k].saved[m]
    if k and before is not None:
        held += _boundary(profile[k - 1], profile[k], before, m)
    return held


def block_bytes(profile: Sequence[BlockProfile], modes: Sequence[str]) -> list[int]:
    """Each block's bytes in its mode (they add up to the plan's total)."""
    return [_own(profile, k, modes[k - 1] if k else None, m) for k, m in enumerate(modes)]


def total_bytes(profile: Sequence[BlockProfile], modes: Sequence[str]) -> int:
    """Bytes held between the forward and the backward by the blocks in ``modes``.

    Examples:
        >>> plain = BlockProfile("f", {"plain": 10, "checkpoint": 0, "invertible": 0},
        ...                      dict.fromkeys(ORDER, 0.0), 0.0, 0.0, 0.0, 0.0, 1e-4,
        ...                      (Input(dict.fromkeys(ORDER, True), False),),
        ...                      (Output(100, {"plain": False, "checkpoint": True, "invertible": True},
        ...                              dict.fromkeys(ORDER, True)),))
        >>> total_bytes([plain, plain], ["plain", "plain"])        # 10 + 10 + the boundary
        120
        >>> total_bytes([plain, plain], ["checkpoint", "invertible"])   # freed by the second
        0
    """
    return sum(block_bytes(profile, modes))


def _seconds(profile: Sequence[BlockProfile], modes: Sequence[str]) -> float:
    return sum(b.time[m] for b, m in zip(profile, modes))


# -- the search (NOTE [The search]) --------------------------------------------------------


def _least_memory(profile: Sequence[BlockProfile], allowed: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """The plan with the least bytes, then the least time (rule 2): exact."""
    best: dict[str, tuple[int, float, tuple[str, ...]]] = {
        m: (_own(profile, 0, None, m), profile[0].time[m], (m,)) for m in allowed[0]
    }
    for k in range(1, len(profile)):
        step: dict[str, tuple[int, float, tuple[str, ...]]] = {}
        for m in allowed[k]:
            step[m] = min(
                (
                    (held + _own(profile, k, a, m), t + profile[k].time[m], (*modes, m))
                    for a, (held, t, modes) in best.items()
                ),
                key=_key,
            )
        best = step
    return min(best.values(), key=_key)[2]


def _key(entry: tuple[int, float, tuple[str, ...]]) -> tuple[int, float, tuple[int, ...]]:
    held, t, modes = entry
    return held, t, tuple(_RANK[m] for m in modes)


def _move(
    profile: Sequence[BlockProfile], cur: Sequence[str], allowed: Sequence[Sequence[str]]
) -> tuple[int, str, int] | None:
    """The next step of the path (rule 3): (block, mode, change of bytes), or None."""
    best: tuple[tuple[float, int, int, int], int, str, int] | None = None
    n = len(cur)
    for k, now in enumerate(cur):
        before = cur[k - 1] if k else None
        for m in allowed[k]:
            if _RANK[m] <= _RANK[now]:
                continue
            change = _own(profile, k, before, m) - _own(profile, k, before, now)
            if k + 1 < n:
                change += _own(profile, k + 1, m, cur[k + 1]) - _own(profile, k + 1, now, cur[k + 1])
            if change >= 0:
                continue
            cost = (profile[k].time[m] - profile[k].time[now]) / -change  # seconds per byte saved
            key = (cost, change, k, _RANK[m])
            if best is None or key < best[0]:
                best = (key, k, m, change)
    return None if best is None else best[1:]


def path(profile: Sequence[BlockProfile], allowed: Sequence[Sequence[str]]) -> Iterator[tuple[str, ...]]:
    """The plans for every budget, from the fastest to the least memory (rules 2 and 3)."""
    least = _least_memory(profile, allowed)
    allowed = [a if least[k] == INV else [m for m in a if m != INV] for k, a in enumerate(allowed)]
    cur = [min(a, key=lambda m, b=b: (b.time[m], _RANK[m])) for a, b in zip(allowed, profile)]  # type: ignore[misc]
    held = total_bytes(profile, cur)
    yield tuple(cur)
    while (step := _move(profile, cur, allowed)) is not None:
        k, m, change = step
        cur[k] = m
        held += change
        yield tuple(cur)
    if total_bytes(profile, least) < held:
        yield least


def search(
    profile: Sequence[BlockProfile], max_memory: float | None, max_drift: float | None
) -> tuple[tuple[str, ...], bool]:
    """The modes for a budget (rule 4) and whether they fit it.

    Examples:
        >>> f = BlockProfile("f", {"plain": 10, "checkpoint": 0, "invertible": 0},
        ...                  {"plain": 1.0, "checkpoint": 1.5, "invertible": 1.6}, 0.0, 0.0, 0.0,
        ...                  0.0, 1e-4, (Input(dict.fromkeys(ORDER, True), False),),
        ...                  (Output(100, {"plain": False, "checkpoint": True, "invertible": True},
        ...                          dict.fromkeys(ORDER, True)),))
        >>> search([f, f, f], None, None)              # no budget: the fastest
        (('plain', 'plain', 'plain'), True)
        >>> search([f, f, f], 0, None)                 # the first block's input is the caller's
        (('checkpoint', 'invertible', 'invertible'), True)
    """
    allowed = [
        [m for m in ORDER if m != INV or b.drift <= (b.rtol if max_drift is None else max_drift)]
        for b in profile
    ]
    modes: tuple[str, ...] = ()
    for modes in path(profile, allowed):
        if max_memory is None or total_bytes(profile, modes) <= max_memory:
            return modes, True
    return modes, False


# -- the Plan ------------------------------------------------------------------------------


class Plan(Invertible):
    """A function with a mode per block, made by :func:`invfunc.plan`.

    Calling it is a plain call of its function. :func:`invfunc.invertible_call` runs
    each block of the flattened chain in its mode, with plain autograd's gradients
    (NOTE [A mode per block] in ``_plan.py``). ``str(plan)`` is a table of the blocks,
    their modes and, when measured, their bytes kept and times in each mode.

    Attributes:
        fn: the function planned.
        modes: the mode of each block, in block order.
        profile: the measurements of each block (:class:`BlockProfile`), or None for
            modes set by hand without example inputs.
        max_memory: the budget it was planned for, in bytes, or None.
        max_drift: the drift limit it was planned with, or None (the dtype's default).

    Examples:
        >>> import torch, invfunc as inv
        >>> net = inv.chain(*[inv.couple(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)) for _ in range(3)])
        >>> p = inv.plan(net, modes=["plain", "checkpoint", "invertible"])
        >>> isinstance(p, inv.Plan), p.modes
        (True, ('plain', 'checkpoint', 'invertible'))
        >>> p.inverse.modes                            # the inverse chain, modes reversed
        ('invertible', 'checkpoint', 'plain')
        >>> print(p)
        plan: 3 block(s), not measured
        | # | block                  | mode       |
        | - | ---------------------- | ---------- |
        | 1 | couple(Linear, Linear) | plain      |
        | 2 | couple(Linear, Linear) | checkpoint |
        | 3 | couple(Linear, Linear) | invertible |
    """

    def __init__(
        self,
        fn: Invertible,
        modes: Sequence[str],
        *,
        profile: Sequence[BlockProfile] | None = None,
        max_memory: float | None = None,
        max_drift: float | None = None,
    ) -> None:
        if not isinstance(fn, Invertible) or isinstance(fn, Plan):
            raise TypeError(
                f"invfunc.Plan(fn, modes): fn must be an Invertible other than a Plan, got {fn!r}."
            )
        self.fn = fn
        self.modes = check_modes(fn, modes, f"invfunc.Plan({fn._name}, modes)")
        if profile is not None and len(profile) != len(self.modes):
            raise ValueError(
                f"invfunc.Plan({fn._name}, modes, profile=...): {len(profile)} measured blocks for "
                f"{len(self.modes)} modes."
            )
        self.profile = None if profile is None else tuple(profile)
        self.max_memory = max_memory
        self.max_drift = max_drift
        super().__init__(
            fn, fn.inverse, ladj=fn._ladj, name=f"plan({fn._name})", wraps=False, _counts=fn._counts
        )

    # -- what it predicts ----------------------------------------------------------------
    @property
    def bytes_kept(self) -> int | None:
        """Bytes of activations held between forward and backward (NOTE [Bytes kept]), or
        None when not measured."""
        return None if self.profile is None else total_bytes(self.profile, self.modes)

    @property
    def step_time(self) -> float | None:
        """Seconds of a forward and backward, the sum of the blocks' measured times in
        their modes, or None when not measured."""
        return None if self.profile is None else _seconds(self.profile, self.modes)

    @property
    def feasible(self) -> bool:
        """Whether the plan keeps within ``max_memory`` (True without a budget or measurements)."""
        held = self.bytes_kept
        return self.max_memory is None or held is None or held <= self.max_memory

    # -- the engine protocol: its function's, NOTE [A mode per block] ----------------------
    def call_mode(self, mode: str | None) -> str:
        """The mode of ``invertible_call(plan, ...)``: its "invertible" blocks' (rules 4, 5)."""
        if mode is not None:
            raise ValueError(
                f"invfunc.invertible_call({self._name}, ..., mode={mode!r}): a Plan sets a mode per block "
                f"({', '.join(self.modes)}), and mode= would override them all. Leave mode= out to run the "
                "plan, call its function (plan.fn) with mode= for one mode, or make another plan with "
                "invfunc.plan(fn, modes=[...])."
            )
        return INV if INV in self.modes else CKPT if CKPT in self.modes else PLAIN

    def block_modes(self) -> tuple[str, ...] | None:
        """The blocks' modes for the call, or None when all are "invertible" (rule 3)."""
        return None if all(m == INV for m in self.modes) else self.modes

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    @property
    def n_inputs(self) -> int | None:
        return self.fn.n_inputs

    @property
    def n_outputs(self) -> int | None:
        return self.fn.n_outputs

    @property
    def inverse(self) -> Invertible:
        if self._inverse is None:
            inv = Plan(self.fn.inverse, tuple(reversed(self.modes)))
            inv._inverse = self
            self._inverse = inv
        return self._inverse

    def __repr__(self) -> str:
        return f"Plan({self.fn._name}, modes={list(self.modes)})"

    def __str__(self) -> str:
        return describe(self)

    def _flatten(self) -> list[Invertible]:
        return self.fn._flatten()

    def _check_arity(self, args: Sequence[Any], what: str) -> None:
        self.fn._check_arity(args, what)

    def _n_data(self, args: Sequence[Any]) -> int:
        return self.fn._n_data(args)

    def _learn(self, args: Sequence[Any], out: Any, n_data: int | None = None) -> None:
        pass  # its function learns, as it runs

    def _plan(self, args: Sequence[Any]) -> tuple[list[Invertible], tuple[Any, ...], list[tuple[Any, ...]]]:
        return self.fn._plan(args)

    def _declared_data(self) -> int | None:
        return self.fn._declared_data()

    def _takes_rest(self, n_rest: int, lead: bool, where: str) -> bool:
        return self.fn._takes_rest(n_rest, lead, where)


def check_modes(fn: Invertible, modes: object, where: str) -> tuple[str, ...]:
    """``modes`` as a tuple, one valid mode per block of ``fn``, or a clear error."""
    n = len(fn._flatten())
    valid = ", ".join(repr(m) for m in MODES)
    if isinstance(modes, str) or not isinstance(modes, Sequence):
        raise TypeError(
            f"{where}: modes must be a list with one mode per block ({n} block(s) in {fn._name}), each "
            f"one of {valid}; got {modes!r}."
        )
    if len(modes) != n:
        raise ValueError(
            f"{where}: {len(modes)} mode(s) given for {n} block(s) (nested chains flattened); give one "
            f"mode per block, each one of {valid}."
        )
    return tuple(
        check_choice(m, MODES, f"{where}: modes[{i}] (block {i + 1} of {n})", "mode", "modes")
        for i, m in enumerate(modes)
    )


# -- the table -----------------------------------------------------------------------------


def _size(n: float) -> str:
    """Bytes, readably: ``0 B``, ``512 B``, ``1.5 KiB``, ``2.0 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.3g}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table with padded columns."""
    cells = [list(header), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *(line(r) for r in cells[1:])])


def describe(p: Plan) -> str:
    """``str(plan)``: a headline and a row per block (NOTE [Bytes kept], rule 3)."""
    names = [b._name for b in p.fn._flatten()]
    if p.profile is None:
        rows = [[str(k + 1), name, m] for k, (name, m) in enumerate(zip(names, p.modes))]
        return f"plan: {len(p.modes)} block(s), not measured\n" + table(["#", "block", "mode"], rows)
    prof = p.profile
    rows = []
    for k, (b, m) in enumerate(zip(prof, p.modes)):
        before = p.modes[k - 1] if k else None
        rows.append(
            [
                str(k + 1),
                b.name,
                m,
                *(_size(_own(prof, k, before, mode)) for mode in ORDER),
                *(_ms(b.time[mode]) for mode in ORDER),
                _ms(b.forward),
                _ms(b.inverse),
                _ms(b.recompute),
                f"{b.drift:.1e}" + ("" if b.drift <= _limit(b, p.max_drift) else " (too much)"),
            ]
        )
    plain = [PLAIN] * len(prof)
    budget = "no budget" if p.max_memory is None else f"max_memory {_size(p.max_memory)}"
    drift = "per dtype" if p.max_drift is None else f"{p.max_drift:.0e}"
    held, seconds = p.bytes_kept or 0, p.step_time or 0.0
    lines = [
        f"plan: {len(prof)} block(s); {budget}, max_drift {drift}"
        + ("" if p.feasible else " (cannot be met: the least-memory plan)"),
        f"kept between forward and backward: {_size(held)} (all plain: {_size(total_bytes(prof, plain))}); "
        f"a step: {_ms(seconds)} ms (all plain: {_ms(_seconds(prof, plain))} ms)",
    ]
    header = ["#", "block", "mode", "kept plain", "checkpoint", "invertible", "ms plain", "checkpoint"]
    header += ["invertible", "forward", "inverse", "recompute", "drift"]
    return "\n".join(lines) + "\n" + table(header, rows)


def _limit(b: BlockProfile, max_drift: float | None) -> float:
    return b.rtol if max_drift is None else max_drift


# -- the public function ---------------------------------------------------------------------


def plan(
    fn: Invertible,
    *args: Any,
    max_memory: float | None = None,
    max_drift: float | None = None,
    modes: Sequence[str] | None = None,
    repeat: int = 3,
) -> Plan:
    """Choose a mode per block of ``fn`` from measurements, or set them by hand.

    Each block of the flattened chain is measured on the real output of the block before
    it (NOTE [Bytes kept] in ``_plan.py``): in each mode, the bytes it keeps between
    forward and backward (a storage-level count of what autograd saves, deterministic on
    CPU) and the median time of a forward and backward over ``repeat`` runs; its forward,
    inverse and recompute times; and the drift of its input rebuilt by the inverse. The
    plan is then the fastest within ``max_memory`` that keeps every block whose drift
    passes ``max_drift`` out of "invertible" (NOTE [The search]): a tighter budget never
    gives fewer "invertible" blocks. A budget no plan meets gives the least-memory plan
    and a warning. Run it with ``invertible_call(plan, *args)``: gradients are plain
    autograd's. The budget bounds what is held between forward and backward; the peak
    of a step adds one block's recompute.

    Measuring does not change the caller's state: parameters and buffers (BatchNorm
    running statistics, ActNorm's initialisation) are restored, as are the random number
    generators; gradients are taken with ``torch.autograd.grad`` (``.grad`` is left
    alone); open :func:`invfunc.explain` regions see nothing. It holds a copy of the
    parameters and buffers while it runs.

    Modes set by hand, one per block, need no example inputs: ``plan(fn, modes=[...])``.
    Given a plan (with measurements) and no inputs, it plans again from the plan's
    measurements: ``plan(p, max_memory=...)``.

    Args:
        fn: an :class:`Invertible` (a chain is planned block by block), or a
            :class:`Plan` to plan again.
        *args: example inputs, as ``invertible_call(fn, *args)`` takes them.
        max_memory: bytes of activations that may be held between forward and
            backward, beyond parameters, the caller's inputs and the output. None: no
            limit (the fastest plan).
        max_drift: the largest relative error of a rebuilt input for an "invertible"
            block. None: :func:`invfunc.verify`'s default for the dtype (1e-4 in
            float32, 1e-8 in float64); ``math.inf`` for no limit.
        modes: one of ``"plain"``, ``"checkpoint"``, ``"invertible"`` per block, in
            block order, instead of a search (measured too when inputs are given).
        repeat: timed runs per block and mode (after one warm-up); the median counts.

    Returns:
        A :class:`Plan`: ``plan.modes`` in block order; ``str(plan)`` a table of the
        measurements; ``plan.bytes_kept`` and ``plan.step_time`` the predicted totals.

    Examples:
        >>> import torch, invfunc as inv
        >>> torch.manual_seed(0) is not None
        True
        >>> mlp = lambda: torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
        >>> net = inv.chain(*[inv.couple(mlp(), mlp()) for _ in range(4)])
        >>> x = torch.randn(32, 16, requires_grad=True)
        >>> fast = inv.plan(net, x)                     # no budget: the fastest plan
        >>> fast.bytes_kept > 0
        True
        >>> p = inv.plan(fast, max_memory=fast.bytes_kept // 2)   # again, from the measurements
        >>> p.bytes_kept <= fast.bytes_kept // 2
        True
        >>> p.modes.count("invertible") >= fast.modes.count("invertible")
        True
        >>> y = inv.invertible_call(p, x)               # each block in its mode
        >>> y.square().mean().backward()

        Modes by hand, checked against the blocks:

        >>> inv.plan(net, modes=["plain", "checkpoint", "invertible", "invertible"]).modes
        ('plain', 'checkpoint', 'invertible', 'invertible')
        >>> inv.plan(net, modes=["plain", "fast"])
        Traceback (most recent call last):
            ...
        ValueError: invfunc.plan(chain(...), modes=...): 2 mode(s) given for 4 block(s) ...
    """
    name = _name(fn) if not isinstance(fn, Invertible) else fn._name
    where = f"invfunc.plan({name}, *args)" if args or not isinstance(fn, Plan) else f"invfunc.plan({name})"
    if not isinstance(fn, Invertible):
        raise TypeError(
            f"{where}: fn must be an Invertible, got {type(fn).__name__}; wrap it with "
            "invfunc.invertible(fn, inverse=...) or build it with invfunc.couple / invfunc.chain."
        )
    _check_options(where, max_memory, max_drift, repeat)
    base = fn.fn if isinstance(fn, Plan) else fn
    if modes is not None:
        if max_memory is not None or max_drift is not None:
            raise TypeError(
                f"invfunc.plan({name}, modes=...): modes= sets the modes by hand; max_memory= and "
                "max_drift= choose them. Pass one or the other."
            )
        chosen = check_modes(base, modes, f"invfunc.plan({base._name}, modes=...)")
        profile = _measured(base, args, repeat, where) if args else None
        if profile is None and isinstance(fn, Plan):
            profile = fn.profile
        return Plan(base, chosen, profile=profile)
    if args:
        profile = _measured(base, args, repeat, where)
    elif isinstance(fn, Plan) and fn.profile is not None:
        profile = fn.profile
    else:
        raise TypeError(
            f"{where}: no example inputs to measure the blocks on. Pass the inputs of a call "
            "(invfunc.plan(fn, x, max_memory=...)), a measured plan to plan again, or the modes by "
            "hand (invfunc.plan(fn, modes=[...]))."
        )
    chosen, fits = search(profile, max_memory, max_drift)
    result = Plan(base, chosen, profile=profile, max_memory=max_memory, max_drift=max_drift)
    if not fits:
        warnings.warn(
            f"{where}: no plan keeps within max_memory={max_memory:.0f} bytes; the least-memory plan "
            f"holds {result.bytes_kept} bytes (modes {', '.join(chosen)}). Raise max_memory, raise "
            "max_drift if blocks were kept out of 'invertible' for their drift, or make blocks "
            "invertible.",
            stacklevel=2,
        )
    return result


def _check_options(where: str, max_memory: object, max_drift: object, repeat: object) -> None:
    if max_memory is not None and (
        isinstance(max_memory, bool) or not isinstance(max_memory, (int, float)) or not max_memory >= 0
    ):
        raise ValueError(f"{where}: max_memory must be a number of bytes >= 0 or None, got {max_memory!r}.")
    if max_drift is not None and (
        isinstance(max_drift, bool) or not isinstance(max_drift, (int, float)) or not max_drift >= 0
    ):
        raise ValueError(
            f"{where}: max_drift must be a relative error >= 0 (math.inf: no limit) or None (the dtype's "
            f"default), got {max_drift!r}."
        )
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(
            f"{where}: repeat must be a positive int (timed runs per block and mode), got {repeat!r}."
        )


def _measured(fn: Invertible, args: Sequence[Any], repeat: int, where: str) -> tuple[BlockProfile, ...]:
    from ._profile import profile  # (it runs invertible_call, whose module imports this one)

    return profile(fn, args, repeat=repeat, where=where)
