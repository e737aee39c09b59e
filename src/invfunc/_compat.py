"""The version-dependent PyTorch internals invfunc uses, found once at import.

NOTE [Torch versions]

Freeing a tensor and rebuilding it in place relies on PyTorch internals that are not part
of its public API, and that change between releases. Each is found here by feature
detection, never by comparing version numbers, and each has a fallback that keeps
results correct:

1. ``set_version(t, v)``: restores a tensor's version counter after a refill
   (NOTE [Refilling without a trace]). Its signature changed (one tensor and an int in
   2.4, tuples since); missing, invfunc frees nothing (``can_free`` says why).
2. ``saved_tensors_hooks_active()``: whether saved-tensor hooks are in force (under
   them a call keeps its inputs, NOTE [Saved-tensor hooks]). Newer releases can be asked
   directly; older ones are probed with a one-element op; if neither works, hooks are
   assumed active (the call keeps its inputs).
3. ``CAN_SWAP``: moving memory between storages (``UntypedStorage._swap_data_ptr_``,
   not in 2.4) lets an output take the memory of the input it replaces. Without it the
   output gets fresh memory and rebuilt inputs are copied: slower, the same values.
4. ``storage_use_count``: how many tensors share a storage, the proof that a tensor may
   be freed (NOTE [Freeing rules]); missing, nothing is freed.
5. ``fsdp_module_type()``: FSDP2's module class, to refuse it inside a block; missing
   (before 2.6), there is no FSDP2 to refuse.
6. Incoming gradients written over in place (``_reuse.INPLACE_GRADS``): not in 2.4,
   whose engine holds a reference of its own to them; they are then added out of place.

``TESTED_TORCH`` lists the releases the suite runs on; the demo warns on any other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "CAN_SWAP",
    "TESTED_TORCH",
    "DeviceContext",
    "can_free",
    "fsdp_module_type",
    "saved_tensors_hooks_active",
    "set_version",
    "swap_memory",
    "torch_version",
    "use_count",
]

#: The PyTorch releases (major.minor) the whole test suite passes on (docs/sharp-bits.md,
#: "PyTorch versions": 2.4.1, 2.13.0 and 2.15.0, on Python 3.10 to 3.13).
TESTED_TORCH: tuple[str, ...] = ("2.4", "2.13", "2.15")


def torch_version() -> str:
    """``major.minor`` of the PyTorch in use."""
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


# -- 1. version counters ----------------------------------------------------------------------


def _find_set_version() -> Callable[[torch.Tensor, int], None] | None:
    raw = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)
    if raw is None:
        return None
    probe = torch.zeros(1)
    for form in ("tuples", "single"):
        try:
            if form == "tuples":
                raw((probe,), (7,))
            else:
                raw(probe, 7)
        except (TypeError, RuntimeError):
            continue
        if probe._version == 7:
            if form == "tuples":
                return lambda t, v: raw((t,), (v,))
            return raw  # type: ignore[no-any-return]
    return None


_SET_VERSION = _find_set_version()


def set_version(t: torch.Tensor, version: int) -> None:
    """Set ``t``'s version counter (only where :func:`can_free` is None)."""
    assert _SET_VERSION is not None
    _SET_VERSION(t, version)


# -- 4. storage use counts -----------------------------------------------------------------------

_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _unknown_use_count(cdata: int) -> int:
    return 1 << 30  # never "alone": nothing is freed or written over in place


#: ``use_count(storage._cdata)``: how many references the storage's implementation has.
use_count: Callable[[int], int] = _USE_COUNT if _USE_COUNT is not None else _unknown_use_count


def can_free() -> str | None:
    """None if this torch has what freeing needs, else why inputs are kept (for explain())."""
    if _SET_VERSION is not None and use_count is not _unknown_use_count:
        return None  # every call asks: the usual answer first
    missing = [
        name
        for name, have in (
            ("a settable version counter", _SET_VERSION is not None),
            ("storage use counts", use_count is not _unknown_use_count),
        )
        if not have
    ]
    if not missing:
        return None
    return (
        f"this PyTorch ({torch.__version__}) lacks {' and '.join(missing)}, which freeing relies on; "
        "inputs are kept (the call runs as mode='checkpoint')"
    )


# -- 2. saved-tensor hooks ----------------------------------------------------------------------


def _probe_hooks() -> bool:
    """Whether a saved tensor gets default hooks: one that has some refuses a second pair."""
    with torch.enable_grad(), torch.inference_mode(False):
        p = torch.zeros((), requires_grad=True)
        q = p.exp()  # saves its output, which must stay alive while it is probed
        raw = q.grad_fn._raw_saved_result  # type: ignore[union-attr]
        try:
            raw.register_hooks(_same, _same)
        except RuntimeError as e:
            if "already" in str(e):
                return True
            raise
    return False


def _same(t: Any) -> Any:
    return t


_TOP_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def saved_tensors_hooks_active() -> bool:
    """Whether saved-tensor default hooks are in force (rule 2)."""
    if _TOP_HOOKS is not None:
        return _TOP_HOOKS(False) is not None  # type: ignore[no-any-return]
    try:
        return _probe_hooks()
    except Exception:  # an internal that moved again: assume hooks, keep the inputs
        return True


# -- 3. moving memory between storages -------------------------------------------------------

CAN_SWAP: bool = hasattr(torch.UntypedStorage, "_swap_data_ptr_")


def swap_memory(a: torch.UntypedStorage, b: torch.UntypedStorage) -> None:
    """Exchange the memory of two storages of the same size (only where CAN_SWAP)."""
    a._swap_data_ptr_(b)  # type: ignore[attr-defined]


# -- 5. FSDP2 ----------------------------------------------------------------------------------


def fsdp_module_type() -> type | None:
    """FSDP2's module class (``fully_shard``), or None where there is none."""
    with contextlib.suppress(ImportError):
        from torch.distributed import fsdp

        return getattr(fsdp, "FSDPModule", None)
    return None


# -- the other internals: stable across the supported range, each given one home here ----------

#: Whether a tensor is a ``torch.func`` wrapper (GradTrackingTensor, BatchedTensor).
is_wrapped: Callable[[torch.Tensor], bool] = torch._C._functorch.is_functorch_wrapped_tensor
#: Whether a ``torch.func`` transform is active.
functorch_active: Callable[[], bool] = torch._C._are_functorch_transforms_active
#: A region where tensor subclasses' ``__torch_function__`` is off (the guarded ``Freed``).
disable_torch_function_subclass = torch._C.DisableTorchFunctionSubclass
#: The C++ ``apply`` behind ``Function.apply`` (None where it is not there: use ``apply``).
function_base_apply: Any = torch._C._FunctionBase.__dict__.get("apply")
#: ``torch.autograd.grad``'s engine call without its Python-side checks, or None.
engine_run_backward: Any = getattr(torch.autograd.graph, "_engine_run_backward", None)
_function_modes: Any = getattr(torch.overrides, "_get_current_function_mode_stack", None)

try:
    from torch.utils._device import DeviceContext
except ImportError:  # pragma: no cover - another layout: no default-device context is replayed

    class DeviceContext:  # type: ignore[no-redef]
        """Stands in for torch's: nothing is an instance of it."""


def function_modes() -> list[Any]:
    """The ``TorchFunctionMode`` stack (empty where it cannot be read)."""
    return list(_function_modes()) if _function_modes is not None else []


def real_tensors() -> contextlib.AbstractContextManager[Any]:
    """A region where tensor ops run for real even if a FakeTensorMode is active."""
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return unset_fake_temporarily()  # type: ignore[no-any-return]


def forward_ad_active() -> bool:
    """Whether forward-mode AD (``torch.autograd.forward_ad``) is active."""
    return torch.autograd.forward_ad._current_level >= 0  # type: ignore[no-any-return]


def version(t: torch.Tensor) -> int:
    """The tensor's version counter."""
    return t._version


def tensor_use_count(t: torch.Tensor) -> int:
    """References to the tensor's implementation (1: only its Python object)."""
    return t._use_count()  # type: ignore[attr-defined,no-any-return]


def is_view(t: torch.Tensor) -> bool:
    return t._is_view()


def base_of(t: torch.Tensor) -> torch.Tensor | None:
    return t._base


def is_zero_tensor(t: torch.Tensor) -> bool:
    return t._is_zerotensor()


def has_backward_hooks(t: torch.Tensor) -> bool:
    return bool(t._backward_hooks)


def storage_key(storage: torch.UntypedStorage) -> int:
    """The identity of a storage's implementation (two Python storages of one share it)."""
    return storage._cdata  # type: ignore[no-any-return]


def saves_result(node: object) -> bool:
    """Whether an autograd node saved its own output."""
    return hasattr(node, "_saved_result")


def mark_backward_class(fn: type, name: str) -> None:
    """Set an attribute on the backward node class of an autograd Function."""
    setattr(fn._backward_cls, name, True)  # type: ignore[attr-defined]


def global_module_hooks() -> bool:
    """Whether global forward hooks are registered on every ``nn.Module``."""
    glob = torch.nn.modules.module
    return bool(glob._global_forward_hooks or glob._global_forward_pre_hooks)


def module_parameters(m: torch.nn.Module) -> dict[str, Any]:
    """A module's own parameter slots (name -> Parameter or None)."""
    return m._parameters  # type: ignore[return-value]


def module_children(m: torch.nn.Module) -> dict[str, Any]:
    """A module's own submodules (name -> Module or None)."""
    return m._modules  # type: ignore[return-value]
