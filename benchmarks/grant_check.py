"""The per-call grant check: the one-query check the gate runs before every tool call
(``orchestration.precheck.grant_checker``: raw SQL built from the models' ``_meta`` table names)
against django-guardian's public API doing the same job (re-read the user, so a deactivated
identity is refused at once, then ``ObjectPermissionChecker(user).has_perm``).

    .venv/bin/python benchmarks/grant_check.py [--checks N] [--only sqlite|postgres]

Both are asked the same questions on the same throwaway database (a temp SQLite file; a fresh
PostgreSQL database created and dropped here): an identity granted directly, one granted through
a group, one not granted, and a deactivated one; first the answers are compared (they must
agree), then each is timed over ``--checks`` calls. Each backend runs in its own subprocess,
since Django reads its settings once per process.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _measure(checks: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.contrib.auth.models import Group, User
    from django.core.management import call_command
    from guardian.core import ObjectPermissionChecker
    from guardian.shortcuts import assign_perm

    from orchestration.models import Tool
    from orchestration.precheck import grant_checker

    call_command("migrate", verbosity=0)
    tool = Tool.objects.create(slug="bench_tool", name="bench", description="")
    direct = User.objects.create(username="bench-direct")
    via_group = User.objects.create(username="bench-group")
    nobody = User.objects.create(username="bench-nobody")
    retired = User.objects.create(username="bench-retired")
    group = Group.objects.create(name="bench-group")
    via_group.groups.add(group)
    assign_perm("orchestration.invoke_tool", direct, tool)
    assign_perm("orchestration.invoke_tool", group, tool)
    assign_perm("orchestration.invoke_tool", retired, tool)
    User.objects.filter(pk=retired.pk).update(is_active=False)

    # The gate builds a task's checker once and asks it before every call.
    checkers = {pk: grant_checker(pk) for pk in (direct.pk, via_group.pk, nobody.pk, retired.pk)}

    def by_sql(user_id: int) -> bool:
        return checkers[user_id](tool)

    def by_guardian(user_id: int) -> bool:
        user = User.objects.filter(pk=user_id).first()
        return (user is not None and user.is_active
                and ObjectPermissionChecker(user).has_perm("invoke_tool", tool))

    people = {"direct": direct.pk, "group": via_group.pk, "none": nobody.pk,
              "inactive": retired.pk}
    answers = {name: {who: fn(pk) for who, pk in people.items()}
               for name, fn in (("sql", by_sql), ("guardian", by_guardian))}
    if answers["sql"] != answers["guardian"]:
        raise SystemExit(f"the two checks disagree: {answers}")
    expected = {"direct": True, "group": True, "none": False, "inactive": False}
    if answers["sql"] != expected:
        raise SystemExit(f"unexpected answers: {answers['sql']}")

    def timed(fn: Callable[[int], bool]) -> list[float]:
        ids = list(people.values())
        samples = []
        for i in range(checks):
            started = time.perf_counter()
            fn(ids[i % len(ids)])
            samples.append((time.perf_counter() - started) * 1e6)
        return samples

    timed(by_sql)  # warm both paths: caches of content types and permissions
    timed(by_guardian)
    sql, guardian = timed(by_sql), timed(by_guardian)
    return {"sql_median_us": statistics.median(sql), "guardian_median_us":
            statistics.median(guardian), "answers": answers["sql"]}


def _pg_admin(url: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql)


def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="console.settings",
               SECRET_KEY=secrets.token_urlsafe(50))
    env.pop("REDIS_URL", None)
    dbname = f"bench_grants_{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as tmp:
        if backend == "sqlite":
            env["DATABASE_URL"] = f"sqlite:///{tmp}/bench.sqlite3"
        else:
            _pg_admin(args.postgres_url, f'CREATE DATABASE "{dbname}"')
            env["DATABASE_URL"] = args.postgres_url.rsplit("/", 1)[0] + f"/{dbname}"
        out = Path(tmp) / "out.json"
        try:
            subprocess.run([sys.executable, __file__, "--worker", "--checks", str(args.checks),
                            "--out", str(out)], env=env, cwd=ROOT, check=True)
            return json.loads(out.read_text())
        finally:
            if backend == "postgres":
                _pg_admin(args.postgres_url, f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checks", type=int, default=2000)
    parser.add_argument("--only", choices=["sqlite", "postgres"])
    parser.add_argument("--postgres-url", default=os.environ.get(
        "BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.out.write_text(json.dumps(_measure(args.checks)))
        return 0
    print(f"grant check per tool call, median of {args.checks} checks (µs)")
    print(f"{'database':<10} {'one query (gate)':>17} {'guardian API':>13} {'ratio':>6}")
    for backend in [args.only] if args.only else ["sqlite", "postgres"]:
        got = run_backend(backend, args)
        sql, guardian = got["sql_median_us"], got["guardian_median_us"]
        print(f"{backend:<10} {sql:>17.0f} {guardian:>13.0f} {guardian / sql:>5.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
