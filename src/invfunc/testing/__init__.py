"""Test helpers for invertible functions: checks against plain autograd, hypothesis strategies.

:func:`check_inverse` and :func:`check_grads` raise an :class:`AssertionError` that says
where and by how much, and never return a bare bool. The hypothesis strategies live in
:mod:`invfunc.testing.strategies`, which needs ``hypothesis`` (the ``testing`` extra);
this module itself does not, and imports that one only when it is first used.

Examples:
    >>> import torch, invfunc as inv
    >>> from invfunc.testing import check_inverse, check_grads
    >>> shift = inv.invertible(lambda x: x + 1, inverse=lambda y: y - 1)
    >>> x = torch.randn(3, dtype=torch.float64)
    >>> check_inverse(shift, x)
    >>> check_grads(shift, x)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._checks import check_grads, check_inverse, default_rtol, find_parameters

if TYPE_CHECKING:
    from . import strategies

__all__ = ["check_grads", "check_inverse", "default_rtol", "find_parameters", "strategies"]


def __getattr__(name: str) -> Any:
    if name == "strategies":  # needs hypothesis: imported on first use
        return importlib.import_module(f"{__name__}.strategies")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
