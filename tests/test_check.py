"""``invfunc.check``: a network diagnosed block by block (NOTE [What check runs])."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import pytest
import torch

import invfunc as inv
from _util import mlp, revnet
from invfunc import ops

F64 = torch.float64
LEAF = "it is a leaf (user data or a parameter); data leaves are freed only when named in free="


def _coupling(h: int = 4, dtype: torch.dtype = F64) -> inv.Invertible:
    return inv.couple(mlp(h).to(dtype), mlp(h).to(dtype))


@inv.invertible(inverse=lambda y: y.log() + 1e-3)  # off by 1e-3
def bad_exp(x: torch.Tensor) -> torch.Tensor:
    return x.exp()


def _mixing(cond: float, n: int = 8) -> inv.Invertible:
    """``x @ A.T`` in float32, with ``A`` of condition number ``cond`` and its float32 inverse."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=g))
    a = ((q * torch.logspace(0, -math.log10(cond), n, dtype=F64)) @ q.T).float()
    a_inv = torch.linalg.inv(a)
    return inv.invertible(lambda x: x @ a.T, inverse=lambda y: y @ a_inv.T)


# -- the healthy case ------------------------------------------------------------------------------


def test_a_healthy_revnet_passes_with_every_number_within_the_tolerance() -> None:
    net, _ = revnet(4, 4)
    x = torch.randn(5, 8, dtype=F64)
    report = inv.check(net, x)
    assert report.ok
    assert report.first_failure is None
    assert [b.index for b in report.blocks] == [0, 1, 2, 3]
    assert [b.name for b in report.blocks] == [
        f"couple(Sequential, Sequential), block {k} of 4" for k in range(1, 5)
    ]
    for b in report.blocks:
        assert b.rtol == 1e-10
        for err in (b.inverse_error, b.forward_error, b.grad_error, b.drift):
            assert err is not None and err <= 1e-13, b
        assert b.deterministic is True
        assert b.stateful == () and b.captured == ()
    text = str(report)
    assert text.startswith("invfunc.check(chain(...)): 4 block(s), ok")
    for b in report.blocks:
        assert b.name in text


def test_the_report_is_plain_frozen_values() -> None:
    report = inv.check(_coupling(), torch.randn(3, 8, dtype=F64))
    (b,) = report.blocks
    assert b.name == "couple(Sequential, Sequential)"  # a lone block: named as itself
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.inverse_error = 0.0  # type: ignore[misc]
    assert dataclasses.asdict(b)["index"] == 0
    assert isinstance(report.blocks, tuple)


# -- the block that breaks -----------------------------------------------------------------------


def test_a_wrong_inverse_three_blocks_deep_is_named_at_index_2() -> None:
    torch.manual_seed(0)
    net = inv.chain(_coupling(), _coupling(), bad_exp, _coupling())
    report = inv.check(net, torch.randn(3, 8, dtype=F64))
    assert not report.ok
    first = report.first_failure
    assert first is not None and first.index == 2
    assert first.name == "bad_exp, block 3 of 4"
    assert first.inverse_error is not None and 1e-4 < first.inverse_error < 1e-2
    assert first.grad_error is not None and first.grad_error > 1e-6  # exp's gradient reads the rebuilt input
    assert "inverse error" in first.problems[0]
    assert any(n.startswith("drift") and "its own inverse error" in n for n in first.notes)
    # the blocks before it are fine on their own; their rebuilt inputs inherit its drift
    for b in report.blocks[:2]:
        assert b.ok and b.inverse_error is not None and b.inverse_error < 1e-13
        assert b.drift is not None and b.drift > 1e-5
        assert any("inherited from bad_exp, block 3 of 4 (index 2)" in n for n in b.notes)
    assert report.blocks[3].ok and report.blocks[3].drift is not None and report.blocks[3].drift < 1e-13
    assert "FAILED at bad_exp, block 3 of 4 (index 2)" in str(report).splitlines()[0]


def test_strict_raises_naming_the_block_and_the_numbers() -> None:
    torch.manual_seed(0)
    net = inv.chain(_coupling(), _coupling(), bad_exp, _coupling())
    x = torch.randn(3, 8, dtype=F64)
    err = inv.check(net, x).blocks[2].inverse_error
    with pytest.raises(inv.InvfuncError) as raised:
        inv.check(net, x, strict=True)
    msg = str(raised.value)
    assert msg.startswith(
        "invfunc.check(chain(...), *args): bad_exp, block 3 of 4 (index 2) fails: inverse error "
    )
    assert f"{err:.1e} > rtol 1e-10" in msg
    assert "Fix the inverse" in msg
    inv.check(_coupling(), x, strict=True)  # passing: no error


def test_a_forward_that_raises_is_reported_and_later_blocks_are_not_checked() -> None:
    def boom(x: torch.Tensor) -> torch.Tensor:
        raise ValueError("no good")

    net = inv.chain(_coupling(), inv.invertible(boom, inverse=boom), _coupling())
    report = inv.check(net, torch.randn(2, 8, dtype=F64))
    assert [b.ok for b in report.blocks] == [True, False, False]
    assert report.blocks[1].problems == ("its forward raised ValueError: no good",)
    assert report.blocks[2].problems[0].startswith("not checked")
    assert report.problems and "the whole call" in report.problems[0]


def test_tolerance_follows_the_dtype_and_can_be_given() -> None:
    net = inv.chain(_coupling(dtype=torch.float32), _coupling(dtype=torch.float32))
    x = torch.randn(3, 8)
    assert {b.rtol for b in inv.check(net, x).blocks} == {1e-4}
    assert {b.rtol for b in inv.check(net, x, rtol=1e-3).blocks} == {1e-3}
    assert not inv.check(net, x, rtol=1e-12).ok  # float32 round-off fails a float64 tolerance


# -- gradients ---------------------------------------------------------------------------------------


def test_gradients_are_compared_with_plain_autograd_per_tensor() -> None:
    w = torch.randn(8, dtype=F64, requires_grad=True)
    good = inv.invertible(lambda x: x * w.exp(), inverse=lambda y: y * (-w).exp())
    wrong = inv.invertible(lambda x: x.sinh() * w.exp(), inverse=lambda y: (y * (-w).exp()).asinh() * 1.01)
    x = torch.randn(3, 8, dtype=F64)
    assert inv.check(inv.chain(_coupling(), good), x).blocks[1].grad_error < 1e-14  # type: ignore[operator]
    b = inv.check(inv.chain(_coupling(), wrong), x).blocks[1]
    assert b.grad_error is not None and b.grad_error > 1e-3
    assert any(p.startswith("gradient of ") for p in b.problems)


def test_trailing_parameters_and_log_dets_are_checked() -> None:
    torch.manual_seed(0)
    flow = inv.chain(ops.actnorm(4), ops.lu_linear(4), ops.actnorm(4))
    x = torch.randn(16, 4)
    report = inv.check(flow, x)
    assert report.ok, str(report)
    scale = inv.invertible(
        lambda x, s: (x * s.exp(), s.sum().expand(len(x))),
        inverse=lambda y, s: (y * (-s).exp(), -s.sum().expand(len(y))),
        ladj=True,
    )
    s = torch.randn(4, dtype=F64, requires_grad=True)
    report = inv.check(inv.chain(scale, scale), torch.randn(3, 4, dtype=F64), s)
    assert report.ok, str(report)
    assert report.blocks[0].grad_error is not None


def test_pairs_and_ambient_contexts() -> None:
    split = inv.invertible(lambda x: (x[:, :4], x[:, 4:]), inverse=lambda a, b: torch.cat([a, b], 1))
    net = inv.chain(split, inv.couple(mlp(4).double(), mlp(4).double()), split.inverse)
    x = torch.randn(3, 8, dtype=F64)
    with torch.no_grad(), inv.mode("plain"), inv.verify("raise"):
        report = inv.check(net, x)
    assert report.ok, str(report)
    assert [b.name for b in report.blocks][1] == "couple(Sequential, Sequential), block 2 of 3"
    # the split's outputs are views of its input: the coupling keeps them, and nothing
    # before it is rebuilt
    view = "it is a view of another tensor"
    assert report.blocks[1].kept == ((0, view), (1, view))
    assert report.blocks[0].kept == ((0, LEAF),)  # one reason per input
    assert report.blocks[0].drift is None and report.blocks[2].drift == 0.0


# -- determinism -------------------------------------------------------------------------------------


def test_random_draws_that_invfunc_replays_are_deterministic() -> None:
    torch.manual_seed(0)
    dropout = inv.couple(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).double())
    gen = torch.Generator().manual_seed(3)
    noisy = inv.invertible(
        lambda x: x + torch.randn(x.shape, generator=gen, dtype=x.dtype),
        inverse=lambda y: y - torch.randn(y.shape, generator=gen, dtype=y.dtype),
    )
    report = inv.check(inv.chain(dropout, inv.couple(mlp(4).double()), dropout), torch.randn(3, 8, dtype=F64))
    assert report.ok, str(report)
    assert all(b.deterministic for b in report.blocks)
    state = gen.get_state()
    report = inv.check(inv.chain(_coupling(), noisy), torch.randn(3, 8, dtype=F64))
    assert report.blocks[1].deterministic is True
    assert report.blocks[1].forward_error == 0.0
    assert torch.equal(gen.get_state(), state)  # the generator is set back


def test_what_invfunc_does_not_replay_is_not_deterministic() -> None:
    count = itertools.count()

    def counted(x: torch.Tensor) -> torch.Tensor:
        return x + next(count)

    rnd = random.Random(0)

    def jitter(x: torch.Tensor) -> torch.Tensor:
        return x + rnd.random()

    for f in (counted, jitter):
        block = inv.invertible(f, inverse=lambda y: y)
        report = inv.check(inv.chain(_coupling(), block, _coupling()), torch.randn(3, 8, dtype=F64))
        b = report.blocks[1]
        assert b.deterministic is False and b.forward_error is not None and b.forward_error > 1e-3
        assert report.first_failure is b
        assert any(p.startswith("not deterministic") for p in b.problems)
        assert "rerun" in str(report)


# -- state --------------------------------------------------------------------------------------------


def test_batchnorm_is_named_stateful_and_its_statistics_are_left_alone() -> None:
    torch.manual_seed(0)
    f = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).double()
    net = inv.chain(_coupling(), inv.couple(f, mlp(4).double()), _coupling())
    bn = f[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    versions = [t._version for t in bn.buffers()]
    x = torch.randn(16, 8, dtype=F64)
    report = inv.check(net, x)
    assert report.ok, str(report)
    assert report.blocks[1].stateful == ("fn.blocks[1].F.1 (BatchNorm1d)",)
    assert report.blocks[0].stateful == report.blocks[2].stateful == ()
    assert all(torch.equal(v, before[k]) for k, v in bn.state_dict().items())
    assert [t._version for t in bn.buffers()] == versions
    bn.eval()
    assert inv.check(net, x).blocks[1].stateful == ()  # eval mode: its state does not change


def test_a_state_update_the_backward_skips_is_stateful_not_nondeterministic() -> None:
    count = torch.zeros(())

    def counted(x: torch.Tensor) -> torch.Tensor:
        count.add_(1)  # invfunc applies it once: its recompute and inverse skip it
        return x + count

    block = inv.invertible(counted, inverse=lambda y: y - count)
    report = inv.check(inv.chain(_coupling(), block), torch.randn(3, 8, dtype=F64))
    assert report.ok, str(report)
    assert report.blocks[1].stateful == ("fn.blocks[1].count (tensor)",)
    assert report.blocks[1].forward_error == 0.0
    assert count.item() == 0 and count._version == 0


def test_actnorm_initialisation_is_named_and_undone() -> None:
    torch.manual_seed(0)
    norm = ops.actnorm(4)
    module = inv.as_module(norm)
    x = torch.randn(32, 4) * 3 + 1
    report = inv.check(inv.chain(norm, ops.lu_linear(4)), x)
    assert report.ok, str(report)
    assert report.blocks[0].stateful == ("fn.blocks[0] (ActNorm)",)
    state = module.state_dict()
    assert not any(v.any() for k, v in state.items() if k.endswith(("initialized", "bias", "log_scale")))


def test_the_callers_generators_grads_and_inputs_are_untouched() -> None:
    torch.manual_seed(0)
    dropout = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.2)).double()
    net = inv.chain(inv.couple(dropout), _coupling())
    params = [p for b in net.blocks for m in (b.F, b.G) if m is not None for p in m.parameters()]  # type: ignore[attr-defined]
    marker = torch.ones_like(params[0])
    params[0].grad = marker
    x = torch.randn(4, 8, dtype=F64, requires_grad=True)
    h = x * 2  # an intermediate: a real call would free it
    h_before = h.detach().clone()
    rng = torch.get_rng_state()
    assert inv.check(net, h).ok
    assert torch.equal(torch.get_rng_state(), rng)
    assert params[0].grad is marker and all(p.grad is None for p in params[1:])
    assert x.grad is None
    assert h.untyped_storage().nbytes() > 0 and torch.equal(h, h_before)


# -- what blocks hold, what calls keep -----------------------------------------------------------------


def test_a_tensor_captured_by_a_closure_is_named() -> None:
    shift = torch.randn(8, dtype=F64, requires_grad=True)
    block = inv.invertible(lambda x: x + shift, inverse=lambda y: y - shift)
    report = inv.check(inv.chain(_coupling(), block), torch.randn(3, 8, dtype=F64))
    assert report.ok
    assert report.blocks[1].captured == (("fn.blocks[1].shift", (8,)),)
    assert report.blocks[0].captured == ()
    assert "captured: fn.blocks[1].shift (8,)" in str(report)


def test_a_tensor_read_but_not_reachable_is_reported_unnamed() -> None:
    class Holder:  # not callable: walking does not look inside
        w = torch.randn(8, dtype=F64, requires_grad=True)

    block = inv.invertible(lambda x: x * Holder.w.exp(), inverse=lambda y: y * (-Holder.w).exp())
    report = inv.check(block, torch.randn(3, 8, dtype=F64))
    assert report.blocks[0].captured == (("(unnamed)", (8,)),)


def test_a_leaf_input_is_reported_kept_with_the_reason() -> None:
    net = inv.chain(_coupling(), _coupling())
    x = torch.randn(3, 8, dtype=F64, requires_grad=True)
    assert inv.check(net, x).blocks[0].kept == ((0, LEAF),)
    assert inv.check(net, x * 1).blocks[0].kept == ()  # an intermediate is freed
    view = (x * 1)[:, :8]
    assert inv.check(net, view[:2]).blocks[0].kept == ((0, "it is a view of another tensor"),)
    assert all(b.kept == () for b in inv.check(net, x).blocks[1:])


def test_an_inner_input_a_call_keeps_is_reported() -> None:
    # a block whose output is a view of a larger tensor: the next block keeps its input
    wide = inv.invertible(
        lambda x: torch.cat([x, x], 1)[:, :8],
        inverse=lambda y: y.clone(),
    )
    report = inv.check(inv.chain(_coupling(), wide, _coupling()), torch.randn(3, 8, dtype=F64) * 1)
    assert report.blocks[2].kept and "view" in report.blocks[2].kept[0][1]


# -- drift ----------------------------------------------------------------------------------------------


def test_an_ill_conditioned_float32_map_drifts_more_and_is_located() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    blocks = [_coupling(4, torch.float32) for _ in range(3)]
    good = inv.check(inv.chain(blocks[0], _mixing(2.0), blocks[1], blocks[2]), x)
    bad = inv.check(inv.chain(blocks[0], _mixing(1e5), blocks[1], blocks[2]), x)
    assert good.ok, str(good)
    drift_good, drift_bad = good.blocks[1].drift, bad.blocks[1].drift
    assert drift_good is not None and drift_bad is not None
    assert drift_bad > 100 * drift_good and drift_bad > 1e-4
    assert bad.first_failure is not None and bad.first_failure.index == 1
    assert bad.blocks[0].drift is not None and bad.blocks[0].drift > 1e-4  # inherited
    assert bad.blocks[0].ok and bad.blocks[2].ok and bad.blocks[3].ok


def test_drift_that_accumulates_fails_where_it_passes_the_tolerance() -> None:
    scale = 1 + 1e-6
    almost = inv.invertible(lambda x: x * 2, inverse=lambda y: y / 2 * scale)
    net = inv.chain(*[almost] * 6)
    report = inv.check(net, torch.randn(3, 4, dtype=F64), rtol=3.5e-6)
    drifts = [b.drift for b in report.blocks]
    assert drifts == sorted(drifts, reverse=True)  # type: ignore[type-var]
    failing = [b.index for b in report.blocks if any(p.startswith("drift") for p in b.problems)]
    assert failing == [2]  # 4e-6 first passes 3.5e-6 at the third block from the output


# -- errors ------------------------------------------------------------------------------------------------


def test_wrong_arguments_are_errors_naming_the_call() -> None:
    with pytest.raises(TypeError, match=r"^invfunc\.check\(<lambda>, \*args\): fn must be an Invertible"):
        inv.check(lambda x: x, torch.ones(2))  # type: ignore[arg-type]
    block = _coupling()
    with pytest.raises(
        TypeError, match=r"^invfunc\.check\(couple\(Sequential, Sequential\), \*args\): no inputs"
    ):
        inv.check(block)
    with pytest.raises(ValueError, match="rtol= must be a positive number"):
        inv.check(block, torch.ones(2, 8), rtol=0)
    with pytest.raises(TypeError, match="strict= must be True or False"):
        inv.check(block, torch.ones(2, 8), strict="yes")  # type: ignore[arg-type]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_dropout_is_replayed_and_the_generators_are_untouched() -> None:
    torch.manual_seed(0)
    f = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.3))
    f = f.double().cuda()

    def cuda_coupling(F: torch.nn.Module) -> inv.Invertible:
        return inv.couple(F, mlp(4).double().cuda())

    net = inv.chain(
        cuda_coupling(mlp(4).double().cuda()), cuda_coupling(f), cuda_coupling(mlp(4).double().cuda())
    )
    bn = f[1]
    stats = bn.running_mean.clone()
    rng = torch.cuda.get_rng_state()
    report = inv.check(net, torch.randn(16, 8, dtype=F64, device="cuda"))
    assert report.ok, str(report)
    assert report.blocks[1].stateful == ("fn.blocks[1].F.1 (BatchNorm1d)",)
    assert torch.equal(torch.cuda.get_rng_state(), rng)
    assert torch.equal(bn.running_mean, stats)
