"""The :class:`Invertible` value and the :func:`invertible` decorator."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, overload

import torch

__all__ = ["Invertible", "inverse", "invertible"]

_F = TypeVar("_F", bound=Callable[..., Any])


def _arity(fn: Callable[..., Any]) -> tuple[int, float] | None:
    """(min, max) positional arguments ``fn`` accepts, or None if unknown."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    lo, hi = 0, 0.0
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            hi += 1
            if p.default is p.empty:
                lo += 1
        elif p.kind is p.VAR_POSITIONAL:
            hi = float("inf")
        elif p.kind is p.KEYWORD_ONLY and p.default is p.empty:
            return None
    return lo, hi


def _name(fn: object) -> str:
    """A readable name: a ``functools.partial`` by the function it wraps."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", None) or type(fn).__name__


def _fixed(arity: tuple[int, float] | None) -> int | None:
    """The number of positional arguments of a signature that takes exactly that many."""
    if arity is None or arity[0] != arity[1]:
        return None
    return arity[0]


class _Arity:
    """How many data arguments each direction of a pair takes (NOTE [Data and parameters]).

    NOTE [Data and parameters]

    1. A function ``f`` takes ``n_in`` data tensors followed by ``P`` parameters, and
       returns ``n_out`` data tensors; its inverse takes those ``n_out`` tensors followed
       by the same ``P`` parameters, and returns the ``n_in``. A split has ``n_in = 1,
       n_out = 2``; its inverse, a merge, takes 2 data tensors.
    2. ``n_in`` is declared (``n_inputs=``, default 1). ``P`` is known from a signature
       of fixed size, or learnt from a call. ``n_out`` is declared (``n_outputs=``), or
       follows from the inverse's signature of fixed size and ``P``, or is learnt from a
       call of either direction.
    3. The inverse's data count at a call is ``n_out`` if known, else the arguments less
       ``P`` if ``P`` is known, else 1 if it is called with one argument; otherwise it
       cannot be told, and the call is refused before anything runs, naming the fix.
    4. A declaration that contradicts a fixed signature is refused when the pair is made.
    """

    __slots__ = ("n_in", "n_out", "n_params")

    def __init__(
        self,
        name: str,
        n_in: int,
        n_out: int | None,
        fwd: tuple[int, float] | None,
        inv: tuple[int, float] | None,
    ) -> None:
        self.n_in, self.n_out = n_in, n_out
        f, i = _fixed(fwd), _fixed(inv)
        self.n_params: int | None = None
        if f is not None:
            self.n_params = f - n_in
        elif i is not None and n_out is not None:
            self.n_params = i - n_out
        where = f"invfunc.invertible({name})"
        if n_out is None and i is not None and self.n_params is not None and i - self.n_params >= 1:
            self.n_out = i - self.n_params  # the inverse's signature says how many outputs
        if self.n_params is not None and self.n_params < 0:
            raise ValueError(
                f"{where}: it takes {f} positional argument(s) but n_inputs={n_in} data inputs were "
                "declared; declare n_inputs= as the number of leading data arguments."
            )
        if inv is not None and self.n_params is not None:
            lo, hi = inv
            need = (n_out if n_out is not None else 1) + self.n_params
            if n_out is None and hi < need:
                raise ValueError(
                    f"{where}: with n_inputs={n_in}, its last {self.n_params} argument(s) are "
                    f"parameters that the inverse takes too, after at least one output, but the "
                    f"inverse takes {hi:.0f} positional argument(s). If the function merges "
                    f"{n_in + self.n_params} inputs into one, declare n_inputs={n_in + self.n_params}."
                )
            if n_out is not None and not lo <= need <= hi:
                raise ValueError(
                    f"{where}: its inverse must take the {n_out} output(s) (n_outputs={n_out}) and "
                    f"the {self.n_params} parameter(s), {need} positional argument(s), but it takes "
                    f"{lo if lo == hi else f'{lo} to {hi:.0f}'}; check n_inputs= and n_outputs=."
                )

    def inverse_data(self, args: Sequence[Any], name: str) -> int:
        """The inverse's data count for a call with ``args`` (rule 3)."""
        if self.n_out is not None:
            return self.n_out
        if self.n_params is not None and len(args) > self.n_params:
            return len(args) - self.n_params
        if len(args) == 1:
            return 1
        raise TypeError(
            f"invfunc: {name} called with {len(args)} arguments: cannot tell how many of them "
            "are outputs to invert and how many are parameters: the function's signature does not "
            "say, and it has not been called yet. Declare invertible(..., n_outputs=k) with the number "
            "of tensors the function returns."
        )

    def learn(self, n_params: int, n_out: int) -> None:
        """What a call showed (rule 2): its parameter count, and the forward's output count."""
        if self.n_params is None and n_params >= 0:
            self.n_params = n_params
        if self.n_out is None and n_out >= 1:
            self.n_out = n_out


def _count(out: Any) -> int:
    return len(out) if isinstance(out, tuple) else 1


# NOTE [Log-determinants]
#
# 1. A function declared ``ladj=True`` returns its data outputs followed by ``ladj``, the
#    log|det| of its Jacobian per sample, of shape (batch,); its inverse returns the data
#    inputs followed by the inverse map's log-det. ``ladj=0`` declares a volume-preserving
#    function (log-det zero, returns its data alone), as couplings and the split and join
#    blocks are; left out (None), the log-det is unknown.
# 2. A chain has a log-det when a member declares one: it returns its data followed by
#    the sum of its members' log-dets (in block order), in both directions. A member
#    whose log-det is unknown, in such a chain, is refused when the chain is made.
# 3. To the engine the log-det is one more output of the block's Function: its gradient
#    reaches the block's backward with the data outputs' gradients, and the generic
#    backward differentiates the re-run block, log-det included. It is not saved (the
#    rebuild needs only the data outputs) and is not the next block's input: the caller
#    adds the blocks' log-dets (tensors of batch size, one sum node each), so memory
#    stays flat in depth. The rebuild drops the inverse's own log-det.
LADJ_VALUES = (True, 0, None)


def _check_ladj_option(ladj: object, name: str) -> bool | int | None:
    if ladj is False or not any(
        ladj is v or (v == 0 and type(ladj) is int and ladj == 0) for v in LADJ_VALUES
    ):
        raise ValueError(
            f"invfunc.invertible({name}, ladj=...): ladj must be True (the function returns (y, ladj), "
            f"ladj = log|det dy/dx| per sample), 0 (it preserves volume: log-det zero) or left out "
            f"(unknown), got {ladj!r}."
        )
    return ladj  # type: ignore[return-value]


def split_ladj(out: Any) -> tuple[Any, torch.Tensor]:
    """``(data, ladj)`` of what a ``ladj=True`` function returned: the data one tensor or a
    tuple (NOTE [Log-determinants])."""
    *data, ladj = out
    return (data[0] if len(data) == 1 else tuple(data)), ladj


def check_ladj(name: str, out: Any) -> None:
    """``out`` is data followed by a log-det of shape (batch,), as ``ladj=True`` promises."""
    if not isinstance(out, tuple) or len(out) < 2 or not all(isinstance(t, torch.Tensor) for t in out):
        got = f"a tuple of {len(out)}" if isinstance(out, tuple) else f"a {type(out).__name__}"
        raise TypeError(
            f"invfunc: {name} was declared with ladj=True, so it must return its outputs followed by "
            f"their log-det, (y, ladj), but it returned {got}."
        )
    y, ladj = out[0], out[-1]
    batch = y.shape[:1]
    if ladj.shape != batch or not ladj.is_floating_point():
        raise ValueError(
            f"invfunc: {name} returned a log-det of shape {tuple(ladj.shape)} and dtype {ladj.dtype}; "
            f"with ladj=True it must be log|det dy/dx| per sample: a floating tensor of shape "
            f"{tuple(batch)} (the batch), summed over the other dimensions."
        )


class Invertible:
    """A function paired with its inverse.

    Calling it is an ordinary call with ordinary autograd. Run it through
    :func:`invfunc.invertible_call` to free its inputs and rebuild them in backward.
    Make one with :func:`invertible`, :func:`invfunc.couple` or :func:`invfunc.chain`.

    Attributes:
        n_inputs: how many leading positional arguments are data (rebuilt by the
            inverse); the remaining ones are parameters shared by both directions.
            None for an inverse whose function's output count is not known yet
            (NOTE [Data and parameters]).
        n_outputs: how many data tensors it returns (the inverse's ``n_inputs``), or
            None while unknown.

    Examples:
        >>> import torch, invfunc as inv
        >>> double = inv.Invertible(lambda x: 2 * x, lambda y: y / 2)
        >>> double(torch.tensor([1.0, 2.0]))
        tensor([2., 4.])
        >>> double.inverse(torch.tensor([2.0, 4.0]))
        tensor([1., 2.])
        >>> double.inverse.inverse is double
        True
    """

    _sections: tuple[str, ...] = ("",)
    #: False: the block is one section, entered around its whole forward, and the
    #: block's outputs are that section's (checksummed, NOTE [Recompute divergence]).
    #: True: ``_run`` enters its sections itself and hands each one's own outputs to
    #: ``sections.output`` (a coupling's F and G, an affine coupling's net), which its
    #: ``_fused_backward`` recomputes and compares section by section.
    _section_outputs = False

    def __init__(
        self,
        fn: Callable[..., Any],
        inverse: Callable[..., Any],
        *,
        n_inputs: int = 1,
        n_outputs: int | None = None,
        ladj: bool | int | None = None,
        name: str | None = None,
        wraps: bool = True,
        _counts: _Arity | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"invfunc.invertible: expected a callable to wrap, got {type(fn).__name__}.")
        if isinstance(inverse, Invertible):
            inverse = inverse.__call__
        if not callable(inverse):
            raise TypeError(
                f"invfunc.invertible({_name(fn)}): inverse= must be a callable, got {type(inverse).__name__}."
            )
        for option, value, what in (("n_inputs", n_inputs, "arguments"), ("n_outputs", n_outputs, "outputs")):
            if value is None and option == "n_outputs":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"invfunc.invertible({_name(fn)}): {option}= must be a positive int (the number of "
                    f"data {what}), got {value!r}."
                )
        self._fn = fn
        self._inv = inverse
        self._name = name or _name(fn)
        self._ladj = _check_ladj_option(ladj, self._name)
        self._arity = _arity(fn)
        # shared with the inverse, which reads it the other way round
        self._is_inverse = False
        self._counts = _counts or _Arity(self._name, n_inputs, n_outputs, self._arity, _arity(inverse))
        self._inverse: Invertible | None = None
        if wraps:
            functools.update_wrapper(self, fn, updated=())  # type: ignore[arg-type]

    # -- the public face ----------------------------------------------------------
    def __call__(self, *args: Any) -> Any:
        self._check_arity(args, "call")
        n_data = self._n_data(args)  # (a count that cannot be told raises before the call)
        out = self._fn(*args)
        if self._ladj is True:
            check_ladj(self._name, out)
        self._learn(args, out, n_data)
        return out

    @property
    def n_inputs(self) -> int | None:
        """How many leading arguments are data; None for an inverse while unknown."""
        return self._counts.n_out if self._is_inverse else self._counts.n_in

    @property
    def n_outputs(self) -> int | None:
        """How many data tensors it returns (its inverse's ``n_inputs``); None while unknown."""
        return self._counts.n_in if self._is_inverse else self._counts.n_out

    @property
    def inverse(self) -> Invertible:
        """The inverse, itself an :class:`Invertible` whose inverse is ``self``: it takes the
        function's outputs and the same trailing parameters."""
        if self._inverse is None:
            inv = self._inverse_type()(
                self._inv, self._fn, name=f"inverse({self._name})", ladj=self._ladj, _counts=self._counts
            )
            inv._is_inverse = not self._is_inverse
            inv._inverse = self
            self._inverse = inv
        return self._inverse

    @property
    def _exact(self) -> bool:
        """Whether its inverse is exact to the bit (NOTE [Exact couplings]): its stream
        can be freed in any precision."""
        return False

    def _inverse_type(self) -> type[Invertible]:
        """The type of :attr:`inverse` (an op's inverse reads what the op reads)."""
        return Invertible

    def __repr__(self) -> str:
        return f"Invertible({self._name})"

    # -- the engine protocol (see _apply.py, _autograd.py) ------------------------------
    def _flatten(self) -> list[Invertible]:
        return [self]

    def _check_arity(self, args: Sequence[Any], what: str) -> None:
        if self._arity is not None:
            lo, hi = self._arity
            if not lo <= len(args) <= hi:
                want = f"{lo}" if lo == hi else f"{lo} to {hi}"
                data = self.n_inputs
                split = f" ({data} data, the rest parameters)" if data is not None else ""
                where = (
                    f"invfunc.invertible_call({self._name}, ...)"
                    if what == "invertible_call"
                    else (f"invfunc: {self._name}(...)")
                )
                raise TypeError(
                    f"{where}: {self._name} takes {want} positional arguments{split}, "
                    f"but was given {len(args)}."
                )

    def _n_data(self, args: Sequence[Any]) -> int:
        """How many of ``args`` are data (NOTE [Data and parameters])."""
        if self._is_inverse:
            return self._counts.inverse_data(args, self._name)
        return self._counts.n_in

    def _learn(self, args: Sequence[Any], out: Any, n_data: int | None = None) -> None:
        """Learn the parameter and output counts from a call (NOTE [Data and parameters]);
        nothing to do, and ``n_data`` not needed, once both are known."""
        counts = self._counts
        if counts.n_out is None or counts.n_params is None:
            n = self._n_data(args) if n_data is None else n_data
            counts.learn(len(args) - n, n if self._is_inverse else _count(out) - (self._ladj is True))

    def _plan(self, args: Sequence[Any]) -> tuple[list[Invertible], tuple[Any, ...], list[tuple[Any, ...]]]:
        """The blocks to run, the first block's data, and the arguments each block takes
        after its data (NOTE [Trailing arguments of a chain]); one block takes them all."""
        return [self], tuple(args), [()]

    def _declared_data(self) -> int | None:
        """The data count every call has, if one is known (a coupling without
        ``n_inputs=`` takes one tensor or a pair: None)."""
        return self.n_inputs

    def _takes_rest(self, n_rest: int, lead: bool, where: str) -> bool:
        """Whether this block, in a chain, takes the ``n_rest`` trailing arguments
        (NOTE [Trailing arguments of a chain], rules 2 and 3)."""
        p = self._counts.n_params
        if p is not None:
            if p and p != n_rest:
                raise TypeError(
                    f"{where}: its block {self._name} takes {p} argument(s) after its data, but the "
                    f"call has {n_rest} trailing argument(s); a chain hands the same trailing arguments "
                    "to every block that takes any. Bind a block's own parameters with "
                    "functools.partial or a closure, or give every such block the same arguments."
                )
            return p > 0
        d = self.n_inputs
        if not lead and self._arity is not None and d is not None:
            return self._arity[0] >= d + n_rest  # its signature requires them
        return lead

    def _run(self, args: Sequence[Any], section: Any) -> Any:
        """The forward, run once under no_grad while the engine records (see _apply.py)."""
        out = self._fn(*args)
        if self._ladj is True:
            check_ladj(self._name, out)
        self._learn(args, out)
        return out

    def _static_sections(self) -> dict[str, tuple[list[torch.Tensor], bool]] | None:
        """What each section reads, if known without running it (NOTE [Static discovery])."""
        return None

    def _static_reads(self, section: str) -> list[torch.Tensor] | None:
        """The parameters ``section`` reads now, for a block with static sections."""
        return None

    def _mode_dependent(self) -> list[torch.nn.Module]:
        """Modules of this block whose behaviour may depend on train/eval mode."""
        return []

    def _rebuild(self, outputs: Sequence[torch.Tensor], params: Sequence[Any]) -> Any:
        """The inputs, rebuilt from the (data) outputs by the inverse; the inverse's own
        log-det is not needed (NOTE [Log-determinants])."""
        out = self._inv(*outputs, *params)
        return split_ladj(out)[0] if self._ladj is True else out


@overload
def invertible(
    fn: _F,
    /,
    *,
    inverse: Callable[..., Any],
    n_inputs: int = 1,
    n_outputs: int | None = None,
    ladj: bool | int | None = None,
) -> Invertible: ...
@overload
def invertible(
    fn: None = None,
    /,
    *,
    inverse: Callable[..., Any],
    n_inputs: int = 1,
    n_outputs: int | None = None,
    ladj: bool | int | None = None,
) -> Callable[[Callable[..., Any]], Invertible]: ...
def invertible(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    inverse: Callable[..., Any],
    n_inputs: int = 1,
    n_outputs: int | None = None,
    ladj: bool | int | None = None,
) -> Invertible | Callable[[Callable[..., Any]], Invertible]:
    """Pair a pure function with its inverse.

    Works as a decorator with a call (``@invertible(inverse=...)``) or as a function
    (``invertible(f, inverse=g)``). The result keeps ``fn``'s name, docstring and
    signature. ``fn`` maps ``n_inputs`` data tensors, followed by optional parameter
    tensors, to one tensor or a tuple of tensors; ``inverse`` maps those outputs,
    followed by the same parameters, back to the data inputs.

    Args:
        fn: the forward function.
        inverse: its inverse: ``inverse(*fn(*xs, *ps), *ps) == xs``.
        n_inputs: how many leading arguments are data (default 1); the rest are
            parameters shared by both directions.
        n_outputs: how many data tensors ``fn`` returns, which its inverse takes before
            the parameters. Needed only when neither signature says it (``*args``) and
            the inverse is called before ``fn`` (NOTE [Data and parameters]).
        ladj: ``True``: ``fn`` returns its outputs followed by ``ladj``, log|det dy/dx|
            per sample (shape ``(batch,)``), and ``inverse`` its inputs followed by the
            inverse map's log-det; a :func:`invfunc.chain` of such functions sums them.
            ``0``: the function preserves volume (log-det zero; it returns its outputs
            alone). Left out: unknown, which a chain with log-dets refuses.

    Returns:
        An :class:`Invertible`. Calling it is a plain call; pass it to
        :func:`invfunc.invertible_call` for the memory-efficient run.

    Examples:
        >>> import torch, invfunc as inv
        >>> @inv.invertible(inverse=lambda y: (y - 1.0) / 2.0)
        ... def affine(x):
        ...     "Double and shift."
        ...     return 2.0 * x + 1.0
        >>> affine.__name__, affine.__doc__
        ('affine', 'Double and shift.')
        >>> x = torch.tensor([0.0, 1.0])
        >>> affine.inverse(affine(x))
        tensor([0., 1.])

        Parameters are trailing arguments shared with the inverse:

        >>> scale = inv.invertible(lambda x, w: x * w.exp(), inverse=lambda y, w: y * (-w).exp())
        >>> w = torch.zeros(2, requires_grad=True)
        >>> h = torch.ones(2, requires_grad=True) * 3
        >>> y = inv.invertible_call(scale, h, w)
        >>> y.sum().backward()
        >>> w.grad
        tensor([3., 3.])

        A split returns more tensors than it takes; its inverse is a merge of them:

        >>> split = inv.invertible(lambda x: (x[:1], x[1:]), inverse=lambda a, b: torch.cat([a, b]))
        >>> split.n_outputs, split.inverse.n_inputs
        (2, 2)
        >>> split.inverse(*split(torch.arange(3.0)))
        tensor([0., 1., 2.])

        A log-det is declared, and returned after the outputs:

        >>> @inv.invertible(inverse=lambda y, s: (y * (-s).exp(), -s.sum().expand(len(y))), ladj=True)
        ... def scale(x, s):
        ...     return x * s.exp(), s.sum().expand(len(x))
        >>> y, ladj = scale(torch.ones(2, 3), torch.full((3,), 0.5))
        >>> ladj
        tensor([1.5000, 1.5000])
    """

    def wrap(f: Callable[..., Any]) -> Invertible:
        return Invertible(f, inverse, n_inputs=n_inputs, n_outputs=n_outputs, ladj=ladj)

    if fn is None:
        return wrap
    return wrap(fn)


def inverse(fn: Invertible) -> Invertible:
    """The inverse of an :class:`Invertible`: the transform spelling of ``fn.inverse``.

    Examples:
        >>> import torch, invfunc as inv
        >>> exp = inv.invertible(torch.exp, inverse=torch.log)
        >>> inv.inverse(exp)(torch.tensor([1.0]))
        tensor([0.])
        >>> inv.inverse(inv.inverse(exp)) is exp
        True
    """
    if not isinstance(fn, Invertible):
        raise TypeError(
            f"invfunc.inverse(fn): fn must be an Invertible, got {type(fn).__name__}; "
            "wrap it with invfunc.invertible(fn, inverse=...)."
        )
    return fn.inverse
