"""The API's operations on the knowledge base: the collections you may read, adding a document
(or a new version of one: the same title) from text, an uploaded file or a URL, searching,
deleting.

The same permission model as everywhere: a collection you may not read answers 404 at every
operation, so its existence cannot be probed; one you may read but not write answers 403 on
the writes."""

from __future__ import annotations

import base64
import binascii
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Count
from django.http import Http404, HttpRequest
from ninja import Query, Router, Schema, Status
from pydantic import Field, model_validator

from audit import hygiene
from console.api.common import (
    CONTENT_TYPE,
    ErrorOut,
    IdempotencyHeader,
    ServerErrorOut,
    once,
    refused,
)
from console.idempotency import answered
from knowledge import services
from knowledge.extract import SUPPORTED, extract
from knowledge.index import ScanLimitExceeded
from knowledge.models import Collection
from knowledge.url_fetch import FetchRefused, fetch
from orchestration.engine.knowledge import citation

router = Router(tags=["knowledge"])

MAX_TEXT = 2_000_000  # characters of one document's text
# An uploaded file, base64, within the request body Django accepts (DATA_UPLOAD_MAX_MEMORY_SIZE,
# 2.5 MB by default; a larger body is answered 413): about 1.5 MB decoded.
FILE_B64_MAX = 2_000_000
SLUG_PATTERN = "^[-a-zA-Z0-9_]{1,50}$"


class CollectionOut(Schema):
    slug: str
    name: str
    description: str
    documents: int
    writable: bool = Field(description="whether you may add and delete documents")


class DocumentIn(Schema):
    title: str = Field(min_length=1, max_length=300,
                       description="a document's title is unique in its collection: the same "
                                   "title adds a new version of that document")
    text: str | None = Field(None, min_length=1, max_length=MAX_TEXT,
                             description="the document's text (plain text or Markdown)")
    url: str | None = Field(None, min_length=1, max_length=2000,
                            description="an http(s) URL to fetch the document from (HTML, "
                                        "PDF or text); private and loopback addresses are "
                                        "refused")

    file: str | None = Field(None, min_length=1, max_length=FILE_B64_MAX,
                             description="an uploaded file, base64-encoded (at most 2,000,000 "
                                         "characters, about 1.5 MB decoded), with its "
                                         "media_type")
    media_type: str | None = Field(None, description="the uploaded file's type: "
                                                     + ", ".join(SUPPORTED))

    @model_validator(mode="after")
    def _one_source(self) -> DocumentIn:
        if sum(v is not None for v in (self.text, self.url, self.file)) != 1:
            raise ValueError("send exactly one of text, url or file")
        if (self.file is None) != (self.media_type is None):
            raise ValueError("media_type goes with file, and only with it")
        if self.media_type is not None and self.media_type not in SUPPORTED:
            raise ValueError(f"media_type must be one of {', '.join(SUPPORTED)}")
        return self


class IngestOut(Schema):
    id: uuid.UUID = Field(description="the document's id")
    title: str
    version: int = Field(description="the document's version after this request")
    source_url: str
    embedded: int = Field(description="chunks embedded for this version (new or changed)")
    reused: int = Field(description="chunks kept from the previous version as they were")
    retired: int = Field(description="chunks of the previous version no longer live")


class HitOut(Schema):
    chunk_id: str
    document_id: str
    title: str
    version: int
    ordinal: int
    text: str
    score: float
    citation: str = Field(description="the id to cite the chunk by: "
                                      "[doc:<document id>@v<version>#<ordinal>]")


class SearchOut(Schema):
    collection: str
    query: str
    results: list[HitOut]


class SearchQuery(Schema):
    q: str = Field(min_length=1, max_length=1000, description="what to search for")
    k: int = Field(5, ge=1, le=20, description="how many results")


def _readable(user: Any, slug: str) -> Collection:
    """The collection if this user may read it; 404 otherwise (never reveal that it exists)."""
    collection = services.readable(user).filter(slug=slug).first()
    if collection is None:
        raise Http404("no such knowledge collection")
    return collection


def _forbidden(collection: Collection) -> Status[Any]:
    return Status(403, {"error": f"you may not change the knowledge collection "
                                 f"{collection.slug!r}"})


@router.get("/knowledge", response=list[CollectionOut],
            summary="Knowledge collections you may read")
def list_collections(request: HttpRequest) -> list[dict[str, Any]]:
    rows = services.readable(request.user).annotate(count=Count("documents")).order_by("slug")
    return [{"slug": c.slug, "name": c.name, "description": c.description,
             "documents": c.count, "writable": services.can_write(request.user, c)}
            for c in rows]


@router.post("/knowledge/{slug}/documents",
             response={201: IngestOut, 400: ErrorOut, 403: ErrorOut, 404: ErrorOut,
                       422: ErrorOut, 503: ServerErrorOut},
             summary="Add a document, or a new version of the one with the same title")
def add_document(request: HttpRequest, slug: str, payload: DocumentIn,
                 idempotency_key: str | None = IdempotencyHeader) -> Any:
    bad = refused(payload)
    if bad is not None:
        return bad
    collection = _readable(request.user, slug)
    if not services.can_write(request.user, collection):
        return _forbidden(collection)

    # Fetching, extracting and embedding happen before the transaction that records the
    # version (and the Idempotency-Key): slow work must not hold the database's locks. A retry
    # of a request already done is answered first, as it was, without that work.
    done = answered(request, idempotency_key, content_type=CONTENT_TYPE)
    if done is not None:
        return done
    text, source_url = payload.text or "", ""
    if payload.file is not None:
        try:
            data = base64.b64decode(payload.file, validate=True)
            text = extract(data, payload.media_type or "")
            hygiene.check(text, "file")
        except (binascii.Error, ValueError) as exc:
            return Status(400, {"error": f"invalid request: file: {exc}"})
    if payload.url is not None:
        try:
            fetched = fetch(payload.url)
            text = extract(fetched.data, fetched.media_type)
        except FetchRefused as exc:
            return Status(422, {"error": f"the URL was not fetched: {exc}"})
        except ValueError as exc:
            return Status(422, {"error": f"no text could be read from the URL: {exc}"})
        # Kept without its query: a signed URL's signature or a ?token= must not go into the
        # append-only ledger, where it could never be taken out again.
        source_url = urlunsplit(urlsplit(payload.url)._replace(query="", fragment=""))
        try:
            hygiene.check(text, "text")
        except hygiene.Refused as exc:
            return Status(422, {"error": f"the fetched document was refused: {exc}"})
    try:
        prepared = services.prepare(collection, title=payload.title, text=text,
                                    by=request.user, source_url=source_url)
    except (ValueError, DjangoValidationError) as exc:
        return Status(400, {"error": f"invalid request: {_message(exc)}"})

    def action() -> Status[Any]:
        result = services.write(prepared)
        document = result.document
        return Status(201, {"id": document.pk, "title": document.title,
                            "version": result.version.number,
                            "source_url": document.source_url, "embedded": result.embedded,
                            "reused": result.reused, "retired": result.retired})

    return once(request, idempotency_key, IngestOut, action)


def _message(exc: Exception) -> str:
    if isinstance(exc, DjangoValidationError):
        return "; ".join(exc.messages)
    return str(exc)


@router.get("/knowledge/{slug}/search",
            response={200: SearchOut, 400: ErrorOut, 404: ErrorOut, 422: ErrorOut},
            summary="Search a knowledge collection (hybrid: vectors and full text)")
def search_collection(request: HttpRequest, slug: str, query: Query[SearchQuery]) -> Any:
    collection = _readable(request.user, slug)
    try:
        hygiene.check(query.q, "q")
    except hygiene.Refused as exc:
        return Status(400, {"error": f"invalid request: {exc}"})
    try:
        hits = services.search(collection, query.q, query.k)
    except ValueError as exc:  # e.g. a query of spaces only
        return Status(400, {"error": f"invalid request: q: {exc}"})
    except ScanLimitExceeded as exc:  # no pgvector and too many chunks to scan exactly
        return Status(422, {"error": str(exc)})
    results = [{"chunk_id": str(h.chunk_id), "document_id": str(h.document_id),
                "title": h.title, "version": h.version, "ordinal": h.ordinal, "text": h.text,
                "score": round(float(h.score), 6)} for h in hits]
    for result in results:
        result["citation"] = citation(result)
    return {"collection": collection.slug, "query": query.q, "results": results}


@router.delete("/knowledge/{slug}/documents/{document_id}",
               response={204: None, 403: ErrorOut, 404: ErrorOut},
               summary="Delete a document, all its versions and chunks")
def delete_document(request: HttpRequest, slug: str, document_id: str) -> Any:
    collection = _readable(request.user, slug)
    if not services.can_write(request.user, collection):
        return _forbidden(collection)
    try:
        document = collection.documents.filter(pk=document_id).first()
    except (DjangoValidationError, ValueError):
        document = None
    if document is None:
        raise Http404("no such document in this collection")
    services.delete_document(document, by=request.user)
    return Status(204, None)
