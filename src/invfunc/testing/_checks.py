"""``check_inverse`` and ``check_grads``: assertions for users' invertible functions.

NOTE [Tolerances of the checks]

1. A value ``actual`` matches ``expected`` elementwise when
   ``|actual - expected| <= atol + rtol * |expected|`` (NaN matches NaN, an infinity
   matches itself), as in :func:`torch.testing.assert_close`.
2. ``rtol`` defaults by the lowest precision among the compared tensors:
   ``1e-10`` for float64, ``1e-4`` for float32, ``1e-2`` for float16, ``5e-2`` for bfloat16.
3. ``atol`` defaults to ``rtol`` times the largest finite magnitude in ``expected``:
   an error is judged relative to the scale of the whole tensor, so elements near zero
   (cancellations) are not held to a relative error they cannot have. A tensor of
   zeros must then be matched exactly; pass ``atol=`` to allow an absolute error.
4. A failure is an :class:`AssertionError` that names the check, the tensor, how many
   elements fail, the worst element's index, both values and the tolerance in force.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .._call import invertible_call
from .._core import Invertible, _name
from .._modes import check_mode, current_mode
from .._walk import walk

__all__ = ["check_grads", "check_inverse", "default_rtol", "find_parameters"]

# NOTE [Tolerances of the checks], rule 2.
_RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.complex128: 1e-10,
    torch.float32: 1e-4,
    torch.complex64: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


def default_rtol(*tensors: torch.Tensor | None) -> float:
    """The default relative tolerance of the checks for these tensors.

    It is set by the lowest precision among them (NOTE [Tolerances of the checks]):
    ``1e-10`` for float64, ``1e-4`` for float32, ``1e-2`` for float16, ``5e-2`` for bfloat16.
    Tensors that are not floating point (and ``None``) are ignored; with none left the
    float64 value is returned.

    Examples:
        >>> import torch
        >>> from invfunc.testing import default_rtol
        >>> default_rtol(torch.zeros(2, dtype=torch.float64))
        1e-10
        >>> default_rtol(torch.zeros(2, dtype=torch.float64), torch.zeros(2))
        0.0001
    """
    rtol = _RTOL[torch.float64]
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dtype in _RTOL:
            rtol = max(rtol, _RTOL[t.dtype])
    return rtol


# -- comparing ------------------------------------------------------------------------


def _fmt(v: float | complex) -> str:
    return f"{v:.6g}"


def _compare(
    actual: torch.Tensor | None,
    expected: torch.Tensor | None,
    *,
    where: str,
    what: str,
    labels: tuple[str, str],
    rtol: float | None,
    atol: float | None,
) -> None:
    """Raise an AssertionError saying where and by how much ``actual`` differs from ``expected``."""
    got, want = labels
    if actual is None and expected is None:
        return
    if actual is None or expected is None:
        missing, present = (got, want) if actual is None else (want, got)
        raise AssertionError(f"{where}: {what}: {missing} is None, but {present} is a tensor.")
    if actual.shape != expected.shape:
        raise AssertionError(
            f"{where}: {what}: {got} has shape {tuple(actual.shape)}, but {want} has shape "
            f"{tuple(expected.shape)}."
        )
    if actual.dtype != expected.dtype:
        raise AssertionError(
            f"{where}: {what}: {got} has dtype {actual.dtype}, but {want} has dtype {expected.dtype}."
        )
    if actual.numel() == 0:
        return
    r = default_rtol(expected) if rtol is None else rtol
    wide = torch.complex128 if expected.is_complex() else torch.float64
    a = actual.detach().to("cpu", wide)
    e = expected.detach().to("cpu", wide)
    if atol is None:  # NOTE [Tolerances of the checks], rule 3
        finite = e.abs()[torch.isfinite(e)]
        scale = float(finite.max()) if finite.numel() else 0.0
        tol_abs = r * scale
    else:
        tol_abs = atol
    diff = (a - e).abs()
    same = a == e  # infinities of the same sign
    both_nan = torch.isnan(a) & torch.isnan(e)
    ok = same | both_nan | (diff <= tol_abs + r * e.abs())
    if bool(ok.all()):
        return
    bad = ~ok
    score = torch.where(bad, torch.nan_to_num(diff, nan=math.inf, posinf=math.inf), torch.zeros_like(diff))
    flat = int(score.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(e.shape)))
    av, ev = a.reshape(-1)[flat].item(), e.reshape(-1)[flat].item()
    dv = diff.reshape(-1)[flat].item()
    rel = dv / abs(ev) if ev != 0 else math.inf
    at = f" at index {index}" if index else ""
    raise AssertionError(
        f"{where}: {what}: {got} differs from {want} in {int(bad.sum())} of {e.numel()} element(s); "
        f"the largest difference is {_fmt(dv)}{at} ({got} {_fmt(av)}, {want} {_fmt(ev)}, relative "
        f"{_fmt(rel)}); allowed: atol={_fmt(tol_abs)} + rtol={_fmt(r)} * |{want}|."
    )


# -- running ----------------------------------------------------------------------------


class _Rng:
    """The generator states at one moment, to start several runs from the same draws."""

    def __init__(self, tensors: Sequence[object]) -> None:
        self.devices = sorted(
            {t.device.index or 0 for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda}
        )
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, s in zip(self.devices, self.cuda):
            torch.cuda.set_rng_state(s, d)

    @contextlib.contextmanager
    def fork(self) -> Iterator[None]:
        """Leave the caller's generators as they were when the check started."""
        with torch.random.fork_rng(devices=self.devices):
            yield


def _as_tuple(out: Any, where: str, what: str) -> tuple[torch.Tensor, ...]:
    outs = (out,) if isinstance(out, torch.Tensor) else out
    if not isinstance(outs, (tuple, list)) or not all(isinstance(o, torch.Tensor) for o in outs):
        raise AssertionError(
            f"{where}: {what} returned a {type(out).__name__}, not a tensor or a tuple of tensors."
        )
    return tuple(outs)


def _invertible(fn: object, where: str) -> Invertible:
    if not isinstance(fn, Invertible):
        raise TypeError(
            f"{where}: fn must be an Invertible, got {_name(fn)} ({type(fn).__name__}); wrap it with "
            "invfunc.invertible(fn, inverse=...) or build it with invfunc.couple / invfunc.chain."
        )
    return fn


def _split_args(
    fn: Invertible, args: Sequence[Any], where: str
) -> tuple[tuple[torch.Tensor, ...], tuple[Any, ...]]:
    if not args:
        raise TypeError(f"{where}: no inputs given; pass the data inputs, then any parameters.")
    n_data = fn._n_data(args)
    data, extra = tuple(args[:n_data]), tuple(args[n_data:])
    for i, t in enumerate(data):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: data input {i} must be a tensor, got {type(t).__name__}.")
    return data, extra


def _check_tol(rtol: float | None, atol: float | None, where: str) -> None:
    for name, v in (("rtol", rtol), ("atol", atol)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
            raise ValueError(f"{where}: {name}= must be a non-negative number or None, got {v!r}.")


def check_inverse(fn: Invertible, *args: Any, rtol: float | None = None, atol: float | None = None) -> None:
    """Assert that ``fn.inverse`` inverts ``fn`` at ``args``, in both directions.

    With ``y = fn(*args)`` it checks that ``fn.inverse(*y, *params)`` gives back the
    data inputs, and that ``fn`` maps those back to ``y`` (``params`` are the
    arguments after the data inputs, shared by both directions). Everything runs
    without grad; both directions start from the same random-generator state, and the
    caller's generators are left untouched.

    Args:
        fn: an :class:`invfunc.Invertible`.
        *args: its data inputs followed by its parameters.
        rtol: relative tolerance; default by dtype: ``1e-10`` for float64, ``1e-4``
            for float32, ``1e-2`` for float16, ``5e-2`` for bfloat16.
        atol: absolute tolerance; default ``rtol`` times the largest magnitude of
            the expected tensor (see NOTE [Tolerances of the checks] in the source).

    Raises:
        AssertionError: saying which input or output, which element, and by how much.
        TypeError: if ``fn`` is not an Invertible or an input is not a tensor.

    Examples:
        >>> import torch, invfunc as inv
        >>> from invfunc.testing import check_inverse
        >>> torch.manual_seed(0) is not None
        True
        >>> block = inv.couple(torch.nn.Linear(2, 2).double(), torch.nn.Tanh())
        >>> check_inverse(block, torch.randn(3, 4, dtype=torch.float64))   # passes: returns None

        A wrong inverse is caught, with the place and the size of the error:

        >>> bad = inv.invertible(lambda x: 2 * x, inverse=lambda y: y / 3)
        >>> check_inverse(bad, torch.tensor([1.0, 3.0]))
        Traceback (most recent call last):
            ...
        AssertionError: check_inverse(<lambda>, ...): input 0: fn.inverse(fn(x)) differs from x in 2 of 2
        element(s); the largest difference is 1 at index (1,) (fn.inverse(fn(x)) 2, x 3, relative 0.333333);
        allowed: atol=0.0003 + rtol=0.0001 * |x|.
    """
    where = f"check_inverse({_name(fn)}, ...)"
    fn = _invertible(fn, where)
    where = f"check_inverse({fn._name}, ...)"
    _check_tol(rtol, atol, where)
    data, extra = _split_args(fn, args, where)
    rng = _Rng([*data, *extra])
    with rng.fork(), torch.no_grad():
        ys = _as_tuple(fn(*args), where, "fn")
        rng.restore()
        back = _as_tuple(fn.inverse(*ys, *extra), where, "fn.inverse")
        count = f"fn.inverse returned {len(back)} tensor(s) for {len(data)} data input(s) of fn"
        _compare_all(back, data, where, count, "input", ("fn.inverse(fn(x))", "x"), rtol, atol)
        rng.restore()
        again = _as_tuple(fn(*back, *extra), where, "fn")
        count = f"fn returned {len(again)} tensor(s) on the rebuilt inputs, {len(ys)} before"
        _compare_all(again, ys, where, count, "output", ("fn(fn.inverse(y))", "y"), rtol, atol)


def _compare_all(
    got: Sequence[torch.Tensor],
    want: Sequence[torch.Tensor],
    where: str,
    count: str,
    what: str,
    labels: tuple[str, str],
    rtol: float | None,
    atol: float | None,
) -> None:
    """Compare two sequences of tensors element by element; ``count`` says a length mismatch."""
    if len(got) != len(want):
        raise AssertionError(f"{where}: {count}.")
    for i, (g, w) in enumerate(zip(got, want)):
        _compare(g, w, where=where, what=f"{what} {i}", labels=labels, rtol=rtol, atol=atol)


# -- finding the tensors a function reads --------------------------------------------------


def find_parameters(fn: Callable[..., Any]) -> list[tuple[str, torch.Tensor]]:
    """The tensors requiring grad that ``fn`` reaches through its structure, with their names.

    The walk follows a :func:`invfunc.chain`'s ``blocks``, a coupling's ``F`` and
    ``G``, the function an :func:`invfunc.invertible` wraps, ``nn.Module``
    parameters, the cells of closures, the global variables a function's code names,
    default arguments, ``functools.partial`` arguments, bound methods' objects, lists,
    tuples, dicts and the attributes of other callable objects. Tensors reached only
    some other way (for example through the attribute of an imported module) are not
    found: pass them to :func:`check_grads` in ``params=``. Each tensor is listed once,
    under the first name it was reached by.

    Examples:
        >>> import torch, invfunc as inv
        >>> from invfunc.testing import find_parameters
        >>> w = torch.zeros(2, requires_grad=True)
        >>> net = inv.chain(
        ...     inv.couple(torch.nn.Linear(1, 1)),
        ...     inv.invertible(lambda x: x + w, inverse=lambda y: y - w),
        ... )
        >>> [name for name, _ in find_parameters(net)]
        ['fn.blocks[0].F.weight', 'fn.blocks[0].F.bias', 'fn.blocks[1].w']
    """
    found: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    for path, obj, _ in walk(fn):
        tensors = obj.named_parameters() if isinstance(obj, torch.nn.Module) else [("", obj)]
        for name, t in tensors:
            if t.requires_grad and id(t) not in seen:
                seen.add(id(t))
                found.append((f"{path}.{name}" if name else path, t))
    return found


# -- gradients ------------------------------------------------------------------------------


class _Run:
    """One forward and backward of ``fn``: outputs, gradients and the intermediates passed in."""

    def __init__(
        self, outs: tuple[torch.Tensor, ...], grads: list[torch.Tensor | None], hs: list[Any]
    ) -> None:
        self.outs = outs
        self.grads = grads
        self.hs = hs


def check_grads(
    fn: Invertible,
    *args: Any,
    mode: str | None = None,
    call: Callable[..., Any] | None = None,
    params: Sequence[torch.Tensor] = (),
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """Assert that :func:`invfunc.invertible_call` gives plain autograd's outputs and gradients.

    ``fn`` runs from the same inputs once with plain autograd (``fn(*args)``) and twice
    under :func:`invfunc.invertible_call` (or ``call``), once differentiated with
    ``.backward()`` and once with :func:`torch.autograd.grad`. Every floating-point data input is
    copied to a fresh leaf and passed as an intermediate (``x * 1``), so the call can
    free it and must rebuild it; it is checked to hold its value again after the
    backward. The scalar differentiated is ``sum((out * w).sum())`` over the outputs,
    with fixed random weights ``w``.

    Gradients are compared for the data inputs, the parameter arguments (after the
    data inputs) that require grad, and every tensor requiring grad found by walking
    ``fn`` with :func:`find_parameters` (``nn.Module`` parameters inside couplings,
    tensors captured by closures, ...), plus those in ``params=``. With ``.backward()``
    only leaf tensors are compared (others have no ``.grad``); their ``.grad`` is
    restored afterwards. All runs start from the same random-generator state (so
    dropout draws the same masks) and leave the caller's generators untouched; module
    buffers such as BatchNorm's running statistics are updated by each of the three
    runs.

    Args:
        fn: an :class:`invfunc.Invertible`.
        *args: its data inputs followed by its parameters.
        mode: the ``mode=`` of :func:`invfunc.invertible_call` (default: the ambient mode).
        call: how to run ``fn`` in place of ``invertible_call(fn, *args, mode=mode)``,
            for example one :func:`invfunc.invertible_call` per block with other ops
            between them; it receives the same arguments. Not with ``mode=``.
        params: more tensors to compare gradients of (for example globals ``fn`` reads).
        rtol: relative tolerance; default by dtype: ``1e-10`` for float64, ``1e-4``
            for float32, ``1e-2`` for float16, ``5e-2`` for bfloat16.
        atol: absolute tolerance; default ``rtol`` times the largest magnitude of
            the expected tensor (see NOTE [Tolerances of the checks] in the source).

    Raises:
        AssertionError: naming the tensor (``input 0``, ``fn.blocks[1].F.weight``,
            ...), the way it was differentiated, the worst element and the error size.
        TypeError: if ``fn`` is not an Invertible or an input is not a tensor.
        ValueError: for an unknown mode or a bad tolerance, or if nothing requires grad.

    Examples:
        >>> import torch, invfunc as inv
        >>> from invfunc.testing import check_grads
        >>> torch.manual_seed(0) is not None
        True
        >>> F = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh()).double()
        >>> net = inv.chain(inv.couple(F, F), inv.couple(F))
        >>> check_grads(net, torch.randn(3, 4, dtype=torch.float64))   # passes: returns None

        A function whose inverse is wrong yields wrong gradients, and is caught:

        >>> bad = inv.invertible(lambda x: x.exp(), inverse=lambda y: y.log() + 0.1)
        >>> check_grads(bad, torch.ones(2, dtype=torch.float64))
        Traceback (most recent call last):
            ...
        AssertionError: check_grads(<lambda>, ...): gradient of input 0 (.backward(), mode 'invertible'):
        invertible_call differs from plain autograd in 2 of 2 element(s); ...
    """
    where = f"check_grads({_name(fn)}, ...)"
    fn = _invertible(fn, where)
    where = f"check_grads({fn._name}, ...)"
    _check_tol(rtol, atol, where)
    run_mode = current_mode() if mode is None else check_mode(mode, f"{where.removesuffix(')')} mode=...)")
    if call is not None and mode is not None:
        raise TypeError(f"{where}: pass call= or mode=, not both; call= decides how fn runs.")
    if call is not None and not callable(call):
        raise TypeError(f"{where}: call= must be callable, got {type(call).__name__}.")
    if call is None:

        def runner(*a: Any) -> Any:
            return invertible_call(fn, *a, mode=run_mode)

        how_run = f"mode {run_mode!r}"
    else:
        runner = call
        how_run = f"call={_name(call)}"
    if isinstance(params, torch.Tensor):
        params = (params,)
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where}: params[{i}] must be a tensor, got {type(p).__name__}.")
    data, extra = _split_args(fn, args, where)
    n_data = len(data)

    named: list[tuple[str, torch.Tensor]] = []
    ids: set[int] = {id(t) for t in data}
    for i, t in enumerate(extra):
        if isinstance(t, torch.Tensor) and t.requires_grad and id(t) not in ids:
            named.append((f"argument {n_data + i}", t))
            ids.add(id(t))
    for name, t in find_parameters(fn):
        if id(t) not in ids:
            named.append((name, t))
            ids.add(id(t))
    for i, p in enumerate(params):
        if id(p) not in ids and p.requires_grad:
            named.append((f"params[{i}]", p))
            ids.add(id(p))
    diff_inputs = [i for i, t in enumerate(data) if t.is_floating_point() or t.is_complex()]
    if not diff_inputs and not named:
        raise ValueError(
            f"{where}: nothing to differentiate: no floating-point data input and no tensor requiring grad "
            "among the parameters; pass the tensors fn reads in params=."
        )
    names = [f"input {i}" for i in diff_inputs] + [n for n, _ in named]
    rng = _Rng([*data, *extra, *(t for _, t in named)])
    weights: list[torch.Tensor | None] = []
    generator = torch.Generator().manual_seed(0)

    def run(forward: Callable[..., Any], method: str) -> _Run:
        rng.restore()
        leaves = list(data)
        hs: list[Any] = list(data)
        for i in diff_inputs:
            leaves[i] = data[i].detach().clone().requires_grad_(True)
            hs[i] = leaves[i] * 1
        outs = _as_tuple(forward(*hs, *extra), where, "fn")
        if not weights:
            for o in outs:
                if o.is_floating_point() or o.is_complex():
                    w = torch.randn(o.shape, generator=generator, dtype=torch.float64)
                    weights.append(w.to(o.device, o.dtype))
                else:
                    weights.append(None)
        if len(outs) != len(weights):
            raise AssertionError(
                f"{where}: invertible_call returned {len(outs)} output(s), plain autograd {len(weights)}."
            )
        terms = [
            (o * w).real.sum() if o.is_complex() else (o * w).sum()
            for o, w in zip(outs, weights)
            if w is not None
        ]
        loss = functools.reduce(torch.add, terms) if terms else None
        wrt = [leaves[i] for i in diff_inputs] + [t for _, t in named]
        if loss is None or not loss.requires_grad:
            return _Run(tuple(o.detach() for o in outs), [None] * len(wrt), hs)
        grads: list[torch.Tensor | None]
        if method == "grad":
            grads = list(torch.autograd.grad(loss, wrt, allow_unused=True))
        else:
            old = [t.grad if t.is_leaf else None for t in wrt]
            try:
                for t in wrt:
                    if t.is_leaf:
                        t.grad = None
                loss.backward()  # type: ignore[no-untyped-call]
                grads = [t.grad if t.is_leaf else None for t in wrt]
            finally:
                for t, g in zip(wrt, old):
                    if t.is_leaf:
                        t.grad = g
        return _Run(tuple(o.detach() for o in outs), grads, hs)

    with rng.fork():
        want = run(fn, "grad")
        runs = [
            (method, f"({label}, {how_run})", run(runner, method))
            for method, label in (("backward", ".backward()"), ("grad", "torch.autograd.grad"))
        ]
    against_plain = functools.partial(
        _compare, where=where, labels=("invertible_call", "plain autograd"), rtol=rtol, atol=atol
    )
    # outputs first, then gradients, then the inputs read back: the first failure is the root cause
    for _, how, got in runs:
        if len(got.outs) != len(want.outs):
            raise AssertionError(
                f"{where}: invertible_call returned {len(got.outs)} output(s), "
                f"plain autograd {len(want.outs)}."
            )
        for i, (out, ref) in enumerate(zip(got.outs, want.outs)):
            against_plain(out, ref, what=f"output {i} {how}")
    for method, how, got in runs:
        for k, (name, a, e) in enumerate(zip(names, got.grads, want.grads)):
            if method == "backward" and k >= len(diff_inputs) and not named[k - len(diff_inputs)][1].is_leaf:
                continue  # no .grad on a non-leaf: compared with autograd.grad only
            against_plain(a, e, what=f"gradient of {name} {how}")
    for _, how, got in runs:
        for i in diff_inputs:
            h = got.hs[i]
            if h.untyped_storage().nbytes() == 0 and h.numel() > 0:
                raise AssertionError(
                    f"{where}: input {i} {how} was freed by invertible_call and is still freed after the "
                    "backward; the caller can still reach it, so the backward must refill it."
                )
            _compare(
                h.detach(),
                data[i].detach(),
                where=where,
                what=f"input {i} read after the backward {how}",
                labels=("its value", "the value passed in"),
                rtol=rtol,
                atol=atol,
            )
