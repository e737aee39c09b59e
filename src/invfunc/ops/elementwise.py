"""Elementwise bijections with their log-determinants (NOTE [Ops], NOTE [Log-determinants]).

Each op maps every element through a strictly monotone scalar function ``f``; its
Jacobian is diagonal, so its log-det per sample is ``sum(log|f'(x)|)`` over the non-batch
dimensions. Every op is declared ``ladj=True``: ``op(x)`` returns ``(y, ladj)`` and
``op.inverse(y)`` returns ``(x, ladj_inverse)``.

NOTE [Bounded domains]

1. Where a direction's input has a bounded domain (``logit``, ``atanh``, ``log``, the
   inverse of ``softplus``), the op clamps that input into the closed range of the
   floating numbers strictly inside it, chosen from the dtype's ``finfo``: below by
   ``tiny`` (the smallest normal number) above 0, and by ``1 - eps / 2`` (the largest number
   below 1) under 1. The result, and its log-det, are then finite: ``logit(1.0)`` in float32
   is ``16.6``, not ``inf``, and ``log(0.0)`` is ``log(tiny) = -87.3``.
2. Where the forward saturates, a round trip loses precision to the forward's rounding,
   not to the clamp: near 1, ``sigmoid(x)`` is a multiple of ``eps / 2``, so ``1 -
   sigmoid(x)``, about ``exp(-x)``, is off by up to ``eps / 4`` and the rebuilt ``x`` by
   about ``eps * exp(x) / 4`` (float64: ``1e-12`` at
   ``x = 10``, ``1e-3`` at 30; float32: ``5e-4`` at 10), and ``tanh`` by about
   ``eps * exp(2|x|) / 4`` (float64: ``5e-9`` at 10). Past ``x = 36.7`` (float64) or
   ``16.6`` (float32) ``sigmoid(x)`` rounds to 1 and is rebuilt as that edge; ``tanh``
   does so past ``18.7`` and ``9.0``. Under :func:`invfunc.invertible_call` the rebuilt
   input drifts as much: keep saturating inputs moderate, or run such a block in
   ``"checkpoint"`` mode.
3. The gradient through a clamped value is that of ``torch.clamp``: zero outside the
   range.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._core import Invertible
from ._op import make_op, sum_per_sample

__all__ = ["exp", "leaky_relu", "log", "logit", "sigmoid", "softplus", "tanh"]

_LOG2 = math.log(2.0)
Pair = tuple[torch.Tensor, torch.Tensor]


def _finfo(t: torch.Tensor, where: str) -> torch.finfo:
    if not t.is_floating_point():
        raise TypeError(
            f"invfunc.ops.{where}: expects a floating-point tensor, got dtype {t.dtype}; "
            "convert it first, e.g. x.float()."
        )
    return torch.finfo(t.dtype)


def _positive(t: torch.Tensor, where: str) -> torch.Tensor:
    """``t`` clamped into ``[tiny, inf)`` (NOTE [Bounded domains])."""
    return t.clamp(min=_finfo(t, where).tiny)


def _unit(t: torch.Tensor, where: str) -> torch.Tensor:
    """``t`` clamped into ``[tiny, 1 - eps / 2]``, inside ``(0, 1)`` (NOTE [Bounded domains])."""
    fi = _finfo(t, where)
    return t.clamp(fi.tiny, 1.0 - fi.eps / 2)


def _symmetric_unit(t: torch.Tensor, where: str) -> torch.Tensor:
    """``t`` clamped into ``[-(1 - eps / 2), 1 - eps / 2]``, inside ``(-1, 1)``."""
    edge = 1.0 - _finfo(t, where).eps / 2
    return t.clamp(-edge, edge)


def _log1mexp(t: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(-t))`` for ``t > 0``, accurate for small and large ``t`` (Maechler 2012).

    Each branch sees only inputs on its own side of ``log 2``, so the branch that
    ``torch.where`` drops has a finite gradient too (no ``0 * inf``)."""
    small = t.clamp(max=_LOG2)
    large = t.clamp(min=_LOG2)
    return torch.where(t < _LOG2, torch.log(-torch.expm1(-small)), torch.log1p(-torch.exp(-large)))


class LeakyReLU(nn.Module):
    """``y = x`` for ``x >= 0``, ``negative_slope * x`` otherwise (see :func:`leaky_relu`)."""

    def __init__(self, negative_slope: float) -> None:
        super().__init__()
        self.negative_slope = negative_slope

    def _ladj(self, negative: torch.Tensor, like: torch.Tensor, sign: float) -> torch.Tensor:
        """``sign * log(negative_slope)`` times the number of negative elements per sample."""
        return sum_per_sample(negative.to(like.dtype)) * (sign * math.log(self.negative_slope))

    def forward(self, x: torch.Tensor) -> Pair:
        _finfo(x, "leaky_relu")
        negative = x < 0
        return torch.where(negative, x * self.negative_slope, x), self._ladj(negative, x, 1.0)

    def inverse(self, y: torch.Tensor) -> Pair:
        _finfo(y, "leaky_relu")
        negative = y < 0
        return torch.where(negative, y / self.negative_slope, y), self._ladj(negative, y, -1.0)


class Sigmoid(nn.Module):
    """``y = 1 / (1 + exp(-x))``; its inverse is ``logit`` (see :func:`sigmoid`)."""

    op = "sigmoid"  # the factory, for errors

    def forward(self, x: torch.Tensor) -> Pair:
        _finfo(x, self.op)
        # log sigmoid'(x) = log sigmoid(x) + log sigmoid(-x) = -softplus(-x) - softplus(x)
        return torch.sigmoid(x), -sum_per_sample(F.softplus(-x) + F.softplus(x))

    def inverse(self, y: torch.Tensor) -> Pair:
        y = _unit(y, self.op)
        log_y, log_1my = torch.log(y), torch.log1p(-y)
        return log_y - log_1my, -sum_per_sample(log_y + log_1my)


class Logit(Sigmoid):
    """``y = log(x / (1 - x))``: :class:`Sigmoid` the other way round (see :func:`logit`)."""

    op = "logit"

    def forward(self, x: torch.Tensor) -> Pair:
        return super().inverse(x)

    def inverse(self, y: torch.Tensor) -> Pair:
        return super().forward(y)


class Tanh(nn.Module):
    """``y = tanh(x)``; its inverse is ``atanh``, clamped (see :func:`tanh`)."""

    def forward(self, x: torch.Tensor) -> Pair:
        _finfo(x, "tanh")
        # log(1 - tanh(x)^2) = -2 log cosh(x) = 2 (log 2 - x - softplus(-2x)), finite for any x
        return torch.tanh(x), 2.0 * sum_per_sample(_LOG2 - x - F.softplus(-2.0 * x))

    def inverse(self, y: torch.Tensor) -> Pair:
        y = _symmetric_unit(y, "tanh")
        return torch.atanh(y), -sum_per_sample(torch.log1p(-y) + torch.log1p(y))


class Exp(nn.Module):
    """``y = exp(x)``; its inverse is ``log``, clamped (see :func:`exp`)."""

    op = "exp"

    def forward(self, x: torch.Tensor) -> Pair:
        _finfo(x, self.op)
        return torch.exp(x), sum_per_sample(x)

    def inverse(self, y: torch.Tensor) -> Pair:
        x = torch.log(_positive(y, self.op))
        return x, -sum_per_sample(x)


class Log(Exp):
    """``y = log(x)``, clamped: :class:`Exp` the other way round (see :func:`log`)."""

    op = "log"

    def forward(self, x: torch.Tensor) -> Pair:
        return super().inverse(x)

    def inverse(self, y: torch.Tensor) -> Pair:
        return super().forward(y)


class Softplus(nn.Module):
    """``y = log(1 + exp(x))``; its inverse is ``log(expm1(y))``, clamped (see :func:`softplus`)."""

    def forward(self, x: torch.Tensor) -> Pair:
        _finfo(x, "softplus")
        # softplus'(x) = sigmoid(x), whose log is -softplus(-x)
        return F.softplus(x), -sum_per_sample(F.softplus(-x))

    def inverse(self, y: torch.Tensor) -> Pair:
        y = _positive(y, "softplus")
        # x = log(expm1(y)) = y + log(1 - exp(-y)); log|dx/dy| = -log(1 - exp(-y)) = y - x
        log1mexp = _log1mexp(y)
        return y + log1mexp, -sum_per_sample(log1mexp)


def leaky_relu(negative_slope: float = 0.01) -> Invertible:
    """The leaky ReLU, ``y = x`` for ``x >= 0`` and ``negative_slope * x`` otherwise.

    Its inverse divides the negative values by the slope. The log-det per sample is
    ``log(negative_slope)`` times the number of negative elements (constant almost
    everywhere: it carries no gradient).

    Args:
        negative_slope: the slope for negative inputs, a finite number ``> 0`` (a slope
            of 0 is not invertible; one above 1 is allowed).

    Returns:
        An :class:`~invfunc.Invertible` declared ``ladj=True``: ``(y, ladj)``.

    Raises:
        ValueError: if ``negative_slope`` is not a finite number ``> 0``.

    Examples:
        >>> import torch, invfunc as inv
        >>> from invfunc import ops
        >>> act = ops.leaky_relu(0.5)
        >>> x = torch.tensor([[-2.0, 1.0, -4.0]])
        >>> y, ladj = act(x)
        >>> y
        tensor([[-1.,  1., -2.]])
        >>> ladj  # two negatives: 2 log(0.5)
        tensor([-1.3863])
        >>> act.inverse(y)
        (tensor([[-2.,  1., -4.]]), tensor([1.3863]))
    """
    if (
        isinstance(negative_slope, bool)
        or not isinstance(negative_slope, (int, float))
        or not math.isfinite(negative_slope)
        or negative_slope <= 0
    ):
        raise ValueError(
            f"invfunc.ops.leaky_relu: negative_slope must be a finite number > 0 (a slope of 0 or "
            f"below is not invertible), got {negative_slope!r}."
        )
    return make_op(LeakyReLU(float(negative_slope)), f"leaky_relu({negative_slope})", ladj=True)


def sigmoid() -> Invertible:
    """The logistic sigmoid, ``y = 1 / (1 + exp(-x))``, mapping the reals onto ``(0, 1)``.

    Its inverse is :func:`logit`, which clamps its input into ``(0, 1)`` (NOTE [Bounded
    domains] in this module): ``[tiny, 1 - eps / 2]`` of the dtype. The log-det is
    ``sum(log sigmoid(x) + log sigmoid(-x))``, computed with softplus so that it stays
    finite where ``sigmoid(x)`` rounds to 0 or 1.

    Returns:
        An :class:`~invfunc.Invertible` declared ``ladj=True``: ``(y, ladj)``.

    Examples:
        >>> import torch, invfunc as inv
        >>> from invfunc import ops
        >>> x = torch.tensor([[0.0, 2.0]])
        >>> y, ladj = ops.sigmoid()(x)
        >>> y
        tensor([[0.5000, 0.8808]])
        >>> ladj  # log(0.5 * 0.5) + log(0.8808 * 0.1192)
        tensor([-3.6402])
        >>> torch.allclose(ops.sigmoid().inverse(y)[0], x)
        True
        >>> ops.sigmoid().inverse(torch.tensor([[1.0]]))[0]  # 1.0 is clamped into (0, 1)
        tensor([[16.6355]])
    """
    return make_op(Sigmoid(), "sigmoid", ladj=True)


def logit() -> Invertible:
    """The logit, ``y = log(x / (1 - x))``, mapping ``(0, 1)`` onto the reals: the inverse of
    :func:`sigmoid`, as the forward direction (to map data in ``(0, 1)`` to the reals).

    Its input is clamped into ``[tiny, 1 - eps / 2]`` of the dtype (NOTE [Bounded
    domains]), so 0 and 1 give finite values. The log-det is ``-sum(log x + log(1 - x))``.

    Returns:
        An :class:`~invfunc.Invertible` declared ``ladj=True``: ``(y, ladj)``.

    Examples:
        >>> import torch, invfunc as inv
        >>> from invfunc import ops
        >>> x = torch.tensor([[0.5, 0.25]], dtype=torch.float64)
        >>> y, ladj = ops.logit()(x)
        >>> y
        tensor([[ 0.0000, -1.0986]], dtype=torch.float64)
        >>> ladj  # -log(0.5 * 0.5) - log(0.25 * 0.75)
        tensor([3.0603], dtype=torch.float64)
        >>> ops.logit().inverse(y)[0]
        tensor([[0.5000, 0.2500]], dtype=torch.float64)
    """
    return make_op(Logit(), "logit", ladj=True)


def tanh() -> Invertible:
    """The hyperbolic tangent, ``y = tanh(x)``, mapping the reals onto ``(-1, 1)``.

    Its inverse is ``atanh``, with its input clamped into ``[-(1 - eps / 2), 1 - eps / 2]``
    of the dtype (NOTE [Bounded domains]), so -1 and 1 give finite values. The log-det is
    ``sum(log(1 - tanh(x)^2))``, computed as ``-2 log cosh(x)`` so that it stays finite
    where ``tanh(x)`` rounds to 1.

    Returns:
        An :class:`~invfunc.Invertible` declared ``ladj=True``: ``(y, ladj)``.

    Examples:
        >>> import torch, invfunc as inv
        >>> from invfunc import ops
        >>> x = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
        >>> y, ladj = ops.tanh()(x)
        >>> y
        tensor([[0.0000, 0.7616]], dtype=torch.float64)
        >>> ladj  # log(1) + log(1 - 0.7616^2)
        tensor([-0.8676], dtype=torch.float64)
        >>> torch.allclose(ops.tanh().inverse(y)[0], x)
        True
        >>> ops.tanh().inverse(torch.tensor([[1.0]]))[0]  # 1.0 is clamped into (-1, 1)
        tensor([[8.6643]])
    """
    return make_op(Tanh(), "tanh", ladj=True)


def exp() -> Invertible:
    """The exponential, ``y = exp(x)``, mapping the reals onto ``(0, inf)``.

    Its inverse is ``log``, with its input clamped to ``tiny`` of the dtype or above
    (NOTE [Bounded domains]), so 0 gives a finite value. The log-det is ``sum(x)``. The
    forward overflows to ``inf`` past ``log(max)`` of the dtype (88.7 in float32).

    Returns:
        An :class:`~invfunc.Invertible` declared ``ladj=True``: ``(y, ladj)``.

    Examples:
        >>> import torch, invfunc as inv
        >>> from invfunc import ops
        >>> x = torch.tensor([[0.0, 1.0, -2.0]], dtype=torch.float64)
        >>> y, ladj = ops.exp()(x)
        >>> ladj
        tensor([-1.], dtype=torch.float64)
        >>> ops.exp().inverse(y)
        (tensor([[ 0.,  1., -2.]], dtype=torch.float64), tensor([1.], dtype=torch.float64))
    """
    return make_op(Exp(), "exp", ladj=True)


def log() -> Invertible:
    """The natural logarithm, ``y = log(x)``, mapping ``(0, inf)`` onto the reals: the
    inverse of :func:`exp`, as the forward direction.

    Its input is clamped to ``tiny`` of the dtype or above (NOTE [Bounded domains]): 0 and
    negative values give ``log(tiny)`` (``-87.3`` in float32, ``-708.4`` in float64). The
    log-det is ``-sum(log x)``.

    Returns:
        An :class:`~invfunc.Invertible` declared ``ladj=True``: ``(y, ladj)``.

    Examples:
        >>> import torch, invfunc as inv
        >>> from invfunc import ops
        >>> x = torch.tensor([[1.0, 4.0]], dtype=torch.float64)
        >>> y, ladj = ops.log()(x)
        >>> ladj  # -log(4)
        tensor([-1.3863], dtype=torch.float64)
        >>> ops.log().inverse(y)[0]
        tensor([[1., 4.]], dtype=torch.float64)
    """
    return make_op(Log(), "log", ladj=True)


def softplus() -> Invertible:
    """The softplus, ``y = log(1 + exp(x))``, mapping the reals onto ``(0, inf)``.

    Its inverse, ``log(expm1(y))``, is computed stably as ``y + log(1 - exp(-y))`` (exact
    for large ``y``, where ``expm1`` would overflow, and for small ``y``), with ``y``
    clamped to ``tiny`` of the dtype or above (NOTE [Bounded domains]). The log-det is
    ``sum(log sigmoid(x))``.

    Returns:
        An :class:`~invfunc.Invertible` declared ``ladj=True``: ``(y, ladj)``.

    Examples:
        >>> import torch, invfunc as inv
        >>> from invfunc import ops
        >>> x = torch.tensor([[0.0, 3.0]], dtype=torch.float64)
        >>> y, ladj = ops.softplus()(x)
        >>> y
        tensor([[0.6931, 3.0486]], dtype=torch.float64)
        >>> ladj  # log(0.5) + log(sigmoid(3))
        tensor([-0.7417], dtype=torch.float64)
        >>> ops.softplus().inverse(y)[0]
        tensor([[0., 3.]], dtype=torch.float64)
    """
    return make_op(Softplus(), "softplus", ladj=True)
