"""Faults: kill -9 of workers and pool children, Redis killed (its queue lost), PostgreSQL
stopped, approvals decided while the broker is down, and (standalone) the server killed mid-run.

The module starts its own throwaway PostgreSQL cluster, Redis, Celery workers and daphne server
(tests/faults/infra.py); the workers and the server run through wrappers that register a
non-idempotent side-effect tool counting its calls in a file outside the ledger
(tests/faults/tools.py). After each fault: every run ends (terminal, or waiting on a person)
within 60 s, none is lost, the side effect never runs twice for one call, every idempotent
re-execution shows in the ledger, the ledger verifies, and the API answered 2xx or a JSON 5xx
that a retry with the same Idempotency-Key resolved without doubling anything.

Distributed: pytest tests/test_faults.py with DATABASE_URL/REDIS_URL set (the distributed pass);
standalone: without them. Logs of every service go to artifacts/faults/<pid>/.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DISTRIBUTED, REQUIRE_SERVICES
from tests.faults.infra import (
    LOGS,
    Api,
    Call,
    Db,
    Postgres,
    Redis,
    Server,
    Workers,
    audit_verify,
    base_env,
    missing_binaries,
    prepare_database,
    prune_logs,
    wait_until,
)
from tests.faults.report import RESULTS, ScenarioResult
from tests.faults.tools import PROCESS_SLUG, SIDE_EFFECT_TOOL, SIDE_EFFECTS, STEPS

pytestmark = pytest.mark.faults

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ENDED = TERMINAL | {"waiting"}
# Why a run of the fault-test process may legitimately end up waiting on a person.
PERSON_REASONS = frozenset({"unknown_outcome", "poison_task"})
RECOVERY_S = 60.0
SEED = int(os.environ.get("SWITCHBOARD_FAULT_SEED") or time.time())


def _require_binaries(*, redis: bool) -> None:
    missing = [m for m in missing_binaries() if redis or m != "redis-server"]
    if missing:
        message = "fault tests need " + ", ".join(missing)
        if REQUIRE_SERVICES:
            pytest.fail(f"SWITCHBOARD_REQUIRE_SERVICES is set but {message}")
        pytest.skip(message)


# ---- shared infrastructure --------------------------------------------------------------

@dataclass
class Cluster:
    workdir: Path
    counters: Path
    env: dict[str, str]
    db: Db
    server: Server
    operator: Api
    reviewer: Api
    pg: Postgres | None = None
    redis: Redis | None = None
    workers: Workers | None = None

    def heal(self) -> None:
        """Bring back whatever a scenario left down, so the next one starts healthy."""
        if self.pg is not None and not self.pg.running():
            self.pg.start()
        if self.redis is not None and not self.redis.running():
            self.redis.start()
        if self.workers is not None:
            self.workers.start_all()
        if self.server.proc is None or self.server.proc.poll() is not None:
            self.server.start()


def _counter_dir(workdir: Path) -> Path:
    counters = workdir / "counters"
    counters.mkdir()
    counters.chmod(0o777)
    return counters


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """PostgreSQL + Redis + 2 Celery workers (prefork, concurrency 2) + daphne, all throwaway."""
    if not DISTRIBUTED:
        pytest.skip("runs in the distributed pass")
    _require_binaries(redis=True)
    prune_logs()
    workdir = Path(tempfile.mkdtemp(prefix="switchboard-faults-"))
    workdir.chmod(0o755)
    pg, redis = Postgres(workdir), Redis()
    workers: Workers | None = None
    server: Server | None = None
    try:
        pg.init()
        redis.start()
        env = base_env(pg.url, redis.url, _counter_dir(workdir))
        tokens = prepare_database(env)
        workers = Workers(env, count=2)
        server = Server(env, "daphne-distributed")
        workers.start_all()
        server.start()
        base = server
        yield Cluster(workdir=workdir, counters=workdir / "counters", env=env, db=Db(pg.url),
                      server=server, operator=Api(lambda: base.base, tokens["operator"]),
                      reviewer=Api(lambda: base.base, tokens["reviewer"]), pg=pg, redis=redis,
                      workers=workers)
    finally:
        if server is not None:
            server.destroy()
        if workers is not None:
            workers.destroy()
        redis.destroy()
        pg.destroy()
        shutil.rmtree(workdir, ignore_errors=True)


# ---- watching runs ----------------------------------------------------------------------

class Watcher:
    """Polls every run's status and remembers when it entered its current status (polling
    keeps going through a database outage: those polls just fail)."""

    def __init__(self, db: Db) -> None:
        self.db = db
        self.status: dict[str, str] = {}
        self.since: dict[str, float] = {}
        self.first_seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                statuses = self.db.run_statuses()
            except Exception:  # the database is down: try again
                self._stop.wait(0.5)
                continue
            now = time.monotonic()
            with self._lock:
                for run_id, status in statuses.items():
                    self.first_seen.setdefault(run_id, now)
                    if self.status.get(run_id) != status:
                        self.status[run_id] = status
                        self.since[run_id] = now
            self._stop.wait(0.5)

    def snapshot(self) -> tuple[dict[str, str], dict[str, float]]:
        with self._lock:
            return dict(self.status), dict(self.since)


class Burst:
    """n creates through the API, one every ``interval`` seconds, each retried with its key."""

    def __init__(self, api: Api, n: int, interval: float, tag: str,
                 payload: Callable[[int, str], dict[str, Any]]) -> None:
        self.api, self.n, self.interval, self.tag, self.payload = api, n, interval, tag, payload
        self.pool = ThreadPoolExecutor(max_workers=8)
        self.futures: list[Future[Call]] = []
        self.thread = threading.Thread(target=self._feed, daemon=True)
        self.thread.start()

    def _feed(self) -> None:
        for i in range(self.n):
            key = f"{self.tag}-{i}-{uuid.uuid4().hex[:8]}".upper()
            self.futures.append(self.pool.submit(self.api.post, "/api/v1/runs",
                                                 self.payload(i, key), key=key))
            time.sleep(self.interval)

    def join(self) -> list[Call]:
        self.thread.join()
        calls = [f.result() for f in self.futures]
        self.pool.shutdown()
        return calls


def charge_payload(i: int, key: str) -> dict[str, Any]:
    return {"process": PROCESS_SLUG, "input": {"nonce": key, "order_id": f"ORD-{i:04d}"}}


def _counter_lines(counters: Path, name: str) -> list[dict[str, Any]]:
    path = counters / name
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- the checks -------------------------------------------------------------------------

@dataclass
class Verdict:
    result: ScenarioResult
    run_ids: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.result.failures.append(message)


def _check_answers(verdict: Verdict, calls: list[Call]) -> None:
    """Every answer 2xx, or a JSON 5xx (retried with the same key); every create accepted."""
    for call in calls:
        verdict.result.retried += len(call.answers) - 1
        for a in call.answers:
            if a.status is None:
                verdict.fail(f"{call.key}: no answer from the API ({a.body})")
            elif 500 <= a.status < 600 and not a.json_error:
                verdict.fail(f"{call.key}: {a.status} whose body is not JSON with an "
                             f"'error' key: {a.body[:120]!r}")
            elif not 200 <= a.status < 300 and a.status < 500:
                verdict.fail(f"{call.key}: refused with {a.status}: {a.body[:120]!r}")
        if not call.ok:
            verdict.fail(f"{call.key}: never accepted after {len(call.answers)} attempts")


def _runs_by_key(db: Db, field_name: str) -> dict[str, list[str]]:
    by_key: dict[str, list[str]] = {}
    for run_id, run in db.runs().items():
        value = (run["input"] or {}).get(field_name)
        if isinstance(value, str):
            by_key.setdefault(value.upper(), []).append(run_id)
    return by_key


def _check_one_run_per_key(verdict: Verdict, db: Db, calls: list[Call], field_name: str) -> None:
    by_key = _runs_by_key(db, field_name)
    for call in calls:
        runs = by_key.get(call.key.upper(), [])
        if call.ok and not runs:
            verdict.result.lost += 1
            verdict.fail(f"{call.key}: the API accepted the run but there is none (lost)")
        if len(runs) > 1:
            verdict.fail(f"{call.key}: {len(runs)} runs for one Idempotency-Key "
                         f"({len(call.answers)} attempts)")
        verdict.run_ids.extend(runs)


def _wait_for_end(verdict: Verdict, watcher: Watcher, fault_end: float,
                  done: Callable[[str, str], bool] | None = None) -> dict[str, str]:
    """Wait until every run has ended (or ``done`` says so) or 60 s after the fault ended;
    record recovery times (fault end -> run ended; 0 for a run that ended before)."""
    done = done or (lambda run_id, status: status in ENDED)
    deadline = fault_end + RECOVERY_S
    while True:
        statuses, since = watcher.snapshot()
        pending = [r for r in verdict.run_ids if not done(r, statuses.get(r, "?"))]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    verdict.result.runs = len(verdict.run_ids)
    verdict.result.statuses = dict(Counter(statuses.get(r, "?") for r in verdict.run_ids))
    for run_id in verdict.run_ids:
        if run_id in pending:
            verdict.result.stalled += 1
            continue
        ended = since.get(run_id, fault_end)
        verdict.result.recovery_s.append(max(0.0, ended - fault_end))
        if run_id in watcher.first_seen:
            verdict.result.duration_s.append(max(0.0, ended - watcher.first_seen[run_id]))
    if pending:
        verdict.fail(f"{len(pending)} of {len(verdict.run_ids)} runs had not ended "
                     f"{RECOVERY_S:g} s after the fault ended: "
                     + "; ".join(f"{r[:8]} {statuses.get(r, '?')}" for r in pending[:10]))
    return statuses


def _describe_tasks(db: Db, run_id: str) -> str:
    tasks = db.tasks()
    return ", ".join(f"{k}={t['status']}/{t['attempts']}"
                     for (r, k), t in sorted(tasks.items()) if r == run_id)


def _pending_requests(db: Db) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for request in db.requests():
        if request["status"] == "pending":
            out.setdefault(request["run"], []).append(request)
    return out


def _check_waiting_on_people(verdict: Verdict, db: Db, statuses: dict[str, str],
                             reasons: frozenset[str]) -> None:
    pending = _pending_requests(db)
    tasks = db.tasks()
    for run_id in verdict.run_ids:
        if statuses.get(run_id) != "waiting":
            continue
        on = [r["reason"] for r in pending.get(run_id, [])]
        on += [t["error"].split(":")[0] for (r, _), t in tasks.items()
               if r == run_id and t["status"] == "waiting" and t["error"]]
        if not set(on) & reasons:
            verdict.fail(f"run {run_id[:8]} is waiting, but not on a person for "
                         f"{sorted(reasons)}: {on or 'nothing'}")


def _started(events: list[tuple[int, str, dict[str, Any]]], task: str) -> int:
    return sum(1 for _, kind, data in events if kind == "task.started" and data.get("task") == task)


def _check_side_effects(verdict: Verdict, cluster_db: Db, counters: Path,
                        statuses: dict[str, str]) -> None:
    """The non-idempotent tool ran at most once per call; an unknown outcome is escalated;
    every execution of the idempotent step is matched by a task.started in the ledger."""
    events = cluster_db.events()
    runs = cluster_db.runs()
    nonce_run = {(run["input"] or {}).get("nonce"): run_id for run_id, run in runs.items()
                 if run_id in verdict.run_ids}
    pending = _pending_requests(cluster_db)

    def run_of(line: dict[str, Any]) -> str | None:
        return line["run"] if line.get("run") in verdict.run_ids else nonce_run.get(line["nonce"])

    effects = [line for line in _counter_lines(counters, SIDE_EFFECTS) if run_of(line)]
    per_key = Counter(line["key"] for line in effects)
    for key, n in per_key.items():
        if n > 1:
            verdict.result.duplicates += n - 1
            verdict.fail(f"the non-idempotent tool ran {n} times for call {key}")
    per_run = Counter(run_of(line) for line in effects)
    for run_id in verdict.run_ids:
        ledger = events.get(run_id, [])
        intent = any(k == "tool.intent" and d.get("tool") == SIDE_EFFECT_TOOL for _, k, d in ledger)
        called = any(k == "tool.called" and d.get("tool") == SIDE_EFFECT_TOOL for _, k, d in ledger)
        if per_run[run_id] and not intent:
            verdict.fail(f"run {run_id[:8]}: the side effect ran with no tool.intent in the "
                         "ledger before it")
        if called and not per_run[run_id]:
            verdict.fail(f"run {run_id[:8]}: the ledger has a result of the side effect, "
                         "the counter no call")
        if intent and not called:
            unknown = [r for r in pending.get(run_id, []) if r["reason"] == "unknown_outcome"]
            if statuses.get(run_id) != "waiting" or not unknown:
                verdict.fail(f"run {run_id[:8]}: the side effect's outcome is unknown (intent, "
                             f"no result) but the run is {statuses.get(run_id)} with "
                             f"{len(unknown)} unknown_outcome requests "
                             f"({_describe_tasks(cluster_db, run_id)})")
    for (run_id, task), row in cluster_db.tasks().items():
        seen = _started(events.get(run_id, []), task)
        if run_id in verdict.run_ids and row["attempts"] > seen:
            verdict.fail(f"run {run_id[:8]}: {task} has {row['attempts']} attempts, the ledger "
                         f"shows {seen} task.started (a re-execution is invisible)")
    steps = Counter((run_of(line), line["task"])
                    for line in _counter_lines(counters, STEPS) if run_of(line))
    for (run_id, task), n in steps.items():
        assert run_id is not None
        seen = _started(events.get(run_id, []), task)
        if n > seen:
            verdict.fail(f"run {run_id[:8]}: {task} executed {n} times, the ledger shows "
                         f"{seen} task.started (a re-execution is invisible)")


def _check_ledger(verdict: Verdict, env: dict[str, str]) -> None:
    done = audit_verify(env)
    if done.returncode != 0:
        verdict.fail(f"audit_verify exited {done.returncode}: "
                     f"{(done.stdout + done.stderr).strip()[-600:]}")


def _conclude(verdict: Verdict) -> None:
    failures = verdict.result.failures
    assert not failures, (f"{verdict.result.name}: {len(failures)} problems:\n  "
                          + "\n  ".join(failures[:25]))


def _check_workers_alive(verdict: Verdict, cluster: Cluster) -> None:
    """A worker the test did not kill must survive the fault (nothing here restarts it)."""
    if cluster.workers is None:
        return
    for w in cluster.workers.live.values():
        if w.proc.poll() is not None:
            verdict.fail(f"celery worker {w.index} (pid {w.proc.pid}) exited with "
                         f"{w.proc.returncode} during the fault; see {w.log}")


def _verify_charge_scenario(cluster: Cluster, verdict: Verdict, calls: list[Call],
                            watcher: Watcher, fault_end: float) -> None:
    _check_answers(verdict, calls)
    _check_one_run_per_key(verdict, cluster.db, calls, "nonce")
    statuses = _wait_for_end(verdict, watcher, fault_end)
    _check_workers_alive(verdict, cluster)
    _check_waiting_on_people(verdict, cluster.db, statuses, PERSON_REASONS)
    _check_side_effects(verdict, cluster.db, cluster.counters, statuses)
    _check_ledger(verdict, cluster.env)
    runs = _dump_runs(verdict, cluster.db)
    # Every step of this process succeeds on any retry: a run that failed took an
    # infrastructure fault for a business outcome.
    for run_id in verdict.run_ids:
        if statuses.get(run_id) == "failed":
            verdict.fail(f"run {run_id[:8]} failed: {runs[run_id]['error'][:200]}")


def _dump_runs(verdict: Verdict, db: Db) -> dict[str, dict[str, Any]]:
    """The scenario's runs and tasks, to artifacts/faults/<scenario>.json."""
    runs = db.runs()
    tasks = db.tasks()
    dump = {r: {**runs.get(r, {}), "tasks": {k: t for (rid, k), t in tasks.items() if rid == r}}
            for r in verdict.run_ids}
    name = "".join(c if c.isalnum() else "-" for c in verdict.result.name)
    (LOGS / f"{name}.json").write_text(json.dumps(dump, indent=1, default=str))
    return {r: runs.get(r, {"status": "?", "error": "", "input": {}}) for r in verdict.run_ids}


def _scenario(name: str) -> Verdict:
    result = ScenarioResult(name)
    RESULTS.append(result)
    return Verdict(result)


# ---- distributed scenarios --------------------------------------------------------------

@pytest.mark.distributed
def test_kill_9_of_workers_and_pool_children_loses_and_doubles_nothing(cluster: Cluster) -> None:
    verdict = _scenario("kill -9 workers")
    assert cluster.workers is not None
    rng = random.Random(SEED)
    kills: list[str] = []
    try:
        with Watcher(cluster.db) as watcher:
            burst = Burst(cluster.operator, 40, 0.75, "K", charge_payload)
            time.sleep(2)
            for _ in range(20):
                kills.append(cluster.workers.kill_random(rng))
                time.sleep(rng.uniform(1, 3))
            fault_end = time.monotonic()
            verdict.result.faults = len(kills)
            calls = burst.join()
            _verify_charge_scenario(cluster, verdict, calls, watcher, fault_end)
    finally:
        cluster.heal()
    (LOGS / "kills.txt").write_text(f"seed {SEED}\n" + "\n".join(kills) + "\n")
    _conclude(verdict)


def inquiry_payload(i: int, key: str) -> dict[str, Any]:
    return {"process": "customer-inquiry",
            "input": {"customer_email": "kim@example.com", "order_id": "ORD-1042",
                      "message": key}}


@pytest.mark.distributed
def test_kill_9_while_agents_delegate_hands_off_and_emails_once(cluster: Cluster) -> None:
    """The front desk hands the lookup to the order desk: workers killed around the handoff
    must leave one delegated task per run, its budget carved once, and one email."""
    verdict = _scenario("kill -9, delegating runs")
    assert cluster.workers is not None
    rng = random.Random(SEED + 1)
    kills: list[str] = []
    try:
        with Watcher(cluster.db) as watcher:
            burst = Burst(cluster.operator, 24, 0.3, "D", inquiry_payload)
            time.sleep(0.5)
            for _ in range(10):
                kills.append(cluster.workers.kill_random(rng))
                time.sleep(rng.uniform(0.3, 1.2))
            fault_end = time.monotonic()
            verdict.result.faults = len(kills)
            calls = burst.join()
            _check_answers(verdict, calls)
            _check_one_run_per_key(verdict, cluster.db, calls, "message")
            statuses = _wait_for_end(verdict, watcher, fault_end)
            _check_workers_alive(verdict, cluster)
            _check_waiting_on_people(verdict, cluster.db, statuses, PERSON_REASONS)
    finally:
        cluster.heal()
    events, tasks = cluster.db.events(), cluster.db.tasks()
    normal = {"classify": 1, "answer": 2, "answer_d1": 1}  # the caller runs again after
    hit = 0
    for run_id in verdict.run_ids:
        ledger = events.get(run_id, [])
        hit += any(_started(ledger, key) > n for key, n in normal.items())
        handoffs = [d for _, k, d in ledger if k == "task.delegated"]
        children = sorted(k for (r, k), _ in tasks.items() if r == run_id and "_d" in k)
        emails = sum(1 for _, k, d in ledger
                     if k == "tool.called" and d.get("tool") == "send_customer_email")
        if len(handoffs) > 1 or len(children) > 1:
            verdict.result.duplicates += max(len(handoffs), len(children)) - 1
            verdict.fail(f"run {run_id[:8]}: {len(handoffs)} task.delegated, delegated tasks "
                         f"{children} (one handoff, retried, must delegate once)")
        if emails > 1:
            verdict.result.duplicates += emails - 1
            verdict.fail(f"run {run_id[:8]}: send_customer_email called {emails} times")
        if statuses.get(run_id) == "succeeded" and (len(handoffs), children, emails) != (
                1, ["answer_d1"], 1):
            verdict.fail(f"run {run_id[:8]} succeeded with {len(handoffs)} handoffs, "
                         f"delegated tasks {children} and {emails} emails")
        for (r, key), row in tasks.items():
            if r == run_id and row["attempts"] > _started(ledger, key):
                verdict.fail(f"run {run_id[:8]}: {key} has {row['attempts']} attempts, the "
                             f"ledger shows {_started(ledger, key)} task.started")
        if statuses.get(run_id) == "failed":
            verdict.fail(f"run {run_id[:8]} failed ({_describe_tasks(cluster.db, run_id)})")
    _check_ledger(verdict, cluster.env)
    _dump_runs(verdict, cluster.db)
    (LOGS / "kills-delegating.txt").write_text(f"seed {SEED + 1}\n" + "\n".join(kills) + "\n")
    print(f"\nkill -9 while delegating: {hit} of {len(verdict.run_ids)} runs had a task "
          "started again after a kill")
    _conclude(verdict)


@pytest.mark.distributed
def test_redis_killed_and_restarted_mid_burst_loses_nothing(cluster: Cluster) -> None:
    verdict = _scenario("redis kill -9 + restart")
    assert cluster.redis is not None
    try:
        with Watcher(cluster.db) as watcher:
            burst = Burst(cluster.operator, 20, 0.4, "R", charge_payload)
            time.sleep(3)
            cluster.redis.kill()
            verdict.result.faults = 1
            time.sleep(5)
            cluster.redis.start()
            fault_end = time.monotonic()
            calls = burst.join()
            _verify_charge_scenario(cluster, verdict, calls, watcher, fault_end)
    finally:
        cluster.heal()
    _conclude(verdict)


@pytest.mark.distributed
def test_postgres_stopped_and_restarted_mid_burst_loses_nothing(cluster: Cluster) -> None:
    verdict = _scenario("postgres stop + start")
    assert cluster.pg is not None
    try:
        with Watcher(cluster.db) as watcher:
            burst = Burst(cluster.operator, 20, 0.4, "P", charge_payload)
            time.sleep(3)
            cluster.pg.stop()
            verdict.result.faults = 1
            time.sleep(5)
            cluster.pg.start()
            fault_end = time.monotonic()
            calls = burst.join()
            _verify_charge_scenario(cluster, verdict, calls, watcher, fault_end)
    finally:
        cluster.heal()
    _conclude(verdict)


def _readiness(cluster: Cluster) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(cluster.server.base + "/health/ready", timeout=15) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError as exc:  # the server itself is not answering
        return 0, {"failing": [f"server: {type(exc).__name__}"]}


@pytest.mark.distributed
def test_readiness_names_what_is_down_and_recovers(cluster: Cluster) -> None:
    """/health/ready against the real thing: Redis killed, PostgreSQL stopped."""
    assert cluster.redis is not None and cluster.pg is not None
    try:
        wait_until(lambda: _readiness(cluster)[0] == 200, timeout=90,
                   what="the cluster to be ready")
        for name, down, up in (("redis", cluster.redis.kill, cluster.redis.start),
                               ("database", cluster.pg.stop, cluster.pg.start)):
            down()
            status, body = _readiness(cluster)
            assert status == 503 and name in body["failing"], (name, status, body)
            up()
            started = time.monotonic()
            wait_until(lambda: _readiness(cluster)[0] == 200, timeout=120,
                       what=f"readiness after {name} came back")
            print(f"\nreadiness: {name} down -> 503 naming {body['failing']}; ready again "
                  f"{time.monotonic() - started:.1f} s after it came back")
    finally:
        cluster.heal()


REFUND_RUNS = 3


def refund_payload(i: int, key: str) -> dict[str, Any]:
    return {"process": "refund-exception",
            "input": {"order_id": key, "amount": 500, "reason": "damaged",
                      "customer_email": "kim@example.com"}}


@pytest.mark.distributed
def test_approvals_decided_while_redis_is_down_resume_once(cluster: Cluster) -> None:
    verdict = _scenario("approvals, redis down")
    assert cluster.redis is not None
    db = cluster.db
    try:
        with Watcher(db) as watcher:
            calls = Burst(cluster.operator, REFUND_RUNS, 0.2, "ORD-A", refund_payload).join()
            _check_answers(verdict, calls)
            _check_one_run_per_key(verdict, db, calls, "order_id")
            run_ids = list(verdict.run_ids)

            def all_waiting() -> dict[str, dict[str, Any]] | None:
                pending = _pending_requests(db)
                found = {r: pending[r][0] for r in run_ids if pending.get(r)}
                return found if len(found) == len(run_ids) and run_ids else None

            requests = wait_until(all_waiting, timeout=90,
                                  what=f"{len(run_ids)} refund runs to wait for a reviewer")
            cluster.redis.kill()
            verdict.result.faults = 1
            decisions: list[Call] = []
            deciding = ThreadPoolExecutor(max_workers=REFUND_RUNS)
            futures = [deciding.submit(cluster.reviewer.post,
                                       f"/api/v1/approvals/{request['id']}/decision",
                                       {"decision": "approve"}, key=f"decide-{request['id']}")
                       for request in requests.values()]
            time.sleep(5)  # decisions land (or are retried) while the broker is gone
            cluster.redis.start()
            fault_end = time.monotonic()
            decisions = [f.result() for f in futures]
            deciding.shutdown()
            _check_answers(verdict, decisions)
            decided = {r["id"] for r in requests.values()}

            def resumed(run_id: str, status: str) -> bool:
                if status in TERMINAL:
                    return True
                still = {r["id"] for r in _pending_requests(db).get(run_id, [])}
                return status == "waiting" and bool(still - decided)  # waits on a new one

            statuses = _wait_for_end(verdict, watcher, fault_end, done=resumed)
            _check_workers_alive(verdict, cluster)
    finally:
        cluster.heal()
    per_decider = Counter((d["request"], d["decider"]) for d in db.decisions()
                          if d["request"] in decided)
    for (request_id, decider), n in per_decider.items():
        if n != 1:
            verdict.fail(f"request {request_id[:8]}: {n} decisions by user {decider} "
                         "(one approve, retried with one Idempotency-Key)")
    if len(per_decider) != len(decided):
        verdict.fail(f"{len(decided) - len(per_decider)} of {len(decided)} decisions were not "
                     "recorded")
    events = db.events()
    for run_id in run_ids:
        refunds = sum(1 for _, k, d in events.get(run_id, [])
                      if k == "tool.called" and d.get("tool") == "issue_refund")
        if refunds > 1:
            verdict.result.duplicates += refunds - 1
            verdict.fail(f"run {run_id[:8]}: issue_refund called {refunds} times")
        if statuses.get(run_id) != "succeeded":
            verdict.fail(f"run {run_id[:8]} is {statuses.get(run_id)} after its approval "
                         f"({_describe_tasks(db, run_id)})")
    _check_ledger(verdict, cluster.env)
    _conclude(verdict)


# ---- standalone -------------------------------------------------------------------------

@pytest.mark.skipif(DISTRIBUTED, reason="runs in the standalone pass")
def test_standalone_server_killed_mid_run_resumes_every_run_once() -> None:
    _require_binaries(redis=False)
    verdict = _scenario("standalone server kill -9")
    workdir = Path(tempfile.mkdtemp(prefix="switchboard-faults-"))
    prune_logs()
    LOGS.mkdir(parents=True, exist_ok=True)
    env = base_env(f"sqlite:///{workdir / 'switchboard.sqlite3'}", None, _counter_dir(workdir))
    server = Server(env, "daphne-standalone")
    cluster: Cluster | None = None
    try:
        tokens = prepare_database(env)
        server.start()
        cluster = Cluster(workdir=workdir, counters=workdir / "counters", env=env,
                          db=Db(env["DATABASE_URL"]), server=server,
                          operator=Api(lambda: server.base, tokens["operator"]),
                          reviewer=Api(lambda: server.base, tokens["reviewer"]))
        with Watcher(cluster.db) as watcher:
            calls = Burst(cluster.operator, 8, 0.15, "S", charge_payload).join()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not _counter_lines(workdir / "counters",
                                                                     SIDE_EFFECTS):
                time.sleep(0.1)  # kill once the first run reached its side effect
            server.kill()
            verdict.result.faults = 1
            time.sleep(1)
            server.start()
            fault_end = time.monotonic()
            _verify_charge_scenario(cluster, verdict, calls, watcher, fault_end)
    finally:
        server.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
    _conclude(verdict)
