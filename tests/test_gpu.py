"""CUDA checks: RNG replay, autocast, GradScaler, allocator-level memory, streams.

Every test here needs a CUDA device and is skipped without one (CI has none). They are
run on a GPU machine by ``bash benchmarks/gpu_checks.sh`` (see "GPU checks" in
docs/benchmarks.md). Catalogue items (shared/RELIABILITY.md): 48-50 (RNG), 53 (autocast),
54 (GradScaler), 59-61 and 64 (memory), 62 (reading a freed CUDA tensor), 63 (streams).

Each test compares with plain autograd run the same way (same seed, same autocast, same
streams); memory is read with ``torch.cuda.memory_allocated`` and
``torch.cuda.max_memory_allocated`` after a warm-up (cuBLAS workspaces, the caching
allocator) and after ``torch.cuda.synchronize()``. Sizes are multiples of 512 bytes, the
allocator's rounding, so byte counts compare exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn

import invfunc as inv
from _util import assert_all_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

#: The device every test runs on (a module global so the helpers can be tried elsewhere).
DEVICE = "cuda"
F64 = {"rtol": 1e-9, "atol": 1e-11}


# -- helpers -------------------------------------------------------------------------------


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _rng_state() -> torch.Tensor:
    """The state of the generator that random ops on DEVICE draw from."""
    return torch.cuda.get_rng_state() if DEVICE == "cuda" else torch.get_rng_state()


def _mlp(h: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    return nn.Sequential(nn.Linear(h, h), nn.Tanh(), nn.Linear(h, h)).to(DEVICE, dtype)


def _revnet(
    depth: int, h: int, dtype: torch.dtype = torch.float32
) -> tuple[inv.Invertible, list[torch.Tensor]]:
    """``depth`` couplings with MLP F and G on DEVICE (a bare coupling for depth 1)."""
    torch.manual_seed(0)
    blocks = [inv.couple(_mlp(h, dtype), _mlp(h, dtype)) for _ in range(depth)]
    params = [p for b in blocks for m in (b.F, b.G) for p in m.parameters()]  # type: ignore[attr-defined]
    return (blocks[0] if depth == 1 else inv.chain(*blocks)), params


def _call(net: inv.Invertible) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda h: inv.invertible_call(net, h)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


# -- plain gradients on CUDA (the baseline for the rest) -------------------------------------


def test_cuda_gradients_match_plain() -> None:
    net, params = _revnet(3, 16, torch.float64)
    x = torch.randn(8, 32, dtype=torch.float64, device=DEVICE, requires_grad=True)
    want = torch.autograd.grad(net(x * 1).square().mean(), [x, *params])
    h = x * 1
    y = inv.invertible_call(net, h)
    assert h.untyped_storage().nbytes() == 0  # the input was freed on the device
    got = torch.autograd.grad(y.square().mean(), [x, *params])
    assert_all_close(got, want, **F64)


def test_cuda_reading_a_freed_input_rebuilds_it() -> None:
    """Catalogue 62: reading a freed CUDA tensor rebuilds it (no illegal memory access)."""
    net, params = _revnet(2, 16, torch.float64)
    x = torch.randn(8, 32, dtype=torch.float64, device=DEVICE, requires_grad=True)
    h = torch.tanh(x)
    y = inv.invertible_call(net, h)
    assert h.untyped_storage().nbytes() == 0
    assert torch.allclose(h, torch.tanh(x), rtol=1e-9, atol=1e-11)  # reads h: rebuilt
    assert h.untyped_storage().nbytes() > 0
    got = torch.autograd.grad((h + y).square().sum(), [x, *params])
    _sync()
    h = torch.tanh(x)
    want = torch.autograd.grad((h + net(h)).square().sum(), [x, *params])
    assert_all_close(got, want, **F64)


# -- (a) RNG replay on the CUDA generator (catalogue 48-50) -----------------------------------


def _random_net() -> tuple[inv.Invertible, list[torch.Tensor]]:
    """Dropout modules (static discovery), and closures drawing with rand_like / dropout
    (recorded by the tracer), all on DEVICE."""
    torch.manual_seed(0)
    F = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.Tanh()).to(DEVICE, torch.float64)
    G = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.3)).to(DEVICE, torch.float64)

    def noisy(h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h) + torch.rand_like(h) * 0.1

    def drop(h: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(h, 0.2, training=True) * 2

    net = inv.chain(inv.couple(F, G), inv.couple(noisy, drop), inv.couple(G, F))
    return net, [*F.parameters(), *G.parameters()]


def _per_block(net: inv.Invertible) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(h: torch.Tensor) -> torch.Tensor:
        for b in net.blocks:  # type: ignore[attr-defined]
            h = inv.invertible_call(b, h)
        return h

    return run


@pytest.mark.parametrize("spelling", ["one call", "call per block"])
def test_cuda_dropout_and_random_ops_match_plain_under_the_same_seed(spelling: str) -> None:
    net, params = _random_net()
    x = torch.randn(6, 32, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def run(call: Callable[[torch.Tensor], torch.Tensor], seed: int = 123) -> list[torch.Tensor]:
        torch.manual_seed(seed)  # seeds the CUDA generators too
        y = call(x * 1)
        grads = torch.autograd.grad(y.square().sum(), [x, *params])
        # the caller's stream after the step, drawn on the device
        return [y.detach(), *grads, torch.rand(5, device=DEVICE, dtype=torch.float64)]

    want = run(net)
    assert not torch.equal(run(net, seed=124)[0], want[0])  # the forward does draw on the device
    got = run(_call(net) if spelling == "one call" else _per_block(net))
    assert_all_close(got, want, **F64)


def test_cuda_rng_state_after_forward_and_backward_is_plain_autograds() -> None:
    net, _ = _random_net()
    x = torch.randn(6, 32, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def states(call: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(5)
        call(x * 1).square().sum().backward()  # backward on autograd's device thread
        _sync()
        return _rng_state(), torch.get_rng_state()

    want_dev, want_cpu = states(net)
    got_dev, got_cpu = states(_call(net))
    assert torch.equal(got_dev, want_dev)
    assert torch.equal(got_cpu, want_cpu)


# -- (b) autocast on CUDA (catalogue 53) ---------------------------------------------------


def _autocast_dtypes() -> list[torch.dtype]:
    return [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", _autocast_dtypes(), ids=["fp16", "bf16"])
def test_cuda_autocast_matches_plain_autocast(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and DEVICE == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("bf16 is not supported on this device")
    torch.manual_seed(0)
    F = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)).to(DEVICE)
    G = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)).to(DEVICE)
    w = torch.randn(32, 32, device=DEVICE, requires_grad=True)
    seen: list[torch.dtype] = []

    def spy(h: torch.Tensor) -> torch.Tensor:  # a recorded block: sees forward and replays
        out = nn.functional.linear(h, w)
        seen.append(out.dtype)
        return out

    net = inv.chain(inv.couple(F, G), inv.couple(spy), inv.couple(G, F))
    params = [*F.parameters(), *G.parameters(), w]
    x = torch.randn(16, 64, device=DEVICE, requires_grad=True)

    def run(call: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        with torch.autocast(DEVICE, dtype=dtype):
            y = call(x * 1)
        assert y.dtype == torch.float32  # the coupling stream stays in float32
        # the backward runs outside the autocast region: invfunc re-enters the forward's
        return [y, *torch.autograd.grad(y.square().mean(), [x, *params])]

    want = run(net)
    seen.clear()
    got = run(_call(net))
    assert len(seen) >= 2 and all(d == dtype for d in seen), seen  # forward and replays
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-2
    for i, (g, r) in enumerate(zip(got, want)):
        assert g.dtype == r.dtype
        assert _rel_err(g, r) <= tol, f"tensor {i}: relative error {_rel_err(g, r):.2e}"
    assert_all_close(got, want, rtol=2e-2, atol=2e-2)


# -- (c) fp16 autocast with GradScaler (catalogue 54) -----------------------------------------


def _train_with_scaler(
    use_invfunc: bool, inf_at: int, steps: int = 4
) -> tuple[list[list[torch.Tensor]], list[bool], list[float]]:
    """A few SGD steps of stem -> 3 couplings under fp16 autocast with a GradScaler.

    Returns the parameters after each step, which steps the scaler skipped, and the scale
    after each step. At step ``inf_at`` the loss is multiplied by inf.
    """
    torch.manual_seed(0)
    width = 64
    stem = nn.Linear(2 * width, 2 * width).to(DEVICE)  # its output is an intermediate: freed
    blocks = [
        inv.couple(
            nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)).to(DEVICE),
            nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)).to(DEVICE),
        )
        for _ in range(3)
    ]
    net = inv.chain(*blocks)
    params = [*stem.parameters(), *(p for b in blocks for m in (b.F, b.G) for p in m.parameters())]  # type: ignore[attr-defined]
    data = [torch.randn(32, 2 * width, device=DEVICE) for _ in range(steps)]
    opt = torch.optim.SGD(params, lr=0.05)
    scaler = torch.amp.GradScaler(DEVICE)  # default init_scale 2**16: large scaled gradients
    after: list[list[torch.Tensor]] = []
    skipped: list[bool] = []
    scales: list[float] = []
    for step, x in enumerate(data):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=torch.float16):
            # a float32 stream (as in the autocast test): the couplings' additions and
            # their inversion stay in float32, F and G run in float16
            h = stem(x).float()
            y = inv.invertible_call(net, h) if use_invfunc else net(h)
            loss = y.float().square().mean()
        if step == inf_at:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        skipped.append(scales[-1] < before)  # the scaler backs off exactly when it skips
        after.append([p.detach().clone() for p in params])
    return after, skipped, scales


def test_cuda_gradscaler_steps_and_skips_like_plain() -> None:
    inf_at = 2
    want, want_skipped, want_scales = _train_with_scaler(False, inf_at)
    got, got_skipped, got_scales = _train_with_scaler(True, inf_at)
    assert want_skipped == [False, False, True, False]  # the plain run is the reference
    assert got_skipped == want_skipped
    assert got_scales == want_scales
    for g, w in zip(got, want):  # after every step
        assert_all_close(g, w, rtol=1e-3, atol=1e-4)
    # the skipped step left the parameters untouched
    assert all(torch.equal(a, b) for a, b in zip(got[inf_at], got[inf_at - 1]))
    assert not all(torch.equal(a, b) for a, b in zip(got[inf_at + 1], got[inf_at]))


# -- (d) memory on the caching allocator (catalogue 59-61, 64) --------------------------------


def _zero_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        if t.grad is not None:
            t.grad.zero_()


@pytest.mark.parametrize("depth", [1, 3])
def test_cuda_memory_drops_by_the_freed_bytes(depth: int) -> None:
    """Right after the call, memory_allocated is lower than with mode="checkpoint" (which
    keeps the inputs and runs the same computation) by exactly the bytes explain() reports
    freed: the caller's input, and for a chain the boundaries inside it."""
    B, H = 256, 128  # stream (256, 256) float32: 256 KiB; halves 128 KiB
    net, params = _revnet(depth, H)
    x = torch.randn(B, 2 * H, device=DEVICE, requires_grad=True)
    for mode in ("checkpoint", "invertible", "checkpoint", "invertible"):  # warm-up
        inv.invertible_call(net, x * 2, mode=mode).square().mean().backward()
    x.grad = None
    for p in params:
        p.grad = None

    def held(mode: str) -> tuple[int, list[tuple[str, int, int]], object]:
        _sync()
        base = torch.cuda.memory_allocated()
        with inv.explain() as report:
            h = x * 2
            y = inv.invertible_call(net, h, mode=mode)
        _sync()
        return torch.cuda.memory_allocated() - base, report.freed, (h, y)

    ckpt, ckpt_freed, alive = held("checkpoint")
    del alive
    ours, freed, alive = held("invertible")
    assert ckpt_freed == []
    nbytes = sum(n for _, _, n in freed)
    assert any(i == 0 and n == B * 2 * H * 4 for _, i, n in freed)  # the caller's input
    if depth == 1:
        assert nbytes == B * 2 * H * 4
    assert ckpt - ours == nbytes, (ckpt, ours, freed)
    del alive


def test_cuda_memory_returns_to_baseline_after_backward_and_after_dropping_the_graph() -> None:
    net, params = _revnet(4, 128)
    x = torch.randn(256, 256, device=DEVICE, requires_grad=True)
    wrt = [x, *params]
    inv.invertible_call(net, x * 2).square().mean().backward()  # warm-up: allocates .grad
    _zero_grads(wrt)  # later steps accumulate into these in place
    _sync()
    base = torch.cuda.memory_allocated()
    for _ in range(3):
        h = x * 2
        y = inv.invertible_call(net, h)
        y.square().mean().backward()
        del h, y
        _sync()
        assert torch.cuda.memory_allocated() == base, "after backward"
        h = x * 2
        y = inv.invertible_call(net, h)
        del h, y  # the graph is dropped without a backward
        _sync()
        assert torch.cuda.memory_allocated() == base, "after dropping the graph"


def _peaks(depth: int, mode: str) -> tuple[int, int]:
    """(peak of the whole step, peak during the backward), both above the memory held
    before the step, for a chain of ``depth`` couplings; gradients for the input only, so
    parameter gradients (which grow with depth) are not in the figures."""
    B, H = 512, 256  # stream (512, 512) float32: 1 MiB
    net, _ = _revnet(depth, H)
    x = torch.randn(B, 2 * H, device=DEVICE, requires_grad=True)

    def step() -> tuple[int, int]:
        _sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        h = x * 2
        y = inv.invertible_call(net, h, mode=mode)
        loss = y.square().mean()
        _sync()
        whole = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        (gx,) = torch.autograd.grad(loss, [x])
        _sync()
        backward = torch.cuda.max_memory_allocated()
        del h, y, loss, gx
        return max(whole, backward) - base, backward - base

    step()  # warm-up: cuBLAS workspaces of the forward and of the backward's thread
    return step()


def test_cuda_peak_during_backward_is_flat_in_depth() -> None:
    whole8, back8 = _peaks(8, "invertible")
    whole32, back32 = _peaks(32, "invertible")
    plain8, _ = _peaks(8, "plain")
    plain32, _ = _peaks(32, "plain")
    assert plain32 > 2 * plain8  # the measure sees activations: plain autograd grows
    assert abs(back32 - back8) <= 0.05 * back8, (back8, back32)
    assert abs(whole32 - whole8) <= 0.05 * whole8, (whole8, whole32)
    assert whole32 < plain8  # depth 32 holds less than plain autograd at depth 8


# -- (e) streams (catalogue 63) --------------------------------------------------------------


def _busy(stream: torch.cuda.Stream) -> None:
    """Queue about 0.1 s of work on ``stream`` so the host runs ahead of it."""
    with torch.cuda.stream(stream):
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(200_000_000)  # clock cycles
        else:  # pragma: no cover - torch without the private helper
            a = torch.randn(4096, 4096, device=DEVICE)
            for _ in range(50):
                a = a @ a
                a /= a.norm()


def _input_and_busy_side_stream(x: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Stream]:
    """``x * 2`` made on the default stream, and a side stream that waits for it, then has
    about 0.1 s of work queued; the allocator's cache is emptied first, so that a block
    freed now is the only one of its size to reuse."""
    _sync()
    torch.cuda.empty_cache()
    side = torch.cuda.Stream()
    h = x * 2
    side.wait_stream(torch.cuda.current_stream())
    _busy(side)
    return h, side


def _overwrite_free_blocks(shape: tuple[int, ...]) -> list[torch.Tensor]:
    """Allocate on the default stream, where nothing is queued, and overwrite at once:
    a block handed back too early is taken and filled with NaN before the side stream
    reads it."""
    return [torch.empty(shape, device=DEVICE).fill_(float("nan")) for _ in range(4)]


def test_cuda_forward_on_a_side_stream_backward_on_the_default_stream() -> None:
    """The whole forward on a side stream, then backward from the default stream after
    waiting for it (the pattern of the CUDA semantics notes): plain gradients."""
    net, params = _revnet(3, 64, torch.float64)
    x = torch.randn(128, 128, dtype=torch.float64, device=DEVICE, requires_grad=True)
    want = torch.autograd.grad(net(x * 2).square().mean(), [x, *params])
    _sync()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        h = x * 2
        y = inv.invertible_call(net, h)
        loss = y.square().mean()
    torch.cuda.current_stream().wait_stream(side)
    got = torch.autograd.grad(loss, [x, *params])
    _sync()
    assert_all_close(got, want, **F64)


def test_cuda_input_from_the_default_stream_freed_while_a_side_stream_reads_it() -> None:
    """Catalogue 63: the input is made on the default stream and read by the block's
    kernels on a busy side stream; when the call returns, those kernels may not have run
    yet. A free with ``resize_(0)`` alone hands the block back to the default stream's pool
    at once, so the caller's next allocation there (``junk``, overwritten at once) can
    take it before the side stream reads it. Correct: outputs and gradients are plain
    autograd's (the engine waits for the reading stream, records it, or keeps the input)."""
    net, params = _revnet(2, 512)
    x = torch.randn(1024, 1024, device=DEVICE, requires_grad=True)  # 4 MiB
    want_y = net(x * 2)
    want = torch.autograd.grad(want_y.square().mean(), [x, *params])
    want_y = want_y.detach()
    h, side = _input_and_busy_side_stream(x)
    with torch.cuda.stream(side):
        y = inv.invertible_call(net, h)
    junk = _overwrite_free_blocks((1024, 1024))
    torch.cuda.current_stream().wait_stream(side)
    got_y = y.detach().clone()
    got = torch.autograd.grad(y.square().mean(), [x, *params])
    _sync()
    del junk
    torch.testing.assert_close(got_y, want_y, rtol=1e-5, atol=1e-5)
    assert_all_close(got, want, rtol=1e-4, atol=1e-5)


def test_cuda_output_in_the_input_memory_dropped_while_a_side_stream_reads_it() -> None:
    """Catalogue 63 for one call per block on a single tensor, whose output goes into the
    memory of the input it frees (NOTE [Outputs in the memory of the input they replace]).
    That memory is from the pool of the stream the input was made on (the default one
    here), while the calls run on a busy side stream. When the host drops the output
    before the side stream has run, a free without a record of the side stream hands the
    block back to the default stream's pool at once, and ``junk`` overwrites it before the
    blocks read their input. Correct: the side stream computes plain autograd's values."""
    torch.manual_seed(0)
    blocks = [inv.couple(_mlp(512), _mlp(512)) for _ in range(2)]
    x = torch.randn(1024, 1024, device=DEVICE, requires_grad=True)  # 4 MiB: above REUSE_MIN_BYTES
    with torch.no_grad():
        want = x * 2
        for b in blocks:
            want = b(want)
        want = want.square().sum()
    h, side = _input_and_busy_side_stream(x)
    with torch.cuda.stream(side):
        y = h
        for b in blocks:
            y = inv.invertible_call(b, y)
        got = y.detach().square().sum()
    del y, h  # the graph goes, and with it the output's memory, before the side stream ran
    junk = _overwrite_free_blocks((1024, 1024))
    torch.cuda.current_stream().wait_stream(side)
    _sync()
    del junk
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
