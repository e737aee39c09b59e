"""Saving and restoring what a network holds: the parameters, buffers and closure tensors
a walk of a function reaches (values, the object in each slot, version counters, ``.grad``).
Diagnostics that run the user's network (``check``) leave it as they found it."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from . import _compat
from ._walk import Reached

__all__ = ["Snapshot"]


class _Saved:
    """One tensor a module or closure holds: where, its value, version and ``.grad``."""

    __slots__ = ("attr", "grad", "label", "module", "tensor", "value", "version")

    def __init__(self, label: str, module: torch.nn.Module | None, attr: str, t: torch.Tensor) -> None:
        self.label, self.module, self.attr, self.tensor = label, module, attr, t
        self.value = t.detach().clone()
        self.version = _compat.version(t)
        self.grad = t.grad if t.requires_grad else None

    def changed(self) -> bool:
        now = self.tensor if self.module is None else getattr(self.module, self.attr, None)
        return now is not self.tensor or not _same(self.tensor, self.value)

    def restore(self) -> None:
        t = self.tensor
        if self.module is not None and getattr(self.module, self.attr, None) is not t:
            setattr(self.module, self.attr, t)
        if not _same(t, self.value):
            with torch.no_grad():
                if t.shape == self.value.shape:
                    t.copy_(self.value)
                else:
                    t.data = self.value.clone()
        if _compat.version(t) != self.version and _compat.can_free() is None:
            _compat.set_version(t, self.version)
        if t.requires_grad and t.grad is not self.grad:
            t.grad = self.grad


class Snapshot:
    """The parameters and buffers of the modules, and the tensors, that a walk reached."""

    def __init__(self, reached: Iterable[Reached]) -> None:
        self.items: list[_Saved] = []
        self.ids: set[int] = set()
        for path, obj, _ in reached:
            if isinstance(obj, torch.nn.Module):
                for sub, m in obj.named_modules():
                    label = f"{path}.{sub} ({type(m).__name__})" if sub else f"{path} ({type(m).__name__})"
                    own = [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]
                    for attr, t in own:
                        self._add(label, m, attr, t)
            else:
                self._add(f"{path} (tensor)", None, "", obj)

    def add(self, t: torch.Tensor) -> None:
        """Save one more tensor (an argument the function is handed)."""
        self._add("(argument)", None, "", t)

    def _add(self, label: str, module: torch.nn.Module | None, attr: str, t: torch.Tensor) -> None:
        if id(t) not in self.ids:
            self.ids.add(id(t))
            self.items.append(_Saved(label, module, attr, t))

    def again(self) -> Snapshot:
        """A snapshot of the same tensors, as they are now."""
        new = Snapshot(())
        for s in self.items:
            new._add(s.label, s.module, s.attr, s.tensor)
        return new

    def changed(self) -> list[str]:
        return list(dict.fromkeys(s.label for s in self.items if s.changed()))

    def restore(self) -> None:
        for s in self.items:
            s.restore()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    with torch.no_grad():
        if torch.equal(a, b):
            return True
        return bool(a.is_floating_point() and torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True))
