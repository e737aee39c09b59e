"""Shared helpers for the engine tests (not collected as tests)."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

import invfunc as inv

#: Tolerances for float64 comparisons with plain autograd.
F64 = {"rtol": 1e-10, "atol": 1e-12}


def freed(t: torch.Tensor) -> bool:
    """Whether ``t``'s storage holds no bytes, read without rebuilding a guarded tensor."""
    with torch._C.DisableTorchFunctionSubclass():
        return t.untyped_storage().nbytes() == 0


def mlp(h: int, act: type[torch.nn.Module] = torch.nn.Tanh) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(h, h), act(), torch.nn.Linear(h, h))


def revnet(
    depth: int, h: int, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[inv.Invertible, list[torch.Tensor]]:
    """A chain of ``depth`` couplings with MLP F and G, and its parameters."""
    torch.manual_seed(seed)
    blocks = [inv.couple(mlp(h).to(dtype), mlp(h).to(dtype)) for _ in range(depth)]
    params = [p for b in blocks for m in (b.F, b.G) for p in m.parameters()]
    return inv.chain(*blocks), params


def grads_of(
    run: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    use_grad: bool,
) -> list[torch.Tensor]:
    """Gradients of ``run(x * 1).square().mean()`` for x and params, by backward() or autograd.grad."""
    x = x.detach().requires_grad_()
    out = run(x * 1)
    loss = out.square().mean()
    wrt = [x, *params]
    if use_grad:
        return list(torch.autograd.grad(loss, wrt))
    for t in wrt:
        t.grad = None
    loss.backward()
    got = [t.grad.clone() for t in wrt]  # type: ignore[union-attr]
    for t in wrt:
        t.grad = None
    return got


def assert_all_close(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], **tol: float) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, msg=lambda m, i=i: f"tensor {i}: {m}", **tol)


def saved_bytes(root: torch.Tensor) -> int:
    """Bytes held by the storages that autograd nodes reachable from ``root`` saved.

    A deterministic measure of activation memory: unique storages (by address), live
    bytes only (a freed storage counts 0). Parameters (leaves) are excluded.
    """
    seen_nodes: set[int] = set()
    alive: list[object] = []  # (older torch makes a new node wrapper per access: ids get reused)
    storages: dict[int, int] = {}
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        alive.append(node)
        tensors: list[torch.Tensor] = []
        try:
            tensors.extend(getattr(node, "saved_tensors", ()))
        except RuntimeError:
            # released, or freed by invfunc while its version counter is advanced
            # (NOTE [Refilling without a trace]): holds no bytes either way
            pass
        for name in dir(node):
            if name.startswith("_saved_"):
                v = getattr(node, name)
                if isinstance(v, torch.Tensor):
                    tensors.append(v)
                elif isinstance(v, (tuple, list)):
                    tensors.extend(t for t in v if isinstance(t, torch.Tensor))
        for t in tensors:
            if t.is_leaf and t.requires_grad:
                continue
            s = t.untyped_storage()
            storages[s.data_ptr() or id(s)] = s.nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(storages.values())


@contextlib.contextmanager
def script(path: Path, prefix: str) -> Iterator[types.ModuleType]:
    """The script at ``path`` (in a folder that is not a package: ``benchmarks/``,
    ``examples/``) as a module named ``prefix_<stem>``; its folder is on ``sys.path``, for
    the scripts it imports, while the context is open."""
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(f"{prefix}_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(folder)
