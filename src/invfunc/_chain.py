"""Composing invertible functions in a row: :func:`chain`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._core import Invertible, _name

__all__ = ["Chain", "chain"]


class Chain(Invertible):
    """Invertible functions applied in list order (see :func:`chain`).

    Trailing parameters go to the block that takes them: the first block of a chain,
    and so the last block (its inverse) of the inverse chain.
    """

    def __init__(self, blocks: Sequence[Invertible], params_of: Invertible | None = None) -> None:
        self.blocks = tuple(blocks)
        # the inverse chain: the block whose inverse is last, and takes the parameters
        self._params_of = params_of
        names = ", ".join(b._name for b in self.blocks)
        super().__init__(self._forward, self._inverse_fn, name=f"chain({names})", wraps=False)
        self._arity = None

    @property
    def n_inputs(self) -> int | None:
        return self.blocks[0].n_inputs

    @property
    def n_outputs(self) -> int | None:
        return self.blocks[-1].n_outputs

    def _learn(self, args: Sequence[Any], out: Any, n_data: int | None = None) -> None:
        pass  # its blocks learn, as they run

    def _plan(self, args: Sequence[Any]) -> tuple[list[Invertible], tuple[Any, ...], tuple[Any, ...]]:
        blocks = self._flatten()
        p = _n_params(self._params_of) if self._params_of is not None else 0
        if not p:
            return blocks, tuple(args), ()
        if len(args) <= p:
            raise TypeError(
                f"invfunc.{self._name}: expected the outputs to invert followed by {p} parameter(s) "
                f"of its last block, got {len(args)} arguments."
            )
        return blocks, tuple(args[:-p]), tuple(args[-p:])

    def _forward(self, *args: Any) -> Any:
        blocks, first, last = self._plan(args)
        out: Any = first
        for i, b in enumerate(blocks):
            extra = last if i == len(blocks) - 1 else ()
            out = b(*out, *extra) if isinstance(out, tuple) else b(out, *extra)
        return out

    def _inverse_fn(self, *args: Any) -> Any:
        return self.inverse(*args)

    @property
    def inverse(self) -> Invertible:
        if self._inverse is None:
            blocks = self._flatten()
            inv = Chain([b.inverse for b in reversed(blocks)], params_of=blocks[0])
            inv._inverse = self
            self._inverse = inv
        return self._inverse

    def _flatten(self) -> list[Invertible]:
        return [leaf for b in self.blocks for leaf in b._flatten()]

    def _n_data(self, args: Sequence[Any]) -> int:
        blocks, first, _ = self._plan(args)
        return blocks[0]._n_data(first)


def _n_params(block: Invertible) -> int:
    """How many trailing parameters ``block`` takes (0 when that is not known)."""
    return block._counts.n_params or 0


def chain(*fns: Invertible) -> Invertible:
    """Compose invertible functions in list order: ``chain(f, g)(x) == g(f(x))``.

    A block's outputs are the next block's inputs (a tuple is unpacked). The inverse
    is the reversed chain of inverses, and nested chains flatten. Under
    :func:`invfunc.invertible_call` each block is its own autograd node: its input is
    freed after the forward and rebuilt in backward, so memory does not grow with depth.

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
