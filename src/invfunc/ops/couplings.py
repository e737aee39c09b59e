"""Couplings with a log-det: affine (RealNVP, Glow), MomentumNet, and a custom one whose
elementwise map the user supplies. (The additive coupling is :func:`invfunc.couple`.)"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._core import Invertible, _name, split_ladj
from .._coupling import _sizes
from .._replay import mode_dependent
from .._reuse import movable
from .._state import BlockState
from .._vjp import _fast_path, accumulate, section_vjp
from ._op import channel_dim, make_op, sum_per_sample

__all__ = ["affine_coupling", "custom_coupling", "momentum_coupling"]


class _Conditioned(nn.Module):
    """A coupling of one tensor along ``dim``: the first half ``x1`` passes unchanged and
    conditions the map of the second half ``x2`` (by ``net(x1)``)."""

    def __init__(self, net: Callable[..., Any], dim: int, where: str) -> None:
        super().__init__()
        if not callable(net):
            raise TypeError(f"invfunc.ops.{where}: net must be callable, got {type(net).__name__}.")
        self.net, self.dim, self.where = net, dim, where  # (a module becomes a submodule)

    def _halves(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        d = channel_dim(self.dim, x.dim(), self.where)
        if x.size(d) < 2:
            raise ValueError(
                f"invfunc.ops.{self.where}: the input has size {x.size(d)} along dim {d} (shape "
                f"{tuple(x.shape)}); a coupling splits it into two halves, which needs at least 2."
            )
        a, b = x.split_with_sizes(_sizes(x.size(d)), d)
        return a, b, d


class AffineCoupling(_Conditioned):
    """``y2 = x2 * exp(s) + t`` with ``(s, t)`` from ``net(x1)``, ``s`` soft-clamped."""

    def __init__(self, net: Callable[..., Any], dim: int, clamp: float) -> None:
        super().__init__(net, dim, f"affine_coupling({_name(net)})")
        self.clamp = clamp

    def _scale_shift(self, x1: torch.Tensor, like: torch.Size, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, t)`` of ``net(x1)``, each shaped ``like`` (x2's shape), ``s`` soft-clamped."""
        h = self.net(x1)
        if isinstance(h, tuple) and len(h) == 2:
            s, t = h
        elif isinstance(h, torch.Tensor) and h.dim() == len(like) and h.size(d) == 2 * like[d]:
            s, t = h.chunk(2, d)
        else:
            raise ValueError(
                f"invfunc.ops.{self.where}: net returned {_describe(h)} for x1 of shape "
                f"{tuple(x1.shape)}; it must return one tensor with twice x2's size along dim {d} "
                "(log-scale, then shift) or the pair (log_scale, shift), each shaped like x2, "
                f"{tuple(like)}."
            )
        if s.shape != like or t.shape != like:
            raise ValueError(
                f"invfunc.ops.{self.where}: net gave a log-scale of shape {tuple(s.shape)} and a shift of "
                f"shape {tuple(t.shape)}; both must be shaped like x2, {tuple(like)}."
            )
        if self.clamp > 0:  # soft clamp: |s| < clamp, smooth, identity near 0
            s = self.clamp * torch.tanh(s / self.clamp)
        return s, t

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2, d = self._halves(x)
        s, t = self._scale_shift(x1, x2.shape, d)
        return torch.cat([x1, x2 * s.exp() + t], d), sum_per_sample(s)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y1, y2, d = self._halves(y)
        s, t = self._scale_shift(y1, y2.shape, d)
        return torch.cat([y1, (y2 - t) * (-s).exp()], d), -sum_per_sample(s)


def affine_coupling(net: Callable[..., Any], dim: int = 1, *, clamp: float = 2.0) -> Invertible:
    """The affine coupling of RealNVP and Glow: ``y1 = x1``, ``y2 = x2 * exp(s) + t``.

    The input is split into halves along ``dim`` (sizes ``n // 2`` and ``n - n // 2``);
    ``net(x1)`` returns one tensor with twice ``x2``'s size along ``dim`` (the log-scale,
    then the shift) or the pair ``(log_scale, shift)``. The log-scale is soft-clamped to
    ``clamp * tanh(s / clamp)`` (``clamp=0``: no clamp), which keeps ``exp(s)`` within
    ``e^±clamp`` so that training starts stable and the inverse stays well conditioned.
    The log-det is ``sum(s)`` per sample. ``net`` need not be invertible; a module is
    reached by :func:`invfunc.as_module`.

    Args:
        net: maps ``x1`` to the log-scale and shift of ``x2``.
        dim: the dimension to split (1: channels of ``(B, C, ...)``; -1: channels-last).
        clamp: the soft clamp of the log-scale.

    Returns:
        An :class:`~invfunc.Invertible` returning ``(y, ladj)``.

    Examples:
        >>> import torch, invfunc as inv
        >>> from invfunc import ops
        >>> torch.manual_seed(0) is not None
        True
        >>> block = ops.affine_coupling(torch.nn.Linear(2, 4))    # x1: 2 features -> s, t for x2
        >>> x = torch.randn(5, 4)
        >>> y, ladj = block(x)
        >>> back, ladj_inv = block.inverse(y)
        >>> torch.allclose(back, x, atol=1e-6), torch.allclose(ladj, -ladj_inv)
        (True, True)
    """
    if not isinstance(clamp, (int, float)) or isinstance(clamp, bool) or clamp < 0 or math.isnan(clamp):
        raise ValueError(f"invfunc.ops.affine_coupling: clamp must be a number >= 0, got {clamp!r}.")
    module = AffineCoupling(net, dim, float(clamp))
    return make_op(module, module.where, ladj=True, block=_AffineBlock)


class _AffineBlock(Invertible):
    """The affine coupling as the engine runs it: ``net`` is its one recorded section.

    NOTE [The affine coupling's backward]

    1. The forward runs ``net(x1)`` (with the soft clamp) inside the section ``"net"``,
       whose outputs ``(s, t)`` are checksummed, and the coupling's arithmetic outside it.
    2. The backward evaluates ``net(y1)`` once, with grad (``y1`` is ``x1``): its
       ``(s, t)`` rebuild ``x2 = (y2 - t) * exp(-s)`` and, through ``net``'s pullback,
       give ``x1``'s and the parameters' gradients. A generic block would run ``net``
       twice (the inverse, then the recompute), as torch.utils.checkpoint runs it once.
    3. The gradients are plain autograd's formulas for ``y2 = x2 * exp(s) + t`` and
       ``ladj = sum(s)``: ``g_x2 = g_y2 * e``, ``g_s = g_y2 * x2 * e + g_ladj``,
       ``g_t = g_y2``, ``g_x1 = g_y1 + net's pullback of (g_s, g_t)``, with ``e = exp(s)``.
    4. A kept input is used as it is (NOTE [Kept inputs are used as they are]); a freed
       one is refilled with ``cat(y1, x2)``, built in a fresh buffer whose memory is
       moved into the input's storage (NOTE [Rebuilt inputs moved, not copied]); drift is
       checked as for any block. Without a graph to build, the arithmetic writes into
       fresh buffers; with one (``create_graph``, torch.func) it is ordinary ops.
    """

    _sections = ("net",)
    _section_outputs = True

    @property
    def _module(self) -> AffineCoupling:
        return self._fn.__self__  # type: ignore[attr-defined,no-any-return]

    def _mode_dependent(self) -> list[nn.Module]:
        return mode_dependent(self._module.net)

    def _run(self, args: Sequence[Any], section: Any) -> Any:
        m = self._module
        # (the arithmetic on detached views: not recorded, not mistaken for captured tensors)
        x1, x2, d = m._halves(args[0].detach())
        with section("net"):
            s, t = m._scale_shift(x1, x2.shape, d)
        section.output("net", s, t)
        return torch.cat([x1, x2 * s.exp() + t], d), sum_per_sample(s)

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
        m = self._module
        fast = _fast_path(*outs, *grads)  # no graph to build: write into fresh buffers
        y1, y2, d = m._halves(outs[0].detach() if fast else outs[0])
        gy1, gy2 = grads[0].split_with_sizes([y1.size(d), y2.size(d)], d)
        rest_needs = needs[1:]
        like = y2.shape  # (read here: inside the section it would count as a tensor net reads)
        (s, t), pull = section_vjp(
            state, lambda a: m._scale_shift(a, like, d), "net", y1, explicit, captured, rest_needs, n_out=2
        )
        e = s.exp()
        live = state.live_inputs()[0] if fast and state.live else None
        rebuilt: list[torch.Tensor] = []
        if live is not None:
            x2 = live.narrow(d, y1.size(d), y2.size(d))
        elif fast:  # x = cat(y1, (y2 - t) / e), written in place
            rebuilt.append(torch.empty_like(outs[0], memory_format=torch.contiguous_format))
            x1_dst, x2 = rebuilt[0].split_with_sizes([y1.size(d), y2.size(d)], d)
            x1_dst.copy_(y1)
            torch.sub(y2, t, out=x2).div_(e)
            del x1_dst
        else:
            x2 = (y2 - t) * (-s).exp()
            rebuilt.append(torch.cat([y1, x2], d))
        del t
        g_ladj = grads[1].reshape(-1, *([1] * (s.dim() - 1)))
        g_s = torch.mul(gy2, x2).mul_(e).add_(g_ladj) if fast else gy2 * x2 * e + g_ladj
        del x2
        if rebuilt:
            state.settle(rebuilt, move=movable if fast else None)
            del rebuilt
        del y2
        g_x1, pairs = pull((g_s, gy2))
        del pull, g_s, y1
        state.release_output()  # (after net's backward, which may read y1, a view of it)
        if fast:
            g_x = torch.empty_like(grads[0], memory_format=torch.contiguous_format)
            gx1, gx2 = g_x.split_with_sizes([gy1.size(d), gy2.size(d)], d)
            torch.mul(gy2, e, out=gx2)
            gx1.copy_(gy1) if g_x1 is None else torch.add(gy1, g_x1, out=gx1)
        else:
            g_x = torch.cat([gy1 if g_x1 is None else gy1 + g_x1, gy2 * e], d)
        del s, e, g_x1
        rest: list[torch.Tensor | None] = [None] * len(rest_needs)
        accumulate(rest, pairs)
        return [g_x if needs[0] else None] + [g if n else None for g, n in zip(rest, rest_needs)]


class MomentumCoupling(nn.Module):
    """MomentumNet: ``v' = gamma v + (1 - gamma) f(x)``, ``x' = x + v'``, on the pair ``(x, v)``."""

    def __init__(self, f: Callable[..., Any], gamma: float) -> None:
        super().__init__()
        if not callable(f):
            raise TypeError(f"invfunc.ops.momentum_coupling: f must be callable, got {type(f).__name__}.")
        self.f, self.gamma = f, gamma
        self.where = f"momentum_coupling({_name(f)})"

    def _f(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = self.f(x)
        if not isinstance(out, torch.Tensor) or out.shape != like.shape:
            raise ValueError(
                f"invfunc.ops.{self.where}: f returned {_describe(out)} for x of shape {tuple(x.shape)}; it "
                f"must return a tensor shaped like the velocity v, {tuple(like.shape)}."
            )
        return out

    def _ladj(self, v: torch.Tensor) -> torch.Tensor:
        return torch.full((v.shape[0],), v[0].numel() * math.log(self.gamma), dtype=v.dtype, device=v.device)

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v_new = self.gamma * v + (1 - self.gamma) * self._f(x, v)
        return x + v_new, v_new, self._ladj(v)

    def inverse(
        self, x_new: torch.Tensor, v_new: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x_new - v_new
        v = (v_new - (1 - self.gamma) * self._f(x, v_new)) / self.gamma
        return x, v, -self._ladj(v)


def momentum_coupling(f: Callable[..., Any], gamma: float = 0.9) -> Invertible:
    """The MomentumNet coupling (Sander et al., 2021) on a pair ``(x, v)``:
    ``v' = gamma * v + (1 - gamma) * f(x)``, ``x' = x + v'``.

    A residual block ``x + f(x)`` made invertible by a velocity ``v`` (start it at
    zeros). The map scales volume by ``gamma`` per element of ``v``: the log-det is
    ``v.numel() / batch * log(gamma)``. The inverse divides by ``gamma``, so its rebuild
    amplifies round-off by ``1 / gamma`` per block: keep ``gamma`` near 1 (0.9 is
    MomentumNet's default) or verify drift (:func:`invfunc.verify`) at depth.

    Args:
        f: the residual branch, mapping ``x`` to a tensor shaped like ``v``.
        gamma: the momentum, in (0, 1].

    Returns:
        An :class:`~invfunc.Invertible` of two data inputs returning ``(x', v', ladj)``.

    Examples:
        >>> import torch, invfunc as inv
        >>> from invfunc import ops
        >>> block = ops.momentum_coupling(torch.nn.Linear(3, 3))
        >>> x, v = torch.randn(2, 3), torch.zeros(2, 3)
        >>> x1, v1, ladj = block(x, v)
        >>> x0, v0, _ = block.inverse(x1, v1)
        >>> torch.allclose(x0, x, atol=1e-6), torch.allclose(v0, v, atol=1e-6)
        (True, True)
    """
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not 0 < gamma <= 1:
        raise ValueError(f"invfunc.ops.momentum_coupling: gamma must be in (0, 1], got {gamma!r}.")
    module = MomentumCoupling(f, float(gamma))
    return make_op(module, module.where, ladj=True, n_inputs=2, n_outputs=2, block=Invertible)


class CustomCoupling(_Conditioned):
    """``y2 = transform(x2, *net(x1))``: the user's conditioned elementwise map."""

    def __init__(self, net: Callable[..., Any], transform: Invertible, dim: int) -> None:
        super().__init__(net, dim, f"custom_coupling({_name(net)}, {transform._name})")
        self.transform = transform

    def _params(self, x1: torch.Tensor) -> tuple[Any, ...]:
        p = self.net(x1)
        return p if isinstance(p, tuple) else (p,)

    def _map(self, fn: Invertible, a: torch.Tensor, b: torch.Tensor, d: int, sign: int) -> Any:
        out = fn(b, *self._params(a))
        if self.transform._ladj is not True:
            return torch.cat([a, out], d)
        b_new, ladj = split_ladj(out)
        return torch.cat([a, b_new], d), ladj

    def forward(self, x: torch.Tensor) -> Any:
        x1, x2, d = self._halves(x)
        return self._map(self.transform, x1, x2, d, 1)

    def inverse(self, y: torch.Tensor) -> Any:
        y1, y2, d = self._halves(y)
        return self._map(self.transform.inverse, y1, y2, d, -1)


def custom_coupling(net: Callable[..., Any], transform: Invertible, dim: int = 1) -> Invertible:
    """A coupling whose map of the second half is yours: ``y1 = x1``,
    ``y2 = transform(x2, *net(x1))``.

    ``transform`` is an :class:`~invfunc.Invertible` taking ``x2`` followed by the
    parameters ``net(x1)`` returns (one tensor or a tuple), and its inverse takes ``y2``
    followed by the same parameters: a spline, a mixture of logistics, a piecewise-linear
    map. Its log-det (``ladj=True``) is the coupling's; a volume-preserving transform
    (``ladj=0``) makes a volume-preserving coupling.

    Examples:
        >>> import torch, invfunc as inv
        >>> from invfunc import ops
        >>> shift_scale = inv.invertible(
        ...     lambda x, s, t: (x * s.exp() + t, s.sum(1)),
        ...     inverse=lambda y, s, t: ((y - t) * (-s).exp(), -s.sum(1)),
        ...     ladj=True,
        ... )
        >>> net = torch.nn.Linear(2, 4)
        >>> block = ops.custom_coupling(lambda h: tuple(net(h).chunk(2, 1)), shift_scale)
        >>> x = torch.randn(3, 4)
        >>> y, ladj = block(x)
        >>> torch.allclose(block.inverse(y)[0], x, atol=1e-6)
        True
    """
    if not isinstance(transform, Invertible):
        raise TypeError(
            "invfunc.ops.custom_coupling: transform must be an Invertible (invfunc.invertible(f, "
            "inverse=g, ladj=True) taking x2 and the parameters net(x1) returns), got "
            f"{type(transform).__name__}."
        )
    if transform._ladj is None:
        raise TypeError(
            f"invfunc.ops.custom_coupling: the log-det of {transform._name} is unknown; declare "
            "invfunc.invertible(..., ladj=True) (returning (y, ladj)) or ladj=0 (volume-preserving)."
        )
    module = CustomCoupling(net, transform, dim)
    return make_op(module, module.where, ladj=transform._ladj is True, block=Invertible)


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    if isinstance(x, tuple):
        return f"a tuple of {len(x)}"
    return f"a {type(x).__name__}"
