"""Server-side render time of the dashboard and the run page on a large PostgreSQL database.

    .venv/bin/python benchmarks/console_render.py            # 10,000 runs, 500,000 events

Seeds a throwaway PostgreSQL database (created and dropped here) with the demo data plus
``--runs`` runs of the demo processes, five tasks each, spread over the last 14 days in every
status, and ``--events`` ledger events with both hash chains computed as
``audit.ledger.append`` and ``seal`` do (``--verify`` runs ``audit_verify`` over the result).
Events are written with COPY, so seeding takes minutes even at ``--runs 100000 --events
5000000``. Then it renders, in process through Django's full middleware stack, ``--samples``
times each: the dashboard, the runs list with a filter, the run page of random runs (as an
operator who may see every run), the review queue with 500 pending requests (as a reviewer), the
ledger page (as an admin), and the API's runs list and a run's events after a seq (with an
operator's token). It prints milliseconds per request (p50, p95, max) and the queries each made.
The targets: p95 at most 150 ms a page and 50 ms an API call.

Options: ``--runs N``, ``--events N``, ``--samples N``, ``--verify``, ``--postgres-url`` (server
to create the throwaway database on; default ``$BENCH_POSTGRES_URL`` or postgresql://postgres@127.0.0.1:5432/postgres),
``--database NAME`` (the throwaway database's name; default switchboard_bench_render_ and this
process's id), ``--keep`` (leave the database for inspection), ``--reuse`` (measure again on the
database an earlier ``--keep`` run left under ``--database``, without seeding; it is kept again),
``--check`` (exit 1 if a target is missed). Seed once, then iterate on queries and indexes:

    .venv/bin/python benchmarks/console_render.py --runs 100000 --events 5000000 \\
        --database bench_render --keep
    .venv/bin/python benchmarks/console_render.py --database bench_render --reuse

A reused database is migrated first, so new indexes are built on the seeded data.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
TARGET_MS = 150.0
API_TARGET_MS = 50.0
STATUSES = ["succeeded"] * 16 + ["failed", "running", "running", "waiting"]
TASKS = ["validate", "check_sanctions", "check_bank", "score", "approve"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def seed(runs: int, events: int) -> list[str]:
    """Runs and tasks by bulk insert; events with both hash chains computed here exactly as
    ``audit.ledger.append`` and ``audit.ledger.seal`` compute them (``audit_verify`` passes on
    the result), already sealed and written in bulk because half a million one-by-one appends
    would take many minutes."""
    from datetime import timedelta

    from django.contrib.auth.models import User
    from django.db import connection, transaction
    from django.utils import timezone

    from audit.ledger import GLOBAL_CHAIN
    from audit.models import ChainHead, Event
    from hashchain import GENESIS, canonical_json, chain_hash, global_hash
    from orchestration.models import Process, Run, Task

    operator = User.objects.get(username="operator")
    versions = [p.current_version for p in Process.objects.select_related("current_version")]
    rng = random.Random(7)
    per_run = max(events // runs, 1)
    extra = events - per_run * runs
    ids: list[str] = []
    started = time.perf_counter()
    now = timezone.now()
    batch = 200
    for first in range(0, runs, batch):
        with transaction.atomic():
            made = Run.objects.bulk_create([
                Run(process_version=rng.choice(versions), created_by=operator,
                    status=rng.choice(STATUSES), input={"order_id": f"ORD-{n}"},
                    tokens_in=rng.randint(0, 5000), tokens_out=rng.randint(0, 900),
                    cost=rng.randint(0, 90000) / 1_000_000, steps=rng.randint(0, 12),
                    tool_calls=rng.randint(0, 8), budget_cost=1)
                for n in range(first, min(first + batch, runs))
            ])
            Task.objects.bulk_create([
                Task(run=run, key=key, position=i, title=key.replace("_", " "),
                     executor_type="tool", executor_ref=key, status="succeeded",
                     output={"ok": True})
                for run in made for i, key in enumerate(TASKS)
            ])
            head = ChainHead.objects.select_for_update().get(chain=GLOBAL_CHAIN)
            gseq, ghash = head.seq, head.head_hash
            rows: list[Event] = []
            heads: list[ChainHead] = []
            for index, run in enumerate(made):
                prev = GENESIS
                at = now - timedelta(seconds=rng.randint(0, 14 * 86400))
                count = per_run + (1 if first + index < extra else 0)
                for seq in range(1, count + 1):
                    data = {"task": TASKS[seq % len(TASKS)], "step": seq, "tokens_in": 320,
                            "tokens_out": 70, "cost": "0.002010",
                            "response": {"text": "Checked the order; it was delivered. " * 6}}
                    kind = "model.called" if seq % 2 else "tool.called"
                    actor = "agent:refund-executor"
                    body = canonical_json({"chain": str(run.pk), "seq": seq, "kind": kind,
                                           "at": at.isoformat(), "actor": actor, "data": data})
                    digest = chain_hash(prev, body)
                    gseq += 1
                    gnext = global_hash(ghash, digest)
                    rows.append(Event(chain=run.pk, seq=seq, kind=kind, at=at, actor=actor,
                                      data=data, body=body, prev_hash=prev, hash=digest,
                                      gseq=gseq, gprev_hash=ghash, ghash=gnext))
                    prev, ghash = digest, gnext
                heads.append(ChainHead(chain=run.pk, seq=count, head_hash=prev))
            _copy_events(rows)
            ChainHead.objects.bulk_create(heads)
            ChainHead.objects.filter(chain=GLOBAL_CHAIN).update(seq=gseq, head_hash=ghash)
        ids.extend(str(r.pk) for r in made)
        done = min(first + batch, runs)
        if done % 2000 == 0 or done == runs:
            print(f"  seeded {done} runs ({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr, flush=True)
    with connection.cursor() as cursor:
        cursor.execute("UPDATE orchestration_run SET created_at = now() - random() * "
                       "interval '14 days', finished_at = now()")
        # What autovacuum does to a live database: statistics, and a visibility map that lets
        # the index-only scans (the runs list's counts) skip the heap after the bulk writes.
        cursor.execute("VACUUM ANALYZE")
    return ids


EVENT_COLUMNS = ("chain", "seq", "kind", "at", "actor", "data", "body", "prev_hash", "hash",
                 "gseq", "gprev_hash", "ghash")


def _copy_events(rows: list[Any]) -> None:
    """Write events with COPY (PostgreSQL's bulk load): minutes for millions, not hours."""
    from django.db import connection

    sql = f"COPY audit_event ({', '.join(EVENT_COLUMNS)}) FROM STDIN"
    with connection.cursor() as cursor, cursor.cursor.copy(sql) as copy:
        for e in rows:
            copy.write_row([e.chain, e.seq, e.kind, e.at, e.actor, json.dumps(e.data), e.body,
                            e.prev_hash, e.hash, e.gseq, e.gprev_hash, e.ghash])


def seed_requests(ids: list[str], count: int) -> None:
    """Pending approval requests on ``count`` of the runs, for the review queue."""
    from datetime import timedelta

    from django.contrib.auth.models import Group, User
    from django.utils import timezone

    from approvals.models import ApprovalRequest

    reviewers = Group.objects.get(name="reviewer")
    operator = User.objects.get(username="operator")
    now = timezone.now()
    ApprovalRequest.objects.bulk_create([
        ApprovalRequest(run_id=run, task_key="refund", call_key=f"{run}:refund:1:0",
                        tool="issue_refund", arguments={"order_id": f"ORD-{n}", "amount": 250},
                        reason="sensitive_action", detail="policy refund-over-100 v1 matched",
                        decider_group=reviewers, requested_by="agent:refund-executor",
                        run_started_by=operator, deadline=now + timedelta(hours=4),
                        context={"run_input": {"order_id": f"ORD-{n}"}})
        for n, run in enumerate(ids[:count])], batch_size=1000)


def measure(ids: list[str], samples: int) -> dict[str, Any]:
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from console.models import ApiToken

    clients = {}
    for who in ("operator", "reviewer", "admin"):
        clients[who] = Client()
        clients[who].force_login(User.objects.get(username=who))
    token = ApiToken.issue(User.objects.get(username="operator"))[1]
    api = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    rng = random.Random(11)
    # (client, path, target p95 in ms)
    paths = {
        "dashboard": (clients["operator"], lambda: "/", TARGET_MS),
        "runs list": (clients["operator"], lambda: "/runs/?status=failed&q=ORD-12", TARGET_MS),
        "run page": (clients["operator"], lambda: f"/runs/{rng.choice(ids)}/", TARGET_MS),
        "review queue": (clients["reviewer"], lambda: "/review/", TARGET_MS),
        "ledger page": (clients["admin"], lambda: "/ledger/", TARGET_MS),
        "api runs": (api, lambda: "/api/v1/runs?status=failed&limit=50", API_TARGET_MS),
        "api events": (api, lambda: f"/api/v1/runs/{rng.choice(ids)}/events?after=10",
                       API_TARGET_MS),
    }
    out: dict[str, Any] = {}
    for name, (client, path, target_ms) in paths.items():
        client.get(path())  # warm caches and connections
        times: list[float] = []
        queries: list[int] = []
        for _ in range(samples):
            target = path()
            with CaptureQueriesContext(connection) as captured:
                started = time.perf_counter()
                response = client.get(target)
                times.append((time.perf_counter() - started) * 1000)
            if response.status_code != 200:
                raise RuntimeError(f"{target} answered {response.status_code}: "
                                   f"{response.content[:300]!r}")
            queries.append(len(captured.captured_queries))
        out[name] = {"p50_ms": statistics.median(times), "p95_ms": percentile(times, 0.95),
                     "max_ms": max(times), "queries": max(queries), "samples": samples,
                     "target_ms": target_ms}
    return out


def worker(args: argparse.Namespace) -> None:
    from throwaway import setup_django

    setup_django()
    from django.core.management import call_command

    from audit.models import Event
    from orchestration.models import Run

    started = time.perf_counter()
    if args.reuse:
        # Seeded by an earlier run (--keep); the run pages pick among all of its runs.
        ids = [str(pk) for pk in Run.objects.values_list("pk", flat=True)]
    else:
        call_command("seed_demo", stdout=open(os.devnull, "w"))
        ids = seed(args.runs, args.events)
        seed_requests(ids, min(args.runs, 500))
    seeded_s = time.perf_counter() - started
    if args.verify:
        call_command("audit_verify")
    result = measure(ids, args.samples)
    result["seed"] = {"runs": Run.objects.count(), "events": Event.objects.count(),
                      "seconds": round(seeded_s, 1)}
    Path(args.out).write_text(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--postgres-url", default=os.environ.get("BENCH_POSTGRES_URL",
                                                                 DEFAULT_PG))
    parser.add_argument("--database", help="the throwaway database's name")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--reuse", action="store_true",
                        help="measure on the kept --database again, without seeding")
    parser.add_argument("--verify", action="store_true", help="run audit_verify after seeding")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runs < 1 or args.events < 0 or args.samples < 1:
        parser.error("--runs and --samples must be at least 1, --events at least 0")
    if args.reuse and not args.database and not args.worker:
        parser.error("--reuse needs --database (the database a --keep run left)")
    if args.worker:
        worker(args)
        return 0

    from throwaway import run_worker

    result = run_worker(
        __file__, ["--runs", str(args.runs), "--events", str(args.events), "--samples",
                   str(args.samples), *(["--verify"] if args.verify else []),
                   *(["--reuse"] if args.reuse else [])],
        postgres_url=args.postgres_url, prefix="switchboard_bench_render", keep=args.keep,
        name=args.database, reuse=args.reuse,
        # Django's test client calls itself "testserver".
        env={"ALLOWED_HOSTS": "testserver"},
        announce="measuring again on {name} ..." if args.reuse else
        f"seeding {args.runs} runs and {args.events} events into {{name}} ...")
    seeded = result.pop("seed")
    how = "reused" if args.reuse else f"seeded in {seeded['seconds']} s"
    print(f"\nPostgreSQL with {seeded['runs']} runs and {seeded['events']} events "
          f"({how}); server-side render, ms:")
    print(f"{'page':<13} {'p50':>7} {'p95':>7} {'max':>7} {'queries':>8} {'target':>7}")
    missed = False
    for page, row in result.items():
        late = row["p95_ms"] > row["target_ms"]
        print(f"{page:<13} {row['p50_ms']:>7.1f} {row['p95_ms']:>7.1f} {row['max_ms']:>7.1f} "
              f"{row['queries']:>8} {row['target_ms']:>7.0f}{'  MISSED' if late else ''}")
        missed |= late
    print(f"targets (p95 <= {TARGET_MS:.0f} ms a page, {API_TARGET_MS:.0f} ms an API call): "
          f"{'MISSED' if missed else 'met'}")
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
