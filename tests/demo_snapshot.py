"""The demo's rows, seeded once per test process and written back for every later test that needs
the demo: ``seed_demo`` runs a few hundred ORM calls (grants, policies, processes, the config
chain's events) and took 0.4-1 s a time, while writing its rows back takes a few milliseconds.

The search indexes outside the models' tables (SQLite's FTS5 and sqlite-vec tables, pgvector's
tables: anything else with a ``chunk_id`` column) are not emptied between tests; the snapshot
keeps the entries of the demo's chunks and puts them back in place of any left with their ids.

Only an empty database is written back to, i.e. one holding just what migrating leaves: the
content types, the permissions and guardian's anonymous user, made again by ``post_migrate``
under new ids after a committing test empties the database, and until then the global chain's
head, which a migration writes. One snapshot is kept for each of those starting points. The
rows found are replaced by the snapshot's, so every row the demo's rows point at is the one they
pointed at when it was taken. Anything else in the database (a fixture's rows written before
the demo) makes the demo seeded the slow way, as before.

The rows come back with the ids and timestamps of the seeding they were taken from. Ids do not
collide: the database is empty but for the rows replaced; writing explicit ids moves SQLite's
AUTOINCREMENT counters past them; PostgreSQL's sequences handed those ids out and never go
back, not even when a transaction rolls back (no test empties the database with
``reset_sequences``, which would restart them). Every test of a module already met the same ids
under the shared rolled-back seeding. What this process cached by those ids (content types,
the policy versions in force) is forgotten at each restore, and again when a rolled-back
restore is undone (conftest.py)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from django.contrib.contenttypes.models import ContentType
from django.db import connection, transaction

# What migrating leaves in a test database: post_migrate's rows (made again under new ids after a
# committing test empties it) and, until then, the global chain's head that a migration writes.
LEFT_BY_MIGRATE = frozenset({"django_content_type", "auth_permission", "auth_user",
                             "audit_chainhead"})

Rows = list[tuple[str, list[str], Any]]  # (table, columns, rows)


def forget_what_ids_named() -> None:
    """This process's caches keyed by rows' ids, which a restore brings back for rows that may
    differ from those the cache read: Django's content types, and the policy versions in force
    (approvals/current.py keys them by version id and creation time, and a test may have
    changed a version in place since)."""
    import approvals.current

    ContentType.objects.clear_cache()
    approvals.current._cached = None


class DemoSnapshot:
    def __init__(self) -> None:
        # By the tables found filled before seeding: the models' rows after it, and the search
        # indexes' entries for its chunks.
        self.taken: dict[tuple[str, frozenset[str]], tuple[Rows, Rows]] = {}

    def seed(self, slow: Callable[[], None]) -> None:
        """The demo, from a snapshot when one fits, else by ``slow`` (taking one)."""
        with transaction.atomic():
            filled = self._filled()
            key = (connection.vendor, filled)
            if key in self.taken:
                self._restore(filled, *self.taken[key])
                forget_what_ids_named()
                return
            taking = filled <= LEFT_BY_MIGRATE and self._only_anonymous()
            before = {t: set(self._chunk_ids(t)) for t in self._indexes()} if taking else {}
            slow()
            if taking:  # the indexes as they are now: seeding may have made a vector table
                self.taken[key] = (self._take(), self._take_entries(before))

    @staticmethod
    def _names() -> list[str]:
        """The models' tables: what emptying after a committing test empties."""
        return sorted(t for t in connection.introspection.django_table_names(
            only_existing=True, include_views=False) if t != "django_migrations")

    def _indexes(self) -> list[str]:
        """The other tables with a ``chunk_id`` column (not SQLite's virtual tables' own)."""
        models = set(self._names())
        others = [t for t in connection.introspection.table_names() if t not in models]
        virtual = []
        if connection.vendor == "sqlite":
            with connection.cursor() as cursor:
                cursor.execute("SELECT name FROM sqlite_master WHERE type = 'table'"
                               " AND sql LIKE 'CREATE VIRTUAL TABLE%'")
                virtual = [row[0] for row in cursor.fetchall()]
        return sorted(t for t in others
                      if not any(t.startswith(f"{v}_") for v in virtual)
                      and "chunk_id" in self._columns(t))

    @staticmethod
    def _chunk_ids(table: str) -> list[Any]:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT chunk_id FROM {connection.ops.quote_name(table)}")
            return [row[0] for row in cursor.fetchall()]

    def _take_entries(self, before: dict[str, set[Any]]) -> Rows:
        """The entries seeding added to each index, including one it made."""
        taken = []
        for table in self._indexes():
            old = before.get(table, set())
            columns = self._columns(table)
            key = columns.index("chunk_id")
            rows = [row for row in _select(table, columns) if row[key] not in old]
            taken.append((table, columns, rows))
        return taken

    def _filled(self) -> frozenset[str]:
        """The tables holding at least one row, in one query."""
        names = self._names()
        quote = connection.ops.quote_name
        probes = ", ".join(f"EXISTS (SELECT 1 FROM {quote(t)})" for t in names)
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT {probes}")
            row = cursor.fetchone()
        return frozenset(t for t, filled in zip(names, row, strict=True) if filled)

    @staticmethod
    def _only_anonymous() -> bool:
        """Whether the users before seeding are at most guardian's anonymous one."""
        from django.conf import settings
        from django.contrib.auth.models import User

        anonymous = getattr(settings, "ANONYMOUS_USER_NAME", "AnonymousUser")
        return not User.objects.exclude(username=anonymous).exists()

    def _columns(self, table: str) -> list[str]:
        with connection.cursor() as cursor:
            return [c.name for c in connection.introspection.get_table_description(cursor, table)]

    def _take(self) -> Rows:
        taken = []
        quote = connection.ops.quote_name
        for table in sorted(self._filled()):
            columns = self._columns(table)
            if connection.vendor == "postgresql":
                listed = ", ".join(quote(c) for c in columns)
                with connection.cursor() as cursor, cursor.cursor.copy(
                        f"COPY {quote(table)} ({listed}) TO STDOUT") as copy:
                    rows: Any = b"".join(bytes(block) for block in copy)
            else:
                rows = _select(table, columns)
            taken.append((table, columns, rows))
        return taken

    @staticmethod
    def _restore(filled: frozenset[str], tables: Rows, entries: Rows) -> None:
        quote = connection.ops.quote_name
        with connection.cursor() as cursor:
            for table in sorted(filled):  # post_migrate's rows, under ids of their own
                cursor.execute(f"DELETE FROM {quote(table)}")
            for table, columns, rows in tables:
                listed = ", ".join(quote(c) for c in columns)
                if connection.vendor == "postgresql":
                    with cursor.cursor.copy(f"COPY {quote(table)} ({listed}) FROM STDIN") as copy:
                        copy.write(rows)
                else:
                    _insert(cursor, table, columns, rows)
            for table, columns, rows in entries:  # in place of those left by earlier tests
                made = re.fullmatch(r"knowledge_vec_(\d+)", table)
                if made:  # made by seeding, perhaps in a transaction since rolled back
                    from knowledge import index

                    index._vec_table(int(made.group(1)))
                key = columns.index("chunk_id")
                cursor.executemany(f"DELETE FROM {quote(table)} WHERE chunk_id = %s",
                                   [(row[key],) for row in rows])
                _insert(cursor, table, columns, rows)


def _select(table: str, columns: list[str]) -> list[Any]:
    quote = connection.ops.quote_name
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {', '.join(map(quote, columns))} FROM {quote(table)}")
        return cursor.fetchall()


def _insert(cursor: Any, table: str, columns: list[str], rows: list[Any]) -> None:
    quote = connection.ops.quote_name
    cursor.executemany(f"INSERT INTO {quote(table)} ({', '.join(map(quote, columns))}) "
                       f"VALUES ({', '.join(['%s'] * len(columns))})", rows)


_snapshot = DemoSnapshot()


def seed(slow: Callable[[], None]) -> None:
    """The demo for a test, from this process's snapshot when one fits, else by ``slow``."""
    _snapshot.seed(slow)
