"""Exact (bit-reversible) couplings: the grid of ``couple(F, G, exact=True)``.

NOTE [Exact couplings]

1. Floating-point addition rounds, so ``(x + a) - a`` is not always ``x`` and a rebuilt
   input drifts from the forward's. Two floats that are multiples of ``2^-k`` and whose
   sum is smaller than ``2^(p - k)`` in magnitude (``p`` the significand's bits: 24 in
   float32) add exactly: the sum is an integer of at most ``p`` bits times ``2^-k``.
2. An exact coupling therefore puts its stream (the input halves) and the outputs of F
   and G on that grid: ``round(v * 2^k) / 2^k``, which is exact itself (scaling by a power
   of two, rounding to an integer). Then ``y1 = x1 + F(x2)`` and ``x1 = y1 - F(x2)`` are
   exact, and so is every rebuilt input, at any depth.
3. The rounding's gradient is the identity (straight through): a plain call of the exact
   model and :func:`invfunc.invertible_call` of it differentiate the same arithmetic, and
   with deterministic F and G (the same kernels on the same values) their gradients are
   bitwise equal.
4. The grid comes from the stream's dtype (:data:`GRIDS`; F's and G's outputs are cast
   to it first, as the addition would: under autocast they may be bfloat16): float32 ``2^-16`` (values
   below 256 in magnitude), float64 ``2^-32`` (below ``2^21``), bfloat16 ``2^-3`` (below
   32), float16 ``2^-6`` (below 32). ``exact=R`` declares the largest magnitude instead:
   the grid is the finest that holds ``R``. A value at or past the range (or not finite)
   is an :class:`~invfunc.InvfuncError` naming ``exact`` and the range, never a silently
   inexact result.
5. The stream is rounded on the way in: ``fn.inverse(fn(x))`` is bitwise the rounded
   ``x``, and ``x`` itself for ``x`` on the grid.
6. The forward keeps an exact checksum of its input (the sum of its values, which on the
   grid float64 adds exactly, or int64 for a float64 stream); the backward compares the
   rebuilt input's. A mismatch means F or G did not
   give the same bits twice (nondeterministic kernels, another thread count, a changed
   parameter) and raises, naming the fix: bitwise promises are checked, not assumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ._errors import InvfuncError
from ._replay import untraced

__all__ = ["GRIDS", "Grid", "grid_for"]

#: Per dtype: the grid exponent ``k`` (values are multiples of ``2^-k``) and the
#: significand's bits ``p``; the range is ``2^(p - k)``.
GRIDS: dict[torch.dtype, tuple[int, int]] = {
    torch.float32: (16, 24),
    torch.float64: (32, 53),
    torch.bfloat16: (3, 8),
    torch.float16: (6, 11),
}


class _RoundStraight(torch.autograd.Function):
    """``round(v * scale) / scale`` with the identity as its gradient (rule 3)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(v: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        return torch.mul(v, scale).round_().div_(scale)  # (one fresh tensor, rounded in place)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return g, None

    @staticmethod
    def jvp(ctx: Any, t: torch.Tensor, _: Any) -> torch.Tensor:
        return t


class Grid:
    """The grid of one exact coupling: ``declared`` is ``exact=`` as given (True, or the
    largest magnitude); the grid itself is chosen per dtype when a tensor arrives."""

    def __init__(self, declared: bool | float, where: str) -> None:
        self.declared = declared
        self.where = where

    def spec(self, dtype: torch.dtype) -> tuple[float, float]:
        """(scale ``2^k``, range ``2^(p - k)``) for a stream of ``dtype``."""
        if dtype not in GRIDS:
            raise InvfuncError(
                f"invfunc.{self.where}: exact=True needs a floating stream of "
                f"{', '.join(str(d) for d in GRIDS)}, got {dtype}."
            )
        k, p = GRIDS[dtype]
        if self.declared is not True:
            k = p - max(math.ceil(math.log2(float(self.declared))), 1 - p)
        return 2.0**k, 2.0 ** (p - k)

    def round(self, v: torch.Tensor, what: str, *, check: bool = True) -> torch.Tensor:
        """``v`` on the grid (straight-through gradient), its range checked (rule 4)."""
        scale, limit = self.spec(v.dtype)
        # untraced: inside a recorded F, the rounding and the range check are the grid's, not
        # F's discrete choices, to be made afresh in backward (replayed, they would hide
        # an F that gives other bits, rule 6, and keep every rounded output until then)
        with untraced():
            if check:
                self.check(v, what, limit)
            return _RoundStraight.apply(v, scale)  # type: ignore[no-any-return,no-untyped-call]

    def check(self, v: torch.Tensor, what: str, limit: float | None = None) -> None:
        if limit is None:
            limit = self.spec(v.dtype)[1]
        if v.numel() == 0:
            return
        lo, hi = torch.aminmax(v.detach())  # (one pass, one wait for the device)
        if not bool((hi < limit) & (lo > -limit)):  # (NaN compares false: refused too)
            top = torch.maximum(hi, -lo) if not (hi.isnan() | lo.isnan()) else hi + lo
            raise InvfuncError(
                f"invfunc.{self.where}: exact=True keeps values below {limit:g} in magnitude for "
                f"{v.dtype} (the grid 2^-{int(math.log2(self.spec(v.dtype)[0]))}), but {what} reached "
                f"{float(top):g}. Outside that range additions round and the inverse would not be "
                "exact. Declare a larger range with exact=R (a coarser grid), or scale F and G down."
            )

    def wrap(self, fn: Callable[..., Any], which: str) -> Callable[..., Any]:
        """``fn`` with its output put on the grid (rule 2)."""

        def on_grid(x: torch.Tensor, *rest: Any) -> Any:
            out = fn(x, *rest)
            if not isinstance(out, torch.Tensor):
                return out  # (the coupling's own check names what was wrong)
            if out.dtype != x.dtype and out.is_floating_point() and x.is_floating_point():
                out = out.to(x.dtype)  # under autocast: onto the stream's grid, not bfloat16's
            return self.round(out, f"{which}'s output")

        return on_grid

    def checksum(self, *ts: torch.Tensor) -> list[float]:
        """The sum of each tensor's values, exact (rule 6): on the grid every partial sum is
        an integer times ``2^-k``; below ``2^53`` in those units float64 adds them exactly
        (one pass), past it (a float64 stream, or a huge tensor) the integers are summed
        in int64."""
        out = []
        for t in ts:
            scale, limit = self.spec(t.dtype)
            if t.dtype != torch.float64 and t.numel() * limit * scale < 2.0**53:
                out.append(float(t.detach().sum(dtype=torch.float64)))
            else:
                out.append(float(int((t.detach() * scale).to(torch.int64).sum())))
        return out

    def compare(self, name: str, want: list[float], rebuilt: tuple[torch.Tensor, ...]) -> None:
        got = self.checksum(*rebuilt)
        if got != want:
            raise InvfuncError(
                f"invfunc.invertible_call({name}) backward: exact=True, but the rebuilt input is not "
                f"bit-identical to the forward's (checksums {got} against {want}). F or G gave other "
                "bits than in the forward: nondeterministic kernels (set "
                "torch.use_deterministic_algorithms(True)), another thread count between forward and "
                "backward (torch.set_num_threads), or parameters changed in place in between."
            )


def grid_for(exact: object, where: str) -> Grid | None:
    """The grid of ``exact=`` (False: none), or a clear error for a bad value."""
    if exact is False:
        return None
    if exact is True:
        return Grid(True, where)
    if isinstance(exact, (int, float)) and not isinstance(exact, bool) and math.isfinite(exact) and exact > 0:
        return Grid(float(exact), where)
    raise ValueError(
        f"invfunc.{where}: exact= must be True, False, or the largest magnitude the stream and F's "
        f"and G's outputs reach (a positive number), got {exact!r}."
    )
