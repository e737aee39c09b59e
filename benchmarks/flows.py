"""Benchmark Glow-like flow steps: invfunc's ops against FrEIA 0.2 and normflows 1.7.3.

Usage (see BENCHMARK.md, "Flow workload" and "The bar")::

    python benchmarks/flows.py                                  # D = 4 16 48, every configuration
    python benchmarks/flows.py --rounds 3 --steps 3             # paired rounds (docs/benchmarks.md)
    python benchmarks/flows.py --configs plain invfunc --depths 4 16
    python benchmarks/flows.py --depths 2 --batch 2 --channels 4 --size 8 --hidden 8 --steps 1 --out /tmp/f
    python benchmarks/flows.py --replot benchmarks/results/flows.json   # redraw the plot only

The flow: D Glow steps on an input (B, C, S, S), each step

    actnorm(C) -> conv1x1(C) (LU) -> affine_coupling(net, clamp=2),
    net = Conv3x3(C/2 -> W) -> ReLU -> Conv3x3(W -> C)

``net`` maps the first half of the channels to the log-scale and the shift of the second
half (``y2 = x2 * exp(s) + t``, ``s`` soft-clamped to ``2 tanh(s / 2)``); its last layer
starts with its default weights times 0.1 and a zero bias. (Not zero: a zero last layer
makes every coupling the identity and the first layer's gradient exactly zero, so the
gradient check below would test nothing of it.) ``net`` makes its input contiguous (NCHW)
in every configuration, so that the 3x3 convolutions, whose speed depends on the memory
layout, see the same one whatever the 1x1 convolution returns (see ``_Subnet``).
Defaults B = 32, C = 8, S = 32, W = 64, float32, one thread per child process. The
ActNorms are initialised from the batch at build time (invfunc's data-dependent
initialisation, one forward without grad), so every configuration starts from the same
values. Loss: the negative log-likelihood in nats per
dimension under a standard normal prior, ``mean(0.5 * |z|^2 - ladj) / (C S S) + 0.5 log 2 pi``.
(``invfunc._measure`` takes ``model(x).square().mean()`` as the loss: each model returns the
square root of the NLL, so the measured loss *is* the NLL and its gradients are the NLL's.)

Configurations, all the same function on the same weights (the subnets are the same
modules; the other parameters are copied):

- ``plain``: the invfunc chain called directly, ordinary autograd.
- ``checkpoint``: each Glow step (a chain of the three ops, called directly) inside
  ``torch.utils.checkpoint`` (``use_reentrant=False``).
- ``invfunc``: ``invfunc.invertible_call(flow, x, free=[0])``: every op frees its input and
  rebuilds it with its inverse in backward; the input batch is freed too (``free=``), as in
  the reference workload's "one call" row.
- ``invfunc-checkpoint``: ``invertible_call(flow, x, mode="checkpoint")``: every op keeps
  its input and recomputes in backward.
- ``freia``: FrEIA 0.2 ``SequenceINN`` of ``ActNorm``, ``Fixed1x1Conv`` and
  ``AffineCouplingOneSided`` per step. FrEIA 0.2 has no learned 1x1 convolution: its
  ``Fixed1x1Conv`` is the same matrix W, a fixed kernel (W gets no gradient; its log-det is a
  constant). Its ActNorm is ``x * exp(s) + b'``, given ``b' = b exp(s)``; the coupling gets the
  same subnet and ``clamp=2`` with ``clamp_activation = tanh(u / 2)``, invfunc's soft clamp.
- ``freia-checkpoint``: the same modules, each step's three run inside
  ``torch.utils.checkpoint`` (``use_reentrant=False``) as ``SequenceINN`` runs them.
- ``normflows``: normflows 1.7.3 ``ActNorm``, ``Invertible1x1Conv(use_lu=True)`` and
  ``AffineCouplingBlock(scale_map="exp", split_mode="channel")`` per step, run by
  ``NormalizingFlow.forward_and_log_det`` (the layers' ``forward``; normflows' own density
  training, ``forward_kld``, runs their ``inverse`` in reverse, the same layers and costs).
  Its 1x1 convolution's ``forward`` applies the inverse of its LU factors, so they are set to
  the LU factors of W^-1; ActNorm's shift is ``b exp(s)``; the coupling reads the shift from
  the even and the log-scale from the odd channels of its param map, unclamped, so the
  param map is the subnet followed by invfunc's soft clamp and that interleaving (no
  tensor of it is saved for backward).

Every (depth, configuration) runs in its own child process through
``invfunc._measure.measure`` (NOTE [How a step is measured] there), driven by
``benchmarks/run.py``'s ``run_all`` (plain autograd first at each depth, ``--rounds`` paired
rounds). Gradients: the subnets' parameters and the input mean the same in every
configuration, so their checksum and largest difference from plain autograd's are
reported for every row; invfunc's rows share plain autograd's parameters entirely, so their
difference over all parameters is reported too. Writes ``flows.md``, ``flows.json`` and
``flows.png`` into ``--out`` (default ``benchmarks/results``). Peers are optional: one that is
not installed gets a row that says so (``pip install --no-deps freia==0.2 normflows==1.7.3
scipy``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import invfunc as inv  # noqa: E402
import run as R  # noqa: E402
import workloads as W  # noqa: E402
from invfunc import ops  # noqa: E402
from invfunc._measure import Workload, markdown_table  # noqa: E402

#: Every configuration, in the order rows are reported (plain autograd first: the reference).
CONFIGS = (
    "plain",
    "checkpoint",
    "invfunc",
    "invfunc-checkpoint",
    "freia",
    "freia-checkpoint",
    "normflows",
)

LABELS = {
    "plain": "plain autograd",
    "checkpoint": "torch checkpoint",
    "invfunc": "invfunc (one call)",
    "invfunc-checkpoint": "invfunc checkpoint mode",
    "freia": "FrEIA",
    "freia-checkpoint": "FrEIA + checkpoint",
    "normflows": "normflows",
}

#: Peer configurations: the module to import and the version BENCHMARK.md names.
PEERS = {
    "freia": ("FrEIA", "0.2"),
    "freia-checkpoint": ("FrEIA", "0.2"),
    "normflows": ("normflows", "1.7.3"),
}

#: Configurations whose parameters are invfunc's own (their gradients compare one to one).
INVFUNC_PARAMS = ("plain", "checkpoint", "invfunc", "invfunc-checkpoint")

DEFAULTS = {"depths": (4, 16, 48), "batch": 32, "channels": 8, "size": 32, "hidden": 64, "steps": 3}

#: The soft clamp of the log-scale, ``CLAMP * tanh(s / CLAMP)``, in every configuration.
CLAMP = 2.0
#: The subnet's last layer starts with its default weights times this, and a zero bias.
LAST_SCALE = 0.1
#: Parameters of one subnet (two convolutions, weight and bias each): they lead every
#: configuration's parameter list, step by step.
SUBNET_PARAMS = 4
#: Relative difference of the gradient checksum from plain autograd's above which a row is flagged.
CHECKSUM_RTOL = R.CHECKSUM_RTOL
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

TITLE = "Glow-like flow steps"


def describe(batch: int, channels: int, size: int, hidden: int) -> str:
    """One line naming the workload and its sizes."""
    return (
        f"{TITLE}: input (B, C, S, S) with B={batch}, C={channels}, S={size}; each step "
        f"actnorm -> conv1x1 (LU) -> affine coupling, subnet Conv3x3({channels // 2} -> {hidden}) "
        f"-> ReLU -> Conv3x3({hidden} -> {channels}), soft clamp {CLAMP:g}"
    )


def peer_status(config: str) -> str | None:
    """None if ``config`` can run here, else why not (``"not installed"``)."""
    return W.peer_status(config, PEERS)


def peer_version(config: str) -> str | None:
    """The installed version of a peer configuration's package, or None."""
    return W.peer_version(config, PEERS)
    try:
        return importlib.metadata.version(PEERS[config][0])
    except importlib.metadata.PackageNotFoundError:
        return None


# -- the flow ------------------------------------------------------------------------------


class _Subnet(nn.Module):
    """The coupling's subnet, ``Conv3x3(C/2 -> W) -> ReLU -> Conv3x3(W -> C)``, its last layer
    scaled down, run on its input in the default (NCHW) memory layout in every configuration.

    A 1x1 convolution written as a permuted matmul (``movedim`` after ``@``) returns memory
    laid out channels-last, and the coupling's half of it stays so; a ``conv2d`` (FrEIA,
    normflows) returns NCHW. oneDNN ran these 3x3 convolutions about twice as fast on
    channels-last input on the development CPU, so without the ``contiguous()`` the time
    column could compare memory layouts, not libraries. (It costs one copy of the half in
    every configuration, 0.5 MiB.)"""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.first = nn.Conv2d(channels // 2, hidden, 3, padding=1)
        self.act = nn.ReLU()
        self.last = nn.Conv2d(hidden, channels, 3, padding=1)
        with torch.no_grad():
            self.last.weight.mul_(LAST_SCALE)
            self.last.bias.zero_()

    def forward(self, x1: torch.Tensor) -> torch.Tensor:
        return self.last(self.act(self.first(x1.contiguous())))  # type: ignore[no-any-return]


class _Step:
    """One Glow step's ops (invfunc) and the modules that hold their parameters."""

    def __init__(self, channels: int, hidden: int, device: str) -> None:
        self.norm = ops.actnorm(channels)
        self.mix = ops.conv1x1(channels)
        self.net = _Subnet(channels, hidden).to(device)
        self.couple = ops.affine_coupling(self.net, clamp=CLAMP)
        self.actnorm = inv.as_module(self.norm).module.to(device)
        self.conv = inv.as_module(self.mix).module.to(device)
        self.chain = inv.chain(self.norm, self.mix, self.couple)

    def own_params(self) -> list[torch.Tensor]:
        """invfunc's parameters of this step other than the subnet's."""
        return [self.actnorm.log_scale, self.actnorm.bias, self.conv.lower, self.conv.upper, self.conv.log_s]

    @torch.no_grad()
    def shift(self) -> torch.Tensor:
        """ActNorm's ``(x + b) exp(s)`` as ``x exp(s) + b exp(s)``: the peers' shift, shape (C,)."""
        return self.actnorm.bias * self.actnorm.log_scale.exp()

    @torch.no_grad()
    def weight(self) -> torch.Tensor:
        """The 1x1 convolution's matrix ``W`` (``y = W x`` at every position)."""
        return self.conv.weight_matrix().detach().clone()


def nll_root(z: torch.Tensor, ladj: torch.Tensor) -> torch.Tensor:
    """The square root of the NLL per dimension (see the module's docstring)."""
    nll = (0.5 * z.square().flatten(1).sum(1) - ladj).mean() / z[0].numel() + HALF_LOG_2PI
    return nll.sqrt()


def _torch_checkpointed(steps: Sequence[_Step]) -> Callable[[torch.Tensor], torch.Tensor]:
    def model(x: torch.Tensor) -> torch.Tensor:
        ladj: torch.Tensor | float = 0.0
        for step in steps:
            x, part = torch.utils.checkpoint.checkpoint(step.chain, x, use_reentrant=False)
            ladj = ladj + part
        return nll_root(x, ladj)  # type: ignore[arg-type]

    return model


def _freia(
    steps: Sequence[_Step], shape: Sequence[int], checkpointed: bool
) -> tuple[Any, list[torch.Tensor]]:
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    def soft_clamp(u: torch.Tensor) -> torch.Tensor:  # FrEIA multiplies by its clamp
        return torch.tanh(u / CLAMP)

    inn = Ff.SequenceINN(*shape)
    params: list[torch.Tensor] = []
    for step in steps:
        inn.append(Fm.ActNorm)
        norm = inn.module_list[-1]
        with torch.no_grad():
            norm.scale.copy_(step.actnorm.log_scale.view_as(norm.scale))
            norm.bias.copy_(step.shift().view_as(norm.bias))
        norm.init_on_next_batch = False
        # FrEIA's kernel is M^T: M = W^T gives y = W x
        inn.append(Fm.Fixed1x1Conv, M=step.weight().T.contiguous())

        def subnet(c_in: int, c_out: int, net: nn.Module = step.net) -> nn.Module:
            assert (c_in, c_out) == (net.first.in_channels, net.last.out_channels)  # type: ignore[union-attr]
            return net

        inn.append(
            Fm.AffineCouplingOneSided, subnet_constructor=subnet, clamp=CLAMP, clamp_activation=soft_clamp
        )
        params += [norm.scale, norm.bias]
    if not checkpointed:
        return lambda x: nll_root(*inn(x)), params
    modules = list(inn.module_list)
    groups = [modules[i : i + 3] for i in range(0, len(modules), 3)]

    def run_step(x: torch.Tensor, group: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ladj = (x,), 0.0
        for module in group:  # as SequenceINN.forward does
            xs, j = module(xs, jac=True)
            ladj = j + ladj
        return xs[0], ladj  # type: ignore[return-value]

    def model(x: torch.Tensor) -> torch.Tensor:
        ladj: torch.Tensor | float = 0.0
        for group in groups:
            x, part = torch.utils.checkpoint.checkpoint(run_step, x, group, use_reentrant=False)
            ladj = ladj + part
        return nll_root(x, ladj)  # type: ignore[arg-type]

    return model, params


class _ShiftScale(nn.Module):
    """normflows' param map: the subnet's (log-scale, shift), the log-scale soft-clamped as
    invfunc's ``affine_coupling`` does, interleaved as ``AffineCoupling`` reads them (shift
    on the even channels, log-scale on the odd ones)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x1: torch.Tensor) -> torch.Tensor:
        s, t = self.net(x1).chunk(2, 1)
        s = CLAMP * torch.tanh(s / CLAMP)
        return torch.stack([t, s], 2).flatten(1, 2)


def _normflows(steps: Sequence[_Step], channels: int) -> tuple[Any, list[torch.Tensor]]:
    import normflows as nf

    layers: list[nn.Module] = []
    params: list[torch.Tensor] = []
    for step in steps:
        norm = nf.flows.ActNorm((channels, 1, 1))
        mix = nf.flows.Invertible1x1Conv(channels, use_lu=True)
        couple = nf.flows.AffineCouplingBlock(
            _ShiftScale(step.net), scale=True, scale_map="exp", split_mode="channel"
        )
        with torch.no_grad():
            norm.s.copy_(step.actnorm.log_scale.view_as(norm.s))
            norm.t.copy_(step.shift().view_as(norm.t))
            norm.data_dep_init_done.fill_(1.0)
            # its forward applies (P L U)^-1: factor W^-1, so that it applies W
            p, low, up = torch.linalg.lu(torch.linalg.inv(step.weight().double()))
            diag = up.diagonal()
            mix.P.copy_(p)
            mix.L.copy_(low)
            mix.U.copy_(torch.triu(up, 1))
            mix.sign_S.copy_(diag.sign())
            mix.log_S.copy_(diag.abs().log())
        layers += [norm, mix, couple]
        params += [norm.s, norm.t, mix.L, mix.U, mix.log_S]
    flow = nf.NormalizingFlow(q0=None, flows=layers)
    return lambda x: nll_root(*flow.forward_and_log_det(x)), params


def build(
    *, config: str, depth: int, batch: int, channels: int, size: int, hidden: int, device: str = "cpu"
) -> Workload:
    """The builder ``invfunc._measure.measure`` runs in the child process (``"flows:build"``)."""
    steps = [_Step(channels, hidden, device) for _ in range(depth)]
    data = torch.randn(batch, channels, size, size, device=device)
    flow = inv.chain(*(op for step in steps for op in (step.norm, step.mix, step.couple)))
    with torch.no_grad():  # ActNorm's data-dependent initialisation, before anything is copied
        z, ladj = flow(data)
        if not float(nll_root(z, ladj).square()) > 0:
            raise ValueError(f"flows.build: the NLL per dimension is not positive ({config}, D={depth})")
    subnets = [p for step in steps for p in step.net.parameters()]
    own = [p for step in steps for p in step.own_params()]
    model: Callable[[torch.Tensor], torch.Tensor]
    if config == "plain":
        model = lambda x: nll_root(*flow(x))  # noqa: E731
    elif config == "checkpoint":
        model = _torch_checkpointed(steps)
    elif config == "invfunc":
        model = lambda x: nll_root(*inv.invertible_call(flow, x, free=[0]))  # noqa: E731
    elif config == "invfunc-checkpoint":
        model = lambda x: nll_root(*inv.invertible_call(flow, x, mode="checkpoint"))  # noqa: E731
    elif config in ("freia", "freia-checkpoint"):
        model, own = _freia(steps, (channels, size, size), checkpointed=config == "freia-checkpoint")
    elif config == "normflows":
        model, own = _normflows(steps, channels)
    else:
        raise ValueError(f"unknown config {config!r}; expected one of {', '.join(CONFIGS)}")
    return Workload(model, subnets + own, data)


# -- running -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEFAULTS["depths"]), help="Glow steps")
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="batch size B")
    parser.add_argument("--channels", type=int, default=DEFAULTS["channels"], help="channels C (even)")
    parser.add_argument("--size", type=int, default=DEFAULTS["size"], help="height and width S")
    parser.add_argument("--hidden", type=int, default=DEFAULTS["hidden"], help="subnet width W")
    parser.add_argument(
        "--steps",
        type=int,
        default=DEFAULTS["steps"],
        help="timed steps after the warm-up; time is their median",
    )
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps (default 1)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole table this many times (every other round in reverse order); time / plain "
        "is the median over rounds of the ratio to plain autograd in the same round (default 1)",
    )
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS), metavar="CONFIG")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output folder")
    parser.add_argument(
        "--note", default="", help="a line of free text for the report (the machine's load, say)"
    )
    args = parser.parse_args(argv)
    args.depths = sorted(set(args.depths))
    args.configs = sorted(dict.fromkeys(args.configs), key=CONFIGS.index)
    sizes = (args.batch, args.size, args.hidden, args.steps, args.warmup, args.threads, args.rounds)
    if min(args.depths) < 1 or min(sizes) < 1:
        parser.error("depths, batch, size, hidden, steps, warmup, threads and rounds must be at least 1")
    if args.channels < 2 or args.channels % 2:
        parser.error("--channels must be even (the coupling splits the channels into equal halves)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    args.workload = "flows"
    return args


def run_one(args: argparse.Namespace, depth: int, config: str, grads: Path) -> dict[str, Any]:
    """Measure one configuration at one depth; a row of the results."""
    row: dict[str, Any] = {"config": config, "depth": depth, "status": "ok"}
    reason = peer_status(config)
    if reason is not None:
        return {**row, "status": reason}
    options = {
        "config": config,
        "depth": depth,
        "batch": args.batch,
        "channels": args.channels,
        "size": args.size,
        "hidden": args.hidden,
    }
    return R.measure_row(args, row, "flows:build", options, grads)


def _shared(grads: list[torch.Tensor], depth: int) -> list[torch.Tensor]:
    """The gradients every configuration shares: the subnets' parameters, then the input."""
    return [*grads[: SUBNET_PARAMS * depth], grads[-1]]


def _max_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return max((float((x.double() - y.double()).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)


def compare(row: dict[str, Any], ref: dict[str, Any], ref_grads: Path, grads: Path) -> None:
    """Ratios to plain autograd's row at the same depth and the gradient differences (see
    the module's docstring): ``grad_diff_shared`` over the subnets and the input for every
    row, ``grad_diff`` over every parameter and the input for invfunc's own parameters."""
    row["time_ratio"] = row["step_ms"] / ref["step_ms"]
    row["memory_ratio"] = row["peak_mib"] / ref["peak_mib"] if ref["peak_mib"] > 0 else math.nan
    ga: list[torch.Tensor] = torch.load(ref_grads, weights_only=True)
    gb: list[torch.Tensor] = torch.load(grads, weights_only=True)
    mine, theirs = _shared(gb, row["depth"]), _shared(ga, row["depth"])
    row["checksum_shared"] = sum(float(g.abs().sum(dtype=torch.float64)) for g in mine)
    ref_sum = sum(float(g.abs().sum(dtype=torch.float64)) for g in theirs)
    row["grad_diff_shared"] = _max_diff(theirs, mine)
    if row["config"] in INVFUNC_PARAMS:
        row["grad_diff"] = _max_diff(ga, gb)
        row["checksum_rel"] = abs(row["checksum"] - ref["checksum"]) / abs(ref["checksum"])
    else:
        row["checksum_rel"] = abs(row["checksum_shared"] - ref_sum) / abs(ref_sum)
    row["grads_match"] = row["checksum_rel"] <= CHECKSUM_RTOL


# -- reporting -----------------------------------------------------------------------------


def _load() -> list[float] | None:
    """The host's load averages over 1, 5 and 15 minutes (None where unknown)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment(args: argparse.Namespace) -> dict[str, Any]:
    env = R.environment(argparse.Namespace(configs=[]))
    env["peers"] = {PEERS[c][0]: peer_version(c) for c in args.configs if c in PEERS}
    return env


def report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    """The Markdown report: a summary across depths, then every row in detail."""
    by = {(r["config"], r["depth"]): r for r in rows}
    ds = args.depths
    cuda = args.device.startswith("cuda")
    mem, key = ("peak CUDA MiB", "cuda_peak_mib") if cuda else ("peak MiB", "peak_mib")
    header = ["config", *(f"{mem} D={d}" if i == 0 else f"D={d}" for i, d in enumerate(ds))]
    header += [f"time / plain D={d}" if i == 0 else f"D={d}" for i, d in enumerate(ds)]
    summary = [
        [
            LABELS[c],
            *(R._cell(by[c, d], key, ".1f") for d in ds),
            *(R._cell(by[c, d], "time_ratio", ".2f") for d in ds),
        ]
        for c in args.configs
    ]
    rounds = args.rounds > 1
    detail_header = [
        "config",
        "D",
        mem,
        "ms / step",
        "time / plain",
        "NLL / dim",
        "grad checksum (subnets + input)",
        "max grad diff (subnets + input)",
        "max grad diff (all)",
        "grads",
        *(["rounds (time / plain)"] if rounds else []),
    ]
    cells = [(key, ".1f"), ("step_ms", ".1f"), ("time_ratio", ".2f"), ("loss", ".6g")]
    cells += [("checksum_shared", ".10g"), ("grad_diff_shared", ".1e"), ("grad_diff", ".1e")]
    detail = R.detail_rows(by, args.configs, ds, LABELS, cells, rounds)
    errors = R.error_lines(rows, LABELS)
    env = environment(args)
    peers = ", ".join(f"{name} {v or 'not installed'}" for name, v in env["peers"].items())
    lines = [
        f"# {TITLE}",
        "",
        describe(args.batch, args.channels, args.size, args.hidden) + ".",
        "Loss: NLL per dimension under a standard normal prior; float32; device "
        f"{args.device}; {args.threads} thread(s) per child process; time = median of {args.steps} "
        f"steps after {args.warmup} warm-up step(s)"
        + (
            f"; {args.rounds} rounds over the whole table (every other one in reverse order): "
            "ms / step is the median of the rounds' times, time / plain the median of the rounds' "
            "ratios to plain autograd in the same round, listed under 'rounds'"
            if rounds
            else ""
        )
        + "; peak = growth of "
        + ("torch.cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM)")
        + " during one step; ratios to plain autograd in the same run.",
        f"torch {env['torch']}, Python {env['python']}, {env['machine']}, {env['date']}"
        + (f"; peers: {peers}" if peers else "")
        + ".",
        *([args.note] if args.note else []),
        *(
            [f"Host load average (1, 5, 15 min) at the start {args.load[0]}, at the end {args.load[-1]}."]
            if getattr(args, "load", None) and None not in args.load
            else []
        ),
        "",
        markdown_table(header, summary),
        "",
        "Gradients after the first step, against plain autograd's: the subnets' parameters and the "
        "input mean the same in every configuration (checksum = sum of |grad| over them; max grad "
        "diff = largest absolute difference); 'all' adds the ActNorm and 1x1-convolution parameters, "
        "for the rows that share invfunc's parametrisation. 'match' = checksum within "
        f"{CHECKSUM_RTOL:g} relative of plain autograd's (over every parameter for invfunc's rows, "
        "over the subnets and the input for the peers). FrEIA's 1x1 convolution is fixed (FrEIA 0.2 "
        "has no learned one).",
        "",
        markdown_table(detail_header, detail),
    ]
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines) + "\n"


def plot(args: argparse.Namespace, rows: list[dict[str, Any]], path: Path) -> str:
    title = f"{TITLE}, B={args.batch}, C={args.channels}, {args.size}x{args.size}, subnet width {args.hidden}"
    return R.plot(args, rows, path, labels=LABELS, title=title, xlabel="depth D (Glow steps)")


def replot(path: Path) -> str:
    """Draw ``flows.png`` again from a saved ``flows.json`` (no run)."""
    return R.redraw(path, plot)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if R.replotted(argv, replot):
        return 0
    args = parse_args(argv)
    print(describe(args.batch, args.channels, args.size, args.hidden), file=sys.stderr)
    print(f"depths {args.depths}; configs {', '.join(args.configs)}", file=sys.stderr)
    args.load = [_load()]
    rows = R.run_all(args, measure_one=run_one, compare=compare)
    args.load.append(_load())
    text = report(args, rows)
    print(text)
    blob = {
        "workload": "flows",
        "settings": R.settings(args),
        "environment": environment(args),
        "results": rows,
    }
    R.save(args.out, "flows", text, blob, lambda png: plot(args, rows, png))
    bad = [r for r in rows if r["status"] == "error" or r.get("grads_match") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
