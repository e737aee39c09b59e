"""``invertible_call``: validate, then run a composite block by block."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._autograd import _EXPLAIN, apply_block, free_call_inputs, replaying
from ._combinators import pairs_inside
from ._core import Invertible, _name
from ._modes import check_mode, current_mode
from ._replay import AutocastState
from ._verify import check_policy, current_policy

__all__ = ["invertible_call"]


def invertible_call(
    fn: Invertible,
    *args: Any,
    mode: str | None = None,
    keep: Sequence[int | torch.Tensor] = (),
    verify: str | None = None,
) -> Any:
    """Run an invertible function so that its inputs need not be kept for backward.

    Each block of ``fn`` (a :func:`chain` is its blocks in a row) becomes one autograd
    node. After a block's forward its data inputs are freed when that is provably safe
    (not a leaf, not a view, storage not shared: see :func:`invfunc.explain`); in
    backward they are rebuilt from the outputs by the inverse, refilled in place,
    and the block is differentiated. Gradients reach every tensor the function reads
    that requires grad: arguments, module parameters and tensors captured by
    closures, with ``.backward()`` and ``torch.autograd.grad`` alike. Dropout and
    other random ops replay exactly; BatchNorm statistics update once; autocast
    replays. With grad disabled, or nothing requiring grad, it is a plain call.

    Args:
        fn: an :class:`Invertible`.
        *args: its data inputs followed by its parameters.
        mode: ``"invertible"`` (free inputs, rebuild them), ``"checkpoint"`` (keep
            inputs, recompute intermediates) or ``"plain"`` (ordinary autograd).
            Default: the ambient :func:`invfunc.mode`, else ``"invertible"``.
        keep: inputs never freed, as positions in ``args`` or as the tensors.
        verify: ``"raise"``, ``"warn"`` or ``"off"``: check in backward that every rebuilt
            input matches a fingerprint taken in the forward (see :func:`invfunc.verify`).
            Default: the ambient :func:`invfunc.verify` policy, else ``"off"``.

    Returns:
        What ``fn(*args)`` returns.

    Examples:
        >>> import torch, invfunc as inv
        >>> torch.manual_seed(0) is not None
        True
        >>> F, G = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        >>> net = inv.chain(inv.couple(F, G), inv.couple(G, F))
        >>> x = torch.randn(8, 8, requires_grad=True)
        >>> h = x * 2                                  # an intermediate: freed by the call
        >>> y = inv.invertible_call(net, h)
        >>> h.untyped_storage().nbytes()
        0
        >>> y.square().mean().backward()               # h is rebuilt on the way
        >>> ref = x.detach().requires_grad_()
        >>> net(ref * 2).square().mean().backward()
        >>> torch.allclose(x.grad, ref.grad, atol=1e-6)
        True
    """
    if torch.compiler.is_compiling():
        # NOTE [torch.compile]: the call is a graph break; it runs eagerly, with freeing.
        return _eager_call()(fn, *args, mode=mode, keep=keep, verify=verify)
    return _call(fn, args, mode, keep, verify)


_EAGER: list[Any] = []


def _eager_call() -> Any:
    if not _EAGER:
        _EAGER.append(torch.compiler.disable(invertible_call, recursive=True))  # type: ignore[no-untyped-call]
    return _EAGER[0]


def _call(
    fn: Invertible,
    args: tuple[Any, ...],
    mode: str | None,
    keep: Sequence[int | torch.Tensor],
    verify: str | None,
) -> Any:
    if not isinstance(fn, Invertible):
        raise TypeError(
            f"invfunc.invertible_call(fn, *args): fn must be an Invertible, got {_name(fn)} "
            f"({type(fn).__name__}); wrap it with invfunc.invertible(fn, inverse=...) or build it "
            "with invfunc.couple / invfunc.chain."
        )
    run_mode = (
        current_mode()
        if mode is None
        else check_mode(mode, f"invfunc.invertible_call({fn._name}, ..., mode=...)")
    )
    if not args:
        raise TypeError(f"invfunc.invertible_call({fn._name}, *args): no inputs given.")
    fn._check_arity(args, "invertible_call")
    if run_mode == "plain" or not torch.is_grad_enabled() or replaying():
        return fn(*args)
    if run_mode == "invertible" and _saved_tensors_hooks_active():
        # NOTE [Saved-tensor hooks]: what the hooks pack (a copy, or nothing until a
        # recompute, as inside torch.utils.checkpoint) is not the storage invfunc would
        # refill; freeing under them could hand autograd freed memory. Keep inputs instead.
        run_mode = "checkpoint"
        for rep in _EXPLAIN:
            rep.kept.append(
                (fn._name, -1, "saved-tensor hooks are active (e.g. inside torch.utils.checkpoint)")
            )
    keep_pos, keep_ids = _keep_sets(fn, args, keep)
    policy = current_policy()
    if verify is not None:
        policy = (check_policy(verify, f"invfunc.invertible_call({fn._name}, ..., verify=...)"), policy[1])

    def keep_input(i: int, t: torch.Tensor) -> bool:
        return i in keep_pos or id(t) in keep_ids

    def keep_none(i: int, t: torch.Tensor) -> bool:
        return id(t) in keep_ids

    autocast = AutocastState()
    blocks, out, last_params = fn._plan(args)
    if not last_params:
        blocks = pairs_inside(blocks, out)
    single = False
    state = first = None
    for k, block in enumerate(blocks):
        cur = out if not single else (out,)
        if k == len(blocks) - 1:
            cur = (*cur, *last_params)
        label = f"{block._name}, block {k + 1} of {len(blocks)}" if len(blocks) > 1 else block._name
        out, single, state = apply_block(
            block,
            cur,
            mode=run_mode,
            guard=k == 0,
            keep=keep_input if k == 0 else keep_none,
            autocast=autocast,
            previous=state,
            policy=policy,
            label=label,
        )
        if k == 0:
            first = state  # the block that received the caller's inputs
        if single:
            out = out[0]
    if run_mode == "invertible" and first is not None:
        free_call_inputs(first, args, keep_input)  # inputs are the leading arguments
    return out


def _saved_tensors_hooks_active() -> bool:
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def _keep_sets(
    fn: Invertible, args: Sequence[Any], keep: Sequence[int | torch.Tensor]
) -> tuple[set[int], set[int]]:
    if isinstance(keep, (int, torch.Tensor)):
        keep = (keep,)
    pos: set[int] = set()
    ids: set[int] = set()
    for k in keep:
        if isinstance(k, torch.Tensor):
            ids.add(id(k))
        elif isinstance(k, int) and not isinstance(k, bool) and -len(args) <= k < len(args):
            pos.add(k % len(args))
        else:
            raise ValueError(
                f"invfunc.invertible_call({fn._name}, ..., keep=...): {k!r} is neither a tensor nor a "
                f"position among the {len(args)} arguments; pass positions (0 for the first) or the tensors."
            )
    return pos, ids
