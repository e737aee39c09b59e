"""Acting on some of a block's tensors and passing the others through: :func:`at`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._chain import Chain, with_ladj
from ._core import Invertible, _name, split_ladj

__all__ = ["At", "at"]


class At(Invertible):
    """``fn`` applied to the data tensors from position ``index`` on (as many as ``fn``
    takes); the tensors before and after pass through unchanged (see :func:`at`).

    NOTE [Acting at a position]

    1. Every argument is data (an ``at`` block takes no trailing parameters): the
       tensors before ``index`` and after ``fn``'s inputs are returned as they are, the
       same objects, between ``fn``'s outputs put in place of its inputs.
    2. ``fn`` takes ``fn.n_inputs`` tensors (1 if it does not say: a coupling without
       ``n_inputs=``); the inverse gives ``fn.inverse`` its ``fn.n_outputs``, which must
       be known (declared, or learnt from a call). An ``at`` inside an ``at`` takes every
       tensor from its position on: ``at(i, at(j, f))`` acts as ``at(i + j, f)``.
    3. Over a chain, ``at(i, chain(b1, b2, ...))`` flattens into ``at(i, b1), at(i, b2),
       ...``: each block is its own node of the engine, so memory stays flat in depth
       inside it too, and a block that splits (``ops.split()``) leaves its first output
       at ``i``, where the next block acts.
    4. The log-det is ``fn``'s (the pass-through preserves volume).
    5. Under :func:`invfunc.invertible_call`, an ``at`` block of a chain (past the first,
       which receives the caller's tensors) is unwrapped: ``fn`` runs as the engine's
       block on its own tensors, with its own backward (a coupling's single evaluation of
       F and G, an op's closed form), and the others go round it, untouched. Called as a
       block of its own (first, or alone), ``at`` is a generic block whose outputs include
       its inputs: the engine keeps those, and its backward runs ``fn``'s inverse, then
       ``fn``.
    """

    def __init__(self, index: int, fn: Invertible) -> None:
        self.index = index
        self.fn = fn
        super().__init__(
            self._forward, self._inverse_fn, ladj=fn._ladj, name=f"at({index}, {fn._name})", wraps=False
        )
        self._arity = None
        self._flat: list[Invertible] | None = None

    def _inverse_fn(self, *args: Any) -> Any:
        return self.inverse(*args)

    @property
    def n_inputs(self) -> int | None:
        return None  # every argument, as called (rule 1)

    @property
    def n_outputs(self) -> int | None:
        return None

    def _n_data(self, args: Sequence[Any]) -> int:
        return len(args)

    def _declared_data(self) -> int | None:
        return None

    def _takes_rest(self, n_rest: int, lead: bool, where: str) -> bool:
        if n_rest:
            raise TypeError(
                f"{where}: {self._name} takes no arguments after its data (every tensor it receives "
                "is data); bind fn's own parameters with functools.partial or a closure."
            )
        return False

    def _learn(self, args: Sequence[Any], out: Any, n_data: int | None = None) -> None:
        pass  # its fn learns, as it runs

    def _mode_dependent(self) -> list[torch.nn.Module]:
        return self.fn._mode_dependent()

    def span(self, n: int) -> tuple[int, int]:
        """``(index, count)`` of the tensors ``fn`` takes out of ``n`` (rule 2)."""
        i, fn = self.index, self.fn
        k = n - i if isinstance(fn, At) else fn.n_inputs
        if k is None:
            if fn._is_inverse or (isinstance(fn, Chain) and fn.blocks[0]._is_inverse):
                raise TypeError(
                    f"invfunc.{self._name}: cannot tell how many of the {n} tensors {fn._name} takes: "
                    "it is an inverse whose function has not been called yet and does not declare its "
                    "outputs; declare invfunc.invertible(..., n_outputs=k), or call the forward first."
                )
            k = 1  # a coupling without n_inputs=: one tensor
        if i + k > n:
            raise TypeError(
                f"invfunc.{self._name}: acts on {k} tensor(s) from position {i}, but was given "
                f"{n} tensor(s); at(index, fn) needs index + fn's data count <= the tensors given."
            )
        return i, k

    def _forward(self, *args: Any) -> Any:
        i, k = self.span(len(args))
        out = self.fn(*args[i : i + k])
        ladj = None
        if self.fn._ladj is True:
            out, ladj = split_ladj(out)
        return join(args, i, k, out, ladj)

    def unwrap(
        self, args: tuple[Any, ...]
    ) -> tuple[tuple[Any, ...], Invertible, tuple[Any, ...], tuple[Any, ...]]:
        """``(before, fn, fn's tensors, after)`` for a call on ``args``, through nested
        ``at`` (rule 5)."""
        block: Invertible = self
        pre: tuple[Any, ...] = ()
        post: tuple[Any, ...] = ()
        while isinstance(block, At):
            i, k = block.span(len(args))
            pre, post = pre + args[:i], args[i + k :] + post
            args, block = args[i : i + k], block.fn
        return pre, block, args, post

    @property
    def inverse(self) -> Invertible:
        if self._inverse is None:
            inv = At(self.index, self.fn.inverse)
            inv._inverse = self
            self._inverse = inv
        return self._inverse

    def _flatten(self) -> list[Invertible]:
        inner = self.fn._flatten()
        if len(inner) == 1:
            return [self]
        if self._flat is None:
            self._flat = [At(self.index, b) for b in inner]
        return list(self._flat)


def join(args: Sequence[Any], i: int, k: int, out: Any, ladj: Any) -> Any:
    """``args`` with ``args[i:i + k]`` replaced by ``out`` (a tensor or a tuple), followed
    by ``ladj`` when there is one."""
    outs = (*args[:i], *(out if isinstance(out, tuple) else (out,)), *args[i + k :])
    got: Any = outs[0] if len(outs) == 1 else outs
    return with_ladj(got, ladj) if ladj is not None else got


def at(index: int, fn: Invertible) -> Invertible:
    """``fn`` applied to the tensors at position ``index`` (as many as it takes); the others
    pass through unchanged.

    The way a flow *factors out* part of its state: after ``ops.split()`` a chain carries
    two tensors, and ``at(1, rest)`` runs the rest of the flow on the second while the
    first, a finished latent, passes through (Glow's multi-scale architecture). Over a
    chain it runs block by block (NOTE [Acting at a position]), so under
    :func:`invfunc.invertible_call` memory stays flat in depth. Its log-det is ``fn``'s;
    its inverse is ``fn``'s inverse at the same position.

    Args:
        index: the position of ``fn``'s first input among the tensors the block receives.
        fn: an :class:`Invertible`; it takes ``fn.n_inputs`` tensors (1 if undeclared).

    Examples:
        >>> import torch, invfunc as inv
        >>> from invfunc import ops
        >>> double = inv.invertible(lambda x: 2 * x, inverse=lambda y: y / 2, ladj=0)
        >>> flow = inv.chain(ops.split(), inv.at(1, double))       # x -> (x1, 2 * x2)
        >>> z1, z2 = flow(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
        >>> z1, z2
        (tensor([[1., 2.]]), tensor([[6., 8.]]))
        >>> flow.inverse(z1, z2)
        tensor([[1., 2., 3., 4.]])
    """
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise TypeError(f"invfunc.at(index, fn): index must be an int >= 0, got {index!r}.")
    if not isinstance(fn, Invertible):
        raise TypeError(
            f"invfunc.at(index, fn): fn must be an Invertible, got {_name(fn)} ({type(fn).__name__}); "
            "wrap it with invfunc.invertible(fn, inverse=...)."
        )
    return At(index, fn)
