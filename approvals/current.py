"""The current policy versions, read from the database once per change instead of once per call.

Versions are immutable (a change publishes a new one and points its policy at it), so the
policies' current versions (id and creation time, in policy order) say exactly which versions
are in force: the gate reads that fingerprint in the query it already makes before every tool call
(``fingerprint_sql``) and matches against the versions cached for it."""

from __future__ import annotations

import threading
from functools import cache
from typing import Any

from django.db import connection

from approvals import rules
from approvals.models import Policy, PolicyVersion

# (fingerprint, versions): the versions in force when the fingerprint was read. One entry: a
# change replaces it for every thread.
_cached: tuple[Any, list[PolicyVersion]] | None = None
_lock = threading.Lock()


@cache
def _fingerprint_sql(vendor: str) -> str:
    # Each current version's id and creation time, in policy order: an id alone could come
    # back for another row after a rollback (SQLite reuses them).
    policies, versions = Policy._meta.db_table, PolicyVersion._meta.db_table
    current = Policy._meta.get_field("current_version").column
    joined = f"FROM {policies} p JOIN {versions} v ON v.id = p.{current}"
    if vendor == "postgresql":
        return (f"(SELECT string_agg(v.id::text || '@' || v.created_at::text, ','"
                f" ORDER BY p.id) {joined})")
    return (f"(SELECT group_concat(f, ',') FROM (SELECT v.id || '@' || v.created_at AS f"
            f" {joined} ORDER BY p.id))")


def fingerprint_sql() -> str:
    """A scalar subquery naming the versions in force (NULL when there are none)."""
    return _fingerprint_sql(connection.vendor)


def fingerprint() -> Any:
    with connection.cursor() as cursor:
        cursor.execute("SELECT " + fingerprint_sql())
        return cursor.fetchone()[0]


def versions(known: Any = ...) -> list[PolicyVersion]:
    """The versions in force; ``known`` is a fingerprint the caller has just read (else it is
    read here)."""
    global _cached
    key = fingerprint() if known is ... else known
    cached = _cached
    if cached is not None and cached[0] == key:
        return cached[1]
    with _lock:
        # Read after the fingerprint: at least as new as what it names, never older.
        found = list(PolicyVersion.objects.filter(
            pk__in=Policy.objects.filter(current_version__isnull=False)
            .values("current_version_id")).select_related("policy"))
        _cached = (key, found)
    return found


def match(*, tool: str, risk_class: str, arguments: Any,
          known: Any = ...) -> PolicyVersion | None:
    """The strictest version in force that matches the call, or None (approvals/rules.py)."""
    return rules.strictest_match(versions(known), tool, risk_class, arguments)
