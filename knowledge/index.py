"""The search indexes, the only vendor-specific code of the knowledge base.

SQLite: vectors in sqlite-vec ``vec0`` tables (one per dimension count, created on first use,
partitioned by collection) and text in an FTS5 table (created by a migration), both keyed by
chunk id and holding live chunks only. PostgreSQL: text in a ``tsvector`` column of the chunk
table with a GIN index (migration) ranked by ``ts_rank``; vectors in pgvector tables when the
``vector`` extension is installed, otherwise an exact cosine scan in numpy over the collection's
live chunks, refused beyond SWITCHBOARD_KNOWLEDGE_SCAN_LIMIT chunks.

Some Python builds (pyenv's default among them) leave out ``enable_load_extension``; on CPython
the extension is then loaded through SQLite's C API on the connection's own handle, and failing
that, vectors fall back to the exact scan."""

from __future__ import annotations

import ctypes
import logging
import platform
import re
import sys
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from django.conf import settings
from django.db import connection

from knowledge.embeddings import to_blob

log = logging.getLogger(__name__)

DEFAULT_SCAN_LIMIT = 50_000
_SQLITE_DBCONFIG_ENABLE_LOAD_EXTENSION = 1005
_STOPWORDS = frozenset(
    "a an and are as at be but by can do does for from had has have how i if in into is it its "
    "me my of on or our so than that the their them then there these they this to was we what "
    "when where which who why will with would you your".split())


class ScanLimitExceeded(RuntimeError):
    """The exact scan would read too many chunks: the administrator must install pgvector."""


@dataclass(frozen=True)
class Entry:
    chunk_id: uuid.UUID
    collection_id: uuid.UUID
    text: str
    embedding: np.ndarray


# Loading sqlite-vec --------------------------------------------------------------------------

def _load_through_c_api(raw: Any, path: str) -> None:
    """``sqlite3_load_extension`` on the handle a CPython ``sqlite3.Connection`` holds first,
    enabling extension loading for the C API only and disabling it again afterwards."""
    import _sqlite3

    # The handle is the first field after the object header of pysqlite_Connection in the
    # CPython releases checked here (3.12, 3.13); elsewhere the exact scan serves instead.
    # sqlite3_db_config is variadic, which ctypes passes right on x86-64 but not on every ABI
    # (Apple's arm64 among them).
    if (sys.implementation.name != "cpython" or sys.version_info[:2] not in ((3, 12), (3, 13))
            or platform.machine().lower() not in ("x86_64", "amd64")):
        raise RuntimeError("no enable_load_extension, and not a CPython whose connection "
                           "layout is known")
    lib = ctypes.CDLL(_sqlite3.__file__)
    handle = ctypes.c_void_p.from_address(id(raw) + object.__basicsize__).value
    db = ctypes.c_void_p(handle)
    lib.sqlite3_db_config(db, _SQLITE_DBCONFIG_ENABLE_LOAD_EXTENSION, ctypes.c_int(1), None)
    try:
        error = ctypes.c_char_p()
        if lib.sqlite3_load_extension(db, path.encode(), None, ctypes.byref(error)) != 0:
            raise RuntimeError((error.value or b"load failed").decode(errors="replace"))
    finally:
        lib.sqlite3_db_config(db, _SQLITE_DBCONFIG_ENABLE_LOAD_EXTENSION, ctypes.c_int(0), None)


def on_connection_created(sender: Any, connection: Any, **kwargs: Any) -> None:
    if connection.vendor != "sqlite":
        return
    import sqlite_vec

    raw = connection.connection
    try:
        if hasattr(raw, "enable_load_extension"):
            raw.enable_load_extension(True)
            try:
                sqlite_vec.load(raw)
            finally:
                raw.enable_load_extension(False)
        else:
            _load_through_c_api(raw, sqlite_vec.loadable_path())
        connection.knowledge_vec = True
    except Exception as exc:  # any failure: search still works, by the exact scan
        log.warning("sqlite-vec not loaded (%s); vector search scans chunks exactly", exc)
        connection.knowledge_vec = False


def _sqlite_vec() -> bool:
    connection.ensure_connection()
    return bool(getattr(connection, "knowledge_vec", False))


_pgvector: bool | None = None


def _has_pgvector() -> bool:
    global _pgvector
    if _pgvector is None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'")
            _pgvector = cursor.fetchone() is not None
    return _pgvector


def vector_backend() -> str:
    """"sqlite-vec", "pgvector" or "scan": what vector search uses on this database."""
    if connection.vendor == "sqlite":
        return "sqlite-vec" if _sqlite_vec() else "scan"
    if connection.vendor == "postgresql" and _has_pgvector():
        return "pgvector"
    return "scan"


def _key(value: uuid.UUID) -> str:
    return value.hex


def _vec_table(dims: int) -> str:
    name = f"knowledge_vec_{int(dims)}"
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS {name} USING vec0("
                           "chunk_id text primary key, collection_id text partition key, "
                           f"embedding float[{int(dims)}] distance_metric=cosine)")
        else:
            cursor.execute(f"CREATE TABLE IF NOT EXISTS {name} (chunk_id uuid PRIMARY KEY, "
                           f"collection_id uuid NOT NULL, embedding vector({int(dims)}))")
    return name


# Writing -------------------------------------------------------------------------------------

def add(entries: list[Entry]) -> None:
    """Index live chunks; ``text`` is what full-text search matches (title and chunk)."""
    if not entries:
        return
    backend = vector_backend()
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.executemany(
                "INSERT INTO knowledge_fts (chunk_id, collection_id, body) VALUES (%s, %s, %s)",
                [(_key(e.chunk_id), _key(e.collection_id), e.text) for e in entries])
        else:
            cursor.executemany(
                "UPDATE knowledge_chunk SET tsv = to_tsvector('english', %s) WHERE id = %s",
                [(e.text, e.chunk_id) for e in entries])
        by_dims: dict[int, list[Entry]] = {}
        for entry in entries:
            by_dims.setdefault(int(entry.embedding.shape[0]), []).append(entry)
        for dims, group in by_dims.items():
            if backend == "sqlite-vec":
                cursor.executemany(
                    f"INSERT INTO {_vec_table(dims)} (chunk_id, collection_id, embedding) "
                    "VALUES (%s, %s, %s)",
                    [(_key(e.chunk_id), _key(e.collection_id), to_blob(e.embedding))
                     for e in group])
            elif backend == "pgvector":
                cursor.executemany(
                    f"INSERT INTO {_vec_table(dims)} (chunk_id, collection_id, embedding) "
                    "VALUES (%s, %s, %s::vector)",
                    [(e.chunk_id, e.collection_id, _pg_literal(e.embedding)) for e in group])


def remove(chunk_ids: list[uuid.UUID], dims: set[int]) -> None:
    """Take chunks out of the indexes (retired, or their document deleted)."""
    if not chunk_ids:
        return
    backend = vector_backend()
    with connection.cursor() as cursor:
        for start in range(0, len(chunk_ids), 500):
            batch = chunk_ids[start:start + 500]
            marks = ", ".join(["%s"] * len(batch))
            if connection.vendor == "sqlite":
                keys = [_key(c) for c in batch]
                cursor.execute(f"DELETE FROM knowledge_fts WHERE chunk_id IN ({marks})", keys)
                if backend == "sqlite-vec":
                    for d in dims:
                        cursor.execute(f"DELETE FROM {_vec_table(d)} WHERE chunk_id IN "
                                       f"({marks})", keys)
            else:
                cursor.execute(f"UPDATE knowledge_chunk SET tsv = NULL WHERE id IN ({marks})",
                               batch)
                if backend == "pgvector":
                    for d in dims:
                        cursor.execute(f"DELETE FROM {_vec_table(d)} WHERE chunk_id IN "
                                       f"({marks})", batch)


def _pg_literal(vector: np.ndarray) -> str:
    return "[" + ",".join(f"{float(x):.7g}" for x in vector) + "]"


# Reading -------------------------------------------------------------------------------------

def words(query: str) -> list[str]:
    """The query's words, lower-cased, without stopwords or duplicates, in order."""
    seen: dict[str, None] = {}
    for word in re.findall(r"\w+", query.lower()):
        if word not in _STOPWORDS and len(word) < 64:
            seen.setdefault(word, None)
    return list(seen)[:64]


def text_search(collection_id: uuid.UUID, query: str, limit: int) -> list[tuple[uuid.UUID, float]]:
    """Live chunks matching any of the query's words, best first, with a higher-is-better
    score (FTS5's negated bm25, or ts_rank)."""
    terms = words(query)
    if not terms:
        return []
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            match = " OR ".join('"' + t.replace('"', "") + '"' for t in terms)
            cursor.execute("SELECT chunk_id, bm25(knowledge_fts) FROM knowledge_fts "
                           "WHERE knowledge_fts MATCH %s AND collection_id = %s "
                           "ORDER BY bm25(knowledge_fts), chunk_id LIMIT %s",
                           [match, _key(collection_id), limit])
            return [(uuid.UUID(row[0]), -float(row[1])) for row in cursor.fetchall()]
        tsquery = " | ".join(re.sub(r"[^\w]", "", t) for t in terms)
        # Normalisation 1 divides by 1 + log(length), as bm25 weighs length: without it, many
        # one-word matches tie and their order (and the evaluation's text recall) is arbitrary.
        cursor.execute("SELECT id, ts_rank(tsv, q, 1) AS rank FROM knowledge_chunk, "
                       "to_tsquery('english', %s) AS q WHERE collection_id = %s "
                       "AND retired_at IS NULL AND tsv @@ q ORDER BY rank DESC, id LIMIT %s",
                       [tsquery, collection_id, limit])
        return [(row[0], float(row[1])) for row in cursor.fetchall()]


def scan_limit() -> int:
    return int(getattr(settings, "SWITCHBOARD_KNOWLEDGE_SCAN_LIMIT", DEFAULT_SCAN_LIMIT))


def vector_search(collection_id: uuid.UUID, vector: np.ndarray,
                  limit: int) -> list[tuple[uuid.UUID, float]]:
    """The live chunks nearest ``vector`` (unit length) by cosine similarity, best first."""
    backend = vector_backend()
    dims = int(vector.shape[0])
    with connection.cursor() as cursor:
        if backend == "sqlite-vec":
            cursor.execute(f"SELECT chunk_id, distance FROM {_vec_table(dims)} WHERE embedding "
                           "MATCH %s AND k = %s AND collection_id = %s ORDER BY distance",
                           [to_blob(vector), min(limit, 4096), _key(collection_id)])
            return [(uuid.UUID(row[0]), 1.0 - float(row[1])) for row in cursor.fetchall()]
        if backend == "pgvector":
            cursor.execute(f"SELECT chunk_id, embedding <=> %s::vector AS d FROM "
                           f"{_vec_table(dims)} WHERE collection_id = %s ORDER BY d LIMIT %s",
                           [_pg_literal(vector), collection_id, limit])
            return [(row[0], 1.0 - float(row[1])) for row in cursor.fetchall()]
    return _scan(collection_id, vector, limit)


_scan_lock = threading.Lock()
# collection id -> (stamp, chunk ids, matrix): the last few collections scanned, reloaded when
# their stamp (live chunks, documents, latest document change) moves.
_scan_cache: OrderedDict[uuid.UUID, tuple[tuple[Any, ...], list[uuid.UUID], np.ndarray]] = \
    OrderedDict()
_SCAN_CACHE_COLLECTIONS = 4


def _matrix(collection_id: uuid.UUID, dims: int) -> tuple[list[uuid.UUID], np.ndarray]:
    """The collection's live chunk ids and embeddings, one row each, cached per process.

    Every ingest and new version saves its document (moving ``updated_at``) and a delete
    lowers the document count, so the stamp changes whenever the live chunks do."""
    from django.db.models import Count, Max

    from knowledge.models import Chunk, Document

    live = Chunk.objects.filter(collection_id=collection_id, retired_at__isnull=True, dims=dims)
    count = live.count()
    cap = scan_limit()
    if count > cap:
        raise ScanLimitExceeded(
            f"this collection has more than {cap} live chunks, the limit of the exact vector "
            "scan (SWITCHBOARD_KNOWLEDGE_SCAN_LIMIT): install the pgvector extension in "
            "PostgreSQL (CREATE EXTENSION vector) for indexed vector search")
    docs = Document.objects.filter(collection_id=collection_id).aggregate(
        n=Count("id"), latest=Max("updated_at"))
    stamp = (count, dims, docs["n"], docs["latest"])
    with _scan_lock:
        cached = _scan_cache.get(collection_id)
        if cached is not None and cached[0] == stamp:
            _scan_cache.move_to_end(collection_id)
            return cached[1], cached[2]
    ids: list[uuid.UUID] = []
    blobs: list[bytes] = []
    for chunk_id, blob in live.values_list("id", "embedding").iterator(chunk_size=2000):
        ids.append(chunk_id)
        blobs.append(bytes(blob))
    matrix = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(ids), dims)
    with _scan_lock:
        _scan_cache[collection_id] = (stamp, ids, matrix)
        while len(_scan_cache) > _SCAN_CACHE_COLLECTIONS:
            _scan_cache.popitem(last=False)
    return ids, matrix


def _scan(collection_id: uuid.UUID, vector: np.ndarray,
          limit: int) -> list[tuple[uuid.UUID, float]]:
    ids, matrix = _matrix(collection_id, int(vector.shape[0]))
    if not ids:
        return []
    scores = matrix @ vector.astype(np.float32)
    order = np.argsort(-scores, kind="stable")[:limit]
    return [(ids[i], float(scores[i])) for i in order]
