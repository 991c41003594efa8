"""Throwaway services for the fault tests: a PostgreSQL cluster, a Redis server, wrapped Celery
workers and a wrapped daphne server, each killable and restartable; plus a retrying API client
and a reader of the throwaway database."""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
# One directory per test process: runs of this module in parallel must not share log files.
LOGS = ROOT / "artifacts" / "faults" / str(os.getpid())
PG_BIN = Path(os.environ.get("SWITCHBOARD_PG_BIN", "/usr/lib/postgresql/15/bin"))
LEASE_SECONDS = 3
SWEEP_SECONDS = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], Any], *, timeout: float, what: str,
               interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def prune_logs() -> None:
    """Drop the log directories of test processes that have ended (keeps the newest one)."""
    dirs = sorted((d for d in LOGS.parent.glob("[0-9]*") if d.is_dir() and d != LOGS),
                  key=lambda d: d.stat().st_mtime)
    for d in dirs[:-1]:
        try:
            os.kill(int(d.name), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (PermissionError, ValueError):
            pass


def missing_binaries() -> list[str]:
    missing = [f"{PG_BIN / b}" for b in ("initdb", "pg_ctl", "postgres")
               if not (PG_BIN / b).exists()]
    if shutil.which("redis-server") is None:
        missing.append("redis-server")
    return missing


def _kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process(proc: subprocess.Popen[bytes], *, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left of it."""
    if proc.poll() is None:
        _kill_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc, signal.SIGKILL)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _spawn(args: list[str], *, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def base_env(database_url: str, redis_url: str | None, counter_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"DATABASE_URL", "REDIS_URL"} and not k.startswith("SWITCHBOARD_")}
    env.update({
        "DATABASE_URL": database_url,
        "DJANGO_SETTINGS_MODULE": "console.settings",
        "PYTHONUNBUFFERED": "1",
        "SWITCHBOARD_LEASE_SECONDS": str(LEASE_SECONDS),
        "SWITCHBOARD_SWEEP_SECONDS": str(SWEEP_SECONDS),
        "SWITCHBOARD_WORKER_THREADS": "4",
        "SWITCHBOARD_FAULT_COUNTER_DIR": str(counter_dir),
    })
    if redis_url:
        env["REDIS_URL"] = redis_url
    # The throwaway services need a key of their own when none is set (DEBUG is off).
    env.setdefault("SECRET_KEY", secrets.token_urlsafe(50))
    return env


class Postgres:
    """A cluster in a temp dir (initdb refuses root: run as `postgres` then)."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "pg"
        self.sock = workdir / "pgsock"
        self.port = free_port()
        # In the cluster's own temp dir: the `postgres` user may not be able to reach the
        # checkout (a clone in a mode-700 directory); destroy() copies it to the artifacts.
        self.log = workdir / "postgres.log"
        self._as: list[str] = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/switchboard"

    def _run(self, *args: str, timeout: float = 120) -> None:
        subprocess.run([*self._as, *args], check=True, timeout=timeout, cwd="/",
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def init(self) -> None:
        self.sock.mkdir(parents=True, exist_ok=True)
        LOGS.mkdir(parents=True, exist_ok=True)
        if self._as:
            shutil.chown(self.dir.parent, "postgres")
            shutil.chown(self.sock, "postgres")
            self.log.touch()
            shutil.chown(self.log, "postgres")
        self._run(str(PG_BIN / "initdb"), "-D", str(self.dir), "-A", "trust", "-U", "postgres",
                  "-E", "UTF8", "--locale=C", "--no-sync")
        self.start()
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute("CREATE DATABASE switchboard")

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir), "-o", opts, "-l", str(self.log),
                  "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir), "-m", "fast", "-w", "-t", "60",
                  "stop")

    def running(self) -> bool:
        return (self.dir / "postmaster.pid").exists() and listening(self.port)

    def destroy(self) -> None:
        if self.log.exists():
            shutil.copyfile(self.log, LOGS / "postgres.log")
        if (self.dir / "postmaster.pid").exists():
            try:
                self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.dir), "-m", "immediate",
                          "-w", "stop")
            except (subprocess.SubprocessError, OSError):
                pass


class Redis:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/1"

    def start(self) -> None:
        self.proc = _spawn(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                            "--save", "", "--appendonly", "no"],
                           env=dict(os.environ), log=LOGS / "redis.log")
        wait_until(lambda: listening(self.port), timeout=20, what="redis-server to listen")

    def kill(self) -> None:
        """kill -9: whatever the broker held is gone."""
        if self.proc is not None:
            _kill_group(self.proc)
            self.proc.wait(timeout=10)
            self.proc = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def destroy(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=2)
            self.proc = None


@dataclass
class Worker:
    index: int
    generation: int
    proc: subprocess.Popen[bytes]
    log: Path

    def ready(self) -> bool:
        return self.log.exists() and b"ready." in self.log.read_bytes()

    def children(self) -> list[int]:
        out = subprocess.run(["ps", "--ppid", str(self.proc.pid), "-o", "pid="],
                             capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


class Workers:
    """`celery -A console worker` (prefork, concurrency 2) through tests.faults.worker."""

    def __init__(self, env: dict[str, str], count: int = 2) -> None:
        self.env = env
        self.count = count
        self.live: dict[int, Worker] = {}
        self.all: list[Worker] = []
        self.restarts = 0

    def start(self, index: int) -> Worker:
        generation = sum(1 for w in self.all if w.index == index)
        log = LOGS / f"worker-{index}-{generation}.log"
        log.unlink(missing_ok=True)
        proc = _spawn([sys.executable, "-m", "tests.faults.worker", "-A", "console", "worker",
                       "--loglevel=INFO", "--concurrency=2", "--pool=prefork",
                       "--without-gossip", "--without-mingle", "--without-heartbeat",
                       "-n", f"fault{index}-{generation}-{os.getpid()}@%h"],
                      env=self.env, log=log)
        worker = Worker(index, generation, proc, log)
        self.live[index] = worker
        self.all.append(worker)
        return worker

    def wait_ready(self, timeout: float = 90) -> None:
        def ready() -> bool:
            for w in self.live.values():
                if w.proc.poll() is not None:
                    raise AssertionError(f"celery worker exited early; see {w.log}")
                if not w.ready():
                    return False
            return True

        wait_until(ready, timeout=timeout, what="the celery workers to be ready")

    def start_all(self) -> None:
        for i in range(self.count):
            if i not in self.live or self.live[i].proc.poll() is not None:
                self.start(i)
        self.wait_ready()

    def kill_random(self, rng: random.Random) -> str:
        """kill -9 a main worker (restarted at once) or one of its pool children.

        Pool children are only targets once their worker has logged `ready.`: Celery
        replaces a child lost while serving, but a child lost while the pool is still
        starting ends the worker with "Could not start worker processes", which is a
        start-up failure of the harness, not a fault the system is meant to survive.
        """
        targets: list[tuple[str, int, Worker]] = []
        for w in self.live.values():
            if w.proc.poll() is None:
                targets.append(("main", w.proc.pid, w))
                if w.ready():
                    targets.extend(("child", pid, w) for pid in w.children())
        if not targets:
            self.start_all()
            return "none alive"
        kind, pid, worker = rng.choice(targets)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return f"{kind} {pid} already gone"
        if kind == "main":
            worker.proc.wait(timeout=10)
            self.restarts += 1
            self.start(worker.index)
        return f"{kind} {pid} of worker {worker.index}"

    def destroy(self) -> None:
        for w in self.all:
            stop_process(w.proc, grace=5)
        self.live.clear()


class Server:
    """daphne through tests.faults.server (standalone work runs inside it)."""

    def __init__(self, env: dict[str, str], name: str) -> None:
        self.env = env
        self.name = name
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = LOGS / f"{self.name}-{self.starts}.log"
        log.unlink(missing_ok=True)
        self.starts += 1
        self.proc = _spawn([sys.executable, "-m", "tests.faults.server", "-b", "127.0.0.1",
                            "-p", str(self.port), "console.asgi:application"],
                           env=self.env, log=log)
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"daphne exited early; see {log}")
            return listening(self.port)

        wait_until(up, timeout=90, what="daphne to listen")

    def kill(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            self.proc.wait(timeout=10)
            self.proc = None

    def destroy(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=5)
            self.proc = None


def prepare_database(env: dict[str, str]) -> dict[str, str]:
    """migrate + seed_demo + the fault-test process + tokens, in a subprocess."""
    done = subprocess.run([sys.executable, "-m", "tests.faults.setup_db"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise AssertionError(f"preparing the throwaway database failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def audit_verify(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "manage.py", "audit_verify"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


# ---- the API, retried with the same Idempotency-Key -------------------------------------

@dataclass
class Answer:
    key: str
    at: float
    status: int | None  # None: no answer (connection refused, reset, timeout)
    json_error: bool  # the body is JSON with an "error" key
    body: str


@dataclass
class Call:
    key: str
    answers: list[Answer] = field(default_factory=list)
    result: dict[str, Any] | None = None  # the 2xx body

    @property
    def ok(self) -> bool:
        return self.result is not None


class Api:
    def __init__(self, base: Callable[[], str], token: str) -> None:
        self._base = base
        self.token = token
        self.calls: list[Call] = []
        self._lock = threading.Lock()

    def get(self, path: str) -> dict[str, Any]:
        r = httpx.get(self._base() + path, headers={"Authorization": f"Bearer {self.token}"},
                      timeout=30)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, payload: dict[str, Any], *, key: str | None = None,
             deadline_s: float = 120.0) -> Call:
        """POST with an Idempotency-Key; retried with the same key on a 5xx or no answer."""
        call = Call(key or uuid.uuid4().hex)
        with self._lock:
            self.calls.append(call)
        headers = {"Authorization": f"Bearer {self.token}", "Idempotency-Key": call.key}
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            try:
                r = httpx.post(self._base() + path, json=payload, headers=headers, timeout=20)
            except httpx.HTTPError as exc:
                call.answers.append(Answer(call.key, time.monotonic(), None, False,
                                           f"{type(exc).__name__}: {exc}"))
                time.sleep(0.5)
                continue
            try:
                body = r.json()
            except ValueError:
                body = None
            json_error = isinstance(body, dict) and "error" in body
            call.answers.append(Answer(call.key, time.monotonic(), r.status_code, json_error,
                                       r.text[:300]))
            if 200 <= r.status_code < 300:
                call.result = body if isinstance(body, dict) else {}
                return call
            if r.status_code < 500:
                return call  # a refusal: not retried
            time.sleep(0.5)
        return call


# ---- reading the throwaway database -------------------------------------------------------

def _uuid(value: Any) -> str:
    return str(uuid.UUID(str(value)))


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


class Db:
    """Plain reads of the app's tables (PostgreSQL through psycopg, or the SQLite file)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _rows(self, sql: str) -> list[tuple[Any, ...]]:
        if self.url.startswith("sqlite:///"):
            conn = sqlite3.connect(self.url.removeprefix("sqlite:///"), timeout=10)
            try:
                return conn.execute(sql).fetchall()
            finally:
                conn.close()
        import psycopg

        with psycopg.connect(self.url, connect_timeout=3, autocommit=True) as conn:
            return conn.execute(sql).fetchall()

    def run_statuses(self) -> dict[str, str]:
        return {_uuid(i): s for i, s in self._rows("SELECT id, status FROM orchestration_run")}

    def runs(self) -> dict[str, dict[str, Any]]:
        return {_uuid(i): {"status": s, "input": _json(inp), "error": err}
                for i, s, inp, err in self._rows(
                    "SELECT id, status, input, error FROM orchestration_run")}

    def tasks(self) -> dict[tuple[str, str], dict[str, Any]]:
        return {(_uuid(r), k): {"status": s, "attempts": a, "error": e}
                for r, k, s, a, e in self._rows(
                    "SELECT run_id, key, status, attempts, error FROM orchestration_task")}

    def events(self) -> dict[str, list[tuple[int, str, dict[str, Any]]]]:
        out: dict[str, list[tuple[int, str, dict[str, Any]]]] = {}
        for chain, seq, kind, data in self._rows(
                "SELECT chain, seq, kind, data FROM audit_event ORDER BY chain, seq"):
            out.setdefault(_uuid(chain), []).append((seq, kind, _json(data) or {}))
        return out

    def requests(self) -> list[dict[str, Any]]:
        return [{"id": _uuid(i), "run": _uuid(r), "task": t, "reason": reason, "status": s}
                for i, r, t, reason, s in self._rows(
                    "SELECT id, run_id, task_key, reason, status "
                    "FROM approvals_approvalrequest")]

    def decisions(self) -> list[dict[str, Any]]:
        return [{"request": _uuid(r), "decider": d, "kind": k} for r, d, k in self._rows(
            "SELECT request_id, decider_id, kind FROM approvals_decision")]
