""":func:`as_module`: an Invertible living in an ``nn.Module`` tree.

NOTE [A module around a function]

1. The module holds the Invertible (``.fn``) and, as its children, every module the
   function reaches (NOTE [Walking a function]), arranged as the function is: a chain's
   blocks are ``blocks.0``, ``blocks.1``, ...; a coupling's F and G are ``F`` and ``G``;
   a module reached through a closure or a ``functools.partial`` is named by that path
   (``blocks.2.conv``). ``parameters()`` lists every parameter once, even when modules
   are shared; ``state_dict`` names each place (as PyTorch does for shared modules).
2. An ``nn.Parameter`` held outside any module (a closure's ``scale``) is registered as
   a parameter of the module. A tensor that requires grad but is not a Parameter cannot
   be: registering makes a new Parameter object, and the function would go on reading
   the old one. ``as_module`` warns, naming it: make it an ``nn.Parameter``. Other
   tensors held by closures are not buffers for the same reason (``.to()`` would move a
   copy): hold them in a module to have them moved.
3. ``forward`` is :func:`invfunc.invertible_call` of the function, under the ambient mode
   (``mode=``, ``keep=``, ``free=`` and ``verify=`` pass through), ``inverse`` the same for
   its inverse. ``train()``/``eval()``, ``.to()``, ``functional_call`` and DDP act on the
   children, which are the very modules the function calls.
4. ``copy.deepcopy`` copies the function with its modules. A module reached only through
   a closure, globals or defaults is shared by the copy (Python copies a function as
   itself): the copy would train the original's parameters. That copy is refused with
   an error naming the module and the fix, never made silently.
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any

from torch import nn

from ._call import invertible_call
from ._chain import Chain
from ._core import Invertible, _name
from ._coupling import Coupling
from ._errors import InvfuncError
from ._walk import walk

__all__ = ["as_module"]


class Part(nn.Module):
    """The modules and parameters one part of a function reaches (a block, a closure);
    it has no forward of its own: the function calls the modules."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self.label = label

    def extra_repr(self) -> str:
        return self.label


class InvertibleModule(nn.Module):
    """An ``nn.Module`` around an :class:`~invfunc.Invertible` (see :func:`as_module`)."""

    fn: Invertible

    def __init__(self, fn: Invertible) -> None:
        super().__init__()
        self.fn = fn
        loose = _arrange(self, fn, "fn")
        for path in loose:
            warnings.warn(
                f"invfunc.as_module({fn._name}): {path} requires grad but is not an nn.Parameter, so "
                "parameters() cannot report it and an optimizer built from them will not train it. "
                "Make it an nn.Parameter (or hold it in a module).",
                stacklevel=3,
            )

    def forward(self, *args: Any, **options: Any) -> Any:
        """``invertible_call(self.fn, *args, **options)``."""
        return invertible_call(self.fn, *args, **options)

    def inverse(self, *args: Any, **options: Any) -> Any:
        """``invertible_call(self.fn.inverse, *args, **options)``: the inverse direction."""
        return invertible_call(self.fn.inverse, *args, **options)

    def extra_repr(self) -> str:
        return f"fn={self.fn._name}"

    def __deepcopy__(self, memo: dict[int, Any]) -> InvertibleModule:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = copy.deepcopy(v, memo)
        mine = {id(m) for m in self.modules()} | {id(p) for p in self.parameters()}
        for path, obj, shared in walk(new.fn):
            if shared and id(obj) in mine:
                raise InvfuncError(
                    f"copy.deepcopy(as_module({self.fn._name})): {path} is reached through a closure "
                    "(or a function's globals or defaults), which deepcopy does not copy: the copy "
                    f"would read and train the original's {type(obj).__name__}. Build the block over "
                    "the module itself (couple(module, ...), invertible(module, inverse=...)) or bind "
                    "it with functools.partial, which deepcopy copies; or build a new function for "
                    "the copy."
                )
        return new


def _arrange(into: nn.Module, fn: Any, root: str) -> list[str]:
    """Register under ``into`` the modules and parameters ``fn`` reaches, arranged as
    the function is (NOTE [A module around a function], rule 1); return the paths of
    tensors that require grad but cannot be registered."""
    if isinstance(fn, Chain):
        blocks = nn.ModuleList()
        into.add_module("blocks", blocks)
        loose: list[str] = []
        for i, b in enumerate(fn.blocks):
            holder = Part(b._name)
            loose += _arrange(holder, b, f"{root}.blocks[{i}]")
            blocks.append(holder)
        return loose
    if isinstance(fn, Coupling):
        loose = []
        for name, half in (("F", fn.F), ("G", fn.G)):
            if isinstance(half, nn.Module):
                into.add_module(name, half)
            elif half is not None:
                holder = Part(_name(half))
                loose += _arrange_walk(holder, half, f"{root}.{name}")
                if any(True for _ in holder.children()) or any(True for _ in holder.parameters()):
                    into.add_module(name, holder)
        return loose
    return _arrange_walk(into, fn, root)


def _arrange_walk(into: nn.Module, fn: Any, root: str) -> list[str]:
    loose = []
    for path, obj, _ in walk(fn, root):
        name = _attribute(path[len(root) :]) or "module"
        if isinstance(obj, nn.Module):
            into.add_module(_free_name(into, name), obj)
        elif isinstance(obj, nn.Parameter):
            into.register_parameter(_free_name(into, name), obj)
        elif obj.requires_grad:
            loose.append(path)
    return loose


def _attribute(path: str) -> str:
    """A module attribute name for a walk path: ``.conv`` -> ``conv``, ``.args[0]`` -> ``args_0``."""
    return re.sub(r"\W+", "_", path).strip("_")


def _free_name(into: nn.Module, name: str) -> str:
    taken = {n for n, _ in into.named_children()} | {n for n, _ in into.named_parameters(recurse=False)}
    taken |= {n for n, _ in into.named_buffers(recurse=False)} | set(vars(into))
    if name not in taken and not hasattr(type(into), name):
        return name
    k = 1
    while f"{name}_{k}" in taken:
        k += 1
    return f"{name}_{k}"


def as_module(fn: Invertible) -> InvertibleModule:
    """An ``nn.Module`` around an invertible function: ``forward`` is
    :func:`invfunc.invertible_call` of it, ``.inverse`` of its inverse.

    ``parameters()`` and ``named_parameters()`` reach every module the function calls
    (F and G of couplings, modules held by closures or ``functools.partial``) and every
    ``nn.Parameter`` it reads, once each even when shared; ``.to()``, ``.double()``,
    ``state_dict``/``load_state_dict``, ``train()``/``eval()``, ``nn.Sequential``,
    ``torch.func.functional_call``, ``copy.deepcopy`` and DDP work as for any module.
    The modules are the function's own, not copies: training the module trains the
    function. A tensor requiring grad that is not an ``nn.Parameter`` cannot be listed
    (a warning names it). See NOTE [A module around a function].

    Args:
        fn: an :class:`~invfunc.Invertible` (a chain, a coupling, a user function).

    Returns:
        The module. ``module(*args, mode=..., keep=..., free=..., verify=...)`` runs
        ``invertible_call(fn, *args, ...)``; ``module.inverse(*args)`` the inverse.

    Examples:
        >>> import torch, invfunc as inv
        >>> torch.manual_seed(0) is not None
        True
        >>> net = inv.chain(*[inv.couple(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)) for _ in range(3)])
        >>> model = inv.as_module(net)
        >>> sum(p.numel() for p in model.parameters())
        36
        >>> next(iter(model.state_dict()))
        'blocks.0.F.weight'
        >>> x = torch.randn(5, 4)
        >>> torch.allclose(model.inverse(model(x)), x, atol=1e-6)
        True
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> model(x).square().mean().backward()
        >>> opt.step()
    """
    if not isinstance(fn, Invertible):
        raise TypeError(
            f"invfunc.as_module(fn): fn must be an Invertible, got {_name(fn)} ({type(fn).__name__}); "
            "wrap it with invfunc.invertible(fn, inverse=...) or build it with invfunc.couple / "
            "invfunc.chain."
        )
    return InvertibleModule(fn)
