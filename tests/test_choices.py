"""Discrete choices inside F and G are the forward's in the recompute (NOTE [Discrete
choices]); what is not replayed is detected (NOTE [Recompute divergence]).

The recompute in backward runs on a rebuilt input that differs from the forward's by
round-off. Most tests here make that difference certain to flip a choice: the input's
half ``x2`` has two equal columns (an exact tie), and ``G`` adds 64 to its output, so
``x2 = y2 - G(y1)`` comes back rounded to a grid of 2**-17 with other errors in the two
columns: the tie breaks one way or the other in about half of the rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import pytest
import torch

import invfunc as inv
from invfunc import _choices, _replay

D = 8  # features of each half
E = 4  # experts, buckets


def _tied(n: int = 256, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """A batch whose second half has columns 0 and 1 equal and largest: ties in every row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2 * D, generator=g, dtype=dtype)
    x[:, D] = x[:, D + 1] = x[:, D + 2 :].abs().amax(1) + 0.5
    return x


class Offset(torch.nn.Module):
    """G: a linear map plus a large constant, so that x2 is rebuilt rounded."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(D, D)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.lin(t) + 64.0


class Top1(torch.nn.Module):
    """F: top-1 routing to one of E experts (the router reads the first E features)."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = torch.nn.ModuleList(torch.nn.Linear(D, D) for _ in range(E))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        probs = t[:, :E].softmax(-1)
        k = probs.argmax(-1)
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            rows = k == e
            out[rows] = expert(t[rows]) * probs[rows, e : e + 1]
        return out


class Buckets(torch.nn.Module):
    """F: LSH-style bucketing (argmax over random rotations and their negatives), then
    attention within buckets, as Reformer's LSH attention does."""

    def __init__(self) -> None:
        super().__init__()
        self.qk = torch.nn.Linear(D, D)
        self.v = torch.nn.Linear(D, D)
        rot = torch.zeros(D, E // 2)
        rot[0, 0] = rot[1, 1] = 1.0  # bucket by features 0 and 1: ties where they are equal
        self.register_buffer("rot", rot)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        r = t @ self.rot
        bucket = torch.cat([r, -r], -1).argmax(-1)
        same = bucket[:, None] == bucket[None, :]
        qk, v = self.qk(t), self.v(t)
        scores = (qk @ qk.T / D**0.5).masked_fill(~same, float("-inf"))
        return scores.softmax(-1) @ v


def _grads(
    block: inv.Invertible, x: torch.Tensor, params: Sequence[torch.Tensor], mode: str
) -> list[torch.Tensor]:
    h = x.clone().requires_grad_()
    y = inv.invertible_call(block, h * 1, mode=mode)
    return list(torch.autograd.grad(y.square().mean(), [h, *params]))


def _rel(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    num = sum(float((a - b).double().norm() ** 2) for a, b in zip(got, want))
    return (num / sum(float(b.double().norm() ** 2) for b in want)) ** 0.5


def _no_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hand the recompute its own choices: what invfunc did before choices were replayed."""
    monkeypatch.setattr(_replay, "replay_choice", lambda c, f, a, k, out: (out, 0))


FS: dict[str, Callable[[], torch.nn.Module]] = {"top-1 routing": Top1, "LSH bucketing": Buckets}


@pytest.mark.parametrize("name", list(FS))
def test_flipped_choices_are_replayed_and_gradients_are_plain(name: str) -> None:
    torch.manual_seed(0)
    block = inv.couple(FS[name](), Offset(), dim=-1)
    params = list(block.F.parameters()) + list(block.G.parameters())  # type: ignore[attr-defined]
    x = _tied()
    want = _grads(block, x, params, "plain")
    with inv.explain() as report, warnings.catch_warnings():
        warnings.simplefilter("error")  # no divergence warning
        got = _grads(block, x, params, "invertible")
    flipped = sum(n for _, n in report.flipped)
    assert flipped > 0  # the recompute chose otherwise, and was handed the forward's choice
    (call, count, _), *_ = report.choices
    assert call == f"couple({type(block.F).__name__}, Offset)" and count >= 1  # type: ignore[attr-defined]
    assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("name", list(FS))
def test_without_replay_the_gradients_are_wrong_and_the_check_says_so(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    block = inv.couple(FS[name](), Offset(), dim=-1)
    params = list(block.F.parameters()) + list(block.G.parameters())  # type: ignore[attr-defined]
    x = _tied()
    want = _grads(block, x, params, "plain")
    _no_replay(monkeypatch)
    with pytest.warns(
        inv.InvertibilityWarning, match=r"recomputing F on the rebuilt input did not reproduce"
    ):
        got = _grads(block, x, params, "invertible")
    assert _rel(got, want) > 1e-3
    with inv.verify("raise"), pytest.raises(inv.InvfuncError, match="recomputing F on the rebuilt"):
        _grads(block, x, params, "invertible")


def test_a_chain_of_routed_blocks_matches_plain_autograd() -> None:
    # each coupling is followed by a block that takes G's 64 off again (exactly: Sterbenz),
    # so every coupling sees inputs of the same scale; the ties are in the first
    torch.manual_seed(0)
    shift = torch.cat([torch.zeros(D), torch.full((D,), 64.0)])
    unshift = inv.invertible(lambda x: x - shift, inverse=lambda y: y + shift)
    couplings = [inv.couple(Top1(), Offset(), dim=-1) for _ in range(4)]
    params = [p for b in couplings for m in (b.F, b.G) for p in m.parameters()]  # type: ignore[attr-defined]
    net = inv.chain(*(b for c in couplings for b in (c, unshift)))
    x = _tied()
    want = _grads(net, x, params, "plain")
    with inv.explain() as report, warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _grads(net, x, params, "invertible")
    assert len(report.choices) == 4 and sum(n for _, n in report.flipped) > 0
    assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("op", ["topk", "sort", "max", "kthvalue", "cummax"])
def test_values_returned_with_indices_take_the_forward_choice(op: str) -> None:
    # the value at a tie is the same either way; its gradient goes to the forward's index
    def pick(t: torch.Tensor) -> torch.Tensor:
        head = t[:, :E]
        if op == "topk":
            v = head.topk(1, dim=-1).values
        elif op == "sort":
            v = head.sort(dim=-1, descending=True).values[:, :1]
        elif op == "max":
            v = head.max(dim=-1, keepdim=True).values
        elif op == "kthvalue":
            v = torch.kthvalue(head, E, dim=1, keepdim=True).values
        else:
            v = head.cummax(dim=1).values[:, -1:]
        return t * v

    block = inv.couple(pick, Offset(), dim=-1)
    x = _tied()
    want = _grads(block, x, [], "plain")
    with inv.explain() as report:
        got = _grads(block, x, [], "invertible")
    assert sum(n for _, n in report.flipped) > 0
    assert _rel(got, want) < 1e-5


def test_float64_gradients_are_plain_to_1e_10() -> None:
    torch.manual_seed(0)
    blocks = [inv.couple(Top1().double(), Buckets().double(), dim=-1) for _ in range(3)]
    params = [p for b in blocks for m in (b.F, b.G) for p in m.parameters()]  # type: ignore[attr-defined]
    net = inv.chain(*blocks)
    x = torch.randn(64, 2 * D, dtype=torch.float64)
    want = _grads(net, x, params, "plain")
    for use_grad in (True, False):
        h = x.clone().requires_grad_()
        y = inv.invertible_call(net, h * 1)
        loss = y.square().mean()
        if use_grad:
            got = torch.autograd.grad(loss, [h, *params])
        else:
            for p in params:
                p.grad = None
            loss.backward()
            got = [h.grad, *(p.grad for p in params)]  # type: ignore[list-item]
        assert _rel(got, want) < 1e-10  # type: ignore[arg-type]


def test_double_backward_and_a_second_backward_replay_the_choices() -> None:
    torch.manual_seed(0)
    block = inv.couple(Top1(), Offset(), dim=-1)
    params = list(block.F.parameters())  # type: ignore[attr-defined]
    x = _tied()

    def first_and_second(mode: str) -> list[torch.Tensor]:
        h = x.clone().requires_grad_()
        y = inv.invertible_call(block, h * 1, mode=mode)
        (gx,) = torch.autograd.grad(y.square().mean(), [h], create_graph=True)
        return [gx.detach(), *torch.autograd.grad(gx.square().sum(), params)]

    want = first_and_second("plain")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = first_and_second("invertible")
    assert _rel(got, want) < 1e-4

    h = x.clone().requires_grad_()
    y = inv.invertible_call(block, h * 1)
    loss = y.square().mean()
    first = torch.autograd.grad(loss, [h, *params], retain_graph=True)
    second = torch.autograd.grad(loss, [h, *params])
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert _rel(first, _grads(block, x, params, "plain")) < 1e-5


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")
def test_a_branch_on_a_python_value_takes_the_forward_branch() -> None:
    def F(t: torch.Tensor) -> torch.Tensor:
        # bool() of a float comparison, float() and .item(): all read in the forward
        if bool(t[0, 0] >= t[0, 1]) and float(t[1, 0]) >= t[1, 1].item():
            return t * 2.0
        return t * 3.0

    block = inv.couple(F, Offset(), dim=-1)
    x = _tied()
    want = _grads(block, x, [], "plain")
    with inv.explain() as report, warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _grads(block, x, [], "invertible")
    # the comparison, float() and item(); bool() reads a boolean, already the forward's
    assert report.choices[0][1] == 3
    assert _rel(got, want) < 1e-5


def test_quantisation_with_round_is_replayed() -> None:
    def F(t: torch.Tensor) -> torch.Tensor:
        q = torch.round(t * 4.0) / 4.0  # a step: its value jumps at every half quarter
        return t + (q - t).detach() + q * t[:, :1]

    block = inv.couple(F, Offset(), dim=-1)
    x = torch.randn(256, 2 * D)
    x[:, D:] = torch.round(x[:, D:] * 4) / 4 + 0.125  # every element on a half quarter: ties
    want = _grads(block, x, [], "plain")
    with inv.explain() as report:
        got = _grads(block, x, [], "invertible")
    assert sum(n for _, n in report.flipped) > 0 and report.diverged == []
    assert _rel(got, want) < 1e-5


def test_a_recompute_that_makes_other_choices_is_reported() -> None:
    calls = [0]

    def F(t: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        out = t * 2.0
        if calls[0] > 1:  # hidden state: the recompute takes another path
            out = out + t.argmax(-1, keepdim=True).to(t.dtype)
        return out

    block = inv.couple(F, torch.nn.Linear(D, D), dim=-1)
    x = torch.randn(4, 2 * D)
    with inv.explain() as report:
        y = inv.invertible_call(block, x * 1)
        with pytest.warns(inv.InvertibilityWarning, match=r"made more discrete choices than the forward's 0"):
            y.sum().backward()
    assert report.diverged[0][:2] == ("couple(F, Linear)", "F")


def test_a_choice_not_replayed_is_detected() -> None:
    # remainder jumps at every multiple of 0.5: not a choice invfunc replays
    block = inv.couple(lambda t: t + torch.remainder(t, 0.5) * 8, Offset(), dim=-1)
    x = torch.randn(256, 2 * D)
    x[:, D:] = torch.round(x[:, D:] * 2) / 2  # on the jumps
    with pytest.warns(inv.InvertibilityWarning, match=r"recomputing F .* moved by .* of its magnitude"):
        _grads(block, x, [], "invertible")


def test_a_wrong_inverse_of_a_generic_block_is_detected() -> None:
    bad = inv.invertible(lambda x: x * 2.0, inverse=lambda y: y / 2.0 + 1e-3)
    x = torch.ones(8, dtype=torch.float64, requires_grad=True)
    y = inv.invertible_call(bad, x * 1)
    with pytest.warns(
        inv.InvertibilityWarning, match=r"recomputing the block .* the inverse does not invert"
    ):
        y.sum().backward()


def test_correct_blocks_raise_no_false_alarm() -> None:
    # float32, depth 24: the rebuilt inputs drift (to about 1e-5 here), and the
    # recomputed outputs stay well within the tolerance
    torch.manual_seed(0)
    blocks = [inv.couple(Buckets(), lambda t: torch.tanh(t) * 0.5, dim=-1) for _ in range(24)]
    x = torch.randn(128, 2 * D)
    with inv.explain() as report, warnings.catch_warnings():
        warnings.simplefilter("error")
        inv.invertible_call(inv.chain(*blocks), x * 1).square().mean().backward()
    assert report.diverged == [] and len(report.choices) == 24


def test_checkpoint_mode_replays_too() -> None:
    block = inv.couple(Top1(), Offset(), dim=-1)
    x = _tied()
    want = _grads(block, x, [], "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _grads(block, x, [], "checkpoint")
    assert _rel(got, want) < 1e-6


def test_static_blocks_keep_no_choices_and_no_checksums() -> None:
    # built-in modules make no choices (NOTE [Static discovery]): nothing to keep or check
    block = inv.couple(torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.ReLU()), torch.nn.Linear(D, D))
    with inv.explain() as report:
        y = inv.invertible_call(block, torch.randn(4, 2 * D) * 1)
    assert report.choices == []
    state = y.grad_fn.state  # type: ignore[union-attr]
    assert state.choices is None and state.checksums is None


def test_kept_choices_are_small_and_reported() -> None:
    # 256 rows: the argmax into 4 experts as int8 (256 B), the comparison as bits (32 B);
    # comparisons of the indices (k == e) read integers: exact, not kept
    def F(t: torch.Tensor) -> torch.Tensor:
        k = t[:, :E].argmax(-1)
        return t * (k == 0)[:, None] + t * (t[:, :1] > 0)

    block = inv.couple(F, Offset(), dim=-1)
    with inv.explain() as report:
        inv.invertible_call(block, _tied() * 1)
    (_, count, nbytes) = report.choices[0]
    assert (count, nbytes) == (2, 256 + 32)


# -- how choices are kept -----------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 255, 256, 1000, 4099])
def test_booleans_are_kept_as_bits(n: int) -> None:
    t = torch.rand(n) > 0.5
    p = _choices.Packed(t)
    assert torch.equal(p.unpack(), t)
    assert p.nbytes == (n if n < 256 else (n + 7) // 8)


@pytest.mark.parametrize(
    ("values", "bound", "dtype"),
    [
        (torch.arange(300) % 100, 100, torch.int8),
        (torch.arange(300) * 100, None, torch.int16),
        (torch.arange(300) * 1000, None, torch.int32),
        (torch.arange(300) * (1 << 40), None, torch.int64),
        (-torch.arange(300), None, torch.int16),
    ],
)
def test_integers_are_kept_in_the_smallest_dtype(
    values: torch.Tensor, bound: int | None, dtype: torch.dtype
) -> None:
    p = _choices.Packed(values, bound)
    assert p.data.dtype == dtype
    got = p.unpack()
    assert got.dtype == torch.int64 and torch.equal(got, values)


def test_unpacked_choices_are_fresh_tensors() -> None:
    # a user's in-place edit of a replayed result must not change the kept one
    t = torch.arange(10)
    p = _choices.Packed(t)
    p.unpack().add_(1)
    assert torch.equal(p.unpack(), t)


def test_what_is_a_choice() -> None:
    x = torch.randn(4, 4)
    i = torch.arange(4)
    is_choice = _choices.is_choice
    assert is_choice(torch.argmax, (x,), {}, x.argmax())
    assert is_choice(torch.Tensor.__gt__, (x, 0), {}, x > 0)
    assert is_choice(torch.Tensor.long, (x,), {}, x.long())
    assert is_choice(torch.round, (x,), {}, x.round())
    assert is_choice(torch.Tensor.item, (x[0, 0],), {}, None)
    assert not is_choice(torch.relu, (x,), {}, x.relu())  # a kink, not a jump
    assert not is_choice(torch.Tensor.__gt__, (i, 0), {}, i > 0)  # from integers: exact
    assert not is_choice(torch.zeros_like, (x,), {"dtype": torch.long}, torch.zeros_like(x, dtype=torch.long))
    assert not is_choice(torch.Tensor.item, (i[0],), {}, None)
    assert not is_choice(torch.Tensor.size, (x,), {}, x.size())
