"""Numerics of reconstruction: drift by depth and dtype, cancellation, affine scales at
the edge of the float range, deterministic recompute (reliability catalogue items 33,
34, 35 and 38).

Errors are relative to the largest magnitude of the reference tensor:
``max|got - want| / max|want|``, the larger over the input and every parameter for
gradients. The bounds asserted below carry a margin of about 7x or more over the worst
figure measured over ten seeds (torch 2.13, CPU); ``docs/sharp-bits.md`` lists the
measured figures.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch

import invfunc as inv
from _util import F64, assert_all_close, grads_of, mlp


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max())


def _max_rel(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    assert len(got) == len(want)
    return max(_rel(g, w) for g, w in zip(got, want))


# -- item 33: drift vs depth x dtype, additive coupling -----------------------------

HALF = 8  # width of each half; inputs are (8, 16)


@functools.cache
def _modules(depth: int) -> torch.nn.ModuleList:
    """``depth`` pairs (F, G) of float64 MLPs, the same for every dtype (copied, then cast)."""
    torch.manual_seed(0)
    return torch.nn.ModuleList(
        torch.nn.ModuleList([mlp(HALF).double(), mlp(HALF).double()]) for _ in range(depth)
    )


def _net(mods: torch.nn.ModuleList) -> tuple[inv.Invertible, list[torch.Tensor]]:
    return inv.chain(*[inv.couple(F, G) for F, G in mods]), list(mods.parameters())


def _input() -> torch.Tensor:
    torch.manual_seed(100)
    return torch.randn(8, 2 * HALF, dtype=torch.float64)


@functools.cache
def _reference(depth: int) -> tuple[torch.Tensor, ...]:
    """Gradients of the float64 chain under plain autograd: the oracle."""
    net, params = _net(_modules(depth))
    x = _input().requires_grad_()
    return torch.autograd.grad(net(x * 1).square().mean(), [x, *params])


def _drift(
    depth: int, dtype: torch.dtype, *, verify: str = "off", autocast: bool = False
) -> tuple[float, float, float]:
    """Run the chain in ``dtype`` through invertible_call.

    Returns the reconstruction error of the call's (freed) input after the backward, the
    largest drift that verify recorded (0 when off), and the gradient error against the
    float64 plain-autograd reference.
    """
    net, params = _net(copy.deepcopy(_modules(depth)).to(dtype))
    x = _input().to(dtype).requires_grad_()
    h = x * 1
    before = h.detach().clone()
    with inv.explain() as rep:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = inv.invertible_call(net, h, verify=verify)
        assert rep.freed and rep.freed[0][1] == 0  # the input is rebuilt, not kept
        got = torch.autograd.grad(y.double().square().mean(), [x, *params])
    drift = max((e for _, _, e in rep.drift), default=0.0)
    return _rel(h, before), drift, _max_rel(got, _reference(depth))


# (reconstruction bound, gradient bound) vs the float64 reference, by (dtype, depth).
# Measured worst over 10 seeds: float32 reconstruction 9.4e-8 / 4.2e-7 / 1.0e-6 / 1.4e-5
# and gradients 3.0e-7 / 4.2e-7 / 1.3e-6 / 2.7e-5 at depth 1 / 8 / 32 / 128; float64
# reconstruction 1e-16 / 5.5e-16 / 2.0e-15 / 2.0e-14, gradients at most 3.7e-14.
DRIFT_BOUNDS: dict[tuple[torch.dtype, int], tuple[float, float]] = {
    (torch.float64, 1): (1e-14, 1e-14),
    (torch.float64, 8): (1e-14, 1e-14),
    (torch.float64, 32): (3e-14, 3e-14),
    (torch.float64, 128): (3e-13, 3e-13),
    (torch.float32, 1): (1e-6, 3e-6),
    (torch.float32, 8): (4e-6, 4e-6),
    (torch.float32, 32): (1e-5, 1e-5),
    (torch.float32, 128): (2e-4, 2e-4),
}


@pytest.mark.parametrize(("dtype", "depth"), list(DRIFT_BOUNDS), ids=lambda v: str(v).removeprefix("torch."))
def test_additive_drift_by_depth_within_documented_bounds(dtype: torch.dtype, depth: int) -> None:
    """Reconstruction and gradient error of an additive chain, against float64 plain autograd."""
    recon, drift, grad = _drift(depth, dtype, verify="raise")
    recon_bound, grad_bound = DRIFT_BOUNDS[dtype, depth]
    assert recon <= recon_bound, f"reconstruction error {recon:.2e} > {recon_bound:.0e}"
    assert grad <= grad_bound, f"gradient error {grad:.2e} > {grad_bound:.0e}"
    assert 0 < drift <= 2 * recon_bound  # verify saw the same drift (its fingerprint is sampled)


# Low precision: invfunc computes in the input's dtype (no upcast), so the drift is that
# of the dtype's arithmetic. Either verify="raise" flags a block (drift above the default
# tolerance: 5e-2 bfloat16, 1e-2 float16), or the reconstruction is within that tolerance
# and the gradients within GRAD_BOUND of the float64 reference. Measured over 12 seeds:
# depths 1 and 8 never flagged, depth 128 always; at depth 32 bfloat16 was flagged on 4
# of 12 seeds, float16 on none. Unflagged, gradients were within 9.1e-2 (bfloat16) and
# 1.2e-2 (float16) of the reference; plain autograd in the same dtype is as far off.
LOW_RTOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}
GRAD_BOUND = {torch.bfloat16: 0.25, torch.float16: 0.05}


@pytest.mark.parametrize("depth", [1, 8, 32, 128])
@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d).removeprefix("torch.")
)
def test_low_precision_drift_is_within_bound_or_flagged(dtype: torch.dtype, depth: int) -> None:
    assert inv._verify.DEFAULT_RTOL[dtype] == LOW_RTOL[dtype]  # the documented default
    try:
        recon, drift, grad = _drift(depth, dtype, verify="raise")
    except inv.InvfuncError as e:
        assert depth > 8, f"flagged at depth {depth}, documented as within tolerance: {e}"
        assert f"for {dtype})" in str(e) and "couple(Sequential, Sequential)" in str(e)
        return
    assert depth < 128, f"depth 128 drifted {drift:.2e} without being flagged"
    assert recon <= LOW_RTOL[dtype] and drift <= LOW_RTOL[dtype]
    assert grad <= GRAD_BOUND[dtype], f"gradient error {grad:.2e}"


def test_bfloat16_autocast_with_a_float32_stream_drifts_like_float32() -> None:
    """Under autocast, F and G run in bfloat16 but the coupling's additions stay float32:
    the reconstruction is float32-exact (measured 2.3e-7 at depth 32), and the gradients
    are those of plain autograd under the same autocast."""
    depth = 32
    recon, drift, _ = _drift(depth, torch.float32, verify="raise", autocast=True)
    assert recon <= 2e-6 and drift <= 2e-6
    net, params = _net(copy.deepcopy(_modules(depth)).float())
    x = _input().float()

    def run(mode: str) -> list[torch.Tensor]:
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = inv.invertible_call(net, xx * 1, mode=mode)
        return list(torch.autograd.grad(y.double().square().mean(), [xx, *params]))

    assert _max_rel(run("invertible"), run("plain")) <= 1e-6


# -- item 34: cancellation -------------------------------------------------------------


def big_shift(t: torch.Tensor) -> torch.Tensor:
    return 1e3 + t


def small(t: torch.Tensor) -> torch.Tensor:
    return 1e-3 * torch.tanh(t)


def _cancelling_input(dtype: torch.dtype) -> torch.Tensor:
    torch.manual_seed(0)
    return (1e-3 * torch.randn(4, 8, dtype=dtype)).requires_grad_()


def test_cancellation_is_flagged_by_verify_raise_naming_the_block() -> None:
    """y1 = x1 + F(x2) with |F| ~ 1e3 and |x1| ~ 1e-3: float32 keeps ~3 digits of x1."""
    block = inv.couple(big_shift, small)
    x = _cancelling_input(torch.float32)
    y = inv.invertible_call(block, x * 1, verify="raise")
    msg = (
        r"invertible_call\(couple\(big_shift, small\)\) backward: input 0 was rebuilt by the inverse "
        r"with relative error \d\.\d\de-0[23] \(tolerance 1e-04 for torch\.float32\).*keep="
    )
    with pytest.raises(inv.InvfuncError, match=msg):
        y.square().sum().backward()
    # The same block in float64 keeps enough digits and passes (measured drift 2.4e-11).
    x = _cancelling_input(torch.float64)
    with inv.verify("raise"), inv.explain() as rep:
        inv.invertible_call(block, x * 1).square().sum().backward()
    assert 0 < rep.drift[0][2] < 1e-9


def test_cancellation_warns_under_the_warn_policy() -> None:
    block = inv.couple(big_shift, small)
    x = _cancelling_input(torch.float32)
    with inv.verify("warn"):
        y = inv.invertible_call(block, x * 1)
    with pytest.warns(inv.InvertibilityWarning, match=r"couple\(big_shift, small\)\) backward: input 0"):
        y.square().sum().backward()
    assert x.grad is not None  # warn lets the backward finish


def test_cancellation_in_a_small_part_of_a_large_input_is_not_flagged() -> None:
    """The fingerprint's error is relative to the input's largest magnitude: when only a
    small-magnitude part of an O(1) input loses its digits, the check passes. (A limit of
    the check, documented; measured 1.3e-5 normwise while those entries are up to 5.6% off.)"""
    block = inv.couple(big_shift, small)
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    x[:, :4] *= 1e-3  # x1 small; x2 = O(1)
    x.requires_grad_()
    h = x * 1
    before = h.detach().clone()
    with inv.verify("raise"), inv.explain() as rep:
        inv.invertible_call(block, h).square().sum().backward()
    assert rep.drift[0][2] < 1e-4  # not flagged ...
    assert float(((h.detach() - before) / before).abs().max()) > 1e-2  # ... yet x1 lost its digits


# -- item 35: affine coupling written by the user ----------------------------------------


def _affine(
    dtype: torch.dtype, *, shift: float = 0.0, clamp: float | None = None, seed: int = 0
) -> tuple[inv.Invertible, list[torch.Tensor]]:
    """y = (x1, x2 * exp(s(x1)) + t(x1)); s's output is moved by ``shift`` and, with
    ``clamp``, soft-clamped to (-clamp, clamp) by ``clamp * tanh(s / clamp)``."""
    torch.manual_seed(seed)
    s_net, t_net = mlp(4).to(dtype), mlp(4).to(dtype)
    with torch.no_grad():
        s_net[-1].bias.add_(shift)  # type: ignore[operator]

    def scale(h: torch.Tensor) -> torch.Tensor:
        s = s_net(h)
        return s if clamp is None else clamp * torch.tanh(s / clamp)

    def inverse(y: torch.Tensor) -> torch.Tensor:
        y1, y2 = y.chunk(2, 1)
        return torch.cat([y1, (y2 - t_net(y1)) * torch.exp(-scale(y1))], 1)

    @inv.invertible(inverse=inverse)
    def affine(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, 1)
        return torch.cat([x1, x2 * torch.exp(scale(x1)) + t_net(x1)], 1)

    return affine, [*s_net.parameters(), *t_net.parameters()]


def _affine_input(dtype: torch.dtype) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(8, 8, dtype=dtype, requires_grad=True)


@pytest.mark.parametrize("use_grad", [False, True], ids=["backward", "autograd.grad"])
def test_affine_coupling_gradients_equal_plain_autograd(use_grad: bool) -> None:
    parts = [_affine(torch.float64, seed=s) for s in range(4)]
    net = inv.chain(*[f for f, _ in parts])
    params = [p for _, ps in parts for p in ps]
    x = _affine_input(torch.float64)

    def run(t: torch.Tensor) -> torch.Tensor:
        return inv.invertible_call(net, t, verify="raise")

    assert_all_close(
        grads_of(run, x, params, use_grad=use_grad), grads_of(net, x, params, use_grad=use_grad), **F64
    )


@pytest.mark.parametrize(
    ("dtype", "shift"),
    [
        pytest.param(torch.float32, -20.0, id="float32-exp(-20): x2 below y2's rounding"),
        pytest.param(torch.float32, -120.0, id="float32-exp(-120) underflows: NaN rebuild"),
        pytest.param(torch.float64, -800.0, id="float64-exp(-800) underflows"),
        pytest.param(torch.float32, 100.0, id="float32-exp(100) overflows"),
    ],
)
def test_affine_scale_near_zero_or_overflowing_is_flagged(dtype: torch.dtype, shift: float) -> None:
    """A scale that rounds x2 away (or to inf) cannot be inverted; verify says so."""
    f, _ = _affine(dtype, shift=shift)
    x = _affine_input(dtype)
    y = inv.invertible_call(f, x * 1, verify="raise")
    if shift > 0:
        assert not torch.isfinite(f(x.detach())).all()  # the overflow is the model's own
    with pytest.raises(inv.InvfuncError, match=r"invertible_call\(affine\) backward: input 0 was rebuilt"):
        y.square().mean().backward()


def test_affine_scale_near_zero_warns_and_only_the_warning_tells() -> None:
    """Under "warn" the backward completes; its gradients are those of the wrong input
    (measured 148% off), so the warning is the signal to act on."""
    f, params = _affine(torch.float32, shift=-20.0)
    x = _affine_input(torch.float32)
    want = torch.autograd.grad(f(x * 1).square().mean(), [x, *params])
    with inv.verify("warn"):
        y = inv.invertible_call(f, x * 1)
    with pytest.warns(inv.InvertibilityWarning, match=r"affine\) backward: input 0"):
        got = torch.autograd.grad(y.square().mean(), [x, *params])
    assert _max_rel(got, want) > 0.1


def test_checkpoint_mode_cures_an_inaccurate_inverse() -> None:
    """mode="checkpoint" (a remedy the verify message names) keeps the input and
    differentiates at it: plain autograd's gradients, nothing flagged."""
    f, params = _affine(torch.float32, shift=-20.0)
    x = _affine_input(torch.float32)
    want = torch.autograd.grad(f(x * 1).square().mean(), [x, *params])
    with inv.verify("raise"), inv.explain() as rep:
        y = inv.invertible_call(f, x * 1, mode="checkpoint")
        got = torch.autograd.grad(y.square().mean(), [x, *params])
    assert rep.drift == []
    assert_all_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["keep=", "leaf"])
def test_a_kept_input_is_differentiated_at_its_kept_value(how: str) -> None:
    f, params = _affine(torch.float32, shift=-20.0)
    x = _affine_input(torch.float32)
    want = torch.autograd.grad(f(x * 1).square().mean(), [x, *params])
    h = x * 1 if how == "keep=" else x
    with inv.explain() as rep:
        y = inv.invertible_call(f, h, keep=[0] if how == "keep=" else ())
    assert rep.freed == []
    got = torch.autograd.grad(y.square().mean(), [x, *params])
    assert _max_rel(got, want) <= 1e-5


@pytest.mark.parametrize(("shift", "depth"), [(0.0, 8), (-20.0, 1), (-120.0, 1), (100.0, 1)])
def test_soft_clamped_affine_stays_within_tolerance(shift: float, depth: int) -> None:
    """With s = 2 tanh(s_raw / 2) the scale stays in (e^-2, e^2): float32 rebuilds within
    its tolerance and the gradients are plain autograd's (measured at most 2.7e-7 apart)."""
    parts = [_affine(torch.float32, shift=shift, clamp=2.0, seed=s) for s in range(depth)]
    net = inv.chain(*[f for f, _ in parts])
    params = [p for _, ps in parts for p in ps]
    x = _affine_input(torch.float32)
    with inv.verify("raise"), inv.explain() as rep:
        y = inv.invertible_call(net, x * 1)
        got = torch.autograd.grad(y.square().mean(), [x, *params])
    assert max(e for _, _, e in rep.drift) < 1e-6
    want = torch.autograd.grad(net(x * 1).square().mean(), [x, *params])
    assert _max_rel(got, want) <= 3e-6


# -- item 38: determinism and thread count -------------------------------------------


@pytest.fixture
def deterministic() -> Iterator[None]:
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _on_grid(k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Round to the grid 2^-k in value, straight-through in gradient."""

    def q(t: torch.Tensor) -> torch.Tensor:
        return t + (torch.round(t * 2**k) / 2**k - t).detach()

    return q


@pytest.mark.parametrize(
    ("dtype", "k"), [(torch.float32, 12), (torch.float64, 30)], ids=["float32", "float64"]
)
def test_grid_coupling_rebuilds_bit_identically_under_deterministic_algorithms(
    deterministic: None, dtype: torch.dtype, k: int
) -> None:
    """With F and G rounded to a grid and the input on it, every addition is exact, so the
    rebuilt input is the forward's bit for bit, provided the recompute of F and G is too."""
    torch.manual_seed(0)
    q = _on_grid(k)
    mods = [(mlp(HALF).to(dtype), mlp(HALF).to(dtype)) for _ in range(32)]
    net = inv.chain(*[inv.couple(lambda t, m=F: q(m(t)), lambda t, m=G: q(m(t))) for F, G in mods])
    params = [p for F, G in mods for p in (*F.parameters(), *G.parameters())]
    torch.manual_seed(1)
    x = (torch.round(torch.randn(16, 2 * HALF, dtype=dtype) * 2**k) / 2**k).requires_grad_()
    h = x * 1
    before = h.detach().clone()
    y = inv.invertible_call(net, h)
    got = torch.autograd.grad(y.square().mean(), [x, *params])
    assert torch.equal(h.detach(), before)
    with torch.no_grad():
        assert torch.equal(net(h), y)  # fn(inverse(y)) == y, bit for bit
    want = torch.autograd.grad(net(x * 1).square().mean(), [x, *params])
    tol = F64 if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-7}
    assert_all_close(got, want, **tol)
    # Control: without the grid the same chain does not rebuild bit for bit.
    plain = inv.chain(*[inv.couple(F, G) for F, G in mods])
    h = x * 1
    before = h.detach().clone()
    inv.invertible_call(plain, h).sum().backward()
    assert not torch.equal(h.detach(), before)


@pytest.mark.parametrize(("forward_threads", "backward_threads"), [(1, 2), (2, 1)])
def test_thread_count_changed_between_forward_and_backward(
    forward_threads: int, backward_threads: int
) -> None:
    torch.manual_seed(0)
    net, params = _net(torch.nn.ModuleList(torch.nn.ModuleList([mlp(32), mlp(32)]) for _ in range(8)))
    torch.manual_seed(1)
    x = torch.randn(64, 64, requires_grad=True)
    want = torch.autograd.grad(net(x * 1).square().mean(), [x, *params])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(forward_threads)
        with inv.verify("raise"):
            y = inv.invertible_call(net, x * 1)
        torch.set_num_threads(backward_threads)
        got = torch.autograd.grad(y.square().mean(), [x, *params])
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    assert _max_rel(got, want) <= 1e-5  # measured 3.8e-7: float32 reconstruction error


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d).removeprefix("torch.")
)
def test_half_precision_stream_keeps_its_inputs_unless_drift_is_verified(dtype: torch.dtype) -> None:
    """Catalogue item 33: a float16/bfloat16 stream is not rebuilt by default (it would
    drift); the call keeps its inputs, says so, and its gradients are plain autograd's in
    that dtype exactly. With verify on it is freed and checked (the test above)."""
    torch.manual_seed(0)
    net = inv.chain(
        *[inv.couple(torch.nn.Linear(4, 4).to(dtype), torch.nn.Linear(4, 4).to(dtype)) for _ in range(3)]
    )
    params = [p for b in net.blocks for m in (b.F, b.G) for p in m.parameters()]
    x = torch.randn(8, 8).to(dtype).requires_grad_()
    h = x * 1
    with inv.explain() as report, pytest.warns(inv.InvertibilityWarning, match=r"inputs are torch\.\w+16"):
        y = inv.invertible_call(net, h)
    assert report.freed == [] and "drift" in report.kept[0][2]
    got = torch.autograd.grad(y.float().square().sum(), [x, *params])
    want = torch.autograd.grad(net(x * 1).float().square().sum(), [x, *params])
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with inv.explain() as report:
        inv.invertible_call(net, x * 1, verify="warn")
    assert report.freed  # verified: freed


def test_a_half_precision_parameter_does_not_make_a_float32_stream_kept() -> None:
    scale = inv.invertible(lambda t, s: t * s.float(), inverse=lambda t, s: t / s.float())
    s = torch.tensor(2.0, dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(4, 6, requires_grad=True)
    with inv.explain() as report, warnings.catch_warnings():
        warnings.simplefilter("error")
        y = inv.invertible_call(scale, x * 1, s)
    assert report.freed  # the float32 input is freed as usual
    got = torch.autograd.grad(y.sum(), [x, s])
    want = torch.autograd.grad(scale(x * 1, s).sum(), [x, s])
    assert_all_close(got, want)
