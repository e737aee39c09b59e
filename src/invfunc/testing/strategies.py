"""Hypothesis strategies: tensors, and random invertible composites to property-test.

Needs ``hypothesis`` (``pip install invfunc[testing]``). Like
``hypothesis.extra.numpy``, the strategy functions take keyword arguments only and
check them when called, raising :class:`hypothesis.errors.InvalidArgument`.

Examples:
    A property over random composites, as a user's test suite would write it:

    >>> import torch, invfunc as inv
    >>> from hypothesis import given, settings
    >>> from invfunc.testing import check_inverse, strategies
    >>> @settings(max_examples=10, derandomize=True, database=None, deadline=None)
    ... @given(strategies.composites(max_depth=3))
    ... def test_round_trip(c):
    ...     check_inverse(c.net, *c.make_input(), *c.args)
    >>> test_round_trip()
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from .._chain import chain
from .._core import Invertible, invertible
from .._coupling import couple

__all__ = ["BLOCKS", "FLOAT_DTYPES", "FORMS", "LAYERS", "Composite", "composites", "tensors"]

#: The dtypes the strategies generate.
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

#: The kinds of ``F`` and ``G`` of the couplings :func:`composites` draws.
LAYERS: dict[str, str] = {
    "linear": "an nn.Linear",
    "mlp": "an nn.Sequential of Linear, Tanh, Linear",
    "closure": "a function capturing tensors that require grad: tanh(h * a + c)",
    "function": "a function without parameters (tanh, sin or silu)",
}

#: The kinds of blocks :func:`composites` draws.
BLOCKS: dict[str, str] = {
    "coupling": "couple(F, G)",
    "one_sided": "couple(F) (G=None)",
    "inverse_coupling": "inv.inverse(couple(F, G)) used as a block",
    "scale": "x * exp(s), inverse y * exp(-s); s an argument (first block only) or captured",
    "shift": "x + b, inverse y - b; b an argument (first block only) or captured",
    "affine": "1.5 * x - 0.5, no parameters",
    "regroup": "a split of the features at a random width and a merge in the other order (a "
    "rotation of the features), blocks with other numbers of inputs and outputs",
}

#: Data forms drawn by default (one tensor split in halves by the couplings, or a pair).
FORMS: dict[str, str] = {
    "single": "one tensor of shape (batch, 2 * width)",
    "pair": "a pair of tensors of shape (batch, width)",
}


# -- checks -----------------------------------------------------------------------------


def _check_int(value: object, name: str, where: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{where}: {name}={value!r} must be an int, got {type(value).__name__}.")
    if value < minimum:
        raise InvalidArgument(f"{where}: {name}={value!r} must be at least {minimum}.")
    return value


def _check_dtype(dtype: object, where: str) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
        valid = ", ".join(str(d) for d in FLOAT_DTYPES)
        raise InvalidArgument(f"{where}: dtype={dtype!r} is not supported; valid dtypes are {valid}.")
    return dtype


def _check_choices(value: object, name: str, table: dict[str, str], where: str) -> tuple[str, ...]:
    valid = ", ".join(repr(k) for k in table)
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise InvalidArgument(f"{where}: {name}= must be a sequence of strings among {valid}, got {value!r}.")
    got = tuple(value)
    if not got:
        raise InvalidArgument(f"{where}: {name}= is empty; give at least one of {valid}.")
    for v in got:
        if v not in table:
            raise InvalidArgument(
                f"{where}: {name}= contains the unknown kind {v!r}; valid kinds are {valid}."
            )
    return got


def _check_bool(value: object, name: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{where}: {name}={value!r} must be a bool.")
    return value


def _check_shape(shape: object, where: str) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, int) and not isinstance(shape, bool) else shape
    if not isinstance(dims, tuple) or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise InvalidArgument(
            f"{where}: shape={shape!r} must be an int, a tuple of ints or a strategy of those."
        )
    if any(d < 0 for d in dims):
        raise InvalidArgument(f"{where}: shape={shape!r} has a negative dimension.")
    return dims


# -- tensors ------------------------------------------------------------------------------


def tensors(
    *,
    shape: int | tuple[int, ...] | st.SearchStrategy[int] | st.SearchStrategy[tuple[int, ...]],
    dtype: torch.dtype = torch.float64,
    elements: st.SearchStrategy[float] | None = None,
    device: str | torch.device = "cpu",
) -> st.SearchStrategy[torch.Tensor]:
    """A strategy for tensors of a given shape and dtype.

    Args:
        shape: an int, a tuple of ints (each at least 0), or a strategy of those.
        dtype: a floating-point dtype (see :data:`FLOAT_DTYPES`); default float64.
        elements: a strategy for the values, as Python floats; default finite floats in
            ``[-4, 4]``, no subnormals. Values are rounded to ``dtype``. (Where a loaded
            library flushes subnormals to zero, hypothesis draws floats only with
            ``allow_subnormal=False``.)
        device: where the tensors live (default CPU).

    Returns:
        A strategy of leaf tensors that do not require grad.

    Raises:
        hypothesis.errors.InvalidArgument: at call time, for a bad argument.

    Examples:
        >>> import torch
        >>> from hypothesis import given, settings, strategies as st
        >>> from invfunc.testing.strategies import tensors
        >>> @settings(max_examples=20, derandomize=True, database=None)
        ... @given(tensors(shape=(2, 3), elements=st.floats(0, 1, allow_subnormal=False)))
        ... def test(x):
        ...     assert x.shape == (2, 3) and x.dtype == torch.float64
        ...     assert 0 <= x.min() and x.max() <= 1
        >>> test()

        Arguments are checked when the strategy is made:

        >>> tensors(shape=(2, -1))
        Traceback (most recent call last):
            ...
        hypothesis.errors.InvalidArgument: tensors(shape=..., ...): shape=(2, -1) has a negative dimension.
    """
    where = "tensors(shape=..., ...)"
    if not isinstance(shape, st.SearchStrategy):
        _check_shape(shape, where)
    dt = _check_dtype(dtype, where)
    if elements is None:
        # no subnormals: a library that sets flush-to-zero (some of torch 2.4's do, once
        # loaded) makes hypothesis refuse to draw them, and they test nothing here
        width: Literal[16, 32, 64] = 16 if dt == torch.float16 else 64 if dt == torch.float64 else 32
        elements = st.floats(
            -4.0, 4.0, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=width
        )
    elif not isinstance(elements, st.SearchStrategy):
        raise InvalidArgument(f"{where}: elements={elements!r} must be a hypothesis strategy or None.")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidArgument(f"{where}: device={device!r} is not a device ({e}).") from e
    values = elements

    @st.composite
    def draw_tensor(draw: st.DrawFn) -> torch.Tensor:
        dims = (
            _check_shape(draw(shape), where)
            if isinstance(shape, st.SearchStrategy)
            else _check_shape(shape, where)
        )
        n = math.prod(dims)
        got = draw(st.lists(values, min_size=n, max_size=n))
        for v in got:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InvalidArgument(f"{where}: elements= drew {v!r}, which is not a real number.")
        return torch.tensor(got, dtype=torch.float64).reshape(dims).to(dev, dt)

    return draw_tensor()


# -- composites ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, repr=False)
class Composite:
    """A random invertible composite drawn by :func:`composites`, with what is needed to run it.

    Attributes:
        net: the composite, a :func:`invfunc.chain` (``net.blocks`` lists its blocks).
        make_input: returns fresh data inputs, leaf tensors that require grad, the same
            values on every call: one tensor of shape ``(batch, 2 * width)``, or a pair
            of tensors of shape ``(batch, width)`` (see :attr:`form`).
        args: the parameters passed after the data inputs, in both directions:
            ``y = net(*make_input(), *args)`` and ``net.inverse(*y, *args)``.
        params: every tensor requiring grad that ``net`` reads (module parameters,
            captured tensors and ``args``), in block order.
        block_args: for each of ``net.blocks``, the parameters to pass after its data
            inputs when the blocks are called one by one.
        form: ``"single"`` or ``"pair"``.
        description: the structure, shown in hypothesis' falsifying examples.

    Examples:
        >>> import torch, invfunc as inv
        >>> from hypothesis import given, settings
        >>> from invfunc.testing.strategies import composites
        >>> @settings(max_examples=10, derandomize=True, database=None, deadline=None)
        ... @given(composites(forms=["pair"], max_depth=3))
        ... def test_blocks_one_by_one(c):
        ...     h = c.make_input()
        ...     for block, args in zip(c.net.blocks, c.block_args):
        ...         out = block(*h, *args)
        ...         h = out if isinstance(out, tuple) else (out,)  # a merge returns one tensor
        ...     y1, y2 = c.net(*c.make_input(), *c.args)
        ...     assert torch.equal(h[0], y1) and torch.equal(h[1], y2)
        >>> test_blocks_one_by_one()
    """

    net: Invertible
    make_input: Callable[[], tuple[torch.Tensor, ...]]
    args: tuple[torch.Tensor, ...]
    params: tuple[torch.Tensor, ...]
    block_args: tuple[tuple[torch.Tensor, ...], ...]
    form: str
    description: str

    def __repr__(self) -> str:
        return f"Composite({self.description})"


class _Builder:
    """Draws blocks; parameter and input values come from one seeded generator."""

    def __init__(
        self, draw: st.DrawFn, width: int, dtype: torch.dtype, layers: tuple[str, ...], seed: int
    ) -> None:
        self.draw = draw
        self.width = width
        self.dtype = dtype
        self.layers = layers
        self.gen = torch.Generator().manual_seed(seed)
        self.params: list[torch.Tensor] = []

    def randn(self, *shape: int, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
        t = (torch.randn(shape, generator=self.gen, dtype=torch.float64) * scale).to(self.dtype)
        if grad:
            t.requires_grad_(True)
            self.params.append(t)
        return t

    def linear(self, n_in: int, n_out: int) -> torch.nn.Linear:
        m: torch.nn.Linear = torch.nn.utils.skip_init(  # type: ignore[no-untyped-call]
            torch.nn.Linear, n_in, n_out, dtype=self.dtype
        )  # no draw from the global generator
        with torch.no_grad():
            m.weight.copy_(self.randn(n_out, n_in, scale=0.8 / math.sqrt(n_in), grad=False))
            m.bias.copy_(self.randn(n_out, scale=0.1, grad=False))
        self.params.extend(m.parameters())
        return m

    def layer(self) -> tuple[Callable[..., torch.Tensor], str]:
        kind = self.draw(st.sampled_from(self.layers))
        w = self.width
        if kind == "linear":
            return self.linear(w, w), "Linear"
        if kind == "mlp":
            return torch.nn.Sequential(self.linear(w, 2 * w), torch.nn.Tanh(), self.linear(2 * w, w)), "MLP"
        if kind == "closure":
            a, c = self.randn(w, scale=0.7), self.randn(w, scale=0.1)

            def closure(h: torch.Tensor) -> torch.Tensor:
                return torch.tanh(h * a + c)

            return closure, "closure"
        functions: list[Callable[..., torch.Tensor]] = [torch.tanh, torch.sin, torch.nn.functional.silu]
        fn = self.draw(st.sampled_from(functions))
        return fn, fn.__name__

    def coupling(self, form: str, one_sided: bool) -> tuple[Invertible, str]:
        F, f_name = self.layer()
        if one_sided:
            G, g_name = None, "None"
        else:
            G, g_name = self.layer()
        dim = 1 if form == "pair" else self.draw(st.sampled_from([1, -1]))
        dim_s = "" if form == "pair" or dim == 1 else f", dim={dim}"
        return couple(F, G, dim=dim), f"couple({f_name}, {g_name}{dim_s})"

    def elementwise(
        self, kind: str, form: str, explicit: bool
    ) -> tuple[Invertible, tuple[torch.Tensor, ...], str]:
        shapes = [self.width] * 2 if form == "pair" else [2 * self.width]
        if kind == "affine":
            ps: list[torch.Tensor] = []
            fwd: Callable[..., torch.Tensor] = _affine
            bwd: Callable[..., torch.Tensor] = _unaffine
        else:
            ps = [self.randn(n, scale=0.3) for n in shapes]
            fwd, bwd = (_scale, _unscale) if kind == "scale" else (_shift, _unshift)
        n = len(shapes)
        name = kind if not ps else f"{kind}[{'args' if explicit else 'captured'}]"
        if not ps:  # affine: no parameters

            def f_plain(*xs: torch.Tensor) -> Any:
                return _each(fwd, xs, ())

            def i_plain(*ys: torch.Tensor) -> Any:
                return _each(bwd, ys, ())

            f_plain.__qualname__ = f_plain.__name__ = name
            return invertible(f_plain, inverse=i_plain, n_inputs=n, n_outputs=n), (), name
        if explicit:  # fixed signatures: data inputs, then one parameter per input
            f: Callable[..., Any]
            i: Callable[..., Any]
            if n == 1:

                def f_one(x: torch.Tensor, p: torch.Tensor) -> Any:
                    return fwd(x, p)

                def i_one(y: torch.Tensor, p: torch.Tensor) -> Any:
                    return bwd(y, p)

                f, i = f_one, i_one
            else:

                def f_two(a: torch.Tensor, b: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> Any:
                    return fwd(a, p), fwd(b, q)

                def i_two(a: torch.Tensor, b: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> Any:
                    return bwd(a, p), bwd(b, q)

                f, i = f_two, i_two
            f.__qualname__ = f.__name__ = name
            return invertible(f, inverse=i, n_inputs=n), tuple(ps), name

        def f_captured(*xs: torch.Tensor) -> Any:
            return _each(fwd, xs, ps)

        def i_captured(*ys: torch.Tensor) -> Any:
            return _each(bwd, ys, ps)

        f_captured.__qualname__ = f_captured.__name__ = name
        return invertible(f_captured, inverse=i_captured, n_inputs=n, n_outputs=n), (), name

    def regroup(self, form: str) -> tuple[Invertible, str]:
        """Split the features at a random width k and merge the parts the other way round;
        a pair is merged first and split back into halves last (NOTE [Data and parameters])."""
        n = 2 * self.width
        k = self.draw(st.integers(1, n - 1))
        scale = 1.5  # the first part is scaled: the rotation is not a permutation of values

        def split_at(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x[:, :k] * scale, x[:, k:].clone()  # no views: every boundary can be freed

        def merge_from(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.cat([a / scale, b], 1)

        def merge_swapped(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.cat([b, a], 1)

        def split_swapped(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return y[:, n - k :].clone(), y[:, : n - k].clone()

        split_at.__qualname__ = split_at.__name__ = f"split@{k}"
        merge_swapped.__qualname__ = merge_swapped.__name__ = "merge_swapped"
        blocks = [
            invertible(split_at, inverse=merge_from),
            invertible(merge_swapped, inverse=split_swapped, n_inputs=2),
        ]
        if form == "pair":
            halves = invertible(_split_half, inverse=_merge_halves)
            blocks = [halves.inverse, *blocks, halves]
        return chain(*blocks), f"regroup@{k}"


def _split_half(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = x.chunk(2, 1)
    return a.clone(), b.clone()


def _merge_halves(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, b], 1)


def _each(op: Callable[..., torch.Tensor], xs: Sequence[torch.Tensor], ps: Sequence[torch.Tensor]) -> Any:
    out = tuple(op(x, p) for x, p in zip(xs, ps)) if ps else tuple(op(x) for x in xs)
    return out[0] if len(out) == 1 else out


def _affine(x: torch.Tensor) -> torch.Tensor:
    return 1.5 * x - 0.5


def _unaffine(y: torch.Tensor) -> torch.Tensor:
    return (y + 0.5) / 1.5


def _scale(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return x * s.exp()


def _unscale(y: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return y * (-s).exp()


def _shift(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x + b


def _unshift(y: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return y - b


def composites(
    *,
    min_depth: int = 1,
    max_depth: int = 4,
    width: int = 3,
    batch: int = 2,
    dtype: torch.dtype = torch.float64,
    layers: Sequence[str] = tuple(LAYERS),
    blocks: Sequence[str] = tuple(BLOCKS),
    forms: Sequence[str] = tuple(FORMS),
    explicit: bool = True,
    nested: bool = True,
) -> st.SearchStrategy[Composite]:
    """A strategy for random invertible composites: chains of couplings, elementwise blocks,
    splits and merges.

    Each example is a :class:`Composite`: a chain of ``min_depth`` to ``max_depth``
    blocks drawn from ``blocks`` (see :data:`BLOCKS`: couplings, one-sided couplings,
    inverses of couplings, ``x * exp(s)``, ``x + b``, an affine map, a split at a random
    width merged back in the other order), whose ``F`` and
    ``G`` are drawn from ``layers`` (see :data:`LAYERS`: ``nn.Linear``, a
    Linear-Tanh-Linear MLP, closures capturing tensors that require grad, functions
    without parameters). The data is one tensor or a pair (see :data:`FORMS`). With
    ``explicit``, a first ``scale`` or ``shift`` block may take its parameter as an
    argument (``net(x, s)``) instead of capturing it; with ``nested``, blocks are
    grouped into nested chains, some of them inverted (``inv.inverse(chain(...))``).
    Parameter and input values come from a seed drawn by hypothesis, so examples are
    reproducible; the global random generator is not used.

    Args:
        min_depth: the fewest blocks (at least 1).
        max_depth: the most blocks (at least ``min_depth``).
        width: the size of one half of the features (at least 1).
        batch: the size of the first dimension of the inputs (at least 1).
        dtype: the dtype of inputs and parameters (see :data:`FLOAT_DTYPES`).
        layers: the kinds of ``F`` and ``G`` to draw from.
        blocks: the kinds of blocks to draw from.
        forms: ``"single"`` and/or ``"pair"``.
        explicit: whether parameters may be passed as arguments.
        nested: whether to nest and invert chains.

    Returns:
        A strategy of :class:`Composite`.

    Raises:
        hypothesis.errors.InvalidArgument: at call time, for a bad argument.

    Examples:
        >>> import torch, invfunc as inv
        >>> from hypothesis import given, settings
        >>> from invfunc.testing import check_grads
        >>> from invfunc.testing.strategies import composites
        >>> @settings(max_examples=5, derandomize=True, database=None, deadline=None)
        ... @given(composites(max_depth=3, layers=["linear", "closure"]))
        ... def test_grads(c):
        ...     check_grads(c.net, *c.make_input(), *c.args)
        >>> test_grads()

        Arguments are checked when the strategy is made:

        >>> composites(blocks=["coupling", "swap"])
        Traceback (most recent call last):
            ...
        hypothesis.errors.InvalidArgument: composites(...): blocks= contains the unknown kind 'swap'; valid
        kinds are 'coupling', 'one_sided', 'inverse_coupling', 'scale', 'shift', 'affine', 'regroup'.
    """
    where = "composites(...)"
    lo = _check_int(min_depth, "min_depth", where, minimum=1)
    hi = _check_int(max_depth, "max_depth", where, minimum=1)
    if hi < lo:
        raise InvalidArgument(f"{where}: max_depth={hi} is less than min_depth={lo}.")
    w = _check_int(width, "width", where, minimum=1)
    n_batch = _check_int(batch, "batch", where, minimum=1)
    dt = _check_dtype(dtype, where)
    kinds = _check_choices(blocks, "blocks", BLOCKS, where)
    layer_kinds = _check_choices(layers, "layers", LAYERS, where)
    form_kinds = _check_choices(forms, "forms", FORMS, where)
    use_explicit = _check_bool(explicit, "explicit", where)
    use_nested = _check_bool(nested, "nested", where)

    @st.composite
    def draw_composite(draw: st.DrawFn) -> Composite:
        seed = draw(st.integers(0, 2**32 - 1))
        form = draw(st.sampled_from(form_kinds))
        depth = draw(st.integers(lo, hi))
        b = _Builder(draw, w, dt, layer_kinds, seed)
        items: list[tuple[Invertible, str]] = []
        args: tuple[torch.Tensor, ...] = ()
        for k in range(depth):
            kind = draw(st.sampled_from(kinds))
            if kind in ("coupling", "one_sided", "inverse_coupling"):
                block, name = b.coupling(form, one_sided=kind == "one_sided")
                if kind == "inverse_coupling":
                    block, name = block.inverse, f"inverse({name})"
            elif kind == "regroup":
                block, name = b.regroup(form)
            else:
                as_args = use_explicit and k == 0 and kind != "affine" and draw(st.booleans())
                block, args_k, name = b.elementwise(kind, form, as_args)
                if args_k:
                    args = args_k
            items.append((block, name))
        net, description = _group(draw, items, nested=use_nested, keep_first=bool(args))
        flat = net.blocks  # type: ignore[attr-defined]
        block_args = tuple(args if blk is flat[0] else () for blk in flat)
        shapes = [(n_batch, w), (n_batch, w)] if form == "pair" else [(n_batch, 2 * w)]
        input_seed = draw(st.integers(0, 2**32 - 1))

        def make_input() -> tuple[torch.Tensor, ...]:
            g = torch.Generator().manual_seed(input_seed)
            return tuple(
                torch.randn(s, generator=g, dtype=torch.float64).to(dt).requires_grad_() for s in shapes
            )

        params = tuple(b.params)
        shown = " x ".join(str(s) for s in shapes)
        return Composite(
            net=net,
            make_input=make_input,
            args=args,
            params=params,
            block_args=block_args,
            form=form,
            description=f"{description}, input {shown} {str(dt).removeprefix('torch.')}, seed {seed}",
        )

    return draw_composite()


def _group(
    draw: st.DrawFn, items: list[tuple[Invertible, str]], *, nested: bool, keep_first: bool
) -> tuple[Invertible, str]:
    """Chain the blocks, nesting and inverting groups of them when ``nested``.

    The first group is not inverted when ``keep_first``: a block taking arguments must stay
    first, the only place a chain passes them.
    """
    if not nested:
        return chain(*(blk for blk, _ in items)), f"chain({', '.join(n for _, n in items)})"
    groups: list[tuple[Invertible, str]] = []
    i = 0
    while i < len(items):
        size = draw(st.integers(1, len(items) - i))
        part = items[i : i + size]
        if size == 1:
            blk, name = part[0]
        else:
            blk, name = chain(*(p for p, _ in part)), f"chain({', '.join(n for _, n in part)})"
        if not (keep_first and i == 0) and draw(st.booleans()):
            blk, name = blk.inverse, f"inverse({name})"
        groups.append((blk, name))
        i += size
    return chain(*(g for g, _ in groups)), f"chain({', '.join(n for _, n in groups)})"
