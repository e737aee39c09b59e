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
6. An op whose module reads nothing but its own parameters (every op but the couplings,
   whose ``net`` is the user's code) is found without running it (NOTE [Static
   discovery]): the engine neither records its forward nor replays it through the
   tracer, in both directions. That is a Python call per torch op saved, which on small
   tensors is most of an op's cost.
7. Such an op may give its module a ``backward_from_output(y, g_y, g_ladj, x)`` method
   (``x``: the kept input, or None): the input rebuilt from ``y`` (when ``x`` is None),
   its gradient and its parameters' gradients (in ``parameters()`` order), in closed
   form. The engine then rebuilds and differentiates the op in one pass, without
   re-running it under autograd (ActNorm, the 1x1 convolution). Only when backward builds
   no graph (no ``create_graph``, no torch.func) and the parameters are those the
   forward read; otherwise the generic backward runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._core import Invertible
from .._reuse import movable
from .._state import BlockState
from .._vjp import _fast_path

__all__ = ["OwnParameters", "channel_dim", "make_op", "sum_per_sample"]


class OwnParameters(Invertible):
    """An op (or its inverse) whose module reads nothing but its own parameters (NOTE
    [Ops], rule 6)."""

    @property
    def _module(self) -> nn.Module:
        return self._fn.__self__  # type: ignore[attr-defined,no-any-return]

    def _static_sections(self) -> dict[str, tuple[list[torch.Tensor], bool]] | None:
        return {"": (self._static_reads(""), False)}

    def _static_reads(self, section: str) -> list[torch.Tensor]:
        return [p for p in self._module.parameters() if p.requires_grad]

    def _fused_backward(
        self,
        state: BlockState,
        outs: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        explicit: Sequence[torch.Tensor],
        captured: Sequence[torch.Tensor],
        needs: Sequence[bool],
        own: Sequence[bool],
    ) -> list[torch.Tensor | None] | None:
        """NOTE [Ops], rule 7: the closed-form backward of a map linear in its input."""
        backward = getattr(self._module, "backward_from_output", None)
        params = self._static_reads("")
        if (
            backward is None
            or self._is_inverse
            or explicit
            or len(outs) != 1
            or not _fast_path(*outs, *grads)
            or len(params) != len(captured)
            or any(p is not c for p, c in zip(params, captured))  # (swapped: the generic backward)
        ):
            return None
        live = state.live_inputs()[0] if state.live else None
        g_ladj = grads[1] if self._ladj is True else None
        x, g_x, g_params = backward(outs[0].detach(), grads[0], g_ladj, live)
        if live is None:
            rebuilt = [x]
            del x
            state.settle(rebuilt, move=movable)
            del rebuilt
        state.release_output()
        return [g_x if needs[0] else None] + [g if n else None for g, n in zip(g_params, needs[1:])]

    def _inverse_type(self) -> type[Invertible]:
        return OwnParameters


def make_op(
    module: nn.Module,
    name: str,
    *,
    ladj: bool,
    n_inputs: int = 1,
    n_outputs: int = 1,
    block: type[Invertible] = OwnParameters,
) -> Invertible:
    """The Invertible of an op module (NOTE [Ops]): ``module.forward`` paired with
    ``module.inverse``, named ``name``. ``block`` is the Invertible type: by default one
    that reads only the module's own parameters (rule 6); ``Invertible`` for an op that
    runs the user's code, or a type with a fused backward of its own (the affine coupling)."""
    inverse = getattr(module, "inverse")  # noqa: B009  (nn.Module's __getattr__ is typed loosely)
    return block(
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
