"""Which inputs are freed, and that freeing never corrupts, crashes or leaks."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest
import torch

import invfunc as inv
from _util import F64, assert_all_close, freed, mlp, revnet


def _block() -> inv.Invertible:
    torch.manual_seed(0)
    return inv.couple(mlp(3).double(), mlp(3).double())


def test_intermediate_is_freed_and_rebuilt_in_place() -> None:
    block = _block()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    h = x * 2
    before = h.detach().clone()
    version = h._version
    y = inv.invertible_call(block, h)
    assert freed(h)
    y.sum().backward()
    assert not freed(h)
    assert h._version == version
    torch.testing.assert_close(h.detach(), before, **F64)


def test_leaf_input_is_never_freed_and_stays_bit_identical() -> None:
    block = _block()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    before = x.detach().clone()
    y = inv.invertible_call(block, x)
    assert not freed(x)
    y.sum().backward()
    assert torch.equal(x.detach(), before)


def test_keep_by_position_and_by_tensor() -> None:
    block = _block()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    h = x * 2
    inv.invertible_call(block, h, keep=(0,))
    assert not freed(h)
    inv.invertible_call(block, h, keep=[h])
    assert not freed(h)


@pytest.mark.parametrize("requires_grad", [True, False], ids=["leaf requiring grad", "data leaf"])
@pytest.mark.parametrize("depth", [1, 3], ids=["one coupling", "chain"])
def test_leaf_named_in_free_is_freed_and_gradients_are_plain(requires_grad: bool, depth: int) -> None:
    net, params = revnet(depth, 3)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=requires_grad)
    before = x.detach().clone()
    with inv.explain() as report:
        y = inv.invertible_call(net, x, free=[x])
    assert freed(x)
    assert report.freed
    loss = y.square().mean()
    wrt = [x, *params] if requires_grad else params
    got = torch.autograd.grad(loss, wrt)
    assert not freed(x)
    torch.testing.assert_close(x.detach(), before, rtol=1e-12, atol=1e-12)  # reconstruction
    x_ref = before.clone().requires_grad_(requires_grad)
    want = torch.autograd.grad(net(x_ref).square().mean(), [x_ref, *params] if requires_grad else params)
    assert_all_close(got, want, **F64)


def test_leaf_named_in_free_is_rebuilt_when_read() -> None:
    block = _block()
    x = torch.randn(4, 6, dtype=torch.float64)
    before = x.clone()
    y = inv.invertible_call(block, x, free=0)
    assert freed(x)
    torch.testing.assert_close(x * 1, before, **F64)  # any read rebuilds it
    assert not freed(x)
    y.sum().backward()
    torch.testing.assert_close(x, before, **F64)


def test_free_refuses_parameters_keep_conflicts_and_non_data_arguments() -> None:
    block = _block()
    scale = inv.invertible(lambda t, s: t * s, inverse=lambda t, s: t / s)
    x = torch.randn(4, 6, dtype=torch.float64)
    p = torch.nn.Parameter(x.clone())
    with pytest.raises(ValueError, match=r"free=\.\.\.\): input 0 is an nn.Parameter; parameters are never"):
        inv.invertible_call(block, p, free=[p])
    with pytest.raises(ValueError, match=r"input 0 is named in both keep= and free="):
        inv.invertible_call(block, x, keep=[0], free=[x])
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"argument 1 is not a data input of the call"):
        inv.invertible_call(scale, x, s, free=[1])
    with pytest.raises(ValueError, match=r"a tensor that is not a data input of the call"):
        inv.invertible_call(scale, x, s, free=[s])
    with pytest.raises(ValueError, match=r"free=\.\.\.\): 4 is neither a tensor nor a position"):
        inv.invertible_call(block, x, free=4)
    assert not freed(x) and not freed(s)  # nothing was run or freed


def test_leaves_made_inside_the_call_are_freed_and_user_data_is_not() -> None:
    # A data batch straight into a chain: the split into halves needs no gradient and
    # runs as a plain call, so the halves are leaves; they are the call's own and freed.
    net, params = revnet(3, 3)
    x = torch.randn(4, 6, dtype=torch.float64)
    before = x.clone()
    with inv.explain() as report:
        y = inv.invertible_call(net, x)
    assert not freed(x)
    assert [i for _, i, _ in report.freed[:2]] == [0, 1] and "block 1 of 3" in report.freed[0][0]
    got = torch.autograd.grad(y.square().mean(), params)
    assert torch.equal(x, before)
    assert_all_close(got, torch.autograd.grad(net(x).square().mean(), params), **F64)
    # a one-sided coupling hands the caller's second half on unchanged: never freed
    torch.manual_seed(0)
    one_sided = inv.chain(inv.couple(mlp(3).double()), inv.couple(mlp(3).double()))
    a, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    b_before = b.clone()
    y1, y2 = inv.invertible_call(one_sided, a, b)
    assert not freed(b)
    (y1.square().sum() + y2.square().sum()).backward()
    assert torch.equal(b, b_before)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda x: (x * 2)[:, :6], id="slice view"),
        pytest.param(lambda x: (x * 2)[:, :6].t().t(), id="view of view"),
        pytest.param(lambda x: (x * 2).narrow(1, 2, 6), id="offset view"),
    ],
)
def test_views_are_kept_and_siblings_stay_readable(make) -> None:  # type: ignore[no-untyped-def]
    block = _block()
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    h = make(x)
    with inv.explain() as rep:
        y = inv.invertible_call(block, h)
    assert not freed(h)
    assert rep.kept and "view" in rep.kept[0][2]
    want = torch.autograd.grad(block(make(x)).sum(), x)
    assert_all_close(torch.autograd.grad(y.sum(), x), want, **F64)


def test_live_sibling_view_keeps_the_base() -> None:
    block = _block()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    h = x * 2
    v = h[0]
    inv.invertible_call(block, h)
    assert not freed(h)
    assert torch.isfinite(v).all()


@pytest.mark.parametrize("act", [torch.relu, torch.sigmoid, torch.exp, torch.tanh])
def test_activation_before_the_block(act) -> None:  # type: ignore[no-untyped-def]
    block = _block()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(block(act(x)).square().sum(), x)
    h = act(x)
    y = inv.invertible_call(block, h)
    # sigmoid/exp/tanh save their result and use it smoothly: freed and refilled in place.
    # ReLU's mask could flip on a rebuilt 0, so its result is kept.
    assert freed(h) == (act is not torch.relu)
    got = torch.autograd.grad(y.square().sum(), x)
    assert_all_close(got, want, **F64)


def test_residual_use_rebuilds_the_freed_input() -> None:
    net, params = revnet(3, 3)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad((x.tanh() + net(x.tanh())).square().sum(), [x, *params])
    h = x.tanh()
    y = inv.invertible_call(net, h)
    z = h + y  # reading h rebuilds it from y
    got = torch.autograd.grad(z.square().sum(), [x, *params])
    assert_all_close(got, want, **F64)


def test_print_of_a_freed_tensor_rebuilds_it() -> None:
    block = _block()
    h = torch.randn(2, 6, dtype=torch.float64, requires_grad=True) * 1
    ref = h.detach().clone()
    y = inv.invertible_call(block, h)
    assert ref.shape == h.shape and h.dtype == torch.float64  # metadata needs no rebuild
    assert freed(h)
    text = repr(h)
    assert "tensor" in text and not freed(h)
    torch.testing.assert_close(h.detach(), ref, **F64)
    y.sum().backward()


def test_same_tensor_into_two_calls() -> None:
    b1, b2 = _block(), _block()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad((b1(x.sin()) * b2(x.sin())).sum(), x)
    h = x.sin()
    y1 = inv.invertible_call(b1, h)
    y2 = inv.invertible_call(b2, h)
    got = torch.autograd.grad((y1 * y2).sum(), x)
    assert_all_close(got, want, **F64)


def test_same_tensor_twice_in_one_call() -> None:
    torch.manual_seed(0)
    F, G = mlp(3).double(), mlp(3).double()
    block = inv.couple(F, G)
    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(sum(t.sum() for t in block(x.exp(), x.exp())), x)
    h = x.exp()
    y1, y2 = inv.invertible_call(block, h, h)
    got = torch.autograd.grad(y1.sum() + y2.sum(), x)
    assert_all_close(got, want, **F64)


def test_output_aliasing_an_input_keeps_it() -> None:
    ident = inv.invertible(lambda x: x, inverse=lambda y: y)
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    h = x * 2
    y = inv.invertible_call(ident, h)
    assert not freed(h)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.full_like(x, 2.0))


def test_non_resizable_storage_is_kept() -> None:
    block = _block()
    arr = np.random.randn(3, 6)
    t = torch.from_numpy(arr)
    with inv.explain() as rep:
        inv.invertible_call(block, t)
    assert not freed(t)
    y = inv.invertible_call(block, torch.from_numpy(arr).requires_grad_())
    y.sum().backward()
    assert rep.kept  # a leaf: never freed


def test_forward_that_raises_frees_nothing() -> None:
    def bad(h: torch.Tensor) -> torch.Tensor:
        raise ValueError("boom")

    block = inv.couple(bad)
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    h = x * 2
    with pytest.raises(ValueError, match="boom"):
        inv.invertible_call(block, h)
    assert not freed(h)
    net = inv.chain(_block(), block)
    with pytest.raises(ValueError, match="boom"):
        inv.invertible_call(net, h)
    assert torch.isfinite(h).all()


def test_graph_dropped_without_backward_releases_everything() -> None:
    net, _ = revnet(4, 3)
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    h = x * 2
    y = inv.invertible_call(net, h)
    ref = weakref.ref(y.grad_fn)
    del y
    gc.collect()
    assert ref() is None
    with pytest.raises(inv.FreedTensorError, match="keep="):
        h.sum()


def test_no_reference_cycles_graph_dies_without_gc() -> None:
    net, _ = revnet(3, 3)
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    gc.disable()
    try:
        y = inv.invertible_call(net, x * 2)
        ref = weakref.ref(y.grad_fn)
        del y
        assert ref() is None
    finally:
        gc.enable()


def test_backward_releases_rebuilt_tensors() -> None:
    """Inner boundaries are freed again once used (NOTE [Releasing rebuilt boundaries])."""
    net, _ = revnet(4, 3)
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    h = x * 2
    y = inv.invertible_call(net, h)
    states = []
    node = y.grad_fn
    while node is not None and hasattr(node, "state"):
        states.append(node.state)
        node = node.next_functions[0][0]
    y.sum().backward(retain_graph=True)
    assert not freed(h)  # the caller's tensor is refilled and left alone
    inner = [hd for st in states for hd in (st.handles or ()) if hd is not None]
    # split -> 4 couplings -> join: 5 inner boundaries, each a pair (NOTE [Pairs inside a chain])
    assert len(inner) == 5 * 2 and all(hd.freed for hd in inner)
    want = torch.autograd.grad(y.sum(), x, retain_graph=True)  # a retained graph refills them again
    assert all(hd.freed for hd in inner)
    (g,) = torch.autograd.grad(net(x * 2).sum(), x)
    torch.testing.assert_close(want[0], g, **F64)


def test_parameter_modified_before_backward_is_detected() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3).double()
    block = inv.couple(lin)
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    y = inv.invertible_call(block, x * 2)
    with torch.no_grad():
        lin.weight.add_(1.0)  # e.g. optimizer.step() before backward
    with pytest.raises(inv.InvfuncError, match="modified in place"):
        y.sum().backward()


def test_output_modified_in_place_before_backward_is_detected() -> None:
    block = _block()
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    y = inv.invertible_call(block, x * 2)
    z = inv.invertible_call(block, y)
    with torch.no_grad():
        z.mul_(2)
    with pytest.raises(inv.InvfuncError, match="modified in place"):
        z.sum().backward()


def test_grad_disabled_frees_nothing() -> None:
    block = _block()
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    h = x * 2
    with torch.no_grad():
        y = inv.invertible_call(block, h)
    assert not freed(h) and not y.requires_grad
    with torch.inference_mode():
        inv.invertible_call(block, h)
    assert not freed(h)


def test_foreign_node_reading_a_freed_tensor_raises_instead_of_crashing() -> None:
    code = textwrap.dedent(
        """
        import torch, invfunc as inv
        block = inv.couple(torch.nn.Linear(3, 3))
        x = torch.randn(2, 6, requires_grad=True)
        h = x * 2
        other = (h * h).sum()                # a node saving h itself, created before the call
        y = inv.invertible_call(block, h)
        try:
            torch.autograd.grad(other, x)     # runs before anything refills h
        except RuntimeError as e:
            print("clean error:", "modified by an inplace operation" in str(e))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "clean error: True" in out.stdout


def test_inference_tensor_input_is_kept() -> None:
    block = _block()
    with torch.inference_mode():
        t = torch.randn(3, 6, dtype=torch.float64)
    with inv.explain() as rep:
        y = inv.invertible_call(block, t)
    assert not freed(t) and rep.kept
    y.sum().backward()


def test_shared_memory_input_is_kept() -> None:
    block = _block()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    h = x * 2
    h.share_memory_()
    with inv.explain() as rep:
        y = inv.invertible_call(block, h)
    assert not freed(h)
    assert "shared memory" in rep.kept[0][2]
    (g,) = torch.autograd.grad(y.sum(), x)
    (want,) = torch.autograd.grad(block(x * 2).sum(), x)
    torch.testing.assert_close(g, want, **F64)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda x: (x * 2).contiguous(memory_format=torch.channels_last), id="channels_last"),
        pytest.param(
            lambda x: (x * 2).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), id="permuted view"
        ),
        pytest.param(lambda x: (x[:, :, :1] * 2).expand(-1, -1, 3, -1), id="expanded"),
    ],
)
def test_strided_inputs_refill_with_their_strides(make) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 2, 3, padding=1).double()
    block = inv.couple(conv)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(block(make(x)).square().sum(), x)
    h = make(x)
    before = h.detach().clone()
    y = inv.invertible_call(block, h)
    # channels_last and the permuted view of a private base are freed (NOTE [Views nobody
    # else reaches]); the expanded view has a zero stride and is kept
    assert freed(h) == (0 not in h.stride())
    got = torch.autograd.grad(y.square().sum(), x)
    assert_all_close(got, want, **F64)
    torch.testing.assert_close(h.detach(), before, **F64)  # refilled with the right layout


def test_integer_outputs_are_non_differentiable() -> None:
    f = inv.invertible(lambda x, idx: (x * 2, idx + 1), inverse=lambda y, idx: (y / 2, idx - 1), n_inputs=2)
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    idx = torch.arange(4)
    y, j = inv.invertible_call(f, x * 1, idx)
    assert y.requires_grad and not j.requires_grad and torch.equal(j, idx + 1)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.full_like(x, 2.0))


def _cat(y: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.cat(y, -1) if isinstance(y, tuple) else y


@pytest.mark.parametrize("form", ["one tensor", "pair"])
def test_kept_input_of_a_coupling_is_used_as_it_is(form: str) -> None:
    # G(y1) ~ 1e6 |x2|: rebuilding x2 = y2 - G(y1) in float32 loses most of x2's bits, so
    # F's gradient at a rebuilt x2 is far off. A kept input (here a leaf) is used as it is.
    torch.manual_seed(0)
    F = torch.nn.Linear(3, 3)
    block = inv.couple(F, lambda t: 1e6 * torch.tanh(t) + 1e6, dim=-1)
    x = torch.randn(4, 6, requires_grad=True)
    args = (x,) if form == "one tensor" else tuple(x.detach().chunk(2, -1))
    want = torch.autograd.grad(_cat(block(*args)).square().sum(), [*F.parameters()])
    with inv.explain() as report:
        y = inv.invertible_call(block, *args)
    assert report.freed == []
    got = torch.autograd.grad(_cat(y).square().sum(), [*F.parameters()])
    assert_all_close(got, want, rtol=1e-6, atol=1e-6)
    with inv.mode("invertible"):  # the same block on a freed intermediate: rebuilt, and off
        y = inv.invertible_call(block, *(a * 1 for a in args))
        with pytest.warns(inv.InvertibilityWarning, match="recomputing F on the rebuilt input did not"):
            off = torch.autograd.grad(_cat(y).square().sum(), [*F.parameters()])
    assert max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(off, want)) > 1e-3


# -- explain() names every kept input, in the caller's terms ----------------------------------


def _pair_chain() -> inv.Invertible:
    torch.manual_seed(0)
    return inv.chain(*(inv.couple(mlp(2).double(), mlp(2).double()) for _ in range(2)))


def test_explain_reports_a_leaf_that_needs_no_grad_passed_to_a_chain() -> None:
    net = _pair_chain()
    x = torch.randn(3, 4, dtype=torch.float64)  # user data: a leaf, no grad
    with inv.explain() as report:
        inv.invertible_call(net, x).sum().backward()
    assert report.kept == [
        (
            "couple(Sequential, Sequential), block 1 of 2: its input, split into halves",
            0,
            "it is a leaf (user data or a parameter); data leaves are freed only when named in free=",
        )
    ]
    assert not freed(x)
    # what is freed is named by the caller's blocks: the halves between them, and the last
    # block's output halves before they are joined
    assert {call for call, _, _ in report.freed} == {
        "couple(Sequential, Sequential), block 1 of 2",
        "couple(Sequential, Sequential), block 2 of 2",
        "couple(Sequential, Sequential), block 2 of 2: its output halves, joined",
    }


def test_explain_reports_inputs_of_a_block_run_as_a_plain_call() -> None:
    # nothing the block reads requires grad, and the input is not a leaf: kept, and said why
    block = inv.invertible(lambda x: x * 2, inverse=lambda y: y / 2)
    with torch.no_grad():
        h = torch.ones(3) * 1
    h = h.requires_grad_(False)
    w = torch.ones(3, requires_grad=True)
    with inv.explain() as report:
        inv.invertible_call(block, h)
        inv.invertible_call(inv.couple(lambda t: t * 0), torch.ones(2, 4))  # reads no parameter
    assert [r[2] for r in report.kept] == [
        "it is a leaf (user data or a parameter); data leaves are freed only when named in free=",
        "it is a leaf (user data or a parameter); data leaves are freed only when named in free=",
    ]
    with inv.explain() as report:
        inv.invertible_call(block, w * 1, mode="checkpoint")
    assert report.kept == [("<lambda>", 0, "mode='checkpoint' keeps the inputs")]


def test_free_names_a_batch_that_needs_no_grad_into_a_chain_of_couplings() -> None:
    """The usual training batch (no grad) named in free= into a chain of couplings is freed
    and rebuilt; the chain is then run on single tensors (a split block first, reading
    nothing that requires grad, would be a plain call that could not rebuild it)."""
    net, params = revnet(4, 3)
    b = torch.randn(8, 6, dtype=torch.float64)
    ref = b.clone()
    want = torch.autograd.grad(net(ref).square().sum(), params)
    y = inv.invertible_call(net, b, free=[b])
    assert freed(b)
    got = torch.autograd.grad(y.square().sum(), params)
    assert_all_close(got, want, **F64)
    torch.testing.assert_close(b, ref, **F64)


def _by_channel() -> inv.Invertible:
    torch.manual_seed(0)
    return inv.couple(mlp(3).double(), mlp(3).double(), dim=-1)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda x, lin: lin(x), id="Linear on 3-D"),
        pytest.param(
            lambda x, lin: (x.movedim(1, -1) @ (2 * torch.eye(5, dtype=x.dtype))).movedim(-1, 1), id="movedim"
        ),
        pytest.param(lambda x, lin: (x.reshape(-1, 6) * 2).view(x.shape), id="view of a fresh product"),
        pytest.param(lambda x, lin: (x.transpose(0, 1) * 2).transpose(0, 1), id="transposed back"),
        pytest.param(
            lambda x, lin: torch.tanh(x.reshape(-1, 6)).view(x.shape), id="view of a result tanh saved"
        ),
    ],
)
def test_a_view_nothing_else_reaches_is_freed(make) -> None:  # type: ignore[no-untyped-def]
    """NOTE [Views nobody else reaches]: a view whose base only the view reaches is freed
    and rebuilt through its own sizes and strides; gradients are plain autograd's."""
    block = _by_channel()
    lin = torch.nn.Linear(6, 6).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    wrt = [x, *lin.parameters(), *block.F.parameters()]  # type: ignore[attr-defined]
    want = torch.autograd.grad(block(make(x, lin)).square().sum(), wrt, allow_unused=True)
    h = make(x, lin)
    expected = h.detach().clone()
    y = inv.invertible_call(block, h)
    assert h._is_view() and freed(h)
    got = torch.autograd.grad(y.square().sum(), wrt, allow_unused=True)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, **F64)
    torch.testing.assert_close(h, expected, **F64)


def test_views_something_else_reaches_are_kept() -> None:
    block = _by_channel()
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    base = x.reshape(10, 6) * 2
    held = base.view(2, 5, 6)  # the caller holds the base
    sibling_base = x.reshape(10, 6) * 3
    a, b = sibling_base.view(2, 5, 6), sibling_base.view(2, 5, 6)  # two views of one base
    del sibling_base
    relu_view = torch.relu(x.reshape(10, 6)).view(2, 5, 6)  # ReLU saved its result: a rebuilt 0 could flip
    with inv.explain() as report:
        for h in (held, a, relu_view):
            inv.invertible_call(block, h)
    assert not freed(held) and not freed(a) and not freed(b) and not freed(relu_view)
    reasons = [why for _, _, why in report.kept]
    assert reasons[0] == reasons[1] == "it is a view of another tensor"
    assert reasons[2].startswith("it is a view of a tensor whose producer (ReluBackward0) saved it")
    assert torch.equal(b, x.detach().reshape(2, 5, 6) * 3)


def test_a_freed_view_is_rebuilt_when_read() -> None:
    block = _by_channel()
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    h = (x.reshape(10, 6) * 2).view(2, 5, 6)
    y = inv.invertible_call(block, h)
    assert freed(h)
    torch.testing.assert_close(h + 0, x.detach() * 2, **F64)  # read: rebuilt from y
    y.sum().backward()
    assert x.grad is not None
