"""What every op shares: a module that owns its parameters, paired as an Invertible.

NOTE [Ops]

1. An op is an ``nn.Module`` with ``forward`` and ``inverse`` methods, made into an
   :class:`~invfunc.Invertible` by :func:`make_op`: its functions are the module's bound
   methods, so :func:`invfunc.as_module` and :func:`invfunc.testing.find_parameters` reach
   the module (its parameters and buffers), ``copy.deepcopy`` copies it with the op, and
   ``.to()`` moves it.
2. Parameters are created in the default dtype (``torch.get_default_dtype()``); fixed
   tensors (a permutation, a mask) are buffers, not parameters.
3. An op that changes volume is declared ``ladj=True``: ``forward`` returns ``(y, ladj)``
   and ``inverse`` ``(x, ladj_inverse)``, ``ladj`` of shape ``(batch,)``, the log|det| of
   the Jacobian per sample (NOTE [Log-determinants]). A volume-preserving op is declared
   ``ladj=0`` and returns ``y`` alone.
4. Ops take ``dim`` (default 1, the channels of ``(B, C, ...)``) where they act on one
   dimension, as :func:`invfunc.couple` does; ``dim=-1`` for channels-last.
5. Each op names itself after its factory call (``actnorm(8)``), for errors and explain().
"""

from __future__ import annotations

import torch
from torch import nn

from .._core import Invertible

__all__ = ["channel_dim", "make_op", "sum_per_sample"]


def make_op(module: nn.Module, name: str, *, ladj: bool, n_inputs: int = 1, n_outputs: int = 1) -> Invertible:
    """The Invertible of an op module (NOTE [Ops]): ``module.forward`` paired with
    ``module.inverse``, named ``name``."""
    inverse = getattr(module, "inverse")  # noqa: B009  (nn.Module's __getattr__ is typed loosely)
    return Invertible(
        module.forward,
        inverse,
        n_inputs=n_inputs,
        n_outputs=n_outputs,
        ladj=True if ladj else 0,
        name=name,
        wraps=False,
    )


def channel_dim(dim: int, x_dim: int, where: str) -> int:
    """``dim`` as a non-negative index for an input of ``x_dim`` dimensions, or a clear error."""
    if not -x_dim <= dim < x_dim:
        raise ValueError(
            f"invfunc.ops.{where}: dim={dim} is out of range for an input of {x_dim} dimension(s); "
            f"pass dim= with the channel dimension (1 for (B, C, ...), -1 for channels-last)."
        )
    return dim % x_dim


def sum_per_sample(t: torch.Tensor) -> torch.Tensor:
    """``t`` of shape ``(batch, ...)`` summed over every dimension but the first: ``(batch,)``."""
    return t.reshape(t.shape[0], -1).sum(1)
