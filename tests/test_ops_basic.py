"""The elementwise, permutation and reshaping ops (invfunc.ops): one suite runs every op
through round trips, Jacobian log-dets, gradients under invertible_call and gradcheck;
then each op's own layout, its edges and its errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import invfunc as inv
from _util import F64, assert_all_close, freed
from invfunc import ops

D = torch.float64


def _randn(*shape: int) -> Callable[[torch.Generator], tuple[torch.Tensor, ...]]:
    return lambda g: (torch.randn(*shape, generator=g, dtype=D),)


def _unit(*shape: int) -> Callable[[torch.Generator], tuple[torch.Tensor, ...]]:
    return lambda g: (0.05 + 0.9 * torch.rand(*shape, generator=g, dtype=D),)


def _positive(*shape: int) -> Callable[[torch.Generator], tuple[torch.Tensor, ...]]:
    return lambda g: (0.1 + torch.rand(*shape, generator=g, dtype=D) * 3,)


def _pair(a: int, b: int) -> Callable[[torch.Generator], tuple[torch.Tensor, ...]]:
    return lambda g: (torch.randn(2, a, 3, generator=g, dtype=D), torch.randn(2, b, 3, generator=g, dtype=D))


@dataclass
class Case:
    id: str
    make: Callable[[], inv.Invertible]
    inputs: Callable[[torch.Generator], tuple[torch.Tensor, ...]]
    ladj: bool


CASES = [
    Case("leaky_relu", lambda: ops.leaky_relu(0.2), _randn(2, 3, 2), True),
    Case("leaky_relu(3)", lambda: ops.leaky_relu(3.0), _randn(2, 5), True),
    Case("sigmoid", ops.sigmoid, _randn(2, 3, 2), True),
    Case("logit", ops.logit, _unit(2, 3, 2), True),
    Case("tanh", ops.tanh, _randn(2, 3, 2), True),
    Case("exp", ops.exp, _randn(2, 3, 2), True),
    Case("log", ops.log, _positive(2, 3, 2), True),
    Case("softplus", ops.softplus, _randn(2, 3, 2), True),
    Case("reverse", ops.reverse, _randn(2, 4, 3), False),
    Case("reverse(dim=-1)", lambda: ops.reverse(dim=-1), _randn(2, 3, 4), False),
    Case(
        "permutation",
        lambda: ops.permutation(5, generator=torch.Generator().manual_seed(3)),
        _randn(2, 5, 2),
        False,
    ),
    Case(
        "permutation(dim=-1)",
        lambda: ops.permutation(4, dim=-1, generator=torch.Generator().manual_seed(1)),
        _randn(2, 3, 4),
        False,
    ),
    Case("shuffle", lambda: ops.shuffle(3), _randn(2, 6, 2), False),
    Case("shuffle(dim=-1)", lambda: ops.shuffle(2, dim=-1), _randn(2, 3, 4), False),
    Case("squeeze", lambda: ops.squeeze(2), _randn(2, 2, 4, 4), False),
    Case("squeeze(3)", lambda: ops.squeeze(3), _randn(1, 1, 3, 6), False),
    Case("unsqueeze", lambda: ops.unsqueeze(2), _randn(2, 8, 2, 1), False),
    Case("split", ops.split, _randn(2, 4, 3), False),
    Case("split(odd)", ops.split, _randn(2, 5, 3), False),
    Case("split(dim=-1)", lambda: ops.split(dim=-1), _randn(2, 3, 6), False),
    Case("concat", ops.concat, _pair(2, 3), False),
    Case("checkerboard", ops.checkerboard, _randn(2, 2, 3, 4), False),
]
LADJ_CASES = [c for c in CASES if c.ladj]
cases = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])


def data_of(case: Case, out: Any) -> tuple[torch.Tensor, ...]:
    """The data outputs of a call, without the log-det."""
    out = out if isinstance(out, tuple) else (out,)
    return out[:-1] if case.ladj else out


def sample(
    case: Case, seed: int = 0
) -> tuple[inv.Invertible, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The op, inputs in its domain, and its outputs (the inverse's inputs)."""
    op = case.make()
    xs = case.inputs(torch.Generator().manual_seed(seed))
    return op, xs, data_of(case, op(*xs))


def loss_of(out: Any) -> torch.Tensor:
    """A loss that reads every output, log-det included, non-linearly."""
    outs = out if isinstance(out, tuple) else (out,)
    return sum(((o * (k + 1)).sin() * o).sum() for k, o in enumerate(outs))  # type: ignore[return-value]


# -- the shared suite ------------------------------------------------------------------


@cases
def test_round_trip_in_both_directions(case: Case) -> None:
    op, xs, ys = sample(case)
    back = op.inverse(*ys)
    assert_all_close(data_of(case, back), xs, **F64)
    again = op(*data_of(case, back))
    assert_all_close(data_of(case, again), ys, **F64)
    if case.ladj:
        ladj, ladj_inv = op(*xs)[-1], back[-1]
        assert ladj.shape == ladj_inv.shape == (len(xs[0]),) and ladj.dtype == D
        torch.testing.assert_close(ladj + ladj_inv, torch.zeros_like(ladj), **F64)
    else:
        assert isinstance(op(*xs), torch.Tensor if len(ys) == 1 else tuple)


def _flat(
    fn: Callable[..., Any], case: Case, like: tuple[torch.Tensor, ...], ladj: bool
) -> Callable[..., Any]:
    """``fn`` on one sample, as a map of one flat vector to one flat vector."""
    sizes = [t[0].numel() for t in like]

    def flat(v: torch.Tensor) -> torch.Tensor:
        args = [p.view(1, *t.shape[1:]) for p, t in zip(v.split(sizes), like)]
        out = fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        return torch.cat([o.reshape(-1) for o in (outs[:-1] if ladj else outs)])

    return flat


@cases
def test_ladj_is_log_abs_det_of_the_jacobian_per_sample(case: Case) -> None:
    """ladj per sample equals slogdet of the Jacobian in both directions; a
    volume-preserving op has |det| = 1."""
    op, xs, ys = sample(case)
    for fn, args in ((op, xs), (op.inverse, ys)):
        out = fn(*args)
        for i in range(len(args[0])):
            v = torch.cat([t[i].reshape(-1) for t in args])
            jac = torch.func.jacrev(_flat(fn, case, args, case.ladj))(v)
            assert jac.shape[0] == jac.shape[1]
            sign, logabsdet = torch.linalg.slogdet(jac)
            assert sign != 0
            want = out[-1][i] if case.ladj else torch.zeros((), dtype=D)
            torch.testing.assert_close(logabsdet, want, **F64)


def _grads_under_call(fn: inv.Invertible, args: tuple[torch.Tensor, ...], call: bool) -> list[torch.Tensor]:
    leaves = [t.detach().requires_grad_() for t in args]
    hs = [t * 1.0 for t in leaves]
    out = inv.invertible_call(fn, *hs) if call else fn(*hs)
    if call:  # the inputs were freed: every output owns its storage
        assert all(freed(h) for h in hs)
    del hs
    loss_of(out).backward()
    return [t.grad for t in leaves]  # type: ignore[misc]


@cases
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_gradients_under_invertible_call_are_plain(case: Case, direction: str) -> None:
    op, xs, ys = sample(case)
    fn, args = (op, xs) if direction == "forward" else (op.inverse, ys)
    assert_all_close(_grads_under_call(fn, args, True), _grads_under_call(fn, args, False), **F64)


@cases
def test_gradcheck(case: Case) -> None:
    """Full gradcheck of the elementwise ops; a permutation's Jacobian is constant, and the
    fast (projected) check covers it."""
    op, xs, ys = sample(case)
    for fn, args in ((op, xs), (op.inverse, ys)):
        leaves = tuple(t.detach().requires_grad_() for t in args)
        assert torch.autograd.gradcheck(fn, leaves, fast_mode=not case.ladj)


@cases
def test_outputs_own_their_storage(case: Case) -> None:
    """Neither direction returns a view or an alias of its input, so invertible_call can
    free the input and the next block can free the output."""
    op, xs, ys = sample(case)
    for fn, args in ((op, xs), (op.inverse, ys)):
        ptrs = {t.untyped_storage().data_ptr() for t in args}
        for o in data_of(case, fn(*args)):
            assert not o._is_view() and o.untyped_storage().data_ptr() not in ptrs


@cases
def test_ops_are_modules_with_buffers_and_no_parameters(case: Case) -> None:
    op = case.make()
    m = inv.as_module(op)
    assert list(m.parameters()) == []
    assert all(not b.requires_grad for b in m.buffers())


# -- a chain of them ---------------------------------------------------------------------


def flow() -> inv.Invertible:
    g = torch.Generator().manual_seed(0)
    return inv.chain(
        ops.squeeze(2),
        ops.leaky_relu(0.3),
        ops.permutation(8, generator=g),
        ops.sigmoid(),
        ops.logit(),
        ops.shuffle(4),
        ops.tanh(),
        ops.reverse(),
        ops.checkerboard(),
        ops.softplus(),
        ops.log(),
        ops.exp(),
        ops.split(),
        ops.concat(),
        ops.reverse(dim=-1),
    )


def test_a_chain_sums_the_log_dets_under_invertible_call() -> None:
    net = flow()
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=D)
    z, ladj = inv.invertible_call(net, x * 1.0)
    h, total = x, torch.zeros(3, dtype=D)
    for block in net.blocks:  # type: ignore[attr-defined]
        out = block(*h) if isinstance(h, tuple) else block(h)
        if block._ladj is True:
            *data, step = out
            h, total = (data[0] if len(data) == 1 else tuple(data)), total + step
        else:
            h = out
    assert z.shape == (3, 16, 2, 1)
    torch.testing.assert_close(z, h, **F64)
    torch.testing.assert_close(ladj, total, **F64)

    back, ladj_inv = inv.invertible_call(net.inverse, z * 1.0)
    torch.testing.assert_close(back, x, **F64)
    torch.testing.assert_close(ladj_inv, -ladj, **F64)

    assert_all_close(_grads_under_call(net, (x,), True), _grads_under_call(net, (x,), False), **F64)
    assert_all_close(
        _grads_under_call(net.inverse, (z.detach(),), True),
        _grads_under_call(net.inverse, (z.detach(),), False),
        **F64,
    )


def test_a_chain_of_volume_preserving_ops_returns_data_alone() -> None:
    net = inv.chain(ops.squeeze(2), ops.reverse(), ops.shuffle(2), ops.checkerboard())
    x = torch.randn(2, 1, 4, 4, dtype=D)
    y = inv.invertible_call(net, x * 1.0)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 8, 2, 1)
    torch.testing.assert_close(net.inverse(y), x, rtol=0, atol=0)


# -- each op's own layout -----------------------------------------------------------------


def test_squeeze_is_glows_space_to_depth_and_unsqueeze_its_inverse() -> None:
    x = torch.randn(2, 3, 4, 6, dtype=D)
    b, c, h, w = x.shape
    glow = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
    y = ops.squeeze(2)(x)
    assert torch.equal(y, glow)
    assert torch.equal(ops.squeeze(2).inverse(y), ops.unsqueeze(2)(y))
    assert torch.equal(ops.unsqueeze(2).inverse(x), y)


def test_checkerboard_gathers_each_colour_into_half_the_channels() -> None:
    x = torch.randn(2, 3, 5, 6, dtype=D)
    y = ops.checkerboard()(x)
    assert y.shape == (2, 6, 5, 3)
    hh, ww = torch.meshgrid(torch.arange(5), torch.arange(6), indexing="ij")
    white = (hh + ww) % 2 == 0
    assert torch.equal(y[:, :3].flatten(2), x.flatten(2)[:, :, white.flatten()])
    assert torch.equal(y[:, 3:].flatten(2), x.flatten(2)[:, :, (~white).flatten()])


def test_checkerboard_then_couple_is_a_checkerboard_masked_coupling() -> None:
    """F reads only the squares of one colour and changes only the other's."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1).double()
    block = inv.chain(ops.checkerboard(), inv.couple(conv), ops.checkerboard().inverse)
    x = torch.randn(1, 1, 4, 4, dtype=D)
    y = block(x)
    hh, ww = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    odd = ((hh + ww) % 2 == 1)[None, None]
    assert torch.equal(y[odd], x[odd])  # the conditioning colour is unchanged
    assert not torch.allclose(y[~odd], x[~odd])
    torch.testing.assert_close(inv.invertible_call(block.inverse, y * 1.0), x, **F64)


def test_shuffle_is_shufflenets_channel_shuffle() -> None:
    x = torch.randn(2, 12, 3, dtype=D)
    ref = x.view(2, 3, 4, 3).transpose(1, 2).reshape(2, 12, 3)
    assert torch.equal(ops.shuffle(3)(x), ref)
    assert torch.equal(ops.shuffle(12)(x), x) and torch.equal(ops.shuffle(1)(x), x)


def test_permutation_is_a_fixed_buffer_reproducible_with_a_generator() -> None:
    a = ops.permutation(16, generator=torch.Generator().manual_seed(7))
    b = ops.permutation(16, generator=torch.Generator().manual_seed(7))
    buffers = dict(inv.as_module(a).named_buffers())
    perm, inverse_perm = buffers["module.perm"], buffers["module.inverse_perm"]
    assert torch.equal(perm, dict(inv.as_module(b).named_buffers())["module.perm"])
    assert torch.equal(perm[inverse_perm], torch.arange(16))
    x = torch.randn(2, 16)
    assert torch.equal(a(x), x[:, perm]) and torch.equal(a(x), a(x))


def test_split_makes_the_halves_that_couple_makes() -> None:
    x = torch.randn(2, 7, 3, dtype=D)
    a, b = ops.split()(x)
    assert (a.shape[1], b.shape[1]) == (3, 4)
    assert ops.split().n_outputs == 2 and ops.concat().n_inputs == 2
    assert torch.equal(ops.concat()(a, b), x)
    block = inv.couple(torch.nn.Linear(4, 3).double(), torch.nn.Linear(3, 4).double())
    x = torch.randn(2, 7, dtype=D)
    torch.testing.assert_close(block(x), ops.concat()(*block(*ops.split()(x))), **F64)


def test_names() -> None:
    names = {
        ops.leaky_relu(): "leaky_relu(0.01)",
        ops.sigmoid(): "sigmoid",
        ops.logit(): "logit",
        ops.softplus(): "softplus",
        ops.reverse(): "reverse",
        ops.reverse(dim=-1): "reverse(dim=-1)",
        ops.permutation(8): "permutation(8)",
        ops.shuffle(2, dim=-1): "shuffle(2, dim=-1)",
        ops.squeeze(2): "squeeze(2)",
        ops.unsqueeze(): "unsqueeze(2)",
        ops.split(): "split",
        ops.checkerboard(): "checkerboard",
    }
    for op, name in names.items():
        assert repr(op) == f"Invertible({name})"


# -- domain edges -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("make", "direction", "values"),
    [
        (ops.sigmoid, "inverse", [0.0, 1.0, -0.5, 2.0]),
        (ops.logit, "forward", [0.0, 1.0, -0.5, 2.0]),
        (ops.tanh, "inverse", [-1.0, 1.0, -3.0, 3.0]),
        (ops.exp, "inverse", [0.0, -1.0, 1e-300, 1e30]),
        (ops.log, "forward", [0.0, -1.0, 1e-300, 1e30]),
        (ops.softplus, "inverse", [0.0, -1.0, 1e-30, 1e4]),
        (ops.sigmoid, "forward", [-1e4, 1e4, -50.0, 50.0]),
        (ops.tanh, "forward", [-1e4, 1e4, -50.0, 50.0]),
        (ops.softplus, "forward", [-1e4, 1e4, -50.0, 50.0]),
    ],
    ids=["logit", "logit op", "atanh", "log", "log op", "softplus^-1", "sigmoid", "tanh", "softplus"],
)
def test_bounded_domains_give_finite_values_ladj_and_gradients(
    make: Callable[[], inv.Invertible], direction: str, values: list[float], dtype: torch.dtype
) -> None:
    op = make()
    fn = op if direction == "forward" else op.inverse
    x = torch.tensor([values], dtype=dtype, requires_grad=True)
    y, ladj = fn(x)
    assert torch.isfinite(y).all() and torch.isfinite(ladj).all()
    (y.sum() + ladj.sum()).backward()
    assert torch.isfinite(x.grad).all()  # type: ignore[arg-type]


def test_clamped_edges() -> None:
    """The clamps are the dtype's numbers nearest the edge, inside the domain."""
    f32 = torch.finfo(torch.float32)
    one = torch.tensor([[1.0, 0.0]])
    y = ops.sigmoid().inverse(one)[0]
    torch.testing.assert_close(
        y, torch.tensor([[math.log((1 - f32.eps / 2) / (f32.eps / 2)), math.log(f32.tiny)]])
    )
    assert torch.equal(ops.log()(torch.tensor([[0.0, -2.0]]))[0], torch.full((1, 2), math.log(f32.tiny)))
    big = torch.tensor([[800.0, 1e-3]], dtype=D)
    torch.testing.assert_close(
        ops.softplus().inverse(big)[0], torch.tensor([[800.0, math.log(math.expm1(1e-3))]], dtype=D)
    )
    # away from saturation the round trip is exact to rounding; saturated, it rebuilds the edge
    x = torch.tensor([[10.0, -30.0, 5.0]], dtype=D)
    torch.testing.assert_close(ops.sigmoid().inverse(ops.sigmoid()(x)[0])[0], x, rtol=1e-11, atol=0)
    t = torch.tensor([[5.0, -5.0, 0.5]], dtype=D)
    torch.testing.assert_close(ops.tanh().inverse(ops.tanh()(t)[0])[0], t, rtol=1e-11, atol=0)
    saturated = torch.tensor([[40.0]], dtype=D)
    torch.testing.assert_close(
        ops.sigmoid().inverse(ops.sigmoid()(saturated)[0])[0],
        torch.tensor([[36.7368]], dtype=D),
        rtol=1e-5,
        atol=0,
    )


# -- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda: ops.leaky_relu(0.0),
            r"invfunc\.ops\.leaky_relu: negative_slope must be a finite number > 0.*0\.0",
        ),
        (lambda: ops.leaky_relu(-0.1), r"invfunc\.ops\.leaky_relu: .* got -0\.1"),
        (lambda: ops.leaky_relu(float("nan")), r"invfunc\.ops\.leaky_relu: .* got nan"),
        (lambda: ops.leaky_relu("0.1"), r"invfunc\.ops\.leaky_relu: .* got '0\.1'"),
        (lambda: ops.permutation(0), r"invfunc\.ops\.permutation: num_features must be an int >= 1, got 0"),
        (
            lambda: ops.permutation(4, generator=3),
            r"invfunc\.ops\.permutation: generator must be a torch\.Generator",
        ),
        (lambda: ops.shuffle(0), r"invfunc\.ops\.shuffle: groups must be an int >= 1, got 0"),
        (lambda: ops.squeeze(2.0), r"invfunc\.ops\.squeeze: factor must be an int >= 1, got 2\.0"),
        (lambda: ops.unsqueeze(0), r"invfunc\.ops\.unsqueeze: factor must be an int >= 1"),
        (lambda: ops.reverse(dim=None), r"invfunc\.ops\.reverse: dim must be an int, got None"),
        (lambda: ops.split(dim=1.0), r"invfunc\.ops\.split: dim must be an int"),
    ],
)
def test_arguments_are_checked_when_the_op_is_made(make: Callable[[], Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    ("op", "args", "error", "match"),
    [
        (
            ops.permutation(4),
            (torch.randn(2, 5),),
            ValueError,
            r"invfunc\.ops\.permutation\(4, dim=1\): expected an input of size 4 .* \(2, 5\)",
        ),
        (
            ops.shuffle(3),
            (torch.randn(2, 4),),
            ValueError,
            r"invfunc\.ops\.shuffle\(3\): .* divisible by groups=3, got shape \(2, 4\)",
        ),
        (
            ops.squeeze(2),
            (torch.randn(1, 1, 3, 4),),
            ValueError,
            r"invfunc\.ops\.squeeze\(2\): the height and width must be divisible by factor=2, "
            r"got shape \(1, 1, 3, 4\)",
        ),
        (
            ops.squeeze(2),
            (torch.randn(4, 4),),
            ValueError,
            r"invfunc\.ops\.squeeze\(2\): expects an image batch \(B, C, H, W\), got shape \(4, 4\)",
        ),
        (
            ops.squeeze(2).inverse,
            (torch.randn(1, 3, 2, 2),),
            ValueError,
            r"invfunc\.ops\.squeeze\(2\): the channels must be divisible by factor\*\*2=4",
        ),
        (
            ops.unsqueeze(2),
            (torch.randn(1, 6, 2, 2),),
            ValueError,
            r"invfunc\.ops\.unsqueeze\(2\): the channels must be divisible",
        ),
        (
            ops.split(),
            (torch.randn(3, 1),),
            ValueError,
            r"invfunc\.ops\.split: .* at least 2 along dim 1, got shape \(3, 1\)",
        ),
        (
            ops.concat(),
            (torch.randn(2, 3), torch.randn(2, 1)),
            ValueError,
            r"invfunc\.ops\.concat: joins the halves .* got sizes 3 and 1",
        ),
        (
            ops.concat(),
            (torch.randn(2, 3), torch.randn(2, 3, 1)),
            ValueError,
            r"invfunc\.ops\.concat: the halves must have the same number of dimensions",
        ),
        (
            ops.checkerboard(),
            (torch.randn(1, 1, 4, 3),),
            ValueError,
            r"invfunc\.ops\.checkerboard: the width must be even, got shape \(1, 1, 4, 3\)",
        ),
        (
            ops.checkerboard().inverse,
            (torch.randn(1, 3, 4, 2),),
            ValueError,
            r"invfunc\.ops\.checkerboard: the inverse takes 2C channels",
        ),
        (
            ops.reverse(dim=3),
            (torch.randn(2, 3),),
            ValueError,
            r"invfunc\.ops\.reverse: dim=3 is out of range",
        ),
        (
            ops.sigmoid(),
            (torch.ones(2, 3, dtype=torch.long),),
            TypeError,
            r"invfunc\.ops\.sigmoid: expects a floating-point tensor, got dtype torch\.int64",
        ),
        (
            ops.log(),
            (torch.ones(2, 3, dtype=torch.long),),
            TypeError,
            r"invfunc\.ops\.log: expects a floating-point",
        ),
    ],
    ids=lambda v: None if not isinstance(v, str) else v[:24],
)
def test_inputs_are_checked_at_the_call(
    op: inv.Invertible, args: tuple[torch.Tensor, ...], error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        op(*args)
    if not isinstance(args[0], torch.Tensor) or args[0].is_floating_point():
        with pytest.raises(error, match=match):
            inv.invertible_call(op, *[a.requires_grad_() * 1.0 for a in args])
