"""FSDP (gloo, two local processes on 127.0.0.1, CPU) with couplings inside vs one process.

One launch of ``_fsdp_worker.py`` runs every case (3 SGD steps each). A case passes when
on both ranks the gradients (FSDP2) and the parameters after every step equal one
process's under plain autograd within 1e-10, every input :func:`invfunc.explain` reports
freed is an activation (never a parameter's size), and after each forward every parameter
FSDP holds still owns its memory; or when both ranks raise an :class:`invfunc.InvfuncError`
that names FSDP. FSDP frees its gathered parameters itself (reshard after forward) and
gathers them again for backward: invfunc must only ever free activations.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available in this torch", allow_module_level=True)
fsdp = pytest.importorskip("torch.distributed.fsdp", reason="this torch has no torch.distributed.fsdp")
tensor = pytest.importorskip("torch.distributed.tensor", reason="this torch has no DTensor (FSDP2)")
if not (hasattr(tensor, "DTensor") and hasattr(fsdp, "fully_shard")):
    pytest.skip("this torch has no public FSDP2 (fully_shard, DTensor: torch 2.6+)", allow_module_level=True)

from _fsdp_worker import ACTIVATION_BYTES, CASES  # noqa: E402

HERE = Path(__file__).resolve().parent

TOL = 1e-10


class WorkerError(RuntimeError):
    """The worker itself failed (not a case): never taken for an expected failure."""


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("fsdp")
    out = subprocess.run(
        [sys.executable, str(HERE / "_fsdp_worker.py"), str(tmp / "store"), str(tmp / "result")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    if out.returncode != 0:
        raise WorkerError(out.stderr[-3000:])
    if out.stdout.startswith("SKIP"):
        pytest.skip(out.stdout.strip())
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {line["case"]: line["ranks"] for line in lines}


def _ok(r: dict[str, Any]) -> bool:
    return "error" not in r and r["diff"] < TOL and r["storage_ok"] and set(r["freed"]) <= ACTIVATION_BYTES


def _clear_error(r: dict[str, Any]) -> bool:
    return "error" in r and r["invfunc_error"] and ("FSDP" in r["error"] or "fully_shard" in r["error"])


def _check(cases: dict[str, list[dict[str, Any]]], name: str) -> list[dict[str, Any]]:
    if name not in cases:
        raise WorkerError(f"case {name!r} was not run")
    ranks = cases[name]
    assert all(_ok(r) for r in ranks) or all(_clear_error(r) for r in ranks), f"{name}: {ranks}"
    return ranks


# -- FSDP2 (fully_shard) ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp2 model", "fsdp2 model, no reshard after forward"])
def test_fsdp2_model_sharded_couplings_inside(cases: dict[str, list[dict[str, Any]]], name: str) -> None:
    # fully_shard on the model only: F and G are plain modules whose parameters FSDP swaps
    # in (gathered) for forward and again for backward, where invfunc replays them
    ranks = _check(cases, name)
    assert all(r.get("freed") for r in ranks), f"nothing freed, the check above is void: {ranks}"


@pytest.mark.slow
def test_fsdp2_each_layer_sharded(cases: dict[str, list[dict[str, Any]]]) -> None:
    # fully_shard on each module whose forward is one invertible_call, and on the model.
    # (FSDP2 hands each such layer its input through an autograd.Function, a view, which
    # invfunc keeps: correct, but nothing is freed.)
    _check(cases, "fsdp2 each layer and model")


@pytest.mark.slow
def test_fsdp2_F_and_G_sharded_under_plain_autograd(cases: dict[str, list[dict[str, Any]]]) -> None:
    # the control for the next test: the same wrapping trains correctly with mode="plain"
    _check(cases, "fsdp2 F and G and model [plain]")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp2 F and G and model", "fsdp2 F and G only"])
def test_fsdp2_F_and_G_sharded(cases: dict[str, list[dict[str, Any]]], name: str) -> None:
    _check(cases, name)


# -- FSDP1 (FullyShardedDataParallel, deprecated) ------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["fsdp1 model, use_orig_params [plain]", "fsdp1 model, flat parameters [plain]"]
)
def test_fsdp1_under_plain_autograd(cases: dict[str, list[dict[str, Any]]], name: str) -> None:
    # the controls for the tests below (these failed under invfunc before the fixes)
    _check(cases, name)


@pytest.mark.slow
def test_fsdp1_F_and_G_wrapped_with_orig_params(cases: dict[str, list[dict[str, Any]]]) -> None:
    _check(cases, "fsdp1 F and G and model, use_orig_params")


@pytest.mark.slow
def test_fsdp1_model_wrapped_with_orig_params(cases: dict[str, list[dict[str, Any]]]) -> None:
    _check(cases, "fsdp1 model, use_orig_params")


@pytest.mark.slow
def test_fsdp1_model_wrapped_with_flat_parameters(cases: dict[str, list[dict[str, Any]]]) -> None:
    _check(cases, "fsdp1 model, flat parameters")


def test_every_case_is_checked() -> None:
    checked = {
        "fsdp2 model",
        "fsdp2 model, no reshard after forward",
        "fsdp2 each layer and model",
        "fsdp2 F and G and model [plain]",
        "fsdp2 F and G and model",
        "fsdp2 F and G only",
        "fsdp1 model, use_orig_params [plain]",
        "fsdp1 model, flat parameters [plain]",
        "fsdp1 F and G and model, use_orig_params",
        "fsdp1 model, use_orig_params",
        "fsdp1 model, flat parameters",
    }
    assert checked == set(CASES)
