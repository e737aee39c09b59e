"""A mode per block: ``invfunc.plan``, ``Plan`` and ``invertible_call(plan, ...)``.

Memory claims are deterministic counts of what autograd saves (walked here, independently
of the package's own walk); timing claims live in ``benchmarks/plan.py``, not here.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import invfunc as inv
from _util import F64, assert_all_close, freed, script
from invfunc import ops
from invfunc._measure import measure
from invfunc._plan import ORDER, BlockProfile, Input, Output, search, total_bytes

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
MODES = ("plain", "checkpoint", "invertible")
B, H = 8, 4


def held_bytes(outputs: Sequence[torch.Tensor], exclude: Sequence[torch.Tensor], stop: object = None) -> int:
    """Bytes of the storages autograd saved behind ``outputs`` (unique, live), less those of
    ``exclude``, not walking past the node ``stop`` (the caller's own graph)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: set[int] = set()
    alive: list[object] = []
    storages: dict[int, int] = {}
    stack = [o.grad_fn for o in outputs]
    while stack:
        node = stack.pop()
        if node is None or node is stop or id(node) in seen:
            continue
        seen.add(id(node))
        alive.append(node)  # (older torch makes a new wrapper per access: ids get reused)
        tensors = list(getattr(node, "saved_tensors", ()))
        for name in dir(node):
            if name.startswith("_saved_"):
                v = getattr(node, name)
                tensors += [v] if isinstance(v, torch.Tensor) else []
        for t in tensors:
            s = t.untyped_storage()
            if s.data_ptr() and s.data_ptr() not in skip:
                storages[s.data_ptr()] = s.nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(storages.values())


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(H, 16), torch.nn.Tanh(), torch.nn.Linear(16, H))


def mixed(dtype: torch.dtype = torch.float64) -> tuple[inv.Invertible, list[torch.Tensor]]:
    """Six blocks of every kind the cost model distinguishes: couplings (static, fused
    backward); an exp whose plain node saves its result (freeable: smooth); an in-place leaky
    ReLU whose plain node saves its result (not freeable) and that keeps a discrete choice;
    an affine map reading captured parameters; all with log-dets."""
    torch.manual_seed(0)
    s = torch.nn.Parameter(torch.randn(2 * H, dtype=dtype) * 0.1)
    b = torch.nn.Parameter(torch.randn(2 * H, dtype=dtype) * 0.1)
    affine = inv.invertible(
        lambda x: (x * s.exp() + b, s.sum().expand(len(x))),
        inverse=lambda y: ((y - b) * (-s).exp(), -s.sum().expand(len(y))),
        ladj=True,
    )
    exp = inv.invertible(
        lambda x: (x.exp(), x.sum(1)), inverse=lambda y: (y.log(), -y.log().sum(1)), ladj=True
    )
    log10 = math.log(10.0)
    leaky = inv.invertible(
        lambda x: (
            torch.nn.functional.leaky_relu(x * 1, 0.1, inplace=True),
            torch.where(x >= 0, 0.0, -log10).sum(1),
        ),
        inverse=lambda y: (torch.where(y >= 0, y, y / 0.1), torch.where(y >= 0, 0.0, log10).sum(1)),
        ladj=True,
    )
    couplings = [inv.couple(_mlp().to(dtype), _mlp().to(dtype)) for _ in range(3)]
    net = inv.chain(couplings[0], exp, leaky, couplings[1], affine, couplings[2])
    params = [p for c in couplings for m in (c.F, c.G) for p in m.parameters()] + [s, b]  # type: ignore[attr-defined]
    return net, params


@pytest.fixture(scope="module")
def measured() -> tuple[inv.Plan, list[torch.Tensor], torch.Tensor]:
    net, params = mixed()
    x = torch.randn(B, 2 * H, dtype=torch.float64, requires_grad=True)
    return inv.plan(net, x, repeat=1), params, x


# -- modes by hand ---------------------------------------------------------------------------


def test_modes_set_by_hand_are_checked_against_the_blocks() -> None:
    net, _ = mixed()
    p = inv.plan(net, modes=["plain", "checkpoint", "invertible"] * 2)
    assert isinstance(p, inv.Plan) and p.modes == ("plain", "checkpoint", "invertible") * 2
    assert p.profile is None and p.bytes_kept is None and p.feasible
    with pytest.raises(ValueError, match=r"2 mode\(s\) given for 6 block\(s\).*'invertible', 'checkpoint'"):
        inv.plan(net, modes=["plain", "plain"])
    with pytest.raises(ValueError, match=r"modes\[1\] \(block 2 of 6\): unknown mode 'fast'; valid modes"):
        inv.plan(net, modes=["plain", "fast", *["plain"] * 4])
    with pytest.raises(TypeError, match="one mode per block"):
        inv.plan(net, modes="plain")
    with pytest.raises(TypeError, match="modes= sets the modes by hand"):
        inv.plan(net, modes=["plain"] * 6, max_memory=10)
    with pytest.raises(TypeError, match="no example inputs"):
        inv.plan(net)
    with pytest.raises(TypeError, match="must be an Invertible"):
        inv.plan(lambda x: x, torch.ones(1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_memory must be a number of bytes"):
        inv.plan(net, torch.ones(2, 8), max_memory=-1)
    with pytest.raises(ValueError, match="repeat must be a positive int"):
        inv.plan(net, torch.ones(2, 8), repeat=0)


def test_mode_given_with_a_plan_is_an_error_and_the_ambient_mode_does_not_override_it() -> None:
    net, _ = mixed()
    p = inv.plan(net, modes=["invertible"] * 6)
    x = torch.randn(B, 2 * H, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"invertible_call\(plan\(chain.*mode='plain'.*a Plan sets a mode"):
        inv.invertible_call(p, x * 1, mode="plain")
    with inv.mode("plain"), inv.explain() as report:
        h = x * 1
        inv.invertible_call(p, h)
    assert freed(h) and report.freed  # the plan's "invertible" won over the ambient "plain"


def test_a_plan_inside_as_module_and_called_directly() -> None:
    net, params = mixed()
    p = inv.plan(net, modes=["checkpoint", "plain", "invertible", "plain", "invertible", "checkpoint"])
    x = torch.randn(B, 2 * H, dtype=torch.float64)
    z, ladj = p(x)  # a plain call of its function
    want_z, want_ladj = net(x)
    assert torch.equal(z, want_z) and torch.equal(ladj, want_ladj)
    measured = inv.plan(net, x, modes=list(p.modes), repeat=1)  # hand modes, measured too
    assert measured.modes == p.modes and measured.bytes_kept is not None
    assert inv.plan(measured, modes=["plain"] * 6).profile is measured.profile
    module = inv.as_module(p)
    assert {id(t) for t in module.parameters()} == {id(t) for t in params}
    got = module(x.requires_grad_())
    assert torch.equal(got[0], want_z)


# -- gradients and bytes of every mix ----------------------------------------------------------


def test_every_mix_keeps_the_bytes_measured_and_gives_plain_autograds_gradients(measured) -> None:
    p, params, x = measured
    ref = None
    for modes in itertools.product(MODES, repeat=len(p.modes)):
        q = inv.plan(p, modes=list(modes))
        h = x * 1  # an intermediate: an "invertible" first block frees it
        with inv.explain() as report:
            z, ladj = inv.invertible_call(q, h)
        kept = held_bytes([z, ladj], [*params, x, h, z, ladj], stop=h.grad_fn)
        kept += sum(n for _, _, n in report.choices)  # the leaky ReLU's comparisons
        assert kept == q.bytes_kept, modes
        assert freed(h) == (modes[0] == "invertible")
        got = torch.autograd.grad(z.square().sum() + ladj.sum(), [x, *params])
        if ref is None:
            assert modes == ("plain",) * 6
            ref = got
        assert_all_close(got, ref, **F64)


def test_the_measured_bytes_of_each_mode(measured) -> None:
    p, _, _ = measured
    stream = B * 2 * H * 8  # one activation of the stream, float64
    exp, leaky = p.profile[1], p.profile[2]
    assert exp.outputs[0].saved["plain"] and exp.outputs[0].freeable["plain"]  # exp saves its result
    assert leaky.outputs[0].saved["plain"] and not leaky.outputs[0].freeable["plain"]  # a ReLU's mask
    assert leaky.saved["checkpoint"] == leaky.saved["invertible"] == B * 2 * H  # the choice, one byte each
    for b in p.profile:
        assert b.outputs[0].nbytes == stream
        assert b.outputs[0].saved["checkpoint"] and b.outputs[0].saved["invertible"]
        assert b.inputs[0].saved["checkpoint"] and not b.inputs[0].saved["invertible"]
    # a coupling after a block that cannot be freed keeps that input even when invertible
    assert total_bytes(p.profile, ["plain"] * 3 + ["invertible"] * 3) >= stream


def test_a_chain_of_couplings_all_invertible_runs_with_pairs_inside() -> None:
    torch.manual_seed(0)
    net = inv.chain(*[inv.couple(_mlp().double(), _mlp().double()) for _ in range(3)])
    x = torch.randn(B, 2 * H, dtype=torch.float64, requires_grad=True)
    p = inv.plan(net, x, max_memory=0, repeat=1)
    assert p.bytes_kept == 0 and p.modes[1:] == ("invertible", "invertible")
    q = inv.plan(p, modes=["invertible"] * 3)
    with inv.explain() as report:
        inv.invertible_call(q, x * 1)
    assert any("split into halves" in name for name, _, _ in report.freed)


def test_a_block_returning_its_input_is_counted_at_both_boundaries_never_less() -> None:
    # (NOTE [Bytes kept]: a storage crossing two boundaries is an over-estimate, never an under)
    net, params = mixed()
    view = inv.invertible(lambda x: x.view(x.shape), inverse=lambda y: y.view(y.shape), ladj=0)
    blocks = list(net.blocks)  # type: ignore[attr-defined]
    net = inv.chain(*blocks[:3], view, *blocks[3:])
    x = torch.randn(B, 2 * H, dtype=torch.float64, requires_grad=True)
    p = inv.plan(net, x, repeat=1)
    assert p.profile[3].inputs[0].returned
    over = 0
    for modes in itertools.product(MODES, repeat=3):
        q = inv.plan(p, modes=["plain", "plain", *modes, "plain", "plain"])
        with inv.explain() as report:
            z, ladj = inv.invertible_call(q, x)
        kept = held_bytes([z, ladj], [*params, x, z, ladj]) + sum(n for _, _, n in report.choices)
        assert kept <= q.bytes_kept, modes  # type: ignore[operator]
        over += kept < q.bytes_kept  # type: ignore[operator]
    assert over  # the case exists


def test_trailing_arguments_reach_every_block_in_every_mode() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(2 * H, dtype=torch.float64))
    masked = inv.invertible(lambda x, m: x + m * w, inverse=lambda y, m: y - m * w, ladj=0)
    net = inv.chain(masked, inv.couple(_mlp().double(), _mlp().double()), masked)
    x = torch.randn(B, 2 * H, dtype=torch.float64, requires_grad=True)
    m = torch.rand(2 * H, dtype=torch.float64)
    p = inv.plan(net, x, m, repeat=1)
    params = [w, *inv.as_module(net).parameters()]
    want = torch.autograd.grad(net(x, m).square().sum(), [x, *params], allow_unused=True)
    for modes in itertools.product(MODES, repeat=3):
        y = inv.invertible_call(inv.plan(p, modes=list(modes)), x * 1, m)
        got = torch.autograd.grad(y.square().sum(), [x, *params], allow_unused=True)
        assert_all_close(got, want, **F64)


def test_inverse_of_a_plan_is_the_inverse_chain_with_the_modes_reversed() -> None:
    net, params = mixed()
    p = inv.plan(net, modes=["plain", "checkpoint", "invertible", "invertible", "plain", "checkpoint"])
    assert p.inverse.modes == tuple(reversed(p.modes)) and p.inverse.inverse is p
    z = torch.randn(B, 2 * H, dtype=torch.float64).abs() + 0.5
    ref = z.clone().requires_grad_()
    want = torch.autograd.grad(net.inverse(ref)[0].square().sum(), [ref, *params])
    zz = z.clone().requires_grad_()
    x, _ = inv.invertible_call(p.inverse, zz * 1)
    assert_all_close(torch.autograd.grad(x.square().sum(), [zz, *params]), want, **F64)


def test_whole_call_reasons_turn_invertible_blocks_into_checkpoint() -> None:
    net, params = mixed()
    p = inv.plan(net, modes=["invertible", "plain", "invertible", "checkpoint", "invertible", "plain"])
    x = torch.randn(B, 2 * H, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(sum(t.sum() for t in net(x)), [x, *params])
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), inv.explain() as report:
        h = x * 1
        out = inv.invertible_call(p, h)
    assert not freed(h) and report.freed == []
    assert "saved-tensor hooks are active" in report.kept[0][2]
    assert_all_close(torch.autograd.grad(sum(t.sum() for t in out), [x, *params]), want, **F64)


# -- explain, verify ---------------------------------------------------------------------------


def test_explain_says_why_a_plan_keeps_the_callers_input() -> None:
    net, _ = mixed()
    x = torch.randn(B, 2 * H, dtype=torch.float64, requires_grad=True)
    for first, why in [
        ("plain", "the plan runs its first block in mode 'plain'"),
        ("checkpoint", "mode='checkpoint' keeps the inputs"),
    ]:
        p = inv.plan(net, modes=[first, "invertible", "plain", *["invertible"] * 3])
        with inv.explain() as report:
            h = x * 1
            inv.invertible_call(p, h)
        assert not freed(h) and why in report.kept[-1][2]  # (reported once every block ran)
        # the blocks after the first free their inputs, but for the plain leaky ReLU (it frees
        # nothing) and the coupling after it: the ReLU's own node saved its output
        assert [name.rsplit(" ", 3)[-3] for name, _, _ in report.freed] == ["2", "5", "6"]
        assert "block 4 of 6" in report.kept[0][0]
        assert "saved it for a backward that a rebuilt value could change" in report.kept[0][2]


def test_verify_checks_the_invertible_blocks_of_a_plan_only() -> None:
    wrong = inv.invertible(lambda x: x * 2, inverse=lambda y: y / 2 + 1e-3, ladj=0)
    net = inv.chain(wrong, inv.couple(_mlp().double(), _mlp().double()))
    x = torch.randn(B, 2 * H, dtype=torch.float64, requires_grad=True)
    for modes, raises in [(["invertible", "plain"], True), (["plain", "invertible"], False)]:
        with inv.verify("raise"):
            y = inv.invertible_call(inv.plan(net, modes=modes), x * 1)
        if raises:
            with pytest.raises(inv.InvfuncError, match="rebuilt by the inverse"):
                y.sum().backward()
        else:
            y.sum().backward()


# -- the search ---------------------------------------------------------------------------------


def test_a_tighter_budget_never_gives_fewer_invertible_blocks(measured) -> None:
    p, _, _ = measured
    fastest = inv.plan(p)  # no budget: the start of the path
    budgets = sorted({total_bytes(p.profile, m) for m in itertools.product(MODES, repeat=6)}, reverse=True)
    previous = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # budgets below the least memory
        for budget in [*budgets, *(b - 1 for b in budgets)]:
            q = inv.plan(p, max_memory=budget)
            assert q.profile is p.profile and q.max_memory == budget
            if q.feasible:
                assert q.bytes_kept <= budget  # type: ignore[operator]
            if previous is not None and budget <= previous.max_memory:
                assert q.modes.count("invertible") >= previous.modes.count("invertible")
                assert q.bytes_kept <= previous.bytes_kept  # type: ignore[operator]
            previous = q
    assert fastest.modes == search(p.profile, None, None)[0]  # type: ignore[arg-type]


def test_an_infeasible_budget_gives_the_least_memory_plan_and_a_warning(measured) -> None:
    p, _, _ = measured
    least = min(total_bytes(p.profile, m) for m in itertools.product(MODES, repeat=6))
    assert least > 0  # the leaky ReLU's choice is kept in every mode but plain, whose output is kept
    with pytest.warns(UserWarning, match=r"invfunc.plan\(.*no plan keeps within max_memory=0 bytes"):
        q = inv.plan(p, max_memory=0)
    assert not q.feasible and q.bytes_kept == least
    assert "(cannot be met: the least-memory plan)" in str(q)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert inv.plan(p, max_memory=least).bytes_kept == least


def _profile(n: int, draw: st.DrawFn) -> list[BlockProfile]:
    blocks = []
    flags = st.fixed_dictionaries({m: st.booleans() for m in ORDER})
    for _ in range(n):
        saved = draw(st.fixed_dictionaries({m: st.integers(0, 50) for m in ORDER}))
        # (no subnormals: a library may have set flush-to-zero, and hypothesis then refuses them)
        time = draw(st.fixed_dictionaries({m: st.floats(0.0, 10.0, allow_subnormal=False) for m in ORDER}))
        drift = draw(st.sampled_from([0.0, 1e-6, 1.0]))
        inputs = (Input(draw(flags), draw(st.booleans())),)
        outputs = (Output(draw(st.integers(0, 100)), draw(flags), draw(flags)),)
        blocks.append(BlockProfile("b", saved, time, 0.0, 0.0, 0.0, drift, 1e-4, inputs, outputs))
    return blocks


@given(st.data())
def test_the_search_is_monotone_and_its_least_memory_plan_exact(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 5))
    profile = _profile(n, data.draw)
    allowed = [[m for m in MODES if m != "invertible" or b.drift <= b.rtol] for b in profile]
    totals = {m: total_bytes(profile, m) for m in itertools.product(*allowed)}
    least = min(totals.values())
    fastest, fits = search(profile, None, None)
    assert fits and all(m in a for m, a in zip(fastest, allowed))
    previous: tuple[str, ...] | None = None
    for budget in sorted(set(totals.values()) | {least - 1}, reverse=True):
        modes, fits = search(profile, budget, None)
        assert all(m in a for m, a in zip(modes, allowed))  # drifting blocks never "invertible"
        assert fits == (budget >= least)
        assert total_bytes(profile, modes) <= budget if fits else total_bytes(profile, modes) == least
        if previous is not None:
            assert modes.count("invertible") >= previous.count("invertible")
            assert total_bytes(profile, modes) <= total_bytes(profile, previous)
        previous = modes


def test_the_fastest_plan_within_each_budget_is_not_monotone_the_search_is() -> None:
    # two "checkpoint" blocks fit 20 bytes; at 25, "invertible" + "plain" is faster: the
    # fastest plan per budget has more "invertible" blocks under the looser budget
    out = Output(0, dict.fromkeys(ORDER, False), dict.fromkeys(ORDER, True))
    block = BlockProfile(
        "b",
        {"plain": 25, "checkpoint": 10, "invertible": 0},
        {"plain": 0.0, "checkpoint": 5.0, "invertible": 9.0},
        0.0,
        0.0,
        0.0,
        0.0,
        1e-4,
        (Input(dict.fromkeys(ORDER, False), False),),
        (out,),
    )
    profile = [block, block]

    def fastest_within(budget: int) -> tuple[str, ...]:
        fits = [m for m in itertools.product(MODES, repeat=2) if total_bytes(profile, m) <= budget]
        return min(fits, key=lambda m: sum(block.time[x] for x in m))

    assert fastest_within(20).count("invertible") < fastest_within(25).count("invertible")
    counts = [search(profile, b, None)[0].count("invertible") for b in (50, 35, 25, 20, 10, 0)]
    assert counts == sorted(counts)


def test_a_drifting_block_is_kept_out_of_invertible_mode() -> None:
    torch.manual_seed(0)
    n = 2 * H
    q1, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    w64 = q1 @ torch.diag(torch.logspace(0, -6, n, dtype=torch.float64)) @ q2.T
    w, w_inv = w64.float(), torch.linalg.inv(w64).float()
    ill = inv.invertible(lambda x: x @ w, inverse=lambda y: y @ w_inv, ladj=0)
    net = inv.chain(inv.couple(_mlp(), _mlp()), ill, inv.couple(_mlp(), _mlp()))
    x = torch.randn(64, n, requires_grad=True)
    with pytest.warns(UserWarning, match="no plan keeps within max_memory=0"):
        p = inv.plan(net, x, max_memory=0, repeat=1)
    assert p.profile[1].drift > 1e-4 > max(p.profile[0].drift, p.profile[2].drift)
    assert p.modes[1] != "invertible" and p.modes[2] == "invertible"
    assert "(too much)" in str(p).splitlines()[5]  # the headline, the header, the rule, block 1
    allowed = inv.plan(p, max_memory=0, max_drift=math.inf)
    assert allowed.modes[1:] == ("invertible", "invertible") and allowed.bytes_kept == 0


# -- measuring ----------------------------------------------------------------------------------


def test_measuring_leaves_the_callers_state_alone() -> None:
    torch.manual_seed(0)
    bn = torch.nn.Sequential(torch.nn.Linear(H, H), torch.nn.BatchNorm1d(H))
    norm = ops.actnorm(2 * H)
    dropout = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(H, H))
    net = inv.chain(norm, inv.couple(bn, dropout))
    module = inv.as_module(net)
    for t in module.parameters():
        t.grad = torch.full_like(t, 7.0)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    grads = {id(t): t.grad for t in module.parameters()}
    x = torch.randn(B, 2 * H, requires_grad=True)
    x_before = x.clone()
    rng = torch.get_rng_state()
    with inv.explain() as report, inv.verify("raise"):
        p = inv.plan(net, x, repeat=1)
    assert report.freed == report.kept == report.drift == []
    assert torch.equal(torch.get_rng_state(), rng)
    after = module.state_dict()
    assert not bool(after["blocks.0.module.initialized"])  # ActNorm not initialised
    assert all(torch.equal(after[k], v) for k, v in state.items())  # running stats, parameters
    assert all(t.grad is grads[id(t)] and bool((t.grad == 7).all()) for t in module.parameters())
    assert x.grad is None and torch.equal(x, x_before)
    assert p.profile[0].drift < 1e-5  # measured initialised, as the first call would


def test_under_inference_mode_measuring_is_refused() -> None:
    net, _ = mixed()
    with torch.inference_mode(), pytest.raises(inv.InvfuncError, match="inference_mode"):
        inv.plan(net, torch.randn(B, 2 * H, dtype=torch.float64))


def test_the_table_names_blocks_modes_bytes_times_and_drift(measured) -> None:
    p, _, _ = measured
    text = str(p)
    head, columns = text.splitlines()[:2], text.splitlines()[2]
    assert head[0].startswith("plan: 6 block(s); no budget, max_drift per dtype")
    assert "kept between forward and backward:" in head[1] and "a step:" in head[1]
    for word in ("block", "mode", "kept plain", "checkpoint", "invertible", "forward", "inverse", "drift"):
        assert word in columns
    rows = text.splitlines()[4:]
    assert len(rows) == 6 and all(m in row for m, row in zip(p.modes, rows))
    assert "<lambda>, block 2 of 6" in rows[1]
    assert repr(p).startswith("Plan(chain(") and str(inv.plan(p, modes=["plain"] * 6)).count("|") > 6


# -- the budget, measured independently ----------------------------------------------------------


@pytest.fixture(scope="module")
def bench():
    with script(BENCH / "plan.py", "bench") as module:
        yield module


@pytest.mark.slow
def test_the_budget_holds_in_a_child_process(bench, tmp_path: Path) -> None:
    # what a training step holds between its forward and its backward, measured as the growth
    # of the child's RSS over the forward (invfunc._measure's allocator setting returns freed
    # memory to the OS), less that of all invertible, which holds the output alone
    sizes = {"depth": 1, "batch": 256, "hidden": 256}  # a stream of 512 KiB
    torch.manual_seed(0)
    net, _ = bench.network(sizes["depth"], sizes["hidden"])
    x = torch.randn(sizes["batch"], 2 * sizes["hidden"]).requires_grad_()
    fastest = inv.plan(net, x, repeat=1)
    budget = total_bytes(fastest.profile, ["checkpoint"] * len(fastest.modes)) // 2
    p = inv.plan(fastest, max_memory=budget)
    assert p.feasible and "invertible" in p.modes and p.modes[2] != "invertible"  # (the drifting block)
    held, peak = {}, {}
    for config in ("plain", "invertible", "plan"):
        rss = tmp_path / f"{config}.jsonl"
        options = {"config": config, **sizes, "modes": list(p.modes), "rss_file": str(rss)}
        m = measure("plan:build", options=options, steps=1, path=[str(BENCH)], timeout=300)
        held[config], peak[config] = bench.held_mib(rss, 1) * 2**20, m.peak_mib * 2**20
    slack = 192 * 1024  # pages, and the allocator's own (seen: up to 124 KiB from run to run)
    assert held["plain"] - held["invertible"] > 4 * budget  # the budget binds
    assert held["plan"] - held["invertible"] <= budget + slack
    assert abs(held["plan"] - held["invertible"] - p.bytes_kept) <= slack  # as predicted
    assert peak["plan"] < peak["plain"]


def test_the_benchmark_runs_and_reports_the_plan(bench, tmp_path: Path) -> None:
    tiny = ["--depths", "1", "--batch", "8", "--hidden", "16", "--steps", "1"]
    assert bench.main([*tiny, "--out", str(tmp_path)]) == 0
    blob = json.loads((tmp_path / "plan.json").read_text())
    rows = {r["config"]: r for r in blob["results"]}
    assert list(rows) == list(bench.CONFIGS) and rows["plan"]["grads_match"]
    modes = blob["plans"]["1"]["modes"]
    assert modes[2] != "invertible"  # the drifting block
    assert blob["plans"]["1"]["predicted_bytes"]["plan"] <= blob["plans"]["1"]["budget_bytes"]
    assert "| invfunc.plan " in (tmp_path / "plan.md").read_text()


def _mlp4() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4)).double()


def test_a_boundary_after_a_plain_block_is_freed_again_after_its_backward() -> None:
    """A plain block's output, freed by the invertible block after it and refilled in that
    block's backward, is freed again once that backward is done (no block of invfunc made
    it, so no producer would; its producer, a Linear, saved none of it): the backward does
    not hold it until the graph dies. (A producer that saved its result, as exp does, keeps
    it: the every-mix test above runs one.)"""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8).double()
    first = inv.invertible(
        lambda x: lin(x), inverse=lambda y: torch.linalg.solve(lin.weight, (y - lin.bias).T).T
    )
    net = inv.chain(first, inv.couple(_mlp4(), _mlp4()), inv.couple(_mlp4(), _mlp4()))
    p = inv.plan(net, modes=["plain", "invertible", "invertible"])
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    y = inv.invertible_call(p, x)
    nodes, stack, seen = [], [y.grad_fn], set()
    while stack:
        n = stack.pop()
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        nodes += [n] if getattr(n, "state", None) is not None else []
        stack.extend(f for f, _ in n.next_functions)
    handles = [h for n in nodes for h in n.state.handles or () if h is not None]
    assert len(handles) == 2 and all(h.freed for h in handles)
    (g,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    assert all(h.freed for h in handles)  # both again: the second by its producer, the first by itself
    torch.testing.assert_close(g, torch.autograd.grad(net(x).sum(), x)[0], rtol=1e-10, atol=1e-12)
