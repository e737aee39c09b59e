"""Memory is flat in depth: deterministic counts of the bytes autograd keeps alive."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

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
    if torch.__version__.startswith("2.4."):  # the test's walk finds 1.5 KiB of plain's saves there
        pytest.skip("saved_bytes does not see all that plain autograd saves on torch 2.4")
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


_MARK = 12345  # bytes of a marker allocation: the allocator's total is read at each one


def _allocated_at_marks(steps: Callable[[], None], n: int) -> list[int]:
    """CPU allocator's total bytes at a marker before and after each of ``n`` runs of
    ``steps`` (the profiler counts what is allocated while it runs)."""
    from torch.profiler import ProfilerActivity, profile

    def mark() -> None:
        torch.empty(_MARK, dtype=torch.uint8)  # made and freed at once

    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            mark()
            for _ in range(n):
                steps()
                mark()
    finally:
        gc.enable()
    events: list[tuple[int, int, int]] = []

    def walk(node: Any) -> None:
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.alloc_size == _MARK:
            events.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    return [total - _MARK for _, _, total in sorted(events)]


@pytest.mark.parametrize("spelling", ["one call", "call per block"])
@pytest.mark.parametrize("ending", ["backward", "retain_graph twice", "dropped without backward"])
def test_memory_returns_to_baseline_over_three_steps(spelling: str, ending: str) -> None:
    # catalogue items 29, 30, 61: with the garbage collector off, every byte allocated in a
    # step is freed by its end, whether the backward ran, ran twice, or never ran
    from invfunc._state import BlockState
    from invfunc._storage import _GUARDS

    net, _ = revnet(4, H)
    x = torch.randn(B, 2 * H, dtype=torch.float64, requires_grad=True)
    leaked: list[torch.Tensor] = []

    def step(leak: bool = False) -> None:
        h = torch.tanh(x * 2)
        if spelling == "one call":
            y = inv.invertible_call(net, h)
        else:
            y = h
            for b in net.blocks:
                y = inv.invertible_call(b, y)
        loss = y.square().sum()
        if ending == "backward":
            loss.backward()
        elif ending == "retain_graph twice":
            loss.backward(retain_graph=True)
            loss.backward()
        if leak:
            leaked.append(y)
        del y, h, loss

    def states() -> int:
        return sum(type(o) is BlockState for o in gc.get_objects())

    step()  # warm-up: parameter gradients exist from here on
    before, guards = states(), len(_GUARDS)
    totals = _allocated_at_marks(step, 3)
    assert totals == [totals[0]] * 4, totals  # back to the first mark's total after every step
    assert states() == before and len(_GUARDS) == guards
    # the check can fail: a step that keeps its output alive leaves bytes behind
    leaky = _allocated_at_marks(lambda: step(leak=True), 2)
    assert leaky[0] < leaky[1] < leaky[2], leaky


def _peak_of_step(mode: str, depth: int) -> int:
    """Most bytes the CPU allocator held during one training step, over what it held
    before (the profiler's running total at each allocation)."""
    from torch.profiler import ProfilerActivity, profile

    net, _ = revnet(depth, 16)
    x = torch.randn(32, 32, dtype=torch.float64, requires_grad=True)

    def step() -> None:
        y = inv.invertible_call(net, torch.tanh(x * 2), mode=mode)
        y.square().sum().backward()

    step()  # warm-up: gradients allocated
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.empty(_MARK, dtype=torch.uint8)
        step()
    totals: list[tuple[int, int, int]] = []

    def walk(node: Any) -> None:
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation":
            totals.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    totals.sort()
    base = next(total - size for _, size, total in totals if size == _MARK)
    return max(total for _, _, total in totals) - base


def test_peak_of_a_step_orders_plain_checkpoint_invertible_and_stays_flat() -> None:
    # catalogue item 60: plain > checkpoint > invertible at depth 16, and the invertible
    # peak does not grow from depth 8 to 16 (one block's recompute and the boundaries)
    peaks = {(m, d): _peak_of_step(m, d) for m in ("plain", "checkpoint", "invertible") for d in (8, 16)}
    assert peaks["plain", 16] > peaks["checkpoint", 16] > peaks["invertible", 16], peaks
    assert peaks["invertible", 16] == peaks["invertible", 8], peaks
    assert peaks["checkpoint", 16] > peaks["checkpoint", 8], peaks
