"""Ready invertible ops for flows and reversible networks (NOTE [Ops] in ``_op.py``).

Every op is a factory returning an :class:`~invfunc.Invertible` that owns its
parameters (reachable through :func:`invfunc.as_module`) and composes with
:func:`invfunc.chain` and :func:`invfunc.couple`. Ops that change volume return
``(y, ladj)`` (NOTE [Log-determinants]); volume-preserving ones return ``y``.
"""

from .couplings import affine_coupling, custom_coupling, momentum_coupling
from .elementwise import exp, leaky_relu, log, logit, sigmoid, softplus, tanh
from .linear import actnorm, conv1x1, lu_linear, orthogonal
from .permute import permutation, reverse, shuffle
from .reshape import checkerboard, concat, split, squeeze, unsqueeze

__all__ = [
    "actnorm",
    "affine_coupling",
    "checkerboard",
    "concat",
    "conv1x1",
    "custom_coupling",
    "exp",
    "leaky_relu",
    "log",
    "logit",
    "lu_linear",
    "momentum_coupling",
    "orthogonal",
    "permutation",
    "reverse",
    "shuffle",
    "sigmoid",
    "softplus",
    "split",
    "squeeze",
    "tanh",
    "unsqueeze",
]
