"""Run untrusted Python under bubblewrap, failing closed.

Code a model writes is hostile until proven otherwise, so ``run_python`` never runs it in the
server's own world. Each run gets:

- **its own user**: bwrap starts as root (so it can mount and bind anything it needs) and the
  command switches to the configured unprivileged uid/gid with ``setpriv`` before Python starts,
  with no capabilities, no supplementary groups and ``no_new_privs``. bwrap's own ``--uid``
  is not used: as root it maps the sandbox uid onto host root through a user namespace, which
  leaves the process root on the host (owner of root's files, exempt from RLIMIT_NPROC).
- **its own PID namespace**, with a fresh ``/proc`` that shows only the sandbox's processes, so
  the server's ``/proc/<pid>/environ`` is not there to read; killing the namespace's first
  process kills every process in it, ``setsid`` children included.
- **its own network namespace**: only a loopback of its own; nothing on the host is reachable.
- **a read-only view of only what Python needs**: ``/usr`` and the interpreter's prefix; no
  ``/etc``, no home, no project, no database. The one writable path is a private, size-limited
  tmpfs at ``/work`` (``/tmp`` points there), gone when the run ends.
- **limits** (prlimit, inherited by everything it starts): processes, address space, file
  size, CPU seconds and open files; stdout and stderr go to files, so the file-size limit also
  bounds what the server reads back.

The sandbox proves itself before first use (right uid, own PID and network namespaces, a
read-only root); when bwrap is missing or the check fails, ``run_python`` refuses with
``SandboxUnavailable`` and never runs the code some other way.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from orchestration.engine.errors import ToolFailed, ToolStopped, ToolTimeout

WORKDIR = "/work"
_MB = 1024 * 1024
# Directories the interpreter and its libraries live in on a Debian-like system.
_SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


class SandboxUnavailable(ToolFailed):
    """Isolation cannot be set up on this machine, so the code was not run."""


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    """Where bubblewrap is and whom code runs as (settings ``SWITCHBOARD_SANDBOX_*``)."""

    bwrap: str = "bwrap"
    uid: int = 65534
    gid: int = 65534
    # The interpreter inside the sandbox; by default the one the server runs on (its base
    # installation, not a virtualenv: sandboxed code gets the standard library only).
    python: str = ""


@dataclass(frozen=True, slots=True)
class Limits:
    timeout_s: float = 5.0
    memory_mb: int = 256  # address space of each process
    processes: int = 16  # processes of the sandbox uid, counted across the machine
    file_mb: int = 16  # the largest file a process may write, stdout and stderr included
    open_files: int = 64
    work_mb: int = 64  # the private tmpfs at /work
    max_output: int = 10_000  # characters of stdout (head) and stderr (tail) returned


def run_python(code: str, *, config: SandboxConfig | None = None,
               limits: Limits | None = None, workdir: str | os.PathLike[str] | None = None,
               cancel: threading.Event | None = None) -> dict[str, Any]:
    """Run ``code`` in the sandbox and return its exit code, stdout and stderr.

    ``workdir``: a host directory to bind as ``/work`` instead of a fresh tmpfs (it is handed
    to the sandbox uid); for callers that exchange files with the code and clean up after it.
    Raises ToolTimeout when the code outlives ``limits.timeout_s`` (every process of the run
    is dead by then), ToolStopped when ``cancel`` is set first (the gate's stop signals: a
    cancelled run, a kill switch, a revoked grant; killed the same way), SandboxUnavailable
    when isolation is not available."""
    config = config or SandboxConfig()
    limits = limits or Limits()
    ensure_available(config)
    if workdir is not None:
        # Owned by the sandbox user; group root lets bwrap (root without capabilities) enter.
        os.chown(workdir, config.uid, 0)
        os.chmod(workdir, 0o770)
    returncode, stdout, stderr = _run(code, config, limits, workdir, cancel)
    return {"exit_code": returncode, "stdout": stdout[:limits.max_output],
            "stderr": stderr[-limits.max_output:]}


# ---- the self-check ------------------------------------------------------------------------

_PROBE = """
import json, os, socket
try:
    open("/probe", "w")
    root_writable = True
except OSError:
    root_writable = False
print(json.dumps({
    "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "egid": os.getegid(),
    "groups": os.getgroups(), "interfaces": [name for _, name in socket.if_nameindex()],
    "processes": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
    "root_writable": root_writable, "environ": sorted(os.environ),
}))
"""

_PROBE_KEYS = ("uid", "euid", "gid", "egid", "groups", "interfaces", "processes",
               "root_writable", "environ")
_checked: set[SandboxConfig] = set()
_check_lock = threading.Lock()


def ensure_available(config: SandboxConfig) -> None:
    """Raise SandboxUnavailable unless a probe run shows the isolation this module promises.
    A passing check is remembered for the process; a failing one is tried again next time."""
    if config in _checked:
        return
    with _check_lock:
        if config in _checked:
            return
        problem = _preconditions(config) or _probe(config)
        if problem:
            raise SandboxUnavailable(
                f"run_python refused: the sandbox is not available ({problem}). Code is never "
                "run unsandboxed; install bubblewrap (apt-get install bubblewrap) or point "
                "SWITCHBOARD_SANDBOX_BWRAP at it")
        _checked.add(config)


def _preconditions(config: SandboxConfig) -> str:
    if os.geteuid() != 0:
        return (f"the server must run as root to start code as uid {config.uid}; it runs as "
                f"uid {os.geteuid()}")
    if config.uid <= 0 or config.gid <= 0:
        return "the sandbox uid and gid must not be root"
    if not shutil.which(config.bwrap):
        return f"bubblewrap was not found at {config.bwrap!r}"
    if not shutil.which("prlimit"):
        return "prlimit (util-linux) was not found"
    setpriv = _setpriv()
    if not setpriv.startswith("/usr/"):
        return "setpriv (util-linux) was not found under /usr"
    python = _python(config)
    if not os.access(python, os.X_OK):
        return f"no interpreter at {python!r}"
    return ""


def _probe(config: SandboxConfig) -> str:
    limits = Limits(timeout_s=15.0)
    try:
        returncode, stdout, stderr = _run(_PROBE, config, limits, None)
    except ToolTimeout:
        return "the probe did not finish"
    try:
        seen = json.loads(stdout)
        if not isinstance(seen, dict) or not set(_PROBE_KEYS) <= set(seen):
            raise ValueError(stdout[:200])
    except ValueError:
        return f"the probe failed: exit {returncode}: {stderr.strip()[-500:]}"
    ids = {seen["uid"], seen["euid"]}, {seen["gid"], seen["egid"]}
    if ids != ({config.uid}, {config.gid}) or not set(seen["groups"]) <= {config.gid}:
        return f"code ran as uid {seen['uid']} gid {seen['gid']}, not {config.uid}/{config.gid}"
    if seen["interfaces"] != ["lo"]:
        return f"code saw the network interfaces {seen['interfaces']}"
    if len(seen["processes"]) > 2:
        return "code saw processes outside its own PID namespace"
    if seen["root_writable"]:
        return "the sandbox's root file system was writable"
    if set(seen["environ"]) - set(_ENV):
        return "code saw environment variables it was not given"
    return ""


# ---- one run -------------------------------------------------------------------------------

_ENV = {"HOME": WORKDIR, "PWD": WORKDIR, "TMPDIR": WORKDIR,
        "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


def _run(code: str, config: SandboxConfig, limits: Limits,
         workdir: str | os.PathLike[str] | None,
         cancel: threading.Event | None = None) -> tuple[int, str, str]:
    info_read, info_write = os.pipe()
    try:
        argv = _command(config, limits, workdir, info_fd=info_write) + ["-c", code]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env={}, cwd="/",
                    pass_fds=(info_write,), start_new_session=True)
            except OSError as exc:
                raise SandboxUnavailable(f"run_python refused: the sandbox could not start: "
                                         f"{exc}") from None
            os.close(info_write)
            info_write = -1
            returncode = _wait(proc, limits.timeout_s, cancel)
            if returncode is None:
                _kill(proc, info_read)
                if cancel is not None and cancel.is_set():
                    raise ToolStopped("the code was stopped; it and every process it started "
                                      "were killed")
                raise ToolTimeout(f"code did not finish within {limits.timeout_s:g} s; it and "
                                  "every process it started were killed")
            return returncode, _read(out), _read(err)
    finally:
        os.close(info_read)
        if info_write >= 0:
            os.close(info_write)


def _wait(proc: subprocess.Popen[bytes], timeout_s: float,
          cancel: threading.Event | None) -> int | None:
    """The exit code, or None once the timeout passed or ``cancel`` was set."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or (cancel is not None and cancel.is_set()):
            return None
        try:
            return proc.wait(timeout=min(left, 0.1))
        except subprocess.TimeoutExpired:
            continue


def _read(stream: IO[bytes]) -> str:
    stream.seek(0)
    return stream.read().decode("utf-8", errors="replace")


def _kill(proc: subprocess.Popen[bytes], info_read: int) -> None:
    """Kill the sandbox's PID namespace and wait until it is empty.

    The namespace's first process (bwrap's init, ``child-pid`` on the info fd) dying makes the
    kernel kill every process in the namespace, whatever session or group it moved to; the
    outer bwrap and its process group go too (bwrap's --die-with-parent is a second line)."""
    init = _child_pid(info_read)
    if init:
        with contextlib.suppress(ProcessLookupError):
            os.kill(init, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if init:
        deadline = time.monotonic() + 5
        while _alive(init) and time.monotonic() < deadline:
            time.sleep(0.01)


def _child_pid(info_read: int) -> int:
    os.set_blocking(info_read, False)
    try:
        raw = os.read(info_read, 65536)
    except BlockingIOError:
        return 0
    try:
        return int(json.loads(raw)["child-pid"])
    except (ValueError, KeyError, TypeError):
        return 0


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie has finished (its namespace is already empty)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _command(config: SandboxConfig, limits: Limits, workdir: str | os.PathLike[str] | None,
             *, info_fd: int) -> list[str]:
    cpu = max(1, math.ceil(limits.timeout_s))
    python = _python(config)
    argv = [
        "prlimit", f"--nproc={limits.processes}", f"--as={limits.memory_mb * _MB}",
        f"--fsize={limits.file_mb * _MB}", f"--nofile={limits.open_files}",
        f"--cpu={cpu}:{cpu + 1}", "--core=0", "--",
        config.bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
        "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--hostname", "sandbox",
        "--info-fd", str(info_fd),
        # setpriv needs these three to switch user; it drops them (and every other) itself.
        "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
        "--cap-add", "CAP_SETPCAP",
        "--ro-bind", "/usr", "/usr",
    ]
    argv += _system_dirs()
    argv += _prefix_bind(python)
    argv += ["--proc", "/proc", "--dev", "/dev"]
    if workdir is None:
        argv += ["--size", str(limits.work_mb * _MB), "--perms", "0777", "--tmpfs", WORKDIR]
    else:
        argv += ["--bind", os.fspath(workdir), WORKDIR]
    argv += ["--symlink", WORKDIR, "/tmp", "--remount-ro", "/", "--chdir", WORKDIR,
             "--clearenv"]
    for name, value in _ENV.items():
        argv += ["--setenv", name, value]
    argv += [
        "--", _setpriv(), f"--reuid={config.uid}", f"--regid={config.gid}", "--clear-groups",
        "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
        python, "-I", "-S", "-B",
    ]
    return argv


def _system_dirs() -> list[str]:
    """/bin, /lib... as the host has them: symlinks into /usr on merged-/usr systems."""
    argv: list[str] = []
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    return argv


def _prefix_bind(python: str) -> list[str]:
    """The interpreter's installation, read-only, when it lives outside /usr. Directories on
    the way are created traversable: the host's may be private to root (/root/.pyenv)."""
    prefix = Path(python).parent.parent
    if prefix == Path("/usr") or Path("/usr") in prefix.parents:
        return []
    argv: list[str] = []
    for parent in reversed(prefix.parents[:-1]):
        argv += ["--perms", "0755", "--dir", str(parent)]
    return argv + ["--ro-bind", str(prefix), str(prefix)]


def _python(config: SandboxConfig) -> str:
    return os.path.realpath(config.python or getattr(sys, "_base_executable", sys.executable))


def _setpriv() -> str:
    return os.path.realpath(shutil.which("setpriv") or "/usr/bin/setpriv")
