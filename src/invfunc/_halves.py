"""Pairs inside a chain: the blocks that split one tensor into halves and join them."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from ._autograd import _generic_vjp, rebuild
from ._core import Invertible
from ._coupling import Coupling, _sizes
from ._state import BlockState, _is_wrapped
from ._vjp import _fast_path

__all__ = ["pairs_inside"]


def _split_halves(x: torch.Tensor, *, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = x.split_with_sizes(_sizes(x.size(d)), d)
    return a.clone(memory_format=torch.contiguous_format), b.clone(memory_format=torch.contiguous_format)


class _Halves(Invertible):
    """``split halves`` (one tensor to its two contiguous halves along ``d``) or ``join
    halves`` (the pair back to one tensor): the ends of a chain run with pairs inside.

    They read no parameters and draw no random numbers (static, no recording), and their
    backward writes the rebuilt input straight into its freed storage (no temporary)."""

    _exact = True  # the inverse copies values: no drift to verify

    def __init__(self, d: int, join: bool) -> None:
        split = functools.partial(_split_halves, d=d)
        cat = functools.partial(_cat, d=d)
        super().__init__(
            cat if join else split,
            split if join else cat,
            n_inputs=2 if join else 1,
            ladj=0,
            name="join halves" if join else "split halves",
            wraps=False,
        )
        self._arity = None
        self.d, self.join = d, join

    def _static_sections(self) -> dict[str, tuple[list[torch.Tensor], bool]] | None:
        return {self._sections[0]: ([], False)}

    def _static_reads(self, section: str) -> list[torch.Tensor] | None:
        return []

    def _fused_backward(
        self,
        state: BlockState,
        outs: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        explicit: Sequence[torch.Tensor],
        captured: Sequence[torch.Tensor],
        needs: Sequence[bool],
        own: Sequence[bool],
    ) -> list[torch.Tensor | None]:
        if not _fast_path(*outs, *grads) or state.prints is not None:  # graph wanted, or verify: general
            return _generic_vjp(
                state, rebuild(state, outs, explicit, captured), explicit, captured, grads, needs
            )
        d, handles = self.d, state.handles
        if handles is not None:
            if self.join:  # the pair, rebuilt from the caller's output (which stays)
                for h, half in zip(handles, outs[0].detach().split_with_sizes(_sizes(outs[0].size(d)), d)):
                    if h is not None and h.freed:
                        h.view().copy_(half)
            elif handles[0] is not None and handles[0].freed:
                torch.cat([outs[0].detach(), outs[1].detach()], d, out=handles[0].view())
            state.restore_guards()
        del outs
        state.release_output()
        if self.join:
            g = grads[0]
            data_grads = list(g.split_with_sizes(_sizes(g.size(d)), d))
        else:
            data_grads = [torch.cat([grads[0], grads[1]], d)]
        return [g if n else None for g, n in zip(data_grads, needs)]


def _cat(a: torch.Tensor, b: torch.Tensor, *, d: int) -> torch.Tensor:
    return torch.cat([a, b], d)


def _halves(d: int) -> tuple[Invertible, Invertible]:
    """The blocks that take one tensor to its two contiguous halves along ``d``, and back.

    NOTE [Pairs inside a chain]: a chain of single-tensor couplings is run with pairs
    between its blocks: one ``split halves`` block first, one ``join halves`` block last.
    The halves are then contiguous tensors of their own (G reads ``y1`` without a copy, no
    narrow views in the backward), each freed and rebuilt like any boundary; the two extra
    blocks cost a copy of the input and of the output per call instead of copies per block.
    """
    got = _HALVES.get(d)
    if got is None:
        got = _HALVES[d] = (_Halves(d, join=False), _Halves(d, join=True))
    return got


_HALVES: dict[int, tuple[Invertible, Invertible]] = {}


def pairs_inside(
    blocks: list[Invertible], extras: list[tuple[Any, ...]], first: tuple[Any, ...]
) -> tuple[list[Invertible], list[tuple[Any, ...]]]:
    """``blocks`` and the arguments each takes after its data, run with pairs between
    them where that is the same computation (NOTE [Pairs inside a chain]): two or more
    couplings of one tensor on the same dim, each then taking a pair."""
    if len(blocks) < 2 or len(first) != 1 or not isinstance(first[0], torch.Tensor):
        return blocks, extras
    x = first[0]
    if (
        x.dim() == 0 or _is_wrapped(x) or not all(type(b) is Coupling and b.n_in != 2 for b in blocks)  # type: ignore[attr-defined]
    ):
        return blocks, extras
    d = blocks[0].dim % x.dim()  # type: ignore[attr-defined]
    if x.size(d) < 2 or any(b.dim % x.dim() != d for b in blocks):  # type: ignore[attr-defined]
        return blocks, extras  # the couplings raise their own clear errors
    split, join = _halves(d)
    return [split, *(b.pairs() for b in blocks), join], [(), *extras, ()]  # type: ignore[attr-defined]
