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
    return getattr(fn, "__name__", None) or type(fn).__name__


class Invertible:
    """A function paired with its inverse.

    Calling it is an ordinary call with ordinary autograd. Run it through
    :func:`invfunc.invertible_call` to free its inputs and rebuild them in backward.
    Make one with :func:`invertible`, :func:`invfunc.couple` or :func:`invfunc.chain`.

    Attributes:
        n_inputs: how many leading positional arguments are data (rebuilt by the
            inverse); the remaining ones are parameters shared by both directions.

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

    def __init__(
        self,
        fn: Callable[..., Any],
        inverse: Callable[..., Any],
        *,
        n_inputs: int = 1,
        name: str | None = None,
        wraps: bool = True,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"invfunc.invertible: expected a callable to wrap, got {type(fn).__name__}.")
        if isinstance(inverse, Invertible):
            inverse = inverse.__call__
        if not callable(inverse):
            raise TypeError(
                f"invfunc.invertible({_name(fn)}): inverse= must be a callable, got {type(inverse).__name__}."
            )
        if not isinstance(n_inputs, int) or isinstance(n_inputs, bool) or n_inputs < 1:
            raise ValueError(
                f"invfunc.invertible({_name(fn)}): n_inputs= must be a positive int (the number of "
                f"leading data arguments), got {n_inputs!r}."
            )
        self._fn = fn
        self._inv = inverse
        self.n_inputs = n_inputs
        self._name = name or _name(fn)
        self._arity = _arity(fn)
        self._inverse: Invertible | None = None
        if wraps:
            functools.update_wrapper(self, fn, updated=())  # type: ignore[arg-type]

    # -- the public face ----------------------------------------------------------
    def __call__(self, *args: Any) -> Any:
        self._check_arity(args, "call")
        return self._fn(*args)

    @property
    def inverse(self) -> Invertible:
        """The inverse, itself an :class:`Invertible` whose inverse is ``self``."""
        if self._inverse is None:
            inv = Invertible(self._inv, self._fn, n_inputs=self.n_inputs, name=f"inverse({self._name})")
            inv._inverse = self
            self._inverse = inv
        return self._inverse

    def __repr__(self) -> str:
        return f"Invertible({self._name})"

    # -- the engine protocol (see _apply.py, _autograd.py)--------------------------------
    def _flatten(self) -> list[Invertible]:
        return [self]

    def _check_arity(self, args: Sequence[Any], what: str) -> None:
        if self._arity is not None:
            lo, hi = self._arity
            if not lo <= len(args) <= hi:
                want = f"{lo}" if lo == hi else f"{lo} to {hi}"
                raise TypeError(
                    f"invfunc.invertible_call({self._name}, ...): {self._name} takes {want} positional "
                    f"arguments ({self.n_inputs} data, the rest parameters) but {what} gave {len(args)}."
                )

    def _n_data(self, args: Sequence[Any]) -> int:
        return self.n_inputs

    def _plan(self, args: Sequence[Any]) -> tuple[list[Invertible], tuple[Any, ...], tuple[Any, ...]]:
        """The blocks to run, the first block's arguments, and extra trailing arguments
        for the last block (see :class:`invfunc._combinators.Chain`)."""
        return self._flatten(), tuple(args), ()

    def _run(self, args: Sequence[Any], section: Any) -> Any:
        """The forward, run once under no_grad while the engine records (see _apply.py)."""
        return self._fn(*args)

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
        """The inputs, rebuilt from the outputs by the inverse."""
        return self._inv(*outputs, *params)


@overload
def invertible(fn: _F, /, *, inverse: Callable[..., Any], n_inputs: int = 1) -> Invertible: ...
@overload
def invertible(
    fn: None = None, /, *, inverse: Callable[..., Any], n_inputs: int = 1
) -> Callable[[Callable[..., Any]], Invertible]: ...
def invertible(
    fn: Callable[..., Any] | None = None, /, *, inverse: Callable[..., Any], n_inputs: int = 1
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
    """

    def wrap(f: Callable[..., Any]) -> Invertible:
        return Invertible(f, inverse, n_inputs=n_inputs)

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
