"""invfunc.testing: the checks catch what they should, the strategies check their arguments
and generate valid values."""

from __future__ import annotations

import re
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

import invfunc as inv
from invfunc.testing import check_grads, check_inverse, default_rtol, find_parameters
from invfunc.testing.strategies import FLOAT_DTYPES, Composite, composites, tensors

F64 = torch.float64


def mlp(h: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.Tanh(), torch.nn.Linear(h, h)).double()


def scale_with(s: torch.Tensor, *, error: float = 0.0) -> inv.Invertible:
    """x * exp(s) capturing s; the inverse is off by ``error`` (only s's gradient sees it)."""
    return inv.invertible(lambda x: x * s.exp(), inverse=lambda y: y * (-s).exp() + error)


# -- check_inverse --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: (inv.invertible(lambda x: 2 * x + 1, inverse=lambda y: (y - 1) / 2), (torch.randn(3, 4),)),
        lambda: (inv.couple(mlp(2), mlp(2)), (torch.randn(3, 4, dtype=F64),)),
        lambda: (inv.couple(mlp(2)), (torch.randn(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64))),
        lambda: (
            inv.invertible(lambda x, s: x * s.exp(), inverse=lambda y, s: y * (-s).exp()),
            (torch.randn(3, dtype=F64), torch.randn(3, dtype=F64, requires_grad=True)),
        ),
        lambda: (
            inv.chain(inv.couple(mlp(2), mlp(2)), inv.couple(mlp(2)).inverse),
            (torch.randn(5, 4, dtype=F64),),
        ),
    ],
    ids=["affine", "coupling", "pair one-sided", "explicit parameter", "chain"],
)
def test_check_inverse_passes_and_returns_none(build) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    fn, args = build()
    assert check_inverse(fn, *args) is None


def test_check_inverse_says_which_element_and_by_how_much() -> None:
    bad = inv.invertible(lambda x: 2 * x, inverse=lambda y: y / 2 + (y > 5).to(y.dtype))
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]], dtype=F64)
    with pytest.raises(AssertionError) as info:
        check_inverse(bad, x)
    msg = str(info.value)
    assert msg.startswith("check_inverse(<lambda>, ...): input 0: fn.inverse(fn(x)) differs from x")
    assert "in 1 of 4 element(s)" in msg
    assert "the largest difference is 1 at index (1, 1)" in msg
    assert "fn.inverse(fn(x)) 4, x 3" in msg
    assert "rtol=1e-10" in msg


def test_check_inverse_names_the_input_of_a_pair() -> None:
    bad = inv.invertible(lambda a, b: (a, b + 1), inverse=lambda a, b: (a, b - 1.5), n_inputs=2)
    with pytest.raises(AssertionError, match=r"input 1: .* differs from x in 3 of 3 element"):
        check_inverse(bad, torch.zeros(3), torch.zeros(3))


def test_check_inverse_checks_the_other_direction() -> None:
    calls = []

    def drifting(x: torch.Tensor) -> torch.Tensor:  # not a function: each call adds more
        calls.append(1)
        return x + 10 * len(calls)

    fn = inv.invertible(drifting, inverse=lambda y: y - 10)
    with pytest.raises(AssertionError, match=r"output 0: fn\(fn.inverse\(y\)\) differs from y"):
        check_inverse(fn, torch.zeros(2))


def test_check_inverse_tolerances_follow_the_dtype() -> None:
    almost = inv.invertible(lambda x: 2 * x, inverse=lambda y: y / 2 * (1 + 1e-7))
    x = torch.linspace(1, 2, 5, dtype=F64)
    with pytest.raises(AssertionError, match="relative 1e-07"):
        check_inverse(almost, x)  # float64: held to 1e-10
    check_inverse(almost, x.float())  # float32: 1e-4
    check_inverse(almost, x, rtol=1e-6)  # or as asked
    check_inverse(almost, x, rtol=0, atol=1e-6)
    assert default_rtol(x) == 1e-10
    assert default_rtol(x.float(), x) == 1e-4
    assert default_rtol(x.half()) == 1e-2
    assert default_rtol(x.bfloat16(), x.half()) == 5e-2
    assert default_rtol(torch.arange(3), None) == 1e-10


def test_check_inverse_catches_a_wrong_count_or_kind_of_result() -> None:
    two = inv.invertible(lambda x: x, inverse=lambda y: (y, y))
    with pytest.raises(AssertionError, match=r"fn.inverse returned 2 tensor\(s\) for 1 data input"):
        check_inverse(two, torch.zeros(2))
    shape = inv.invertible(lambda x: x, inverse=lambda y: y[:1])
    with pytest.raises(AssertionError, match=r"has shape \(1,\), but x has shape \(2,\)"):
        check_inverse(shape, torch.zeros(2))
    dtype = inv.invertible(lambda x: x, inverse=lambda y: y.double())
    with pytest.raises(AssertionError, match=r"has dtype torch.float64, but x has dtype torch.float32"):
        check_inverse(dtype, torch.zeros(2))
    text = inv.invertible(lambda x: "y", inverse=lambda y: y)
    with pytest.raises(AssertionError, match="fn returned a str"):
        check_inverse(text, torch.zeros(2))


def test_check_inverse_matches_nan_and_infinity() -> None:
    ident = inv.invertible(lambda x: x * 1, inverse=lambda y: y * 1)
    check_inverse(ident, torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0]))
    nan = inv.invertible(lambda x: x * 1, inverse=lambda y: y * float("nan"))
    with pytest.raises(AssertionError, match="in 1 of 1"):
        check_inverse(nan, torch.tensor([1.0]))


def test_check_inverse_replays_randomness_and_leaves_the_generator_alone() -> None:
    noisy = inv.invertible(lambda x: x + torch.rand_like(x), inverse=lambda y: y - torch.rand_like(y))
    before = torch.get_rng_state()
    check_inverse(noisy, torch.zeros(4, dtype=F64))
    assert torch.equal(before, torch.get_rng_state())


def test_check_inverse_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"check_inverse\(<lambda>, ...\): fn must be an Invertible"):
        check_inverse(lambda x: x, torch.zeros(1))  # type: ignore[arg-type]
    ident = inv.invertible(lambda x: x, inverse=lambda y: y)
    with pytest.raises(TypeError, match="no inputs given"):
        check_inverse(ident)
    with pytest.raises(TypeError, match="data input 0 must be a tensor, got list"):
        check_inverse(ident, [1.0])
    with pytest.raises(ValueError, match="rtol= must be a non-negative number"):
        check_inverse(ident, torch.zeros(1), rtol=-1)
    with pytest.raises(ValueError, match="atol= must be a non-negative number"):
        check_inverse(ident, torch.zeros(1), atol="0")  # type: ignore[arg-type]


# -- check_grads ----------------------------------------------------------------------------

# The functions below are wrong on purpose; the engine's recompute check warns about them in
# backward too (NOTE [Recompute divergence], tested in test_choices.py).
_WRONG_ON_PURPOSE = pytest.mark.filterwarnings(
    "ignore:.*did not reproduce the forward:invfunc.InvertibilityWarning"
)


def test_check_grads_passes_on_correct_functions_in_every_mode() -> None:
    torch.manual_seed(0)
    F, G = mlp(3), mlp(3)
    w = torch.randn(6, dtype=F64, requires_grad=True)
    net = inv.chain(inv.couple(F, G), scale_with(w), inv.couple(G))
    x = torch.randn(4, 6, dtype=F64)
    for mode in inv.MODES:
        assert check_grads(net, x, mode=mode) is None
    with inv.mode("checkpoint"):
        check_grads(net, x)


def test_check_grads_explicit_parameters_and_pairs() -> None:
    torch.manual_seed(0)
    scale = inv.invertible(lambda x, s: x * s.exp(), inverse=lambda y, s: y * (-s).exp())
    s = torch.randn(3, dtype=F64, requires_grad=True)
    check_grads(scale, torch.randn(2, 3, dtype=F64), s)
    pair = inv.couple(mlp(3), mlp(3))
    check_grads(pair, torch.randn(2, 3, dtype=F64), torch.randn(2, 3, dtype=F64))


@_WRONG_ON_PURPOSE
def test_check_grads_names_a_wrong_input_gradient() -> None:
    bad = inv.invertible(lambda x: x.exp(), inverse=lambda y: y.log() + 0.1)
    with pytest.raises(AssertionError) as info:
        check_grads(bad, torch.ones(3, dtype=F64))
    msg = str(info.value)
    assert msg.startswith("check_grads(<lambda>, ...): gradient of input 0 (.backward(), mode 'invertible'):")
    assert "invertible_call differs from plain autograd in 3 of 3 element(s)" in msg
    assert re.search(
        r"the largest difference is [0-9.e-]+ at index \(\d,\) \(invertible_call [0-9.e-]+, ", msg
    )


@_WRONG_ON_PURPOSE
def test_check_grads_names_a_wrong_explicit_parameter_gradient() -> None:
    # d/dx of x * exp(s) does not depend on x: a wrong rebuilt x shows only in s's gradient
    bad = inv.invertible(lambda x, s: x * s.exp(), inverse=lambda y, s: y * (-s).exp() + 1)
    s = torch.zeros(2, dtype=F64, requires_grad=True)
    with pytest.raises(AssertionError, match=r"gradient of argument 1 \(.backward\(\), mode 'invertible'\)"):
        check_grads(bad, torch.ones(2, dtype=F64), s)


@_WRONG_ON_PURPOSE
def test_check_grads_names_a_wrong_captured_parameter_gradient() -> None:
    s = torch.zeros(2, dtype=F64, requires_grad=True)
    net = inv.chain(scale_with(s, error=1.0), inv.couple(mlp(1)))
    with pytest.raises(AssertionError, match=r"gradient of fn.blocks\[0\].s "):
        check_grads(net, torch.ones(3, 2, dtype=F64))


@_WRONG_ON_PURPOSE
def test_check_grads_names_a_wrong_module_parameter_gradient() -> None:
    m = torch.nn.Module()
    m.s = torch.nn.Parameter(torch.zeros(2, dtype=F64))

    def fwd(x: torch.Tensor) -> torch.Tensor:
        return x * m.s.exp()

    def bwd(y: torch.Tensor) -> torch.Tensor:
        return y * (-m.s).exp() + 1

    with pytest.raises(AssertionError, match=r"gradient of fn.m.s \(.backward\(\)"):
        check_grads(inv.invertible(fwd, inverse=bwd), torch.ones(2, dtype=F64))


@_WRONG_ON_PURPOSE
def test_check_grads_params_reaches_what_the_walk_cannot() -> None:
    ns = types.SimpleNamespace(s=torch.zeros(2, dtype=F64, requires_grad=True))
    bad = inv.invertible(lambda x: x * ns.s.exp(), inverse=lambda y: y * (-ns.s).exp() + 1)
    assert find_parameters(bad) == []
    with pytest.raises(
        AssertionError,
        match=r"input 0 read after the backward \(.backward\(\), mode 'invertible'\): its value differs",
    ):
        check_grads(bad, torch.ones(2, dtype=F64))  # s is not found: its gradient is not compared
    with pytest.raises(AssertionError, match=r"gradient of params\[0\]"):
        check_grads(bad, torch.ones(2, dtype=F64), params=[ns.s])


@_WRONG_ON_PURPOSE
def test_check_grads_compares_with_autograd_grad_too() -> None:
    # .backward() compares leaves only; a non-leaf captured tensor is compared with autograd.grad
    base = torch.zeros(2, dtype=F64, requires_grad=True)
    s = base * 1
    bad = scale_with(s, error=1.0)
    with pytest.raises(AssertionError, match=r"gradient of fn.s \(torch.autograd.grad, mode 'invertible'\)"):
        check_grads(bad, torch.ones(2, dtype=F64))


@_WRONG_ON_PURPOSE
def test_check_grads_compares_outputs() -> None:
    # a function that computes something else without grad (the engine's forward runs without it)
    sneaky = inv.invertible(
        lambda x: x * (2 if torch.is_grad_enabled() else 3),
        inverse=lambda y: y / (2 if torch.is_grad_enabled() else 3),
    )
    with pytest.raises(
        AssertionError, match=r"output 0 \(.backward\(\), mode 'invertible'\): invertible_call differs"
    ):
        check_grads(sneaky, torch.ones(2, dtype=F64))
    check_grads(sneaky, torch.ones(2, dtype=F64), mode="plain")


@_WRONG_ON_PURPOSE
def test_check_grads_float64_is_held_to_1e_10() -> None:
    def almost(eps: float) -> inv.Invertible:
        return inv.invertible(lambda x: x.exp(), inverse=lambda y: y.log() * (1 + eps))

    x = torch.linspace(0.5, 1, 4, dtype=F64)
    check_grads(almost(1e-13), x)
    with pytest.raises(AssertionError, match="rtol=1e-10"):
        check_grads(almost(1e-8), x)
    check_grads(almost(1e-8), x.float())  # float32: 1e-4
    check_grads(almost(1e-8), x, rtol=1e-6)


def test_check_grads_keeps_existing_grads_and_the_generator() -> None:
    torch.manual_seed(0)
    F = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).double()
    net = inv.couple(F, F)
    F[0].weight.grad = torch.full_like(F[0].weight, 7.0)
    x = torch.randn(8, 4, dtype=F64)
    before = torch.get_rng_state()
    check_grads(net, x)  # dropout: the runs draw the same masks
    assert torch.equal(before, torch.get_rng_state())
    assert torch.equal(F[0].weight.grad, torch.full_like(F[0].weight, 7.0))
    assert F[0].bias.grad is None


def test_check_grads_with_a_custom_call() -> None:
    torch.manual_seed(0)
    net = inv.chain(inv.couple(mlp(2), mlp(2)), inv.couple(mlp(2), mlp(2)))

    def plain(h: torch.Tensor) -> torch.Tensor:
        for b in net.blocks:
            h = b(h) * 2  # ops between the blocks
        return h

    def per_block(h: torch.Tensor) -> torch.Tensor:
        for b in net.blocks:
            h = inv.invertible_call(b, h) * 2
        return h

    fn = inv.invertible(plain, inverse=lambda y: y)  # the inverse is not used by check_grads
    check_grads(fn, torch.randn(3, 4, dtype=F64), call=per_block)

    def wrong(h: torch.Tensor) -> torch.Tensor:
        return net(h) * 2

    with pytest.raises(AssertionError, match=r"output 0 \(.backward\(\), call=.*wrong\)"):
        check_grads(net, torch.randn(3, 4, dtype=F64), call=wrong)


def test_check_grads_rejects_bad_arguments() -> None:
    ident = inv.invertible(lambda x: x * 1, inverse=lambda y: y * 1)
    with pytest.raises(TypeError, match="fn must be an Invertible"):
        check_grads(torch.nn.Linear(1, 1), torch.zeros(1))  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"unknown mode 'fast'; valid modes are 'invertible', 'checkpoint', 'plain'"
    ):
        check_grads(ident, torch.zeros(1), mode="fast")
    with pytest.raises(TypeError, match="pass call= or mode=, not both"):
        check_grads(ident, torch.zeros(1), mode="plain", call=ident)
    with pytest.raises(TypeError, match="call= must be callable"):
        check_grads(ident, torch.zeros(1), call=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"params\[0\] must be a tensor"):
        check_grads(ident, torch.zeros(1), params=[1.0])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="nothing to differentiate"):
        check_grads(ident, torch.arange(3))


def test_find_parameters_walks_chains_couplings_modules_and_closures() -> None:
    F = torch.nn.Linear(2, 2)
    a = torch.zeros(2, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    frozen = torch.zeros(2)

    def G(h: torch.Tensor) -> torch.Tensor:
        return h * a + frozen

    net = inv.chain(inv.couple(F, G), scale_with(b), inv.couple(F, G).inverse)
    found = find_parameters(net)
    assert [n for n, _ in found] == [
        "fn.blocks[0].F.weight",
        "fn.blocks[0].F.bias",
        "fn.blocks[0].G.a",
        "fn.blocks[1].s",
    ]
    assert [t for _, t in found][2:] == [a, b]
    assert find_parameters(inv.invertible(torch.exp, inverse=torch.log)) == []


# -- strategies: arguments --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shape": (2, -1)}, "negative dimension"),
        ({"shape": "2"}, "must be an int, a tuple of ints or a strategy"),
        ({"shape": (2.0,)}, "must be an int, a tuple of ints"),
        ({"shape": [2, 3]}, "must be an int, a tuple of ints"),
        (
            {"shape": 2, "dtype": torch.int64},
            r"dtype=torch.int64 is not supported; valid dtypes are torch.float64",
        ),
        ({"shape": 2, "dtype": "float64"}, "dtype='float64' is not supported"),
        ({"shape": 2, "elements": [1.0]}, "must be a hypothesis strategy"),
        ({"shape": 2, "device": "nowhere"}, "is not a device"),
    ],
)
def test_tensors_checks_arguments_when_called(kwargs, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument, match=message):
        tensors(**kwargs)


def test_tensors_checks_drawn_shapes_and_elements() -> None:
    @given(tensors(shape=st.just((-1,))))
    def bad_shape(x: torch.Tensor) -> None:
        pass

    with pytest.raises(InvalidArgument, match="negative dimension"):
        bad_shape()

    @given(tensors(shape=2, elements=st.just("a")))
    def bad_element(x: torch.Tensor) -> None:
        pass

    with pytest.raises(InvalidArgument, match="elements= drew 'a', which is not a real number"):
        bad_element()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_depth": 0}, "min_depth=0 must be at least 1"),
        ({"max_depth": 1.5}, "max_depth=1.5 must be an int"),
        ({"min_depth": 3, "max_depth": 2}, "max_depth=2 is less than min_depth=3"),
        ({"width": 0}, "width=0 must be at least 1"),
        ({"batch": True}, "batch=True must be an int"),
        ({"dtype": torch.int32}, "dtype=torch.int32 is not supported"),
        ({"blocks": ["coupling", "swap"]}, "unknown kind 'swap'; valid kinds are 'coupling', 'one_sided'"),
        ({"blocks": []}, "blocks= is empty"),
        ({"layers": "linear"}, "layers= must be a sequence of strings"),
        ({"layers": ["conv"]}, "unknown kind 'conv'; valid kinds are 'linear', 'mlp', 'closure', 'function'"),
        ({"forms": ["triple"]}, "unknown kind 'triple'; valid kinds are 'single', 'pair'"),
        ({"explicit": 1}, "explicit=1 must be a bool"),
        ({"nested": None}, "nested=None must be a bool"),
    ],
)
def test_composites_checks_arguments_when_called(kwargs, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument, match=message):
        composites(**kwargs)


# -- strategies: values -------------------------------------------------------------------------


@given(st.data())
def test_tensors_generate_what_was_asked(data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES))
    shape = data.draw(st.lists(st.integers(0, 3), max_size=3).map(tuple))
    x = data.draw(tensors(shape=shape, dtype=dtype))
    assert x.shape == shape and x.dtype == dtype and not x.requires_grad and x.is_leaf
    assert bool(torch.isfinite(x).all()) and bool((x.abs() <= 4).all())
    # allow_subnormal=False: after torch 2.4's compiled kernels ran (test_compile), the
    # process flushes subnormals to zero and hypothesis refuses to draw them
    y = data.draw(tensors(shape=st.integers(0, 4), elements=st.floats(-1, 0, allow_subnormal=False)))
    assert y.dim() == 1 and y.dtype == F64 and bool((y <= 0).all()) and bool((y >= -1).all())


@given(st.data())
def test_composites_generate_valid_composites(data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from([torch.float64, torch.float32]))
    lo = data.draw(st.integers(1, 3))
    hi = data.draw(st.integers(lo, 4))
    before = torch.get_rng_state()
    c = data.draw(composites(min_depth=lo, max_depth=hi, width=2, batch=3, dtype=dtype))
    assert torch.equal(before, torch.get_rng_state())  # the global generator is not used
    assert isinstance(c, Composite) and repr(c).startswith("Composite(chain(")
    # a regroup is one drawn block made of 2 (one tensor) or 4 (a pair) split and merge blocks
    names = [b._name for b in c.net.blocks]  # type: ignore[attr-defined]
    regroups = sum("split@" in n for n in names)
    assert lo <= len(names) - regroups * (1 if c.form == "single" else 3) <= hi
    assert len(c.block_args) == len(c.net.blocks)  # type: ignore[attr-defined]
    x, again = c.make_input(), c.make_input()
    shapes = [(3, 2), (3, 2)] if c.form == "pair" else [(3, 4)]
    assert [t.shape for t in x] == shapes
    assert all(t.is_leaf and t.requires_grad and t.dtype == dtype for t in x)
    assert all(a is not b and torch.equal(a, b) for a, b in zip(x, again))
    assert all(p.is_leaf and p.requires_grad and p.dtype == dtype for p in c.params)
    # params lists every tensor the net reads: what the walk finds, plus the arguments
    assert {id(t) for t in c.params} == {id(t) for _, t in find_parameters(c.net)} | {id(t) for t in c.args}
    assert all(any(a is p for p in c.params) for a in c.args)
    # the blocks one by one, with their arguments, are the net
    y = c.net(*x, *c.args)
    h = x
    for block, args in zip(c.net.blocks, c.block_args):  # type: ignore[attr-defined]
        out = block(*h, *args)
        h = out if isinstance(out, tuple) else (out,)
    assert all(torch.equal(a, b) for a, b in zip(h, y if isinstance(y, tuple) else (y,)))


@given(composites(blocks=["coupling"], layers=["linear"], forms=["pair"], nested=False, max_depth=3))
def test_composites_draw_only_the_kinds_asked_for(c: Composite) -> None:
    assert c.form == "pair" and c.args == ()
    for block in c.net.blocks:  # type: ignore[attr-defined]
        assert type(block).__name__ == "Coupling"
        assert isinstance(block.F, torch.nn.Linear) and isinstance(block.G, torch.nn.Linear)


def test_composites_cover_every_kind() -> None:
    seen: set[str] = set()

    @settings(max_examples=300)
    @given(composites())
    def collect(c: Composite) -> None:
        blocks = c.net.blocks  # type: ignore[attr-defined]
        seen.update(type(b).__name__ for b in blocks)
        seen.update(
            w
            for w in ("closure", "MLP", "Linear", "None", "dim=-1", "inverse(chain(", "regroup@")
            if w in c.description
        )
        seen.update(
            f for f in ("tanh", "sin", "silu") if f"{f}," in c.description or f"{f})" in c.description
        )
        seen.add(c.form + (" with args" if c.args else ""))
        if len(blocks) > 1 and c.description.count("chain(") > 1:
            seen.add("nested")

    collect()
    assert seen >= {
        "regroup@",  # splits and merges
        "Coupling",  # couplings
        "_Variadic",  # inverses of couplings
        "Invertible",  # elementwise blocks
        "closure",
        "MLP",
        "Linear",
        "None",  # one-sided
        "tanh",
        "sin",
        "silu",
        "dim=-1",
        "inverse(chain(",
        "nested",
        "single",
        "pair",
        "single with args",
        "pair with args",
    }, seen
