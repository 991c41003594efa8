"""Adding, versioning, deleting and searching documents, and who may read or write a collection.

Every ingest, new version and delete is one event on the configuration chain, written in the
same transaction as the change. Embeddings of new chunk texts are computed before that
transaction opens, so a slow embeddings endpoint never holds the document's row lock."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import numpy as np
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils import timezone

from audit import ledger
from audit.ledger import CONFIG_CHAIN, actor_of
from knowledge import index
from knowledge.chunking import chunk_text
from knowledge.embeddings import Embedder, embedder_for, to_blob
from knowledge.models import Chunk, Collection, Document, DocumentVersion

MODES = ("hybrid", "vector", "text")
MAX_K = 50
RRF_K = 60
MAX_QUERY_CHARS = 2000
MAX_TEXT_CHARS = 2_000_000
TITLE_MAX = 300


@dataclass
class IngestResult:
    document: Document
    version: DocumentVersion
    embedded: int
    reused: int
    retired: int


@dataclass(frozen=True)
class Hit:
    chunk_id: uuid.UUID
    document_id: uuid.UUID
    title: str
    version: int
    ordinal: int
    text: str
    score: float


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _indexed_text(title: str, piece: str) -> str:
    """What is embedded and matched: the chunk under its document's title, which often names
    the subject the chunk's sentences only allude to."""
    return f"{title}\n{piece}"


def _embed(embedder: Embedder, title: str, pieces: list[str]) -> dict[str, np.ndarray]:
    unique = list(dict.fromkeys(pieces))
    if not unique:
        return {}
    vectors = np.asarray(embedder.embed([_indexed_text(title, p) for p in unique]))
    return {sha256(p): vectors[i] for i, p in enumerate(unique)}


def _live_hashes(collection: Collection, title: str) -> set[str]:
    return set(Chunk.objects.filter(document__collection=collection, document__title=title,
                                    retired_at__isnull=True).values_list("text_hash", flat=True))


def _clean_input(title: str, text: str) -> tuple[str, str]:
    title = " ".join((title or "").split())
    if not title:
        raise ValueError("a document needs a title")
    if len(title) > TITLE_MAX:
        raise ValueError(f"the title is longer than {TITLE_MAX} characters")
    text = (text or "").replace("\x00", "").strip()
    if not text:
        raise ValueError("the document has no text")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"the document is longer than {MAX_TEXT_CHARS} characters")
    return title, text


def ingest(collection: Collection, *, title: str, text: str, by: Any,
           source_url: str = "") -> IngestResult:
    """Add a document, or a new version of the one with this title in the collection.

    Chunks whose text is unchanged stay live (their ordinal follows the new version), new texts
    are embedded, the rest retire and leave the indexes. Posting the current text again
    changes nothing and returns the current version with ``embedded=0``."""
    return write(prepare(collection, title=title, text=text, by=by, source_url=source_url))


def prepare(collection: Collection, *, title: str, text: str, by: Any,
            source_url: str = "") -> Prepared:
    """The slow half of an ingest, outside any transaction: checks, chunks, and embeds the
    chunk texts the document does not hold yet (ValueError for bad input)."""
    title, text = _clean_input(title, text)
    pieces = chunk_text(text, collection.chunk_size, collection.chunk_overlap)
    embedder = embedder_for(collection)
    known = _live_hashes(collection, title)
    return Prepared(collection=collection, title=title, text=text, by=by,
                    source_url=source_url, pieces=pieces, embedder=embedder,
                    vectors=_embed(embedder, title,
                                   [p for p in pieces if sha256(p) not in known]))


def write(post: Prepared) -> IngestResult:
    """The quick half, in one transaction: the version, its chunks, indexes and ledger event."""
    try:
        return _write(post)
    except IntegrityError:
        # Another request created the document first: now it exists, so lock and version it.
        return _write(post)


@dataclass
class Prepared:
    collection: Collection
    title: str
    text: str
    by: Any
    source_url: str
    pieces: list[str]
    embedder: Embedder
    vectors: dict[str, np.ndarray]


def _write(post: Prepared) -> IngestResult:
    content_hash = sha256(post.text)
    with transaction.atomic():
        document = (Document.objects.select_for_update()
                    .filter(collection=post.collection, title=post.title).first())
        if document is not None:
            current = document.versions.filter(number=document.version).first()
            if current is not None and current.content_hash == content_hash:
                live = document.chunks.filter(retired_at__isnull=True).count()
                return IngestResult(document, current, embedded=0, reused=live, retired=0)
        created = document is None
        if document is None:
            document = Document.objects.create(collection=post.collection, title=post.title,
                                               source_url=post.source_url or "")
        version = DocumentVersion.objects.create(
            document=document, number=document.version + 1, text=post.text,
            content_hash=content_hash,
            created_by=post.by if getattr(post.by, "pk", None) else None)
        embedded, reused, retired = _apply(post.collection, document, version, post.pieces,
                                           post.vectors, post.embedder)
        document.version = version.number
        document.source_url = post.source_url or document.source_url
        document.save(update_fields=["version", "source_url", "updated_at"])
        fresh = [_indexed_text(post.title, p) for p in dict.fromkeys(post.pieces)
                 if sha256(p) in post.vectors]
        tokens, cost = post.embedder.cost(fresh) if embedded else (0, Decimal(0))
        ledger.append(
            CONFIG_CHAIN, "config.knowledge_ingested" if created else "config.knowledge_updated",
            {"model": "knowledge.document", "object": post.title,
             "collection": post.collection.slug, "document": str(document.pk),
             "title": post.title, "version": version.number, "content_hash": content_hash,
             "source_url": document.source_url,
             "chunks": {"embedded": embedded, "reused": reused, "retired": retired},
             "embedder": post.embedder.name, "embedding_tokens": tokens,
             "embedding_cost": str(cost)},
            actor=actor_of(post.by))
    return IngestResult(document, version, embedded=embedded, reused=reused, retired=retired)


def _apply(collection: Collection, document: Document, version: DocumentVersion,
           pieces: list[str], vectors: dict[str, np.ndarray],
           embedder: Embedder) -> tuple[int, int, int]:
    """Write the version's chunks: reuse live ones by text, create the others, retire the
    rest. Returns (embedded, reused, retired)."""
    live: dict[str, list[Chunk]] = {}
    for chunk in document.chunks.filter(retired_at__isnull=True).order_by("ordinal"):
        live.setdefault(chunk.text_hash, []).append(chunk)
    reused: list[Chunk] = []
    fresh: list[Chunk] = []
    for ordinal, piece in enumerate(pieces):
        digest = sha256(piece)
        if live.get(digest):
            chunk = live[digest].pop(0)
            chunk.ordinal = ordinal
            reused.append(chunk)
            continue
        if digest not in vectors:  # a concurrent version retired it meanwhile
            vectors.update(_embed(embedder, document.title, [piece]))
        vector = vectors[digest]
        fresh.append(Chunk(collection=collection, document=document, version=version,
                           ordinal=ordinal, text=piece, text_hash=digest,
                           embedding=to_blob(vector), dims=int(vector.shape[0])))
    stale = [chunk for group in live.values() for chunk in group]
    if stale:
        Chunk.objects.filter(pk__in=[c.pk for c in stale]).update(retired_at=timezone.now())
        index.remove([c.pk for c in stale], {c.dims for c in stale})
    Chunk.objects.bulk_update(reused, ["ordinal"], batch_size=500)
    Chunk.objects.bulk_create(fresh, batch_size=500)
    index.add([index.Entry(chunk_id=c.pk, collection_id=collection.pk,
                           text=_indexed_text(document.title, c.text),
                           embedding=vectors[c.text_hash]) for c in fresh])
    return len(fresh), len(reused), len(stale)


def delete_document(document: Document, *, by: Any) -> None:
    """Delete the document, its versions and chunks for real, index rows included."""
    with transaction.atomic():
        rows = list(Chunk.objects.filter(document=document).values_list("pk", "dims"))
        index.remove([pk for pk, _ in rows], {dims for _, dims in rows})
        data = {"model": "knowledge.document", "object": document.title,
                "collection": document.collection.slug, "document": str(document.pk),
                "title": document.title, "version": document.version,
                "versions": document.versions.count(), "chunks": len(rows)}
        document.delete()
        ledger.append(CONFIG_CHAIN, "config.knowledge_deleted", data, actor=actor_of(by))


def _ranked(collection: Collection, query: str, mode: str,
            k: int) -> list[tuple[uuid.UUID, float]]:
    """Chunk ids best first with their scores. Hybrid fuses each ranking's top ``k`` only: with
    deeper lists, in a small collection nearly every chunk sits somewhere in the vector list,
    and mediocre ranks in both lists then outscore the top of one (the evaluation's recall@5
    fell from 0.975 at depth k to 0.89 at depth 40; see benchmarks/retrieval.py)."""
    if mode == "text":
        return index.text_search(collection.pk, query, 2 * k)
    vector = np.asarray(embedder_for(collection).embed([query]))[0]
    if mode == "vector":
        return index.vector_search(collection.pk, vector, 2 * k)
    fused: dict[uuid.UUID, float] = {}
    for ranking in (index.vector_search(collection.pk, vector, k),
                    index.text_search(collection.pk, query, k)):
        for rank, (chunk_id, _) in enumerate(ranking, start=1):
            fused[chunk_id] = fused.get(chunk_id, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(fused.items(), key=lambda item: -item[1])


def search(collection: Collection, query: str, k: int = 5, *,
           mode: str = "hybrid") -> list[Hit]:
    """The ``k`` live chunks that best answer ``query``: by vector similarity, full text, or
    both fused by reciprocal rank (rank r in each list's top ``k`` counting 1/(60 + r))."""
    if mode not in MODES:
        raise ValueError(f"unknown search mode {mode!r}; one of {', '.join(MODES)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be a whole number from 1 to {MAX_K}")
    query = " ".join((query or "").split())
    if not query:
        raise ValueError("the query is empty")
    if len(query) > MAX_QUERY_CHARS:
        raise ValueError(f"the query is longer than {MAX_QUERY_CHARS} characters")
    ranked = _ranked(collection, query, mode, k)
    chunks = {c.pk: c for c in Chunk.objects.filter(
        pk__in=[pk for pk, _ in ranked], collection=collection,
        retired_at__isnull=True).select_related("document")}
    hits = [Hit(chunk_id=c.pk, document_id=c.document_id, title=c.document.title,
                version=c.document.version, ordinal=c.ordinal, text=c.text, score=score)
            for pk, score in ranked if (c := chunks.get(pk)) is not None]
    return hits[:k]


def readable(user: Any) -> QuerySet[Collection]:
    """The collections ``user`` (a person or an agent's user) may search."""
    from guardian.shortcuts import get_objects_for_user

    if user is None or not getattr(user, "is_authenticated", False) or not user.is_active:
        return Collection.objects.none()
    if user.is_superuser:
        return Collection.objects.all()
    return get_objects_for_user(user, "knowledge.read_collection", klass=Collection)


def can_read(user: Any, collection: Collection) -> bool:
    return readable(user).filter(pk=collection.pk).exists()


def can_write(user: Any, collection: Collection) -> bool:
    if user is None or not getattr(user, "is_authenticated", False) or not user.is_active:
        return False
    return bool(user.is_superuser or user.has_perm("knowledge.write_collection", collection))
