"""Workloads of BENCHMARK.md and the adapters that run them under each configuration.

Every configuration of a workload computes the same math on the same weights and data:
the couplings ``y1 = x1 + F(x2); y2 = x2 + G(y1)`` on the halves of the input along
``dim``, with the ``(F, G)`` pairs built first (so the seed fixes the weights) and the
batch drawn after them, the loss ``y.square().mean()`` (applied by ``invfunc._measure``)
and the parameters listed F1, G1, F2, G2, ... in every configuration, so gradient
checksums and gradient differences compare like with like.

Peers are optional imports, imported only by the configuration that needs them:

- MemCNN 1.5.2: ``InvertibleModuleWrapper(AdditiveCoupling(F, G, split_dim=dim),
  keep_input=False, keep_input_inverse=False)`` per block, in an ``nn.Sequential``.
  ``AdditiveCoupling`` splits with ``torch.chunk(x, 2, dim=split_dim)`` (+ ``contiguous``)
  and concatenates, the same orientation as ``invfunc.couple``. The input goes in through
  a free alias ``x.view_as(x)``: MemCNN 1.5.2 doubles the gradient of a leaf input (see
  ``_memcnn_model``).
- RevLib 1.7.2: ``ReversibleSequential(F1, G1, F2, G2, ..., split_dim=dim)``. It chunks the
  input along ``split_dim`` into streams ``(x1, x2)``; each module ``m`` maps
  ``(a, b) -> (b, a + m(b))``, so the pair ``(F, G)`` gives ``(y1, y2)`` exactly as
  ``couple(F, G)`` does; the output is ``cat`` along ``split_dim``. An even number of modules
  is needed for that orientation (always the case here).
- InvTorch 0.5.0: an ``invtorch.nn.Module`` subclass per block whose ``function`` /
  ``inverse`` are the coupling and its inverse (chunk + cat along ``dim``), in a plain
  ``nn.Sequential`` so each block is its own checkpoint (``invtorch.nn.Sequential`` would
  make the whole stack one checkpoint and re-run it all at once in backward).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as tf
from torch import nn

from invfunc._measure import CONFIGS as TORCH_CONFIGS
from invfunc._measure import Workload, coupled_model, mlp_pairs, pair_params

__all__ = [
    "CONFIGS",
    "LABELS",
    "PEERS",
    "WORKLOADS",
    "build",
    "describe",
    "peer_status",
    "peer_version",
    "supports",
]

Pairs = list[tuple[nn.Module, nn.Module]]

#: Every configuration, in the order rows are reported.
CONFIGS = (
    "plain",
    "checkpoint",
    "memcnn",
    "revlib",
    "invtorch",
    "invfunc",
    "invfunc-per-block",
    "invfunc-input-kept",
    "invfunc-per-block-pairs",
    "invfunc-generic",
    "invfunc-exact",
)

#: Peer configurations: the module to import and the version BENCHMARK.md measured.
PEERS = {"memcnn": ("memcnn", "1.5.2"), "revlib": ("revlib", "1.7.2"), "invtorch": ("invtorch", "0.5.0")}

LABELS = {
    "plain": "plain autograd",
    "checkpoint": "torch checkpoint",
    "memcnn": "MemCNN",
    "revlib": "RevLib",
    "invtorch": "InvTorch",
    "invfunc": "invfunc (one call)",
    "invfunc-per-block": "invfunc (call per block)",
    "invfunc-input-kept": "invfunc (one call, input kept)",
    "invfunc-per-block-pairs": "invfunc (call per block on pairs, input kept)",
    "invfunc-generic": "invfunc (one call, blocks written as generic invertibles)",
    "invfunc-exact": "invfunc (one call, exact couplings)",
}

#: Per workload: what it is, its default sizes and what ``--hidden`` means there.
WORKLOADS: dict[str, dict[str, Any]] = {
    "mlp": {
        "title": "Reversible MLP (reference workload)",
        "depths": (8, 32, 128),
        "batch": 2048,
        "hidden": 256,
        "steps": 5,
        "shape": "input (B, 2H); F, G = Linear(H, H) -> ReLU -> Linear(H, H)",
    },
    "conv": {
        "title": "Convolutional RevNet stage",
        "depths": (4, 8, 16),
        "batch": 16,
        "hidden": 32,
        "steps": 5,
        "shape": "input (B, 2H, 32, 32) split on channels; F, G = Conv3x3(H, H) -> ReLU -> Conv3x3(H, H)",
    },
    "transformer": {
        "title": "Reversible transformer",
        "depths": (4, 8, 16),
        "batch": 16,
        "hidden": 128,
        "steps": 5,
        "shape": "input (B, 64, 2H) split on the last dim; F = pre-LayerNorm 4-head self-attention, "
        "G = pre-LayerNorm MLP H -> 4H -> GELU -> H",
    },
    "lsh": {
        "title": "Reversible transformer with LSH-bucketed attention",
        "depths": (4, 8, 16),
        "batch": 16,
        "hidden": 128,
        "steps": 5,
        "shape": "input (B, 64, 2H) split on the last dim; F = pre-LayerNorm 4-head attention within "
        "LSH buckets (argmax over 4 random rotations and their negatives, as Reformer), "
        "G = pre-LayerNorm MLP H -> 4H -> GELU -> H",
    },
    "tiny": {
        "title": "Tiny MLP (per-block Python overhead; memory is noise here)",
        "depths": (32,),
        "batch": 8,
        "hidden": 64,
        "steps": 50,
        "shape": "input (B, 2H); F, G = Linear(H, H) -> ReLU -> Linear(H, H)",
    },
}

_SEQ = 64
_HEADS = 4


def peer_status(config: str, peers: dict[str, tuple[str, str]] = PEERS) -> str | None:
    """None if ``config`` can run here, else why not (``"not installed"``); ``peers`` maps
    peer configurations to (package, version measured)."""
    if config in peers and importlib.util.find_spec(peers[config][0]) is None:
        return "not installed"
    return None


def peer_version(config: str, peers: dict[str, tuple[str, str]] = PEERS) -> str | None:
    """The installed version of a peer configuration's package, or None."""
    if config not in peers or peer_status(config, peers) is not None:
        return None
    try:
        return importlib.metadata.version(peers[config][0])
    except importlib.metadata.PackageNotFoundError:
        return None


def supports(workload: str, config: str) -> bool:
    """Whether ``config`` runs ``workload`` naturally (otherwise its row says ``n/a``).

    Every configuration takes the split dimension as an argument (MemCNN ``split_dim``,
    RevLib ``split_dim``, InvTorch and invfunc by construction), so all run everything.
    """
    return workload in WORKLOADS and config in CONFIGS


# -- (F, G) pairs ------------------------------------------------------------------------


def _conv_pairs(depth: int, hidden: int, device: str) -> Pairs:
    def conv() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 3, padding=1)
        ).to(device)

    return [(conv(), conv()) for _ in range(depth)]


class _Attention(nn.Module):
    """Pre-LayerNorm multi-head self-attention on ``(B, T, width)``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        qkv = self.qkv(self.norm(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        att = tf.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.out(att.transpose(1, 2).reshape(b, t, w))


class _LSHAttention(nn.Module):
    """Pre-LayerNorm self-attention within LSH buckets, Reformer's shared-QK form: a
    position's bucket (per head) is the argmax of its query-key vector rotated by a fixed
    random matrix, and of its negation; it attends to the positions of its own bucket. The
    argmax is a discrete choice that a rebuilt input can flip (NOTE [Discrete choices])."""

    def __init__(self, width: int, heads: int, buckets: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qk = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.register_buffer("rot", torch.randn(width // heads, buckets // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        n = self.norm(x)
        qk = self.qk(n).view(b, t, self.heads, -1).transpose(1, 2)
        v = self.v(n).view(b, t, self.heads, -1).transpose(1, 2)
        r = qk @ self.rot
        bucket = torch.cat([r, -r], -1).argmax(-1)
        same = bucket[..., :, None] == bucket[..., None, :]
        att = tf.scaled_dot_product_attention(qk, tf.normalize(qk, dim=-1), v, attn_mask=same)
        return self.out(att.transpose(1, 2).reshape(b, t, w))


def _transformer_pairs(depth: int, hidden: int, device: str, lsh: bool = False) -> Pairs:
    def mlp() -> nn.Module:
        return nn.Sequential(
            nn.LayerNorm(hidden), nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)
        ).to(device)

    def attention() -> nn.Module:
        return (_LSHAttention if lsh else _Attention)(hidden, _HEADS).to(device)

    return [(attention(), mlp()) for _ in range(depth)]


def _pairs_and_data(
    workload: str, depth: int, batch: int, hidden: int, device: str
) -> tuple[Pairs, torch.Tensor, int]:
    if workload in ("mlp", "tiny"):
        pairs = mlp_pairs(depth, hidden, device=device)
        return pairs, torch.randn(batch, 2 * hidden, device=device), 1
    if workload == "conv":
        pairs = _conv_pairs(depth, hidden, device)
        return pairs, torch.randn(batch, 2 * hidden, 32, 32, device=device), 1
    if workload in ("transformer", "lsh"):
        pairs = _transformer_pairs(depth, hidden, device, lsh=workload == "lsh")
        return pairs, torch.randn(batch, _SEQ, 2 * hidden, device=device), -1
    raise ValueError(f"unknown workload {workload!r}; expected one of {', '.join(WORKLOADS)}")


# -- peer adapters -----------------------------------------------------------------------


def _memcnn_model(pairs: Pairs, dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    import memcnn

    net = nn.Sequential(
        *(
            memcnn.InvertibleModuleWrapper(
                memcnn.AdditiveCoupling(F, G, split_dim=dim), keep_input=False, keep_input_inverse=False
            )
            for F, G in pairs
        )
    )
    # MemCNN 1.5.2 doubles the gradient of a *leaf* input: its backward both sets
    # ``input.grad`` and returns the gradient, which autograd then accumulates into that
    # same ``.grad``. A free alias (``view_as``) makes the input a non-leaf, the way a
    # reversible stack sits behind a stem layer in practice; no copy, no extra time.
    return lambda x: net(x.view_as(x))  # type: ignore[no-any-return]


def _revlib_model(pairs: Pairs, dim: int) -> nn.Module:
    import revlib

    return revlib.ReversibleSequential(*(m for pair in pairs for m in pair), split_dim=dim)


def _invtorch_model(pairs: Pairs, dim: int) -> nn.Module:
    import invtorch

    class Coupling(invtorch.nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self, F: nn.Module, G: nn.Module) -> None:
            super().__init__()
            self.F, self.G = F, G

        def function(self, x: torch.Tensor) -> torch.Tensor:
            x1, x2 = x.chunk(2, dim)
            y1 = x1 + self.F(x2)
            return torch.cat([y1, x2 + self.G(y1)], dim)

        def inverse(self, y: torch.Tensor) -> torch.Tensor:
            y1, y2 = y.chunk(2, dim)
            x2 = y2 - self.G(y1)
            return torch.cat([y1 - self.F(x2), x2], dim)

    return nn.Sequential(*(Coupling(F, G) for F, G in pairs))


_PEER_MODELS: dict[str, Callable[[Pairs, int], Callable[[torch.Tensor], torch.Tensor]]] = {
    "memcnn": _memcnn_model,
    "revlib": _revlib_model,
    "invtorch": _invtorch_model,
}


def build(
    *, workload: str, config: str, depth: int, batch: int, hidden: int, device: str = "cpu"
) -> Workload:
    """The builder ``invfunc._measure.measure`` runs in the child process (``"workloads:build"``)."""
    pairs, data, dim = _pairs_and_data(workload, depth, batch, hidden, device)
    model: Callable[[torch.Tensor], torch.Tensor]
    if config in TORCH_CONFIGS:
        model = coupled_model(config, pairs, dim=dim)
    elif config in _PEER_MODELS:
        model = _PEER_MODELS[config](pairs, dim)
    else:
        raise ValueError(f"unknown config {config!r}; expected one of {', '.join(CONFIGS)}")
    return Workload(model, pair_params(pairs), data)


def describe(workload: str, batch: int, hidden: int) -> str:
    """One line naming the workload and its sizes."""
    spec = WORKLOADS[workload]
    return f"{spec['title']}: B={batch}, H={hidden}; {spec['shape']}"
