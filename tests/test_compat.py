"""Version-dependent PyTorch internals, found by feature detection, with fallbacks that keep
results correct when one is missing (NOTE [Torch versions])."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint

import invfunc as inv
from _util import F64, assert_all_close, freed, revnet
from invfunc import _compat

SRC = Path(inv.__file__).resolve().parent


def _grads(net: inv.Invertible, params: list[torch.Tensor], mode: str = "invertible") -> list[torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    y = inv.invertible_call(net, x * 1, mode=mode)
    return list(torch.autograd.grad(y.square().sum(), [x, *params]))


def test_the_internals_this_torch_has_are_found() -> None:
    t = torch.zeros(1)
    _compat.set_version(t, 5)
    assert t._version == 5
    assert _compat.can_free() is None
    s = torch.zeros(3).untyped_storage()
    assert _compat.use_count(s._cdata) >= 1
    assert _compat.torch_version() == ".".join(torch.__version__.split("+")[0].split(".")[:2])


@pytest.mark.parametrize("asked", ["directly", "by a probe"])
def test_saved_tensors_hooks_are_seen(asked: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if asked == "by a probe":  # as on torch 2.4, which cannot be asked
        monkeypatch.setattr(_compat, "_TOP_HOOKS", None)
    assert not _compat.saved_tensors_hooks_active()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert _compat.saved_tensors_hooks_active()
    seen = []

    def f(x: torch.Tensor) -> torch.Tensor:
        seen.append(_compat.saved_tensors_hooks_active())
        return x * 2

    torch.utils.checkpoint.checkpoint(f, torch.ones(2, requires_grad=True), use_reentrant=False)
    assert seen == [True]


def test_an_unknown_hook_state_keeps_the_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    # neither way of asking works (a torch this module does not know): assume hooks
    def broken() -> bool:
        raise AttributeError("no _raw_saved_result")

    monkeypatch.setattr(_compat, "_TOP_HOOKS", None)
    monkeypatch.setattr(_compat, "_probe_hooks", broken)
    net, _ = revnet(3, 4)
    h = torch.randn(4, 8, dtype=torch.float64, requires_grad=True) * 1
    with inv.explain() as report:
        y = inv.invertible_call(net, h)
    assert not freed(h) and "saved-tensor hooks are active" in report.kept[0][2]
    y.sum().backward()


def test_without_a_settable_version_counter_nothing_is_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    net, params = revnet(3, 4)
    want = _grads(net, params, "plain")
    monkeypatch.setattr(_compat, "_SET_VERSION", None)
    h = torch.randn(4, 8, dtype=torch.float64, requires_grad=True) * 1
    with inv.explain() as report:
        inv.invertible_call(net, h)
    assert not freed(h) and report.freed == []
    assert "lacks a settable version counter" in report.kept[0][2]
    assert_all_close(_grads(net, params), want, **F64)


def test_without_moving_memory_between_storages_results_are_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch 2.4 has no UntypedStorage._swap_data_ptr_: outputs get fresh memory instead
    torch.manual_seed(0)
    blocks = [inv.couple(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)) for _ in range(3)]
    params = [p for b in blocks for m in (b.F, b.G) for p in m.parameters()]  # type: ignore[attr-defined]
    x = torch.randn(512, 128)

    def per_block() -> list[torch.Tensor]:
        h = x.clone().requires_grad_()
        y = h * 1
        for b in blocks:  # one call per block: the path that moves memory
            y = inv.invertible_call(b, y)
        return list(torch.autograd.grad(y.square().mean(), [h, *params]))

    moved = per_block()
    monkeypatch.setattr(_compat, "CAN_SWAP", False)
    copied = per_block()
    assert all(torch.equal(a, b) for a, b in zip(moved, copied))


# Private PyTorch APIs: torch._C and other underscore modules, underscore functions of public
# modules, and the underscore attributes of tensors, storages, autograd nodes and modules.
_PRIVATE = re.compile(
    r"torch\._(?!_version__)|from torch(\.\w+)*\._|from torch[\w.]* import _"
    r"|(overrides|graph|forward_ad|module|utils)\._\w"
    r"|\._(use_count|is_view|base|version|is_zerotensor|backward_hooks|cdata|saved_result|raw_saved_result"
    r"|backward_cls|swap_data_ptr_|parameters|buffers|modules|global_forward\w*)\b"
)


def test_private_torch_apis_are_used_only_through_compat() -> None:
    # NOTE [Torch versions]: every private or version-dependent internal has one home
    offenders = [
        f"{p.relative_to(SRC)}:{i}: {line.strip()}"
        for p in sorted(SRC.rglob("*.py"))
        if p.name != "_compat.py"
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if _PRIVATE.search(line.split("#")[0])
    ]
    assert offenders == []


@pytest.mark.parametrize(
    "line",
    [
        "x = torch._C._storage_Use_Count(s)",
        "from torch.utils._device import DeviceContext",
        "from torch.overrides import _get_current_function_mode_stack",
        "v = t._version",
        "if t._is_view():",
        "kids = m._modules.values()",
        "hooks = torch.nn.modules.module._global_forward_hooks",
    ],
)
def test_the_scan_sees_private_apis(line: str) -> None:
    assert _PRIVATE.search(line)
    assert not _PRIVATE.search("print(torch.__version__, self._fn, block._name)")


def test_the_demo_warns_on_an_untested_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    from invfunc.__main__ import untested_torch

    assert untested_torch() is None  # the suite runs on this one
    monkeypatch.setattr(_compat, "TESTED_TORCH", ("1.0",))
    msg = untested_torch()
    assert msg is not None and msg.startswith("warning: invfunc's test suite runs on torch 1.0, not on ")
