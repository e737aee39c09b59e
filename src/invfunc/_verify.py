"""Drift checks: fingerprints of a block's inputs compared with their reconstruction.

NOTE [Fingerprints]

With verification on, each block's data inputs are fingerprinted in the forward, before
anything is freed: up to 256 elements at evenly spaced positions and the norm, in float64.
When backward (or a read of a freed tensor) rebuilds the inputs by the inverse, the same
positions and the norm are compared; the relative error is the larger of the worst
sampled element error (over the largest sampled magnitude) and the relative norm error.
It is reported to :func:`invfunc.explain` collectors as ``drift`` and, above the
tolerance for the dtype, warned about or raised, per the policy. Cost: one small gather
and a norm per input in the forward, the same in backward; nothing when off.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Literal

import torch

from ._errors import InvertibilityWarning, InvfuncError, check_choice

__all__ = ["DEFAULT_RTOL", "POLICIES", "Fingerprint", "check_policy", "current_policy", "verify"]

Policy = Literal["off", "warn", "raise"]

#: The verification policies.
POLICIES: dict[str, str] = {
    "off": "no fingerprints (default)",
    "warn": "warn with InvertibilityWarning when a rebuilt input drifts past the tolerance",
    "raise": "raise InvfuncError when a rebuilt input drifts past the tolerance",
}

#: Default relative tolerance per dtype.
DEFAULT_RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-8,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}

_state = threading.local()


def check_policy(value: object, where: str) -> Policy:
    return check_choice(value, POLICIES, where, "verification policy", "policies")  # type: ignore[return-value]


def current_policy() -> tuple[Policy, float | None]:
    """The verification policy and tolerance in force in this thread."""
    return getattr(_state, "policy", ("off", None))  # type: ignore[no-any-return]


@contextlib.contextmanager
def verify(policy: Policy = "raise", *, rtol: float | None = None) -> Iterator[None]:
    """Check, in backward, that every rebuilt input matches what the forward saw.

    Each block's inputs are fingerprinted in the forward (NOTE [Fingerprints]); when the
    inverse rebuilds them, the relative error is compared with ``rtol`` (default per
    dtype: 1e-8 for float64, 1e-4 for float32, 1e-2 for float16, 5e-2 for bfloat16).
    The policy applies to calls made in the region; their backward may run later.

    Args:
        policy: ``"raise"`` (InvfuncError), ``"warn"`` (InvertibilityWarning) or ``"off"``.
        rtol: the relative tolerance, or None for the dtype's default.

    Examples:
        >>> import torch, invfunc as inv
        >>> wrong = inv.invertible(lambda x: x * 2, inverse=lambda y: y / 2 + 1e-3)
        >>> x = torch.ones(4, requires_grad=True)
        >>> with inv.verify("raise"):
        ...     y = inv.invertible_call(wrong, x * 1)
        >>> try:
        ...     y.sum().backward()
        ... except inv.InvfuncError as e:
        ...     print(str(e)[:75])
        invfunc.invertible_call(<lambda>) backward: input 0 was rebuilt by the inve
    """
    checked = check_policy(policy, "invfunc.verify(policy)")
    if rtol is not None and not (isinstance(rtol, float) and rtol > 0):
        raise ValueError(f"invfunc.verify(policy, rtol=...): rtol must be a positive float, got {rtol!r}.")
    previous = current_policy()
    _state.policy = (checked, rtol)
    try:
        yield
    finally:
        _state.policy = previous


class Fingerprint:
    """Sampled elements and the norm of one input (NOTE [Fingerprints])."""

    __slots__ = ("dtype", "index", "norm", "samples")

    @staticmethod
    def supports(t: torch.Tensor) -> bool:
        """Whether ``t``'s values can be sampled: a plain dense CPU/CUDA tensor. Others
        (meta, sparse, nested, quantized, fake, subclasses) are never freed, hence never
        rebuilt, and go unchecked."""
        return (
            type(t) is torch.Tensor
            and t.layout == torch.strided
            and not t.is_nested
            and not t.is_quantized
            and t.device.type in ("cpu", "cuda")
        )

    def __init__(self, t: torch.Tensor) -> None:
        with torch.no_grad():
            flat = t.detach().reshape(-1)
            n = flat.numel()
            self.index = torch.linspace(0, max(n - 1, 0), min(n, 256), device=t.device).long()
            self.samples = flat[self.index].double()
            self.norm = float(flat.double().norm())
            self.dtype = t.dtype

    def error(self, rebuilt: torch.Tensor) -> float:
        """Relative error of ``rebuilt`` against this fingerprint."""
        with torch.no_grad():
            flat = rebuilt.detach().reshape(-1)
            got = flat[self.index].double()
            scale = float(self.samples.abs().max()) if self.samples.numel() else 0.0
            elem = float((got - self.samples).abs().max()) / max(scale, 1e-300) if got.numel() else 0.0
            norm = abs(float(flat.double().norm()) - self.norm) / max(self.norm, 1e-300)
        return max(elem, norm)


def check(
    name: str,
    prints: Sequence[Fingerprint | None],
    rebuilt: Sequence[torch.Tensor],
    policy: Policy,
    rtol: float | None,
    reports: Sequence[object],
) -> None:
    """Compare rebuilt inputs with their fingerprints; record, warn or raise per ``policy``."""
    for i, (fp, t) in enumerate(zip(prints, rebuilt)):
        if fp is None:
            continue
        err = fp.error(t)
        for rep in reports:
            rep.drift.append((name, i, err))  # type: ignore[attr-defined]
        tol = rtol if rtol is not None else DEFAULT_RTOL.get(fp.dtype, 1e-4)
        if not err <= tol:  # NaN counts as drift
            msg = (
                f"invfunc.invertible_call({name}) backward: input {i} was rebuilt by the inverse with "
                f"relative error {err:.2e} (tolerance {tol:.0e} for {fp.dtype}); the inverse does not "
                "reproduce what the forward received. Check the inverse, compute in float64, pass this "
                "input in keep=, or use mode='checkpoint'."
            )
            _flag(msg, policy)


def diverged(name: str, what: str, why: str, policy: Policy, reports: Sequence[object]) -> None:
    """A block's recompute in backward is not its forward's computation (NOTE [Recompute
    divergence]): record it, and raise under the policy "raise", else warn. ``what``: "the
    block", or the section (a coupling's "F" or "G"); ``why``: what differs."""
    for rep in reports:
        rep.diverged.append((name, what, why))  # type: ignore[attr-defined]
    if what == "the block":
        causes = (
            "the inverse does not invert the function, the rebuilt input drifted, or the function "
            "makes a discrete choice that invfunc does not replay"
        )
    else:
        causes = (
            f"{what} makes a discrete choice that invfunc does not replay, or the rebuilt input "
            "drifted (see invfunc.verify)"
        )
    msg = (
        f"invfunc.invertible_call({name}) backward: recomputing {what} on the rebuilt input did not "
        f"reproduce the forward: {why}. The gradients through this block would be off by about as "
        "much. "
        f"Causes: {causes}. Discrete choices are replayed when they are made by ops such as argmax, "
        "topk, sort, comparisons or round (see 'Discrete choices' in the sharp bits); "
        "mode='checkpoint' keeps the input, so its recompute is exact."
    )
    _flag(msg, policy)


def _flag(msg: str, policy: Policy) -> None:
    """Raise ``msg`` under the policy "raise", else warn it."""
    if policy == "raise":
        raise InvfuncError(msg)
    warnings.warn(msg, InvertibilityWarning, stacklevel=4)
