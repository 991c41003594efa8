"""Risky tools run in a child process with a time and a memory limit."""

from __future__ import annotations

import time

import pytest

from orchestration.builtin_tools import registry
from orchestration.engine.errors import ToolTimeout
from orchestration.engine.sandbox import run_python


def test_it_runs_code_and_returns_its_output() -> None:
    result = registry.get("run_python").call({"code": "print(6 * 7)"})
    assert result == {"exit_code": 0, "stdout": "42\n", "stderr": ""}


def test_it_kills_code_that_runs_too_long() -> None:
    started = time.monotonic()
    with pytest.raises(ToolTimeout, match="killed"):
        run_python("while True: pass", timeout_s=0.5)
    assert time.monotonic() - started < 3


def test_it_stops_code_that_takes_too_much_memory() -> None:
    result = run_python("x = bytearray(512 * 1024 * 1024)\nprint('allocated')", memory_mb=128)
    assert result["exit_code"] != 0
    assert "MemoryError" in result["stderr"]
    assert "allocated" not in result["stdout"]


def test_it_gives_the_code_no_environment() -> None:
    result = run_python("import os; print(sorted(os.environ))")
    assert result["stdout"].strip() in ("[]", "['LC_CTYPE']")
