"""What a function reaches: the modules and tensors behind an Invertible.

NOTE [Walking a function]

:func:`walk` follows, from any callable: a chain's blocks, a coupling's F and G, the
functions an Invertible pairs, the cells of closures, the global variables a
function's code names (not for functions of torch, invfunc and the like), default
arguments, ``functools.partial`` arguments, bound methods' objects, lists, tuples,
dicts, the attributes of other callable objects, and the callables stored on modules.
It stops at an ``nn.Module`` (reported whole) and at a tensor. Each object is reported
once, under the first path that reached it, with whether that path went through a
function's closure, globals or defaults: those are not copied by ``copy.deepcopy``
(a function is copied as itself), so what they hold is shared by a copy. Used by
:func:`invfunc.as_module` (which modules and parameters a module of the function
holds) and :func:`invfunc.testing.find_parameters`.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from ._chain import Chain
from ._core import Invertible
from ._coupling import Coupling

__all__ = ["Reached", "walk"]

_MAX_DEPTH = 12
_LIBRARIES = {"torch", "invfunc", "hypothesis", "numpy", "functools", "builtins"}


class Reached(NamedTuple):
    """A module or a tensor ``walk`` found: where, what, and whether only through a
    function's closure, globals or defaults (shared by a deep copy)."""

    path: str
    obj: torch.nn.Module | torch.Tensor
    shared: bool


def walk(fn: Callable[..., Any], root: str = "fn") -> Iterator[Reached]:
    """The modules and tensors ``fn`` reaches (NOTE [Walking a function])."""
    seen: set[int] = set()

    def visit(obj: object, path: str, depth: int, shared: bool) -> Iterator[Reached]:
        if isinstance(obj, (torch.nn.Module, torch.Tensor)):
            if id(obj) not in seen:
                seen.add(id(obj))
                yield Reached(path, obj, shared)
            if isinstance(obj, torch.nn.Module):
                for n, m in obj.named_modules():
                    for k, v in vars(m).items():  # callables stored on modules (rare)
                        if not k.startswith("_") and isinstance(v, (types.FunctionType, functools.partial)):
                            yield from visit(v, f"{path}.{n}.{k}" if n else f"{path}.{k}", depth + 1, shared)
            return
        if (
            depth > _MAX_DEPTH
            or id(obj) in seen
            or obj is None
            or isinstance(obj, (str, bytes, int, float, type, types.ModuleType))
        ):
            return
        seen.add(id(obj))
        d = depth + 1
        if isinstance(obj, Chain):
            for i, b in enumerate(obj.blocks):
                yield from visit(b, f"{path}.blocks[{i}]", d, shared)
        elif isinstance(obj, Coupling):
            yield from visit(obj.F, f"{path}.F", d, shared)
            yield from visit(obj.G, f"{path}.G", d, shared)
        elif isinstance(obj, Invertible):
            yield from visit(obj._fn, path, d, shared)
            yield from visit(obj._inv, path, d, shared)
        elif isinstance(obj, types.MethodType):
            yield from visit(obj.__self__, path, d, shared)
            yield from visit(obj.__func__, path, d, shared)
        elif isinstance(obj, functools.partial):
            yield from visit(obj.func, path, d, shared)
            for i, a in enumerate(obj.args):
                yield from visit(a, f"{path}.args[{i}]", d, shared)
            for k, v in obj.keywords.items():
                yield from visit(v, f"{path}.{k}", d, shared)
        elif isinstance(obj, types.FunctionType):
            yield from _function(obj, path, d, visit)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from visit(v, f"{path}[{i}]", d, shared)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from visit(v, f"{path}[{k!r}]", d, shared)
        elif callable(obj) and hasattr(obj, "__dict__") and not isinstance(obj, types.BuiltinFunctionType):
            for k, v in vars(obj).items():
                yield from visit(v, f"{path}.{k}", d, shared)

    yield from visit(fn, root, 0, False)


def _function(
    fn: types.FunctionType, path: str, d: int, visit: Callable[[object, str, int, bool], Iterator[Reached]]
) -> Iterator[Reached]:
    """What a plain function holds: closure cells, named globals, defaults (all shared)."""
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        yield from visit(value, f"{path}.{name}", d, True)
    for name in () if _library_function(fn) else _global_names(fn.__code__):
        if name in fn.__globals__:
            yield from visit(fn.__globals__[name], f"{path}.{name}", d, True)
    for i, v in enumerate(fn.__defaults__ or ()):
        yield from visit(v, f"{path}.__defaults__[{i}]", d, True)
    for k, v in (fn.__kwdefaults__ or {}).items():
        yield from visit(v, f"{path}.{k}", d, True)


def _library_function(fn: types.FunctionType) -> bool:
    """True for a function of torch, invfunc itself and the like: its globals are not walked."""
    module = sys.modules.get(fn.__module__ or "")
    return (fn.__module__ or "").split(".")[0] in _LIBRARIES and getattr(
        module, "__dict__", None
    ) is fn.__globals__


def _global_names(code: types.CodeType) -> list[str]:
    """Names a code object (and the functions defined in it) may read as globals."""
    names = list(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names.extend(_global_names(c))
    return names
