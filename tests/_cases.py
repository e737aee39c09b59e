"""Cases run in a child process, so that a crash (a segfault) cannot take the suite down.

A test module makes ``CASES = Cases(__file__)``, registers functions with ``@CASES.case``
(or ``CASES[name] = fn``), runs ``CASES.main(sys.argv[1:])`` when executed as a script,
and reads each case's outcome from ``CASES.outcomes()`` (a module-scoped fixture).
"""

from __future__ import annotations

import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest


class Cases(dict[str, Callable[[], None]]):
    """Named cases of one test module, and the runner that executes them in a child."""

    def __init__(self, script: str) -> None:
        super().__init__()
        self.script = Path(script)

    def case(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Register ``fn`` under its name without the ``case_`` prefix."""
        self[fn.__name__.removeprefix("case_")] = fn
        return fn

    def params(self, bugs: Mapping[str, str]) -> list[Any]:
        """The case names for ``pytest.mark.parametrize``; those in ``bugs`` (name -> reason)
        are strict expected failures."""
        return [
            pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=bugs[n])) if n in bugs else n
            for n in self
        ]

    def main(self, names: Sequence[str]) -> None:
        """Run cases in this process; one line each: ``CASE name ok`` or ``CASE name FAIL ...``."""
        for name in names or list(self):
            print(f"START {name}", flush=True)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # prototype and deprecation warnings of torch
                    self[name]()
            except BaseException as e:  # reported to the test in the parent
                frames = traceback.extract_tb(e.__traceback__)
                where = [f"{Path(f.filename).name}:{f.lineno}" for f in frames if "invfunc" in f.filename]
                where.append(f"{Path(frames[-1].filename).name}:{frames[-1].lineno}")
                detail = f"{type(e).__name__}: {e}".replace("\n", " ")[:500]
                print(f"CASE {name} FAIL {detail} (at {', '.join(dict.fromkeys(where))})", flush=True)
            else:
                print(f"CASE {name} ok", flush=True)

    def outcomes(self) -> dict[str, str]:
        """Every case's outcome, from a child process; a crash is the outcome of the case
        that caused it, and the cases after it run in a fresh child."""
        result: dict[str, str] = {}
        while todo := [n for n in self if n not in result]:
            out = subprocess.run(
                [sys.executable, str(self.script), *todo], capture_output=True, text=True, timeout=300
            )
            started = None
            for line in out.stdout.splitlines():
                kind, _, rest = line.partition(" ")
                name, _, outcome = rest.partition(" ")
                if kind == "START":
                    started = name
                elif kind == "CASE":
                    result[name] = outcome
                    started = None
            if started is None and out.returncode == 0:
                continue
            crashed = started or next((n for n in todo if n not in result), None)
            if crashed is None:  # every case reported; the process died on exit
                raise AssertionError(f"the case runner exited with {out.returncode}: {out.stderr[-2000:]}")
            result[crashed] = f"crashed the process (return code {out.returncode}): {out.stderr[-2000:]}"
        return result
