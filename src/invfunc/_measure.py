"""Measure training steps in a fresh child process: peak memory, time, loss, gradients.

Shared by the demo (``python -m invfunc``) and ``benchmarks/run.py``; needs only torch.

NOTE [How a step is measured]

1. Every configuration runs in its own child process (``python -c``), started with
   ``MALLOC_MMAP_THRESHOLD_=65536`` so freed blocks go back to the OS at once, and
   with ``torch.set_num_threads(threads)``. Nothing measured earlier can inflate or
   hide what is measured later.
2. The child builds a :class:`Workload` with a builder named ``"module:function"``
   after ``torch.manual_seed(seed)``, so the same builder and seed give the same
   weights and data in every configuration.
3. One training step: zero the parameter gradients in place (they stay allocated,
   as with ``zero_grad(set_to_none=False)``), take a fresh leaf copy of the data
   that requires grad, ``loss = model(x).square().mean()``, ``loss.backward()``,
   then an optional SGD update ``p -= lr * p.grad``.
4. Step 0 records the gradient checksum (sum of ``|grad|`` over all parameters and
   the input) and, if asked, writes the gradients to a file so the parent can
   compare configurations with :func:`grad_difference`; a parameter that gets no
   gradient is an error, never a silent zero.
5. Peak memory is measured on the first step after the warm-up: reset the
   process's peak RSS (write ``5`` to ``/proc/self/clear_refs``), read ``VmRSS``
   as the baseline, run the step, read ``VmHWM``; the growth is the step's peak.
   On CUDA, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
   is reported as well.
6. Time is the median over the steps after the warm-up (CUDA synchronized).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from ._call import invertible_call
from ._chain import chain
from ._core import Invertible, invertible
from ._coupling import couple

__all__ = [
    "CONFIGS",
    "MeasureError",
    "Measurement",
    "Workload",
    "coupled_model",
    "grad_difference",
    "markdown_table",
    "measure",
    "mlp_pairs",
    "mlp_workload",
    "pair_params",
]

#: The configurations :func:`coupled_model` builds, all with the same math.
CONFIGS = (
    "plain",
    "checkpoint",
    "invfunc",
    "invfunc-per-block",
    "invfunc-input-kept",
    "invfunc-per-block-pairs",
    "invfunc-generic",
    "invfunc-exact",
)

_MiB = 1024.0 * 1024.0
_CHILD = "import sys; from invfunc._measure import _child_main; _child_main(sys.argv[1], sys.argv[2])"


class MeasureError(RuntimeError):
    """A measured configuration failed in its child process (the message has its stderr)."""


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model to train and the batch to train it on, as a builder returns it.

    Attributes:
        model: maps the input batch to the output; the loss is ``output.square().mean()``.
        params: the parameters, in an order every configuration of the same
            workload shares (gradients are compared position by position).
        data: the input batch; each step trains on a fresh leaf copy that requires grad.

    Examples:
        >>> import torch
        >>> lin = torch.nn.Linear(3, 3)
        >>> w = Workload(lin, list(lin.parameters()), torch.ones(2, 3))
        >>> w.model(w.data).shape
        torch.Size([2, 3])
    """

    model: Callable[[torch.Tensor], torch.Tensor]
    params: Sequence[torch.Tensor]
    data: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What :func:`measure` reports for one configuration.

    Attributes:
        peak_mib: growth of the peak RSS during one step after the warm-up, in MiB
            (NaN where ``/proc`` is missing).
        cuda_peak_mib: growth of ``torch.cuda.max_memory_allocated`` during that
            step, in MiB; None off CUDA.
        step_s: median seconds per step after the warm-up.
        step_times: seconds of every step after the warm-up.
        losses: the loss of every step, warm-up included.
        checksum: sum of ``|grad|`` over all parameters and the input, at step 0.

    Examples:
        >>> m = Measurement(10.0, None, 0.5, (0.4, 0.5, 0.6), (2.0, 1.5), 3.25)
        >>> m.loss, m.ms
        (1.5, 500.0)
    """

    peak_mib: float
    cuda_peak_mib: float | None
    step_s: float
    step_times: tuple[float, ...]
    losses: tuple[float, ...]
    checksum: float

    @property
    def loss(self) -> float:
        """The loss of the last step."""
        return self.losses[-1]

    @property
    def ms(self) -> float:
        """Median milliseconds per step."""
        return 1000.0 * self.step_s


def measure(
    builder: str,
    /,
    *,
    options: Mapping[str, Any] | None = None,
    steps: int = 5,
    warmup: int = 1,
    lr: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
    threads: int = 1,
    grads_path: str | os.PathLike[str] | None = None,
    path: Sequence[str] = (),
    timeout: float | None = None,
) -> Measurement:
    """Train a workload for a few steps in a fresh child process and measure it.

    See NOTE [How a step is measured] in this module for what is measured and how.

    Args:
        builder: ``"module:function"``; ``function(device=device, **options)`` returns a
            :class:`Workload`. It runs in the child after ``torch.manual_seed(seed)``.
        options: keyword arguments for the builder (JSON-serializable).
        steps: measured steps after the warm-up (the time is their median).
        warmup: steps run before measuring (at least 1).
        lr: SGD learning rate applied after every step (0: weights stay fixed).
        seed: the child's ``torch.manual_seed``.
        device: ``"cpu"`` or a CUDA device; passed to the builder.
        threads: ``torch.set_num_threads`` in the child.
        grads_path: if given, the child saves the step-0 gradients (parameters, then
            the input) there with ``torch.save``, for :func:`grad_difference`.
        path: folders prepended to the child's ``sys.path`` to import the builder.
        timeout: seconds before the child is killed.

    Returns:
        The :class:`Measurement`.

    Raises:
        MeasureError: the child failed; the message ends with its stderr.

    Examples:
        >>> opts = {"config": "invfunc", "depth": 2, "batch": 4, "hidden": 8}
        >>> m = measure("invfunc._measure:mlp_workload", options=opts, steps=2, lr=0.1)
        >>> len(m.step_times), len(m.losses)
        (2, 3)
        >>> m.checksum > 0 and m.losses[-1] < m.losses[0]
        True
    """
    if steps < 1 or warmup < 1:
        raise ValueError(
            f"measure({builder!r}, ...): steps and warmup must be >= 1, got {steps} and {warmup}."
        )
    if ":" not in builder:
        raise ValueError(f"measure({builder!r}, ...): the builder must be named as 'module:function'.")
    spec = {
        "builder": builder,
        "options": dict(options or {}),
        "steps": steps,
        "warmup": warmup,
        "lr": lr,
        "seed": seed,
        "device": device,
        "threads": threads,
        "grads_path": None if grads_path is None else os.fspath(grads_path),
        "path": [os.fspath(p) for p in path],
    }
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory(prefix="invfunc-measure-") as tmp:
        spec_file, result_file = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec_file.write_text(json.dumps(spec))
        cmd = [sys.executable, "-c", _CHILD, str(spec_file), str(result_file)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as e:
            raise MeasureError(f"measure({builder!r}, ...): the child ran past {timeout} s.") from e
        if proc.returncode != 0 or not result_file.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise MeasureError(f"measure({builder!r}, ...): the child exited with {proc.returncode}:\n{tail}")
        res = json.loads(result_file.read_text())
    return Measurement(
        peak_mib=res["peak_mib"],
        cuda_peak_mib=res["cuda_peak_mib"],
        step_s=statistics.median(res["step_times"]),
        step_times=tuple(res["step_times"]),
        losses=tuple(res["losses"]),
        checksum=res["checksum"],
    )


def grad_difference(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> float:
    """The largest absolute difference between two gradient files written by :func:`measure`.

    Args:
        a: a ``grads_path`` of one configuration.
        b: a ``grads_path`` of another configuration of the same workload.

    Returns:
        ``max |ga - gb|`` over every parameter and the input.

    Raises:
        ValueError: the files do not hold gradients of the same shapes.

    Examples:
        >>> import tempfile, os, torch
        >>> d = tempfile.mkdtemp()
        >>> torch.save([torch.ones(2), torch.zeros(3)], os.path.join(d, "a.pt"))
        >>> torch.save([torch.ones(2), torch.full((3,), 0.25)], os.path.join(d, "b.pt"))
        >>> grad_difference(os.path.join(d, "a.pt"), os.path.join(d, "b.pt"))
        0.25
    """
    ga: list[torch.Tensor] = torch.load(a, weights_only=True)
    gb: list[torch.Tensor] = torch.load(b, weights_only=True)
    if len(ga) != len(gb) or any(x.shape != y.shape for x, y in zip(ga, gb)):
        raise ValueError(
            f"grad_difference({os.fspath(a)!r}, {os.fspath(b)!r}): the gradients differ in number or shape; "
            "compare configurations of the same workload."
        )
    return max(
        (float((x.double() - y.double()).abs().max()) for x, y in zip(ga, gb) if x.numel()), default=0.0
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table with padded columns, numbers right-aligned.

    Args:
        header: the column titles.
        rows: the cells; each is printed with ``str``.

    Examples:
        >>> print(markdown_table(["config", "MiB"], [["plain", "12.5"], ["invfunc", "3.0"]]))
        | config  |  MiB |
        | ------- | ---: |
        | plain   | 12.5 |
        | invfunc |  3.0 |
    """
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(header))]
    numeric = [_is_numeric([r[i] for r in cells[1:]]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        padded = (c.rjust(w) if n else c.ljust(w) for c, w, n in zip(row, widths, numeric))
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join("-" * (w - 1) + ":" if n else "-" * w for w, n in zip(widths, numeric)) + " |"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _is_numeric(column: Sequence[str]) -> bool:
    """Numbers, with placeholders such as ``-`` or ``n/a`` (cells without digits) allowed."""

    def number(cell: str) -> bool:
        try:
            float(cell.rstrip("x%"))
        except ValueError:
            return False
        return True

    return any(number(c) for c in column) and all(
        number(c) or not any(ch.isdigit() for ch in c) for c in column
    )


# -- workloads ------------------------------------------------------------------------


class _Coupling(nn.Module):
    """The reference coupling in plain torch: ``y1 = x1 + F(x2); y2 = x2 + G(y1)``."""

    def __init__(self, F: nn.Module, G: nn.Module, dim: int) -> None:
        super().__init__()
        self.F, self.G, self.dim = F, G, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, self.dim)
        y1 = x1 + self.F(x2)
        return torch.cat([y1, x2 + self.G(y1)], self.dim)


def coupled_model(
    config: str, pairs: Sequence[tuple[nn.Module, nn.Module]], *, dim: int = 1
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A stack of additive couplings ``y1 = x1 + F(x2); y2 = x2 + G(y1)``, run under ``config``.

    Args:
        config: ``"plain"`` (ordinary autograd), ``"checkpoint"``
            (``torch.utils.checkpoint``, non-reentrant, one per block), ``"invfunc"``
            (one :func:`invfunc.invertible_call` over a :func:`invfunc.chain`, the input
            batch named in ``free=``, as InvTorch frees its input),
            ``"invfunc-per-block"`` (one call per block, the first with ``free=``),
            ``"invfunc-input-kept"`` (one call, the input batch kept: the default) or
            ``"invfunc-per-block-pairs"`` (one call per block on the pair of halves: the
            batch split into two views, kept, and the output halves joined at the end) or
            ``"invfunc-generic"`` (as ``"invfunc"``, each block written as a generic
            :func:`invfunc.invertible` with its inverse, as a user writes a block that
            :func:`invfunc.couple` does not cover: the engine's general backward) or
            ``"invfunc-exact"`` (as ``"invfunc"``, each block ``couple(F, G, exact=True)``:
            NOTE [Exact couplings]; the same model up to its grid, ``2^-16`` in float32).
        pairs: the ``(F, G)`` of each block, in order.
        dim: the dimension the input is split along.

    Returns:
        The model, a function of the input batch.

    Examples:
        >>> import torch
        >>> pairs = mlp_pairs(3, 4)
        >>> x = torch.randn(2, 8)
        >>> ref = coupled_model("plain", pairs)(x)
        >>> all(torch.allclose(coupled_model(c, pairs)(x), ref, atol=2**-14) for c in CONFIGS)
        True
    """
    plain = [_Coupling(F, G, dim) for F, G in pairs]
    if config == "plain":
        return nn.Sequential(*plain)
    if config == "checkpoint":

        def checkpointed(x: torch.Tensor) -> torch.Tensor:
            for block in plain:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            return x

        return checkpointed
    blocks = [couple(F, G, dim=dim, exact=config == "invfunc-exact") for F, G in pairs]
    if config == "invfunc-generic":
        blocks = [_generic_coupling(F, G, dim) for F, G in pairs]
    if config in ("invfunc", "invfunc-input-kept", "invfunc-generic", "invfunc-exact"):
        net = chain(*blocks)
        free = [] if config == "invfunc-input-kept" else [0]
        return lambda x: invertible_call(net, x, free=free)  # type: ignore[no-any-return]
    if config == "invfunc-per-block":

        def per_block(x: torch.Tensor) -> torch.Tensor:
            for k, block in enumerate(blocks):
                x = invertible_call(block, x, free=[0] if k == 0 else [])
            return x

        return per_block
    if config == "invfunc-per-block-pairs":

        def per_block_pairs(x: torch.Tensor) -> torch.Tensor:
            h = x.chunk(2, dim)  # views of the batch: kept, as in the input-kept row
            for block in blocks:
                h = invertible_call(block, *h)
            return torch.cat(h, dim)

        return per_block_pairs
    raise ValueError(f"coupled_model({config!r}, ...): unknown config; expected one of {', '.join(CONFIGS)}.")


def _generic_coupling(F: nn.Module, G: nn.Module, dim: int) -> Invertible:
    """The additive coupling written by hand as a generic invertible function."""

    def coupling(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim)
        y1 = x1 + F(x2)
        return torch.cat([y1, x2 + G(y1)], dim)

    def uncoupling(y: torch.Tensor) -> torch.Tensor:
        y1, y2 = y.chunk(2, dim)
        x2 = y2 - G(y1)
        return torch.cat([y1 - F(x2), x2], dim)

    return invertible(coupling, inverse=uncoupling)


def mlp_pairs(
    depth: int, hidden: int, *, device: str = "cpu", last_scale: float | None = None
) -> list[tuple[nn.Module, nn.Module]]:
    """``depth`` pairs ``(F, G)``, each ``Linear(hidden, hidden) -> ReLU -> Linear(hidden, hidden)``.

    With ``last_scale``, each last Linear starts with its weights scaled by it and a zero
    bias (no random draw more: the same seed gives the same data), so that the stream
    grows little with depth, as reversible-network practice initialises.

    Examples:
        >>> pairs = mlp_pairs(2, 4)
        >>> len(pairs), pairs[0][0]
        (2, Sequential(
          (0): Linear(in_features=4, out_features=4, bias=True)
          (1): ReLU()
          (2): Linear(in_features=4, out_features=4, bias=True)
        ))
    """

    def mlp() -> nn.Module:
        last = nn.Linear(hidden, hidden)
        m = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), last).to(device)
        if last_scale is not None:
            with torch.no_grad():
                last.weight.mul_(last_scale)
                last.bias.zero_()
        return m

    return [(mlp(), mlp()) for _ in range(depth)]


def pair_params(pairs: Sequence[tuple[nn.Module, nn.Module]]) -> list[torch.Tensor]:
    """The parameters of ``pairs`` in their canonical order: F1, G1, F2, G2, ...

    Examples:
        >>> len(pair_params(mlp_pairs(2, 4)))          # 2 blocks x (F, G) x 2 Linear x (weight, bias)
        16
    """
    return [p for F, G in pairs for m in (F, G) for p in m.parameters()]


def mlp_workload(
    *, config: str, depth: int, batch: int, hidden: int, device: str = "cpu", stable: bool = False
) -> Workload:
    """The reversible MLP of the reference benchmark under one of :data:`CONFIGS`.

    ``depth`` couplings of ``Linear -> ReLU -> Linear`` (:func:`mlp_pairs`) on a batch
    ``(batch, 2 * hidden)`` drawn after the weights, so a seed fixes both. With ``stable``
    (the demo's), F's and G's last layers start scaled by ``1 / sqrt(depth)`` so that SGD
    trains at any depth (the benchmark's network, without it, diverges from depth 64).

    Examples:
        >>> import torch
        >>> torch.manual_seed(0) is not None
        True
        >>> w = mlp_workload(config="checkpoint", depth=2, batch=3, hidden=4)
        >>> w.data.shape, len(w.params)
        (torch.Size([3, 8]), 16)
    """
    pairs = mlp_pairs(depth, hidden, device=device, last_scale=1 / math.sqrt(depth) if stable else None)
    data = torch.randn(batch, 2 * hidden, device=device)
    return Workload(coupled_model(config, pairs), pair_params(pairs), data)


# -- the child process -------------------------------------------------------------------


def _status_kib(field: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for row in f:
                if row.startswith(field + ":"):
                    return float(row.split()[1])
    except OSError:
        pass
    return math.nan


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _child_main(spec_file: str, result_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    sys.path[:0] = spec["path"]
    module, _, name = spec["builder"].partition(":")
    build = getattr(importlib.import_module(module), name)
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    torch.manual_seed(spec["seed"])
    work: Workload = build(device=spec["device"], **spec["options"])
    params = list(work.params)
    lr: float = spec["lr"]
    warmup: int = spec["warmup"]

    times: list[float] = []
    losses: list[float] = []
    peak, cuda_peak, checksum = math.nan, None, math.nan
    base, cuda_base = math.nan, 0
    for step in range(warmup + spec["steps"]):
        for p in params:
            if p.grad is not None:
                p.grad.zero_()
        x = work.data.detach().clone().requires_grad_()
        probe = step == warmup
        if probe:
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                cuda_base = torch.cuda.memory_allocated(device)
            _reset_peak_rss()
            base = _status_kib("VmRSS")
        t0 = time.perf_counter()
        loss = work.model(x).square().mean()
        torch.autograd.backward(loss)
        if cuda:
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        if probe:
            peak = (_status_kib("VmHWM") - base) / 1024.0
            if cuda:
                cuda_peak = (torch.cuda.max_memory_allocated(device) - cuda_base) / _MiB
        if step >= warmup:
            times.append(elapsed)
        losses.append(float(loss))
        if step == 0:
            grads = _step_grads(params, x)
            checksum = sum(float(g.abs().sum(dtype=torch.float64)) for g in grads)
            if spec["grads_path"] is not None:
                torch.save([g.detach().cpu() for g in grads], spec["grads_path"])
            del grads
        del loss, x
        if lr:
            with torch.no_grad():
                for p in params:
                    p.sub_(p.grad, alpha=lr)  # type: ignore[arg-type]

    result = {"peak_mib": peak, "cuda_peak_mib": cuda_peak, "step_times": times, "losses": losses}
    Path(result_file).write_text(json.dumps({**result, "checksum": checksum}))


def _step_grads(params: Sequence[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    grads = [p.grad for p in (*params, x)]
    missing = [i for i, g in enumerate(grads) if g is None]
    if missing:
        what = "the input" if missing == [len(params)] else f"parameters at positions {missing}"
        raise RuntimeError(f"measure: {what} got no gradient in the first step.")
    return [g for g in grads if g is not None]
