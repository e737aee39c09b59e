"""Reports of what invertible calls freed, kept and rebuilt: :func:`explain`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["explain"]


class _Explain:
    def __init__(self) -> None:
        self.kept: list[tuple[str, int, str]] = []
        self.freed: list[tuple[str, int, int]] = []
        self.drift: list[tuple[str, int, float]] = []
        self.choices: list[tuple[str, int, int]] = []
        self.flipped: list[tuple[str, int]] = []
        self.diverged: list[tuple[str, str, str]] = []
        self.open = True


class _OpenReports(threading.local):
    def __init__(self) -> None:
        self.reports: list[_Explain] = []


_LOCAL_REPORTS = _OpenReports()


def _reports() -> list[_Explain]:
    """The explain() regions open in this thread (calls report where they run; a
    backward reports drift to the regions its forward ran in, while they are open)."""
    return _LOCAL_REPORTS.reports


@contextmanager
def explain() -> Iterator[_Explain]:
    """Collect, for every invertible call in the region, which inputs were freed or kept and why.

    Yields an object with these lists, filled by the calls made in the region (and by
    their backward, if it runs before the region closes):

    - ``freed``: ``(call, input index, bytes)`` of every input freed;
    - ``kept``: ``(call, input index, reason)`` of every input kept (index -1: the whole
      call keeps its inputs);
    - ``choices``: ``(call, number, bytes)``: the discrete choices (argmax, topk indices,
      comparisons...) a block keeps from its forward to replay in backward (see
      "Discrete choices" in the sharp bits);
    - ``flipped``: ``(call, number)``: elements of choices (indices, mask bits, Python
      values) the recompute would have made otherwise, and was handed the forward's;
    - ``diverged``: ``(call, section, what)``: recomputes that did not reproduce the
      forward (warned about, or raised under ``verify("raise")``);
    - ``drift``: ``(call, input index, relative error of the rebuilt input)``, under
      :func:`invfunc.verify`.

    Calls are named by their block (``"couple(F, G), block 2 of 8"`` in a chain). The
    region covers the calls of the thread that opened it (as :func:`invfunc.mode` and
    :func:`invfunc.verify` do), wherever their backward runs.

    Examples:
        >>> import torch, invfunc as inv
        >>> block = inv.couple(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> x = torch.randn(3, 4, requires_grad=True)
        >>> with inv.explain() as report:
        ...     y = inv.invertible_call(block, x)       # a leaf: kept
        ...     z = inv.invertible_call(block, y * 2)   # a temporary: freed
        >>> for call, index, reason in report.kept:
        ...     print(index, reason)
        0 it is a leaf (user data or a parameter); data leaves are freed only when named in free=
        >>> report.freed
        [('couple(Linear, Linear)', 0, 48)]
    """
    rep = _Explain()
    _reports().append(rep)
    try:
        yield rep
    finally:
        rep.open = False
        _reports().remove(rep)
