"""DistributedDataParallel (gloo, two local processes on 127.0.0.1) gives a single process's gradients."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_ddp_matches_single_process_over_the_option_matrix(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(HERE / "_ddp_worker.py"), str(_free_port()), str(tmp_path / "grads.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith(("OK", "FAIL"))]
    assert len(lines) == 6 + 6 + 2, out.stdout  # kinds x configurations DDP allows for them
    assert all(line.startswith("OK") for line in lines), "\n".join(lines)
