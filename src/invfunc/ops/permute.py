"""Permutations of one dimension: volume-preserving ops (NOTE [Ops]).

A permutation moves values without changing them: its Jacobian is a permutation
matrix, ``|det| = 1``, so every op here is declared ``ladj=0`` and returns ``y`` alone.
Each output is a new tensor that owns its storage (never a view of the input), so that
:func:`invfunc.invertible_call` can free the input.
"""

from __future__ import annotations

import torch
from torch import nn

from .._compat import is_view
from .._core import Invertible
from ._op import channel_dim, make_op

__all__ = ["permutation", "reverse", "shuffle"]


def own(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y``, copied if it is ``x`` or a view (an identity permutation, a reshape that is a
    view): an output that owns its storage never keeps the input alive, and can itself be
    freed by the next block under :func:`invfunc.invertible_call`."""
    if y is x or is_view(y):
        return y.clone(memory_format=torch.contiguous_format)
    return y


def _check_int(value: object, least: int, where: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"invfunc.ops.{where}: {what} must be an int >= {least}, got {value!r}.")
    return value


def _check_dim(dim: object, where: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ValueError(f"invfunc.ops.{where}: dim must be an int, got {dim!r}.")
    return dim


def _with_dim(call: str, dim: int) -> str:
    """The op's name: its factory call, with ``dim`` shown where it is not the default."""
    if dim == 1:
        return call
    return f"{call[:-1]}, dim={dim})" if call.endswith(")") else f"{call}(dim={dim})"


class Reverse(nn.Module):
    """Reverses the order along ``dim`` (see :func:`reverse`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(channel_dim(self.dim, x.dim(), "reverse"))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.forward(y)


class Permutation(nn.Module):
    """A fixed permutation along ``dim`` (see :func:`permutation`).

    Attributes:
        perm: the permutation, a buffer: ``y = x.index_select(dim, perm)``.
        inverse_perm: its inverse, a buffer: ``perm[inverse_perm] == arange``.
    """

    perm: torch.Tensor
    inverse_perm: torch.Tensor

    def __init__(self, perm: torch.Tensor, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))

    def _apply_perm(self, t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        d = channel_dim(self.dim, t.dim(), "permutation")
        if t.size(d) != len(index):
            raise ValueError(
                f"invfunc.ops.permutation({len(index)}, dim={self.dim}): expected an input of size "
                f"{len(index)} along dim {self.dim}, got shape {tuple(t.shape)}."
            )
        return t.index_select(d, index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_perm(x, self.perm)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self._apply_perm(y, self.inverse_perm)


class Shuffle(nn.Module):
    """The channel shuffle of ShuffleNet along ``dim`` (see :func:`shuffle`)."""

    def __init__(self, groups: int, dim: int) -> None:
        super().__init__()
        self.groups = groups
        self.dim = dim

    def _shuffle(self, t: torch.Tensor, rows: bool) -> torch.Tensor:
        d = channel_dim(self.dim, t.dim(), "shuffle")
        c, g = t.size(d), self.groups
        if c % g:
            raise ValueError(
                f"invfunc.ops.shuffle({g}): the size along dim {self.dim} must be divisible by "
                f"groups={g}, got shape {tuple(t.shape)}."
            )
        shape = (g, c // g) if rows else (c // g, g)
        grid = t.reshape(*t.shape[:d], *shape, *t.shape[d + 1 :])
        return own(grid.transpose(d, d + 1).flatten(d, d + 1), t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._shuffle(x, rows=True)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self._shuffle(y, rows=False)


def reverse(dim: int = 1) -> Invertible:
    """Reverses the order of the entries along ``dim`` (Real NVP's and Glow's fixed
    alternative to a learnt permutation); it is its own inverse.

    Args:
        dim: the dimension to reverse: 1, the channels of ``(B, C, ...)``, by default;
            -1 for channels-last.

    Returns:
        An :class:`~invfunc.Invertible` declared ``ladj=0`` (volume-preserving).

    Raises:
        ValueError: if ``dim`` is not an int; at the call, if it is out of range.

    Examples:
        >>> import torch, invfunc as inv
        >>> from invfunc import ops
        >>> op = ops.reverse()
        >>> x = torch.arange(6.0).view(2, 3)
        >>> op(x)
        tensor([[2., 1., 0.],
                [5., 4., 3.]])
        >>> torch.equal(op.inverse(op(x)), x)
        True
    """
    dim = _check_dim(dim, "reverse")
    return make_op(Reverse(dim), _with_dim("reverse", dim), ladj=False)


def permutation(num_features: int, dim: int = 1, *, generator: torch.Generator | None = None) -> Invertible:
    """A fixed random permutation of the ``num_features`` entries along ``dim``.

    The permutation is drawn once, when the op is made, and stored with its inverse as
    buffers of the op's module (``perm`` and ``inverse_perm``, reachable through
    :func:`invfunc.as_module`): they move with ``.to()`` and are saved in its
    ``state_dict``, and are not trained.

    Args:
        num_features: the size of ``dim``, an int >= 1.
        dim: the dimension to permute: 1, the channels of ``(B, C, ...)``, by default.
        generator: a :class:`torch.Generator` to draw the permutation from, for
            reproducibility; None uses the global generator.

    Returns:
        An :class:`~invfunc.Invertible` declared ``ladj=0`` (volume-preserving).

    Raises:
        ValueError: if ``num_features`` is not an int >= 1 or ``dim`` not an int; at the
            call, if the input's size along ``dim`` is not ``num_features``.

    Examples:
        >>> import torch, invfunc as inv
        >>> from invfunc import ops
        >>> op = ops.permutation(4, generator=torch.Generator().manual_seed(1))
        >>> x = torch.arange(8.0).view(2, 4)
        >>> y = op(x)
        >>> y
        tensor([[1., 3., 2., 0.],
                [5., 7., 6., 4.]])
        >>> torch.equal(op.inverse(y), x)
        True
        >>> inv.as_module(op).get_buffer("module.perm")
        tensor([1, 3, 2, 0])
    """
    num_features = _check_int(num_features, 1, "permutation", "num_features")
    dim = _check_dim(dim, "permutation")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(
            "invfunc.ops.permutation: generator must be a torch.Generator or None, got "
            f"{type(generator).__name__}."
        )
    device = generator.device if generator is not None else None
    perm = torch.randperm(num_features, generator=generator, device=device)
    return make_op(Permutation(perm, dim), _with_dim(f"permutation({num_features})", dim), ladj=False)


def shuffle(groups: int, dim: int = 1) -> Invertible:
    """The channel shuffle of ShuffleNet: ``C = groups * k`` channels, viewed as a
    ``(groups, k)`` grid, are read out column by column, so channel ``i * k + j`` moves to
    ``j * groups + i``. Its inverse reads the ``(k, groups)`` grid the same way.

    Interleaving groups lets a following :func:`invfunc.couple` mix channels that the
    previous one kept apart.

    Args:
        groups: the number of groups, an int >= 1; the size along ``dim`` must be
            divisible by it.
        dim: the dimension to shuffle: 1, the channels of ``(B, C, ...)``, by default.

    Returns:
        An :class:`~invfunc.Invertible` declared ``ladj=0`` (volume-preserving).

    Raises:
        ValueError: if ``groups`` is not an int >= 1 or ``dim`` not an int; at the call,
            if the size along ``dim`` is not divisible by ``groups``.

    Examples:
        >>> import torch, invfunc as inv
        >>> from invfunc import ops
        >>> op = ops.shuffle(2)
        >>> x = torch.arange(6.0).view(1, 6)
        >>> op(x)
        tensor([[0., 3., 1., 4., 2., 5.]])
        >>> torch.equal(op.inverse(op(x)), x)
        True
    """
    groups = _check_int(groups, 1, "shuffle", "groups")
    dim = _check_dim(dim, "shuffle")
    return make_op(Shuffle(groups, dim), _with_dim(f"shuffle({groups})", dim), ladj=False)
