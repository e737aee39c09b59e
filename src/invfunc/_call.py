"""``invertible_call``: validate, then run a composite block by block."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch

from . import _compat
from ._apply import apply_block, free_call_inputs, report_kept
from ._at import At
from ._chain import Chain, with_ladj
from ._core import Invertible, _name
from ._errors import InvertibilityWarning
from ._explain import _reports
from ._halves import _Halves, pairs_inside
from ._modes import check_mode, current_mode
from ._plan import Plan
from ._replay import AutocastState
from ._state import replaying
from ._verify import check_policy, current_policy

__all__ = ["invertible_call"]


def invertible_call(
    fn: Invertible,
    *args: Any,
    mode: str | None = None,
    keep: Sequence[int | torch.Tensor] = (),
    free: Sequence[int | torch.Tensor] = (),
    verify: str | None = None,
    **kwargs: Any,
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
        fn: an :class:`Invertible`, or a :class:`Plan` (see :func:`invfunc.plan`),
            whose blocks each run in their own mode.
        *args: its data inputs followed by its parameters.
        mode: ``"invertible"`` (free inputs, rebuild them), ``"checkpoint"`` (keep
            inputs, recompute intermediates) or ``"plain"`` (ordinary autograd).
            Default: the ambient :func:`invfunc.mode`, else ``"invertible"``. Not with
            a plan, whose modes take precedence over the ambient mode.
        keep: inputs never freed, as positions in ``args`` or as the tensors.
        free: leaf inputs (user data, such as a batch from a data loader) that may be
            freed like intermediates, as positions in ``args`` or as the tensors. Leaves
            are kept by default; a leaf named here is freed when the other rules allow
            it (not a parameter, not a view, storage unshared) and after the backward it
            holds the inverse's reconstruction, equal to the original up to round-off.
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
    if kwargs:
        raise TypeError(
            f"invfunc.invertible_call({_name(fn)}, *args, {', '.join(f'{k}=...' for k in kwargs)}): "
            "keyword arguments are not passed to the function (invertibles take positional "
            "arguments: data inputs, then parameters); the call itself takes only mode=, keep=, "
            "free= and verify=. Pass them positionally, or bind them with functools.partial "
            "before invfunc.invertible(...)."
        )
    if torch.compiler.is_compiling():
        # NOTE [torch.compile]: the call is a graph break; it runs eagerly, with freeing.
        return _eager_call()(fn, *args, mode=mode, keep=keep, free=free, verify=verify)
    return _call(fn, args, mode, keep, free, verify)


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
    free: Sequence[int | torch.Tensor],
    verify: str | None,
) -> Any:
    if not isinstance(fn, Invertible):
        raise TypeError(
            f"invfunc.invertible_call(fn, *args): fn must be an Invertible, got {_name(fn)} "
            f"({type(fn).__name__}); wrap it with invfunc.invertible(fn, inverse=...) or build it "
            "with invfunc.couple / invfunc.chain."
        )
    if isinstance(fn, Plan):  # a mode per block: NOTE [A mode per block]
        run_mode = fn.call_mode(mode)
    else:
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
    asked = run_mode
    why = _compat.can_free() if run_mode == "invertible" else None
    if why is not None:
        run_mode = "checkpoint"  # NOTE [Torch versions]: this torch cannot free safely
        _kept_whole_call(fn, why)
    if run_mode == "invertible" and _compat.saved_tensors_hooks_active():
        # NOTE [Saved-tensor hooks]: what the hooks pack (a copy, or nothing until a
        # recompute, as inside torch.utils.checkpoint) is not the storage invfunc would
        # refill; freeing under them could hand autograd freed memory. Keep inputs instead.
        run_mode = "checkpoint"
        _kept_whole_call(fn, "saved-tensor hooks are active (e.g. inside torch.utils.checkpoint)")
    named = _Named(fn, args, keep, free)
    policy = current_policy()
    if verify is not None:
        policy = (check_policy(verify, f"invfunc.invertible_call({fn._name}, ..., verify=...)"), policy[1])
    if run_mode == "invertible" and policy[0] == "off":
        data = args[: fn._n_data(args)]  # the stream: trailing parameters may be of any dtype
        half = next((a.dtype for a in data if isinstance(a, torch.Tensor) and a.dtype in _HALF), None)
        if half is not None and not all(b._exact for b in fn._flatten()):  # (exact: no drift)
            run_mode = _half_stream(fn, half)
    blocks, out, extras = fn._plan(args)
    modes = fn.block_modes() if isinstance(fn, Plan) else None  # None: every block in run_mode
    if modes is None and not any(
        named.free_leaf(i, a) and not a.requires_grad
        for i, a in enumerate(out)
        if isinstance(a, torch.Tensor)
    ):
        # (a split block first would read nothing that requires grad: a plain call, which
        # could not rebuild a batch named in free=; the couplings then take it themselves)
        blocks, extras = pairs_inside(blocks, extras, out)
    elif modes is None:
        blocks, extras = _leading_reads(blocks, extras)
    # (an "invertible" block of a plan runs in run_mode: NOTE [A mode per block], rule 4)
    block_modes = (
        [run_mode] * len(blocks) if modes is None else [run_mode if m == "invertible" else m for m in modes]
    )
    out, total, first, labels = _run_blocks(blocks, out, extras, block_modes, run_mode, named, policy)
    if block_modes[0] == "invertible" and first is not None:
        free_call_inputs(first, args, named.keep_input, named.free_leaf)  # inputs lead the arguments
    elif block_modes[0] == "plain":
        _kept_whole_call(fn, "the plan runs its first block in mode 'plain' (ordinary autograd)")
    elif run_mode == asked:  # (a call kept whole for a reason of its own reported it already)
        report_kept(labels[0], args[: fn._n_data(args)], block_modes[0], named.keep_input, named.free_leaf)
    return with_ladj(out, total) if fn._ladj is True else out


class _Named:
    """Which of a call's inputs ``keep=`` and ``free=`` name, and which leaves between
    blocks the call made itself (NOTE [Freeing rules])."""

    def __init__(
        self,
        fn: Invertible,
        args: Sequence[Any],
        keep: Sequence[int | torch.Tensor],
        free: Sequence[int | torch.Tensor],
    ) -> None:
        self.keep_pos, self.keep_ids = _named_inputs(fn, args, keep, "keep")
        self.free_pos, self.free_ids = _named_inputs(fn, args, free, "free")
        if self.free_pos or self.free_ids:
            _check_free(fn, args, self.keep_pos, self.keep_ids, self.free_pos, self.free_ids)
        self.arg_ids = {id(a) for a in args}

    def keep_input(self, i: int, t: torch.Tensor) -> bool:
        return i in self.keep_pos or id(t) in self.keep_ids

    def keep_none(self, i: int, t: torch.Tensor) -> bool:
        return id(t) in self.keep_ids

    def free_leaf(self, i: int, t: torch.Tensor) -> bool:
        return i in self.free_pos or id(t) in self.free_ids

    def inner_leaf(self, i: int, t: torch.Tensor) -> bool:
        # A leaf between blocks was made inside the call (a block run as a plain call
        # because nothing it reads requires grad), unless a block handed on one of the
        # caller's own tensors unchanged (a one-sided coupling's second half).
        return id(t) not in self.arg_ids


def _run_blocks(
    blocks: Sequence[Invertible],
    out: Any,
    extras: Sequence[tuple[Any, ...]],
    modes: Sequence[str],
    run_mode: str,
    named: _Named,
    policy: tuple[Any, float | None],
) -> tuple[Any, torch.Tensor | None, Any, list[str]]:
    """Each block as one node of the graph, in its mode: (the last block's output, the
    sum of the log-dets, the state of the block that received the caller's inputs, the
    blocks' labels)."""
    single = False
    state = first = None
    total: torch.Tensor | None = None
    labels = _labels(blocks)
    autocast = AutocastState()
    # NOTE [Outputs in the memory of the input they replace]: inputs freed right after
    # their block (the caller's, in a call of one block; those between blocks) may lend
    # their memory to its output; apply_block decides as that freeing will
    lend_first = named.free_leaf if len(blocks) == 1 else None
    for k, block in enumerate(blocks):
        cur = out if not single else (out,)
        if extras[k]:
            cur = (*cur, *extras[k])
        pre: tuple[Any, ...] = ()
        post: tuple[Any, ...] = ()
        if k > 0 and isinstance(block, At):  # NOTE [Acting at a position], rule 5
            pre, block, cur, post = block.unwrap(cur)
        if modes[k] == "plain":  # ordinary autograd, inside the loop
            res = block(*cur)
            single = isinstance(res, torch.Tensor)
            out, state = (res,) if single else res, None
        else:
            out, single, state = apply_block(
                block,
                cur,
                mode=modes[k],
                guard=k == 0,
                keep=named.keep_input if k == 0 else named.keep_none,
                autocast=autocast,
                leaves=None if k == 0 else named.inner_leaf,
                previous=state,
                policy=policy,
                label=labels[k],
                lend=None if run_mode != "invertible" else lend_first if k == 0 else named.inner_leaf,
            )
        if k == 0:
            first = state  # the block that received the caller's inputs
        if block._ladj is True:  # NOTE [Log-determinants], rule 3: summed here
            *made, ladj = out
            out, single = tuple(made), len(made) == 1
            total = ladj if total is None else total + ladj
        if pre or post:
            out, single = (*pre, *out, *post), False
        if single:
            out = out[0]
    return out, total, first, labels


_HALF = (torch.float16, torch.bfloat16)


def _leading_reads(
    blocks: list[Invertible], extras: list[tuple[Any, ...]]
) -> tuple[list[Invertible], list[tuple[Any, ...]]]:
    """NOTE [A batch freed through parameterless blocks]: a batch named in ``free=`` needs
    no grad, and blocks that read no parameters (``squeeze``, a permutation) run on it as
    plain calls, which cannot rebuild it. The leading such blocks, known to read nothing
    (NOTE [Static discovery]), are run as one block with the first block that may read
    parameters: that block's node frees the batch and rebuilds it through them."""
    j = 0
    while j < len(blocks) - 1 and not extras[j]:
        static = blocks[j]._static_sections()
        if static is None or any(reads for reads, _ in static.values()):
            break
        j += 1
    if j == 0 or extras[j]:
        return blocks, extras
    return [Chain(blocks[: j + 1]), *blocks[j + 1 :]], [(), *extras[j + 1 :]]


def _half_stream(fn: Invertible, dtype: torch.dtype) -> Literal["checkpoint"]:
    """NOTE [Half-precision streams]: an input rebuilt in float16 or bfloat16 loses the bits
    its round-off drops at every block (measured: 1e-2 relative at depth 8, order 1 at
    depth 128 in bfloat16), so such a call keeps its inputs (mode "checkpoint") unless
    drift is being verified. Under autocast with a float32 stream the couplings' additions
    stay float32 and nothing changes."""
    why = (
        f"its inputs are {dtype}: rebuilt in that precision they drift (run as mode='checkpoint'; "
        "keep the stream in float32 under autocast, or verify drift with verify='raise' to free them)"
    )
    _kept_whole_call(fn, why)
    warnings.warn(f"invfunc.invertible_call({fn._name}): {why}", InvertibilityWarning, stacklevel=4)
    return "checkpoint"


def _kept_whole_call(fn: Invertible, why: str) -> None:
    """Report to explain() that the call frees none of its inputs, and why (index -1)."""
    for rep in _reports():
        rep.kept.append((fn._name, -1, why))


def _labels(blocks: Sequence[Invertible]) -> list[str]:
    """How errors and reports name each block: counted among the caller's blocks. The split
    and the join that run a chain with pairs inside (NOTE [Pairs inside a chain]) are named
    after the caller's block whose input or output they are."""
    n_user = sum(not isinstance(b, _Halves) for b in blocks)
    names: list[str] = []
    k = 0
    for block in blocks:
        if not isinstance(block, _Halves):
            k += 1
            names.append(block._name if n_user == 1 else f"{block._name}, block {k} of {n_user}")
    labels: list[str] = []
    k = 0
    for block in blocks:
        if isinstance(block, _Halves):
            if block.join:
                labels.append(f"{names[k - 1]}: its output halves, joined")
            else:
                labels.append(f"{names[k]}: its input, split into halves")
        else:
            labels.append(names[k])
            k += 1
    return labels


def _named_inputs(
    fn: Invertible, args: Sequence[Any], names: Sequence[int | torch.Tensor], option: str
) -> tuple[set[int], set[int]]:
    """The positions and tensor ids named by ``keep=`` or ``free=``."""
    if isinstance(names, (int, torch.Tensor)):
        names = (names,)
    pos: set[int] = set()
    ids: set[int] = set()
    for k in names:
        if isinstance(k, torch.Tensor):
            ids.add(id(k))
        elif isinstance(k, int) and not isinstance(k, bool) and -len(args) <= k < len(args):
            pos.add(k % len(args))
        else:
            raise ValueError(
                f"invfunc.invertible_call({fn._name}, ..., {option}=...): {k!r} is neither a tensor nor a "
                f"position among the {len(args)} arguments; pass positions (0 for the first) or the tensors."
            )
    return pos, ids


def _check_free(
    fn: Invertible,
    args: Sequence[Any],
    keep_pos: set[int],
    keep_ids: set[int],
    free_pos: set[int],
    free_ids: set[int],
) -> None:
    """``free=`` names data inputs only, none of them also in ``keep=``, no parameter."""
    n_data = fn._n_data(args)
    where = f"invfunc.invertible_call({fn._name}, ..., free=...)"
    data_ids = {id(t): i for i, t in enumerate(args[:n_data])}
    for i in sorted(free_pos | {data_ids.get(k, -1) for k in free_ids}):
        if i < 0 or i >= n_data:
            what = f"argument {i}" if i >= 0 else "a tensor that"
            raise ValueError(
                f"{where}: {what} is not a data input of the call (the first {n_data} argument(s)); "
                "only data inputs are ever freed."
            )
        t = args[i]
        if i in keep_pos or id(t) in keep_ids:
            raise ValueError(f"{where}: input {i} is named in both keep= and free=; name it in one.")
        if isinstance(t, torch.nn.Parameter):
            raise ValueError(f"{where}: input {i} is an nn.Parameter; parameters are never freed.")
