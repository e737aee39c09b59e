"""A Glow-like multi-scale flow on synthetic images, trained by maximum likelihood.

The images (1 x 16 x 16, 5 bits per pixel as Glow uses for CelebA-HQ) are made in code
from a seed: a grey background with two shapes (discs, squares, striped squares) of
random place, size and brightness, and a little noise. They are dequantized with uniform
noise, and the loss is the negative log-likelihood of the discrete images in bits per
dimension, as Glow reports it.

The flow is Glow's multi-scale architecture, factor-out included, at two scales:
``squeeze(2)`` then ``depth`` steps of ``actnorm -> conv1x1 (LU) -> affine_coupling`` (a
small conv net, its last conv zero initialised so each coupling starts as the identity)
on ``(B, 4, 8, 8)``; then ``ops.split()`` halves the channels and ``invfunc.at(1, rest)``
runs the rest of the flow, ``squeeze(2)`` and ``depth`` steps on ``(B, 8, 4, 4)``, on the
second half, while the first, a finished latent ``(B, 2, 8, 8)``, passes through. The
flow returns ``(z1, z2, ladj)``: the likelihood is the standard normal's on every latent
plus the log-det, and sampling draws each latent at its own shape and runs
``flow.inverse(z1, z2)``. ``build(scales=3)`` factors out once more, as Glow does at
larger sizes.

The same flow trains under plain autograd and under ``invfunc.invertible_call`` from the
same seed. Every block's input is freed after the forward and rebuilt by the inverse in
backward, the batch itself too (named in ``free=[x]``: the first squeeze, which reads no
parameters, runs as one block with the first ActNorm, which rebuilds the batch through it).
``at`` runs its chain block by block, so memory stays flat in depth there too; ``z1``,
passed through those blocks, is kept once. In float32 the two bits/dim curves start
equal to round-off (7e-7 over the first 30 steps) and drift apart slowly as training
amplifies it (2.4e-5 over 50 steps with one thread, as the thread count sets the
round-off; 7.7e-4 over 300); in float64 (``--float64``) they agree to 1.8e-15. Samples
come from the inverse flow, run memory-efficiently too (``invertible_call(flow.inverse,
z1, z2)``).

    python examples/glow_images.py                       # 4.331 -> 2.81 bits/dim in 300 steps
    python examples/glow_images.py --steps 50            # 4.331 -> 3.249; curves agree to 2.4e-5
    python examples/glow_images.py --float64 --steps 30  # 4.503 -> 3.403; curves agree to 1.8e-15
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn

import invfunc as inv
from invfunc import ops

N_BITS = 5
N_BINS = 2**N_BITS
SHAPES = 2


def images(n: int, generator: torch.Generator, size: int = 16) -> torch.Tensor:
    """``n`` synthetic images ``(n, 1, size, size)`` of integers in ``[0, N_BINS)``: a grey
    background and two shapes (a disc, a square or a striped square) with a little noise."""
    pos = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = pos.view(size, 1), pos.view(1, size)
    img = (0.1 + 0.3 * torch.rand(n, 1, 1, generator=generator)).expand(n, size, size).clone()
    for _ in range(SHAPES):
        cy, cx = (size * (0.2 + 0.6 * torch.rand(2, n, 1, 1, generator=generator))).unbind(0)
        r = size * (0.12 + 0.18 * torch.rand(n, 1, 1, generator=generator))
        level = 0.5 + 0.5 * torch.rand(n, 1, 1, generator=generator)
        kind = torch.randint(0, 3, (n, 1, 1), generator=generator)
        disc = (yy - cy).square() + (xx - cx).square() < r.square()
        square = ((yy - cy).abs() < r) & ((xx - cx).abs() < r)
        stripes = square & ((yy - cy + size).div(2, rounding_mode="floor") % 2 == 0)
        mask = torch.where(kind == 0, disc, torch.where(kind == 1, square, stripes))
        img = torch.where(mask, level, img)
    img = img + 0.02 * torch.randn(n, size, size, generator=generator)
    return (img.clamp(0, 1) * (N_BINS - 1)).round().unsqueeze(1)


def dequantize(k: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Integers in ``[0, N_BINS)`` to reals in ``[-0.5, 0.5)``, uniformly within each bin."""
    u = torch.rand(k.shape, generator=generator).to(torch.get_default_dtype())
    return (k.to(u.dtype) + u) / N_BINS - 0.5


def conv_net(c_in: int, c_out: int, hidden: int) -> nn.Module:
    """The conditioner of one coupling (Glow's: 3x3, 1x1, 3x3 convs), the last one zero
    initialised so that the coupling starts as the identity."""
    last = nn.Conv2d(hidden, c_out, 3, padding=1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(
        nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(), last
    )


def flow_steps(c: int, depth: int, hidden: int) -> list[inv.Invertible]:
    """``depth`` flow steps on ``c`` channels: actnorm, conv1x1 (LU), affine coupling."""
    blocks: list[inv.Invertible] = []
    for _ in range(depth):
        net = conv_net(c // 2, 2 * (c - c // 2), hidden)
        blocks += [ops.actnorm(c), ops.conv1x1(c), ops.affine_coupling(net)]
    return blocks


def build(channels: int = 1, depth: int = 4, hidden: int = 32, scales: int = 2) -> inv.Invertible:
    """Glow's multi-scale flow: ``scales`` x [squeeze(2), ``depth`` steps], and after each
    scale but the last, ``split()`` then ``at(1, <the next scales>)``: the first half of
    the channels is a finished latent, and the rest of the flow acts on the second half.
    It returns ``(*latents, ladj)``, the latents in the order they were factored out."""
    c = 4 * channels
    blocks: list[inv.Invertible] = [ops.squeeze(2), *flow_steps(c, depth, hidden)]
    if scales > 1:
        rest = build(c - c // 2, depth, hidden, scales - 1)
        blocks += [ops.split(), inv.at(1, rest)]
    return inv.chain(*blocks)


def latent_shapes(size: int = 16, channels: int = 1, scales: int = 2) -> list[tuple[int, int, int]]:
    """The shapes ``(C, H, W)`` of the latents that :func:`build` makes of a ``channels x
    size x size`` image: half of the channels at each scale but the last, all at the last."""
    shapes = []
    c, s = channels, size
    for scale in range(scales):
        c, s = 4 * c, s // 2
        if scale < scales - 1:
            shapes.append((c // 2, s, s))
            c -= c // 2
    return [*shapes, (c, s, s)]


def bits_per_dim(flow: inv.Invertible, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The negative log-likelihood of the discrete images behind the dequantized ``x``, in
    bits per dimension: ``(-log p(x) + D log N_BINS) / (D log 2)``, under ``invertible_call``;
    ``log p(x)`` is the log-det plus the standard normal's log-density of every latent."""
    dims = x[0].numel()  # (read before the call frees x: reading it after would rebuild it)
    *zs, ladj = inv.invertible_call(flow, x, mode=mode, free=[x])  # x: a batch we need not keep
    log_pz = sum(-0.5 * (z.square() + math.log(2 * math.pi)).flatten(1).sum(1) for z in zs)
    nll = -(log_pz + ladj) + dims * math.log(N_BINS)
    return nll.mean() / (dims * math.log(2))


def train(
    mode: str,
    steps: int = 300,
    batch: int = 64,
    depth: int = 4,
    hidden: int = 32,
    size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    scales: int = 2,
) -> tuple[inv.Invertible, list[float]]:
    """Train a fresh flow under ``mode`` ("plain" or "invertible") on fresh batches of
    images; return it and its bits/dim per step."""
    torch.manual_seed(seed)
    flow = build(depth=depth, hidden=hidden, scales=scales)
    model = inv.as_module(flow)
    data = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        flow(dequantize(images(256, data, size), data))  # ActNorm initialises on a first batch
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    curve = []
    for _ in range(steps):
        x = dequantize(images(batch, data, size), data)
        loss = bits_per_dim(flow, x, mode)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return flow, curve


@torch.no_grad()
def sample(
    flow: inv.Invertible,
    n: int,
    size: int = 16,
    temperature: float = 0.8,
    seed: int = 0,
    scales: int = 2,
) -> torch.Tensor:
    """``n`` images in ``[0, 1]`` from the inverse flow (built with ``scales``), at a reduced
    temperature (Glow's trick: every latent ``z ~ N(0, T^2 I)`` with ``T < 1`` gives
    cleaner images)."""
    generator = torch.Generator().manual_seed(seed)
    zs = [
        temperature * torch.randn(n, *shape, generator=generator) for shape in latent_shapes(size, 1, scales)
    ]
    x, _ = inv.invertible_call(flow.inverse, *(z.to(torch.get_default_dtype()) for z in zs))
    return (x + 0.5).clamp(0, 1)


@torch.no_grad()
def round_trip_error(flow: inv.Invertible, size: int = 16) -> float:
    """The largest error of ``flow.inverse(*latents)`` against the ``x`` whose latents
    ``flow(x)`` gave, on a batch of dequantized images."""
    data = torch.Generator().manual_seed(99)
    x = dequantize(images(64, data, size), data)
    *zs, _ = flow(x)
    back, _ = flow.inverse(*zs)
    return (back - x).abs().max().item()


def grid(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Images ``(rows * cols, 1, H, W)`` tiled into one ``(rows * (H + 1), cols * (W + 1))``."""
    n, _, h, w = x.shape
    cols = n // rows
    padded = torch.ones(rows, cols, h + 1, w + 1)
    padded[:, :, :h, :w] = x[: rows * cols, 0].reshape(rows, cols, h, w).float()
    return padded.permute(0, 2, 1, 3).reshape(rows * (h + 1), cols * (w + 1))


def plot(flow: inv.Invertible, curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = images(64, torch.Generator().manual_seed(123)) / (N_BINS - 1)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), gridspec_kw={"width_ratios": [1, 1, 1.3]})
    for ax, x, title in ((axes[0], data, "data"), (axes[1], sample(flow, 64), "samples (T = 0.8)")):
        ax.imshow(grid(x, 8).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    for mode, style in (("plain", "-"), ("invertible", "--")):
        axes[2].plot(curves[mode], style, label=mode)
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("bits / dim")
    axes[2].set_title("training loss")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4, help="flow steps per scale")
    parser.add_argument("--hidden", type=int, default=32, help="channels of the coupling nets")
    parser.add_argument("--float64", action="store_true", help="train in float64 (curves agree to ~1e-15)")
    parser.add_argument("--plot", type=Path, default=Path("glow_samples.png"))
    args = parser.parse_args(argv)
    if args.float64:
        torch.set_default_dtype(torch.float64)
    curves = {}
    for mode in ("plain", "invertible"):
        start = time.perf_counter()
        flow, curves[mode] = train(mode, args.steps, args.batch, args.depth, args.hidden)
        took = time.perf_counter() - start
        print(f"{mode:10s}: bits/dim {curves[mode][0]:.3f} -> {curves[mode][-1]:.3f} ({took:.1f} s)")
    gap = max(abs(a - b) for a, b in zip(curves["plain"], curves["invertible"]))
    print(f"largest difference between the two loss curves: {gap:.1e}")
    print(f"round trip |flow.inverse(flow(x)) - x|: {round_trip_error(flow):.1e}")
    plot(flow, curves, args.plot)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
