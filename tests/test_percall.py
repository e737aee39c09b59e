"""Per-call arguments: a coupling declared with ``n_inputs=`` passes the arguments after its
data to F and G (a graph's ``edge_index``, a mask), and a chain hands its trailing
arguments to every block that takes them (NOTE [Per-call arguments], NOTE [Trailing
arguments of a chain])."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

import invfunc as inv
from _util import F64, assert_all_close, freed, saved_bytes

MODES = ["invertible", "checkpoint", "plain"]


class Conv(torch.nn.Module):
    """A message-passing layer: each node sums its in-neighbours' transformed features,
    weighted per edge, ``out[dst] += w_e * lin(h)[src]``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(width, width)

    def forward(
        self, h: torch.Tensor, edge_index: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        src, dst = edge_index
        msg = self.lin(h)[src]
        if weight is not None:
            msg = msg * weight[:, None]
        return torch.tanh(torch.zeros_like(h).index_add(0, dst, msg))


def graph(n: int = 7, e: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (2, e), generator=g)


def gnn(depth: int, width: int = 3, *, n_inputs: int = 1) -> tuple[inv.Invertible, list[torch.Tensor]]:
    torch.manual_seed(0)
    blocks = [
        inv.couple(Conv(width).double(), Conv(width).double(), dim=-1, n_inputs=n_inputs)
        for _ in range(depth)
    ]
    params = [p for b in blocks for m in (b.F, b.G) for p in m.parameters()]  # type: ignore[attr-defined]
    return inv.chain(*blocks), params


def grads(
    fn: Callable[..., Any], inputs: Sequence[torch.Tensor], wrt: Sequence[torch.Tensor], *, use_grad: bool
) -> list[torch.Tensor]:
    """Gradients of a loss of ``fn(*inputs)`` (one tensor or a pair) for ``wrt``."""
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.square() * torch.arange(o.numel(), dtype=o.dtype).view_as(o).cos()).sum() for o in outs)
    if use_grad:
        return list(torch.autograd.grad(loss, wrt))
    for t in wrt:
        t.grad = None
    loss.backward()  # type: ignore[union-attr]
    got = [t.grad.clone() for t in wrt]  # type: ignore[union-attr]
    for t in wrt:
        t.grad = None
    return got


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("use_grad", [False, True], ids=["backward", "autograd.grad"])
@pytest.mark.parametrize("n_inputs", [1, 2])
def test_graph_chain_matches_plain_autograd(mode: str, use_grad: bool, n_inputs: int) -> None:
    """One chain built once, the graph and a learnable edge weight passed per call: the
    gradients of the input, every parameter and the edge weight equal plain autograd's."""
    net, params = gnn(4, n_inputs=n_inputs)
    edge_index = graph()
    weight = torch.rand(edge_index.size(1), dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    rest = (edge_index, weight)

    def data() -> tuple[torch.Tensor, ...]:
        h = x * 1.5  # an intermediate: freed in invertible mode
        return (h,) if n_inputs == 1 else (h[:, :3].clone(), h[:, 3:].clone())

    want = grads(lambda *d: net(*d, *rest), data(), [x, weight, *params], use_grad=use_grad)
    got = grads(
        lambda *d: inv.invertible_call(net, *d, *rest, mode=mode),
        data(),
        [x, weight, *params],
        use_grad=use_grad,
    )
    assert_all_close(got, want, **F64)


def test_graph_inputs_are_freed_and_the_graph_kept() -> None:
    net, _ = gnn(3)
    edge_index = graph()
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    h = x * 2
    y = inv.invertible_call(net, h, edge_index)
    assert freed(h)
    assert not freed(edge_index)
    y.sum().backward()
    torch.testing.assert_close(h, x * 2, **F64)  # rebuilt


@pytest.mark.parametrize("mode", MODES)
def test_inverse_direction_takes_the_same_arguments(mode: str) -> None:
    """The inverse (sampling) direction passes the per-call arguments too, memory-efficiently."""
    net, params = gnn(3)
    edge_index = graph()
    weight = torch.rand(edge_index.size(1), dtype=torch.float64, requires_grad=True)
    z = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    back = net.inverse(net(z, edge_index, weight), edge_index, weight)
    torch.testing.assert_close(back, z, **F64)
    wrt = [z, weight, *params]
    want = grads(lambda d: net.inverse(d, edge_index, weight), [z * 1.5], wrt, use_grad=True)
    got = grads(
        lambda d: inv.invertible_call(net.inverse, d, edge_index, weight, mode=mode),
        [z * 1.5],
        wrt,
        use_grad=True,
    )
    assert_all_close(got, want, **F64)


def test_one_call_per_block_and_double_backward() -> None:
    net, params = gnn(2)
    edge_index = graph()
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)

    def per_block(h: torch.Tensor) -> torch.Tensor:
        for b in net.blocks:  # type: ignore[attr-defined]
            h = inv.invertible_call(b, h, edge_index)
        return h

    def second(run: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        (g,) = torch.autograd.grad(run(x * 1).square().sum(), x, create_graph=True)
        return list(torch.autograd.grad(g.sin().sum(), [x, *params]))

    want = second(lambda h: net(h, edge_index))
    assert_all_close(second(per_block), want, **F64)


def test_torch_func_grad_through_per_call_arguments() -> None:
    net, _ = gnn(2)
    edge_index = graph()
    weight = torch.rand(edge_index.size(1), dtype=torch.float64)
    x = torch.randn(7, 6, dtype=torch.float64)

    def loss(h: torch.Tensor, w: torch.Tensor, call: bool) -> torch.Tensor:
        y = inv.invertible_call(net, h * 1, edge_index, w) if call else net(h * 1, edge_index, w)
        return y.square().sum()

    want = torch.func.grad(loss, argnums=(0, 1))(x, weight, False)
    got = torch.func.grad(loss, argnums=(0, 1))(x, weight, True)
    assert_all_close(list(got), list(want), **F64)


def test_non_tensor_arguments_and_a_mask() -> None:
    """Per-call arguments may be anything: a bool mask, an int, None."""
    lin = torch.nn.Linear(4, 4).double()

    def F(h: torch.Tensor, mask: torch.Tensor, k: int, extra: None) -> torch.Tensor:
        assert extra is None
        return lin(h).masked_fill(~mask, 0.0) * k

    block = inv.couple(F, F, dim=-1, n_inputs=1)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 5, 1) > 0.3
    rest = (mask, 3, None)
    want = grads(lambda d: block(d, *rest), [x * 1], [x, *lin.parameters()], use_grad=False)
    got = grads(
        lambda d: inv.invertible_call(block, d, *rest), [x * 1], [x, *lin.parameters()], use_grad=False
    )
    assert_all_close(got, want, **F64)
    torch.testing.assert_close(block.inverse(block(x, *rest), *rest), x, **F64)


def test_chain_gives_trailing_arguments_only_to_blocks_that_take_them() -> None:
    """Blocks whose signature takes no parameters get none; every coupling declared with
    n_inputs gets them; a block with a fixed signature of one parameter gets them too."""
    lin = torch.nn.Linear(3, 3).double()
    seen: list[int] = []

    def F(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        seen.append(1)
        return lin(h) * s

    scale = inv.invertible(lambda x, s: x * s.exp(), inverse=lambda y, s: y * (-s).exp())
    neg = inv.invertible(lambda x: -x, inverse=lambda y: -y)
    plain = inv.couple(lin, lin)  # no n_inputs: takes no per-call arguments
    net = inv.chain(neg, inv.couple(F, F, n_inputs=1), plain, scale, inv.couple(F, None, n_inputs=1), neg)
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    y = net(x, s)
    assert len(seen) == 3
    want = grads(lambda d: net(d, s), [x * 1], [x, s, *lin.parameters()], use_grad=True)
    got = grads(lambda d: inv.invertible_call(net, d, s), [x * 1], [x, s, *lin.parameters()], use_grad=True)
    assert_all_close(got, want, **F64)
    torch.testing.assert_close(net.inverse(y, s), x, **F64)
    torch.testing.assert_close(inv.invertible_call(net.inverse, y, s), x, **F64)


def test_chain_refuses_blocks_that_take_other_counts() -> None:
    one = inv.invertible(lambda x, s: x * s, inverse=lambda y, s: y / s)
    two = inv.invertible(lambda x, s, t: x * s + t, inverse=lambda y, s, t: (y - t) / s)
    net = inv.chain(one, two)
    x, s = torch.randn(3), torch.tensor(2.0)
    with pytest.raises(
        TypeError,
        match=r"chain\(<lambda>, <lambda>\): its block <lambda> takes 2 argument.*functools\.partial",
    ):
        net(x, s)
    with pytest.raises(TypeError, match=r"takes 2 argument"):
        inv.invertible_call(net, x.requires_grad_(), s)


@pytest.mark.parametrize(
    ("second", "why"),
    [
        (torch.zeros(2, 5, dtype=torch.long), "dtype is torch.int64, not floating point"),
        (torch.zeros(4, 3, dtype=torch.float32), "dtype is torch.float32, the first's torch.float64"),
        (torch.zeros(5, dtype=torch.float64), "1 dimension"),
        (torch.zeros(3, 3, dtype=torch.float64), "batch size is 3, the first's 4"),
        (7, "it is a int, not a tensor"),
    ],
    ids=["edge_index", "dtype", "ndim", "batch", "int"],
)
def test_undeclared_second_argument_that_cannot_be_a_half(second: Any, why: str) -> None:
    """Without n_inputs, a second argument that cannot be a half is a clear error naming
    couple, both readings and n_inputs, before F runs on the wrong argument."""
    calls: list[int] = []

    def F(h: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return h

    block = inv.couple(F, F)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    for run in (block, functools.partial(inv.invertible_call, block), block.inverse):
        with pytest.raises(TypeError, match=r"couple\(F, F\): called with 2 arguments") as e:
            run(x * 1, second)
        assert why in str(e.value)
        assert "Read as a pair" in str(e.value) and "n_inputs=1" in str(e.value)
    assert not calls


def test_declared_count_errors() -> None:
    block = inv.couple(torch.nn.Linear(2, 2), n_inputs=2)
    with pytest.raises(TypeError, match=r"declared with n_inputs=2 .* called with 1 argument"):
        block(torch.randn(3, 4))
    for bad in (0, 3, True, "1"):
        with pytest.raises(ValueError, match=r"n_inputs must be 1 .* or 2"):
            inv.couple(torch.nn.Linear(2, 2), n_inputs=bad)  # type: ignore[arg-type]


def test_partial_and_closure_names() -> None:
    """explain() and errors name a functools.partial by the function it wraps, and a
    closure by its own name."""

    def message(h: torch.Tensor, edge_index: torch.Tensor, scale: float) -> torch.Tensor:
        return Conv(3).double()(h, edge_index) * scale

    block = inv.couple(
        functools.partial(message, scale=0.5), functools.partial(message, scale=0.5), dim=-1, n_inputs=1
    )
    assert block._name == "couple(message, message)"
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    with inv.explain() as report:
        inv.invertible_call(block, x * 1, graph())
    assert [call for call, _, _ in report.freed] == ["couple(message, message)"]
    bad = inv.couple(functools.partial(message, scale=0.5), lambda h, e: h[:, :1], dim=-1, n_inputs=1)
    with pytest.raises(ValueError, match=r"couple\(message, <lambda>\): G returned a tensor of shape \(7, 1"):
        inv.invertible_call(bad, x * 1, graph())


def test_saved_bytes_do_not_grow_with_depth() -> None:
    """The per-call arguments are saved once per block that reads them (the same storage),
    and the activations not at all: what the graph holds does not grow with depth."""

    edge_index = graph(n=50, e=200)
    held = []
    for depth in (2, 8):
        net, _ = gnn(depth, width=16)
        x = torch.randn(50, 32, dtype=torch.float64, requires_grad=True)
        y = inv.invertible_call(net, x * 1, edge_index)
        held.append(saved_bytes(y))
    assert held[0] == held[1]
