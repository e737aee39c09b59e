"""torch.compile around a model that calls invertible_call: a graph break, eager-equal grads."""

from __future__ import annotations

import pytest
import torch

import invfunc as inv
from _util import assert_all_close, mlp


class Model(torch.nn.Module):
    def __init__(self, depth: int = 3, h: int = 8) -> None:
        super().__init__()
        self.pre = torch.nn.Linear(2 * h, 2 * h)
        self.F = torch.nn.ModuleList(mlp(h) for _ in range(depth))
        self.G = torch.nn.ModuleList(mlp(h) for _ in range(depth))
        self.net = inv.chain(*[inv.couple(f, g) for f, g in zip(self.F, self.G)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.pre(x))
        return inv.invertible_call(self.net, h).square().mean()


@pytest.mark.slow
def test_compiled_model_matches_eager_with_one_graph_break() -> None:
    torch.manual_seed(0)
    model = Model()
    x = torch.randn(4, 16)
    params = list(model.parameters())
    want = [model(x), *torch.autograd.grad(model(x), params)]
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with inv.explain() as rep:
        loss = compiled(x)
    got = [loss, *torch.autograd.grad(loss, params)]
    assert_all_close(got, want, rtol=1e-5, atol=1e-6)
    # the chain's inner boundaries are still freed: split -> 3 couplings -> join, as pairs
    assert len(rep.freed) == 4 * 2
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 1  # at invertible_call, which runs eagerly
    torch._dynamo.reset()


@pytest.mark.slow
def test_fullgraph_fails_loudly_and_shape_changes_keep_eager_gradients() -> None:
    # catalogue item 46: the call is a graph break, so fullgraph=True must fail loudly
    # (not compile a graph that skips the frees); with automatic dynamic shapes, batches
    # 4, 6, 4 in a row each give the eager gradients (no recompute from another graph)
    torch.manual_seed(0)
    model = Model()
    params = list(model.parameters())
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"(?i)disable"):
        torch.compile(model, fullgraph=True)(torch.randn(4, 16))
    torch._dynamo.reset()
    compiled = torch.compile(model)
    for batch in (4, 6, 4):
        x = torch.randn(batch, 16)
        with inv.explain() as rep:
            loss = compiled(x)
        got = [loss, *torch.autograd.grad(loss, params)]
        want = [model(x), *torch.autograd.grad(model(x), params)]
        assert_all_close(got, want, rtol=1e-5, atol=1e-6)
        assert len(rep.freed) == 4 * 2
