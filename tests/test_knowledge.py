"""The knowledge base: ingest and versioned re-embedding, real deletes, extraction, search in
every mode, read grants, and the OpenAI-compatible embedder against a local HTTP server. These
need only the database, so they run in both passes (SQLite with sqlite-vec and FTS5;
PostgreSQL with tsvector and the exact vector scan)."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


def _sqlite_index_rows() -> dict[str, int]:
    """Rows in SQLite's full-text and vector indexes (virtual tables: a committing test's flush
    leaves them, so tests compare against the count they started with)."""
    from django.db import connection

    if connection.vendor != "sqlite":
        return {}
    with connection.cursor() as cursor:
        counts = {}
        for table in ("knowledge_fts", "knowledge_vec_256"):  # the second is made on first use
            cursor.execute("SELECT count(*) FROM sqlite_master WHERE name = %s", [table])
            if cursor.fetchone()[0]:
                cursor.execute(f"SELECT count(*) FROM {table}")
                counts[table] = cursor.fetchone()[0]
            else:
                counts[table] = 0
        return counts


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

    before = _sqlite_index_rows()
    result = ingest(collection, title="Returns", text="\n\n".join(PARAGRAPHS), by=admin_user)
    ingest(collection, title="Returns", text=PARAGRAPHS[0], by=admin_user)
    document_id = result.document.pk
    delete_document(result.document, by=admin_user)
    assert not Document.objects.exists()
    assert not DocumentVersion.objects.exists() and not Chunk.objects.exists()
    for mode in ("text", "vector", "hybrid"):
        assert search(collection, "refunds payment method", mode=mode) == []
    assert _sqlite_index_rows() == before
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


def test_vector_index_matches_the_database(db: Any) -> None:
    """sqlite-vec is loaded on SQLite; PostgreSQL here has no pgvector, so it scans."""
    from django.db import connection

    from knowledge import index

    expected = "sqlite-vec" if connection.vendor == "sqlite" else "scan"
    assert index.vector_backend() == expected


def test_exact_scan_refuses_collections_over_its_limit(collection: Any, admin_user: Any,
                                                       settings: Any) -> None:
    import numpy as np

    from knowledge import index
    from knowledge.models import Chunk
    from knowledge.services import ingest

    ingest(collection, title="Returns", text="\n\n".join(PARAGRAPHS), by=admin_user)
    vector = np.zeros(256, dtype=np.float32)
    vector[0] = 1.0
    first = {pk for pk, _ in index._scan(collection.pk, vector, 5)}
    assert len(first) == 3
    # A new version changes what the scan reads, though the number of live chunks is the same.
    ingest(collection, title="Returns", text="\n\n".join([*PARAGRAPHS[:2], "Changed."]),
           by=admin_user)
    live = set(Chunk.objects.filter(retired_at__isnull=True).values_list("pk", flat=True))
    assert {pk for pk, _ in index._scan(collection.pk, vector, 5)} == live != first
    settings.SWITCHBOARD_KNOWLEDGE_SCAN_LIMIT = 2
    with pytest.raises(index.ScanLimitExceeded, match="install the pgvector extension"):
        index._scan(collection.pk, vector, 5)


def test_extract_markdown_html_and_pdf() -> None:
    from knowledge.extract import extract

    assert extract(b"# Refunds\n\nWithin *30* days.", "text/markdown") == \
        "# Refunds\n\nWithin *30* days."
    html = (b"<html><head><title>t</title><style>p{}</style></head><body><h1>Refunds</h1>"
            b"<p>Paid back in <b>five</b> days.</p><script>alert(1)</script></body></html>")
    assert extract(html, "text/html; charset=utf-8") == "Refunds\n\nPaid back in five days."
    assert "Warranty lasts two years" in extract(_tiny_pdf("Warranty lasts two years"),
                                                 "application/pdf")
    with pytest.raises(ValueError, match="unsupported media type 'image/png'"):
        extract(b"\x89PNG", "image/png")
    with pytest.raises(ValueError, match="not a PDF"):
        extract(b"hello", "application/pdf")
    with pytest.raises(ValueError, match="could not be read"):
        extract(b"%PDF-1.4\n garbage", "application/pdf")
    with pytest.raises(ValueError, match="UTF-8"):
        extract(b"\xff\xfe\xfa", "text/plain")


def _tiny_pdf(text: str) -> bytes:
    """A one-page PDF with ``text`` in Helvetica, built by hand with a correct xref table."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n"
              % (len(objects) + 1, xref))
    return out.getvalue()


@pytest.fixture
def eval_collection(db: Any) -> tuple[Any, dict[Any, str]]:
    from knowledge import eval as evaluation
    from knowledge.models import Collection

    collection = Collection.objects.create(slug="eval", name="Evaluation")
    return collection, evaluation.load(collection)


@pytest.mark.parametrize(("question", "answer"), [
    ("Can you send my refund to my husband's bank account instead?", "refund-method"),
    ("How do I stop an AI agent from calling the payments tool?", "agent-grants"),
    ("A competitor sells the same blender for less, will you match it?", "price-match"),
])
def test_every_mode_finds_the_answering_document(eval_collection: Any, question: str,
                                                 answer: str) -> None:
    from knowledge.services import search

    collection, ids = eval_collection
    for mode in ("text", "vector", "hybrid"):
        hits = search(collection, question, k=5, mode=mode)
        assert answer in [ids[h.document_id] for h in hits], mode
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert all(h.version == 1 and h.title and h.text for h in hits)


def test_evaluation_meets_its_target(eval_collection: Any) -> None:
    from knowledge import eval as evaluation

    collection, ids = eval_collection
    hybrid = evaluation.evaluate(collection, ids, mode="hybrid", k=5)
    assert hybrid.recall >= evaluation.TARGET_RECALL, hybrid.misses
    assert hybrid.mrr >= 0.7


def test_readable_follows_grants_to_people_groups_and_agents(collection: Any) -> None:
    from django.contrib.auth.models import Group, User
    from guardian.shortcuts import assign_perm

    from knowledge.models import Collection
    from knowledge.services import can_read, can_write, readable
    from orchestration.models import Agent

    other = Collection.objects.create(slug="other", name="Other")
    reader = User.objects.create_user("reader")
    member = User.objects.create_user("member")
    outsider = User.objects.create_user("outsider")
    root = User.objects.create_superuser("root", password="x")
    team = Group.objects.create(name="support")
    member.groups.add(team)
    granted = Agent.objects.create(slug="helper", name="helper", provider="scripted",
                                   user=User.objects.create_user("agent-helper"))
    ungranted = Agent.objects.create(slug="stranger", name="stranger", provider="scripted",
                                     user=User.objects.create_user("agent-stranger"))
    assign_perm("knowledge.read_collection", reader, collection)
    assign_perm("knowledge.read_collection", team, other)
    assign_perm("knowledge.read_collection", granted.user, collection)
    assign_perm("knowledge.write_collection", member, other)

    assert list(readable(reader)) == [collection]
    assert list(readable(member)) == [other]
    assert list(readable(granted.user)) == [collection]
    assert list(readable(ungranted.user)) == []
    assert list(readable(outsider)) == []
    assert list(readable(None)) == []
    assert set(readable(root)) == {collection, other}
    assert can_read(granted.user, collection) and not can_read(granted.user, other)
    assert can_write(member, other) and not can_write(member, collection)
    assert not can_write(reader, collection) and can_write(root, collection)
    reader.is_active = False
    reader.save()
    assert list(readable(reader)) == []


class _FakeEmbeddings(BaseHTTPRequestHandler):
    """POST /v1/embeddings: a vector per input whose components count letters a..d, so
    similar texts get similar vectors and the order of inputs is checkable."""

    requests: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers["Authorization"],
                                    "body": body})
        data = [{"object": "embedding", "index": i,
                 "embedding": [float(text.count(ch)) + 0.5 for ch in "abcd"]}
                for i, text in enumerate(body["input"])]
        payload = json.dumps({"object": "list", "data": list(reversed(data)),
                              "model": body["model"],
                              "usage": {"prompt_tokens": 3, "total_tokens": 3}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def embeddings_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeEmbeddings)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _FakeEmbeddings.requests = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_openai_embedder_against_a_local_server(embeddings_server: str, db: Any,
                                                settings: Any) -> None:
    from decimal import Decimal

    import numpy as np

    from knowledge.embeddings import OpenAIEmbedder
    from knowledge.models import Collection
    from knowledge.services import ingest, search
    from orchestration.models import ModelPrice

    settings.SWITCHBOARD_EMBEDDINGS_BASE_URL = embeddings_server
    settings.SWITCHBOARD_EMBEDDINGS_MODEL = "tiny-embed"
    settings.SWITCHBOARD_CREDENTIALS = {**settings.SWITCHBOARD_CREDENTIALS,
                                        "embeddings": "emb-key-123"}
    embedder = OpenAIEmbedder()
    vectors = embedder.embed(["aaaa", "dddd"])
    assert vectors.shape == (2, 4) and embedder.dims == 4
    assert np.argmax(vectors[0]) == 0 and np.argmax(vectors[1]) == 3  # order kept
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0)
    [call] = _FakeEmbeddings.requests
    assert call["path"] == "/v1/embeddings" and call["auth"] == "Bearer emb-key-123"
    assert call["body"]["model"] == "tiny-embed" and call["body"]["input"] == ["aaaa", "dddd"]
    ModelPrice.objects.create(provider="openai", model_name="tiny-embed",
                              input_per_mtok=Decimal("2"))
    assert embedder.cost(["x" * 4000]) == (1000, Decimal("0.002"))

    collection = Collection.objects.create(slug="remote", name="Remote", embedder="openai")
    ingest(collection, title="Letters", text="aaaa aaaa aaaa\n\n" + "dddd dddd dddd " * 20,
           by=None)
    hits = search(collection, "dddd", k=1, mode="vector")
    assert "dddd" in hits[0].text


def test_openai_embedder_needs_a_key(settings: Any) -> None:
    from knowledge.embeddings import OpenAIEmbedder

    settings.SWITCHBOARD_CREDENTIALS = {k: v for k, v in settings.SWITCHBOARD_CREDENTIALS.items()
                                        if k != "embeddings"}
    with pytest.raises(ValueError, match="SWITCHBOARD_CREDENTIAL_EMBEDDINGS"):
        OpenAIEmbedder(base_url="http://127.0.0.1:9/v1").embed(["x"])


def test_local_model_loads_with_the_network_blocked(tmp_path: Any) -> None:
    """The shipped model needs no download: loading and embedding in a fresh process whose
    sockets refuse to connect, with Hugging Face offline and an empty home directory."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    script = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network blocked')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "from knowledge.embeddings import LocalEmbedder\n"
        "v = LocalEmbedder().embed(['refund within thirty days'])\n"
        "print(v.shape[1], round(float((v ** 2).sum()), 3))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path),
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["256", "1.0"]
    assert not any(tmp_path.iterdir())  # nothing cached or downloaded


def test_admin_lists_collections_and_deletes_documents_through_the_service(
        client: Any, collection: Any) -> None:
    from django.contrib.auth.models import User

    from knowledge.models import Chunk
    from knowledge.services import ingest

    before = _sqlite_index_rows()
    root = User.objects.create_superuser("root", password="x")
    client.force_login(root)
    document = ingest(collection, title="Returns", text=PARAGRAPHS[0], by=root).document
    assert client.get("/admin/knowledge/collection/").status_code == 200
    assert client.get(f"/admin/knowledge/collection/{collection.pk}/change/").status_code == 200
    page = client.get(f"/admin/knowledge/document/{document.pk}/change/")
    assert page.status_code == 200 and b"Returns" in page.content
    response = client.post(f"/admin/knowledge/document/{document.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not Chunk.objects.exists()
    [event] = _config_events("config.knowledge_deleted")
    assert event.actor == "user:root"

    # Deleting the collection deletes each document through the service too: no index row of
    # its chunks is left behind.
    ingest(collection, title="Shipping", text=PARAGRAPHS[1], by=root)
    response = client.post(f"/admin/knowledge/collection/{collection.pk}/delete/",
                           {"post": "yes"})
    assert response.status_code == 302 and not Chunk.objects.exists()
    assert len(_config_events("config.knowledge_deleted")) == 2
    assert _sqlite_index_rows() == before


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_concurrent_first_post_of_the_same_title_is_not_an_error(monkeypatch: Any) -> None:
    """Another connection commits the same new title between this ingest's look-up and its
    insert: the unique violation is retried and finds that document. (PostgreSQL only: on
    SQLite the first writer holds the database's write lock, so the race cannot happen.)"""
    from django.db import connections

    from knowledge import services
    from knowledge.models import Collection, Document

    collection = Collection.objects.create(slug="race", name="Race")
    create = Document.objects.create
    raced: list[Any] = []

    def create_after_a_rival(**kwargs: Any) -> Any:
        if not raced and threading.current_thread() is threading.main_thread():
            def rival() -> None:
                try:
                    raced.append(services.ingest(collection, title="Returns",
                                                 text=PARAGRAPHS[0], by=None))
                finally:
                    connections.close_all()
            thread = threading.Thread(target=rival)
            thread.start()
            thread.join(timeout=60)
        return create(**kwargs)

    monkeypatch.setattr(Document.objects, "create", create_after_a_rival)
    result = services.ingest(collection, title="Returns", text=PARAGRAPHS[0], by=None)
    assert raced and raced[0].version.number == 1
    assert result.document.pk == raced[0].document.pk
    assert (result.version.number, result.embedded) == (1, 0)
    assert Document.objects.count() == 1


@pytest.mark.parametrize("name, value", [("SWITCHBOARD_EMBEDDINGS_BASE_URL", "ftp://x/v1"),
                                         ("SWITCHBOARD_EMBEDDINGS_BASE_URL", "api.example"),
                                         ("SWITCHBOARD_KNOWLEDGE_SCAN_LIMIT", "0"),
                                         ("SWITCHBOARD_KNOWLEDGE_SCAN_LIMIT", "many")])
def test_it_refuses_a_bad_knowledge_setting_at_start_up(name: str, value: str) -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, name: value, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    done = subprocess.run([sys.executable, "-c", "import django; django.setup()"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and name in done.stderr
