"""Composing invertible functions in a row: :func:`chain`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._core import Invertible, _name, split_ladj

__all__ = ["Chain", "chain"]


class Chain(Invertible):
    """Invertible functions applied in list order (see :func:`chain`).

    NOTE [Trailing arguments of a chain]

    1. The chain's data are its first block's data inputs; the arguments after them
       are the call's trailing arguments (parameters, per-call arguments).
    2. Every block that takes arguments after its data receives the same trailing
       arguments, all of them: a graph's ``edge_index`` reaches every layer of a stack.
       A block takes them when its parameter count is known and non-zero (a fixed
       signature, or learnt from a call), when its signature requires them, or when it
       is a coupling declared with ``n_inputs=``. A block whose count is not known
       otherwise (``*args``, defaults, a builtin) takes them only when it leads the
       chain, as a lone block takes all its arguments.
    3. A block that takes a number of parameters other than the trailing arguments'
       is an error naming it and the fix (bind its own with ``functools.partial``).
    4. The inverse chain hands the same arguments to the same blocks: a block's inverse
       takes its parameters. It leads from the end: the rule for unreadable signatures
       looks at its last block, and its data count, when its first block cannot tell it,
       is the arguments less a parameter count some block knows. So is the data count of
       a chain led by a coupling without ``n_inputs=`` (one tensor or a pair).
    """

    def __init__(self, blocks: Sequence[Invertible], lead_last: bool = False) -> None:
        self.blocks = tuple(blocks)
        self._lead_last = lead_last  # the inverse of a chain (rule 4)
        names = ", ".join(b._name for b in self.blocks)
        super().__init__(self._forward, self._inverse_fn, name=f"chain({names})", wraps=False)
        self._arity = None
        self._ladj = _chain_ladj(self._name, self._flatten())

    @property
    def n_inputs(self) -> int | None:
        return self.blocks[0].n_inputs

    @property
    def n_outputs(self) -> int | None:
        return self.blocks[-1].n_outputs

    def _learn(self, args: Sequence[Any], out: Any, n_data: int | None = None) -> None:
        pass  # its blocks learn, as they run

    def _plan(self, args: Sequence[Any]) -> tuple[list[Invertible], tuple[Any, ...], list[tuple[Any, ...]]]:
        blocks = self._flatten()
        n = self._data_count(blocks, args)
        data, rest = tuple(args[:n]), tuple(args[n:])
        if not rest:
            return blocks, data, [()] * len(blocks)
        lead = len(blocks) - 1 if self._lead_last else 0
        where = f"invfunc.{self._name}"
        return (
            blocks,
            data,
            [rest if b._takes_rest(len(rest), i == lead, where) else () for i, b in enumerate(blocks)],
        )

    @staticmethod
    def _data_count(blocks: Sequence[Invertible], args: Sequence[Any]) -> int:
        """The chain's data count (NOTE [Trailing arguments of a chain], rules 1 and 4)."""
        first = blocks[0]
        if first._declared_data() is None:  # an inverse whose output count is not known
            # yet, or a coupling taking one tensor or a pair
            p = next((b._counts.n_params for b in blocks if b._counts.n_params), None)
            if p is not None and len(args) > p:
                return len(args) - p
        return first._n_data(args)

    def _forward(self, *args: Any) -> Any:
        blocks, data, extras = self._plan(args)
        out: Any = data
        total = None
        for b, extra in zip(blocks, extras):
            out = b(*out, *extra) if isinstance(out, tuple) else b(out, *extra)
            if b._ladj is True:  # NOTE [Log-determinants], rule 2
                out, ladj = split_ladj(out)
                total = ladj if total is None else total + ladj
        return with_ladj(out, total) if self._ladj is True else out

    def _inverse_fn(self, *args: Any) -> Any:
        return self.inverse(*args)

    @property
    def inverse(self) -> Invertible:
        if self._inverse is None:
            blocks = self._flatten()
            inv = Chain([b.inverse for b in reversed(blocks)], lead_last=not self._lead_last)
            inv._inverse = self
            self._inverse = inv
        return self._inverse

    def _flatten(self) -> list[Invertible]:
        return [leaf for b in self.blocks for leaf in b._flatten()]

    def _mode_dependent(self) -> list[torch.nn.Module]:
        # (a chain run as one block: NOTE [A batch freed through parameterless blocks])
        return [m for b in self.blocks for m in b._mode_dependent()]

    def _n_data(self, args: Sequence[Any]) -> int:
        return self._data_count(self._flatten(), args)


def _chain_ladj(name: str, blocks: Sequence[Invertible]) -> bool | int | None:
    """A chain's log-det (NOTE [Log-determinants], rule 2)."""
    if not any(b._ladj is True for b in blocks):
        return 0 if all(b._ladj is not None and b._ladj is not True for b in blocks) else None
    unknown = [b._name for b in blocks if b._ladj is None]
    if unknown:
        raise TypeError(
            f"invfunc.{name}: the log-det of {', '.join(unknown)} is unknown, and the chain has members "
            "with a log-det to sum. Declare invfunc.invertible(..., ladj=True) for a function that returns "
            "(y, ladj), or ladj=0 for one that preserves volume (a permutation, an additive map)."
        )
    return True


def with_ladj(out: Any, ladj: torch.Tensor | None) -> tuple[Any, ...]:
    """The data followed by the log-det (zero when no member made one: never here)."""
    return (*out, ladj) if isinstance(out, tuple) else (out, ladj)


def chain(*fns: Invertible) -> Invertible:
    """Compose invertible functions in list order: ``chain(f, g)(x) == g(f(x))``.

    A block's outputs are the next block's inputs (a tuple is unpacked). The inverse
    is the reversed chain of inverses, and nested chains flatten. Under
    :func:`invfunc.invertible_call` each block is its own autograd node: its input is
    freed after the forward and rebuilt in backward, so memory does not grow with depth.

    Arguments after the chain's data (its first block's data inputs) are handed, all of
    them, to every block that takes arguments after its data: a block whose signature
    has them (``f(x, w)``), or a coupling declared with ``n_inputs=``. So one chain of
    graph or masked-attention layers takes the graph or the mask at every call. Blocks
    that take none (``f(x)``, a coupling without ``n_inputs``) get none; a block that
    takes another number is an error (bind its own parameters with ``functools.partial``).

    Args:
        *fns: one or more :class:`Invertible` (from :func:`invertible`,
            :func:`couple` or :func:`chain`).

    Examples:
        >>> import torch, invfunc as inv
        >>> add1 = inv.invertible(lambda x: x + 1, inverse=lambda y: y - 1)
        >>> dbl = inv.invertible(lambda x: x * 2, inverse=lambda y: y / 2)
        >>> f = inv.chain(add1, dbl)
        >>> f(torch.tensor([1.0]))                  # dbl(add1(x))
        tensor([4.])
        >>> f.inverse(torch.tensor([4.0]))
        tensor([1.])
        >>> len(inv.chain(f, f).blocks)               # nested chains flatten
        4

        The mask goes to both masked blocks, not to ``add1``:

        >>> masked = inv.invertible(lambda x, m: x + m, inverse=lambda y, m: y - m)
        >>> g = inv.chain(masked, add1, masked)
        >>> g(torch.tensor([1.0]), torch.tensor([10.0]))
        tensor([22.])
        >>> g.inverse(torch.tensor([22.0]), torch.tensor([10.0]))
        tensor([1.])
    """
    if not fns:
        raise TypeError("invfunc.chain(*fns): expected at least one Invertible, got none.")
    blocks: list[Invertible] = []
    for i, f in enumerate(fns):
        if not isinstance(f, Invertible):
            raise TypeError(
                f"invfunc.chain(*fns): argument {i} is {_name(f)} ({type(f).__name__}), not an Invertible; "
                "wrap it with invfunc.invertible(f, inverse=...) or use invfunc.couple(F, G)."
            )
        blocks.extend(f.blocks if isinstance(f, Chain) else [f])
    return Chain(blocks)
