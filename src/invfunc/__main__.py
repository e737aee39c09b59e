"""The demo: ``python -m invfunc`` trains a reversible MLP three ways and compares them.

The same network (``--depth`` couplings ``y1 = x1 + F(x2); y2 = x2 + G(y1)`` with F and
G ``Linear -> ReLU -> Linear``, the last layers started near zero so that it trains at
any depth), the same weights and data, trained for ``--steps`` SGD
steps under plain autograd, ``torch.utils.checkpoint`` (one per block) and invfunc (one
``invertible_call`` over a ``chain``, the input batch freed as well with ``free=``).
Each runs in its own child process, measured as described in :mod:`invfunc._measure`;
the table shows the peak memory of a training step, the time per step, the final loss
and how far the first step's gradients are from plain autograd's.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Sequence

import torch

from . import _compat
from ._measure import MeasureError, Measurement, grad_difference, markdown_table, measure

_RUNS = (("plain autograd", "plain"), ("torch checkpoint", "checkpoint"), ("invfunc", "invfunc"))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m invfunc",
        description="Train a reversible MLP under plain autograd, torch checkpointing and invfunc, "
        "each in its own process, and compare peak memory, time and gradients.",
    )
    parser.add_argument("--depth", type=int, default=16, help="number of coupling blocks (default 16)")
    parser.add_argument("--batch", type=int, default=512, help="batch size (default 512)")
    parser.add_argument(
        "--hidden", type=int, default=256, help="width of each half; input is 2x (default 256)"
    )
    parser.add_argument("--steps", type=int, default=5, help="SGD steps after one warm-up step (default 5)")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default 0.01)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    args = parser.parse_args(argv)
    for name in ("depth", "batch", "hidden", "steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def untested_torch() -> str | None:
    """The demo's warning when the PyTorch in use is not one the test suite ran on.

    Examples:
        >>> untested_torch() is None or untested_torch().startswith("warning:")
        True
    """
    if _compat.torch_version() in _compat.TESTED_TORCH:
        return None
    return (
        f"warning: invfunc's test suite runs on torch {', '.join(_compat.TESTED_TORCH)}, not on "
        f"{torch.__version__}; results should hold (internals it cannot find fall back to keeping "
        "inputs), but this version is untested."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    args = _parse(argv)
    options = {"depth": args.depth, "batch": args.batch, "hidden": args.hidden, "stable": True}
    print(
        f"invfunc demo: {args.depth} coupling blocks (Linear-ReLU-Linear, width 2x{args.hidden}), "
        f"batch {args.batch}, {args.steps} SGD steps + 1 warm-up, torch {torch.__version__}, "
        f"{args.threads} thread(s), CPU\n"
    )
    warning = untested_torch()
    if warning is not None:
        print(warning + "\n")
    results: dict[str, Measurement] = {}
    diffs: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="invfunc-demo-") as tmp:
        for label, config in _RUNS:
            print(f"  {label:<17} running in a child process ...", flush=True)
            grads = os.path.join(tmp, f"{config}.pt")
            try:
                results[config] = measure(
                    "invfunc._measure:mlp_workload",
                    options={"config": config, **options},
                    steps=args.steps,
                    lr=args.lr,
                    threads=args.threads,
                    grads_path=grads,
                )
            except MeasureError as e:
                print(f"  {label} failed:\n{e}")
                return 1
            bad = [i for i, loss in enumerate(results[config].losses) if not math.isfinite(loss)]
            if bad:
                print(
                    f"  {label}: the loss is {results[config].losses[bad[0]]} at step {bad[0]} (of "
                    f"{len(results[config].losses)}, warm-up first): the training diverged, so this run "
                    "measures nothing. Lower --lr, or report it: the demo's network should train at any "
                    "depth."
                )
                return 1
            diffs[config] = grad_difference(os.path.join(tmp, "plain.pt"), grads)

    plain = results["plain"]
    rows = [
        [
            label,
            f"{m.peak_mib:.1f}",
            f"{m.ms:.1f}",
            f"{m.step_s / plain.step_s:.2f}",
            f"{m.peak_mib / plain.peak_mib:.2f}",
            f"{m.loss:.6f}",
            f"{diffs[config]:.1e}",
        ]
        for label, config in _RUNS
        for m in [results[config]]
    ]
    header = [
        "config",
        "peak MiB",
        "ms / step",
        "time / plain",
        "memory / plain",
        "final loss",
        "max grad diff",
    ]
    print()
    print(markdown_table(header, rows))
    inv = results["invfunc"]
    print(
        f"\ninvfunc trained in {inv.peak_mib / plain.peak_mib:.0%} of plain autograd's peak memory "
        f"at {inv.step_s / plain.step_s:.2f}x its time per step; gradients differ from plain autograd's "
        f"by at most {diffs['invfunc']:.1e} (float32 reconstruction).\n"
        "Peak memory: growth of the process's peak RSS during one training step. Try --depth 64: "
        "plain and checkpoint grow with depth, invfunc stays flat."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
