"""Time configurations in one process, interleaved step by step (less noisy than one
process per configuration, but no memory figures).

    python benchmarks/interleaved.py --batch 8 --hidden 64 --depth 32 --steps 60   # tiny
    python benchmarks/interleaved.py --batch 2048 --hidden 256 --depth 8 --steps 12 # reference
    python benchmarks/interleaved.py --workload transformer --depth 16 --steps 20   # its defaults

Prints the median forward, backward and total time per step of plain autograd,
torch.utils.checkpoint (with its default early stop of the recompute, and without it:
``checkpoint-no-early-stop`` recomputes each block whole, as a reversible coupling must)
and invfunc (one call over a chain, one call per block, one call with the input kept).
Run it with ``MALLOC_MMAP_THRESHOLD_=65536`` to match ``benchmarks/run.py``'s allocator.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.utils.checkpoint

from invfunc._measure import CONFIGS, coupled_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads as W

NO_EARLY_STOP = "checkpoint-no-early-stop"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workload",
        choices=tuple(W.WORKLOADS),
        default="mlp",
        help="mlp (default), conv or transformer: F and G as in run.py",
    )
    parser.add_argument("--batch", type=int, help="default: 8 for mlp, run.py's for the others")
    parser.add_argument("--hidden", type=int, help="default: 64 for mlp, run.py's for the others")
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # the MLP defaults to the tiny configuration's sizes (the reference ones are flags away)
    spec = W.WORKLOADS["tiny" if args.workload == "mlp" else args.workload]
    args.batch = args.batch or spec["batch"]
    args.hidden = args.hidden or spec["hidden"]
    pairs, data, dim = W._pairs_and_data(args.workload, args.depth, args.batch, args.hidden, "cpu")
    configs = [*CONFIGS[:2], NO_EARLY_STOP, *CONFIGS[2:]]
    models = {
        config: coupled_model(config.removesuffix("-no-early-stop"), pairs, dim=dim) for config in configs
    }
    times: dict[str, list[tuple[float, float]]] = {config: [] for config in models}
    for step in range(args.steps + 5):
        for config, model in models.items():
            x = data.clone().requires_grad_()
            stop = (
                torch.utils.checkpoint.set_checkpoint_early_stop(False)
                if config == NO_EARLY_STOP
                else contextlib.nullcontext()
            )
            t0 = time.perf_counter()
            with stop:
                loss = model(x).square().mean()
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            if step >= 5:  # warm-up
                times[config].append((t1 - t0, t2 - t1))
    plain = statistics.median(f + b for f, b in times["plain"])
    print(
        f"{args.workload} B={args.batch} H={args.hidden} D={args.depth}, "
        f"median of {args.steps} interleaved steps"
    )
    for config, ts in times.items():
        fwd = statistics.median(f for f, _ in ts) * 1e3
        bwd = statistics.median(b for _, b in ts) * 1e3
        total = statistics.median(f + b for f, b in ts)
        print(
            f"  {config:<24} fwd {fwd:7.2f} ms  bwd {bwd:7.2f} ms  "
            f"total {total * 1e3:7.2f} ms  {total / plain:5.2f}x"
        )


if __name__ == "__main__":
    main()
