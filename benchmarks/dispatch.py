"""Dispatch overhead in distributed mode: a bare Celery chain against Switchboard runs.

    .venv/bin/python benchmarks/dispatch.py      # --chains 50 --runs 30 --burst 200 --tasks 1200

Both sides run on the same Redis and PostgreSQL servers, one after the other (never at once, so
they do not compete for CPU), each with one worker process started here:
``celery ... worker --concurrency=2 --pool=prefork --without-gossip --without-mingle
--without-heartbeat --loglevel=INFO``, logging to ``artifacts/bench-dispatch-*.log``.

- Bare Celery (what a user would pick instead): a tiny app defined in this module
  (``bare_app``; broker = Redis db ``--bare-db``, default 9; ``task_acks_late``,
  ``worker_prefetch_multiplier=1``, json, no result backend). (a) ``--chains`` sequential chains
  of 6 no-op tasks; each link passes the first link's start time on as its result and the last
  link pushes (start, end) to a Redis list, so latency = first task start to last task end
  (also: send to last end). (b) ``--tasks`` no-op tasks sent as fast as possible from here on one
  producer connection; each task INCRs a Redis counter (one round trip, the only work it does)
  and the one that reaches the total pushes its end time; rate = tasks / (first send to last
  completion).
- Switchboard: a fresh PostgreSQL database ``switchboard_bench_dispatch_<pid>`` (``migrate``,
  ``seed_demo``; dropped at the end), Redis db ``--switchboard-db`` (default 10, flushed at
  start), one ``celery -A console worker``. (a) ``--runs`` sequential ``vendor-onboarding`` runs
  (6 tasks), each created with ``orchestration.services.run_create`` as ``operator`` from this
  process and awaited; latency = ``at`` of the run's last ledger event minus ``at`` of its first
  (``run.created``, written by the create call, so this includes the hop to the first task,
  which the bare chain's figure does not); also create call to ``finished_at``. (b) ``--burst``
  runs created in a loop as fast as possible; rate = runs that succeeded / (first create call
  to the last ``finished_at``); errors = runs not ``succeeded`` within ``--timeout`` seconds.

Both sides first do ``--warmup`` unmeasured chains / runs. Completion is detected by polling:
one primary-key query every 20 ms per sequential run, one count over the burst's ids every
50 ms; ledger and ``finished_at`` times are read from the database afterwards, so the polling
interval does not enter the figures.

Targets: the median vendor-onboarding latency (first to last ledger event) at most twice the
median bare 6-task chain latency; a burst of 200 runs sustains at least 30 runs/s with 0 errors
(for reference the table shows bare Celery's no-op rate / 6 and a third of that).

Options: ``--chains N``, ``--runs N``, ``--burst N``, ``--tasks N``, ``--warmup N``,
``--timeout S``, ``--redis-url`` (server; default redis://127.0.0.1:6379), ``--bare-db``,
``--switchboard-db``, ``--database-url`` (admin connection used to create and drop the database;
default ``$BENCH_POSTGRES_URL`` or postgresql://postgres@127.0.0.1:5432/postgres), ``--json PATH``,
``--check`` (exit 1 if a target is missed).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from celery import Celery, chain

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379"
CHAIN_LENGTH = 6  # vendor-onboarding has 6 tasks
LATENCY_FACTOR = 2.0  # Switchboard median latency at most this times the bare chain's
TARGET_RUNS_PER_S = 30.0
PROCESS = "vendor-onboarding"
VENDOR_INPUT = {"name": "Northwind Traders", "country": "DE",  # as tests/conftest.py
                "iban": "DE89370400440532013000", "email": "ap@northwind.example"}
WORKER_FLAGS = ["--concurrency=2", "--pool=prefork", "--without-gossip", "--without-mingle",
                "--without-heartbeat", "--loglevel=INFO"]
BARE_BROKER_ENV = "SWITCHBOARD_BENCH_BARE_BROKER"
DONE_KEY = "bench:dispatch:done"
SEQUENTIAL_POLL_S = 0.02
BURST_POLL_S = 0.05


# ---- the bare Celery app (imported by its worker as benchmarks.dispatch:bare_app) ------------

bare_app = Celery("switchboard_bench_bare",
                  broker=os.environ.get(BARE_BROKER_ENV, f"{DEFAULT_REDIS}/9"),
                  set_as_current=False)  # never the app Switchboard's shared tasks resolve to
bare_app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    accept_content=["json"],
    result_backend=None,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
)
_redis_client: Any = None


def _redis() -> Any:
    """One client per process (created lazily, so each prefork child makes its own)."""
    global _redis_client
    if _redis_client is None:
        import redis

        _redis_client = redis.Redis.from_url(bare_app.conf.broker_url)
    return _redis_client


@bare_app.task(name="bench.chain_link")
def chain_link(started: float | None, token: str, position: int, total: int) -> float:
    first = time.time() if started is None else started
    if position == total - 1:
        _redis().rpush(DONE_KEY, json.dumps({"token": token, "start": first, "end": time.time()}))
    return first


@bare_app.task(name="bench.burst_noop")
def burst_noop(token: str, total: int) -> None:
    client = _redis()
    if client.incr(f"bench:dispatch:burst:{token}") == total:
        client.rpush(DONE_KEY, json.dumps({"token": token, "end": time.time()}))


# ---- helpers ----------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {"median_ms": statistics.median(ms) if ms else float("nan"),
            "p95_ms": percentile(ms, 0.95), "n": len(ms)}


def with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def worker_process(app: str, *, env: dict[str, str], name: str,
                   log_name: str) -> Iterator[subprocess.Popen[bytes]]:
    """A ``celery worker`` in its own session, ready when yielded; stopped (TERM, then KILL of
    its process group, which holds its pool children) however the block ends."""
    ARTIFACTS.mkdir(exist_ok=True)
    log_path = ARTIFACTS / log_name
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", app, "worker", *WORKER_FLAGS,
             "-n", f"{name}@%h"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            while b" ready." not in log_path.read_bytes():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} worker exited early; see {log_path}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} worker not ready after 60 s; see {log_path}")
                time.sleep(0.1)
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()  # warm shutdown: finishes the tasks it is running
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            try:  # pool children left behind by a parent that died
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---- bare Celery ------------------------------------------------------------------------------

def _wait_done(client: Any, token: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        item = client.blpop([DONE_KEY], timeout=max(min(left, 5.0), 0.01))
        if item is None:
            continue
        done = json.loads(item[1])
        if done["token"] == token:
            return done
    raise TimeoutError(f"bare Celery: {token} did not finish within {timeout:g} s")


def bench_bare(args: argparse.Namespace, broker: str) -> dict[str, Any]:
    import redis

    client = redis.Redis.from_url(broker)
    client.flushdb()
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{BARE_BROKER_ENV: broker})
    env.pop("DJANGO_SETTINGS_MODULE", None)
    bare_app.conf.broker_url = broker
    with worker_process("benchmarks.dispatch:bare_app", env=env, name=f"bench-bare-{os.getpid()}",
                        log_name="bench-dispatch-bare-worker.log"):
        latency: list[float] = []
        end_to_end: list[float] = []
        for index in range(args.warmup + args.chains):
            token = uuid.uuid4().hex
            links = [chain_link.s(None, token, 0, CHAIN_LENGTH)]
            links += [chain_link.s(token, i, CHAIN_LENGTH) for i in range(1, CHAIN_LENGTH)]
            sent = time.time()
            chain(*links).apply_async()
            done = _wait_done(client, token, args.timeout)
            if index >= args.warmup:
                latency.append(done["end"] - done["start"])
                end_to_end.append(done["end"] - sent)
        log(f"  bare: {args.chains} chains done")

        token = uuid.uuid4().hex
        with bare_app.producer_or_acquire() as producer:
            first_send = time.time()
            for _ in range(args.tasks):
                burst_noop.apply_async((token, args.tasks), producer=producer)
            sent_s = time.time() - first_send
        done = _wait_done(client, token, args.timeout)
        burst_s = done["end"] - first_send
        log(f"  bare: {args.tasks} burst tasks done")
    client.flushdb()
    client.close()
    return {
        "latency": summary_ms(latency),
        "end_to_end": summary_ms(end_to_end),
        "burst": {"tasks": args.tasks, "seconds": burst_s, "tasks_per_s": args.tasks / burst_s,
                  "send_per_s": args.tasks / sent_s if sent_s > 0 else float("inf")},
    }


# ---- Switchboard ------------------------------------------------------------------------------

ENDED = ("succeeded", "failed", "cancelled", "escalated", "waiting")


def setup_django(database_url: str, redis_url: str) -> None:
    """Point Django at the benchmark's database and Redis db, then set it up (distributed mode:
    ``run_create`` dispatches through Celery to the worker)."""
    os.environ.update(DATABASE_URL=database_url, REDIS_URL=redis_url, DEBUG="false",
                      DJANGO_SETTINGS_MODULE="console.settings")
    # A throwaway key for the benchmark's processes (start-up refuses none with DEBUG off).
    os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(50))
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from celery import current_app
    from django.conf import settings

    if settings.SWITCHBOARD_MODE != "distributed" or current_app.main != "switchboard":
        raise RuntimeError("Switchboard is not in distributed mode with its own Celery app")


def _one_run(process: Any, user: Any, timeout: float) -> dict[str, Any]:
    from audit.models import Event
    from orchestration.models import Run
    from orchestration.services import run_create

    created = time.time()
    try:
        run = run_create(process=process, input=dict(VENDOR_INPUT), user=user)
    except Exception as exc:  # noqa: BLE001 - a failed create is a failed run: count, go on
        return {"status": f"create failed: {_describe(exc)}"}
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = Run.objects.filter(pk=run.pk).values_list("status", flat=True).first() or ""
        if status in ENDED:
            break
        time.sleep(SEQUENTIAL_POLL_S)
    finished = Run.objects.filter(pk=run.pk).values_list("finished_at", flat=True).first()
    ats = list(Event.objects.filter(chain=run.pk).order_by("seq").values_list("at", flat=True))
    if status not in ENDED:
        status = f"{status or 'gone'} at the {timeout:g} s timeout"
    return {"status": status, "latency": (ats[-1] - ats[0]).total_seconds(),
            "end_to_end": finished.timestamp() - created if finished else None,
            "events": len(ats)}


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()


def bench_switchboard(args: argparse.Namespace, database_url: str,
                      redis_url: str) -> dict[str, Any]:
    import redis
    from django.contrib.auth.models import User
    from django.core.management import call_command

    from orchestration.models import Process, Run
    from orchestration.services import run_create

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    log("  switchboard: migrate, seed_demo ...")
    call_command("migrate", verbosity=0, interactive=False)
    with open(os.devnull, "w") as devnull:
        call_command("seed_demo", stdout=devnull)
    process = Process.objects.get(slug=PROCESS)
    user = User.objects.get(username="operator")
    env = dict(os.environ, DATABASE_URL=database_url, REDIS_URL=redis_url, DEBUG="false",
               DJANGO_SETTINGS_MODULE="console.settings", PYTHONPATH=str(ROOT))
    with worker_process("console", env=env, name=f"bench-switchboard-{os.getpid()}",
                        log_name="bench-dispatch-switchboard-worker.log"):
        latency: list[float] = []
        end_to_end: list[float] = []
        failed: list[str] = []
        events = 0
        for index in range(args.warmup + args.runs):
            one = _one_run(process, user, args.timeout)
            if index < args.warmup:
                continue
            if one["status"] != "succeeded":
                failed.append(one["status"] or "timeout")
                continue
            latency.append(one["latency"])
            end_to_end.append(one["end_to_end"])
            events = one["events"]
        log(f"  switchboard: {args.runs} sequential runs done")

        ids: list[Any] = []
        create_errors: list[str] = []
        first_create = time.time()
        for _ in range(args.burst):
            try:
                ids.append(run_create(process=process, input=dict(VENDOR_INPUT), user=user).pk)
            except Exception as exc:  # noqa: BLE001 - counted as an error, the burst goes on
                create_errors.append(_describe(exc))
        create_s = time.time() - first_create
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            if not Run.objects.filter(pk__in=ids).exclude(status__in=ENDED).exists():
                break
            time.sleep(BURST_POLL_S)
        rows = list(Run.objects.filter(pk__in=ids).values_list("status", "finished_at"))
        log(f"  switchboard: burst of {args.burst} runs done")
    client.flushdb()
    client.close()
    succeeded = [f for s, f in rows if s == "succeeded" and f is not None]
    span = max(f.timestamp() for f in succeeded) - first_create if succeeded else float("nan")
    return {
        "latency": summary_ms(latency),
        "end_to_end": summary_ms(end_to_end),
        "sequential_failed": failed,
        "events_per_run": events,
        "burst": {"runs": args.burst, "succeeded": len(succeeded),
                  "create_errors": create_errors,
                  "not_succeeded": sorted(s for s, _ in rows if s != "succeeded"),
                  "errors": args.burst - len(succeeded), "seconds": span,
                  "runs_per_s": len(succeeded) / span if succeeded else 0.0,
                  "create_per_s": args.burst / create_s if create_s > 0 else float("inf")},
    }


# ---- the table --------------------------------------------------------------------------------

def verdicts(bare: dict[str, Any], board: dict[str, Any]) -> dict[str, Any]:
    allowed_ms = LATENCY_FACTOR * bare["latency"]["median_ms"]
    burst = board["burst"]
    return {
        "latency_allowed_ms": allowed_ms,
        "latency_met": (not board["sequential_failed"]
                        and board["latency"]["median_ms"] <= allowed_ms),
        "burst_met": burst["errors"] == 0 and burst["runs_per_s"] >= TARGET_RUNS_PER_S,
        "bare_runs_per_s": bare["burst"]["tasks_per_s"] / CHAIN_LENGTH,
    }


def print_table(args: argparse.Namespace, bare: dict[str, Any], board: dict[str, Any],
                verdict: dict[str, Any]) -> None:
    def row(label: str, left: str, right: str) -> None:
        print(f"| {label:<44} | {left:>22} | {right:>28} |")

    b, s = bare, board
    print()
    print(f"Dispatch, distributed mode: one worker each (--concurrency=2, prefork), Redis "
          f"{args.redis_url} (db {args.bare_db} / {args.switchboard_db}), PostgreSQL; "
          f"{args.warmup} warm-up each")
    row("", "bare Celery", "Switchboard")
    print(f"|{'-' * 46}|{'-' * 24}|{'-' * 30}|")
    row("what", f"chain of {CHAIN_LENGTH} no-ops", f"{PROCESS} ({CHAIN_LENGTH} tasks)")
    row("sequential samples", str(b["latency"]["n"]), str(s["latency"]["n"]))
    row("latency median, ms (first start/event to", f"{b['latency']['median_ms']:.1f}",
        f"{s['latency']['median_ms']:.1f}")
    row("latency p95, ms      last end/event)", f"{b['latency']['p95_ms']:.1f}",
        f"{s['latency']['p95_ms']:.1f}")
    row("end to end median, ms (send/create to end)", f"{b['end_to_end']['median_ms']:.1f}",
        f"{s['end_to_end']['median_ms']:.1f}")
    row("end to end p95, ms", f"{b['end_to_end']['p95_ms']:.1f}",
        f"{s['end_to_end']['p95_ms']:.1f}")
    row("burst", f"{b['burst']['tasks']} tasks", f"{s['burst']['runs']} runs")
    row("burst rate", f"{b['burst']['tasks_per_s']:.0f} tasks/s",
        f"{s['burst']['runs_per_s']:.2f} runs/s")
    row("  as 6-task runs/s", f"{verdict['bare_runs_per_s']:.1f}",
        f"{s['burst']['runs_per_s']:.2f}")
    row("burst wall time, s", f"{b['burst']['seconds']:.2f}", f"{s['burst']['seconds']:.2f}")
    row("send / create rate, per s", f"{b['burst']['send_per_s']:.0f}",
        f"{s['burst']['create_per_s']:.0f}")
    row("errors (not succeeded in time)", "0", str(s["burst"]["errors"]))
    if s["sequential_failed"]:
        print(f"sequential runs that did not succeed: {s['sequential_failed']}")
    for kind, what in (("create_errors", "burst creates that raised"),
                       ("not_succeeded", "burst runs not succeeded (status at the timeout)")):
        if s["burst"][kind]:
            counts = {e: s["burst"][kind].count(e) for e in sorted(set(s["burst"][kind]))}
            print(f"{what}: " + "; ".join(f"{n} x {e}" for e, n in counts.items()))
    print()
    print(f"target: {PROCESS} latency median <= {LATENCY_FACTOR:g} x bare chain median "
          f"({s['latency']['median_ms']:.1f} <= {verdict['latency_allowed_ms']:.1f} ms): "
          f"{'met' if verdict['latency_met'] else 'MISSED'}")
    print(f"target: burst of {s['burst']['runs']} runs >= {TARGET_RUNS_PER_S:g} runs/s with 0 "
          f"errors ({s['burst']['runs_per_s']:.2f} runs/s, {s['burst']['errors']} errors): "
          f"{'met' if verdict['burst_met'] else 'MISSED'}")
    print(f"reference: bare no-op rate / {CHAIN_LENGTH} = {verdict['bare_runs_per_s']:.1f} "
          f"runs/s, a third of that = {verdict['bare_runs_per_s'] / 3:.1f} runs/s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=50, help="sequential bare chains")
    parser.add_argument("--runs", type=int, default=30, help="sequential Switchboard runs")
    parser.add_argument("--burst", type=int, default=200, help="Switchboard runs in the burst")
    parser.add_argument("--tasks", type=int, default=1200, help="bare no-op tasks in the burst")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured chains / runs")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for one chain or run, or for a whole burst")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS, help="Redis server (no db)")
    parser.add_argument("--bare-db", type=int, default=9)
    parser.add_argument("--switchboard-db", type=int, default=10)
    parser.add_argument("--database-url", default=os.environ.get("BENCH_POSTGRES_URL",
                                                                 DEFAULT_PG),
                        help="PostgreSQL admin connection (creates and drops the database)")
    parser.add_argument("--json", type=Path, help="write the numbers to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    if min(args.chains, args.runs, args.burst, args.tasks) < 1 or args.warmup < 0:
        parser.error("--chains, --runs, --burst and --tasks must be at least 1, --warmup >= 0")
    if args.bare_db == args.switchboard_db:
        parser.error("--bare-db and --switchboard-db must differ")

    import psycopg

    signal.signal(signal.SIGTERM, _raise_interrupt)  # clean up workers and database on TERM
    server = args.redis_url.rstrip("/")
    if urlsplit(server).path not in ("", "/"):
        parser.error("--redis-url names the server only; choose dbs with --bare-db and "
                     "--switchboard-db")
    bare_broker = f"{server}/{args.bare_db}"
    board_redis = f"{server}/{args.switchboard_db}"
    name = f"switchboard_bench_dispatch_{os.getpid()}"
    load_start = os.getloadavg()[0]
    database_url = with_path(args.database_url, f"/{name}")
    with psycopg.connect(args.database_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        setup_django(database_url, board_redis)
        log(f"bare Celery on {bare_broker} ...")
        bare = bench_bare(args, bare_broker)
        log(f"Switchboard on {name}, {board_redis} ...")
        board = bench_switchboard(args, database_url, board_redis)
    finally:
        from django.db import connections

        connections.close_all()
        with psycopg.connect(args.database_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    verdict = verdicts(bare, board)
    load = {"start": load_start, "end": os.getloadavg()[0]}
    print_table(args, bare, board, verdict)
    print(f"load average (1 min) at start / end: {load['start']:.2f} / {load['end']:.2f} on "
          f"{os.cpu_count()} CPUs (anything else running skews both sides)")
    if args.json:
        args.json.write_text(json.dumps({"bare": bare, "switchboard": board,
                                         "verdict": verdict, "load_average": load,
                                         "args": {k: str(v) for k, v in vars(args).items()}},
                                        indent=2) + "\n")
    missed = not (verdict["latency_met"] and verdict["burst_met"])
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted: workers stopped, database dropped")
        sys.exit(130)
