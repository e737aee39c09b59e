"""Discrete choices a block makes in its forward, kept and replayed in backward.

NOTE [Discrete choices]

In backward a block is re-run on its rebuilt input, which differs from the forward's by
round-off. A smooth function then differs by round-off too, but a choice sitting near a
tie can flip: an ``argmax`` picks another bucket, ``topk`` another expert, a comparison
another side. Its result then jumps by O(1), the block computes something else than in
the forward, the rebuilt inputs below it are wrong and so are the gradients, silently.
So the recompute makes the forward's choices, not its own:

1. A *choice* is (a) a result of integer or boolean dtype computed from a floating-point
   tensor: ``argmax``/``argmin``, the indices of ``topk``, ``sort``, ``max``/``min``
   along a dim, ``kthvalue``, ``median``, ``mode``, ``cummax``/``cummin``, ``argsort``,
   ``bucketize``/``searchsorted``, comparisons (``>``, ``eq``, ``isclose``, ``isnan``, ...),
   ``nonzero``/``where(cond)``, ``any``/``all``, ``multinomial``, casts to an integer or
   boolean dtype, and any other op of that signature; (b) a floating-point result that
   takes integer values (``round``, ``floor``, ``ceil``, ``trunc``, ``sign``,
   ``floor_divide``: quantisation); (c) a Python value read from a floating-point tensor
   (``item``, ``tolist``, ``bool()``, ``int()``, ``float()``, ``equal``, ``allclose``),
   which is what a data-dependent Python branch reads.
2. While a block's forward is recorded (NOTE [Recording and replaying a block]), the
   choices of each section are kept in the order they are made, compactly: indices in
   the smallest integer dtype that holds them, booleans as bits, integer-valued floats as
   small integers where they fit. They live as long as the graph (a second backward
   replays them again); :func:`invfunc.explain` reports their bytes.
3. In a replay (the recompute in backward), the k-th op of the section that makes a
   choice still runs (it may draw random numbers, and its output gives the result's
   structure), then its integer or boolean results are replaced by the forward's and the
   floating-point values an index op returns alongside are gathered from its input at
   the forward's indices, so their gradient goes where plain autograd's goes. A Python
   value is handed back without running the op.
4. A replay that makes another sequence of choices (another op, another result shape,
   more or fewer choices) is a divergence (NOTE [Recompute divergence]), never a
   silently different gradient.
5. Not choices: the masks inside single activation ops (``relu``, ``hardtanh``,
   ``max_pool``, ``leaky_relu``...). At a flip their value moves by round-off only and one
   element's derivative steps, as float32 against float64 plain autograd does; keeping
   every such mask would cost memory out of proportion. A comparison written out by hand
   (``x * (x > 0)``) is a choice and costs one bit per element.

NOTE [Recompute divergence]

What no rule above covers (an op that is not seen as a choice: ``remainder``,
``F.gumbel_softmax(hard=True)``, ``grid_sample`` in nearest mode; a Python branch on
something else than a tensor) is detected: the forward keeps a checksum of each
recorded section's output (sums over chunks of 512 elements, in the output's precision:
one reduction, 0.2 % of the output's bytes), and the recompute's output is compared with
it. A chunk whose sum moved by more than the
tolerance (:data:`RECOMPUTE_RTOL`: 1e-3 for float32) times its L2 norm means the
recompute is not the forward's computation: warned with :class:`InvertibilityWarning`
(raised as :class:`InvfuncError` under ``invfunc.verify("raise")``), and reported to
:func:`invfunc.explain` as ``diverged``. Round-off moves a chunk's sum by about the
output's relative drift times its L2 norm (random signs add up as the norm does); one
element that jumps by the chunk's root mean square moves it by 1/sqrt(512) of the norm,
4e-2, well past the tolerance. Blocks whose reads are known statically
(built-in modules, NOTE [Static discovery]) make no choices and are not checked.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._compat import is_wrapped

__all__ = ["Checksum", "Choice", "choice_of", "is_choice", "may_choose", "replay_choice"]

_Tensor = torch.Tensor

#: Ops whose floating-point result takes integer values: a choice (rule 1b).
_INTEGRAL = frozenset(
    {"round", "floor", "ceil", "trunc", "fix", "sign", "sgn", "floor_divide", "__floordiv__", "__rfloordiv__"}
)
#: Ops that read a Python value from a tensor (rule 1c).
_PYTHON_VALUES = frozenset(
    {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "equal", "allclose"}
)
#: Ops returning (values, indices) where ``values == input.gather(dim, indices)``: name ->
#: (position of ``dim``, its default or None if required, position of ``keepdim`` or None).
_GATHERED: dict[str, tuple[int, int | None, int | None]] = {
    "topk": (2, -1, None),
    "sort": (1, -1, None),
    "max": (1, None, 2),
    "min": (1, None, 2),
    "kthvalue": (2, -1, 3),
    "median": (1, None, 2),
    "nanmedian": (1, None, 2),
    "mode": (1, -1, 2),
    "cummax": (1, None, None),
    "cummin": (1, None, None),
}
#: Ops whose output does not depend on the input's values (factories, reinterpretations).
_NOT_CHOICES = frozenset({"view", "view_as", "to_sparse", "int_repr", "q_per_channel_axis", "randint_like"})

#: Tensors of at least this many elements are packed (bits, small integer dtypes).
_PACK_MIN = 256


def _name(func: Callable[..., Any]) -> str:
    return getattr(func, "__name__", "")


def _reads_float(args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    for a in (*args, *kwargs.values()):
        if isinstance(a, _Tensor):
            if a.is_floating_point():
                return True
        elif type(a) in (list, tuple):
            if any(isinstance(b, _Tensor) and b.is_floating_point() for b in a):
                return True
    return False


def _discrete(t: object) -> bool:
    return isinstance(t, _Tensor) and not (t.is_floating_point() or t.is_complex())


class Packed:
    """An integer or boolean tensor kept compactly (rule 2), unpacked to a fresh tensor."""

    __slots__ = ("data", "dtype", "numel", "shape")

    def __init__(self, t: _Tensor, bound: int | None = None) -> None:
        t = t.detach()
        self.dtype, self.shape, self.numel = t.dtype, t.shape, t.numel()
        if self.numel < _PACK_MIN or t.is_nested or t.layout != torch.strided:
            self.data = t.clone()
        elif t.dtype == torch.bool:
            flat = t.reshape(-1)
            pad = -self.numel % 8
            if pad:
                flat = torch.cat([flat, flat.new_zeros(pad)])
            bits = flat.view(-1, 8).to(torch.uint8) << _shifts(t.device)
            self.data = bits.sum(1, dtype=torch.uint8)
        else:
            self.data = _narrowed(t, bound)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def unpack(self) -> _Tensor:
        d = self.data
        if d.dtype == self.dtype and d.shape == self.shape:
            return d.clone()
        if self.dtype == torch.bool:
            bits = (d.unsqueeze(1) >> _shifts(d.device)) & 1
            return bits.reshape(-1)[: self.numel].to(torch.bool).reshape(self.shape)
        return d.to(self.dtype).reshape(self.shape)


_SHIFTS: dict[torch.device, _Tensor] = {}


def _shifts(device: torch.device) -> _Tensor:
    got = _SHIFTS.get(device)
    if got is None:
        got = _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return got


_SMALL = ((torch.int8, 1 << 7), (torch.int16, 1 << 15), (torch.int32, 1 << 31))


def _narrowed(t: _Tensor, bound: int | None) -> _Tensor:
    """``t`` (integer, or floating with integer values) in the smallest integer dtype that
    holds it; a copy of ``t`` where none does. ``bound``: a known bound on ``|t|``, which
    spares the scan (indices into a dim of that size)."""
    if t.dtype in (torch.int8, torch.uint8):
        return t.clone()
    if bound is None:
        if t.is_cuda:  # a scan would synchronize with the host
            return t.clone()
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return t.clone()
        lo, hi = torch.aminmax(t)
        bound = int(max(-float(lo), float(hi))) + 1
        if t.is_floating_point() and not bool((t == t.trunc()).all()):
            return t.clone()  # not integer-valued after all (round(..., decimals=2))
    for dtype, limit in _SMALL:
        if bound < limit and dtype.itemsize < t.element_size():
            return t.to(dtype)
    return t.clone()


class Choice:
    """One choice of a section: the op, and its integer results or its Python value."""

    __slots__ = ("func", "results", "value")

    def __init__(
        self, func: Callable[..., Any], results: list[tuple[int, Packed]] | None, value: Any
    ) -> None:
        self.func = func
        self.results = results  # (position in the output, or -1 for a single tensor; result)
        self.value = value

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for _, p in self.results or ())

    @property
    def name(self) -> str:
        return _name(self.func)


def is_choice(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], out: Any) -> bool:
    """Whether this op (with its output ``out``; ``None`` before it ran, for Python
    values) makes a choice (NOTE [Discrete choices], rule 1)."""
    name = _name(func)
    if name in _PYTHON_VALUES:
        return _reads_float(args, kwargs)
    if isinstance(out, _Tensor):
        if out.is_floating_point():
            return name in _INTEGRAL
        if out.is_complex():
            return False
    elif type(out) is torch.Size or not isinstance(out, tuple) or not any(_discrete(o) for o in out):
        return False
    if name in _NOT_CHOICES or name.endswith("_like") or name.startswith("new_"):
        return False
    return _reads_float(args, kwargs)


def may_choose(func: Callable[..., Any], out: Any) -> bool:
    """A cheap first look, for every op a tracer sees: False when ``out`` cannot be a
    choice (a floating-point tensor from an op that is not integer-valued)."""
    return not isinstance(out, _Tensor) or not out.is_floating_point() or _name(func) in _INTEGRAL


def choice_of(
    func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], out: Any
) -> Choice | None:
    """The choice this op made in the forward, kept (rule 2), or None if it made none."""
    if not is_choice(func, args, kwargs, out):
        return None
    if _name(func) in _PYTHON_VALUES:
        return Choice(func, None, copy.deepcopy(out))
    bound = _bound(func, args, kwargs)  # None for integer-valued floats: scanned instead
    if isinstance(out, _Tensor):
        return Choice(func, [(-1, Packed(out, bound))], None)
    return Choice(func, [(i, Packed(o, bound)) for i, o in enumerate(out) if _discrete(o)], None)


def _bound(func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> int | None:
    """A bound on the indices an index op returns: the size of the dim it reduces."""
    name = _name(func)
    if not args or not isinstance(args[0], _Tensor):
        return None
    x = args[0]
    if name in ("argmax", "argmin", "argsort") or name in _GATHERED:
        dim = _dim(name, args, kwargs)
        if dim is None:
            return x.numel() if name in ("argmax", "argmin") else None
        return x.size(dim) if x.dim() else 1
    return None


def _dim(name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> int | None:
    if "dim" in kwargs:
        return kwargs["dim"]  # type: ignore[no-any-return]
    pos, default, _ = _GATHERED.get(name, (1, None, None))
    if len(args) > pos and isinstance(args[pos], int) and not isinstance(args[pos], bool):
        return args[pos]  # type: ignore[no-any-return]
    return default


def _keepdim(name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    pos = _GATHERED[name][2]
    if pos is None:
        return True  # topk, sort, cummax: indices have the input's shape
    if "keepdim" in kwargs:
        return bool(kwargs["keepdim"])
    return bool(args[pos]) if len(args) > pos else False


class Mismatch(Exception):
    """The replay's choice does not match the forward's (rule 4)."""


def replay_choice(
    choice: Choice, func: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], out: Any
) -> tuple[Any, int]:
    """``out`` (this op's result in the replay) with the forward's choice put back (rule 3),
    and how many elements of the results differed from what the replay chose itself."""
    if choice.func is not func:
        raise Mismatch(f"{choice.name} in the forward, {_name(func)} in the recompute")
    if choice.results is None:
        return copy.deepcopy(choice.value), 0
    if isinstance(out, _Tensor):
        kept = choice.results[0][1]
        if out.shape != kept.shape:
            raise Mismatch(f"{_name(func)} gave shape {tuple(out.shape)}, {tuple(kept.shape)} in the forward")
        value = kept.unpack().to(out.dtype)
        return value, _differ(value, out)
    items = list(out)
    changed = 0
    for i, kept in choice.results:
        if items[i].shape != kept.shape:
            raise Mismatch(
                f"{_name(func)} gave a result of shape {tuple(items[i].shape)}, "
                f"{tuple(kept.shape)} in the forward"
            )
        value = kept.unpack()
        changed += _differ(value, items[i])
        items[i] = value
    name = _name(func)
    if changed and name in _GATHERED and len(items) == 2:
        items[0] = _gather(name, args, kwargs, items[1])
    return (type(out)(items) if type(out) is not tuple else tuple(items)), changed


def _differ(kept: _Tensor, own: _Tensor) -> int:
    """How many elements of the replay's own result differ from the forward's."""
    return 0 if torch.equal(kept, own) else int((kept != own.detach()).sum())


def _gather(name: str, args: Sequence[Any], kwargs: dict[str, Any], index: _Tensor) -> _Tensor:
    """The values an index op returns with ``index``: gathered from its input, so that the
    gradient flows to the forward's choices as plain autograd's does."""
    x = args[0] if args else kwargs["input"]
    dim = _dim(name, args, kwargs)
    assert dim is not None
    if _keepdim(name, args, kwargs):
        return x.gather(dim, index)  # type: ignore[no-any-return]
    return x.gather(dim, index.unsqueeze(dim)).squeeze(dim)  # type: ignore[no-any-return]


#: How far a recomputed section's output may move before it is reported (NOTE [Recompute
#: divergence]): a chunk's sum, relative to the chunk's L2 norm, moves by about the
#: output's own relative drift; ten times the tolerance of ``invfunc.verify`` for inputs.
RECOMPUTE_RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-7,
    torch.float32: 1e-3,
    torch.float16: 5e-2,
    torch.bfloat16: 1e-1,
}


class Checksum:
    """Chunk sums of one recorded section's output (NOTE [Recompute divergence])."""

    __slots__ = ("shape", "sums")

    CHUNK = 512

    @staticmethod
    def supports(t: object) -> bool:
        return (
            type(t) is torch.Tensor
            and t.layout == torch.strided
            and not t.is_nested
            and t.is_floating_point()
            and t.device.type in ("cpu", "cuda")
            and t.numel() > 0
            and not is_wrapped(t)
        )

    def __init__(self, t: _Tensor) -> None:
        self.shape = t.shape
        self.sums, _ = _chunk_sums(t, norms=False)  # one reduction in the forward

    @property
    def nbytes(self) -> int:
        return self.sums.numel() * self.sums.element_size()

    def error(self, t: _Tensor) -> float:
        """The largest change of a chunk's sum, relative to that chunk's L2 norm (the
        recompute's: the forward's up to what is being measured)."""
        if t.shape != self.shape:
            return float("inf")
        sums, norms = _chunk_sums(t)
        # an all-zero chunk is measured against a millionth of the mean norm
        scale = norms.add_(norms.mean().mul_(1e-6).add_(1e-30))
        return float(sums.sub_(self.sums).abs_().div_(scale).max())


def _chunk_sums(t: _Tensor, *, norms: bool = True) -> tuple[_Tensor, _Tensor]:
    """Sums over chunks of ``Checksum.CHUNK`` elements, and the chunks' L2 norms, in the
    tensor's precision (float32 at least): the same values give the same sums, bit for bit,
    and the rounding of a float32 sum is far below the tolerance."""
    with torch.no_grad():
        flat = t.detach().reshape(-1)
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()
        c = Checksum.CHUNK
        m = flat.numel() // c
        parts = [flat[: m * c].view(m, c)] if m else []
        if flat.numel() > m * c:
            parts.append(flat[m * c :].view(1, -1))
        sums = [p.sum(1) for p in parts]
        sum_ = sums[0] if len(sums) == 1 else torch.cat(sums)
        if not norms:
            return sum_, sum_
        l2 = [torch.linalg.vector_norm(p, 2, dim=1) for p in parts]
        return sum_, l2[0] if len(l2) == 1 else torch.cat(l2)
