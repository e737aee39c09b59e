"""Check what docs/migration.md says about the peers, against the peers themselves.

Run it in an environment where the peers are installed (they are not invfunc's
dependencies, so the test suite does not run this):

    pip install torch==2.13.0 memcnn==1.5.2 revlib==1.7.2 invtorch==0.5.0 FrEIA==0.2 numpy scipy
    python docs/migration_peers.py            # every check
    python docs/migration_peers.py memcnn     # the checks whose name contains "memcnn"

It first runs every peer snippet of the page (the ```{code-block} python fences), then
each failure the page names, each in its own process (two of them end in a segmentation
fault), and prints what it measured: the numbers the page quotes. Exit status 1 if a
snippet fails or a check does not show what the page says.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

PAGE = Path(__file__).with_name("migration.md")
SNIPPET = re.compile(r"^```\{code-block\} python\s*\n(.*?)^```\s*$", re.M | re.S)


def mlp(h: int, p: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Linear(h, h), nn.Dropout(p), nn.ReLU(), nn.Linear(h, h))


def plain_couplings(pairs: list[tuple[nn.Module, nn.Module]], x: torch.Tensor) -> torch.Tensor:
    for F, G in pairs:
        x1, x2 = x.chunk(2, 1)
        y1 = x1 + F(x2)
        x = torch.cat([y1, x2 + G(y1)], 1)
    return x


def error_of(fn: Callable[[], object]) -> str:
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return "no error"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# -- InvTorch ------------------------------------------------------------------------------


def invtorch_model(pairs: list[tuple[nn.Module, nn.Module]]) -> nn.Sequential:
    import invtorch

    class Coupling(invtorch.nn.Module):  # type: ignore[misc,name-defined]
        def __init__(self, F: nn.Module, G: nn.Module) -> None:
            super().__init__()
            self.F, self.G = F, G

        def function(self, x: torch.Tensor) -> torch.Tensor:
            x1, x2 = x.chunk(2, dim=1)
            y1 = x1 + self.F(x2)
            return torch.cat([y1, x2 + self.G(y1)], dim=1)

        def inverse(self, y: torch.Tensor) -> torch.Tensor:
            y1, y2 = y.chunk(2, dim=1)
            x2 = y2 - self.G(y1)
            return torch.cat([y1 - self.F(x2), x2], dim=1)

    return nn.Sequential(*(Coupling(F, G) for F, G in pairs))


def check_invtorch_leaf_batch() -> bool:
    torch.manual_seed(0)
    model = invtorch_model([(mlp(8), mlp(8)) for _ in range(4)])
    batch = torch.randn(32, 16)
    before = batch.clone()
    y = model(batch)
    was_freed = batch.untyped_storage().nbytes() == 0
    y.sum().backward()
    off = (batch - before).abs().max().item()
    same = torch.equal(batch, before)
    print(f"leaf batch freed: {was_freed}; after backward off by {off:.1e}, bit-identical {same}")
    return was_freed and off > 0


def check_invtorch_autograd_grad() -> bool:
    torch.manual_seed(0)
    model = invtorch_model([(mlp(8), mlp(8)) for _ in range(2)])
    x = torch.randn(32, 16, requires_grad=True)
    params = list(model.parameters())
    e1 = error_of(lambda: torch.autograd.grad(model(x * 2).square().mean(), params))
    e2 = error_of(lambda: torch.autograd.grad(model(x * 2).square().mean(), [x]))
    print(f"autograd.grad(loss, params): {e1}\nautograd.grad(loss, [x]): {e2}")
    return "not have been used" in e1 and "not supported" in e2


def check_invtorch_dropout() -> bool:
    torch.manual_seed(0)
    x = torch.randn(32, 16, requires_grad=True)
    errors = []
    for seed in (False, True):
        model = invtorch_model([(mlp(8, 0.5), mlp(8, 0.5)) for _ in range(4)])
        for m in model:
            m.seed = seed
        torch.manual_seed(1)
        model(x * 2).square().mean().backward()
        got, x.grad = x.grad, None
        for m in model:
            m.checkpoint = False
        torch.manual_seed(1)
        model(x * 2).square().mean().backward()
        ref, x.grad = x.grad, None
        errors.append(rel(got, ref))
        print(f"seed={seed}: the input's gradient is {errors[-1]:.0%} off plain autograd's")
    return min(errors) > 0.01


def check_invtorch_read_freed() -> bool:
    torch.manual_seed(0)
    model = invtorch_model([(mlp(8), mlp(8))])
    x = torch.randn(32, 16, requires_grad=True)
    h = x * 2
    y = model(h)
    print(f"h freed: {h.untyped_storage().nbytes() == 0}; reading h + y ...", flush=True)
    print((h + y).sum())
    return False  # not reached: the process dies


def check_invtorch_batchnorm() -> bool:
    torch.manual_seed(0)
    F = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    model = invtorch_model([(F, mlp(8))])
    model(torch.randn(32, 16, requires_grad=True) * 2).square().sum().backward()
    n = F[1].num_batches_tracked.item()
    print(f"num_batches_tracked after one step: {n}")
    return n != 1


def check_invtorch_func_and_create_graph() -> bool:
    torch.manual_seed(0)
    model = invtorch_model([(mlp(8), mlp(8))])
    x = torch.randn(32, 16, requires_grad=True)
    e = error_of(lambda: torch.func.grad(lambda t: model(t * 2).square().sum())(x.detach()))
    model(x * 2).square().sum().backward(create_graph=True)
    print(f"torch.func.grad: {e}\nbackward(create_graph=True): x.grad.requires_grad {x.grad.requires_grad}")
    return e != "no error" and not x.grad.requires_grad


# -- MemCNN --------------------------------------------------------------------------------


def memcnn_model(pairs: list[tuple[nn.Module, nn.Module]], **options: bool) -> nn.Sequential:
    import memcnn

    return nn.Sequential(
        *(
            memcnn.InvertibleModuleWrapper(
                memcnn.AdditiveCoupling(F, G, split_dim=1),
                keep_input=False,
                keep_input_inverse=False,
                **options,
            )
            for F, G in pairs
        )
    )


def check_memcnn_leaf_gradient_doubled() -> bool:
    torch.manual_seed(0)
    model = memcnn_model([(mlp(8), mlp(8)) for _ in range(2)])
    x = torch.randn(32, 16, requires_grad=True)
    model(x).square().mean().backward()
    got, x.grad = x.grad, None
    for m in model:
        m.disable = True
    model(x).square().mean().backward()
    ratio = (got / x.grad).mean().item()
    print(f"a leaf input's gradient, MemCNN / plain autograd: {ratio:.4f}")
    return abs(ratio - 2) < 1e-3


def check_memcnn_frees_under_no_grad() -> bool:
    torch.manual_seed(0)
    model = memcnn_model([(mlp(8), mlp(8))])
    x = torch.randn(4, 16)
    with torch.no_grad():
        model(x)
    gone = x.untyped_storage().nbytes() == 0
    print(f"under torch.no_grad() the input is freed: {gone}")
    return gone


def check_memcnn_closure_parameter() -> bool:
    torch.manual_seed(0)
    scale = nn.Parameter(torch.ones(8))
    F = mlp(8)

    class Scaled(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return F(t) * scale

    model = memcnn_model([(Scaled(), mlp(8))])
    model(torch.randn(32, 16, requires_grad=True) * 2).square().sum().backward()
    print(f"gradient of an nn.Parameter F reads through a closure: {scale.grad}")
    return scale.grad is None


def check_memcnn_autograd_grad_and_retain_graph() -> bool:
    torch.manual_seed(0)
    model = memcnn_model([(mlp(8), mlp(8))])
    x = torch.randn(32, 16, requires_grad=True)
    e1 = error_of(lambda: torch.autograd.grad(model(x * 2).square().mean(), list(model.parameters())))
    loss = model(x * 2).square().sum()
    loss.backward(retain_graph=True)
    e2 = error_of(loss.backward)
    print(f"autograd.grad: {e1}\nsecond backward: {e2}")
    return "not compatible with .grad()" in e1 and "num_bwd_passes" in e2


def check_memcnn_dropout() -> bool:
    torch.manual_seed(0)
    x = torch.randn(32, 16, requires_grad=True)
    errors = []
    for preserve in (False, True):
        model = memcnn_model([(mlp(8, 0.5), mlp(8, 0.5)) for _ in range(4)], preserve_rng_state=preserve)
        torch.manual_seed(1)
        model(x * 2).square().mean().backward()
        got, x.grad = x.grad, None
        for m in model:
            m.disable = True
        torch.manual_seed(1)
        model(x * 2).square().mean().backward()
        ref, x.grad = x.grad, None
        errors.append(rel(got, ref))
        print(f"preserve_rng_state={preserve}: the input's gradient is {errors[-1]:.0%} off plain autograd's")
    return min(errors) > 0.01


def check_memcnn_batchnorm() -> bool:
    torch.manual_seed(0)
    F = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    model = memcnn_model([(F, mlp(8))])
    model(torch.randn(32, 16, requires_grad=True) * 2).square().sum().backward()
    n = F[1].num_batches_tracked.item()
    print(f"num_batches_tracked after one step: {n}")
    return n != 1


def check_memcnn_read_freed() -> bool:
    torch.manual_seed(0)
    model = memcnn_model([(mlp(8), mlp(8))])
    h = torch.randn(32, 16, requires_grad=True) * 2
    y = model(h)
    print(f"h freed: {h.untyped_storage().nbytes() == 0}; reading h + y ...", flush=True)
    print((h + y).sum())
    return False


def check_memcnn_func_and_create_graph() -> bool:
    torch.manual_seed(0)
    model = memcnn_model([(mlp(8), mlp(8))])
    x = torch.randn(32, 16, requires_grad=True)
    e = error_of(lambda: torch.func.grad(lambda t: model(t * 2).square().sum())(x.detach()))
    model(x * 2).square().sum().backward(create_graph=True)
    print(f"torch.func.grad: {e}\nbackward(create_graph=True): x.grad.requires_grad {x.grad.requires_grad}")
    return e != "no error" and not x.grad.requires_grad


# -- RevLib --------------------------------------------------------------------------------


def revlib_model(pairs: list[tuple[nn.Module, nn.Module]]) -> nn.Module:
    import revlib

    return revlib.ReversibleSequential(*(m for pair in pairs for m in pair), split_dim=1)


def check_revlib_autograd_grad() -> bool:
    torch.manual_seed(0)
    pairs = [(mlp(8), mlp(8)) for _ in range(2)]
    model = revlib_model(pairs)
    x = torch.randn(32, 16, requires_grad=True)
    params = list(model.parameters())
    e = error_of(lambda: torch.autograd.grad(model(x * 2).square().mean(), params))
    grads = torch.autograd.grad(model(x * 2).square().mean(), params, allow_unused=True)
    filled = any(p.grad is not None for p in params)
    print(
        f"autograd.grad(loss, params): {e}\nwith allow_unused=True: {sum(g is None for g in grads)} of "
        f"{len(grads)} gradients None; .grad filled: {filled}"
    )
    return "not have been used" in e and all(g is None for g in grads) and not filled


def check_revlib_input_without_grad() -> bool:
    torch.manual_seed(0)
    model = revlib_model([(mlp(8), mlp(8)) for _ in range(2)])
    y = model(torch.randn(32, 16))  # a batch: does not require grad
    e = error_of(lambda: y.square().mean().backward())
    print(f"output requires grad: {y.requires_grad}; backward: {e}")
    return not y.requires_grad and "does not require grad" in e


def check_revlib_batchnorm() -> bool:
    torch.manual_seed(0)
    F = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    model = revlib_model([(F, mlp(8))])
    model(torch.randn(32, 16, requires_grad=True) * 2).square().sum().backward()
    n = F[1].num_batches_tracked.item()
    print(f"num_batches_tracked after one step: {n}")
    return n != 1


def check_revlib_func_and_create_graph() -> bool:
    torch.manual_seed(0)
    model = revlib_model([(mlp(8), mlp(8))])
    x = torch.randn(32, 16, requires_grad=True)
    e = error_of(lambda: torch.func.grad(lambda t: model(t * 2).square().sum())(x.detach()))
    model(x * 2).square().sum().backward(create_graph=True)
    print(f"torch.func.grad: {e}\nbackward(create_graph=True): x.grad.requires_grad {x.grad.requires_grad}")
    return e != "no error" and not x.grad.requires_grad


def check_revlib_gets_right() -> bool:
    """What the page credits RevLib with: dropout replays, the RNG is left alone,
    retain_graph works."""
    torch.manual_seed(0)
    x = torch.randn(32, 16, requires_grad=True)
    pairs = [(mlp(8, 0.5), mlp(8, 0.5)) for _ in range(4)]
    model = revlib_model(pairs)
    torch.manual_seed(1)
    y = model(x * 2)
    state = torch.get_rng_state()
    y.square().mean().backward(retain_graph=True)
    untouched = torch.equal(state, torch.get_rng_state())
    got = x.grad.clone()
    y.square().mean().backward()
    twice = torch.allclose(x.grad, 2 * got)
    x.grad = None
    torch.manual_seed(1)
    plain_couplings(pairs, x * 2).square().mean().backward()
    err = rel(got, x.grad)
    print(f"dropout: the input's gradient {err:.1e} off; RNG untouched: {untouched}; 2nd backward: {twice}")
    return err < 1e-5 and untouched and twice


# -- FrEIA ---------------------------------------------------------------------------------


def subnet(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c_in, 32), nn.ReLU(), nn.Linear(32, c_out))


def check_freia_splits_and_memory() -> bool:
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    for n in (5, 7):
        nice = Fm.NICECouplingBlock([(n,)], subnet_constructor=subnet)
        aio = Fm.AllInOneBlock([(n,)], subnet_constructor=subnet)
        print(
            f"width {n}: NICECouplingBlock {nice.split_len1} + {nice.split_len2}, AllInOneBlock "
            f"{aio.splits[0]} + {aio.splits[1]}, invfunc {n // 2} + {n - n // 2}"
        )
    saved = {}
    for depth in (4, 16):
        inn = Ff.SequenceINN(16)
        for _ in range(depth):
            inn.append(Fm.NICECouplingBlock, subnet_constructor=subnet)
        sizes: list[int] = []

        def pack(t: torch.Tensor, sizes: list[int] = sizes) -> torch.Tensor:
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            inn(torch.randn(64, 16, requires_grad=True))
        saved[depth] = sum(sizes)
        print(f"{depth} NICE blocks, batch 64: {saved[depth] / 1024:.0f} KiB saved for backward")
    return saved[16] == 4 * saved[4]


# -- torch.utils.checkpoint ----------------------------------------------------------------


def check_checkpoint() -> bool:
    from torch.utils.checkpoint import checkpoint

    class Coupling(nn.Module):
        def __init__(self, F: nn.Module, G: nn.Module) -> None:
            super().__init__()
            self.F, self.G = F, G

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return plain_couplings([(self.F, self.G)], x)

    torch.manual_seed(0)
    x = torch.randn(32, 16, requires_grad=True)
    F = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
    checkpoint(Coupling(F, mlp(8)), x * 2, use_reentrant=False).square().sum().backward()
    n = F[1].num_batches_tracked.item()
    block = Coupling(mlp(8), mlp(8))

    def loss(t: torch.Tensor, reentrant: bool = False) -> torch.Tensor:
        return checkpoint(block, t * 2, use_reentrant=reentrant).square().sum()

    e_func = error_of(lambda: torch.func.grad(loss)(x.detach()))
    e_reentrant = error_of(lambda: torch.autograd.grad(loss(x, True), list(block.parameters())))
    (g,) = torch.autograd.grad(loss(x), [x], create_graph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint(block, x * 2)
    print(
        f"BatchNorm num_batches_tracked after one step: {n}\ntorch.func.grad: {e_func}\n"
        f"reentrant, autograd.grad(loss, params): {e_reentrant}\ncreate_graph=True: "
        f"requires_grad {g.requires_grad}\nwithout use_reentrant=: {str(caught[0].message)[:110]}"
    )
    pairs = [(mlp(8, 0.5), mlp(8, 0.5)) for _ in range(4)]
    x.grad = None
    torch.manual_seed(1)
    h = x * 2
    for F_, G_ in pairs:
        h = checkpoint(Coupling(F_, G_), h, use_reentrant=False)
    h.square().mean().backward(retain_graph=True)
    got = x.grad.clone()
    h.square().mean().backward()
    twice = torch.allclose(x.grad, 2 * got)
    x.grad = None
    torch.manual_seed(1)
    plain_couplings(pairs, x * 2).square().mean().backward()
    print(f"dropout: the input's gradient {rel(got, x.grad):.1e} off; second backward: {twice}")
    fails = n == 2 and "saved tensor hooks" in e_func and e_reentrant != "no error"
    return fails and g.requires_grad and twice and rel(got, x.grad) < 1e-5


CHECKS = {name: fn for name, fn in dict(globals()).items() if name.startswith("check_")}
PEERS = ("invtorch", "memcnn", "revlib", "FrEIA", "torch.utils.checkpoint")
CRASHES = {"check_invtorch_read_freed", "check_memcnn_read_freed"}  # a segfault is what the page says


def run_snippets(only: str) -> int:
    failures = 0
    for k, m in enumerate(SNIPPET.finditer(PAGE.read_text()), 1):
        code = m.group(1)
        peer = next(name for name in PEERS if name in code)
        if only and only not in peer.lower():
            continue
        done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
        ok = done.returncode == 0
        failures += not ok
        print(f"snippet {k} ({peer}): {'ok' if ok else 'FAILED'}")
        if not ok:
            print(done.stderr[-2000:])
    return failures


def main(argv: list[str]) -> int:
    if argv[:1] == ["--check"]:
        warnings.filterwarnings("ignore")
        return 0 if CHECKS[argv[1]]() else 1
    only = argv[0] if argv else ""
    failures = run_snippets(only)
    for name in CHECKS:
        if only not in name:
            continue
        done = subprocess.run(
            [sys.executable, __file__, "--check", name], capture_output=True, text=True, timeout=600
        )
        crashed = done.returncode == -signal.SIGSEGV
        ok = crashed if name in CRASHES else done.returncode == 0
        failures += not ok
        status = "segmentation fault" if crashed else f"exit status {done.returncode}"
        print(f"\n{name}: {'as the page says' if ok else 'NOT AS THE PAGE SAYS'} ({status})")
        print(done.stdout.rstrip())
        if not ok:
            print(done.stderr[-2000:])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
