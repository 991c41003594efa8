"""The run_python sandbox: every way out that code has tried must fail, and where isolation is
missing the tool refuses instead of running the code some other way.

Each escape test also checks its own yardstick (the file is writable, the listener answers,
the secret is in the environment it looks at), so a test cannot pass for the wrong reason."""

from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings

from orchestration import grants, services
from orchestration.builtin_tools import registry
from orchestration.engine.errors import ToolFailed, ToolStopped, ToolTimeout
from orchestration.engine.sandbox import (
    Limits,
    SandboxConfig,
    SandboxUnavailable,
    run_python,
)
from orchestration.models import Process
from tests.conftest import ROOT, TEST_CRM_SECRET, wait_for_run

CANARY = "canary-credential-5e1f0c9a7b"


def _tool(code: str) -> dict[str, Any]:
    """The tool's implementation (only the gate may call its contract: tests/test_gate.py)."""
    contract = registry.get("run_python")
    contract.validate_input({"code": code})
    result = contract.fn(code=code)
    contract.validate_output(result)
    return result


def test_it_runs_code_as_the_sandbox_user_and_returns_its_output() -> None:
    result = _tool("import os; print(6 * 7, os.getuid(), os.getgid())")
    assert result == {"exit_code": 0, "stdout": "42 65534 65534\n", "stderr": ""}


def test_it_gives_the_code_only_its_own_environment() -> None:
    result = _tool("import os; print(sorted(os.environ))")
    assert ast.literal_eval(result["stdout"]) == ["HOME", "LANG", "PATH", "PWD", "TMPDIR"]


def test_a_stop_signal_kills_the_sandbox_at_once() -> None:
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(ToolStopped, match="killed"):
        run_python("import time; time.sleep(30)", limits=Limits(timeout_s=20), cancel=cancel)
    assert time.monotonic() - started < 3


def test_it_kills_code_that_runs_too_long() -> None:
    started = time.monotonic()
    with pytest.raises(ToolTimeout, match="killed"):
        run_python("while True: pass", limits=Limits(timeout_s=0.5))
    assert time.monotonic() - started < 3


# ---- the server's secrets --------------------------------------------------------------------

_READ_ENVIRONS = """
import os
seen = {}
for pid in sorted({os.getppid(), 1, SERVER} | {int(p) for p in os.listdir("/proc") if p.isdigit()}):
    try:
        seen[pid] = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace")
    except OSError as exc:
        seen[pid] = type(exc).__name__
print(seen)
"""


def test_code_cannot_read_the_environment_of_the_process_that_started_it() -> None:
    """A server holding a credential in its environment (as SWITCHBOARD_CREDENTIAL_DEMO once
    was) starts the sandbox; the code reads /proc/<ppid>/environ, /proc/1/environ, the
    server's pid and every pid it can see."""
    server = (
        "import json, os\n"
        "from orchestration.engine.sandbox import run_python\n"
        f"code = {_READ_ENVIRONS!r}.replace('SERVER', str(os.getpid()))\n"
        "mine = open('/proc/self/environ').read()\n"
        "print(json.dumps({'pid': os.getpid(), 'mine': mine, 'result': run_python(code)}))\n"
    )
    env = {"PATH": os.environ["PATH"], "SWITCHBOARD_CREDENTIAL_DEMO": CANARY}
    done = subprocess.run([sys.executable, "-c", server], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert CANARY in report["mine"]  # the secret is there to be found
    result = report["result"]
    assert result["exit_code"] == 0, result["stderr"]
    assert CANARY not in result["stdout"] + result["stderr"]
    seen = ast.literal_eval(result["stdout"])  # pid -> its environ, or why it was unreadable
    # It sees only its own PID namespace (bwrap's init and itself); the server is not there.
    assert set(seen) == {1, 2, report["pid"]}
    assert seen[report["pid"]] == "FileNotFoundError"
    assert seen[1] == "PermissionError"


# ---- the network ---------------------------------------------------------------------------

@pytest.fixture
def listener() -> Iterator[tuple[int, list[Any]]]:
    """A TCP server on every host address, counting the connections it accepts."""
    accepted: list[Any] = []
    server = socket.create_server(("0.0.0.0", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, peer = server.accept()
            except TimeoutError:
                continue
            accepted.append(peer)
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nconsole")
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join()
        server.close()


def _host_addresses() -> list[str]:
    """127.0.0.1 and the host's own addresses on its other interfaces."""
    addresses = {"127.0.0.1"}
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            addresses.add(str(info[4][0]))
    except OSError:
        pass
    return sorted(addresses)


def test_code_cannot_reach_a_listener_on_the_host(listener: tuple[int, list[Any]]) -> None:
    port, accepted = listener
    addresses = _host_addresses()
    for address in addresses:  # the yardstick: from the host, each address answers
        with socket.create_connection((address, port), timeout=2) as conn:
            assert conn.recv(100).startswith(b"HTTP/1.0 200")
    reached_before = len(accepted)
    code = (
        "import socket\n"
        f"for address in {addresses!r}:\n"
        "    try:\n"
        f"        socket.create_connection((address, {port}), timeout=2).recv(100)\n"
        "        print('reached', address)\n"
        "    except OSError as exc:\n"
        "        print('refused', address, type(exc).__name__)\n"
    )
    result = _tool(code)
    assert result["exit_code"] == 0, result["stderr"]
    assert "reached" not in result["stdout"]
    assert result["stdout"].count("refused") == len(addresses)
    assert len(accepted) == reached_before


# ---- the file system -------------------------------------------------------------------------

_TRY_WRITES = """
import os
for path in PATHS:
    for mode in ("r+b", "ab", "wb"):
        try:
            with open(path, mode) as f:
                f.write(b"escaped")
            print("wrote", path, mode)
        except OSError as exc:
            print("refused", path, mode, type(exc).__name__)
try:
    os.makedirs("/usr/escaped")
    print("wrote /usr/escaped")
except OSError as exc:
    print("refused /usr/escaped", type(exc).__name__)
"""


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory in /tmp that any user may enter."""
    path = Path(tempfile.mkdtemp(prefix="sandbox-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def _writable_by_sandbox_user(path: Path) -> bool:
    """Whether uid 65534 could write ``path`` outside the sandbox."""
    return subprocess.run(["/bin/sh", "-c", 'test -w "$0"', str(path)], user=65534,
                          group=65534, extra_groups=[], env={}).returncode == 0


def test_code_cannot_write_outside_its_private_directory(public_dir: Path) -> None:
    # Files the sandbox user could write if it could see them: mode 0666, or owned by it.
    world_writable = public_dir / "world-writable.txt"
    world_writable.write_text("original")
    world_writable.chmod(0o666)
    owned = public_dir / "owned-by-sandbox-user.txt"
    owned.write_text("original")
    os.chown(owned, 65534, 65534)
    assert _writable_by_sandbox_user(world_writable) and _writable_by_sandbox_user(owned)
    in_project = ROOT / f"escape-{uuid.uuid4().hex}"
    database = Path(settings.DATABASES["default"]["NAME"])
    targets = [world_writable, owned, in_project]
    if settings.DATABASES["default"]["ENGINE"].endswith("sqlite3"):
        targets.append(database.resolve())
    before_db = database.stat().st_mtime_ns if database.exists() else None

    result = _tool(_TRY_WRITES.replace("PATHS", repr([str(p) for p in targets])))

    assert result["exit_code"] == 0, result["stderr"]
    assert "wrote" not in result["stdout"], result["stdout"]
    assert result["stdout"].count("refused") == 3 * len(targets) + 1
    assert world_writable.read_text() == "original"
    assert owned.read_text() == "original"
    assert not in_project.exists()
    assert not Path("/usr/escaped").exists()
    if before_db is not None:
        assert database.stat().st_mtime_ns == before_db


def test_code_writes_only_its_private_directory_which_goes_with_the_run() -> None:
    """/tmp inside is the private directory: a write there never reaches the host's /tmp."""
    name = f"escape-{uuid.uuid4().hex}"
    first = _tool(f"open('/work/note.txt', 'w').write('mine'); open('/tmp/{name}', 'w');"
                  "import os; print(sorted(os.listdir('/work')))")
    assert first["stdout"] == f"['{name}', 'note.txt']\n", first["stderr"]
    assert not (Path("/tmp") / name).exists()
    second = _tool("import os; print(os.listdir('/work'))")
    assert second["stdout"] == "[]\n"


# ---- limits ----------------------------------------------------------------------------------

_FORK_BOMB = """
import os, time
children = 0
try:
    for _ in range(200):
        pid = os.fork()
        if pid == 0:
            time.sleep(3)
            os._exit(0)
        children += 1
    print("unlimited", children)
except OSError as exc:
    print("limited", children, type(exc).__name__)
"""


def test_code_cannot_fork_beyond_the_process_limit() -> None:
    result = run_python(_FORK_BOMB, limits=Limits(timeout_s=8, processes=8))
    verdict, count, *error = result["stdout"].split()
    assert verdict == "limited", result
    assert int(count) < 8
    assert error == ["BlockingIOError"]


def test_code_that_takes_too_much_memory_is_stopped() -> None:
    bomb = "blocks = []\nwhile True:\n    blocks.append(bytearray(16 * 1024 * 1024))\n"
    result = _tool(bomb)
    assert result["exit_code"] != 0
    assert "MemoryError" in result["stderr"]
    big = _tool("x = bytearray(512 * 1024 * 1024)\nprint('allocated')")
    assert "MemoryError" in big["stderr"] and "allocated" not in big["stdout"]


def test_a_huge_output_is_cut_off_by_the_file_size_limit() -> None:
    result = run_python("import sys\nwhile True: sys.stdout.write('x' * 65536)",
                        limits=Limits(file_mb=1, max_output=100))
    assert result["exit_code"] != 0
    assert result["stdout"] == "x" * 100


_SETSID_CHILDREN = """
import os, time  # MARKER
open("/work/early", "w").write("before the timeout")
for n in range(3):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:  # a daemon: its own session, its parent gone
            time.sleep(TIMEOUT + 1)
            open(f"/work/late-{n}", "w").write("after the timeout")
            os._exit(0)
        os._exit(0)
time.sleep(60)
"""


def test_no_process_of_the_code_outlives_the_timeout(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    timeout = 2.0
    marker = f"sandbox-test-{uuid.uuid4().hex}"
    code = _SETSID_CHILDREN.replace("TIMEOUT", str(timeout)).replace("MARKER", marker)
    started = time.monotonic()
    with pytest.raises(ToolTimeout):
        run_python(code, limits=Limits(timeout_s=timeout), workdir=workdir)
    assert (workdir / "early").read_text() == "before the timeout"  # the children did start
    assert not _processes_running(marker)
    time.sleep(max(0.0, started + timeout + 3 - time.monotonic()))
    assert sorted(p.name for p in workdir.iterdir()) == ["early"]


def _processes_running(marker: str) -> list[int]:
    """Host pids whose command line holds ``marker`` (forked children keep their parent's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


# ---- failing closed --------------------------------------------------------------------------

def _would_escape(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('ran unsandboxed')"


def test_it_refuses_to_run_without_bubblewrap(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    with override_settings(SWITCHBOARD_SANDBOX_BWRAP=str(tmp_path / "no-such-bwrap")):
        with pytest.raises(ToolFailed, match="sandbox is not available .*bubblewrap was not "
                                             "found.*never run unsandboxed"):
            _tool(_would_escape(marker))
    assert not marker.exists()


def test_it_refuses_when_the_sandbox_fails_its_self_check(tmp_path: Path) -> None:
    """A 'bwrap' that runs the command without any isolation is caught by the probe."""
    fake = tmp_path / "fake-bwrap"
    fake.write_text('#!/bin/sh\nwhile [ "$1" != "--" ]; do shift; done\nshift\nexec "$@"\n')
    fake.chmod(0o755)
    marker = tmp_path / "ran"
    # An interpreter the sandbox user can run without the sandbox's help.
    python = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    assert python, "the test needs a system python3"
    with pytest.raises(SandboxUnavailable, match="network interfaces|PID namespace"):
        run_python(_would_escape(marker), config=SandboxConfig(bwrap=str(fake), python=python))
    assert not marker.exists()
    with pytest.raises(SandboxUnavailable, match="probe failed"):
        run_python(_would_escape(marker), config=SandboxConfig(bwrap="/bin/false"))


# ---- through a run ---------------------------------------------------------------------------

@pytest.mark.django_db(transaction=True)
def test_a_run_executes_code_in_the_sandbox_and_it_sees_no_secrets(
    runner: None, operator: Any
) -> None:
    """In the distributed pass a Celery worker holding SWITCHBOARD_CREDENTIAL_CRM runs it."""
    code = _READ_ENVIRONS.replace("SERVER", "1") + "import os\nprint(os.getuid())\n"
    process = Process.objects.create(slug="sandboxed", name="Sandboxed", pattern="deterministic")
    services.process_publish(process=process, input_schema={"type": "object"}, plan={
        "tasks": [{"key": "probe", "title": "Probe", "args": {"code": code},
                   "executor": {"type": "tool", "ref": "run_python"}}],
        "result": {"out": "$tasks.probe.stdout", "exit": "$tasks.probe.exit_code"}})
    grants.grant_plan_tools(process, by=None)
    run = services.run_create(process=process, input={}, user=operator)
    run = wait_for_run(run.pk, timeout=60)
    assert run.status == "succeeded", run.error
    assert run.result["exit"] == 0
    assert run.result["out"].endswith("\n65534\n")
    assert TEST_CRM_SECRET not in json.dumps(run.result)
