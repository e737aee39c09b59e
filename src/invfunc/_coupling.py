"""The additive (RevNet) coupling: :func:`couple`."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import _compat
from ._apply import Pending, Sections
from ._core import Invertible, _name
from ._exact import Grid, grid_for
from ._replay import mode_dependent, reread, static_reads
from ._reuse import REUSE_MIN_BYTES, owned
from ._state import BlockState, _is_wrapped
from ._storage import _use_count
from ._vjp import _fast_path, accumulate, drop_if_unread, section_vjp

__all__ = ["Coupling", "couple"]


class Coupling(Invertible):
    """The additive coupling ``y1 = x1 + F(x2); y2 = x2 + G(y1)`` (see :func:`couple`).

    NOTE [Per-call arguments]

    1. Declared ``n_inputs`` (1: one tensor split into halves, 2: a pair), the arguments
       after the data are per-call arguments: F and G receive them on every call, in
       both directions and every mode, ``F(x2, *rest)`` and ``G(y1, *rest)``.
    2. To the engine they are the block's parameters: tensors among them are saved (not
       freed) and differentiated, through F and G both (the fused backward's
       ``section_vjp`` takes them as explicit values beside the captured tensors).
    3. Undeclared, a coupling takes one tensor or a pair and nothing else. A second
       argument that cannot be a half (not a floating tensor, another dtype, device,
       rank or batch size) is refused before F runs, naming both readings and
       ``n_inputs``: F would otherwise fail on (or silently read) the wrong argument.
    4. Inside a chain run with pairs (NOTE [Pairs inside a chain]) a coupling of one
       tensor runs as its pair form, ``pairs()``, with the same per-call arguments.
    """

    _sections = ("F", "G")
    _section_outputs = True
    _fused_kept = True  # its fused backward also serves mode "checkpoint", from the kept inputs

    def __init__(
        self,
        F: Callable[..., Any],
        G: Callable[..., Any] | None,
        dim: int,
        n_inputs: int | None = None,
        grid: Grid | None = None,
    ) -> None:
        self.F = F
        self.G = G
        self.grid = grid  # NOTE [Exact couplings]: F and G as run, their outputs on the grid
        self._f = grid.wrap(F, "F") if grid is not None else F
        self._g = grid.wrap(G, "G") if grid is not None and G is not None else G
        self.dim = dim
        self.n_in = n_inputs  # None: one tensor or a pair, as called, and nothing else
        name = f"couple({_name(F)}, {_name(G)})" if G is not None else f"couple({_name(F)})"
        super().__init__(
            self._plain, self._plain_inverse, n_inputs=n_inputs or 1, ladj=0, name=name, wraps=False
        )
        self._arity = None
        self._as_pairs: Coupling | None = None

    def _learn(self, args: Sequence[Any], out: Any, n_data: int | None = None) -> None:
        pass  # one tensor or a pair, each call as it comes

    @property
    def n_outputs(self) -> int | None:
        return self.n_inputs

    def _takes_rest(self, n_rest: int, lead: bool, where: str) -> bool:
        return self.n_in is not None  # the arguments after the data go to F and G

    @property
    def _exact(self) -> bool:
        return self.grid is not None

    def _declared_data(self) -> int | None:
        return self.n_in

    def pairs(self) -> Coupling:
        """The same coupling, taking a pair (NOTE [Pairs inside a chain])."""
        if self.n_in is None or self.n_in == 2:
            return self
        if self._as_pairs is None:
            self._as_pairs = Coupling(self.F, self.G, self.dim, 2, self.grid)
            self._as_pairs._name = self._name
        return self._as_pairs

    def data_count(self, args: Sequence[Any]) -> int:
        """How many of ``args`` are data (NOTE [Per-call arguments]); the same rule for
        both directions."""
        n = self.n_in
        if n is not None:
            if len(args) < n:
                raise TypeError(
                    f"invfunc.{self._name}: declared with n_inputs={n} data tensor(s) "
                    f"({'one tensor split into halves' if n == 1 else 'a pair'}) followed by per-call "
                    f"arguments for F and G, but called with {len(args)} argument(s)."
                )
            return n
        if len(args) == 1:
            return 1
        why = _not_a_half(args, self.dim) if len(args) == 2 else None
        if len(args) == 2 and why is None:
            return 2
        got = ", ".join(_shape(a) + (f" of {a.dtype}" if isinstance(a, torch.Tensor) else "") for a in args)
        if len(args) == 2:
            read = (
                f"Read as a pair (x1, x2), the second cannot be a half: {why}. Read as one tensor "
                "followed by an argument for F and G, the coupling must say so"
            )
        else:
            read = (
                "Without n_inputs= it takes one tensor or a pair, nothing else. To pass arguments to F and G"
            )
        raise TypeError(
            f"invfunc.{self._name}: called with {len(args)} arguments ({got}). {read}: declare "
            "couple(F, G, dim=..., n_inputs=1) for one tensor split into halves, or n_inputs=2 for a "
            "pair, and the arguments after the data go to F and G on every call, F(x2, *rest) and "
            "G(y1, *rest), in both directions."
        )

    # -- plain, differentiable directions -------------------------------------------
    def _split(self, x: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"invfunc.{self._name}: expected a tensor or a pair of tensors, got {type(x).__name__}."
            )
        if not -x.dim() <= self.dim < max(x.dim(), 1):
            raise ValueError(
                f"invfunc.{self._name}: dim={self.dim} is out of range for {what} of shape {tuple(x.shape)}; "
                "pass couple(..., dim=d) with the dimension to split."
            )
        d = self.dim % x.dim()
        n = x.size(d)
        if n < 2:
            raise ValueError(
                f"invfunc.{self._name}: {what} has size {n} along dim {d} (shape {tuple(x.shape)}); "
                "couple splits it into two halves, which needs a size of at least 2. Pass "
                "couple(..., dim=d) with the dimension to split."
            )
        h, h2 = _sizes(n)
        return x.narrow(d, 0, h), x.narrow(d, h, h2), d

    def _plain(self, *args: Any) -> Any:
        return self._on_halves(args, "the input", self._coupled)

    def _plain_inverse(self, *args: Any) -> Any:
        return self._on_halves(args, "the output", self._uncoupled)

    def _on_halves(
        self, args: Sequence[Any], what: str, op: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    ) -> Any:
        """``op`` on the halves of one tensor (joined again) or on a pair, with the
        per-call arguments after the data."""
        n = self.data_count(args)
        rest = args[n:]
        if n == 1:
            a, b, d = self._split(args[0], what)
            return torch.cat(op(a, b, rest), d)
        return op(args[0], args[1], rest)

    def _coupled(
        self, x1: torch.Tensor, x2: torch.Tensor, rest: Sequence[Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.grid is not None:  # NOTE [Exact couplings], rule 5
            x1, x2 = self.grid.round(x1, "the input"), self.grid.round(x2, "the input")
        y1 = x1 + self._half(self._f, "F", x2, x1, rest)
        y2 = x2 + self._half(self._g, "G", y1, x2, rest) if self._g is not None else x2
        if self.grid is not None:
            self.grid.check(y1, "the output")
            self.grid.check(y2, "the output")
        return y1, y2

    def _half(
        self, fn: Callable[..., Any], which: str, x: torch.Tensor, like: torch.Tensor, rest: Sequence[Any]
    ) -> torch.Tensor:
        return self._check_half(fn(x, *rest), which, x, like.shape)

    def _check_half(self, out: Any, which: str, x: torch.Tensor, like: torch.Size) -> torch.Tensor:
        """F maps x2 to a tensor shaped like x1; G maps y1 to one shaped like x2."""
        if not isinstance(out, torch.Tensor) or out.shape != like:
            other = "x1" if which == "F" else "x2"
            raise ValueError(
                f"invfunc.{self._name}: {which} returned {_shape(out)} for an input of shape "
                f"{tuple(x.shape)}; {which} must return a tensor shaped like {other}, "
                f"{tuple(like)} (y1 = x1 + F(x2), y2 = x2 + G(y1))."
            )
        return out

    def _uncoupled(
        self, y1: torch.Tensor, y2: torch.Tensor, rest: Sequence[Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.grid is not None:
            y1, y2 = self.grid.round(y1, "the output"), self.grid.round(y2, "the output")
        x2 = y2 - self._half(self._g, "G", y1, y2, rest) if self._g is not None else y2
        x1 = y1 - self._half(self._f, "F", x2, y1, rest)
        return x1, x2

    @property
    def inverse(self) -> Invertible:
        if self._inverse is None:
            inv = _Variadic(self._plain_inverse, self._plain, name=f"inverse({self._name})", of=self)
            inv._inverse = self
            self._inverse = inv
        return self._inverse

    # -- the engine protocol ------------------------------------------------------------
    def _mode_dependent(self) -> list[torch.nn.Module]:
        return mode_dependent(self.F) + (mode_dependent(self.G) if self.G is not None else [])

    def _static_reads(self, section: str) -> list[torch.Tensor] | None:
        return reread(self.F if section == "F" else self.G)  # type: ignore[arg-type]

    def _static_sections(self) -> dict[str, tuple[list[torch.Tensor], bool]] | None:
        f = static_reads(self.F)
        if f is None:
            return None
        if self.G is None:
            return {"F": f}
        g = static_reads(self.G)
        return None if g is None else {"F": f, "G": g}

    def _n_data(self, args: Sequence[Any]) -> int:
        return self.data_count(args)

    def _run(self, args: Sequence[Any], section: Sections) -> Any:
        # Only F and G run inside sections (recorded); the coupling's own arithmetic runs
        # on detached views, so it is neither recorded nor mistaken for a captured tensor.
        if self.grid is not None:
            return self._run_exact(args, section)
        check = self._check_half
        n = self.data_count(args)
        rest = args[n:]  # NOTE [Per-call arguments]
        if n == 2:
            x1, x2 = args[0].detach(), args[1].detach()
            # NOTE [Outputs nobody holds]: the sums are written into F's and G's outputs
            # when nobody else holds them (plain tensors, no forward-mode AD)
            reuse = not _compat.forward_ad_active() and x1.nbytes >= REUSE_MIN_BYTES
            with section("F"):
                f = self.F(x2, *rest)
            check(f, "F", x2, x1.shape)
            section.output("F", f)
            y1 = f.add_(x1) if reuse and owned(f, x1, sys.getrefcount(f)) else x1 + f
            del f
            if self.G is None:
                return y1, x2
            with section("G"):
                g = self.G(y1, *rest)
            check(g, "G", y1, x2.shape)
            section.output("G", g)
            return y1, g.add_(x2) if reuse and owned(g, x2, sys.getrefcount(g)) else x2 + g
        x = args[0]
        if _is_wrapped(x) or _compat.forward_ad_active():  # torch.func, dual tensors:
            # no out= writes (they take neither wrapped nor dual tensors)
            x1, x2, d = self._split(x, "the input")
            with section("F"):
                y1 = x1 + check(self.F(x2, *rest), "F", x2, x1.shape)
            if self.G is None:
                return torch.cat([y1, x2], d)
            with section("G"):
                return torch.cat([y1, x2 + check(self.G(y1, *rest), "G", y1, x2.shape)], d)
        x1, x2, d = self._split(x.detach(), "the input")
        if (
            _compat.CAN_SWAP  # NOTE [Torch versions], rule 3
            and type(x) is torch.Tensor
            and x.device.type in ("cpu", "cuda")
            and x.nbytes >= 2 * REUSE_MIN_BYTES
            and x.is_contiguous()
        ):
            # NOTE [Outputs in the memory of the input they replace]: y1 apart (in F's
            # output when nobody holds it), y assembled once the input's fate is known
            with section("F"):
                f = self.F(x2, *rest)
            check(f, "F", x2, x1.shape)
            section.output("F", f)
            y1 = f.add_(x1) if owned(f, x1, sys.getrefcount(f)) else x1 + f
            x2_shape = x2.shape
            del f, x1, x2
            if self.G is None:
                return Pending(x, y1, None, d)
            with section("G"):
                g = self.G(y1, *rest)
            check(g, "G", y1, x2_shape)
            section.output("G", g)
            return Pending(x, y1, g, d)
        y = torch.empty_like(x)
        y1, y2 = y.split_with_sizes([x1.size(d), x2.size(d)], d)
        with section("F"):
            f = self.F(x2, *rest)
        check(f, "F", x2, x1.shape)
        section.output("F", f)
        if self.G is None:
            torch.add(x1, f, out=y1)
            y2.copy_(x2)
            return y
        torch.add(x1, f, out=y1)
        del f
        with section("G"):
            g = self.G(y1, *rest)  # a strided view, as F's x2 and as y1 in the backward's recompute
        check(g, "G", y1, x2.shape)
        section.output("G", g)
        torch.add(x2, g, out=y2)
        return y

    def _run_exact(self, args: Sequence[Any], section: Sections) -> Any:
        """The forward of an exact coupling (NOTE [Exact couplings]): the stream and F's and
        G's outputs on the grid; an exact checksum of the input for the backward."""
        grid, n = self.grid, self.data_count(args)
        assert grid is not None
        rest = args[n:]
        if n == 2:
            x1, x2 = (grid.round(a.detach(), "the input") for a in args[:2])
        else:
            x1, x2, d = self._split(grid.round(args[0].detach(), "the input"), "the input")
        section.exact = grid.checksum(x1, x2)
        with section("F"):
            f = self._check_half(self._f(x2, *rest), "F", x2, x1.shape)
        section.output("F", f)
        y1 = x1 + f
        grid.check(y1, "the output")
        y2 = x2
        if self._g is not None:
            with section("G"):
                g = self._check_half(self._g(y1, *rest), "G", y1, x2.shape)
            section.output("G", g)
            y2 = x2 + g
            grid.check(y2, "the output")
        return (y1, y2) if n == 2 else torch.cat([y1, y2], d)

    def _fused_backward(
        self,
        state: BlockState,
        outs: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        explicit: Sequence[torch.Tensor],
        captured: Sequence[torch.Tensor],
        needs: Sequence[bool],
        own: Sequence[bool],
        kept: Sequence[torch.Tensor] | None = None,
    ) -> list[torch.Tensor | None]:
        """The RevNet backward: F and G evaluated once each, the input rebuilt on the way
        (or, in mode "checkpoint", read from ``kept``: G's backward, then F's)."""
        n_data = state.n_data
        rest_needs = needs[n_data:]  # the per-call arguments' tensors, then the captured ones
        rest_grads: list[torch.Tensor | None] = [None] * len(rest_needs)
        handles = state.handles or [None] * n_data
        fast = _fast_path(*outs, *grads)
        if fast:  # plain tensors: views of them are cheaper to make
            outs = [o.detach() for o in outs]
        x1_dst = x2_dst = None
        spare1 = None
        # NOTE [Kept inputs are used as they are]: not recomputed from the outputs
        live = (
            list(kept)
            if kept is not None
            else state.live_inputs()
            if fast and state.live
            else [None] * n_data
        )
        if self.grid is not None:  # the forward ran on the kept input put on the grid
            live = [None if t is None else self.grid.round(t, "the input", check=False) for t in live]
        if n_data == 1:
            d = self.dim % outs[0].dim()
            sizes = _sizes(outs[0].size(d))
            h = sizes[0]
            gy1, gy2 = grads[0].split_with_sizes(sizes, d)
            on_storage = 3  # NOTE [Incoming gradients nobody holds]: grads[0] and its halves
            mine = [fast and own[0]] * 2
            if fast and handles[0] is not None and handles[0].freed:
                # NOTE [Releasing rebuilt boundaries]: y's memory, when nobody else holds it,
                # is moved into x's storage, y is read there and x computed there in place
                spare = state.spare_output(0, outs[0], handles[0])
                if spare is not None:
                    handles[0].adopt(spare)
                # two views with their own version counters: writing x1 must not look like
                # an in-place change of the x2 that F's recompute saved (nor writing x2 of
                # the y1 that G's recompute saved)
                x1_dst, x2_dst = handles[0].view().narrow(d, 0, h), handles[0].view().narrow(d, h, sizes[1])
                y1, y2 = (x1_dst, x2_dst) if spare is not None else outs[0].split_with_sizes(sizes, d)
            else:
                y1, y2 = outs[0].split_with_sizes(sizes, d)
        else:
            y1, y2 = outs
            gy1, gy2 = grads
            on_storage = 1
            mine = [fast and own[0], fast and own[1]]
            if fast and handles[0] is not None and handles[1] is not None and handles[0] is not handles[1]:
                if handles[0].freed and handles[1].freed:
                    # NOTE [Releasing rebuilt boundaries]: y_i's memory, when it is the call's
                    # own, is moved into x_i's storage and x_i is computed there in place
                    spare1 = state.spare_output(0, y1, handles[0])
                    spare2 = state.spare_output(1, y2, handles[1])
                    if spare2 is not None:  # y2 is read only to rebuild x2: move it now
                        handles[1].adopt(spare2)
                        y2 = x2_dst = handles[1].view()
                    else:
                        x2_dst = handles[1].view()
                    if spare1 is None:  # y1 is moved after G's backward, which reads it
                        x1_dst = handles[0].view()

        if self._g is not None:
            g_in = y1
            g_out, pull_g = section_vjp(state, self._g, "G", g_in, explicit, captured, rest_needs)
            del g_in
            if live[-1] is not None:
                x2 = live[-1] if n_data == 2 else live[-1].narrow(d, h, sizes[1])
            else:
                x2 = torch.sub(y2, g_out, out=x2_dst) if x2_dst is not None else y2 - g_out
            if fast:
                drop_if_unread(g_out)
            del g_out
            cot = gy2.detach() if mine[1] else gy2  # an alias anything G's backward keeps shows up as
            g_y1_or_none, pairs = pull_g(cot)
            del pull_g, cot
            accumulate(rest_grads, pairs)
            del pairs
            if g_y1_or_none is None:  # G ignores y1
                gz1 = gy1
            elif mine[0] and _alone(gy1, on_storage):
                gz1 = gy1.add_(g_y1_or_none)
            else:
                gz1 = gy1 + g_y1_or_none
                mine[0] = False
            del g_y1_or_none
        else:
            # the one-sided coupling's x2 is y2 (already in x2's storage when moved there)
            x2 = y2 if x2_dst is None or y2 is x2_dst else x2_dst.copy_(y2)
            gz1 = gy1
        f_out, pull_f = section_vjp(state, self._f, "F", x2, explicit, captured, rest_needs)
        if live[0] is not None:
            x1 = live[0] if n_data == 2 else live[0].narrow(d, 0, h)
        else:
            if spare1 is not None:  # G's backward is done: y1's memory can become x1's
                handles[0].adopt(spare1)  # type: ignore[union-attr]
                y1 = x1_dst = handles[0].view()  # type: ignore[union-attr]
            x1 = torch.sub(y1, f_out, out=x1_dst) if x1_dst is not None else y1 - f_out
        if fast:
            drop_if_unread(f_out)
        del f_out
        if fast:
            del y1, y2, outs
            state.release_output()  # the input is rebuilt: this block's output can go
        cot = gz1.detach() if mine[0] else gz1
        g_x2_or_none, pairs = pull_f(cot)
        del pull_f, cot
        accumulate(rest_grads, pairs)
        del pairs
        g_x2 = g_x2_or_none if g_x2_or_none is not None else torch.zeros_like(gy2)  # F ignores x2
        del g_x2_or_none
        if mine[1] and (n_data == 2 or mine[0]) and _alone(gy2, on_storage):
            # NOTE [Incoming gradients nobody holds]: the input's gradient is written over
            # the output's, which nobody else holds (one tensor: gz1 is already in place)
            gx2 = gy2.add_(g_x2)
            data_grads: list[torch.Tensor | None] = [grads[0]] if n_data == 1 else [gz1, gx2]
        elif fast and n_data == 1:
            # the whole input's gradient is allocated only now, after F's recompute and
            # backward, the moment of this backward's peak memory
            gx = torch.empty_like(grads[0], memory_format=torch.contiguous_format)
            gx1, gx2 = gx.split_with_sizes(sizes, d)
            gx1.copy_(gz1)
            del gz1
            torch.add(gy2, g_x2, out=gx2)
            data_grads = [gx]
        else:
            gx2 = gy2 + g_x2
            data_grads = [torch.cat([gz1, gx2], d)] if n_data == 1 else [gz1, gx2]
        if state.exact is not None:  # NOTE [Exact couplings], rule 6
            assert self.grid is not None
            self.grid.compare(state.name, state.exact, (x1, x2))
        if state.prints is not None:
            if n_data == 2:
                state.check_drift((x1, x2))
            else:
                state.check_drift((handles[0].view(),) if x1_dst is not None else (torch.cat([x1, x2], d),))  # type: ignore[union-attr]
        if x1_dst is not None:
            state.restore_guards()  # written in place above
        elif n_data == 1:
            if state.handles:
                state.refill((torch.cat([x1, x2], d),))
        else:
            state.refill((x1, x2))
        return [g if n else None for g, n in zip(data_grads, needs)] + [
            g if n else None for g, n in zip(rest_grads, rest_needs)
        ]


class _Variadic(Invertible):
    """The inverse of a coupling: its data and per-call arguments as the coupling's."""

    def __init__(self, fn: Callable[..., Any], inverse: Callable[..., Any], name: str, of: Coupling) -> None:
        super().__init__(fn, inverse, n_inputs=of.n_in or 1, ladj=0, name=name, wraps=False)
        self._arity = None
        self._of = of

    _learn = Coupling._learn
    n_outputs = Coupling.n_outputs

    def _takes_rest(self, n_rest: int, lead: bool, where: str) -> bool:
        return self._of._takes_rest(n_rest, lead, where)

    def _declared_data(self) -> int | None:
        return self._of.n_in

    def _n_data(self, args: Sequence[Any]) -> int:
        return self._of.data_count(args)

    @property
    def _exact(self) -> bool:
        return self._of._exact


def _alone(t: torch.Tensor, n: int) -> bool:
    """Only the ``n`` tensors this backward made are on ``t``'s storage
    (NOTE [Incoming gradients nobody holds]): nothing kept an alias handed out since."""
    return _use_count(_compat.storage_key(t.untyped_storage())) == n + 1  # and the temporary storage


def _sizes(n: int) -> list[int]:
    """The sizes of the halves of ``n`` elements: the second has the extra one of an odd
    ``n``."""
    return [n // 2, n - n // 2]


def _not_a_half(args: Sequence[Any], dim: int) -> str | None:
    """Why the second of two arguments cannot be the second half of a pair (None if it can)."""
    a, b = args
    if not isinstance(b, torch.Tensor):
        return f"it is a {type(b).__name__}, not a tensor"
    if not (b.is_floating_point() or b.is_complex()):
        return f"its dtype is {b.dtype}, not floating point"
    if not isinstance(a, torch.Tensor):
        return None  # the first is refused on its own
    if b.dtype != a.dtype:
        return f"its dtype is {b.dtype}, the first's {a.dtype}"
    if b.device != a.device:
        return f"it is on {b.device}, the first on {a.device}"
    if b.dim() != a.dim():
        return f"it has {b.dim()} dimension(s), the first {a.dim()}"
    if a.dim() and dim % a.dim() != 0 and a.size(0) != b.size(0):
        return f"its batch size is {b.size(0)}, the first's {a.size(0)}"
    return None


def _shape(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


def couple(
    F: Callable[..., Any],
    G: Callable[..., Any] | None = None,
    *,
    dim: int = 1,
    n_inputs: int | None = None,
    exact: bool | float = False,
) -> Invertible:
    """The additive (RevNet) coupling: ``y1 = x1 + F(x2); y2 = x2 + G(y1)``.

    Called with one tensor, it splits it into halves along ``dim`` and returns one
    tensor; called with a pair ``(x1, x2)`` it returns a pair ``(y1, y2)`` (no
    concatenation copy). ``G=None`` is the one-sided (NICE) coupling ``y2 = x2``.
    F and G can be any callables — ``nn.Module`` objects, functions, closures — and need not
    be invertible; their parameters get gradients automatically. Under
    :func:`invfunc.invertible_call` the backward evaluates F and G once each (the
    RevNet algorithm), rebuilding the input on the way.

    Per-call arguments (a graph's ``edge_index``, an attention mask) follow the data when
    ``n_inputs`` is declared, and F and G receive them on every call, in both directions:
    ``F(x2, *rest)``, ``G(y1, *rest)``. Tensors among them that require grad (a learnable
    edge weight) get their gradients; they are never freed.

    Args:
        F: maps the second half ``x2`` to a tensor shaped like the first, ``x1``.
        G: maps the first output half ``y1`` to a tensor shaped like ``x2``, or None.
            The halves need not be equal: a pair of any two shapes F and G map
            between, or one tensor of odd size ``n`` along ``dim``, split into
            ``n // 2`` and ``n - n // 2``.
        dim: the dimension to split a single input along. The default, 1, is the
            channel axis of ``(B, C, H, W)`` images; on ``(B, T, C)`` activations
            (transformers) it is the token axis, which splits the sequence, not the
            channels, with no error: pass ``dim=-1`` for channels-last activations.
        n_inputs: how many leading arguments are data: 1 (one tensor, split into
            halves) or 2 (a pair); the arguments after them go to F and G. Left out,
            the coupling takes one tensor or a pair and nothing else.
        exact: True puts the stream and F's and G's outputs on a fixed grid chosen from
            the dtype (float32: multiples of ``2^-16``, below 256 in magnitude), so that
            the inverse is exact to the bit and :func:`invfunc.invertible_call`'s
            gradients are bitwise those of a plain call of the same exact model (with
            deterministic F and G). A number declares the largest magnitude instead (a
            coarser grid). Values past the range raise :class:`invfunc.InvfuncError`.
            See NOTE [Exact couplings] and "Exact couplings" in the sharp bits.

    Examples:
        >>> import torch, invfunc as inv
        >>> torch.manual_seed(0) is not None
        True
        >>> block = inv.couple(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
        >>> x = torch.randn(2, 6)
        >>> torch.allclose(block.inverse(block(x)), x, atol=1e-6)
        True
        >>> y1, y2 = block(x[:, :3], x[:, 3:])             # the pair form
        >>> torch.allclose(torch.cat([y1, y2], 1), block(x))
        True
        >>> uneven = inv.couple(torch.nn.Linear(3, 2), torch.nn.Linear(2, 3))
        >>> uneven(torch.randn(2, 5)).shape               # split 2 + 3
        torch.Size([2, 5])

        A per-call argument, here a mask that F and G apply:

        >>> lin = torch.nn.Linear(3, 3)
        >>> masked = inv.couple(lambda h, m: lin(h) * m, lambda h, m: lin(h) * m, dim=1, n_inputs=1)
        >>> m = torch.tensor([[1.0, 0.0, 1.0]])
        >>> y = inv.invertible_call(masked, x.requires_grad_(), m)
        >>> torch.allclose(masked.inverse(y, m), x, atol=1e-6)
        True

        Exact: the inverse gives back the (grid-rounded) input to the bit:

        >>> exact = inv.couple(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3), exact=True)
        >>> h = torch.round(torch.randn(2, 6) * 2**16) / 2**16      # already on the grid
        >>> torch.equal(exact.inverse(exact(h)), h)
        True
    """
    if not callable(F):
        raise TypeError(f"invfunc.couple(F, G): F must be callable, got {type(F).__name__}.")
    if G is not None and not callable(G):
        raise TypeError(f"invfunc.couple(F, G): G must be callable or None, got {type(G).__name__}.")
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"invfunc.couple(F, G, dim=...): dim must be an int, got {dim!r}.")
    if n_inputs is not None and (n_inputs not in (1, 2) or isinstance(n_inputs, bool)):
        raise ValueError(
            f"invfunc.couple(F, G, n_inputs=...): n_inputs must be 1 (one tensor, split into halves) "
            f"or 2 (a pair), got {n_inputs!r}."
        )
    grid = grid_for(exact, "couple(F, G, exact=...)")
    block = Coupling(F, G, dim, n_inputs, grid)
    if grid is not None:
        grid.where = block._name
    return block
