"""Run risky code in a child process with a wall-clock and a memory limit."""

from __future__ import annotations

import resource
import subprocess
import sys
from typing import Any

from orchestration.engine.errors import ToolFailed, ToolTimeout


def _limits(memory_mb: int, cpu_s: int):  # type: ignore[no-untyped-def]
    def apply() -> None:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))

    return apply


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 256,
               max_output: int = 10_000) -> dict[str, Any]:
    """Run ``code`` in an isolated interpreter (-I: no site, no user env, no cwd on sys.path)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", code],
            capture_output=True, text=True, timeout=timeout_s, env={},
            preexec_fn=_limits(memory_mb, max(1, int(timeout_s) + 1)), cwd="/",
        )
    except subprocess.TimeoutExpired:
        raise ToolTimeout(f"code did not finish within {timeout_s:g} s and was killed") from None
    except OSError as exc:
        raise ToolFailed(f"could not start the sandbox: {exc}") from None
    return {"exit_code": proc.returncode, "stdout": proc.stdout[:max_output],
            "stderr": proc.stderr[-max_output:]}
