"""Operator trial of distributed mode: a burst of runs through the API while a worker dies.

    .venv/bin/python benchmarks/operator_trial.py            # --runs 200 --clients 8

What it does, with the throwaway services of the fault tests (tests/faults/infra.py):

1. Starts a PostgreSQL cluster in a temp dir, a Redis server, 2 Celery workers
   (``--concurrency=2 --pool=prefork``) and one daphne server; migrates, seeds the demo and
   creates an ``operator`` API token. The project's default lease and sweep periods are used
   (``SWITCHBOARD_LEASE_SECONDS`` / ``SWITCHBOARD_SWEEP_SECONDS`` are not set), so the recovery
   delay is the one a deployment gets.
2. Posts ``--runs`` runs of ``vendor-onboarding`` to ``POST /api/v1/runs`` as fast as the API
   takes them, from ``--clients`` threads with one HTTP connection each; every request has its
   own ``Idempotency-Key``, and a 5xx or a connection error is retried with the same key.
3. Once ``--kill-after`` posts (default: half of them) have been answered, ``kill -9`` one
   worker's main process and its pool children, and starts it again ``--restart-after`` seconds
   later (as a process supervisor would).
4. Waits until every created run is terminal (``--timeout`` seconds after the last post),
   polling the run statuses in the database.
5. Prints the answers per status code, retries, the API post rate, the time from the first post
   to the last run finished and runs/s, runs by final status, run durations (median, p95, max),
   what the sweep did (outbox messages relayed, expired leases taken over; from the worker
   logs), the slowest runs with their longest pause between two ledger events and whether the
   kill held them up, the recovery delay (kill to the held-up runs' next ledger event), and the
   exit status of ``manage.py audit_verify``.

Exit 1 if a run did not succeed, the API answered a 500, or ``audit_verify`` failed. Everything
started is stopped at the end, also on an error or Ctrl-C. Service logs go to
``artifacts/faults/<pid>/``.
"""

from __future__ import annotations

import argparse
import ast
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.faults.infra import (  # noqa: E402
    LOGS,
    Postgres,
    Redis,
    Server,
    Worker,
    Workers,
    audit_verify,
    base_env,
    missing_binaries,
    prepare_database,
    wait_until,
)

PROCESS = "vendor-onboarding"
VENDOR_INPUT = {"name": "Northwind Traders", "country": "DE",  # as tests/conftest.py
                "iban": "DE89370400440532013000", "email": "ap@northwind.example"}
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
POLL_S = 0.25
RETRY_PAUSE_S = 0.2


# ---- posting ----------------------------------------------------------------------------

@dataclass
class Post:
    index: int
    key: str
    statuses: list[int | None] = field(default_factory=list)  # None: no answer
    errors: list[str] = field(default_factory=list)
    run_id: str | None = None
    answered_at: float | None = None


class Poster:
    """``clients`` threads, each with its own HTTP connection, taking posts from one queue."""

    def __init__(self, base: str, token: str, n: int, clients: int, kill_after: int,
                 on_threshold: threading.Event, give_up_s: float = 120.0) -> None:
        self.base, self.token = base, token
        self.posts = [Post(i, f"trial-{i:05d}-{uuid.uuid4().hex}") for i in range(n)]
        self.clients = clients
        self.kill_after = kill_after
        self.on_threshold = on_threshold
        self.give_up_s = give_up_s
        self.answered = 0
        self.first_sent: float | None = None  # time.time()
        self.last_answered: float | None = None  # time.time()
        self._lock = threading.Lock()
        self._queue: queue.Queue[Post] = queue.Queue()
        self._stop = threading.Event()
        for post in self.posts:
            self._queue.put(post)

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)

    def _client(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.base, headers=headers, timeout=30.0,
                          limits=httpx.Limits(max_connections=1)) as client:
            while not self._stop.is_set():
                try:
                    post = self._queue.get_nowait()
                except queue.Empty:
                    return
                self._post(client, post)

    def _post(self, client: httpx.Client, post: Post) -> None:
        payload = {"process": PROCESS,
                   "input": {**VENDOR_INPUT, "name": f"Northwind Traders {post.index:05d}"}}
        with self._lock:
            if self.first_sent is None:
                self.first_sent = time.time()
        deadline = time.monotonic() + self.give_up_s
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                r = client.post("/api/v1/runs", json=payload,
                                headers={"Idempotency-Key": post.key})
            except httpx.HTTPError as exc:
                post.statuses.append(None)
                post.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(RETRY_PAUSE_S)
                continue
            post.statuses.append(r.status_code)
            if r.status_code >= 500:
                post.errors.append(f"{r.status_code} {r.headers.get('X-Request-ID', '')} "
                                   f"{r.text[:200]}")
                pause = RETRY_PAUSE_S
                if r.status_code == 503:
                    try:
                        pause = max(pause, float(r.headers.get("Retry-After", "0")))
                    except ValueError:
                        pass
                time.sleep(min(pause, 5.0))
                continue
            if r.status_code == 201:
                post.run_id = str(r.json()["id"])
            else:
                post.errors.append(f"{r.status_code} {r.text[:200]}")
            break
        now = time.time()
        with self._lock:
            post.answered_at = now
            self.last_answered = now
            self.answered += 1
            if self.answered == self.kill_after:
                self.on_threshold.set()


# ---- the kill -----------------------------------------------------------------------------

@dataclass
class Kill:
    at: float = 0.0  # time.time()
    killed: list[int] = field(default_factory=list)
    restarted_at: float | None = None
    ready_at: float | None = None
    error: str | None = None


def kill_and_restart(workers: Workers, index: int, restart_after: float, kill: Kill,
                     stop: threading.Event) -> None:
    """kill -9 worker ``index``'s main process and pool children; start it again later."""
    worker: Worker = workers.live[index]
    children = worker.children()
    kill.at = time.time()
    for pid in [worker.proc.pid, *children]:
        try:
            os.kill(pid, signal.SIGKILL)
            kill.killed.append(pid)
        except ProcessLookupError:
            pass
    worker.proc.wait(timeout=10)
    if stop.wait(restart_after):
        return
    fresh = workers.start(index)
    kill.restarted_at = time.time()
    try:
        wait_until(lambda: fresh.log.exists() and b"ready." in fresh.log.read_bytes(),
                   timeout=90, what="the restarted worker to be ready")
        kill.ready_at = time.time()
    except AssertionError as exc:
        kill.error = str(exc)


# ---- reading the database -----------------------------------------------------------------

def statuses(conn: psycopg.Connection[Any], run_ids: list[str]) -> dict[str, str]:
    rows = conn.execute("SELECT id::text, status FROM orchestration_run WHERE id = ANY(%s::uuid[])",
                        [run_ids]).fetchall()
    return dict(rows)


@dataclass
class RunFacts:
    run_id: str
    status: str
    created: datetime
    finished: datetime | None
    gap_s: float = 0.0  # longest pause between two consecutive ledger events
    gap_after: str = ""  # the event the longest pause followed
    gap_start: datetime | None = None
    gap_end: datetime | None = None
    recovered: list[str] = field(default_factory=list)  # tasks taken over from a lost lease
    recovered_at: datetime | None = None  # the first task.recovered / task.requeued event
    requeued: list[str] = field(default_factory=list)

    @property
    def duration_s(self) -> float | None:
        return (self.finished - self.created).total_seconds() if self.finished else None


def run_facts(conn: psycopg.Connection[Any], run_ids: list[str]) -> dict[str, RunFacts]:
    facts = {rid: RunFacts(rid, s, c, f) for rid, s, c, f in conn.execute(
        "SELECT id::text, status, created_at, finished_at FROM orchestration_run "
        "WHERE id = ANY(%s::uuid[])", [run_ids]).fetchall()}
    previous: dict[str, tuple[datetime, str]] = {}
    for chain, kind, at, data in conn.execute(
            "SELECT chain::text, kind, at, data FROM audit_event WHERE chain = ANY(%s::uuid[]) "
            "ORDER BY chain, seq", [run_ids]).fetchall():
        run = facts.get(chain)
        if run is None:
            continue
        if chain in previous:
            before, before_kind = previous[chain]
            gap = (at - before).total_seconds()
            if gap > run.gap_s:
                run.gap_s, run.gap_after = gap, before_kind
                run.gap_start, run.gap_end = before, at
        previous[chain] = (at, kind)
        task = (data or {}).get("task", "?") if isinstance(data, dict) else "?"
        if kind == "task.recovered":
            run.recovered.append(task)
        elif kind == "task.requeued":
            run.requeued.append(task)
        if kind in {"task.recovered", "task.requeued"} and run.recovered_at is None:
            run.recovered_at = at
    return facts


def sweep_totals(workers: Workers) -> Counter[str]:
    """Sum of the sweep's own counts (``sweep: {...}`` lines) over every worker log."""
    totals: Counter[str] = Counter()
    for worker in workers.all:
        if not worker.log.exists():
            continue
        for line in worker.log.read_text(errors="replace").splitlines():
            _, found, tail = line.partition("sweep: {")
            if not found:
                continue
            try:
                counts = ast.literal_eval("{" + tail)
            except (ValueError, SyntaxError):
                continue
            if isinstance(counts, dict):
                totals.update({k: v for k, v in counts.items() if isinstance(v, int)})
    return totals


# ---- report -------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def trial(args: argparse.Namespace) -> int:
    missing = missing_binaries()
    if missing:
        print("the trial needs " + ", ".join(missing), file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="switchboard-trial-"))
    workdir.chmod(0o755)
    counters = workdir / "counters"
    counters.mkdir()
    counters.chmod(0o777)
    pg, redis = Postgres(workdir), Redis()
    workers: Workers | None = None
    server: Server | None = None
    stop = threading.Event()
    kill_thread: threading.Thread | None = None
    ok = False
    try:
        print(f"starting PostgreSQL, Redis, 2 workers, daphne (logs: {LOGS})", flush=True)
        pg.init()
        redis.start()
        env = base_env(pg.url, redis.url, counters)
        # The project's defaults, not the fault tests' short lease and sweep.
        env.pop("SWITCHBOARD_LEASE_SECONDS", None)
        env.pop("SWITCHBOARD_SWEEP_SECONDS", None)
        token = prepare_database(env)["operator"]
        workers = Workers(env, count=2)
        server = Server(env, "daphne-trial")
        workers.start_all()
        server.start()
        lease = subprocess.run(
            [sys.executable, "-c", "import django; django.setup(); from django.conf import "
             "settings as s; print(s.SWITCHBOARD_LEASE_SECONDS, s.SWITCHBOARD_SWEEP_SECONDS)"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60).stdout.split()
        print(f"lease {lease[0] if lease else '?'} s, sweep {lease[1] if lease else '?'} s; "
              f"posting {args.runs} runs from {args.clients} clients, kill -9 of worker 0 "
              f"after {args.kill_after} answers", flush=True)

        threshold = threading.Event()
        poster = Poster(server.base, token, args.runs, args.clients, args.kill_after, threshold)
        kill = Kill()

        def killer() -> None:
            while not threshold.wait(0.1):
                if stop.is_set():
                    return
            assert workers is not None
            try:
                kill_and_restart(workers, 0, args.restart_after, kill, stop)
            except Exception as exc:  # reported below
                kill.error = f"{type(exc).__name__}: {exc}"

        kill_thread = threading.Thread(target=killer, daemon=True)
        kill_thread.start()
        try:
            poster.run()
        finally:
            poster.stop()
        last_post = poster.last_answered or time.time()
        run_ids = [p.run_id for p in poster.posts if p.run_id]

        # Wait for every created run to be terminal.
        deadline = time.monotonic() + args.timeout
        with psycopg.connect(pg.url, autocommit=True) as conn:
            while True:
                now_status = statuses(conn, run_ids)
                pending = [r for r in run_ids if now_status.get(r) not in TERMINAL]
                if not pending or time.monotonic() > deadline:
                    break
                time.sleep(POLL_S)
            kill_thread.join(timeout=120)
            facts = run_facts(conn, run_ids)
            stuck_tasks = conn.execute(
                "SELECT run_id::text, key, status, attempts, lease_owner, lease_expires_at "
                "FROM orchestration_task WHERE run_id = ANY(%s::uuid[]) AND status <> "
                "'succeeded' ORDER BY run_id, position", [pending]).fetchall() if pending else []

        verify = audit_verify(env)

        # ---- figures
        answers = Counter(s for p in poster.posts for s in p.statuses)
        retries = sum(max(0, len(p.statuses) - 1) for p in poster.posts)
        first = poster.first_sent or last_post
        post_span = max(last_post - first, 1e-9)
        finished = [f.finished.timestamp() for f in facts.values() if f.finished]
        end = max(finished) if finished else time.time()
        span = end - first
        by_status = Counter(f.status for f in facts.values())
        durations = [f.duration_s for f in facts.values() if f.duration_s is not None]
        assert workers is not None
        sweep = sweep_totals(workers)
        # The runs the kill held up: a task taken over from a lost lease or requeued (ledger
        # events say so; recovered when that event was written), or a message the dead worker
        # had taken and the sweep relayed again: no ledger event says so, so of the runs whose
        # longest ledger pause spans the kill, those that resumed last are taken, as many as
        # the sweep relayed (recovered at the end of that pause).
        marked = {f.run_id: f.recovered_at for f in facts.values() if f.recovered_at}
        spans = sorted((f for f in facts.values() if f.run_id not in marked and kill.at
                        and f.gap_start is not None and f.gap_start.timestamp() <= kill.at
                        and f.gap_end is not None and f.gap_end.timestamp() > kill.at),
                       key=lambda f: -(f.gap_end.timestamp() if f.gap_end else 0.0))
        marked.update({f.run_id: f.gap_end for f in spans[:sweep["relayed"]]})
        touched = [facts[r] for r in marked]

        print()
        print("== operator trial: distributed mode, "
              f"{args.runs} x {PROCESS}, kill -9 of one worker mid-burst")
        codes = ", ".join(f"{'no answer' if c is None else c}: {n}"
                          for c, n in sorted(answers.items(), key=lambda kv: (kv[0] is None,
                                                                             kv[0] or 0)))
        print(f"answers by status      {codes}")
        print(f"retries (same key)     {retries}")
        print(f"runs created           {len(run_ids)} of {args.runs}")
        print(f"API post rate          {len(poster.posts) / post_span:.1f} posts/s "
              f"({post_span:.2f} s for {len(poster.posts)} posts)")
        print(f"first post -> last run finished  {span:.2f} s "
              f"({by_status.get('succeeded', 0) / span if span > 0 else 0:.1f} runs/s)")
        print("runs by final status   " + ", ".join(f"{s}: {n}" for s, n in
                                                     sorted(by_status.items())))
        if durations:
            print(f"run duration (created -> finished)  median "
                  f"{statistics.median(durations):.2f} s, "
                  f"p95 {percentile(durations, 0.95):.2f} s, max {max(durations):.2f} s")
        if kill.at:
            restarted = (f"restarted +{kill.restarted_at - kill.at:.1f} s"
                         if kill.restarted_at else "not restarted")
            ready = f", ready +{kill.ready_at - kill.at:.1f} s" if kill.ready_at else ""
            print(f"kill -9 at +{kill.at - first:.2f} s after the first post: pids "
                  f"{' '.join(map(str, kill.killed))}; {restarted}{ready}")
        if kill.error:
            print(f"kill/restart problem: {kill.error}")
        print("sweep totals           " + ", ".join(
            f"{k} {sweep[k]}" for k in ("relayed", "taken_over", "stalled", "resumed")))
        print(f"runs held up by the kill: {len(touched)} ("
              f"{sum(1 for f in facts.values() if f.recovered)} with a task taken over from a "
              f"lost lease, {sum(1 for f in facts.values() if f.requeued)} requeued, the rest "
              "waiting on a message the dead worker had taken)")
        slowest = sorted(facts.values(), key=lambda f: -(f.duration_s or 1e9))[:args.show]
        slowest += [f for f in touched if f not in slowest]  # every held-up run is listed
        print(f"slowest {args.show} runs and every held-up one (duration; longest pause "
              "between two ledger events, from/to relative to the kill, the event before it; "
              "held up by the kill):")
        for f in slowest:
            dur = f"{f.duration_s:6.2f} s" if f.duration_s is not None else "  (open)"
            rel = (f"kill{f.gap_start.timestamp() - kill.at:+.1f}.."
                   f"{f.gap_end.timestamp() - kill.at:+.1f} s"
                   if f.gap_start is not None and f.gap_end is not None and kill.at else "-")
            extra = ", ".join([*(f"task {t} taken over" for t in f.recovered),
                               *(f"task {t} requeued" for t in f.requeued)])
            resumed = marked.get(f.run_id)
            if resumed is not None and kill.at:
                extra = ", ".join([*([extra] if extra else []), "resumed at kill"
                                   f"{resumed.timestamp() - kill.at:+.1f} s"])
            held = ("yes" + (f" ({extra})" if extra else "")) if f.run_id in marked else "no"
            print(f"  {f.run_id[:8]} {f.status:<10} {dur}; pause {f.gap_s:6.2f} s {rel} "
                  f"after {f.gap_after or '-'}; {held}")
        if touched and kill.at:
            delays = [at.timestamp() - kill.at for at in marked.values() if at is not None]
            if delays:
                print(f"recovery delay (kill -> held-up run's work resumed): "
                      f"median {statistics.median(delays):.2f} s, max {max(delays):.2f} s")
        verify_tail = (verify.stdout.strip().splitlines() or verify.stderr.strip().splitlines()
                       or [""])[-1]
        print(f"audit_verify           exit {verify.returncode}: {verify_tail}")

        # ---- verdict
        problems: list[str] = []
        if answers.get(500):
            problems.append(f"{answers[500]} answers were 500")
            for p in poster.posts:
                for e in p.errors:
                    if e.startswith("500"):
                        problems.append(f"  {p.key}: {e}")
        not_created = [p for p in poster.posts if not p.run_id]
        if not_created:
            problems.append(f"{len(not_created)} posts created no run: "
                            + "; ".join(f"{p.key} {p.errors[-1:] or p.statuses}"
                                        for p in not_created[:5]))
        bad = [f for f in facts.values() if f.status != "succeeded"]
        if bad:
            problems.append(f"{len(bad)} runs did not succeed: "
                            + "; ".join(f"{f.run_id} {f.status}" for f in bad[:10]))
            for row in stuck_tasks[:20]:
                problems.append("  task " + " ".join(str(c) for c in row))
        if verify.returncode != 0:
            problems.append("audit_verify failed:\n" + (verify.stdout + verify.stderr)[-2000:])
        if problems:
            print("FAILED:\n" + "\n".join(problems))
            return 1
        print("OK")
        ok = True
        return 0
    finally:
        stop.set()
        if kill_thread is not None:
            kill_thread.join(timeout=15)
        if server is not None:
            server.destroy()
        if workers is not None:
            workers.destroy()
        redis.destroy()
        pg.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
        if not ok:
            print(f"service logs: {LOGS}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="runs to post (default 200)")
    parser.add_argument("--clients", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--kill-after", type=int, default=None,
                        help="answered posts before the kill (default: half of --runs)")
    parser.add_argument("--restart-after", type=float, default=2.0,
                        help="seconds before the killed worker is started again (default 2)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds after the last post for every run to end (default 120)")
    parser.add_argument("--show", type=int, default=8, help="slowest runs to list (default 8)")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.clients < 1:
        parser.error("--runs and --clients must be at least 1")
    if args.kill_after is None:
        args.kill_after = max(1, args.runs // 2)
    args.kill_after = min(max(1, args.kill_after), args.runs)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in background
    try:
        return trial(args)
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
