"""Run a benchmark's worker half against a throwaway PostgreSQL database: created on the given
server, handed to the worker as DATABASE_URL (no REDIS_URL: the worker runs alone), and
dropped afterwards unless kept. The worker writes its figures as JSON to ``--out``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent


def run_worker(script: str, worker_args: list[str], *, postgres_url: str, prefix: str,
               env: dict[str, str] | None = None, keep: bool = False,
               announce: str = "", name: str | None = None,
               reuse: bool = False) -> dict[str, Any]:
    """``python script --worker *worker_args --out FILE`` on a new database; its JSON result.
    ``announce`` (with ``{name}``, the database's name) is printed before it starts. The
    database is ``name``, or ``prefix`` and this process's id; ``reuse`` runs on that database
    as an earlier kept run left it (not created, and kept again)."""
    import psycopg

    name = name or f"{prefix}_{os.getpid()}"
    if not name or '"' in name or "\x00" in name:
        raise ValueError(f"not a database name: {name!r}")
    keep = keep or reuse
    if not reuse:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit(urlsplit(postgres_url)._replace(path=f"/{name}"))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            child = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
            child.update(DATABASE_URL=url, DJANGO_SETTINGS_MODULE="console.settings",
                         **(env or {}))
            if announce:
                print(announce.format(name=name), file=sys.stderr, flush=True)
            subprocess.run([sys.executable, script, "--worker", *worker_args, "--out",
                            str(out)], env=child, cwd=ROOT, check=True)
            return json.loads(out.read_text())
    finally:
        if not keep:
            with psycopg.connect(postgres_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def setup_django() -> None:
    """A worker's start: the project importable, Django set up on the database the parent gave
    it (a throwaway key: start-up refuses none with DEBUG off), and migrated."""
    import secrets

    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings")
    os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(50))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
