"""One suite for every op of ``invfunc.ops`` (as zuko tests its transforms): round trip in
float64, the log-det against ``jacrev`` + ``slogdet`` per sample, gradients under every mode
against a plain call, ``gradcheck``, both directions, and random flows composed of ops."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import invfunc as inv
from _util import F64, assert_all_close, freed
from invfunc import ops

MODES = ["invertible", "checkpoint", "plain"]


@dataclass
class Case:
    """An op, and how to make an input in its domain (one tensor, or a pair)."""

    name: str
    make: Callable[[], inv.Invertible]
    shape: tuple[int, ...]
    domain: str = "real"  # "real", "positive", "unit" (0, 1), "open" (-1, 1)
    pair: bool = False

    def inputs(self, seed: int = 0) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        n = 2 if self.pair else 1
        xs = []
        for _ in range(n):
            x = torch.randn(self.shape, generator=g, dtype=torch.float64)
            if self.domain == "positive":
                x = x.exp()
            elif self.domain == "unit":
                x = torch.sigmoid(x)
            elif self.domain == "open":
                x = torch.tanh(x) * 0.9
            xs.append(x)
        return tuple(xs)


def _mlp(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Linear(cin, 8), nn.Tanh(), nn.Linear(8, cout))


def _conv(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, cout, 3, padding=1))


def _actnorm() -> inv.Invertible:
    op = ops.actnorm(3)
    op(torch.randn(16, 3, 2, 2, dtype=torch.float64) * 2 + 1)  # initialise, then test the initialised map
    return op


def _shift_scale() -> inv.Invertible:
    return inv.invertible(
        lambda x, s, t: (x * s.exp() + t, s.flatten(1).sum(1)),
        inverse=lambda y, s, t: ((y - t) * (-s).exp(), -s.flatten(1).sum(1)),
        ladj=True,
    )


CASES = [
    Case("actnorm", _actnorm, (4, 3, 2, 2)),
    Case("conv1x1 (LU)", lambda: ops.conv1x1(3), (4, 3, 2, 2)),
    Case("conv1x1 (direct)", lambda: ops.conv1x1(3, lu=False), (4, 3, 2, 2)),
    Case("lu_linear", lambda: ops.lu_linear(5), (4, 5)),
    Case("lu_linear (channels last)", lambda: ops.lu_linear(5, dim=-1), (4, 2, 5)),
    Case("orthogonal", lambda: ops.orthogonal(4), (4, 4)),
    Case("affine_coupling", lambda: ops.affine_coupling(_mlp(2, 4)), (4, 4)),
    Case(
        "affine_coupling (odd, pair net)",
        lambda: ops.affine_coupling(lambda h: (h[:, :1].repeat(1, 3), h[:, 1:].repeat(1, 3) * 0.5 + 0.1)),
        (4, 5),
    ),
    Case("affine_coupling (conv)", lambda: ops.affine_coupling(_conv(2, 4)), (2, 4, 3, 3)),
    Case("momentum_coupling", lambda: ops.momentum_coupling(_mlp(3, 3), gamma=0.8), (4, 3), pair=True),
    Case(
        "custom_coupling",
        lambda: ops.custom_coupling(lambda h: tuple(_fixed_net(h).chunk(2, 1)), _shift_scale()),
        (4, 4),
    ),
    Case("leaky_relu", lambda: ops.leaky_relu(0.2), (4, 3)),
    Case("sigmoid", ops.sigmoid, (4, 3)),
    Case("logit", ops.logit, (4, 3), domain="unit"),
    Case("tanh", ops.tanh, (4, 3)),
    Case("exp", ops.exp, (4, 3)),
    Case("log", ops.log, (4, 3), domain="positive"),
    Case("softplus", ops.softplus, (4, 3)),
    Case("reverse", lambda: ops.reverse(), (4, 5)),
    Case("permutation", lambda: ops.permutation(5, generator=torch.Generator().manual_seed(3)), (4, 5)),
    Case("shuffle", lambda: ops.shuffle(2), (4, 6, 2)),
    Case("squeeze", lambda: ops.squeeze(2), (2, 3, 4, 4)),
    Case("unsqueeze", lambda: ops.unsqueeze(2), (2, 12, 2, 2)),
    Case("checkerboard", lambda: ops.checkerboard(), (2, 2, 3, 4)),
]

_FIXED = nn.Linear(2, 4).double()


def _fixed_net(h: torch.Tensor) -> torch.Tensor:
    return _FIXED(h)


def built(case: Case) -> inv.Invertible:
    torch.manual_seed(0)
    with torch.random.fork_rng():
        torch.set_default_dtype(torch.float64)
        try:
            return case.make()
        finally:
            torch.set_default_dtype(torch.float32)


def as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def data_and_ladj(op: inv.Invertible, out: Any) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    outs = as_tuple(out)
    return (outs[:-1], outs[-1]) if op._ladj is True else (outs, None)


IDS = [c.name for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_round_trip_both_directions(case: Case) -> None:
    op = built(case)
    xs = case.inputs()
    ys, ladj = data_and_ladj(op, op(*xs))
    back, ladj_inv = data_and_ladj(op.inverse, op.inverse(*ys))
    assert_all_close(back, xs, **F64)
    if ladj is not None:
        assert ladj.shape == (case.shape[0],) and ladj_inv is not None
        torch.testing.assert_close(ladj + ladj_inv, torch.zeros_like(ladj), **F64)
    again, _ = data_and_ladj(op, op(*back))
    assert_all_close(again, ys, **F64)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_log_det_equals_slogdet_of_the_jacobian(case: Case) -> None:
    op = built(case)
    xs = case.inputs()
    _, ladj = data_and_ladj(op, op(*xs))
    for i in range(case.shape[0]):
        sample = [x[i : i + 1] for x in xs]
        sizes = [s.numel() for s in sample]

        def flat(
            v: torch.Tensor, sample: list[torch.Tensor] = sample, sizes: list[int] = sizes
        ) -> torch.Tensor:
            parts = [p.view_as(s) for p, s in zip(v.split(sizes), sample)]
            ys, _ = data_and_ladj(op, op(*parts))
            return torch.cat([y.flatten() for y in ys])

        jac = torch.func.jacrev(flat)(torch.cat([s.flatten() for s in sample]))
        want = torch.linalg.slogdet(jac)[1]
        got = ladj[i] if ladj is not None else torch.zeros((), dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def loss_of(out: Any, op: inv.Invertible) -> torch.Tensor:
    ys, ladj = data_and_ladj(op, out)
    total = sum(((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sin()).sum() for y in ys)
    return total - (ladj.square().sum() if ladj is not None else 0)  # type: ignore[return-value]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_equal_a_plain_call_in_both_directions(case: Case, mode: str) -> None:
    op = built(case)
    params = [p for p in inv.as_module(op).parameters()]
    for fn, xs in ((op, case.inputs()), (op.inverse, tuple(data_and_ladj(op, op(*case.inputs()))[0]))):
        xs = tuple(x.detach().requires_grad_() for x in xs)
        wrt = [*xs, *params]
        want = torch.autograd.grad(loss_of(fn(*(x * 1.0 for x in xs)), fn), wrt, allow_unused=True)
        hs = tuple(x * 1.0 for x in xs)  # intermediates: freed in invertible mode
        out = inv.invertible_call(fn, *hs, mode=mode)
        assert all(freed(h) for h in hs) == (mode == "invertible")
        got = torch.autograd.grad(loss_of(out, fn), wrt, allow_unused=True)
        assert_all_close(_dense(got, wrt), _dense(want, wrt), **F64)


def _dense(grads: Any, wrt: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients with zeros for the tensors that got none (an op that ignores its input)."""
    return [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, wrt)]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradcheck(case: Case) -> None:
    op = built(case)
    xs = tuple(x.requires_grad_() for x in case.inputs())

    def f(*a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return as_tuple(inv.invertible_call(op, *(t * 1.0 for t in a)))

    assert torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-6)


FLOW_OPS = ["actnorm", "conv1x1", "affine", "leaky_relu", "reverse", "permutation", "orthogonal", "couple"]


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(kinds=st.lists(st.sampled_from(FLOW_OPS), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_random_flows_of_ops(kinds: list[str], seed: int) -> None:
    """A chain of ops drawn at random: the round trip, the summed log-det against slogdet,
    and gradients through the output and the log-det equal a plain call's."""
    torch.manual_seed(seed)
    c = 4
    blocks: list[inv.Invertible] = []
    with torch.random.fork_rng():
        torch.set_default_dtype(torch.float64)
        try:
            for k in kinds:
                blocks.append(
                    {
                        "actnorm": lambda: ops.actnorm(c),
                        "conv1x1": lambda: ops.conv1x1(c),
                        "affine": lambda: ops.affine_coupling(_mlp(2, 4)),
                        "leaky_relu": lambda: ops.leaky_relu(0.5),
                        "reverse": lambda: ops.reverse(),
                        "permutation": lambda: ops.permutation(c),
                        "orthogonal": lambda: ops.orthogonal(c),
                        "couple": lambda: inv.couple(_mlp(2, 2), _mlp(2, 2)),
                    }[k]()
                )
        finally:
            torch.set_default_dtype(torch.float32)
    flow = inv.chain(*blocks)
    x = torch.randn(6, c, dtype=torch.float64)
    out = flow(x)  # (initialises any actnorm)
    ys, ladj = data_and_ladj(flow, out)
    back, _ = data_and_ladj(flow.inverse, flow.inverse(*ys))
    torch.testing.assert_close(back[0], x, **F64)
    if ladj is not None:
        jac = torch.func.jacrev(lambda v: data_and_ladj(flow, flow(v[None]))[0][0][0])(x[0])
        torch.testing.assert_close(ladj[0], torch.linalg.slogdet(jac)[1], rtol=1e-9, atol=1e-9)
    params = list(inv.as_module(flow).parameters())
    xx = x.clone().requires_grad_()
    wrt = [xx, *params]
    want = torch.autograd.grad(loss_of(flow(xx * 1.0), flow), wrt, allow_unused=True)
    got = torch.autograd.grad(loss_of(inv.invertible_call(flow, xx * 1.0), flow), wrt, allow_unused=True)
    for g, w, t in zip(got, want, wrt):
        torch.testing.assert_close(
            g if g is not None else torch.zeros_like(t), w if w is not None else torch.zeros_like(t), **F64
        )


def test_ops_own_their_parameters_and_buffers() -> None:
    """as_module reaches every op's parameters; fixed tensors are buffers; deepcopy and
    state_dict work; parameters are created in the default dtype."""
    import copy

    flow = inv.chain(ops.actnorm(4), ops.conv1x1(4), ops.permutation(4), ops.affine_coupling(_mlp(2, 4)))
    model = inv.as_module(flow)
    names = [n for n, _ in model.named_parameters()]
    assert any("log_scale" in n for n in names) and any("log_s" in n for n in names)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    assert all(not b.requires_grad for b in model.buffers()) and len(list(model.buffers())) >= 3
    twin = copy.deepcopy(model)
    x = torch.randn(8, 4)
    z, _ = twin(x)
    assert bool(twin.fn.blocks[0]._fn.__self__.initialized) and not bool(
        model.fn.blocks[0]._fn.__self__.initialized
    )
    model.load_state_dict(twin.state_dict())
    torch.testing.assert_close(model(x)[0], z)


def test_actnorm_initialises_inside_the_memory_efficient_call() -> None:
    op = ops.actnorm(3)
    x = torch.randn(32, 3, 4, 4, dtype=torch.float64) * 4 - 2
    op._fn.__self__.double()  # type: ignore[attr-defined]
    h = x.clone().requires_grad_()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divergence warning from the one-time initialisation
        y, ladj = inv.invertible_call(op, h * 1.0)
        (y.square().sum() - ladj.sum()).backward()
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(y.std((0, 2, 3)), torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_op_errors_are_clear() -> None:
    with pytest.raises(inv.InvfuncError, match=r"actnorm\(2\): channel\(s\) \[1\] have zero variance"):
        ops.actnorm(2)(torch.stack([torch.randn(8), torch.ones(8)], 1))
    with pytest.raises(inv.InvfuncError, match=r"actnorm\(2\): its inverse was called before"):
        ops.actnorm(2).inverse(torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"conv1x1\(3\): expected 3 features along dim 1"):
        ops.conv1x1(3)(torch.randn(2, 4, 2, 2))
    with pytest.raises(
        ValueError, match=r"affine_coupling\(Linear\): net returned a tensor of shape \(3, 2\)"
    ):
        ops.affine_coupling(nn.Linear(2, 2))(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"momentum_coupling: gamma must be in \(0, 1\]"):
        ops.momentum_coupling(nn.Linear(2, 2), gamma=0.0)
    with pytest.raises(ValueError, match=r"num_features must be a positive int"):
        ops.lu_linear(0)
    with pytest.raises(TypeError, match=r"custom_coupling: the log-det of <lambda> is unknown"):
        ops.custom_coupling(nn.Linear(2, 2), inv.invertible(lambda x, s: x + s, inverse=lambda y, s: y - s))


def test_a_glow_like_chain_holds_the_same_bytes_at_any_depth() -> None:
    """Every boundary of a chain of ops is freed (conv1x1's output included): the bytes the
    graph holds do not grow with depth."""
    from _util import saved_bytes

    held = []
    for depth in (2, 6):
        torch.manual_seed(0)
        steps = [
            op
            for _ in range(depth)
            for op in (ops.actnorm(4), ops.conv1x1(4), ops.affine_coupling(_conv(2, 4).float()))
        ]
        flow = inv.chain(*steps)
        x = torch.randn(8, 4, 8, 8, requires_grad=True)
        flow(x.detach())  # initialise the ActNorms
        z, ladj = inv.invertible_call(flow, x * 1.0)
        held.append(saved_bytes(0.5 * z.square().sum() - ladj.sum()))
    assert held[0] == held[1]


class _Counted(nn.Module):
    """A subnet that counts its calls (and may drop out: replayed in backward)."""

    def __init__(self, net: nn.Module, p: float = 0.0) -> None:
        super().__init__()
        self.net, self.drop, self.calls = net, nn.Dropout(p), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.drop(self.net(x))  # type: ignore[no-any-return]


@pytest.mark.parametrize("how", ["backward", "autograd.grad", "double backward", "torch.func.grad", "kept"])
def test_the_affine_coupling_backward_runs_net_once(how: str) -> None:
    """NOTE [The affine coupling's backward]: net runs once in the forward and once in the
    backward (a generic block would run it twice there), the input is freed and rebuilt,
    dropout in net replays, and the gradients of the input, of every parameter and of the
    log-det equal plain autograd's in every way of asking for them."""
    torch.manual_seed(0)
    net = _Counted(_conv(2, 4).double(), p=0.3)
    op = inv.chain(ops.actnorm(4), ops.affine_coupling(net))
    inv.as_module(op).double()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    op(x.detach())  # initialise the ActNorm
    params = list(inv.as_module(op).parameters())
    wrt = [x, *params]

    def loss(out: Any) -> torch.Tensor:
        z, ladj = out
        return (z.sin() * z).sum() - (ladj * ladj.cos()).sum()

    def run(call: bool) -> list[torch.Tensor]:
        torch.manual_seed(7)  # the same dropout masks in both runs
        h = x if how == "kept" else x * 1.0
        if how == "torch.func.grad":  # (the input's gradient: parameters swapped by functional_call
            # around the call are refused by the backward, see the sharp bits)

            def f(v: torch.Tensor) -> torch.Tensor:
                return loss(inv.invertible_call(op, v * 1.0) if call else op(v * 1.0))

            return [torch.func.grad(f)(x.detach())]
        out = inv.invertible_call(op, h) if call else op(h)
        if call and how != "kept":
            assert freed(h)
        if how == "double backward":
            (gx,) = torch.autograd.grad(loss(out), x, create_graph=True)
            return list(torch.autograd.grad(gx.square().sum(), wrt))
        if how == "autograd.grad":
            return list(torch.autograd.grad(loss(out), wrt))
        for t in wrt:
            t.grad = None
        net.calls = 0
        loss(out).backward()
        assert net.calls == (1 if call else 0)  # the backward's one evaluation of net
        return [t.grad.clone() for t in wrt]  # type: ignore[union-attr]

    want = run(False)
    got = run(True)
    assert len(got) == len(want) and all(g.abs().sum() > 0 for g in want)
    assert_all_close(got, want, **F64)


def test_free_batch_through_a_leading_parameterless_op() -> None:
    """NOTE [A batch freed through parameterless blocks]: squeeze first reads nothing that
    requires grad; the batch named in free= is still freed and rebuilt, and every
    parameter's gradient equals plain autograd's."""
    torch.manual_seed(0)
    flow = inv.chain(ops.squeeze(2), ops.permutation(4), ops.actnorm(4), ops.affine_coupling(_conv(2, 4)))
    inv.as_module(flow).double()
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    flow(x)  # initialise the ActNorm
    params = list(inv.as_module(flow).parameters())
    want = torch.autograd.grad(loss_of(flow(x), flow), params)
    batch = x.clone()
    out = inv.invertible_call(flow, batch, free=[batch])
    assert freed(batch)
    got = torch.autograd.grad(loss_of(out, flow), params)
    assert_all_close(got, want, **F64)
    torch.testing.assert_close(batch, x, **F64)  # refilled with the reconstruction


def test_a_merged_leading_block_still_detects_a_train_eval_switch() -> None:
    """The block that a leading squeeze joins (to free the batch) keeps its modules'
    train/eval check: dropout switched off between forward and backward is refused."""
    torch.manual_seed(0)
    F = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).double()
    flow = inv.chain(ops.reverse(), inv.couple(F))
    batch = torch.randn(4, 4, dtype=torch.float64)
    y = inv.invertible_call(flow, batch, free=[batch])
    assert freed(batch)
    F.eval()
    with pytest.raises(inv.InvfuncError, match=r"switched between train and eval mode"):
        y.sum().backward()
