"""Run by tests/test_ddp.py in a subprocess: DDP (gloo, 2 ranks, 127.0.0.1) vs one process.

Prints one line per configuration, ``OK <name> <max abs grad diff>`` or ``FAIL ...``.
"""

from __future__ import annotations

import itertools
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import invfunc as inv

H, B, STEPS = 4, 6, 5


class Model(torch.nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.F = torch.nn.ModuleList(torch.nn.Linear(H, H).double() for _ in range(3))
        self.G = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(H, H), torch.nn.Tanh()).double() for _ in range(3)
        )
        self.unused = torch.nn.Linear(H, H).double()
        self.blocks = [inv.couple(f, g) for f, g in zip(self.F, self.G)]

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        h = x * 1
        if self.kind == "one call":
            h = inv.invertible_call(inv.chain(*self.blocks), h)
        elif self.kind == "same block twice":
            h = inv.invertible_call(inv.chain(self.blocks[0], self.blocks[0], self.blocks[1]), h)
        elif self.kind == "dynamic":
            h = inv.invertible_call(self.blocks[step % 3], h)  # a different block each step
        return h.square().mean()


def data(rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(B, 2 * H, generator=g, dtype=torch.float64)


def reference(kind: str) -> list[list[torch.Tensor]]:
    """The same model in one process under plain autograd (mode "plain")."""
    with inv.mode("plain"):
        return _reference(kind)


def _reference(kind: str) -> list[list[torch.Tensor]]:
    model = Model(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history = []
    for step in range(STEPS):
        opt.zero_grad()
        for rank in range(2):
            (model(data(rank, step), step) / 2).backward()
        history.append(
            [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        )
        opt.step()
    return history


CONFIGS = [
    dict(zip(("gradient_as_bucket_view", "static_graph", "find_unused_parameters"), flags))
    for flags in itertools.product([False, True], repeat=3)
]
KINDS = ["one call", "same block twice", "dynamic"]


def worker(rank: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    results = {}
    for kind in KINDS:
        for cfg in CONFIGS:
            if not cfg["find_unused_parameters"] and not cfg["static_graph"]:
                continue  # the model has an unused parameter: DDP itself requires one of these
            if kind == "dynamic" and cfg["static_graph"]:
                continue  # a graph that changes between steps is not static, by definition
            model = DDP(Model(kind), **cfg)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            history = []
            for step in range(STEPS):
                opt.zero_grad()
                model(data(rank, step), step).backward()
                history.append(
                    [
                        p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                        for p in model.parameters()
                    ]
                )
                opt.step()
            results[(kind, tuple(sorted(cfg.items())))] = history
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    port, out = int(sys.argv[1]), sys.argv[2]
    mp.spawn(worker, args=(port, out), nprocs=2, join=True)
    results = torch.load(out)
    refs = {kind: reference(kind) for kind in KINDS}
    for (kind, cfg), history in results.items():
        diff = max(
            (a - b).abs().max().item() for got, want in zip(history, refs[kind]) for a, b in zip(got, want)
        )
        name = f"{kind}:" + ",".join(k for k, v in cfg if v)
        print(("OK" if diff < 1e-10 else "FAIL"), name, f"{diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
