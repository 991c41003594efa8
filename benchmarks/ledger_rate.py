"""Ledger write rate: hash-chained appends from concurrent runs against a plain batched insert.

    .venv/bin/python benchmarks/ledger_rate.py              # 8 runs, 10 s, 5 events a step

On a throwaway PostgreSQL database (created and dropped here), ``--runs`` worker processes (as
distributed mode's prefork workers run runs; ``--threads``: threads of one process, as
standalone mode's pool), each with its own connection and its own run chain, append events for
``--seconds`` as a worker's steps do: each step is one transaction that appends ``--per-step``
events through ``audit.ledger.append`` inside ``ledger.batched()`` (the chain head locked, every
event canonicalised and hashed onto its chain, one multi-row INSERT, the head moved) and commits
with ``synchronous_commit`` on. Then, in the same process and on the same table, the same number
of rows (the same shape, hashed the same way, new chain ids) is written by ``executemany`` on a
plain psycopg connection (statements pipelined) in one transaction per 1,000 rows, the batched
insert a user would reach for. A third row is the floor under any writer that commits each
step: the same processes insert rows of the same shape, made beforehand (no hashing, no chain
head), ``--per-step`` at a time with ``executemany`` in a transaction each. It prints events
per second for all three and the ratios; the target is the ledger at least 0.5 of the batched
insert (``--check`` exits 1 when it is missed).
``--per-step 1`` measures one event per commit.

Options: ``--runs N``, ``--seconds S``, ``--per-step N``, ``--threads``, ``--postgres-url`` (default
``$BENCH_POSTGRES_URL`` or postgresql://postgres@127.0.0.1:5432/postgres), ``--check``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
TARGET = 0.5
DATA = {"task": "refund", "step": 0, "tokens_in": 320, "tokens_out": 70, "cost": "0.002010",
        "response": {"text": "Checked the order; it was delivered. " * 4}}


def _run_steps(index: int, per_step: int, start: Any, stop_at: Any, counts: Any,
               errors: Any) -> None:
    """One run: its own chain and connection, a committed step of ``per_step`` appends at a
    time until ``stop_at``."""
    from django.db import connection, transaction

    from audit import ledger
    from orchestration.sql import deferred_writes

    chain = uuid.uuid4()
    try:
        with transaction.atomic():
            ledger.start_chain(chain)
        start.wait()
        step = 0
        while time.time() < stop_at.value:
            step += 1
            with transaction.atomic(), deferred_writes(commit=True) as write, \
                    ledger.batched(write):
                for n in range(per_step):
                    ledger.append(chain, "model.called", {**DATA, "step": step * 10 + n},
                                  actor="agent:bench")
            counts[index] += per_step
    except Exception as exc:  # noqa: BLE001 - reported with the figures
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        connection.close()


def _race(workers: list[Any], start: Any, stop_at: Any, counts: Any, errors: Any,
          seconds: float) -> dict[str, Any]:
    """Start ``workers``, let them go together once all are ready, stop them ``seconds``
    later, and count what they wrote."""
    for w in workers:
        w.start()
    start.wait()  # every writer has its rows, chain and connection: go
    began = time.time()
    stop_at.value = began + seconds
    for w in workers:
        w.join()
    elapsed = time.time() - began
    total = sum(counts)
    return {"events": total, "seconds": elapsed, "rate": total / elapsed,
            "errors": list(errors)}


def _shared(runs: int) -> tuple[Any, Any, Any, Any, Any]:
    """A fork context and what its processes share: the start barrier, the stop time, a
    count per run and the errors."""
    context = multiprocessing.get_context("fork")
    return (context, context.Barrier(runs + 1), context.Value("d", time.time() + 3600),
            context.Array("q", runs), context.Manager().list())


def appends(runs: int, seconds: float, per_step: int, *, threads: bool) -> dict[str, Any]:
    """``runs`` runs appending at once: worker processes, as distributed mode's prefork
    workers run them, or (``threads``) threads of one process, as standalone mode's pool."""
    from django.db import connection

    if threads:
        start: Any = threading.Barrier(runs + 1)
        stop_at: Any = SimpleNamespace(value=time.time() + 3600)
        counts: Any = [0] * runs
        errors: Any = []
        workers: list[Any] = [threading.Thread(target=_run_steps, args=(
            i, per_step, start, stop_at, counts, errors)) for i in range(runs)]
    else:
        connection.close()  # each process opens its own
        context, start, stop_at, counts, errors = _shared(runs)
        workers = [context.Process(target=_run_steps, args=(
            i, per_step, start, stop_at, counts, errors)) for i in range(runs)]
    return _race(workers, start, stop_at, counts, errors, seconds)


INSERT = ("INSERT INTO audit_event (chain, seq, kind, at, actor, data, body, prev_hash, hash)"
          " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)")


def _rows(count: int, per_chain: int) -> list[list[Any]]:
    """``count`` rows shaped like the appended ones and hashed the same way, on new chains of
    ``per_chain`` events."""
    from django.utils import timezone

    from hashchain import GENESIS, canonical_json, chain_hash

    rows: list[list[Any]] = []
    chain, seq, prev = uuid.uuid4(), 0, GENESIS
    for n in range(count):
        if seq == per_chain:
            chain, seq, prev = uuid.uuid4(), 0, GENESIS
        seq += 1
        at = timezone.now()
        data = {**DATA, "step": n}
        body = canonical_json({"chain": str(chain), "seq": seq, "kind": "model.called",
                               "at": at.isoformat(), "actor": "agent:bench", "data": data})
        digest = chain_hash(prev, body)
        rows.append([chain, seq, "model.called", at, "agent:bench", json.dumps(data), body,
                     prev, digest])
        prev = digest
    return rows


def _psycopg() -> Any:
    """psycopg's own connection to the benchmark's database (server-side binding; executemany
    pipelines the statements), not Django's cursor: the strongest plain baseline."""
    import psycopg
    from django.db import connection

    settings = connection.settings_dict
    return psycopg.connect(dbname=settings["NAME"], user=settings["USER"] or None,
                           host=settings["HOST"] or None, port=settings["PORT"] or None,
                           password=settings["PASSWORD"] or None)


def executemany(count: int, per_chain: int) -> dict[str, Any]:
    """``count`` rows shaped like the appended ones, hashed the same way, loaded in
    1,000-row transactions by ``executemany``."""
    rows = _rows(count, per_chain)
    with _psycopg() as conn:
        began = time.perf_counter()
        for first in range(0, len(rows), 1000):
            with conn.transaction(), conn.cursor() as cursor:
                cursor.executemany(INSERT, rows[first:first + 1000])
        elapsed = time.perf_counter() - began
    return {"events": count, "seconds": elapsed, "rate": count / elapsed}


def _plain_steps(index: int, per_step: int, rows: list[list[Any]], start: Any, stop_at: Any,
                 counts: Any, errors: Any) -> None:
    """One run's rows, made beforehand, inserted ``per_step`` at a time, a transaction each."""
    try:
        with _psycopg() as conn:
            start.wait()
            done = 0
            while time.time() < stop_at.value and done + per_step <= len(rows):
                with conn.transaction(), conn.cursor() as cursor:
                    cursor.executemany(INSERT, rows[done:done + per_step])
                done += per_step
                counts[index] += per_step
            if done + per_step > len(rows):
                errors.append(f"run {index} ran out of rows made beforehand")
    except Exception as exc:  # noqa: BLE001 - reported with the figures
        errors.append(f"{type(exc).__name__}: {exc}")


def plain_steps(runs: int, seconds: float, per_step: int, expected: int) -> dict[str, Any]:
    """The floor under any per-step durable writer: ``runs`` processes insert the same shape
    of rows (hashed beforehand, no chain head) with a commit every ``per_step`` rows."""
    from django.db import connection

    connection.close()  # each process opens its own
    context, start, stop_at, counts, errors = _shared(runs)
    # Four times what the ledger managed per run, so the plain writers do not run out.
    per_run = max(4 * expected // max(runs, 1), 1000)
    workers = [context.Process(target=_plain_steps, args=(
        i, per_step, _rows(per_run, per_run), start, stop_at, counts, errors))
        for i in range(runs)]
    return _race(workers, start, stop_at, counts, errors, seconds)


def worker(args: argparse.Namespace) -> None:
    from throwaway import setup_django

    setup_django()
    appended = appends(args.runs, args.seconds, args.per_step, threads=args.threads)
    per_chain = max(appended["events"] // max(args.runs, 1), 1)
    loaded = executemany(max(appended["events"], 1), per_chain)
    plain = plain_steps(args.runs, args.seconds, args.per_step, appended["events"])
    Path(args.out).write_text(json.dumps({"append": appended, "executemany": loaded,
                                          "plain": plain}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--per-step", type=int, default=5)
    parser.add_argument("--postgres-url", default=os.environ.get("BENCH_POSTGRES_URL",
                                                                 DEFAULT_PG))
    parser.add_argument("--threads", action="store_true",
                        help="the runs as threads of one process (standalone mode's pool)")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runs < 1 or args.seconds <= 0 or args.per_step < 1:
        parser.error("--runs and --per-step must be at least 1 and --seconds above 0")
    if args.worker:
        worker(args)
        return 0

    from throwaway import run_worker

    result = run_worker(__file__, ["--runs", str(args.runs), "--seconds", str(args.seconds),
                                   "--per-step", str(args.per_step),
                                   *(["--threads"] if args.threads else [])],
                        postgres_url=args.postgres_url, prefix="switchboard_bench_ledger")
    app, bulk = result["append"], result["executemany"]
    ratio = app["rate"] / bulk["rate"]
    shape = "threads of one process" if args.threads else "worker processes"
    print(f"\nLedger write rate on PostgreSQL, {args.runs} concurrent runs ({shape}), "
          f"{args.per_step} events per committed step, {args.seconds:g} s:")
    print(f"{'writer':<44} {'events':>8} {'seconds':>8} {'events/s':>9}")
    print(f"{'ledger.append (hash-chained, per step)':<44} {app['events']:>8} "
          f"{app['seconds']:>8.2f} {app['rate']:>9.0f}")
    print(f"{'executemany, 1,000-row transactions':<44} {bulk['events']:>8} "
          f"{bulk['seconds']:>8.2f} {bulk['rate']:>9.0f}")
    plain = result["plain"]
    print(f"{'plain INSERTs, a transaction per step':<44} {plain['events']:>8} "
          f"{plain['seconds']:>8.2f} {plain['rate']:>9.0f}")
    if app["errors"]:
        print(f"errors in the appending runs: {app['errors'][:3]}")
    missed = ratio < TARGET or bool(app["errors"])
    if plain["errors"]:
        print(f"errors in the plain writers: {plain['errors'][:3]}")
    print(f"ratio {ratio:.2f}; target >= {TARGET}: {'MISSED' if missed else 'met'} "
          f"(the plain per-step writers: {plain['rate'] / bulk['rate']:.2f}; the ledger against "
          f"them: {app['rate'] / plain['rate']:.2f})")
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
