"""Run by tests/test_fsdp.py in a subprocess: FSDP (gloo, 2 ranks, 127.0.0.1, CPU) vs one process.

Every case trains the same model for STEPS SGD steps, each rank on its own batch, and
compares with one process under plain autograd summing both ranks' losses / 2: the
gradients (FSDP2) and the parameters after every step, gathered to full size. It also
checks what :func:`invfunc.explain` reports freed (every freed input must be an
activation, never a parameter) and that after each forward every parameter FSDP holds
still owns its memory.

Each case runs in a process group of its own (file rendezvous), so that one raising on a
rank (and leaving the other in a collective) cannot hang the cases after it. Prints one
JSON line per case: ``{"case": name, "ranks": [rank 0's result, rank 1's]}``, a result
being ``{"diff", "freed", "storage_ok"}`` or ``{"error", "invfunc_error"}``, with the
case's ``seconds``; or one line
``SKIP <reason>`` when FSDP itself cannot train on CPU here.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import sys
import time
import warnings
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

try:  # public since torch 2.5; test_fsdp.py skips on a torch without it
    from torch.distributed.tensor import DTensor
except ImportError:  # collected for doctests on an older torch
    DTensor = None

import invfunc as inv

H, B, STEPS = 4, 6, 3
#: bytes of the activations a call may free: the whole (B, 2H) input or one (B, H) half;
#: every parameter has another size ((H, H), (H,), (2H, 2H), (2H,) in float64)
ACTIVATION_BYTES = {B * 2 * H * 8, B * H * 8}


class Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.F = torch.nn.Linear(H, H).double()
        self.G = torch.nn.Sequential(torch.nn.Linear(H, H), torch.nn.Tanh()).double()
        self.block = inv.couple(self.F, self.G)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return inv.invertible_call(self.block, h)


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(2 * H, 2 * H).double()  # its output is freed by layer 0
        self.layers = torch.nn.ModuleList(Layer() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return h.square().mean()


def data(rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(B, 2 * H, generator=g, dtype=torch.float64)


#: name -> (FSDP version, what is wrapped, options, invfunc mode)
CASES: dict[str, tuple[int, str, dict[str, Any], str]] = {
    "fsdp2 model": (2, "model", {}, "invertible"),
    "fsdp2 model, no reshard after forward": (2, "model", {"reshard_after_forward": False}, "invertible"),
    "fsdp2 each layer and model": (2, "layers", {}, "invertible"),
    "fsdp2 F and G and model": (2, "F and G", {}, "invertible"),
    "fsdp2 F and G and model [plain]": (2, "F and G", {}, "plain"),
    "fsdp2 F and G only": (2, "F and G only", {}, "invertible"),
    "fsdp1 model, use_orig_params": (1, "model", {"use_orig_params": True}, "invertible"),
    "fsdp1 model, use_orig_params [plain]": (1, "model", {"use_orig_params": True}, "plain"),
    "fsdp1 model, flat parameters": (1, "model", {"use_orig_params": False}, "invertible"),
    "fsdp1 model, flat parameters [plain]": (1, "model", {"use_orig_params": False}, "plain"),
    "fsdp1 F and G and model, use_orig_params": (1, "F and G", {"use_orig_params": True}, "invertible"),
}


@functools.cache
def reference() -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Per step: the gradients, and the parameters after the step, by name."""
    with inv.mode("plain"):
        model = Model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        grads, params = [], []
        for step in range(STEPS):
            opt.zero_grad()
            for rank in range(2):
                (model(data(rank, step)) / 2).backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            opt.step()
            params.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return grads, params


def wrap(version: int, what: str, options: dict[str, Any]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the module to train, the unwrapped model inside it)."""
    model = Model()
    if version == 2:
        from torch.distributed.fsdp import fully_shard

        if what in ("F and G", "F and G only"):
            for layer in model.layers:
                fully_shard(layer.F, **options)
                fully_shard(layer.G, **options)
        if what == "layers":
            for layer in model.layers:
                fully_shard(layer, **options)
        if what != "F and G only":
            fully_shard(model, **options)
        return model, model
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    cpu = torch.device("cpu")
    if what == "F and G":
        for layer in model.layers:
            layer.F = FSDP(layer.F, device_id=cpu, **options)
            layer.G = FSDP(layer.G, device_id=cpu, **options)
            layer.block = inv.couple(layer.F, layer.G)
    return FSDP(model, device_id=cpu, **options), model


def full(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.full_tensor() if isinstance(t, DTensor) else t


def clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "")


def storage_ok(module: torch.nn.Module) -> bool:
    """Every parameter (a shard at rest, or the gathered parameter while FSDP holds it) owns
    the memory its elements need."""
    for p in module.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        if t.numel() and t.untyped_storage().nbytes() < (t.storage_offset() + t.numel()) * t.element_size():
            return False
    return True


def run_case(rank: int, version: int, what: str, options: dict[str, Any], mode: str) -> dict[str, Any]:
    want_grads, want_params = reference()
    trained, model = wrap(version, what, options)
    opt = torch.optim.SGD(trained.parameters(), lr=0.1)
    diff, freed, ok = 0.0, [], True
    with inv.mode(mode):
        for step in range(STEPS):
            opt.zero_grad()
            with inv.explain() as report:
                loss = trained(data(rank, step))
            freed += [nbytes for _, _, nbytes in report.freed]
            ok = ok and storage_ok(trained)
            loss.backward()
            if version == 2:
                for name, p in model.named_parameters():
                    g = full(p.grad)
                    diff = max(
                        diff, float("inf") if g is None else (g - want_grads[step][name]).abs().max().item()
                    )
            opt.step()
            if version == 2:
                got = {n: full(p.detach()) for n, p in model.named_parameters()}
            else:
                from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

                with FSDP.summon_full_params(trained):
                    got = {clean(n): p.detach().clone() for n, p in trained.named_parameters()}
            for name, want in want_params[step].items():
                diff = max(diff, (got[name] - want).abs().max().item())
    return {"diff": diff, "freed": freed, "storage_ok": ok}


def probe(rank: int) -> None:
    """FSDP2 itself on CPU: one forward and backward, no invfunc."""
    from torch.distributed.fsdp import fully_shard

    lin = torch.nn.Linear(H, H).double()
    fully_shard(lin)
    lin(data(rank, 0)[:, :H]).sum().backward()
    assert lin.weight.grad is not None


def worker(rank: int, store: str, out: str) -> None:
    warnings.simplefilter("ignore")  # FSDP1's deprecation, DTensor's notes
    results: dict[str, Any] = {}

    def init(i: int) -> None:
        dist.init_process_group(
            "gloo", init_method=f"file://{store}.{i}", rank=rank, world_size=2, timeout=timedelta(seconds=20)
        )

    try:
        init(0)
        probe(rank)
    except Exception as e:
        results["SKIP"] = f"FSDP2 fully_shard on CPU with gloo fails: {type(e).__name__}: {e}"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    for i, (name, case) in enumerate(CASES.items() if "SKIP" not in results else (), start=1):
        start = time.monotonic()
        try:
            init(i)
            results[name] = run_case(rank, *case)
        except Exception as e:
            msg = " ".join(str(e).split())[:400]
            results[name] = {
                "error": f"{type(e).__name__}: {msg}",
                "invfunc_error": isinstance(e, inv.InvfuncError),
            }
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            gc.collect()  # the model (and the group its FSDP state holds): the peer's sockets close
            results[name]["seconds"] = round(time.monotonic() - start, 2)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(results, f)


def main() -> None:
    store, out = sys.argv[1], sys.argv[2]
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's sockets on 127.0.0.1
    mp.spawn(worker, args=(store, out), nprocs=2, join=True)
    ranks = []
    for rank in range(2):
        with open(f"{out}.{rank}") as f:
            ranks.append(json.load(f))
    if "SKIP" in ranks[0] or "SKIP" in ranks[1]:
        print("SKIP", ranks[0].get("SKIP") or ranks[1]["SKIP"], flush=True)
        return
    for name in CASES:
        print(json.dumps({"case": name, "ranks": [r[name] for r in ranks]}), flush=True)


if __name__ == "__main__":
    main()
