"""Append to the ledger and seal the global chain: the only code that writes events (audit.verify
reads and checks them)."""

from __future__ import annotations

import functools
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from audit.metrics import LEDGER_APPEND_SECONDS
from audit.models import ChainHead, Event
from audit.signals import event_appended
from audit.statements import Prepared
from hashchain import GENESIS, canonical_json, chain_hash, global_hash

# The global chain over every event; its head is a ChainHead row like any other chain's.
GLOBAL_CHAIN = uuid.UUID(int=0)
# Administrative and configuration changes: a chain of its own, with no Run behind it.
CONFIG_CHAIN = uuid.UUID(int=1)

_HEAD_SQL = "SELECT seq, head_hash FROM audit_chainhead WHERE chain = %s{lock}"
_OPEN_SQL = ("INSERT INTO audit_chainhead (chain, seq, head_hash) VALUES (%s, 0, %s) "
             "ON CONFLICT (chain) DO NOTHING")
_MOVE_SQL = "UPDATE audit_chainhead SET seq = %s, head_hash = %s WHERE chain = %s"
# gseq, gprev_hash and ghash stay NULL: seal() fills them.
_INSERT_SQL = ("INSERT INTO audit_event (chain, seq, kind, at, actor, data, body, prev_hash, hash)"
               " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id")
# PostgreSQL, one event alone: the insert and the head's move in one round trip.
_INSERT_MOVE_SQL = ("WITH e AS (" + _INSERT_SQL + ") UPDATE audit_chainhead SET seq = %s,"
                    " head_hash = %s WHERE chain = %s RETURNING (SELECT id FROM e)")
# Served by the partial index audit_event_unsealed (or a scan of the primary key without one).
_UNSEALED_SQL = "SELECT id, hash FROM audit_event WHERE gseq IS NULL ORDER BY id LIMIT %s"
_ANY_UNSEALED_SQL = "SELECT 1 FROM audit_event WHERE gseq IS NULL LIMIT 1"
# "AND gseq IS NULL": a row sealed meanwhile (which the head lock rules out) is left alone, and
# the row count then shows it.
_SEAL_ONE_SQL = ("UPDATE audit_event SET gseq = %s, gprev_hash = %s, ghash = %s"
                 " WHERE id = %s AND gseq IS NULL")
_SEAL_MANY_SQL = ("UPDATE audit_event AS e SET gseq = v.gseq, gprev_hash = v.gprev_hash,"
                  " ghash = v.ghash FROM (VALUES {rows}) AS v (id, gseq, gprev_hash, ghash)"
                  " WHERE e.id = v.id AND e.gseq IS NULL")
_SEAL_ROW = "(%s::bigint, %s::bigint, %s::varchar, %s::varchar)"
# Rows per UPDATE ... FROM (VALUES ...): 4 parameters each, far below PostgreSQL's 65535.
_SEAL_STATEMENT_ROWS = 1000


def actor_of(user: Any) -> str:
    """How events name who acted: ``agent:<slug>`` for an agent's service account,
    ``user:<username>`` for a person, ``system`` for nobody."""
    if user is None:
        return "system"
    agent = getattr(user, "agent_identity", None)
    if agent is not None:
        return f"agent:{agent.slug}"
    return f"user:{user.get_username()}"


def _lock_clause() -> str:
    return " FOR UPDATE" if connection.features.has_select_for_update else ""


def open_chain(chain: uuid.UUID) -> None:
    ChainHead.objects.get_or_create(chain=chain, defaults={"seq": 0, "head_hash": GENESIS})


def _locked_head(cursor: Any, sql: str, chain_param: Any) -> tuple[int, str]:
    """The chain's (seq, head_hash), its row locked until commit; created on first use."""
    cursor.execute(sql, [chain_param])
    row = cursor.fetchone()
    if row is None:
        cursor.execute(_OPEN_SQL, [chain_param, GENESIS])
        cursor.execute(sql, [chain_param])
        row = cursor.fetchone()
    return row[0], row[1]


# Chain heads this process moved, per chain: (transaction scope, savepoints, seq, hash). A head
# read under its row lock stays right until that transaction ends, so further appends in the
# same transaction skip the read. The scope is the connection's list of commit hooks: Django
# replaces that list object at every commit, rollback and rollback to a savepoint, so an entry
# can never outlive the writes it reflects; the savepoint stack must match too (an append inside
# a savepoint that was later released moved the head under another entry).
_heads = threading.local()


def _cached_heads() -> tuple[dict[uuid.UUID, tuple[tuple[Any, ...], int, str]], tuple[Any, ...]]:
    conn = transaction.get_connection()
    if getattr(_heads, "scope", None) is not conn.run_on_commit:
        _heads.scope, _heads.chains = conn.run_on_commit, {}
    # Only blocks that made a savepoint count: an error in one without (savepoint=False) dooms
    # the whole transaction, so it cannot leave a head moved that the database does not have.
    return _heads.chains, tuple(sid for sid in conn.savepoint_ids if sid)


@dataclass(frozen=True, slots=True)
class Appended:
    """An event appended inside ``batched()``, written when the block ends (building a model
    instance for each cost a step's appends a tenth of a millisecond each)."""

    chain: uuid.UUID
    seq: int
    kind: str
    at: datetime
    actor: str
    body: str
    prev_hash: str
    hash: str


def append(chain: uuid.UUID, kind: str, data: dict[str, Any], *,
           actor: str) -> Event | Appended:
    """Append one event to its chain. Must run inside the caller's transaction (the state
    change's own); ``audit.signals.event_appended`` is sent once that transaction commits.
    Returns the event; inside ``batched()``, what its row will hold (``Appended``).

    Only the event's own chain head is locked (until the caller commits), so appends to
    different chains never wait for each other. The event joins the global chain later, when
    seal() runs: until then its gseq, gprev_hash and ghash are None. A transaction that appends
    to two chains (say a run's and CONFIG_CHAIN) can deadlock with one doing the opposite, which
    PostgreSQL detects and aborts, so keep to one chain per transaction where possible."""
    with LEDGER_APPEND_SECONDS.time():
        return _append(chain, kind, data, actor=actor)


def _append(chain: uuid.UUID, kind: str, data: dict[str, Any], *,
            actor: str) -> Event | Appended:
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("ledger.append must be called inside transaction.atomic()")
    if chain == GLOBAL_CHAIN:
        raise ValueError("the global chain is written by seal(), not appended to")
    chain_param = ChainHead._meta.pk.get_db_prep_value(chain, connection)
    heads, savepoints = _cached_heads()
    cached = heads.get(chain)
    batch = getattr(_batch, "rows", None)
    if batch is not None and chain in _batch.heads:
        head_seq, head_hash = _batch.heads[chain][1], _batch.heads[chain][2]
    elif cached is not None and cached[0] == savepoints:
        head_seq, head_hash = cached[1], cached[2]  # this transaction holds the head's lock
    else:
        with connection.cursor() as cursor:  # plain SQL: this runs for every step of every run
            head_seq, head_hash = _locked_head(cursor, _HEAD_SQL.format(lock=_lock_clause()),
                                               chain_param)
    at = timezone.now()
    seq = head_seq + 1
    body = canonical_json(
        {"chain": str(chain), "seq": seq, "kind": kind, "at": at.isoformat(), "actor": actor,
         "data": data}
    )
    digest = chain_hash(head_hash, body)
    postgresql = connection.vendor == "postgresql"
    if batch is not None:  # no Event built: the row is written when the block ends
        if postgresql:  # the columns are read out of the body: see APPEND
            batch.append([body, head_hash, digest])
        else:  # data as the body holds it (canonical JSON of the same value)
            batch.append([chain_param, seq, kind, connection.ops.adapt_datetimefield_value(at),
                          actor, canonical_json(data), body, head_hash, digest])
        _batch.heads[chain] = (chain_param, seq, digest)
        _announce(chain, seq, kind)
        return Appended(chain, seq, kind, at, actor, body, head_hash, digest)
    event = Event(
        chain=chain, seq=seq, kind=kind, at=at, actor=actor, data=json.loads(body)["data"],
        body=body, prev_hash=head_hash, hash=digest,
    )
    data_param = Event._meta.get_field("data").get_db_prep_save(event.data, connection)
    params = [chain_param, seq, kind, connection.ops.adapt_datetimefield_value(at), actor,
              data_param, body, head_hash, digest]
    with connection.cursor() as cursor:
        if postgresql:
            cursor.execute(_INSERT_MOVE_SQL, [*params, seq, digest, chain_param])
            event.pk = cursor.fetchone()[0]
        else:
            cursor.execute(_INSERT_SQL, params)
            event.pk = cursor.fetchone()[0]
            cursor.execute(_MOVE_SQL, [seq, digest, chain_param])
    heads[chain] = (savepoints, seq, digest)
    _on_commit_head(chain, seq, digest)
    event._state.adding = False
    event._state.db = connection.alias
    _announce(chain, seq, kind)
    return event


_batch = threading.local()
_announcements = threading.local()


def _announce(chain: uuid.UUID, seq: int, kind: str) -> None:
    """Send ``event_appended`` after commit once per chain and transaction, for its newest
    event (``kinds`` names every kind the transaction appended): a page re-renders once per
    step, not once per event. Each event still registers a hook, so a savepoint rolled back
    takes only its own hooks with it; the first hook of a chain to run sends, the rest find
    nothing left."""
    scope = transaction.get_connection().run_on_commit
    if getattr(_announcements, "scope", None) is not scope:
        _announcements.scope, _announcements.pending = scope, {}
    pending: dict[uuid.UUID, list[Any]] = _announcements.pending
    entry = pending.setdefault(chain, [seq, kind, set()])
    entry[0], entry[1] = max(entry[0], seq), kind if seq >= entry[0] else entry[1]
    entry[2].add(kind)
    transaction.on_commit(functools.partial(_send_announcement, pending, chain), robust=True)


def _send_announcement(pending: dict[uuid.UUID, list[Any]], chain: uuid.UUID) -> None:
    entry = pending.pop(chain, None)
    if entry is not None:
        event_appended.send(sender=Event, chain=chain, seq=entry[0], kind=entry[1],
                            kinds=frozenset(entry[2]))


@contextmanager
def batched(write: Callable[[str, list[Any]], None] | None = None) -> Iterator[None]:
    """Write the appends of this block together when it ends: one multi-row INSERT and one
    head move per chain, instead of a round trip per event. Use it inside the transaction (a
    worker's step appends four to six events). Events are hashed and their seqs assigned as they
    come, exactly as unbatched; if the block raises, nothing is written (the transaction rolls
    back anyway). A savepoint rolled back inside the block without its error propagating would
    leave its events in the batch: the blocks that batch never do that. ``write``, when given,
    takes the final statement instead of executing it (a caller sending a step's writes
    together)."""
    if getattr(_batch, "rows", None) is not None:
        yield  # already batching: the outer block writes
        return
    _batch.rows, _batch.heads = [], {}
    try:
        yield
        _flush(_batch.rows, _batch.heads, write)
    finally:
        _batch.rows = _batch.heads = None


# PostgreSQL: any number of events, of any chains, and the move of each chain's head, in one
# statement planned once per connection. Each event travels as its canonical body with its two
# hashes (one JSON parameter, so adapting it is one C call); the columns are read out of the
# body, which is what the hash covers. ORDER BY n: ids follow append order, as seal() needs.
APPEND = Prepared(
    "append_rows",
    "WITH r AS (SELECT x->>0 AS body, (x->>0)::jsonb AS b, x->>1 AS prev_hash, x->>2 AS hash, n"
    " FROM json_array_elements(%(rows)s::json) WITH ORDINALITY AS t (x, n)),"
    " e AS (INSERT INTO audit_event (chain, seq, kind, at, actor, data, body, prev_hash, hash)"
    " SELECT (b->>'chain')::uuid, (b->>'seq')::bigint, b->>'kind', (b->>'at')::timestamptz,"
    " b->>'actor', b->'data', body, prev_hash, hash FROM r ORDER BY n)"
    " UPDATE audit_chainhead AS h SET seq = m.seq, head_hash = m.hash FROM"
    " (SELECT DISTINCT ON (b->>'chain') (b->>'chain')::uuid AS chain, (b->>'seq')::bigint AS seq,"
    " hash FROM r ORDER BY b->>'chain', n DESC) AS m WHERE h.chain = m.chain",
    {"rows": "text"})


def _flush(rows: list[list[Any]], heads: dict[uuid.UUID, tuple[Any, int, str]],
           write: Callable[[str, list[Any]], None] | None = None) -> None:
    if not rows:
        return
    if connection.vendor == "postgresql":
        # Rows hold (body, prev_hash, hash) here: see _append.
        statement = APPEND.statement({"rows": json.dumps(rows, ensure_ascii=False)})
        if write is not None:
            write(*statement)
        else:
            with connection.cursor() as cursor:
                cursor.execute(*statement)
        return _remember(heads)
    values = ", ".join(["(%s, %s, %s, %s, %s, %s, %s, %s, %s)"] * len(rows))
    insert = _INSERT_SQL.split(" VALUES ")[0] + " VALUES " + values
    params = [value for row in rows for value in row]
    moves = [[seq, digest, chain_param] for chain_param, seq, digest in heads.values()]
    if write is not None:
        write(insert, params)
        for move in moves:
            write(_MOVE_SQL, move)
    else:
        with connection.cursor() as cursor:
            cursor.execute(insert, params)
            for move in moves:
                cursor.execute(_MOVE_SQL, move)
    _remember(heads)


def _remember(heads: dict[uuid.UUID, tuple[Any, int, str]]) -> None:
    cached, savepoints = _cached_heads()
    for chain, (_, seq, digest) in heads.items():
        cached[chain] = (savepoints, seq, digest)
        _on_commit_head(chain, seq, digest)


# Per thread, the head each chain was left at by this thread's last committed append (at most
# _COMMITTED_CHAINS chains, the oldest forgotten first). Another process may have appended
# since: a writer that starts from it must check it under the head's lock (as a recorded call
# does, orchestration/call_records.py).
_committed = threading.local()
_COMMITTED_CHAINS = 1000


def _on_commit_head(chain: uuid.UUID, seq: int, digest: str) -> None:
    transaction.on_commit(functools.partial(_committed_at, chain, seq, digest), robust=True)


def _committed_at(chain: uuid.UUID, seq: int, digest: str) -> None:
    heads: dict[uuid.UUID, tuple[int, str]] | None = getattr(_committed, "heads", None)
    if heads is None:
        heads = _committed.heads = {}
    heads.pop(chain, None)
    heads[chain] = (seq, digest)
    if len(heads) > _COMMITTED_CHAINS:
        del heads[next(iter(heads))]


def committed_head(chain: uuid.UUID) -> tuple[int, str] | None:
    """(seq, hash) of ``chain``'s head as this thread's last committed append left it, if it
    remembers one; someone else may have appended since."""
    return getattr(_committed, "heads", {}).get(chain)


def start_chain(chain: uuid.UUID) -> None:
    """Open a chain that is new in this transaction (a run being created): its head row is
    written here, so the first append knows it without reading it back."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("ledger.start_chain must be called inside transaction.atomic()")
    chain_param = ChainHead._meta.pk.get_db_prep_value(chain, connection)
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO audit_chainhead (chain, seq, head_hash) VALUES (%s, 0, %s)",
                       [chain_param, GENESIS])
    prime_head(chain, 0, GENESIS)


def prime_head(chain: uuid.UUID, seq: int, head_hash: str) -> None:
    """Tell append() the chain's head, read by the caller under the head row's lock in this
    transaction (a run step reads it with the run row), so the first append skips the read."""
    cached, savepoints = _cached_heads()
    cached[chain] = (savepoints, seq, head_hash)


# --- sealing: the global chain ------------------------------------------------------------------


def seal(limit: int = 5000) -> int:
    """Give up to ``limit`` committed, unsealed events their place in the global chain, in id
    order, and return how many it sealed (0: nothing was waiting).

    One short transaction: lock the global head, read the unsealed events, set each one's gseq
    (the head's + 1, + 2, ...), gprev_hash and ghash = global_hash(gprev_hash, hash), move the
    head. Concurrent callers queue on the head lock and the later one finds only what is left.
    An event that commits late with a lower id is sealed by a later call: gseq is sealing order,
    not id order. Within one chain it is seq order all the same, since an append waits for the
    chain's previous event to commit before it is inserted. Call it outside a transaction (the
    worker sweep, audit_verify, audit_export): inside one, the head stays locked until that
    transaction ends and events it cannot see yet are left for the next call."""
    if limit < 1:
        raise ValueError("seal() needs a limit of at least 1")
    with connection.cursor() as cursor:
        # Without a lock, and on SQLite without taking the write lock (BEGIN IMMEDIATE): the
        # worker sweep calls this every few seconds and usually finds nothing.
        cursor.execute(_ANY_UNSEALED_SQL)
        if cursor.fetchone() is None:
            return 0
    global_param = ChainHead._meta.pk.get_db_prep_value(GLOBAL_CHAIN, connection)
    with transaction.atomic(), connection.cursor() as cursor:
        gseq, ghash = _locked_head(cursor, _HEAD_SQL.format(lock=_lock_clause()), global_param)
        cursor.execute(_UNSEALED_SQL, [limit])
        rows = cursor.fetchall()
        if not rows:
            return 0  # another caller sealed them while this one waited for the head
        sealed: list[tuple[int, int, str, str]] = []  # (id, gseq, gprev_hash, ghash)
        for pk, event_hash in rows:
            gseq += 1
            link = global_hash(ghash, event_hash)
            sealed.append((pk, gseq, ghash, link))
            ghash = link
        if connection.vendor == "postgresql":
            written = 0
            for start in range(0, len(sealed), _SEAL_STATEMENT_ROWS):
                part = sealed[start:start + _SEAL_STATEMENT_ROWS]
                cursor.execute(_SEAL_MANY_SQL.format(rows=", ".join([_SEAL_ROW] * len(part))),
                               [value for row in part for value in row])
                written += cursor.rowcount
        else:
            cursor.executemany(_SEAL_ONE_SQL, [(g, prev, link, pk)
                                               for pk, g, prev, link in sealed])
            written = cursor.rowcount
        if written != len(sealed):
            # The head lock should make this impossible; roll back rather than leave a gap.
            raise RuntimeError(f"seal: {len(sealed)} events read but {written} sealed; another "
                               "writer changed the global chain without its head lock")
        cursor.execute(_MOVE_SQL, [gseq, ghash, global_param])
    return len(sealed)


def seal_all(batch: int = 5000) -> int:
    """seal() until nothing committed is left unsealed; how many it sealed in all. For
    audit_verify and audit_export, which must cover every committed event."""
    total = 0
    while (sealed := seal(batch)) > 0:
        total += sealed
        if sealed < batch:
            break
    return total


def unsealed_count() -> int:
    """Events appended but not yet in the global chain (served by the partial index)."""
    return Event.objects.filter(gseq__isnull=True).count()
