"""Freeing a tensor's storage after the forward and refilling it in backward.

NOTE [Freeing rules]

A tensor handed to :func:`invfunc.invertible_call` is freed only when all hold:

1. it is not a leaf (user data and parameters are never freed, unless the caller
   names a data leaf in ``free=``; parameters never) and is a plain,
   strided ``torch.Tensor`` on CPU or CUDA (no subclass, wrapper, inference tensor);
2. it is not a view, starts its storage and covers all of it, with no zero stride;
3. its storage is resizable, not shared memory, not pinned;
4. nothing else holds its storage: the storage's use count is what the tensor itself
   and its producer's saved result account for (a live view, a sibling tensor, an
   output aliasing it all add to the count);
5. it is not named in ``keep=``, and no output of the call shares its storage.

Anything else is kept, and :func:`invfunc.explain` says why.

NOTE [Refilling without a trace]

A freed storage is refilled through a fresh tensor set onto the same storage, so
the version counter of the user's tensor is not bumped and every node that saved it
(a sigmoid before the block, the previous block's output) reads the rebuilt values.
While freed, the version counter is advanced by one: a foreign autograd node that
saved the tensor and runs before the refill raises PyTorch's "modified by an inplace
operation" error instead of reading freed memory. The refill restores the counter.

NOTE [Guarded tensors]

The Python object of a freed tensor the caller can still reach is given the class
:class:`_Freed` until refilled. Any torch function that touches it first rebuilds it
from the block's outputs by the inverse (then it stays kept); if the graph that could
rebuild it is gone, :class:`FreedTensorError` is raised. Metadata (shape, dtype,
device, ``requires_grad``) stays readable without a rebuild.
"""

from __future__ import annotations

import functools
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._compat import (
    base_of,
    disable_torch_function_subclass,
    is_view,
    is_wrapped,
    saves_result,
    set_version,
    storage_key,
    swap_memory,
    tensor_use_count,
    use_count,
    version,
)
from ._errors import FreedTensorError

__all__ = ["Freed", "StorageHandle", "free_reason", "is_freed"]

_use_count = use_count  # NOTE [Torch versions]
_is_wrapped = is_wrapped
_RESULT_SAVERS: dict[type, bool | None] = {}
# Producers whose backward uses their saved result smoothly, so that a rebuilt value
# (equal up to round-off) gives the gradient up to round-off. ReLU and other
# thresholds are not among them: a rebuilt 0 may come back as 1e-17 and flip the mask.
_SMOOTH_RESULT_SAVERS = {
    "SigmoidBackward0",
    "TanhBackward0",
    "ExpBackward0",
    "Exp2Backward0",
    "SqrtBackward0",
    "RsqrtBackward0",
    "SoftmaxBackward0",
    "LogSoftmaxBackward0",
    "ReciprocalBackward0",
}


def _producer_saves_result(t: torch.Tensor) -> bool | None:
    """False: the producer saved no result; True: it saved it and tolerates a rebuilt one;
    None: it saved it and a rebuilt value could change its gradient."""
    fn = t.grad_fn
    if fn is None:
        return False
    kind = type(fn)
    if kind not in _RESULT_SAVERS:
        if getattr(kind, "_invfunc_saves_outputs", False):
            _RESULT_SAVERS[kind] = True
        elif saves_result(fn):
            _RESULT_SAVERS[kind] = True if kind.__name__ in _SMOOTH_RESULT_SAVERS else None
        else:
            _RESULT_SAVERS[kind] = False
    return _RESULT_SAVERS[kind]


def is_freed(t: torch.Tensor) -> bool:
    """True if ``t`` has elements but its storage holds no bytes."""
    return type(t) is Freed or (
        t.layout == torch.strided
        and not _is_wrapped(t)
        and t.numel() > 0
        and t.device.type in ("cpu", "cuda")
        and t.untyped_storage().nbytes() == 0
    )


_KEEP = object()


def _base_refs(t: torch.Tensor) -> int:
    base = base_of(t)
    return sys.getrefcount(base)


# What _base_refs gives for a view whose base only the view holds, measured once.
_BASE_REFS = _base_refs(torch.empty(2, 3).t())


def _private_view(t: torch.Tensor) -> bool | object | None:
    """For a view ``t``: None if it must be kept as a view; else whether its base's
    producer saved the base (True) or not (False), or ``_KEEP`` if it saved it for a
    backward a rebuilt value could change.

    NOTE [Views nobody else reaches]: an op often returns a view of a fresh tensor
    (``nn.Linear`` on a 3-D input returns a view of its 2-D result; ``movedim`` after a
    matmul). Such a view is freed like any tensor when nothing but the view reaches its
    base: no Python reference to the base but the one made here to look (the count is
    measured at import, :data:`_BASE_REFS`), no other TensorImpl holding it (a sibling
    view or a node that saved it as an input), and, checked by the caller, no other
    tensor on the storage, which the view covers whole from offset 0. Views of a block's
    output, or made by a block (of an input it returns), are left to the engine's rules
    for boundaries: kept. Refilled through the view's own sizes and strides, the base
    holds the rebuilt values too."""
    if _base_refs(t) != _BASE_REFS or _made_by_a_block(t):
        return None
    base = base_of(t)
    if base is None or tensor_use_count(base) != 2 or _made_by_a_block(base):  # (the view's and ``base``)
        return None
    saves = _producer_saves_result(base)
    return _KEEP if saves is None else saves


def _made_by_a_block(t: torch.Tensor) -> bool:
    """An output of an invertible call's block (its boundaries, and the views it makes of
    inputs it returns, are freed and refilled by the engine's own rules)."""
    return getattr(type(t.grad_fn), "_invfunc_saves_outputs", False) is True


def free_reason(t: torch.Tensor, *, leaf_ok: bool = False) -> str | None:
    """Why ``t`` must not be freed, or None if it may be (NOTE [Freeing rules]);
    ``leaf_ok``: the caller named this leaf in ``free=``."""
    if type(t) is not torch.Tensor:
        return f"its type is {type(t).__name__}, not a plain torch.Tensor"
    if t.is_nested:
        return "it is a NestedTensor"
    if _is_wrapped(t):
        return "it is wrapped by a torch.func transform"
    if t.grad_fn is None and not leaf_ok:
        return "it is a leaf (user data or a parameter); data leaves are freed only when named in free="
    if t.layout != torch.strided or t.device.type not in ("cpu", "cuda"):
        return f"its layout/device ({t.layout}, {t.device.type}) is not a strided CPU/CUDA tensor"
    if t.is_inference():
        return "it is an inference tensor"
    extra = 0
    if is_view(t):
        # NOTE [Views nobody else reaches]
        base_saves = _private_view(t)
        whole = t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if base_saves is None or not whole:
            return "it is a view of another tensor"
        if base_saves is _KEEP:
            return (
                "it is a view of a tensor whose producer "
                f"({type(getattr(base_of(t), 'grad_fn', None)).__name__}) saved it for a backward that a "
                "rebuilt value could change; move that op inside the block to free it"
            )
        extra = (
            2 if base_saves is True else 1
        )  # the base shares the storage (and its producer's saved result)
    if t.storage_offset() != 0 or 0 in t.stride():
        return "it does not start its storage or has a zero stride"
    storage = t.untyped_storage()
    if storage.nbytes() != t.numel() * t.element_size():
        return "it does not cover its whole storage"
    if t.numel() == 0:
        return "it is empty"
    if not storage.resizable():
        return "its storage is not resizable (numpy, DLPack, mmap)"
    if storage.is_shared():
        return "its storage is in shared memory"
    if t.device.type == "cpu" and t.is_pinned():
        return "its storage is pinned"
    saves = _producer_saves_result(t)
    if saves is None:
        return (
            f"its producer ({type(t.grad_fn).__name__}) saved it for a backward that a rebuilt value "
            "could change (e.g. ReLU's mask); move that op inside the block to free it"
        )
    expected = 2 + saves + extra
    if _use_count(storage_key(storage)) > expected:
        return "another tensor (a view, an alias or an output) shares its storage"
    return None


class StorageHandle:
    """A freed storage, with what is needed to refill it and to guard its tensor."""

    __slots__ = (
        "__weakref__",
        "dtype",
        "linked",
        "nbytes",
        "reread",
        "size",
        "storage",
        "stride",
        "tensor",
        "version",
    )

    def __init__(self, t: torch.Tensor, guard: bool) -> None:
        self.storage = t.untyped_storage()
        self.nbytes = self.storage.nbytes()
        self.size = t.size()
        self.stride = t.stride()
        self.dtype = t.dtype
        self.version = version(t)
        # A strong reference: the version counter must be restored even if the caller
        # dropped the tensor (the previous block's saved output shares that counter).
        self.tensor: torch.Tensor | None = t if guard else None
        self.linked = False  # registered with the block that produced the tensor
        # its producer's backward may read it (a saved result, or a view): kept once refilled
        self.reread = base_of(t) is not None or _producer_saves_result(t) is not False

    def free(self, rebuild: Callable[[], None] | None) -> None:
        if self.storage.nbytes() != 0:  # (none when its memory was moved to an output)
            if self.storage.device.type == "cuda":
                # kernels queued on this stream may still read the memory: the caching
                # allocator must not hand it out on the stream it was allocated on before then
                self.view().record_stream(torch.cuda.current_stream(self.storage.device))
            self.storage.resize_(0)
        t = self.tensor
        if t is not None:
            set_version(t, self.version + 1)
            t.__class__ = Freed
            if rebuild is not None:
                _guard(t, rebuild)

    def lose(self, why: str) -> None:
        """The tensor can no longer be rebuilt: reading it raises, saying ``why``."""
        t = self.tensor
        if t is not None and type(t) is Freed:

            def lost() -> None:
                raise FreedTensorError(why)

            _guard(t, lost)

    def view(self) -> torch.Tensor:
        """A new tensor on the (refilled) storage, with its own version counter."""
        if self.storage.nbytes() == 0:
            self.storage.resize_(self.nbytes)
        out = torch.empty(0, dtype=self.dtype, device=self.storage.device)
        return out.set_(self.storage, 0, self.size, self.stride)

    def let_go(self) -> bool:
        """Drop the strong reference to the caller's tensor when nothing else can reach it
        or its memory, and say whether it did (NOTE [Caller's boundaries nobody holds]).

        Reachable means: another Python reference to the tensor object (a variable, a
        list, a hook's closure), a C++ holder of its TensorImpl (a foreign autograd node
        that saved it), or another tensor on its storage (a view or a detached alias).
        Accounted for are this handle (the tensor and the storage object) and the saved
        output of the block that produced it."""
        if type(self.tensor) is not torch.Tensor or _slot_refs(self) != _SLOT_REFS:
            return False  # (counted before this frame holds a reference of its own)
        t = self.tensor
        if (
            tensor_use_count(t) != 1  # the Python object's own reference
            or _use_count(storage_key(self.storage)) != 3  # t, self.storage, the producer's saved output
        ):
            return False
        self.tensor = None
        return True

    @property
    def freed(self) -> bool:
        return self.storage.nbytes() == 0

    def adopt(self, other: StorageHandle) -> None:
        """Move ``other``'s memory (same size, already holding this tensor's rebuilt value)
        into this freed storage; ``other``'s storage is left freed. Call :meth:`refill`
        afterwards to finish, as after a write through :meth:`view`."""
        swap_memory(self.storage, other.storage)

    def fits(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s whole storage could be this freed one: same bytes and layout."""
        return (
            t.untyped_storage().nbytes() == self.nbytes
            and t.storage_offset() == 0
            and t.size() == self.size
            and t.stride() == self.stride
            and t.dtype == self.dtype
            and t.device == self.storage.device
        )

    def adopt_memory(self, t: torch.Tensor) -> None:
        """Move the memory of ``t`` (which :meth:`fits`, and nobody else holds) into this
        freed storage; ``t`` is left on freed memory. Call :meth:`refill` afterwards."""
        swap_memory(self.storage, t.untyped_storage())

    def refill(self, value: torch.Tensor | None = None) -> None:
        """Write ``value`` back into the storage (or finish a write made through :meth:`view`)."""
        if value is not None:
            with torch.no_grad():
                self.view().copy_(value)
        t = self.tensor
        if t is not None:
            _GUARDS.pop(id(t), None)
            if type(t) is Freed:
                t.__class__ = torch.Tensor  # type: ignore[assignment]
                set_version(t, self.version)


def _slot_refs(handle: StorageHandle) -> int:
    """The reference count of the handle's tensor, seen from here (the count includes
    what this function's own frame holds, which depends on the interpreter version)."""
    t = handle.tensor
    return sys.getrefcount(t)


# What _slot_refs gives for a tensor that only its handle holds, measured once.
_SLOT_REFS = _slot_refs(StorageHandle(torch.empty(1), True))


# id(tensor) -> (weakref to it, rebuild callback). Entries die with their tensors.
_GUARDS: dict[int, tuple[weakref.ref[torch.Tensor], Callable[[], None]]] = {}


def _guard(t: torch.Tensor, on_read: Callable[[], None]) -> None:
    """What a read of the freed ``t`` calls (NOTE [Guarded tensors]): until ``t`` dies."""
    key = id(t)
    _GUARDS[key] = (weakref.ref(t, functools.partial(_forget, key)), on_read)


def _forget(key: int, _ref: object = None) -> None:
    entry = _GUARDS.get(key)
    if entry is not None and entry[0]() is None:
        del _GUARDS[key]


_METADATA = {
    "shape",
    "size",
    "dim",
    "ndim",
    "dtype",
    "device",
    "layout",
    "requires_grad",
    "grad_fn",
    "is_leaf",
    "numel",
    "stride",
    "storage_offset",
    "element_size",
    "is_cuda",
    "is_sparse",
    "untyped_storage",
    "storage",
    "_typed_storage",
    "is_set_to",
    "_version",
    "_is_view",
    "_base",
    "grad",
    "names",
    "is_contiguous",
    "__class__",
    "__hash__",
    "data_ptr",
    "is_inference",
    "is_floating_point",
    "is_complex",
    "nbytes",
    "itemsize",
    "output_nr",
    "_cdata",
    "register_hook",
    "retain_grad",
    "retains_grad",
    "is_pinned",
    "is_shared",
    "__len__",
}


def _func_name(func: Any) -> str:
    owner = getattr(func, "__self__", None)
    if owner is not None and getattr(func, "__name__", "") in ("__get__", "__set__"):
        return getattr(owner, "__name__", "")
    return getattr(func, "__name__", "")


def _rebuild_guarded(t: torch.Tensor) -> None:
    entry = _GUARDS.get(id(t))
    if entry is None or entry[0]() is not t:
        t.__class__ = torch.Tensor
        raise FreedTensorError(
            "invfunc: this tensor was freed by invertible_call and cannot be rebuilt: "
            "the graph that held the block's outputs was dropped without a backward. "
            "Pass it in keep= (or clone it) before the call if you need it afterwards."
        )
    try:
        entry[1]()
    except FreedTensorError:
        raise
    except Exception as e:
        raise FreedTensorError(
            f"invfunc: this tensor was freed by invertible_call, and rebuilding it on this read "
            f"failed ({type(e).__name__}: {e}); its value is lost."
        ) from e
    if type(t) is Freed:
        raise FreedTensorError("invfunc: rebuilding a freed tensor did not restore it (internal error).")


class Freed(torch.Tensor):
    """The class of a freed tensor the caller can still reach (NOTE [Guarded tensors])."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        if kwargs is None:
            kwargs = {}
        if _func_name(func) not in _METADATA:
            for a in (*args, *kwargs.values()):
                if type(a) is Freed:
                    _rebuild_guarded(a)
                elif type(a) in (list, tuple):
                    for b in a:
                        if type(b) is Freed:
                            _rebuild_guarded(b)
        with disable_torch_function_subclass():
            return func(*args, **kwargs)
