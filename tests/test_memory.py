"""Memory is flat in depth: deterministic counts of the bytes autograd keeps alive."""

from __future__ import annotations

import pytest
import torch

import invfunc as inv
from _util import revnet, saved_bytes

B, H = 16, 8
X_BYTES = B * 2 * H * 8  # one activation of the stream, float64


def _forward(spelling: str, depth: int) -> torch.Tensor:
    net, _ = revnet(depth, H)
    x = torch.randn(B, 2 * H, dtype=torch.float64, requires_grad=True)
    h = x * 1
    if spelling == "plain":
        return net(h)
    if spelling == "one call":
        return inv.invertible_call(net, h)
    for b in net.blocks:
        h = inv.invertible_call(b, h)
    return h


@pytest.mark.parametrize("spelling", ["one call", "call per block"])
def test_saved_activation_bytes_do_not_grow_with_depth(spelling: str) -> None:
    shallow = saved_bytes(_forward(spelling, 8))
    deep = saved_bytes(_forward(spelling, 64))
    assert deep == shallow
    assert shallow <= X_BYTES + 64  # only the last output stays (the one the user holds)


def test_invertible_saves_far_less_than_plain() -> None:
    ours = saved_bytes(_forward("one call", 16))
    plain = saved_bytes(_forward("plain", 16))
    assert ours <= X_BYTES + 64
    assert plain > 16 * X_BYTES  # plain keeps every block's activations


def test_freed_inputs_report_zero_bytes_and_explain_counts_them() -> None:
    net, _ = revnet(4, H)
    x = torch.randn(B, 2 * H, dtype=torch.float64, requires_grad=True)
    with inv.explain() as rep:
        y = inv.invertible_call(net, x * 1)
    # the caller's input, then 5 inner boundaries as pairs of halves (split -> 4 couplings -> join)
    assert [i for _, i, _ in rep.freed] == [0, 1] * 5 + [0]
    assert sum(n for _, _, n in rep.freed) == 6 * X_BYTES
    y.sum().backward()


def test_backward_holds_one_boundary_at_a_time() -> None:
    """During backward, rebuilt boundaries are released as soon as the block before is done."""
    depth = 12
    net, _ = revnet(depth, H)
    x = torch.randn(B, 2 * H, dtype=torch.float64, requires_grad=True)
    y = inv.invertible_call(net, x * 1)
    peak = [0]
    nodes = []
    node = y.grad_fn
    while node is not None and hasattr(node, "state"):
        nodes.append(node)
        node = node.next_functions[0][0]

    def measure(*_: object) -> None:
        live = 0
        for n in nodes:
            try:
                live += sum(t.untyped_storage().nbytes() for t in n.saved_tensors if not t.is_leaf)
            except RuntimeError:  # released after its backward
                pass
        peak[0] = max(peak[0], live)

    for n in nodes:
        n.register_prehook(measure)
    y.square().sum().backward()
    assert peak[0] <= 2 * X_BYTES  # the block's output and the one being rebuilt, never more
