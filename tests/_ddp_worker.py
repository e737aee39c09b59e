"""Run by tests/test_ddp.py in a subprocess: DDP (gloo, 2 ranks, 127.0.0.1) vs one process.

Prints one line per configuration, tab-separated: ``OK <name> <max abs grad diff>``,
``FAIL ...``, or ``ERROR <name> <exception type>: <message>`` when the configuration raised.
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

H, B, STEPS, MICRO = 4, 6, 5, 3

# Kinds whose model has an unused parameter (DDP's defaults refuse those) ...
KINDS = ["one call", "same block twice", "dynamic"]
# ... and kinds where every parameter gets a gradient every step, run under DDP's defaults too.
# "no_sync": MICRO micro-batches a step, all but the last under ``DDP.no_sync()``.
# "as_module": the chain run through inv.as_module (its forward), inside the DDP model.
ALL_USED = ["all used", "two calls", "shared weights", "no_sync", "as_module"]


class Model(torch.nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.F = torch.nn.ModuleList(torch.nn.Linear(H, H).double() for _ in range(3))
        self.G = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(H, H), torch.nn.Tanh()).double() for _ in range(3)
        )
        if kind == "shared weights":
            self.G[1] = self.F[0]  # one Linear: F of block 0 and G of block 1
        if kind in KINDS:
            self.unused = torch.nn.Linear(H, H).double()
        self.blocks = [inv.couple(f, g) for f, g in zip(self.F, self.G)]
        if kind == "as_module":
            self.net = inv.as_module(inv.chain(*self.blocks))  # the same modules, registered again

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        h = x * 1
        if self.kind in ("one call", "all used", "shared weights", "no_sync"):
            h = inv.invertible_call(inv.chain(*self.blocks), h)
        elif self.kind == "as_module":
            h = self.net(h)
        elif self.kind == "same block twice":
            h = inv.invertible_call(inv.chain(self.blocks[0], self.blocks[0], self.blocks[1]), h)
        elif self.kind == "two calls":  # block 0's parameters reach two autograd nodes
            h = inv.invertible_call(self.blocks[0], h)
            h = inv.invertible_call(self.blocks[0], h)
            h = inv.invertible_call(inv.chain(self.blocks[1], self.blocks[2]), h)
        elif self.kind == "dynamic":
            h = inv.invertible_call(self.blocks[step % 3], h)  # a different block each step
        return h.square().mean()


def data(rank: int, step: int, micro: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + 100 * micro + rank)
    return torch.randn(B, 2 * H, generator=g, dtype=torch.float64)


def micro_batches(kind: str) -> int:
    return MICRO if kind == "no_sync" else 1


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


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
            for micro in range(micro_batches(kind)):
                (model(data(rank, step, micro), step) / 2).backward()
        history.append(grads(model))
        opt.step()
    return history


CONFIGS = [
    dict(zip(("gradient_as_bucket_view", "static_graph", "find_unused_parameters"), flags))
    for flags in itertools.product([False, True], repeat=3)
]


def runs() -> list[tuple[str, dict[str, bool]]]:
    out = []
    for kind in KINDS + ALL_USED:
        for cfg in CONFIGS:
            if kind in KINDS and not cfg["find_unused_parameters"] and not cfg["static_graph"]:
                continue  # the model has an unused parameter: DDP itself requires one of these
            if kind == "dynamic" and cfg["static_graph"]:
                continue  # a graph that changes between steps is not static, by definition
            if kind == "no_sync" and cfg["static_graph"]:
                continue  # DDP itself, under plain autograd too, fails an internal assert
                # (reducer.cpp "expect_autograd_hooks_") for no_sync() with static_graph=True
            out.append((kind, cfg))
    return out


def train(rank: int, kind: str, cfg: dict[str, bool]) -> list[list[torch.Tensor]]:
    model = DDP(Model(kind), **cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history = []
    for step in range(STEPS):
        opt.zero_grad()
        n = micro_batches(kind)
        for micro in range(n - 1):  # accumulate locally, no all-reduce
            with model.no_sync():
                model(data(rank, step, micro), step).backward()
        model(data(rank, step, n - 1), step).backward()  # this backward all-reduces the sum
        history.append(grads(model))
        opt.step()
    return history


def worker(rank: int, store: str, out: str) -> None:
    # rendezvous through a file: no port to pick, none another process can take meanwhile
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    results: dict[tuple[str, tuple[tuple[str, bool], ...]], object] = {}
    for kind, cfg in runs():
        key = (kind, tuple(sorted(cfg.items())))
        try:
            results[key] = train(rank, kind, cfg)
        except Exception as e:  # both ranks raise alike (same model, same flags)
            results[key] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    store, out = sys.argv[1], sys.argv[2]
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's sockets on 127.0.0.1
    mp.spawn(worker, args=(store, out), nprocs=2, join=True)
    results = torch.load(out)
    refs = {kind: reference(kind) for kind in KINDS + ALL_USED}
    for (kind, cfg), history in results.items():
        name = f"{kind}:" + ",".join(k for k, v in cfg if v)
        if isinstance(history, str):
            print("ERROR", name, history, sep="\t", flush=True)
            continue
        diff = max(
            (a - b).abs().max().item() for got, want in zip(history, refs[kind]) for a, b in zip(got, want)
        )
        print(("OK" if diff < 1e-10 else "FAIL"), name, f"{diff:.1e}", sep="\t", flush=True)


if __name__ == "__main__":
    main()
