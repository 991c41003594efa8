"""Take the credentials out of the process environment once settings hold them.

A secret left in the environment leaks to every process the server starts (a subprocess
inherits ``os.environ``) and stays readable at ``/proc/<pid>/environ``, which shows the
environment block the process was started with whatever ``os.environ`` says later. So after
reading ``SWITCHBOARD_CREDENTIAL_*`` into settings, each variable is unset, and its bytes in
that initial block are overwritten. The sandbox does not depend on this (code there sees
neither the server's processes nor its environment); this is for everything else.
"""

from __future__ import annotations

import os
import sys

from console.env import credentials_from_env


def credentials_take(prefix: str) -> dict[str, str]:
    """Read the credentials named ``<prefix><NAME>``, then remove them from the environment.

    Kept only in the process Django's autoreloader uses to restart the server: it holds no
    credentials in use and its children (the server) must inherit them."""
    found = credentials_from_env(prefix)
    if _is_autoreload_parent():
        return found
    names = [name for name in os.environ if name.startswith(prefix)]
    for name in names:
        del os.environ[name]  # unsetenv(): children no longer inherit it
    _scrub_initial_environment(prefix.encode())
    return found


def _is_autoreload_parent() -> bool:
    return ("runserver" in sys.argv[1:2] and "--noreload" not in sys.argv
            and os.environ.get("RUN_MAIN") != "true")


def _scrub_initial_environment(prefix: bytes) -> None:
    """Overwrite ``PREFIX...=value`` entries of this process's initial environment block (what
    ``/proc/<pid>/environ`` shows) with NUL bytes. Nothing points there any more once the
    variables are unset. Best effort: where /proc/self/mem cannot be written, the sandbox's
    PID namespace and separate uid remain what keeps sandboxed code from reading it."""
    try:
        stat = open("/proc/self/stat").read()
        fields = stat[stat.rindex(")") + 2:].split()
        start, end = int(fields[47]), int(fields[48])  # env_start, env_end
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            block = mem.read(end - start)
            offset = 0
            for entry in block.split(b"\0"):
                if entry.startswith(prefix):
                    mem.seek(start + offset)
                    mem.write(b"\0" * len(entry))
                offset += len(entry) + 1
    except (OSError, ValueError, IndexError):
        pass
