"""Benchmark ``invfunc.plan`` on a mixed network against the uniform policies.

Usage::

    python benchmarks/plan.py                                   # D = 4 8, the defaults below
    python benchmarks/plan.py --rounds 3 --steps 3              # paired rounds (docs/benchmarks.md)
    python benchmarks/plan.py --depths 1 --batch 16 --hidden 32 --steps 1 --out /tmp/p   # smoke test
    python benchmarks/plan.py --replot benchmarks/results/plan.json   # redraw the plot only

The network: D pairs of blocks, then one drifting block, then D pairs again, on an input
(B, 2H), float32, one thread per child process:

- "cheap to store" ``couple(Linear(H, H), Linear(H, H))``: plain autograd keeps the
  input and half a stream more (``y1``, read by G), and the recompute, two matmuls of
  (B, H) by (H, H), is the block's whole cost;
- "costly to store" ``couple(S, S)``, ``S`` = 8 elementwise layers ``h -> a * silu(h)``
  (``a`` a learned scale per feature): plain autograd keeps 8 half streams per branch for
  a cheap recompute;
- the drifting block ``x @ W + b``, ``W`` a fixed random matrix with singular values from
  1 to 1e-6 (condition number 1e6): in float32 its inverse ``(y - b) @ W^-1`` rebuilds the
  input with a relative error near 1e-2, far past invfunc.verify's 1e-4.

Configurations: ``plain``, ``checkpoint`` and ``invertible`` run ``invertible_call(net, x,
mode=...)``: the uniform policies; ``plan`` runs ``invertible_call(plan, x)``, the plan
made in this process by ``invfunc.plan(net, x, max_memory=budget)`` (the modes go to every
child, so all rounds run the same plan). The budget, unless ``--budget-mib``, is what the
uniform checkpoint policy keeps (from the plan's measurements): the question is whether
the plan is faster than checkpointing at no more memory. Every (depth, configuration)
runs in its own child process through ``invfunc._measure.measure`` (NOTE [How a step is
measured] there), driven by ``benchmarks/run.py``'s ``run_all`` (plain first, ``--rounds``
paired rounds). The plan is measured in this process under the children's allocator
setting (``MALLOC_MMAP_THRESHOLD_=65536``, which makes every fresh tensor fault its pages
in): run as a script, it restarts itself with it. Gradients: besides the checksum, the
largest difference from plain autograd's relative to the largest gradient, over every
parameter and the input. Writes ``plan.md``, ``plan.json`` and ``plan.png`` into ``--out`` (default
``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import invfunc as inv  # noqa: E402
import run as R  # noqa: E402
from invfunc._measure import Workload, _status_kib, markdown_table  # noqa: E402
from invfunc._plan import total_bytes  # noqa: E402

CONFIGS = ("plain", "checkpoint", "invertible", "plan")
LABELS = {
    "plain": "all plain",
    "checkpoint": "all checkpoint",
    "invertible": "all invertible",
    "plan": "invfunc.plan",
}
DEFAULTS = {"depths": (4, 8), "batch": 128, "hidden": 1024, "steps": 3}
#: Elementwise layers per branch of a "costly to store" block.
LAYERS = 8
#: Singular values of the drifting block's matrix run from 1 to this.
SMALLEST = 1e-6
TITLE = "Planning modes: a mixed network"
_MiB = 1024.0 * 1024.0


# -- the network ----------------------------------------------------------------------------


class _Elementwise(nn.Module):
    """``LAYERS`` layers ``h -> a * silu(h)``: cheap to compute, costly to store."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scales = nn.ParameterList(nn.Parameter(torch.full((width,), 0.9)) for _ in range(LAYERS))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for a in self.scales:
            h = a * nn.functional.silu(h)
        return h


def _linear(width: int) -> nn.Linear:
    layer = nn.Linear(width, width)
    with torch.no_grad():
        layer.weight.mul_(0.5)  # the stream grows little over depth
    return layer


def _drifting(width: int) -> tuple[inv.Invertible, list[torch.Tensor]]:
    """``x @ W + b`` with an ill-conditioned fixed ``W``, and its learned bias."""
    q1, _ = torch.linalg.qr(torch.randn(width, width, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(width, width, dtype=torch.float64))
    s = torch.logspace(0, math.log10(SMALLEST), width, dtype=torch.float64)
    w64 = q1 @ torch.diag(s) @ q2.T
    w, w_inv = w64.float(), torch.linalg.inv(w64).float()
    bias = nn.Parameter(torch.zeros(width))

    def affine(x: torch.Tensor) -> torch.Tensor:
        return x @ w + bias

    def unaffine(y: torch.Tensor) -> torch.Tensor:
        return (y - bias) @ w_inv

    return inv.invertible(affine, inverse=unaffine, ladj=0), [bias]


def network(depth: int, hidden: int) -> tuple[inv.Invertible, list[torch.Tensor]]:
    """The mixed network (see the module's docstring) and its parameters, in order."""
    blocks: list[inv.Invertible] = []
    params: list[torch.Tensor] = []

    def pairs() -> None:
        for _ in range(depth):
            cheap = inv.couple(_linear(hidden), _linear(hidden))
            costly = inv.couple(_Elementwise(hidden), _Elementwise(hidden))
            blocks.extend([cheap, costly])
            params.extend(p for b in (cheap, costly) for m in (b.F, b.G) for p in m.parameters())  # type: ignore[attr-defined]

    pairs()
    drift, bias = _drifting(2 * hidden)
    blocks.append(drift)
    params.extend(bias)
    pairs()
    return inv.chain(*blocks), params


def build(
    *,
    config: str,
    depth: int,
    batch: int,
    hidden: int,
    modes: Sequence[str] | None = None,
    rss_file: str | None = None,
    device: str = "cpu",
) -> Workload:
    """The builder ``invfunc._measure.measure`` runs in the child process (``"plan:build"``).

    With ``rss_file``, every step appends ``[VmRSS before, VmRSS after]`` its forward (KiB)
    to that file: the growth is what the forward leaves held for the backward, the output
    included (freed memory goes back to the OS under the harness's allocator setting)."""
    net, params = network(depth, hidden)
    data = torch.randn(batch, 2 * hidden)
    if config == "plan":
        if modes is None:
            raise ValueError("plan:build: config 'plan' needs the modes chosen in the parent")
        planned = inv.plan(net, modes=list(modes))
        forward = lambda x: inv.invertible_call(planned, x)  # noqa: E731
    elif config in CONFIGS:
        forward = lambda x: inv.invertible_call(net, x, mode=config)  # noqa: E731
    else:
        raise ValueError(f"unknown config {config!r}; expected one of {', '.join(CONFIGS)}")
    if rss_file is None:
        return Workload(forward, params, data)

    def probed(x: torch.Tensor) -> torch.Tensor:
        before = _status_kib("VmRSS")
        y = forward(x)
        after = _status_kib("VmRSS")
        with open(rss_file, "a") as f:
            f.write(json.dumps([before, after]) + "\n")
        return y  # type: ignore[no-any-return]

    return Workload(probed, params, data)


def held_mib(rss_file: Path, warmup: int) -> float:
    """RSS growth over the forward of the first step after the warm-up, in MiB."""
    lines = rss_file.read_text().splitlines()
    before, after = json.loads(lines[warmup])
    return float(after - before) / 1024.0


def make_plan(args: argparse.Namespace, depth: int) -> inv.Plan:
    """The plan for ``depth``, measured here on the children's weights and data (same seed)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    net, _ = network(depth, args.hidden)
    x = torch.randn(args.batch, 2 * args.hidden).requires_grad_()
    fastest = inv.plan(net, x)
    n = len(fastest.modes)
    budget = (
        args.budget_mib * _MiB
        if args.budget_mib is not None
        else total_bytes(fastest.profile, ["checkpoint"] * n)
    )  # type: ignore[arg-type]
    return inv.plan(fastest, max_memory=budget)


# -- running -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEFAULTS["depths"]), help="pairs D")
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="batch size B")
    parser.add_argument("--hidden", type=int, default=DEFAULTS["hidden"], help="half width H")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps (default 1)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole table this many times (every other round in reverse order); ratios are "
        "medians over rounds of ratios within a round (default 1)",
    )
    parser.add_argument("--budget-mib", type=float, help="max_memory of the plan (default: all checkpoint's)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS), metavar="CONFIG")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output folder")
    parser.add_argument("--note", default="", help="a line of free text for the report (the machine's load)")
    args = parser.parse_args(argv)
    args.depths = sorted(set(args.depths))
    args.configs = sorted(dict.fromkeys(["plain", *args.configs]), key=CONFIGS.index)
    if min(args.depths) < 1 or min(args.batch, args.hidden, args.steps, args.warmup, args.rounds) < 1:
        parser.error("depths, batch, hidden, steps, warmup and rounds must be at least 1")
    args.device = "cpu"  # the plan's measurements and the children's steps run on the CPU
    args.workload = "plan"
    return args


def run_one(args: argparse.Namespace, depth: int, config: str, grads: Path) -> dict[str, Any]:
    """Measure one configuration at one depth; a row of the results."""
    row: dict[str, Any] = {"config": config, "depth": depth, "status": "ok"}
    options: dict[str, Any] = {"config": config, "depth": depth, "batch": args.batch, "hidden": args.hidden}
    if config == "plan":
        options["modes"] = list(args.plans[depth].modes)
    rss = grads.with_name(f"rss-{config}-{depth}.jsonl")
    rss.unlink(missing_ok=True)
    options["rss_file"] = str(rss)
    row = R.measure_row(args, row, "plan:build", options, grads)
    if row["status"] == "ok":
        row["held_mib"] = held_mib(rss, args.warmup)
    rss.unlink(missing_ok=True)
    return row


def compare(row: dict[str, Any], ref: dict[str, Any], ref_grads: Path, grads: Path) -> None:
    """``run.py``'s ratios and gradient checks, and the largest gradient difference relative to
    the largest gradient of plain autograd (``grad_rel``)."""
    R._compare(row, ref, ref_grads, grads)
    ga: list[torch.Tensor] = torch.load(ref_grads, weights_only=True)
    scale = max(float(g.abs().max()) for g in ga if g.numel())
    row["grad_rel"] = row["grad_diff"] / scale if scale > 0 else math.nan


def predicted(p: inv.Plan, config: str) -> int:
    """Bytes kept between forward and backward under ``config``, from ``p``'s measurements."""
    modes = p.modes if config == "plan" else [config] * len(p.modes)
    return total_bytes(p.profile, modes)  # type: ignore[arg-type]


def versus(rows: list[dict[str, Any]], depth: int, config: str) -> float | None:
    """The plan's time over ``config``'s, the median over rounds of the ratio in each round."""
    by = {r["config"]: r for r in rows if r["depth"] == depth and r["status"] == "ok"}
    if "plan" not in by or config not in by:
        return None
    pairs = zip(by["plan"]["round_ms"], by[config]["round_ms"])
    ratios = [a / b for a, b in pairs if a is not None and b is not None]
    return statistics.median(ratios) if ratios else None


# -- reporting -----------------------------------------------------------------------------


def report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    """The Markdown report: the plans, a summary per depth, the plan against each uniform
    policy, then every row in detail."""
    by = {(r["config"], r["depth"]): r for r in rows}
    ds = args.depths
    summary = []
    for c in args.configs:
        summary.append(
            [
                LABELS[c],
                *(_kept(by, c, d, args.plans[d]) for d in ds),
                *(R._cell(by[c, d], "peak_mib", ".1f") for d in ds),
                *(R._cell(by[c, d], "time_ratio", ".2f") for d in ds),
                *(_grads(by[c, d]) for d in ds),
            ]
        )
    header = ["config"]
    for title in ("kept MiB: RSS / predicted", "peak MiB", "time / plain", "gradients"):
        header += [f"{title} D={d}" if i == 0 else f"D={d}" for i, d in enumerate(ds)]
    against = []
    for c in (c for c in args.configs if c != "plan"):
        for d in ds:
            q = versus(rows, d, c)
            plan_row, row = by.get(("plan", d)), by[c, d]
            if q is None or plan_row is None or plan_row["status"] != "ok" or row["status"] != "ok":
                continue
            peak = f"{plan_row['peak_mib'] / row['peak_mib']:.2f}" if row["peak_mib"] > 0 else "-"
            against.append([LABELS[c], d, f"{q:.2f}", peak, _verdict(args, d, c, q)])
    cells = [("peak_mib", ".1f"), ("step_ms", ".1f"), ("time_ratio", ".2f"), ("loss", ".6g")]
    cells += [("checksum", ".10g"), ("grad_diff", ".1e"), ("grad_rel", ".1e")]
    rounds = args.rounds > 1
    detail_header = ["config", "D", "peak MiB", "ms / step", "time / plain", "loss", "grad checksum"]
    detail_header += ["max grad diff", "relative", "grads", *(["rounds (time / plain)"] if rounds else [])]
    detail = R.detail_rows(by, args.configs, ds, LABELS, cells, rounds)
    env = R.environment(argparse.Namespace(configs=[]))
    lines = [
        f"# {TITLE}",
        "",
        f"D pairs of blocks, a drifting block, D pairs again, on an input (B, 2H) with B={args.batch}, "
        f"H={args.hidden}: each pair a 'cheap to store' couple(Linear, Linear) and a 'costly to store' "
        f"couple(S, S), S = {LAYERS} layers h -> a * silu(h); the drifting block x @ W + b, W of "
        f"condition number {1 / SMALLEST:.0e} (see benchmarks/plan.py).",
        f"Loss y.square().mean(); float32; cpu; {args.threads} thread(s) per process; time = median of "
        f"{args.steps} steps after {args.warmup} warm-up step(s)"
        + (
            f"; {args.rounds} paired rounds (every other one in reverse order), time / plain the median "
            "of the rounds' ratios"
            if rounds
            else ""
        )
        + "; peak = growth of peak RSS (VmHWM) during one step. 'kept MiB' = bytes held between "
        "forward and backward beyond parameters, the input and the output: measured as the growth of "
        "RSS over the forward less all invertible's (which holds the output alone), and as the plan's "
        "measurements predict it. The peak adds the backward's transients: a block's recompute (a "
        "coupling in checkpoint mode recomputes F and G at once; invertible mode one at a time).",
        f"torch {env['torch']}, Python {env['python']}, {env['machine']}, {env['date']}. The machine is "
        "shared with other work: times drift between runs; the ratios are taken within each round.",
        *([args.note] if args.note else []),
        *(
            [f"Host load average (1, 5, 15 min) at the start {args.load[0]}, at the end {args.load[-1]}."]
            if getattr(args, "load", None) and None not in args.load
            else []
        ),
        "",
        *_plans(args),
        "",
        markdown_table(header, summary),
        "",
        "The plan against each uniform policy: its time over the policy's (median over rounds of the "
        "ratio in each round), its peak over the policy's.",
        "",
        markdown_table(
            ["uniform policy", "D", "plan time / policy's", "plan peak / policy's", "verdict"], against
        ),
        "",
        "Gradients: 'match' = the checksum (sum of |grad| over every parameter and the input after the "
        f"first step) within {R.CHECKSUM_RTOL:g} relative of plain autograd's; 'relative' = the largest "
        "difference from plain autograd's gradients over the largest of them.",
        "",
        markdown_table(detail_header, detail),
    ]
    errors = R.error_lines(rows, LABELS)
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines) + "\n"


def _kept(by: dict[tuple[str, int], dict[str, Any]], config: str, depth: int, p: inv.Plan) -> str:
    """Bytes held between forward and backward: measured (RSS growth over the forward less
    all invertible's, which holds the output alone) / predicted by the plan's measurements."""
    row, base = by[config, depth], by.get(("invertible", depth))
    ok = row["status"] == "ok" and base is not None and base["status"] == "ok"
    measured = f"{row['held_mib'] - base['held_mib']:.1f}" if ok else "-"  # type: ignore[index]
    return f"{measured} / {predicted(p, config) / _MiB:.1f}"


def _grads(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return row["status"]
    if row.get("grads_match") is None:
        return "-"
    return f"{'match' if row['grads_match'] else 'OFF'}, {row['grad_rel']:.0e} relative"


def _verdict(args: argparse.Namespace, depth: int, config: str, q: float) -> str:
    p = args.plans[depth]
    over = predicted(p, config) > (p.max_memory or math.inf)
    wrong = config == "invertible" and any(b.drift > b.rtol for b in p.profile)
    why = (
        "is over the budget"
        if over
        else "rebuilds a block past max_drift"
        if wrong
        else "is within the budget"
    )
    return f"{'faster' if q < 1 else 'slower'}; the policy {why}"


def _plans(args: argparse.Namespace) -> list[str]:
    out = []
    for d in args.depths:
        p = args.plans[d]
        out += [
            f"D={d}: budget {p.max_memory / _MiB:.2f} MiB; the plan (measured in the parent process):",
            "",
            "```text",
            str(p),
            "```",
        ]
    return out


def plot(args: argparse.Namespace, rows: list[dict[str, Any]], path: Path) -> str:
    """Peak memory and time against D, one line per configuration (``run.py``'s plot)."""
    title = f"{TITLE}, B={args.batch}, H={args.hidden}"
    return R.plot(args, rows, path, labels=LABELS, title=title, xlabel="D (pairs of blocks on each side)")


def replot(path: Path) -> str:
    """Draw ``plan.png`` again from a saved ``plan.json`` (no run)."""
    return R.redraw(path, plot)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if R.replotted(argv, replot):
        return 0
    args = parse_args(argv)
    args.load = [_load()]
    print(f"{TITLE}: depths {args.depths}; configs {', '.join(args.configs)}", file=sys.stderr)
    args.plans = {d: make_plan(args, d) for d in args.depths}
    for d in args.depths:
        print(f"D={d}: {', '.join(args.plans[d].modes)}", file=sys.stderr)
    rows = R.run_all(args, measure_one=run_one, compare=compare)
    args.load.append(_load())
    text = report(args, rows)
    print(text)
    plans = {
        str(d): {
            "modes": list(p.modes),
            "budget_bytes": p.max_memory,
            "predicted_bytes": {c: predicted(p, c) for c in CONFIGS},
            "predicted_step_s": p.step_time,
            "table": str(p),
        }
        for d, p in args.plans.items()
    }
    blob = {
        "workload": "plan",
        "settings": R.settings(args, skip=["plans"]),
        "environment": R.environment(argparse.Namespace(configs=[])),
        "plans": plans,
        "results": rows,
    }
    R.save(args.out, "plan", text, blob, lambda png: plot(args, rows, png))
    bad = [
        r
        for r in rows
        if r["status"] == "error" or (r["config"] != "invertible" and r.get("grads_match") is False)
    ]
    return 1 if bad else 0


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


if __name__ == "__main__":
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # measure the plan as the children run
        os.execve(
            sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        )
    raise SystemExit(main())
