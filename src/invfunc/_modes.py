"""Execution modes of :func:`invfunc.invertible_call` and the ``mode`` context manager."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Literal

from ._errors import check_choice

__all__ = ["MODES", "Mode", "check_mode", "current_mode", "mode"]

Mode = Literal["invertible", "checkpoint", "plain"]

#: The valid modes and what each does.
MODES: dict[str, str] = {
    "invertible": "free the inputs after the forward; rebuild them with the inverse in backward",
    "checkpoint": "keep the inputs; recompute the intermediates in backward",
    "plain": "ordinary autograd: keep everything",
}

_state = threading.local()


def check_mode(value: object, where: str) -> Mode:
    """Return ``value`` if it names a mode, else raise a ValueError naming ``where``."""
    return check_choice(value, MODES, where, "mode", "modes")  # type: ignore[return-value]


def current_mode() -> Mode:
    """The mode in force in this thread (``"invertible"`` unless set by :func:`mode`).

    Examples:
        >>> import invfunc as inv
        >>> inv.current_mode()
        'invertible'
        >>> with inv.mode("checkpoint"):
        ...     inv.current_mode()
        'checkpoint'
    """
    return getattr(_state, "mode", "invertible")  # type: ignore[no-any-return]


@contextlib.contextmanager
def mode(value: Mode) -> Iterator[None]:
    """Set the mode of every :func:`invfunc.invertible_call` in a region (this thread only).

    Args:
        value: ``"invertible"`` (free inputs, rebuild them with the inverse),
            ``"checkpoint"`` (keep inputs, recompute intermediates) or ``"plain"``
            (ordinary autograd). A call's own ``mode=`` argument overrides it.

    Examples:
        >>> import torch, invfunc as inv
        >>> block = inv.couple(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> x = torch.randn(3, 4, requires_grad=True)
        >>> with inv.mode("plain"):
        ...     y = inv.invertible_call(block, x)
        >>> y.grad_fn.name()
        'CatBackward0'
    """
    checked = check_mode(value, "invfunc.mode(value)")
    previous = current_mode()
    _state.mode = checked
    try:
        yield
    finally:
        _state.mode = previous
