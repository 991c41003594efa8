"""The demo's rows, seeded once per test process and written back for every later test that needs
the demo: ``seed_demo`` runs a few hundred ORM calls (grants, policies, processes, the config
chain's events) and took 0.4-1 s a time, while writing its rows back takes a few milliseconds.

The search indexes outside the models' tables (SQLite's FTS5 and sqlite-vec tables, pgvector's
tables: anything else with a ``chunk_id`` column) are not emptied between tests; the snapshot
keeps the entries of the demo's chunks and puts them back in place of any left with their ids.

Only an empty database is written back to, i.e. one holding just what migrating (and emptying
after a committing test) leaves: the content types, the permissions and guardian's anonymous
user, all recreated by ``post_migrate`` under new ids. Those rows are replaced by the snapshot's,
so every row the demo's rows point at is the one they pointed at when it was taken. Anything
else found in the database (a fixture's rows written before the demo) makes the demo seeded the
slow way, as before.

The rows come back with the ids and timestamps of the seeding they were taken from: ids do not
collide, since PostgreSQL's sequences and SQLite's AUTOINCREMENT counters have moved past them,
and every test of a module already met the same ids under the shared rolled-back seeding."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib.contenttypes.models import ContentType
from django.db import connection, transaction

# Filled again by post_migrate after a test database is migrated or emptied.
REMADE_BY_MIGRATE = frozenset({"django_content_type", "auth_permission", "auth_user"})


class DemoSnapshot:
    def __init__(self) -> None:
        self.vendor = ""
        self.remade: frozenset[str] = frozenset()  # the tables migrate had filled
        self.tables: list[tuple[str, list[str], Any]] = []  # (table, columns, rows)
        self.entries: list[tuple[str, list[str], list[Any]]] = []  # the indexes' demo rows

    def seed(self, slow: Callable[[], None]) -> None:
        """The demo, from the snapshot when it fits, else by ``slow`` (taking the snapshot)."""
        with transaction.atomic():
            filled = self._filled()
            if self.tables and self.vendor == connection.vendor and filled == self.remade:
                self._restore()
                ContentType.objects.clear_cache()
                return
            taking = not self.tables and filled <= REMADE_BY_MIGRATE and self._only_anonymous()
            before = {t: set(self._chunk_ids(t)) for t in self._indexes()} if taking else {}
            slow()
            if taking:
                self.vendor, self.remade = connection.vendor, filled
                self.tables = self._take()
                self.entries = self._take_entries(before)

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

    def _take_entries(self, before: dict[str, set[Any]]) -> list[tuple[str, list[str], list[Any]]]:
        taken = []
        for table, old in before.items():
            columns = self._columns(table)
            with connection.cursor() as cursor:
                cursor.execute(f"SELECT {', '.join(columns)} FROM "
                               f"{connection.ops.quote_name(table)}")
                key = columns.index("chunk_id")
                rows = [row for row in cursor.fetchall() if row[key] not in old]
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

    def _take(self) -> list[tuple[str, list[str], Any]]:
        taken = []
        quote = connection.ops.quote_name
        for table in sorted(self._filled()):
            columns = self._columns(table)
            listed = ", ".join(quote(c) for c in columns)
            with connection.cursor() as cursor:
                if connection.vendor == "postgresql":
                    with cursor.cursor.copy(f"COPY {quote(table)} ({listed}) TO STDOUT") as copy:
                        rows: Any = b"".join(bytes(block) for block in copy)
                else:
                    cursor.execute(f"SELECT {listed} FROM {quote(table)}")
                    rows = cursor.fetchall()
            taken.append((table, columns, rows))
        return taken

    def _restore(self) -> None:
        quote = connection.ops.quote_name
        with connection.cursor() as cursor:
            for table in sorted(self.remade):  # post_migrate's rows, under ids of their own
                cursor.execute(f"DELETE FROM {quote(table)}")
            for table, columns, rows in self.tables:
                listed = ", ".join(quote(c) for c in columns)
                if connection.vendor == "postgresql":
                    with cursor.cursor.copy(f"COPY {quote(table)} ({listed}) FROM STDIN") as copy:
                        copy.write(rows)
                else:
                    marks = ", ".join(["%s"] * len(columns))
                    cursor.executemany(
                        f"INSERT INTO {quote(table)} ({listed}) VALUES ({marks})", rows)
            for table, columns, rows in self.entries:  # in place of those left by earlier tests
                key = columns.index("chunk_id")
                cursor.executemany(f"DELETE FROM {quote(table)} WHERE chunk_id = %s",
                                   [(row[key],) for row in rows])
                marks = ", ".join(["%s"] * len(columns))
                cursor.executemany(f"INSERT INTO {quote(table)} ({', '.join(columns)}) "
                                   f"VALUES ({marks})", rows)
