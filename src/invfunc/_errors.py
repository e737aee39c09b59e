"""The project's error types."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["FreedTensorError", "InvfuncError"]


class InvfuncError(RuntimeError):
    """Raised when invfunc cannot honour a call without risking a wrong result.

    Every message starts with the public entry point that failed, says what was
    received and how to fix it.

    Examples:
        >>> import invfunc as inv
        >>> issubclass(inv.InvfuncError, RuntimeError)
        True
    """


class FreedTensorError(InvfuncError):
    """Raised on access to a tensor whose storage was freed and can no longer be rebuilt.

    This happens when a tensor freed by :func:`invfunc.invertible_call` is read after
    the graph that could rebuild it was dropped (for example after ``del loss``
    without a backward). Pass the tensor in ``keep=`` to keep it.

    Examples:
        >>> import invfunc as inv
        >>> issubclass(inv.FreedTensorError, inv.InvfuncError)
        True
    """


class InvertibilityWarning(UserWarning):
    """Warned when a rebuilt input drifts past the tolerance under ``invfunc.verify("warn")``.

    Examples:
        >>> import invfunc as inv
        >>> issubclass(inv.InvertibilityWarning, UserWarning)
        True
    """


def check_choice(value: object, table: Mapping[str, str], where: str, what: str, plural: str) -> str:
    """Return ``value`` if it is a key of ``table``, else a ValueError that names ``where``
    and lists the valid values (one table per enumerated option)."""
    if isinstance(value, str) and value in table:
        return value
    valid = ", ".join(repr(k) for k in table)
    raise ValueError(f"{where}: unknown {what} {value!r}; valid {plural} are {valid}.")
