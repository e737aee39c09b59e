"""Rearrangements of an image or a tensor's halves: volume-preserving ops (NOTE [Ops]).

Every op here moves values without changing them (its Jacobian is a permutation
matrix), so each is declared ``ladj=0`` and returns its data alone. Every output owns
its storage (a copy, never a view of the input), so that :func:`invfunc.invertible_call`
can free the input.

Masks for couplings: the channel mask is :func:`invfunc.couple`'s own split along
``dim=1`` (the first half of the channels, then the second); the checkerboard mask is
:func:`checkerboard` followed by that coupling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._core import Invertible
from ._op import channel_dim, make_op
from .permute import _check_dim, _check_int, _with_dim, own

__all__ = ["checkerboard", "concat", "split", "squeeze", "unsqueeze"]


def _image(t: torch.Tensor, where: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of an input ``(..., C, H, W)``, or a clear error."""
    if t.dim() < 3:
        raise ValueError(
            f"invfunc.ops.{where}: expects an image batch (B, C, H, W), got shape {tuple(t.shape)}."
        )
    c, h, w = t.shape[-3:]
    return c, h, w


def _space_to_depth(t: torch.Tensor, f: int, where: str) -> torch.Tensor:
    _, h, w = _image(t, where)
    if h % f or w % f:
        raise ValueError(
            f"invfunc.ops.{where}: the height and width must be divisible by factor={f}, "
            f"got shape {tuple(t.shape)}; pad or crop the input."
        )
    return own(F.pixel_unshuffle(t, f), t)


def _depth_to_space(t: torch.Tensor, f: int, where: str) -> torch.Tensor:
    c, _, _ = _image(t, where)
    if c % (f * f):
        raise ValueError(
            f"invfunc.ops.{where}: the channels must be divisible by factor**2={f * f}, "
            f"got shape {tuple(t.shape)}."
        )
    return own(F.pixel_shuffle(t, f), t)


class Squeeze(nn.Module):
    """Space-to-depth by ``factor`` (see :func:`squeeze`)."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _space_to_depth(x, self.factor, f"squeeze({self.factor})")

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return _depth_to_space(y, self.factor, f"squeeze({self.factor})")


class Unsqueeze(nn.Module):
    """Depth-to-space by ``factor`` (see :func:`unsqueeze`)."""

    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _depth_to_space(x, self.factor, f"unsqueeze({self.factor})")

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return _space_to_depth(y, self.factor, f"unsqueeze({self.factor})")


def _half_sizes(n: int) -> list[int]:
    """The sizes of the halves of ``n``: ``n // 2`` and ``n - n // 2``, as
    :func:`invfunc.couple` splits an odd size."""
    return [n // 2, n - n // 2]


def _halves(x: torch.Tensor, dim: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    d = channel_dim(dim, x.dim(), where)
    n = x.size(d)
    if n < 2:
        raise ValueError(
            f"invfunc.ops.{where}: splitting into two halves needs a size of at least 2 along "
            f"dim {dim}, got shape {tuple(x.shape)}."
        )
    a, b = x.split_with_sizes(_half_sizes(n), d)
    # copies: two views of x would keep x alive under invertible_call
    return a.clone(memory_format=torch.contiguous_format), b.clone(memory_format=torch.contiguous_format)


def _join(a: torch.Tensor, b: torch.Tensor, dim: int, where: str) -> torch.Tensor:
    d = channel_dim(dim, a.dim(), where)
    if b.dim() != a.dim():
        raise ValueError(
            f"invfunc.ops.{where}: the halves must have the same number of dimensions, got shapes "
            f"{tuple(a.shape)} and {tuple(b.shape)}."
        )
    n = a.size(d) + b.size(d)
    if [a.size(d), b.size(d)] != _half_sizes(n):
        raise ValueError(
            f"invfunc.ops.{where}: joins the halves that split makes, of sizes n // 2 and n - n // 2 "
            f"along dim {dim}, so that its inverse can split them again; got sizes {a.size(d)} and "
            f"{b.size(d)} (shapes {tuple(a.shape)} and {tuple(b.shape)})."
        )
    return torch.cat([a, b], d)


class Split(nn.Module):
    """One tensor to its two halves along ``dim`` (see :func:`split`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _halves(x, self.dim, _with_dim("split", self.dim))

    def inverse(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _join(a, b, self.dim, _with_dim("split", self.dim))


class Concat(nn.Module):
    """Two halves to one tensor along ``dim`` (see :func:`concat`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _join(a, b, self.dim, _with_dim("concat", self.dim))

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _halves(y, self.dim, _with_dim("concat", self.dim))


def _odd_rows(t: torch.Tensor) -> torch.Tensor:
    """A ``(H, 1)`` mask of the odd rows of ``t`` (``(..., H, W)``), to broadcast over ``W``."""
    h = t.size(-2)
    return (torch.arange(h, device=t.device) % 2 == 1).view(h, 1)


class Checkerboard(nn.Module):
    """The squares of a checkerboard gathered into channels (see :func:`checkerboard`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, w = _image(x, "checkerboard")
        if w % 2:
            raise ValueError(
                f"invfunc.ops.checkerboard: the width must be even, got shape {tuple(x.shape)}; "
                "pad or crop the input."
            )
        odd_rows = _odd_rows(x)
        even_w, odd_w = x[..., 0::2], x[..., 1::2]
        white = torch.where(odd_rows, odd_w, even_w)  # (h + w) even
        black = torch.where(odd_rows, even_w, odd_w)  # (h + w) odd
        return torch.cat([white, black], -3)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        c2, _, _ = _image(y, "checkerboard")
        if c2 % 2:
            raise ValueError(
                f"invfunc.ops.checkerboard: the inverse takes 2C channels (the two colours), got "
                f"shape {tuple(y.shape)}."
            )
        white, black = y.split_with_sizes([c2 // 2, c2 // 2], -3)
        odd_rows = _odd_rows(y)
        even_w = torch.where(odd_rows, black, white)
        odd_w = torch.where(odd_rows, white, black)
        return own(torch.stack([even_w, odd_w], -1).flatten(-2), y)  # (a view of the stack: copied)


def squeeze(factor: int = 2) -> Invertible:
    """Space-to-depth: ``(B, C, H, W)`` to ``(B, C * factor**2, H / factor, W / factor)``,
    each ``factor x factor`` patch moved into channels, as Glow and i-RevNet squeeze.

    Output channel ``c * factor**2 + i * factor + j`` holds ``x[:, c, factor * h + i,
    factor * w + j]``: Glow's order, and :func:`torch.nn.functional.pixel_unshuffle`'s.
    (i-RevNet's ``psi`` orders the same channels differently, a fixed permutation.) Its
    inverse is :func:`unsqueeze`.

    Args:
        factor: the patch size, an int >= 1; H and W must be divisible by it.

    Returns:
        An :class:`~invfunc.Invertible` declared ``ladj=0`` (volume-preserving).

    Raises:
        ValueError: if ``factor`` is not an int >= 1; at the call, if the input is not an
            image batch or its height or width is not divisible by ``factor``.

    Examples:
        >>> import torch, invfunc as inv
        >>> from invfunc import ops
        >>> x = torch.arange(16.0).view(1, 1, 4, 4)
        >>> y = ops.squeeze(2)(x)
        >>> y.shape
        torch.Size([1, 4, 2, 2])
        >>> y[0, :, 0, 0]  # the top-left 2 x 2 patch
        tensor([0., 1., 4., 5.])
        >>> torch.equal(ops.squeeze(2).inverse(y), x)
        True
    """
    factor = _check_int(factor, 1, "squeeze", "factor")
    return make_op(Squeeze(factor), f"squeeze({factor})", ladj=False)


def unsqueeze(factor: int = 2) -> Invertible:
    """Depth-to-space: ``(B, C * factor**2, H, W)`` to ``(B, C, H * factor, W * factor)``,
    the inverse of :func:`squeeze` (:func:`torch.nn.functional.pixel_shuffle`).

    Args:
        factor: the patch size, an int >= 1; the channels must be divisible by
            ``factor**2``.

    Returns:
        An :class:`~invfunc.Invertible` declared ``ladj=0`` (volume-preserving).

    Raises:
        ValueError: if ``factor`` is not an int >= 1; at the call, if the input is not an
            image batch or its channels are not divisible by ``factor**2``.

    Examples:
        >>> import torch, invfunc as inv
        >>> from invfunc import ops
        >>> y = torch.randn(2, 8, 3, 3)
        >>> x = ops.unsqueeze(2)(y)
        >>> x.shape
        torch.Size([2, 2, 6, 6])
        >>> torch.equal(ops.squeeze(2)(x), y)
        True
    """
    factor = _check_int(factor, 1, "unsqueeze", "factor")
    return make_op(Unsqueeze(factor), f"unsqueeze({factor})", ladj=False)


def split(dim: int = 1) -> Invertible:
    """One tensor to its two halves along ``dim``: sizes ``n // 2`` and ``n - n // 2``, as
    :func:`invfunc.couple` splits a single input. Its inverse is :func:`concat`.

    Each half is a copy that owns its storage (not a view of the input), so the input
    can be freed under :func:`invfunc.invertible_call` and the halves passed on as a pair.

    Args:
        dim: the dimension to split: 1, the channels of ``(B, C, ...)``, by default.

    Returns:
        An :class:`~invfunc.Invertible` of two outputs, declared ``ladj=0``.

    Raises:
        ValueError: if ``dim`` is not an int; at the call, if it is out of range or the
            size along it is below 2.

    Examples:
        >>> import torch, invfunc as inv
        >>> from invfunc import ops
        >>> x = torch.arange(10.0).view(2, 5)
        >>> a, b = ops.split()(x)
        >>> a
        tensor([[0., 1.],
                [5., 6.]])
        >>> b.shape
        torch.Size([2, 3])
        >>> torch.equal(ops.split().inverse(a, b), x)
        True
    """
    dim = _check_dim(dim, "split")
    return make_op(Split(dim), _with_dim("split", dim), ladj=False, n_inputs=1, n_outputs=2)


def concat(dim: int = 1) -> Invertible:
    """A pair of halves to one tensor along ``dim``: the inverse of :func:`split`.

    The halves must have the sizes that :func:`split` makes, ``n // 2`` and ``n - n // 2``
    (equal, or the second one larger by one), so that the inverse can split them again.

    Args:
        dim: the dimension to join along: 1, the channels of ``(B, C, ...)``, by default.

    Returns:
        An :class:`~invfunc.Invertible` of two inputs and one output, declared ``ladj=0``.

    Raises:
        ValueError: if ``dim`` is not an int; at the call, if it is out of range or the
            halves' sizes are not ``n // 2`` and ``n - n // 2``.

    Examples:
        >>> import torch, invfunc as inv
        >>> from invfunc import ops
        >>> a, b = torch.zeros(2, 3), torch.ones(2, 3)
        >>> y = ops.concat()(a, b)
        >>> y.shape
        torch.Size([2, 6])
        >>> a2, b2 = ops.concat().inverse(y)
        >>> torch.equal(a2, a) and torch.equal(b2, b)
        True
    """
    dim = _check_dim(dim, "concat")
    return make_op(Concat(dim), _with_dim("concat", dim), ladj=False, n_inputs=2, n_outputs=1)


def checkerboard() -> Invertible:
    """The two colours of a checkerboard gathered into channels: ``(B, C, H, W)`` with an
    even ``W`` to ``(B, 2C, H, W / 2)``.

    Channels ``[0, C)`` hold the squares where ``h + w`` is even, row by row in order of
    ``w``; channels ``[C, 2C)`` those where it is odd. Followed by ``inv.couple(F, G,
    dim=1)``, which splits the channels into these halves, it makes Real NVP's
    checkerboard-masked coupling (F and G see the squares of one colour). The inverse
    scatters the squares back. (The channel mask needs no op: it is the coupling's own
    split along ``dim=1``.)

    Returns:
        An :class:`~invfunc.Invertible` declared ``ladj=0`` (volume-preserving).

    Raises:
        ValueError: at the call, if the input is not an image batch or its width is odd
            (for the inverse: if its channels are odd).

    Examples:
        >>> import torch, invfunc as inv
        >>> from invfunc import ops
        >>> x = torch.arange(8.0).view(1, 1, 2, 4)
        >>> x
        tensor([[[[0., 1., 2., 3.],
                  [4., 5., 6., 7.]]]])
        >>> y = ops.checkerboard()(x)
        >>> y
        tensor([[[[0., 2.],
                  [5., 7.]],
        <BLANKLINE>
                 [[1., 3.],
                  [4., 6.]]]])
        >>> torch.equal(ops.checkerboard().inverse(y), x)
        True
        >>> block = inv.chain(ops.checkerboard(), inv.couple(torch.nn.Conv2d(1, 1, 3, padding=1)))
        >>> torch.allclose(block.inverse(block(x)), x)
        True
    """
    return make_op(Checkerboard(), "checkerboard", ladj=False)
