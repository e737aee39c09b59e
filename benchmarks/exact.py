"""Drift of exact couplings (``couple(F, G, exact=True)``) against float ones, and training.

Usage (see ``docs/exact.md``)::

    python benchmarks/exact.py                          # depths 1 8 32 128 256, 10 seeds, 200 steps
    python benchmarks/exact.py --depths 1 4 --seeds 2 --train-steps 5 --out /tmp/e    # smoke test
    python benchmarks/exact.py --replot benchmarks/results/exact.json    # redraw the plot only

Part 1, drift. A chain of D additive couplings ``y1 = x1 + F(x2); y2 = x2 + G(y1)``, F and
G ``Linear(W, W) -> Tanh -> Linear(W, W)`` (W = 8, the sharp bits' drift table), input
(B, 2W) with B = 8, loss ``y.double().square().mean()``, for every variant of
:data:`VARIANTS` and every depth, over ``--seeds`` seeds (seed s draws the weights, seed
10000 + s the input ``x``); each figure is the worst over the seeds. The exact variants
get ``x`` put on their float32 grid (multiples of ``2^-16``): an exact coupling rounds an
input that is off its grid and rebuilds the rounded one, at most ``2^-17`` off. The float
variants get ``x`` itself, as a stream off any grid in a real network. Per seed:

- *rebuilt input*: ``invertible_call(net, h, verify="warn")`` frees ``h`` (an
  intermediate) and the backward rebuilds it; ``max |h_rebuilt - h| / max |h|``.
- *round trip*: ``net.inverse(net(x))`` without grad, the same measure.
- *gradients vs plain*: the gradients (input and every parameter) of the call against a
  plain call of the same model (same dtype, same autocast; for exact variants the same
  exact model), ``max |g - g_plain| / max |g_plain|``, the largest over the tensors.
- *gradients vs float64*: the call's gradients against plain autograd of the float
  (not exact) model in float64 (the same weights and ``x``), for scale (the exact
  variants' figure includes their grid's rounding); *plain vs float64* is plain
  autograd's own distance from it.
- *bitwise*: the call's output and gradients are ``torch.equal`` to the plain call's, and
  the rebuilt input and the round trip to the input.
- *verify drift*: the largest drift :func:`invfunc.verify` recorded (``explain().drift``);
  none for exact couplings, which are not fingerprinted (their checksum replaces it).

Part 2, training. A small RevNet (``Linear(16, 2H)`` stem, ``--train-blocks`` couplings of
the same MLPs at width H, ``Linear(2H, 4)`` head) regresses a fixed random teacher network
(16 -> 64 -> 4, tanh) plus noise; full batch, Adam, ``--train-steps`` steps. The float and
the exact model start from the same weights; each is trained by plain autograd and under
:func:`invfunc.invertible_call` (the stem's output freed and rebuilt). Reported: the
training loss at a few steps, the final training and held-out losses, and whether the
call's run is bitwise the plain run of the same model (every loss and every final weight).

Every run uses ``torch.use_deterministic_algorithms(True)`` and ``--threads`` threads
(default 1), in one process. Writes ``exact.md``, ``exact.json`` and ``exact.png`` into
``--out`` (default ``benchmarks/results``). Exit status 1 if an exact variant is not
bitwise everywhere or a run failed for another reason than the exact range.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import invfunc as inv  # noqa: E402
import run as R  # noqa: E402
from invfunc._measure import markdown_table  # noqa: E402

#: name -> (label, exact, F and G under bfloat16 autocast, F and G return float32)
VARIANTS: dict[str, tuple[str, bool, bool, bool]] = {
    "float": ("float32, couple(F, G)", False, False, False),
    "exact": ("float32, couple(F, G, exact=True)", True, False, False),
    "float-bf16": ("float32 stream, F and G under bf16 autocast", False, True, False),
    "exact-bf16": ("exact, F and G under bf16 autocast", True, True, False),
    "exact-bf16-f32": ("exact, F and G under bf16 autocast, outputs cast to float32", True, True, True),
}

#: The measures of part 1, in table order: key -> row label.
MEASURES = {
    "rebuilt": "rebuilt input (freed, after backward)",
    "roundtrip": "inverse(net(x)) round trip",
    "grad_plain": "gradients vs plain autograd of the same model",
    "grad_f64": "gradients vs float64 plain autograd",
    "plain_f64": "plain autograd vs float64, for scale",
    "verify": "verify drift (explain().drift)",
}

GRID = 2.0**-16  # the float32 grid of exact=True (NOTE [Exact couplings])
TRAIN_REPORT_STEPS = (0, 10, 25, 50, 100, 150)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    parser.add_argument("--seeds", type=int, default=10, help="seeds per depth; the worst is reported")
    parser.add_argument("--batch", type=int, default=8, help="batch size B of the drift chain")
    parser.add_argument("--width", type=int, default=8, help="width W of each half of the drift chain")
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--train-steps", type=int, default=200, help="Adam steps (0: no training part)")
    parser.add_argument("--train-blocks", type=int, default=8)
    parser.add_argument("--train-width", type=int, default=32, help="width H of each half")
    parser.add_argument("--train-batch", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output folder")
    args = parser.parse_args(argv)
    args.depths = sorted(set(args.depths))
    args.variants = [v for v in VARIANTS if v in args.variants]
    if min(args.depths) < 1 or min(args.seeds, args.batch, args.width, args.threads) < 1:
        parser.error("depths, seeds, batch, width and threads must be at least 1")
    return args


# -- the models ----------------------------------------------------------------------------


def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))


class _Float32Out(nn.Module):
    """A module whose output is cast to float32 (under autocast, F's bfloat16 output)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.inner(h).float()  # type: ignore[no-any-return]


def on_grid(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x / GRID) * GRID


def chain_of(pairs: Sequence[tuple[nn.Module, nn.Module]], variant: str) -> inv.Invertible:
    """The chain of couplings of ``pairs`` as ``variant`` builds it."""
    _, exact, _, f32 = VARIANTS[variant]
    wrap: Callable[[nn.Module], nn.Module] = _Float32Out if f32 else (lambda m: m)
    return inv.chain(*[inv.couple(wrap(F), wrap(G), exact=exact) for F, G in pairs])


def autocast(variant: str) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16) if VARIANTS[variant][2] else nullcontext()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max())


def _max_rel(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    return max(_rel(g, w) for g, w in zip(got, want))


def _loss(y: torch.Tensor) -> torch.Tensor:
    return y.double().square().mean()


# -- part 1: drift -------------------------------------------------------------------------


def drift_case(args: argparse.Namespace, variant: str, depth: int, seed: int) -> dict[str, Any]:
    """Every measure of one (variant, depth, seed); ``status`` is ``"ok"`` or why not."""
    torch.manual_seed(seed)
    pairs = [(mlp(args.width), mlp(args.width)) for _ in range(depth)]
    raw = torch.randn(args.batch, 2 * args.width, generator=torch.Generator().manual_seed(10_000 + seed))
    # an exact coupling rounds its input on the way in and rebuilds the rounded one (NOTE
    # [Exact couplings], rule 5): its variants get the input already on the grid
    x = on_grid(raw) if VARIANTS[variant][1] else raw
    params = [p for F, G in pairs for m in (F, G) for p in m.parameters()]
    net = chain_of(pairs, variant)

    # float64 plain autograd of the float model: the oracle
    pairs64 = copy.deepcopy(pairs)
    for F, G in pairs64:
        F.double(), G.double()
    x64 = raw.double().requires_grad_()
    params64 = [p for F, G in pairs64 for m in (F, G) for p in m.parameters()]
    y64 = chain_of(pairs64, "float")(x64 * 1)
    ref64 = torch.autograd.grad(_loss(y64), [x64, *params64])

    try:
        xp = x.clone().requires_grad_()
        with autocast(variant):
            yp = net(xp * 1)
        plain = torch.autograd.grad(_loss(yp), [xp, *params])

        xi = x.clone().requires_grad_()
        h = xi * 1
        before = h.detach().clone()
        with inv.explain() as rep, warnings.catch_warnings():
            warnings.simplefilter("ignore", inv.InvertibilityWarning)
            with autocast(variant):
                yi = inv.invertible_call(net, h, verify="warn")
            freed = bool(rep.freed)
            got = torch.autograd.grad(_loss(yi), [xi, *params])
        rebuilt = h.detach().clone()

        with torch.no_grad(), autocast(variant):
            back = net.inverse(net(x))
    except inv.InvfuncError as e:
        if "exact=True keeps values below" in str(e):
            return {"status": "range error", "error": str(e)}
        raise
    return {
        "status": "ok",
        "freed": freed,
        "rebuilt": _rel(rebuilt, before),
        "roundtrip": _rel(back, x),
        "grad_plain": _max_rel(got, plain),
        "grad_f64": _max_rel(got, ref64),
        "plain_f64": _max_rel(plain, ref64),
        "verify": max((e for _, _, e in rep.drift), default=None),  # None: nothing fingerprinted
        "bitwise": bool(
            torch.equal(yi.detach(), yp.detach())
            and all(torch.equal(g, w) for g, w in zip(got, plain))
            and torch.equal(rebuilt, before)
            and torch.equal(back, x)
        ),
        "max_abs_output": float(yp.detach().abs().max()),
    }


def run_drift(args: argparse.Namespace, bar: Any) -> list[dict[str, Any]]:
    rows = []
    for variant in args.variants:
        for depth in args.depths:
            bar.set_description(f"drift {variant} D={depth}")
            cases = [drift_case(args, variant, depth, seed) for seed in range(args.seeds)]
            bar.update(1)
            ok = [c for c in cases if c["status"] == "ok"]
            row: dict[str, Any] = {"variant": variant, "depth": depth, "seeds": args.seeds, "ok": len(ok)}
            if len(ok) < len(cases):
                row["errors"] = sorted({c["error"] for c in cases if c["status"] != "ok"})
            if ok:
                row.update({key: _worst(c[key] for c in ok) for key in MEASURES})
                row["bitwise"] = sum(c["bitwise"] for c in ok)
                row["freed"] = all(c["freed"] for c in ok)
                row["max_abs_output"] = max(c["max_abs_output"] for c in ok)
                row["per_seed"] = {key: [c.get(key) for c in cases] for key in (*MEASURES, "bitwise")}
            rows.append(row)
    return rows


def _worst(values: Any) -> float | None:
    """The largest of ``values``, None when none was recorded."""
    return max((v for v in values if v is not None), default=None)


def exact_failures(rows: list[dict[str, Any]]) -> list[str]:
    """Exact variants that were not bitwise (zero everywhere) on every seed they ran."""
    bad = []
    for r in rows:
        if VARIANTS[r["variant"]][1] and r["ok"] and (r["bitwise"] < r["ok"] or not r["freed"]):
            bad.append(f"{r['variant']} D={r['depth']}: bitwise on {r['bitwise']} of {r['ok']} seeds")
    return bad


# -- part 2: training ----------------------------------------------------------------------


def run_training(args: argparse.Namespace, bar: Any) -> dict[str, Any]:
    """Train the float and the exact RevNet from the same weights, by plain autograd and
    under ``invertible_call``; loss curves and final losses."""
    torch.manual_seed(0)
    n_in, n_out, width = 16, 4, args.train_width
    teacher = nn.Sequential(nn.Linear(n_in, 64), nn.Tanh(), nn.Linear(64, n_out))
    with torch.no_grad():
        xs = torch.randn(2 * args.train_batch, n_in)
        ys = teacher(xs) + 0.01 * torch.randn(2 * args.train_batch, n_out)
    x_train, x_test = xs[: args.train_batch], xs[args.train_batch :]
    y_train, y_test = ys[: args.train_batch], ys[args.train_batch :]
    start = nn.ModuleDict(
        {
            "stem": nn.Linear(n_in, 2 * width),
            "pairs": nn.ModuleList(nn.ModuleList([mlp(width), mlp(width)]) for _ in range(args.train_blocks)),
            "head": nn.Linear(2 * width, n_out),
        }
    )
    runs: dict[str, Any] = {}
    for variant in ("float", "exact"):
        for how in ("plain", "invertible_call"):
            bar.set_description(f"training {variant} {how}")
            model = copy.deepcopy(start)
            net = chain_of([(F, G) for F, G in model["pairs"]], variant)  # type: ignore[misc]

            def forward(
                x: torch.Tensor, how: str = how, net: inv.Invertible = net, model: Any = model
            ) -> Any:
                h = model["stem"](x)
                h = net(h) if how == "plain" else inv.invertible_call(net, h)
                return model["head"](h)

            opt = torch.optim.Adam(model.parameters(), lr=args.lr)
            losses = []
            t0 = time.perf_counter()
            for _ in range(args.train_steps):
                opt.zero_grad()
                loss = (forward(x_train) - y_train).square().mean()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                test = float((forward(x_test) - y_test).square().mean())
                train = float((forward(x_train) - y_train).square().mean())
            runs[f"{variant} {how}"] = {
                "losses": losses,
                "final_train": train,
                "test": test,
                "seconds": seconds,
                "weights": [p.detach().clone() for p in model.parameters()],
            }
            bar.update(1)
    result: dict[str, Any] = {"runs": {}}
    for key, run in runs.items():
        variant = key.split()[0]
        plain = runs[f"{variant} plain"]
        entry = {k: v for k, v in run.items() if k != "weights"}
        entry["bitwise_plain"] = run["losses"] == plain["losses"] and all(
            torch.equal(a, b) for a, b in zip(run["weights"], plain["weights"])
        )
        entry["max_weight_diff_plain"] = max(
            float((a - b).abs().max()) for a, b in zip(run["weights"], plain["weights"])
        )
        result["runs"][key] = entry
    return result


# -- reporting -----------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    """``0`` for an exact zero (bitwise), else two significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return "0" if value == 0 else f"{value:.1e}"


def environment() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_at_start": None if load is None else [round(v, 2) for v in load],
    }


def drift_table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    by = {(r["variant"], r["depth"]): r for r in rows}
    header = ["variant", "measure", *(f"depth {d}" if i == 0 else str(d) for i, d in enumerate(args.depths))]
    body: list[list[object]] = []
    for v in args.variants:
        label = VARIANTS[v][0]
        for i, (key, name) in enumerate((*MEASURES.items(), ("bitwise", "bitwise (seeds)"))):
            cells = []
            for d in args.depths:
                r = by[v, d]
                if not r["ok"]:
                    cells.append("range error")
                elif key == "bitwise":
                    cells.append(f"{r['bitwise']} of {r['ok']}" + ("" if r["ok"] == r["seeds"] else "*"))
                else:
                    cells.append(fmt(r[key]) + ("" if r["ok"] == r["seeds"] else "*"))
            body.append([label if i == 0 else "", name, *cells])
    return markdown_table(header, body)


def training_table(args: argparse.Namespace, train: dict[str, Any]) -> str:
    steps = [s for s in TRAIN_REPORT_STEPS if s < args.train_steps]
    header = [
        "model, run by",
        *(f"loss step {s}" if i == 0 else str(s) for i, s in enumerate(steps)),
        f"final train loss ({args.train_steps} steps)",
        "held-out loss",
        "bitwise = plain",
        "max weight diff vs plain",
        "seconds",
    ]
    body = []
    for key, run in train["runs"].items():
        body.append(
            [
                key,
                *(f"{run['losses'][s]:.6g}" for s in steps),
                f"{run['final_train']:.6g}",
                f"{run['test']:.6g}",
                "yes" if run["bitwise_plain"] else "no",
                fmt(run["max_weight_diff_plain"]),
                f"{run['seconds']:.1f}",
            ]
        )
    return markdown_table(header, body)


def report(
    args: argparse.Namespace, rows: list[dict[str, Any]], train: dict[str, Any] | None, env: dict[str, Any]
) -> str:
    lines = [
        "# Exact couplings: drift and training",
        "",
        f"Chain of D couplings, F and G = Linear({args.width}, {args.width}) -> Tanh -> "
        f"Linear({args.width}, {args.width}); input ({args.batch}, {2 * args.width}), put on the float32 "
        "grid (multiples of 2^-16) for the exact variants; loss y.double().square().mean(); "
        f"worst over {args.seeds} seeds per depth; "
        "errors relative to the largest magnitude of the reference (0 = bitwise); "
        f"torch.use_deterministic_algorithms(True), {args.threads} thread(s), one process.",
        f"torch {env['torch']}, Python {env['python']}, {env['machine']} (shared with other jobs), "
        f"{env['date']}; load average at the start {env['load_average_at_start']}.",
        "",
        drift_table(args, rows),
    ]
    if any(r["ok"] < r["seeds"] for r in rows):
        lines += [
            "",
            "\\* some seeds stopped with the exact range error (below); the figure is over the others.",
        ]
    errors = sorted({e.splitlines()[0] for r in rows for e in r.get("errors", [])})
    if errors:
        lines += ["", "Range errors:", *(f"- {e}" for e in errors)]
    bad = exact_failures(rows)
    lines += [
        "",
        "verify drift '-': verify recorded nothing (exact couplings are not fingerprinted: their exact "
        "checksum, compared in every backward, replaces it).",
        "",
        "Exact variants bitwise everywhere (outputs, gradients, rebuilt input, round trip): "
        + ("yes." if not bad else "NO: " + "; ".join(bad)),
    ]
    if train is not None:
        lines += [
            "",
            "## Training",
            "",
            f"RevNet: Linear(16, {2 * args.train_width}) stem, {args.train_blocks} couplings of "
            f"Linear({args.train_width}, {args.train_width}) -> Tanh -> Linear({args.train_width}, "
            f"{args.train_width}), Linear({2 * args.train_width}, 4) head; regression of a fixed random "
            f"teacher (16 -> 64 -> 4, tanh) plus noise 0.01; batch {args.train_batch} (full batch), "
            f"held-out set of {args.train_batch}; Adam lr {args.lr:g}, {args.train_steps} steps; "
            "the float and the exact model start from the same weights. 'bitwise = plain': every "
            "loss and every final weight equal to plain autograd's run of the same model.",
            "",
            training_table(args, train),
        ]
    return "\n".join(lines) + "\n"


def plot(args: argparse.Namespace, rows: list[dict[str, Any]], path: Path) -> str:
    """The drift measures against depth, log scale; an exact zero is drawn on a floor line
    a decade below the panel's smallest nonzero figure, its tick labelled 0."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    panels = [
        ("rebuilt", "rebuilt input (freed, after backward)"),
        ("grad_plain", "gradients vs plain autograd of the same model"),
        ("grad_f64", "gradients vs float64 plain autograd"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 5.2))
    markers, sizes = "osD^v", (7, 9, 6, 5, 3)
    for ax, (key, title) in zip(axes, panels):
        ok = [r for r in rows if r["ok"]]
        nonzero = [r[key] for r in ok if r[key] > 0]
        floor = 10.0 ** (math.floor(math.log10(min(nonzero))) - 1) if nonzero else 1e-9
        zeros = [VARIANTS[r["variant"]][0] for r in ok if r[key] == 0]
        for i, v in enumerate(args.variants):
            mine = [r for r in ok if r["variant"] == v]
            ys = [r[key] if r[key] > 0 else floor for r in mine]
            ax.plot(
                [r["depth"] for r in mine],
                ys,
                marker=markers[i % len(markers)],
                ms=sizes[i % len(sizes)],  # decreasing sizes: lines at 0 stay visible one over another
                label=VARIANTS[v][0],
            )
        ax.set_yscale("log")
        if zeros:
            ax.axhline(floor, color="0.4", lw=0.8, ls="--")
            ax.annotate(
                "0: bitwise",
                (0.02, floor),
                xycoords=("axes fraction", "data"),
                xytext=(0, 5),
                textcoords="offset points",
                fontsize=8,
                color="0.3",
            )
            major = matplotlib.ticker.LogFormatterSciNotation()
            ax.yaxis.set_major_formatter(
                matplotlib.ticker.FuncFormatter(
                    lambda v, pos, floor=floor, major=major: "0" if math.isclose(v, floor) else major(v, pos)
                )
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.depths, [str(d) for d in args.depths])
        ax.set_xlabel("depth D (coupling blocks)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"relative error, worst over {args.seeds} seeds (log)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(
        f"Exact and float couplings: drift by depth (input ({args.batch}, {2 * args.width}), "
        f"F and G tanh MLPs of width {args.width}, float32 stream)"
    )
    fig.tight_layout(rect=(0, 0.09, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


def replot(path: Path) -> str:
    """Draw ``exact.png`` again from a saved ``exact.json`` (no run)."""
    return R.redraw(path, plot, "drift")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if R.replotted(argv, replot):
        return 0
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    env = environment()
    try:
        total = len(args.variants) * len(args.depths) + (4 if args.train_steps else 0)
        with R.progress(total) as bar:
            rows = run_drift(args, bar)
            train = run_training(args, bar) if args.train_steps else None
    finally:
        torch.use_deterministic_algorithms(deterministic)
    text = report(args, rows, train, env)
    print(text)
    blob = {"settings": R.settings(args), "environment": env, "drift": rows, "training": train}
    R.save(args.out, "exact", text, blob, lambda png: plot(args, rows, png))
    bad = exact_failures(rows)
    if bad:
        print("exact variants NOT bitwise: " + "; ".join(bad), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
