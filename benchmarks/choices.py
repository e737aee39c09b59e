"""What replaying discrete choices costs, and what it buys (NOTE [Discrete choices]).

Usage::

    python benchmarks/choices.py                     # every part
    python benchmarks/choices.py --part cost         # time and memory, transformer and LSH workloads
    python benchmarks/choices.py --part reformer     # reformer-pytorch's Reformer (pip install
                                                     # --no-deps reformer-pytorch==1.4.4 einops
                                                     # axial-positional-embedding product-key-memory
                                                     # local-attention)
    python benchmarks/choices.py --part routing      # a reversible top-1 mixture of experts

Part ``cost``: the transformer and LSH workloads of ``workloads.py`` (one
``invertible_call`` over the chain, float32, one thread), each configuration in its own child
process (``invfunc._measure.measure``) in paired rounds: plain autograd, checkpointing,
invfunc as it is ("replay"), and invfunc with choices neither kept nor replayed and no
recompute checksums ("off": what invfunc did before choices were replayed). Time / plain is
the median over rounds of each round's ratio; the bytes kept per call for choices and
checksums are counted in this process from the blocks' states.

Parts ``reformer`` and ``routing``: gradients of a float32 training step against plain
autograd (relative L2 error over the input and every parameter), with choices replayed and
with them off, over several seeds; the choices the replay put back because the recompute
would have chosen otherwise (``explain().flipped``) and the warnings of the recompute check.

Writes ``choices.md`` and ``choices.json`` into ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import invfunc as inv  # noqa: E402
import workloads as W  # noqa: E402
from invfunc import _choices, _replay  # noqa: E402
from invfunc._measure import Workload, measure  # noqa: E402


@contextlib.contextmanager
def replay_off() -> Iterator[None]:
    """Choices neither kept nor replayed, no recompute checksums: the engine before them."""
    choice_of, is_choice, supports = _replay.choice_of, _replay.is_choice, _choices.Checksum.supports
    _replay.choice_of = lambda *a: None  # type: ignore[assignment]
    _replay.is_choice = lambda *a: False  # type: ignore[assignment]
    _choices.Checksum.supports = staticmethod(lambda t: False)  # type: ignore[method-assign]
    try:
        yield
    finally:
        _replay.choice_of, _replay.is_choice = choice_of, is_choice
        _choices.Checksum.supports = staticmethod(supports)  # type: ignore[method-assign]


def build(*, replay: bool, **options: Any) -> Workload:
    """The child's builder: ``workloads.build``, with the choices off unless ``replay``."""
    if not replay:
        replay_off().__enter__()  # for the life of the child process
    return W.build(**options)


# -- part "cost" --------------------------------------------------------------------------


def kept_bytes(workload: str, depth: int, batch: int, hidden: int) -> dict[str, int]:
    """Bytes one call keeps for choices and checksums, and one activation's bytes."""
    torch.manual_seed(0)
    wl = W.build(workload=workload, config="invfunc", depth=depth, batch=batch, hidden=hidden)
    x = wl.data.clone().requires_grad_()
    with inv.explain() as report:
        y = wl.model(x)
    states, stack, seen = [], [y.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        state = getattr(node, "state", None)
        if state is not None:
            states.append(state)
        stack.extend(fn for fn, _ in node.next_functions)
    sums = sum(c.nbytes for s in states for cs in (s.checksums or {}).values() for c in cs if c is not None)
    return {
        "choices": sum(b for _, _, b in report.choices),
        "checksums": sums,
        "activation": x.numel() * x.element_size(),
    }


def cost(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for workload in ("transformer", "lsh"):
        for depth in args.depths:
            opts = {"workload": workload, "depth": depth, "batch": 16, "hidden": 128}
            configs: list[tuple[str, dict[str, Any]]] = [
                ("plain", {"config": "plain", "replay": True}),
                ("checkpoint", {"config": "checkpoint", "replay": True}),
                ("invfunc, choices off", {"config": "invfunc", "replay": False}),
                ("invfunc, choices replayed", {"config": "invfunc", "replay": True}),
            ]
            ratios: dict[str, list[float]] = {name: [] for name, _ in configs}
            peaks: dict[str, list[float]] = {name: [] for name, _ in configs}
            for r in range(args.rounds):
                order = configs if r % 2 == 0 else [configs[0], *reversed(configs[1:])]
                got = {}
                for name, extra in order:
                    got[name] = measure(
                        "choices:build", options={**opts, **extra}, steps=args.steps, path=[str(HERE)]
                    )
                    print(f"  {workload} D={depth} round {r + 1}: {name} {got[name].ms:.0f} ms", flush=True)
                for name in got:
                    ratios[name].append(got[name].step_s / got["plain"].step_s)
                    peaks[name].append(got[name].peak_mib)
            kept = kept_bytes(workload, depth, 16, 128)
            for name, _ in configs:
                rows.append(
                    {
                        "part": "cost",
                        "workload": workload,
                        "depth": depth,
                        "config": name,
                        "time_over_plain": statistics.median(ratios[name]),
                        "rounds": ratios[name],
                        "peak_mib": statistics.median(peaks[name]),
                        **({"kept_bytes": kept} if name.endswith("replayed") else {}),
                    }
                )
    return rows


# -- parts "reformer" and "routing" -----------------------------------------------------------


def _rel(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    num = sum(float((a - b).double().norm() ** 2) for a, b in zip(got, want))
    return float((num / sum(float(b.double().norm() ** 2) for b in want)) ** 0.5)


def _grads(
    net: inv.Invertible, params: list[torch.Tensor], x: torch.Tensor, seed: int, mode: str
) -> list[torch.Tensor]:
    torch.manual_seed(seed)  # the same random draws in every run
    h = x.clone().requires_grad_()
    y = inv.invertible_call(net, h * 1, mode=mode)
    return list(torch.autograd.grad(y.square().mean(), [h, *params]))


def _gradient_study(
    name: str, make: Callable[[int], tuple[inv.Invertible, list[torch.Tensor], torch.Tensor]], seeds: int
) -> list[dict[str, Any]]:
    rows = []
    for seed in range(1, seeds + 1):
        net, params, x = make(seed)
        t = time.perf_counter()
        want = _grads(net, params, x, seed, "plain")
        t_plain = time.perf_counter() - t
        row: dict[str, Any] = {"part": name, "seed": seed}
        for label, region in (("replayed", contextlib.nullcontext), ("off", replay_off)):
            with region(), inv.explain() as report, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t = time.perf_counter()
                got = _grads(net, params, x, seed, "invertible")
                elapsed = time.perf_counter() - t
            row[label] = {
                "rel_error": _rel(got, want),
                "flipped": sum(n for _, n in report.flipped),
                "warnings": sum(issubclass(w.category, inv.InvertibilityWarning) for w in caught),
                "kept_choice_bytes": sum(b for _, _, b in report.choices),
                "time_over_plain": elapsed / t_plain,
            }
        print(f"  {name} seed {seed}: {row}", flush=True)
        rows.append(row)
    return rows


def _reformer(seed: int) -> tuple[inv.Invertible, list[torch.Tensor], torch.Tensor]:
    """reformer-pytorch 1.4.4's Reformer, its reversible stack run as one invertible call
    over its own f and g (PreNorm(LSHSelfAttention), PreNorm(Chunk(FeedForward)))."""
    from reformer_pytorch import Reformer

    torch.manual_seed(seed)
    model = Reformer(dim=128, depth=24, heads=4, bucket_size=64, n_hashes=4, ff_chunks=1).train()
    net = inv.chain(*(inv.couple(b.f.net, b.g.net, dim=-1) for b in model.layers.blocks))
    x = torch.randn(8, 512, 128)
    return net, list(model.parameters()), torch.cat([x, x], -1)  # Reformer's own input to its stack


class _Top1FFN(nn.Module):
    """Pre-LayerNorm feed-forward mixture of experts with top-1 routing (Switch style)."""

    def __init__(self, width: int, experts: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.router = nn.Linear(width, experts)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
            for _ in range(experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x).reshape(-1, x.shape[-1])
        probs = self.router(h).softmax(-1)
        gate, k = probs.max(-1)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            rows = (k == e).nonzero().squeeze(1)
            out.index_add_(0, rows, expert(h[rows]) * gate[rows, None])
        return out.view_as(x)


def _routing(seed: int) -> tuple[inv.Invertible, list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(seed)
    pairs = [(W._Attention(128, 4), _Top1FFN(128, 8)) for _ in range(24)]
    net = inv.chain(*(inv.couple(F, G, dim=-1) for F, G in pairs))
    params = [p for pair in pairs for m in pair for p in m.parameters()]
    return net, params, torch.randn(8, 512, 256)


# -- report ---------------------------------------------------------------------------------


def markdown(rows: list[dict[str, Any]]) -> str:
    out = []
    cost_rows = [r for r in rows if r["part"] == "cost"]
    if cost_rows:
        out += [
            "| workload | D | configuration | time / plain | peak MiB "
            "| kept: choices / checksums / one activation |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in cost_rows:
            k = r.get("kept_bytes")
            kept = f"{k['choices']} / {k['checksums']} / {k['activation']} B" if k else ""
            out.append(
                f"| {r['workload']} | {r['depth']} | {r['config']} | {r['time_over_plain']:.2f} "
                f"| {r['peak_mib']:.1f} | {kept} |"
            )
        out.append("")
    study = [r for r in rows if r["part"] != "cost"]
    if study:
        out += [
            "| model | seed | replayed: error / flips put back / warnings | off: error / warnings |",
            "| --- | --- | --- | --- |",
        ]
        for r in study:
            a, b = r["replayed"], r["off"]
            out.append(
                f"| {r['part']} | {r['seed']} | {a['rel_error']:.1e} / {a['flipped']} / {a['warnings']} "
                f"| {b['rel_error']:.1e} / {b['warnings']} |"
            )
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("cost", "reformer", "routing"), nargs="+")
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    parts = args.part or ["cost", "reformer", "routing"]
    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    if "cost" in parts:
        rows += cost(args)
    if "reformer" in parts:
        rows += _gradient_study("reformer", _reformer, args.seeds)
    if "routing" in parts:
        rows += _gradient_study("routing", _routing, args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "argv": sys.argv[1:]}
    (args.out / "choices.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(rows)
    (args.out / "choices.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
