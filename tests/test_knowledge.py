"""The knowledge base: ingest and versioned re-embedding, real deletes, extraction, search in
every mode, read grants, and the OpenAI-compatible embedder against a local HTTP server. These
need only the database, so they run in both passes (SQLite with sqlite-vec and FTS5;
PostgreSQL with tsvector and the exact vector scan)."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.django_db(transaction=False)

PARAGRAPHS = [
    "Refunds are paid to the original payment method within fourteen days of the return "
    "arriving at our warehouse. Store credit is offered as an alternative on request.",
    "Items must be returned unused and in their original packaging. Perishable goods, gift "
    "cards and personalised products cannot be returned at all.",
    "Customers who received a damaged parcel should photograph it and contact support within "
    "forty-eight hours so that a carrier claim can be opened.",
]


@pytest.fixture
def collection(db: Any) -> Any:
    from knowledge.models import Collection

    return Collection.objects.create(slug="policies", name="Policies", chunk_size=300,
                                     chunk_overlap=50)


@pytest.fixture
def admin_user(db: Any) -> Any:
    from django.contrib.auth.models import User

    return User.objects.create_user("kb-admin", password="x")


def _config_events(kind: str) -> list[Any]:
    from audit.ledger import CONFIG_CHAIN
    from audit.models import Event

    return list(Event.objects.filter(chain=CONFIG_CHAIN, kind=kind).order_by("seq"))


def test_ingest_chunks_embeds_indexes_and_logs(collection: Any, admin_user: Any) -> None:
    from knowledge.models import Chunk
    from knowledge.services import ingest, search

    result = ingest(collection, title="Returns", text="\n\n".join(PARAGRAPHS), by=admin_user)
    assert (result.embedded, result.reused, result.retired) == (3, 0, 0)
    assert result.version.number == 1 and result.document.version == 1
    chunks = list(Chunk.objects.filter(document=result.document).order_by("ordinal"))
    assert [c.text for c in chunks] == PARAGRAPHS
    assert all(c.dims == 256 and len(bytes(c.embedding)) == 256 * 4 for c in chunks)
    [event] = _config_events("config.knowledge_ingested")
    assert event.actor == "user:kb-admin"
    assert event.data["collection"] == "policies"
    assert event.data["document"] == str(result.document.pk)
    assert event.data["version"] == 1
    assert event.data["content_hash"] == result.version.content_hash
    assert event.data["chunks"] == {"embedded": 3, "reused": 0, "retired": 0}
    hits = search(collection, "photograph the broken box", k=1, mode="text")
    assert hits and hits[0].ordinal == 2 and hits[0].document_id == result.document.pk


def test_new_version_reembeds_only_changed_chunks(collection: Any, admin_user: Any) -> None:
    from knowledge.models import Chunk
    from knowledge.services import ingest, search

    first = ingest(collection, title="Returns", text="\n\n".join(PARAGRAPHS), by=admin_user)
    kept = set(Chunk.objects.filter(document=first.document, ordinal__in=[0, 2])
               .values_list("pk", flat=True))
    changed = [PARAGRAPHS[0], "Items can be sent back within sixty days, unworn and with tags "
               "attached. Swimwear and earrings are excluded for hygiene reasons.", PARAGRAPHS[2]]
    second = ingest(collection, title="Returns", text="\n\n".join(changed), by=admin_user)
    assert second.document.pk == first.document.pk
    assert (second.embedded, second.reused, second.retired) == (1, 2, 1)
    assert second.version.number == 2 and second.document.version == 2
    live = Chunk.objects.filter(document=first.document, retired_at__isnull=True)
    assert live.count() == 3
    assert kept <= set(live.values_list("pk", flat=True))
    assert live.get(ordinal=1).version_id == second.version.pk
    retired = Chunk.objects.get(document=first.document, retired_at__isnull=False)
    assert "Perishable" in retired.text
    for mode in ("text", "vector", "hybrid"):
        texts = [h.text for h in search(collection, "perishable gift cards personalised", k=10,
                                        mode=mode)]
        assert not any("Perishable" in t for t in texts), mode
    assert search(collection, "swimwear earrings hygiene", k=1, mode="text")[0].version == 2
    [event] = _config_events("config.knowledge_updated")
    assert event.data["chunks"] == {"embedded": 1, "reused": 2, "retired": 1}


def test_reposting_the_same_text_is_a_no_op(collection: Any, admin_user: Any) -> None:
    from knowledge.models import Chunk, DocumentVersion
    from knowledge.services import ingest

    text = "\n\n".join(PARAGRAPHS)
    ingest(collection, title="Returns", text=text, by=admin_user)
    again = ingest(collection, title="Returns", text=text + "\n", by=admin_user)
    assert again.embedded == 0 and again.retired == 0 and again.version.number == 1
    assert DocumentVersion.objects.count() == 1 and Chunk.objects.count() == 3
    assert _config_events("config.knowledge_updated") == []


def test_delete_removes_everything_and_logs(collection: Any, admin_user: Any) -> None:
    from knowledge.models import Chunk, Document, DocumentVersion
    from knowledge.services import delete_document, ingest, search

    result = ingest(collection, title="Returns", text="\n\n".join(PARAGRAPHS), by=admin_user)
    ingest(collection, title="Returns", text=PARAGRAPHS[0], by=admin_user)
    document_id = result.document.pk
    delete_document(result.document, by=admin_user)
    assert not Document.objects.exists()
    assert not DocumentVersion.objects.exists() and not Chunk.objects.exists()
    for mode in ("text", "vector", "hybrid"):
        assert search(collection, "refunds payment method", mode=mode) == []
    [event] = _config_events("config.knowledge_deleted")
    assert event.data["document"] == str(document_id) and event.data["chunks"] == 3
    assert event.data["versions"] == 2


def test_bad_input_is_refused_with_a_reason(collection: Any, admin_user: Any) -> None:
    from django.core.exceptions import ValidationError

    from knowledge.models import Collection
    from knowledge.services import ingest, search

    with pytest.raises(ValueError, match="title"):
        ingest(collection, title="  ", text="text", by=admin_user)
    with pytest.raises(ValueError, match="no text"):
        ingest(collection, title="Empty", text=" \n ", by=admin_user)
    for k in (0, 51, "5", True):
        with pytest.raises(ValueError, match="k must"):
            search(collection, "refund", k=k)
    with pytest.raises(ValueError, match="mode"):
        search(collection, "refund", mode="fuzzy")
    with pytest.raises(ValueError, match="empty"):
        search(collection, "   ")
    with pytest.raises(ValidationError) as error:
        Collection(slug="x", name="x", chunk_size=99, embedder="nope").full_clean()
    assert {"chunk_size", "embedder"} <= set(error.value.message_dict)
    with pytest.raises(ValidationError, match="smaller"):
        Collection(slug="y", name="y", chunk_size=200, chunk_overlap=200).full_clean()
