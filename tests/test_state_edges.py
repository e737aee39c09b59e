"""Edge cases of state and composition: user generators, other stateful modules, threads
with dropout, freeing under saved-tensor hooks / torch.func / nesting, anomaly mode.

Catalogue items 40-42, 45, 47, 48 and 51 (/work/shared/RELIABILITY.md). Every test
compares with plain autograd run from the same seeds and weights.
"""

from __future__ import annotations

import copy
import os
import threading
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import invfunc as inv
from _util import F64, assert_all_close

# -- item 48: random draws from a user torch.Generator ------------------------------------


def _generator_net(kind: str, g: torch.Generator) -> tuple[inv.Invertible, list[torch.Tensor]]:
    """Two couplings whose F draws from ``g``: additive ``randn`` or multiplicative ``rand``."""
    torch.manual_seed(0)
    lins = [nn.Linear(4, 4).double() for _ in range(2)]

    def noisy(lin: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        def F(h: torch.Tensor) -> torch.Tensor:
            if kind == "randn":
                return torch.tanh(lin(h)) + 0.1 * torch.randn(h.shape, generator=g, dtype=h.dtype)
            return torch.tanh(lin(h)) * torch.rand(h.shape, generator=g, dtype=h.dtype)

        return F

    net = inv.chain(*(inv.couple(noisy(lin), nn.Tanh()) for lin in lins))
    return net, [p for lin in lins for p in lin.parameters()]


@pytest.mark.parametrize("mode", ["invertible", "checkpoint"])
@pytest.mark.parametrize("kind", ["randn", "rand"])
def test_user_generator_draws_replay_or_raise(kind: str, mode: str) -> None:
    """Draws from a user generator inside F replay in the inverse and the recompute: the
    gradients, the caller's rebuilt input and g's final state are plain autograd's (or a
    clear error). Was a silent wrong gradient before a5fc46b (g drawn afresh 3 times)."""
    g = torch.Generator()
    net, params = _generator_net(kind, g)
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)

    def run(call_mode: str) -> list[torch.Tensor]:
        g.manual_seed(7)
        h = torch.tanh(x)  # tanh saves its result: a wrong rebuild of h bends x's gradient
        y = inv.invertible_call(net, h, mode=call_mode)
        grads = torch.autograd.grad(y.square().sum(), [x, *params])
        # the caller's h after the backward, and the user generator's state
        return [y.detach(), *grads, h.detach().clone(), g.get_state().double()]

    want = run("plain")
    try:
        got = run(mode)
    except inv.InvfuncError as e:  # a clear error is acceptable too
        assert "generator" in str(e)
        return
    assert_all_close(got, want, **F64)


# -- item 51: other stateful modules --------------------------------------------------------


class _CountingF(nn.Module):
    """A user module with a buffer it bumps in place on every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.count.add_(1)
        return torch.tanh(self.lin(h))


def _stateful(kind: str) -> nn.Module:
    if kind == "spectral_norm":
        return nn.utils.parametrizations.spectral_norm(nn.Linear(4, 4))
    if kind == "batchnorm_cumulative":
        return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, momentum=None))
    return _CountingF()


@pytest.mark.parametrize("spelling", ["one call", "call per block"])
@pytest.mark.parametrize(
    "kind",
    [
        "spectral_norm",
        "batchnorm_cumulative",
        "buffer_counter",
    ],
)
def test_stateful_modules_update_once_and_give_plain_gradients(kind: str, spelling: str) -> None:
    torch.manual_seed(0)
    mods = [_stateful(kind).double().train() for _ in range(4)]  # F1, G1, F2, G2
    ref = copy.deepcopy(mods)
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)

    def net(ms: list[nn.Module]) -> inv.Invertible:
        return inv.chain(inv.couple(ms[0], ms[1]), inv.couple(ms[2], ms[3]))

    def run(
        ms: list[nn.Module], call: Callable[[inv.Invertible, torch.Tensor], torch.Tensor]
    ) -> list[torch.Tensor]:
        y = call(net(ms), x * 1)
        return [
            y.detach(),
            *torch.autograd.grad(y.square().sum(), [x, *(p for m in ms for p in m.parameters())]),
        ]

    def per_block(n: inv.Invertible, h: torch.Tensor) -> torch.Tensor:
        for b in n.blocks:
            h = inv.invertible_call(b, h)
        return h

    want = run(ref, lambda n, h: n(h))
    got = run(mods, (lambda n, h: inv.invertible_call(n, h)) if spelling == "one call" else per_block)
    # the buffers (running stats, num_batches_tracked, _u/_v, count) after one step
    buffers = [b.detach() for m in mods for b in m.buffers()]
    ref_buffers = [b.detach() for m in ref for b in m.buffers()]
    assert buffers, "the modules have buffers"
    assert_all_close(buffers, ref_buffers, **F64)
    assert_all_close(got, want, **F64)


# -- item 47: threads that train models with dropout ----------------------------------------


def _dropout_model(seed: int) -> tuple[inv.Invertible, list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(seed)
    mods = [
        nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3), nn.Tanh()).double(),
        nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.2)).double(),
        nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.3), nn.Tanh()).double(),
        nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.2)).double(),
    ]
    net = inv.chain(inv.couple(mods[0], mods[1]), inv.couple(mods[2], mods[3]))
    x = torch.randn(32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return net, [p for m in mods for p in m.parameters()], x


def _plain_reference(
    net: inv.Invertible, params: list[torch.Tensor], x: torch.Tensor, seed: int
) -> list[torch.Tensor]:
    xx = x.clone().requires_grad_()
    torch.manual_seed(seed)
    y = net(torch.tanh(xx))
    return list(torch.autograd.grad(y.square().sum(), [xx, *params]))


def _run_threads(work: Callable[[int], None], n: int) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(k: int) -> None:
        try:
            work(k)
        except BaseException as e:  # reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return errors


def test_threads_with_dropout_replay_their_own_draws_when_rng_use_is_serialised() -> None:
    """Valid under a shared global generator: every region that draws from it or sets it
    (forwards, and backwards, which replay) holds a lock, and every backward runs after
    all forwards, so other threads drew in between each forward and its replay. Modes
    differ per thread (thread-local); the rest of the step runs concurrently."""
    n = 4
    models = [_dropout_model(k) for k in range(n)]
    want = [_plain_reference(*models[k], seed=100 + k) for k in range(n)]
    lock = threading.Lock()
    barrier = threading.Barrier(n, timeout=30)
    got: dict[int, list[torch.Tensor]] = {}

    def work(k: int) -> None:
        net, params, x = models[k]
        xx = x.clone().requires_grad_()
        with inv.mode("checkpoint" if k % 2 else "invertible"):
            barrier.wait()
            with lock:
                torch.manual_seed(100 + k)
                y = inv.invertible_call(net, torch.tanh(xx), verify="raise")
            loss = y.square().sum()
            barrier.wait()  # every forward done before any backward
            with lock:
                got[k] = list(torch.autograd.grad(loss, [xx, *params]))

    errors = _run_threads(work, n)
    assert not errors, errors
    for k in range(n):
        assert_all_close(got[k], want[k], **F64)


def test_threads_drawing_from_their_own_generators_train_concurrently() -> None:
    """The thread-safe way to draw random numbers: a torch.Generator per thread. Forwards
    and backwards all run concurrently, no lock; each thread's gradients, rebuilt input and
    generator state equal those of a serial plain-autograd run, three steps in a row."""
    n, steps = 4, 3
    nets = []
    for k in range(n):
        g = torch.Generator()
        net, params = _generator_net("rand", g)
        x = torch.randn(16, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        nets.append((net, params, g, x))

    def step(k: int, s: int, mode: str) -> list[torch.Tensor]:
        net, params, g, x = nets[k]
        xx = x.clone().requires_grad_()
        g.manual_seed(50 + 10 * k + s)
        h = torch.tanh(xx)
        y = inv.invertible_call(net, h, mode=mode, verify="raise" if mode != "plain" else None)
        grads = torch.autograd.grad(y.square().sum(), [xx, *params])
        return [*grads, h.detach().clone(), g.get_state().double()]

    want = {(k, s): step(k, s, "plain") for k in range(n) for s in range(steps)}
    barrier = threading.Barrier(n, timeout=30)
    got: dict[tuple[int, int], list[torch.Tensor]] = {}

    def work(k: int) -> None:
        barrier.wait()
        for s in range(steps):
            got[k, s] = step(k, s, "invertible")

    errors = _run_threads(work, n)
    assert not errors, errors
    for key, value in want.items():
        assert_all_close(got[key], value, **F64)


def test_concurrent_backwards_with_dropout_match_plain() -> None:
    """Forwards under a lock (known draws), all done; then backwards concurrently without
    a lock: nothing but invfunc's replays touches the generator. Repeated three times."""
    n = 4
    models = [_dropout_model(k) for k in range(n)]
    want = [_plain_reference(*models[k], seed=100 + k) for k in range(n)]
    lock = threading.Lock()

    def step() -> dict[int, list[torch.Tensor]]:
        barrier = threading.Barrier(n, timeout=30)
        got: dict[int, list[torch.Tensor]] = {}

        def work(k: int) -> None:
            net, params, x = models[k]
            xx = x.clone().requires_grad_()
            with lock:
                torch.manual_seed(100 + k)
                y = inv.invertible_call(net, torch.tanh(xx), verify="raise")
            loss = y.square().sum()
            barrier.wait()  # every forward done: only the backwards overlap
            got[k] = list(torch.autograd.grad(loss, [xx, *params]))

        errors = _run_threads(work, n)
        assert not errors, errors
        return got

    for _ in range(3):
        got = step()
        for k in range(n):
            assert_all_close(got[k], want[k], **F64)


class _Gate(nn.Module):
    """Identity; on its second call (the recompute in backward) signals ``mine`` and waits
    (bounded) for ``other``: forces two threads' replays to overlap."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.mine: threading.Event | None = None
        self.other: threading.Event | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2 and self.mine is not None and self.other is not None:
            self.mine.set()
            self.other.wait(timeout=2)
        return h


def test_overlapping_replays_in_two_threads_keep_their_own_draws() -> None:
    torch.manual_seed(0)
    gates = [(_Gate(), _Gate()) for _ in range(2)]  # (before dropout, after dropout) per thread
    Fs = [nn.Sequential(g0, nn.Linear(4, 4), nn.Dropout(0.5), g1).double() for g0, g1 in gates]
    blocks = [inv.couple(F) for F in Fs]
    x = torch.randn(8, 8, dtype=torch.float64)

    def grads(k: int, mode: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        xx = x.clone().requires_grad_()
        torch.manual_seed(10 + k)
        loss = inv.invertible_call(blocks[k], xx * 1, mode=mode).square().sum()
        return loss, [xx, *Fs[k].parameters()]

    want = []
    for k in range(2):
        loss, wrt = grads(k, "plain")
        want.append(list(torch.autograd.grad(loss, wrt)))
    pending = [grads(k, "invertible") for k in range(2)]  # forwards, serially
    inside = [threading.Event(), threading.Event()]
    drew = [threading.Event(), threading.Event()]
    for k, (g0, g1) in enumerate(gates):
        g0.calls = g1.calls = 1  # the next call is the recompute
        g0.mine, g0.other = inside[k], inside[1 - k]  # both replays entered ...
        g1.mine, g1.other = drew[k], drew[1 - k]  # ... both drew before either restores
    got: dict[int, list[torch.Tensor]] = {}

    def work(k: int) -> None:
        loss, wrt = pending[k]
        got[k] = list(torch.autograd.grad(loss, wrt))

    errors = _run_threads(work, 2)
    assert not errors, errors
    for k in range(2):
        assert_all_close(got[k], want[k], **F64)


def test_explain_reports_only_its_own_threads_calls() -> None:
    block = inv.couple(nn.Linear(2, 2), nn.Linear(2, 2))
    opened, called = threading.Event(), threading.Event()
    reports: list[object] = []

    def watcher(_: int) -> None:
        with inv.explain() as rep:
            opened.set()
            called.wait(timeout=10)
        reports.append(rep)

    def caller(_: int) -> None:
        opened.wait(timeout=10)
        x = torch.randn(3, 4, requires_grad=True)
        inv.invertible_call(block, x * 1)  # freed: reported in this thread's regions only
        called.set()

    errors = _run_threads(lambda k: (watcher, caller)[k](k), 2)
    assert not errors, errors
    (rep,) = reports
    assert rep.freed == [] and rep.kept == []  # type: ignore[attr-defined]


# -- items 40-42: nothing is freed where freeing is unsafe ---------------------------------


def _block() -> tuple[inv.Invertible, list[torch.Tensor]]:
    torch.manual_seed(0)
    F = nn.Sequential(nn.Linear(2, 2), nn.Tanh()).double()
    G = nn.Linear(2, 2).double()
    return inv.couple(F, G), [*F.parameters(), *G.parameters()]


def test_identity_saved_tensor_hooks_keep_the_input_and_give_plain_gradients() -> None:
    block, params = _block()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    packed: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(1)
        return t

    want = torch.autograd.grad(block(torch.tanh(x)).square().sum(), [x, *params])
    with inv.explain() as rep:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = torch.tanh(x)
            y = inv.invertible_call(block, h)
        got = torch.autograd.grad(y.square().sum(), [x, *params])
    assert packed  # the hooks were in force
    assert rep.freed == []
    assert any("saved-tensor hooks" in reason for _, _, reason in rep.kept), rep.kept
    assert h.untyped_storage().nbytes() > 0
    assert_all_close(got, want, **F64)


def test_a_raising_pack_hook_propagates_and_leaves_the_input_intact() -> None:
    block, params = _block()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    h = torch.tanh(x)
    before = h.detach().clone()

    def pack(t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("pack hook refused")

    with inv.explain() as rep:
        with pytest.raises(RuntimeError, match="pack hook refused"):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                inv.invertible_call(block, h)
    assert rep.freed == []
    assert type(h) is torch.Tensor and h.untyped_storage().nbytes() > 0
    assert torch.equal(h.detach(), before)
    # nothing stuck: the next call frees and gives plain gradients
    with inv.explain() as rep:
        y = inv.invertible_call(block, h)
    assert len(rep.freed) == 1
    got = torch.autograd.grad(y.square().sum(), [x, *params])
    want = torch.autograd.grad(block(torch.tanh(x)).square().sum(), [x, *params])
    assert_all_close(got, want, **F64)


def test_inside_func_grad_the_wrapped_input_is_kept_with_its_reason() -> None:
    block, _ = _block()
    x = torch.randn(3, 4, dtype=torch.float64)
    want = torch.func.grad(lambda z: block(z * 2).square().sum())(x)
    with inv.explain() as rep:
        got = torch.func.grad(lambda z: inv.invertible_call(block, z * 2).square().sum())(x)
    assert rep.freed == []
    assert [(i, r) for _, i, r in rep.kept] == [(0, "it is wrapped by a torch.func transform")]
    assert_all_close([got], [want], **F64)


def test_plain_vmap_then_backward_gives_plain_parameter_gradients() -> None:
    block, params = _block()
    xs = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)

    def run(call: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        for p in [xs, *params]:
            p.grad = None
        torch.func.vmap(lambda z: call(z * 1))(xs).square().sum().backward()
        return [p.grad.clone() for p in [xs, *params]]  # type: ignore[union-attr]

    want = run(block)
    with inv.explain() as rep:
        got = run(lambda z: inv.invertible_call(block, z))
    assert rep.freed == []
    assert [i for _, i, _ in rep.kept] == [0]
    assert_all_close(got, want, **F64)


def test_nested_call_frees_nothing_in_the_outer_forward_or_backward() -> None:
    torch.manual_seed(0)
    inner = inv.couple(nn.Linear(2, 2).double(), nn.Linear(2, 2).double())
    G = nn.Linear(4, 4).double()
    outer = inv.couple(lambda t: inv.invertible_call(inner, torch.tanh(t)), G)
    params = [*inner.F.parameters(), *inner.G.parameters(), *G.parameters()]
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(outer(x * 1).square().sum(), [x, *params])
    with inv.explain() as fwd:
        y = inv.invertible_call(outer, x * 1)
    assert [(c, i) for c, i, _ in fwd.freed] == [(outer._name, 0)]  # only the outer input
    with inv.explain() as bwd:
        got = torch.autograd.grad(y.square().sum(), [x, *params])
    assert bwd.freed == [] and bwd.kept == []  # the recompute ran the inner call plainly
    assert_all_close(got, want, **F64)


# -- item 45: anomaly mode points at the user's function ------------------------------------


def nan_in_backward(h: torch.Tensor) -> torch.Tensor:
    return (h * 0).sqrt()  # backward: inf from sqrt at 0, times 0 -> nan in MulBackward0


def _anomaly_messages(mode: str) -> tuple[str, str]:
    block = inv.couple(nan_in_backward)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="returned nan values") as err:
            with torch.autograd.detect_anomaly():
                y = inv.invertible_call(block, x * 1, mode=mode)
                y.sum().backward()
    return str(err.value), "\n".join(str(w.message) for w in caught)


def test_detect_anomaly_names_the_failing_op_and_the_users_function() -> None:
    plain_error, plain_warnings = _anomaly_messages("plain")
    error, text = _anomaly_messages("invertible")
    # the same node is blamed (MulBackward0), in an error that names the call
    assert plain_error in error and error.startswith("invfunc.invertible_call(couple(nan_in_backward))")
    assert "Error detected in MulBackward0" in plain_warnings
    assert "Error detected in MulBackward0" in text
    # its traceback reaches into the user's F: file, function and line
    assert os.path.basename(__file__) in text
    assert "in nan_in_backward" in text and "(h * 0).sqrt()" in text
    # and the forward call site in the test is named too
    assert "_anomaly_messages" in text
