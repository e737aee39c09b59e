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
