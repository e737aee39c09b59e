"""Benchmark invfunc side by side with plain autograd, torch checkpointing and the peers.

Usage (see BENCHMARK.md for the reference workload and the bar)::

    python benchmarks/run.py                                  # reference MLP, D = 8 32 128
    python benchmarks/run.py --workload tiny                  # per-block Python overhead
    python benchmarks/run.py --workload conv --depths 4 8     # convolutional RevNet stage
    python benchmarks/run.py --depths 2 4 --batch 256 --steps 2 --out /tmp/bench   # smoke test
    python benchmarks/run.py --replot benchmarks/results/*.json   # redraw the plots only

Every (depth, configuration) runs in its own child process through
``invfunc._measure.measure`` (NOTE [How a step is measured] there); plain autograd runs
first at each depth and is the reference for time ratios and gradient differences. Writes
``<workload>.md``, ``<workload>.json`` and ``<workload>.png`` (if matplotlib is installed)
into ``--out`` (default ``benchmarks/results``). Peers are optional: a peer that is not
installed gets a row that says so (``nox -s bench`` installs them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import workloads as W  # noqa: E402
from invfunc._measure import MeasureError, grad_difference, markdown_table, measure  # noqa: E402

#: Relative difference of the gradient checksum from plain autograd's above which a row is flagged.
CHECKSUM_RTOL = 1e-4


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=tuple(W.WORKLOADS), default="mlp")
    parser.add_argument(
        "--depths", type=int, nargs="+", help="numbers of coupling blocks (default per workload)"
    )
    parser.add_argument("--batch", type=int, help="batch size B (default per workload)")
    parser.add_argument("--hidden", type=int, help="width H of each half (default per workload)")
    parser.add_argument("--steps", type=int, help="timed steps after the warm-up; time is their median")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps (default 1)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every configuration this many times, in rounds over the whole table (every other "
        "round in reverse order); its time / plain is the median over rounds of its ratio to plain "
        "autograd's time in the same round (steadier on a shared machine; default 1)",
    )
    parser.add_argument("--configs", nargs="+", choices=W.CONFIGS, default=list(W.CONFIGS), metavar="CONFIG")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output folder")
    args = parser.parse_args(argv)
    spec = W.WORKLOADS[args.workload]
    for name in ("depths", "batch", "hidden", "steps"):
        if getattr(args, name) is None:
            setattr(args, name, spec[name])
    args.depths = sorted(set(args.depths))
    # plain first: it is the reference of every other row at the same depth
    args.configs = sorted(dict.fromkeys(args.configs), key=W.CONFIGS.index)
    if (
        min(args.depths) < 1
        or min(args.batch, args.hidden, args.steps, args.warmup, args.threads, args.rounds) < 1
    ):
        parser.error("depths, batch, hidden, steps, warmup, threads and rounds must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    return args


# -- running -------------------------------------------------------------------------------


@contextmanager
def progress(total: int) -> Iterator[Any]:
    """A tqdm bar if tqdm is installed, else one line per finished configuration."""
    try:
        from tqdm import tqdm
    except ImportError:
        yield _TextProgress(total)
        return
    with tqdm(total=total, unit="config", dynamic_ncols=True) as bar:
        yield bar


class _TextProgress:
    def __init__(self, total: int) -> None:
        self.total, self.done, self.desc, self.start = total, 0, "", time.perf_counter()

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def update(self, n: int = 1) -> None:
        self.done += n
        elapsed = time.perf_counter() - self.start
        print(
            f"[{self.done}/{self.total}] {self.desc} done ({elapsed:.0f} s elapsed)",
            file=sys.stderr,
            flush=True,
        )


def run_one(args: argparse.Namespace, depth: int, config: str, grads: Path) -> dict[str, Any]:
    """Measure one configuration at one depth; a row of the results."""
    row: dict[str, Any] = {"config": config, "depth": depth, "status": "ok"}
    reason = W.peer_status(config) or (None if W.supports(args.workload, config) else "n/a")
    if reason is not None:
        return {**row, "status": reason}
    options = {
        "workload": args.workload,
        "config": config,
        "depth": depth,
        "batch": args.batch,
        "hidden": args.hidden,
    }
    return measure_row(args, row, "workloads:build", options, grads)


def measure_row(
    args: argparse.Namespace, row: dict[str, Any], builder: str, options: dict[str, Any], grads: Path
) -> dict[str, Any]:
    """``row`` completed by measuring ``builder(**options)`` (a builder in this folder) with
    the step settings of ``args``; an error becomes ``status: "error"``."""
    try:
        m = measure(
            builder,
            options=options,
            steps=args.steps,
            warmup=args.warmup,
            seed=args.seed,
            device=args.device,
            threads=args.threads,
            grads_path=grads,
            path=[str(HERE)],
            timeout=args.timeout,
        )
    except MeasureError as e:
        return {**row, "status": "error", "error": str(e)}
    return {
        **row,
        "peak_mib": m.peak_mib,
        "cuda_peak_mib": m.cuda_peak_mib,
        "step_ms": m.ms,
        "step_ms_all": [1000.0 * t for t in m.step_times],
        "loss": m.loss,
        "checksum": m.checksum,
    }


def run_all(
    args: argparse.Namespace,
    *,
    measure_one: Callable[[argparse.Namespace, int, str, Path], dict[str, Any]] | None = None,
    compare: Callable[[dict[str, Any], dict[str, Any], Path, Path], None] | None = None,
) -> list[dict[str, Any]]:
    """Every (depth, configuration), ``--rounds`` times over the whole table: the first
    round gives memory, loss and gradients; every round adds a median step time.

    ``measure_one`` (default :func:`run_one`) measures one row and ``compare`` (default
    ``_compare``) sets its ratios and gradient differences to plain autograd's;
    ``benchmarks/flows.py`` passes its own."""
    measure_one = run_one if measure_one is None else measure_one
    compare = _compare if compare is None else compare
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="invfunc-bench-") as tmp,
        progress(args.rounds * len(args.depths) * len(args.configs)) as bar,
    ):
        for depth in args.depths:
            ref: dict[str, Any] | None = None
            reference_grads = Path(tmp, f"plain-{depth}.pt")
            for config in args.configs:
                bar.set_description(f"D={depth} {config}")
                grads = Path(tmp, f"{config}-{depth}.pt")
                row = measure_one(args, depth, config, grads)
                if config == "plain" and row["status"] == "ok":
                    ref = row
                if ref is not None and row["status"] == "ok":
                    compare(row, ref, reference_grads, grads)
                if grads != reference_grads:
                    grads.unlink(missing_ok=True)  # gradient files are the size of the parameters
                row["round_ms"] = [row["step_ms"]] if row["status"] == "ok" else []
                rows.append(row)
                bar.update(1)
            reference_grads.unlink(missing_ok=True)
        for r in range(1, args.rounds):
            for depth in args.depths:
                at_depth = [row for row in rows if row["depth"] == depth]
                # every other round in reverse order, so that no configuration is always
                # measured right after plain autograd (the host's speed drifts)
                for row in reversed(at_depth) if r % 2 else at_depth:
                    bar.set_description(f"round {r + 1} D={depth} {row['config']}")
                    if row["status"] == "ok":
                        again = measure_one(args, depth, row["config"], Path(tmp, "round.pt"))
                        # a round that failed counts as missing for this row (and, for
                        # plain autograd, for every row's ratio in that round)
                        row["round_ms"].append(again["step_ms"] if again["status"] == "ok" else None)
                    bar.update(1)
    if args.rounds > 1:
        paired_ratios(rows)
    return rows


def paired_ratios(rows: list[dict[str, Any]]) -> None:
    """Set each row's time from its rounds: ``step_ms`` is the median of the rounds' times,
    ``round_ratio`` the ratio to plain autograd's time in the same round at the same depth,
    and ``time_ratio`` the median of those ratios.

    Pairing each round with plain autograd's from the same round cancels the host's drift
    between rounds (minutes apart), which a ratio of two medians keeps.

    Examples:
        >>> rows = [
        ...     {"config": "plain", "depth": 8, "status": "ok", "round_ms": [100.0, 150.0, 100.0]},
        ...     {"config": "x", "depth": 8, "status": "ok", "round_ms": [120.0, 180.0, 130.0]},
        ... ]
        >>> paired_ratios(rows)
        >>> rows[1]["round_ratio"], rows[1]["time_ratio"], rows[1]["step_ms"]
        ([1.2, 1.2, 1.3], 1.2, 130.0)
    """
    plain = {r["depth"]: r["round_ms"] for r in rows if r["config"] == "plain" and r["status"] == "ok"}
    for row in rows:
        times = [t for t in row.get("round_ms", []) if t is not None]
        if row["status"] != "ok" or not times:
            continue
        row["step_ms"] = statistics.median(times)
        ref = plain.get(row["depth"])
        if ref is None:
            continue
        ratios = [t / p for t, p in zip(row["round_ms"], ref) if t is not None and p is not None]
        row["round_ratio"] = [round(q, 4) for q in ratios]
        if ratios:
            row["time_ratio"] = statistics.median(ratios)


def _compare(row: dict[str, Any], ref: dict[str, Any], ref_grads: Path, grads: Path) -> None:
    row["time_ratio"] = row["step_ms"] / ref["step_ms"]
    row["memory_ratio"] = row["peak_mib"] / ref["peak_mib"] if ref["peak_mib"] > 0 else math.nan
    row["grad_diff"] = grad_difference(ref_grads, grads)
    row["checksum_rel"] = abs(row["checksum"] - ref["checksum"]) / abs(ref["checksum"])
    row["grads_match"] = row["checksum_rel"] <= CHECKSUM_RTOL


# -- reporting -----------------------------------------------------------------------------


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    if row["status"] != "ok":
        return row["status"]
    value = row.get(key)
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def detail_rows(
    by: dict[tuple[str, int], dict[str, Any]],
    configs: Sequence[str],
    depths: Sequence[int],
    labels: dict[str, str],
    cells: Sequence[tuple[str, str]],
    rounds: bool,
) -> list[list[object]]:
    """The rows of a detail table: label, depth, each ``(key, format)`` of ``cells``, the
    gradient verdict and, with ``rounds``, every round's time / plain."""
    detail: list[list[object]] = []
    for d in depths:
        for c in configs:
            r = by[c, d]
            if r["status"] != "ok":
                detail.append([labels[c], d, r["status"], *["-"] * (len(cells) + rounds)])
                continue
            match = r.get("grads_match")
            detail.append(
                [
                    labels[c],
                    d,
                    *(_cell(r, key, fmt) for key, fmt in cells),
                    "-" if match is None else ("match" if match else "MISMATCH"),
                    *([" ".join(f"{q:.2f}" for q in r.get("round_ratio", [])) or "-"] if rounds else []),
                ]
            )
    return detail


def error_lines(rows: list[dict[str, Any]], labels: dict[str, str]) -> list[str]:
    """One line per failed row, its error's last line."""
    return [
        f"- {labels[r['config']]} D={r['depth']}: {r['error'].strip().splitlines()[-1]} (more in the JSON)"
        for r in rows
        if r["status"] == "error"
    ]


def report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    """The Markdown report: a summary across depths, then every row in detail."""
    by = {(r["config"], r["depth"]): r for r in rows}
    ds = args.depths
    mem = "peak CUDA MiB" if args.device.startswith("cuda") else "peak MiB"
    key = "cuda_peak_mib" if args.device.startswith("cuda") else "peak_mib"
    header = ["config", *(f"{mem} D={d}" if i == 0 else f"D={d}" for i, d in enumerate(ds))]
    header += [f"time / plain D={d}" if i == 0 else f"D={d}" for i, d in enumerate(ds)]
    summary = [
        [
            W.LABELS[c],
            *(_cell(by[c, d], key, ".1f") for d in ds),
            *(_cell(by[c, d], "time_ratio", ".2f") for d in ds),
        ]
        for c in args.configs
    ]
    detail_header = [
        "config",
        "D",
        mem,
        "ms / step",
        "time / plain",
        "loss",
        "grad checksum",
        "max grad diff",
        "grads",
    ]
    rounds = args.rounds > 1
    if rounds:
        detail_header.append("rounds (time / plain)")
    cells = [(key, ".1f"), ("step_ms", ".1f"), ("time_ratio", ".2f"), ("loss", ".6g")]
    cells += [("checksum", ".10g"), ("grad_diff", ".1e")]
    detail = detail_rows(by, args.configs, ds, W.LABELS, cells, rounds)
    errors = error_lines(rows, W.LABELS)
    env = environment(args)
    lines = [
        f"# {W.WORKLOADS[args.workload]['title']}",
        "",
        W.describe(args.workload, args.batch, args.hidden) + ".",
        f"Loss y.square().mean(); float32; device {args.device}; {args.threads} thread(s) per child process; "
        f"time = median of {args.steps} steps after {args.warmup} warm-up step(s)"
        + (
            f"; {args.rounds} rounds over the whole table (every other one in reverse order): "
            "ms / step is the median of the rounds' times, time / plain the median of the rounds' "
            "ratios to plain autograd in the same round, listed under 'rounds'"
            if args.rounds > 1
            else ""
        )
        + "; peak = growth of "
        + ("torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (VmHWM)")
        + " during one step; ratios to plain autograd in the same run.",
        f"torch {env['torch']}, Python {env['python']}, {env['machine']}, {env['date']}; peers: "
        + ", ".join(f"{W.LABELS[c]} {v or 'not installed'}" for c, v in env["peers"].items())
        + ".",
        "",
        markdown_table(header, summary),
        "",
        "Gradients: checksum = sum of |grad| over all parameters and the input after the first step; "
        f"'match' = within {CHECKSUM_RTOL:g} relative of plain autograd's; max grad diff = largest "
        "absolute difference from plain autograd's gradients.",
        "",
        markdown_table(detail_header, detail),
    ]
    if "memcnn" in args.configs:
        lines += [
            "",
            "MemCNN gets its input through a free alias (x.view_as(x)): it doubles a leaf input's gradient.",
        ]
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines) + "\n"


def environment(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "peers": {c: W.peer_version(c) for c in W.PEERS if c in args.configs},
    }


def plot(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    path: Path,
    *,
    labels: dict[str, str] | None = None,
    title: str | None = None,
    xlabel: str = "depth D (coupling blocks)",
) -> str:
    """Peak memory and time against depth, one line per configuration; a message saying what happened.

    ``labels`` (default the workloads' labels) names the configurations and ``title``
    (default the workload's title and sizes) heads the figure."""
    labels = W.LABELS if labels is None else labels
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    cuda = args.device.startswith("cuda")
    key = "cuda_peak_mib" if cuda else "peak_mib"
    has_ratio = any("time_ratio" in r for r in rows)
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for c in args.configs:
        ok = [r for r in rows if r["config"] == c and r["status"] == "ok"]
        if not ok:
            continue
        depths = [r["depth"] for r in ok]
        ax_mem.plot(depths, [r[key] for r in ok], "o-", label=labels[c])
        ax_time.plot(
            depths, [r["time_ratio"] if has_ratio else r["step_ms"] for r in ok], "o-", label=labels[c]
        )
    for ax in (ax_mem, ax_time):
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.depths, [str(d) for d in args.depths])
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    # a log axis: plain autograd and checkpointing grow with depth to hundreds of MiB, and a
    # linear axis would press every reversible row into one line at the bottom
    ax_mem.set_yscale("log")
    ax_mem.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax_mem.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax_mem.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax_mem.set_ylabel(("peak CUDA MiB per step" if cuda else "peak RSS growth per step (MiB)") + ", log")
    ax_time.set_ylabel("time per step / plain autograd" if has_ratio else "ms per step")
    ax_mem.legend(fontsize=8)
    fig.suptitle(title or f"{W.WORKLOADS[args.workload]['title']}, B={args.batch}, H={args.hidden}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None, so the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def replot(path: Path) -> str:
    """Draw ``<workload>.png`` again from a saved ``<workload>.json`` (no run)."""
    return redraw(path, plot)


def settings(args: argparse.Namespace, skip: Sequence[str] = ()) -> dict[str, Any]:
    """The command line's settings as JSON can hold them (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in skip}


def save(out: Path, name: str, text: str, blob: dict[str, Any], draw: Callable[[Path], str]) -> None:
    """A benchmark's results under ``out``: the report as ``name.md``, ``blob`` as
    ``name.json`` (non-finite numbers as strings) and ``draw``'s plot as ``name.png``."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / name
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(json.dumps(_finite(blob), indent=2, allow_nan=False) + "\n")
    print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.json')}", file=sys.stderr)
    print(draw(stem.with_suffix(".png")), file=sys.stderr)


def redraw(path: Path, plot: Callable[[argparse.Namespace, Any, Path], str], key: str = "results") -> str:
    """``plot`` again from a benchmark's saved JSON (its ``settings`` and ``key``), beside it."""
    blob = json.loads(path.read_text())
    return plot(argparse.Namespace(**blob["settings"]), blob[key], path.with_suffix(".png"))


def replotted(argv: Sequence[str], replot: Callable[[Path], str]) -> bool:
    """``--replot FILE...`` (every benchmark script takes it): redraw the plots of saved
    JSON results, no run. True when that was what ``argv`` asked."""
    if argv[:1] != ["--replot"]:
        return False
    for name in argv[1:]:
        print(replot(Path(name)), file=sys.stderr)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if replotted(argv, replot):  # python benchmarks/run.py --replot results/mlp.json ...
        return 0
    args = parse_args(argv)
    print(W.describe(args.workload, args.batch, args.hidden), file=sys.stderr)
    print(f"depths {args.depths}; configs {', '.join(args.configs)}", file=sys.stderr)
    rows = run_all(args)
    text = report(args, rows)
    print(text)
    blob = {
        "workload": args.workload,
        "settings": settings(args),
        "environment": environment(args),
        "results": rows,
    }
    save(args.out, args.workload, text, blob, lambda png: plot(args, rows, png))
    bad = [r for r in rows if r["status"] == "error" or r.get("grads_match") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
