"""The knowledge base's JSON API: the collections you may read, adding a document or a new
version (from text or from a URL, which must not reach inside), searching, deleting; an
outsider gets 404 everywhere, a reader 403 on the writes; bad input a 400 or 422 that says why.
Needs only the database: runs in both passes."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from audit.models import Event
from console.models import ApiToken
from knowledge.models import Chunk, Document

BASE = "/api/v1/knowledge"
DOCS = f"{BASE}/refund-policy/documents"


class Caller:
    def __init__(self, client: Client, username: str) -> None:
        user = User.objects.get(username=username)
        self.client, self.token = client, ApiToken.issue(user, name="kb-tests")[1]

    def _auth(self, headers: dict[str, str]) -> dict[str, str]:
        return {"HTTP_AUTHORIZATION": f"Bearer {self.token}", **headers}

    def get(self, path: str, **params: Any) -> Any:
        return self.client.get(path, params, **self._auth({}))

    def post(self, path: str, body: Any, **headers: str) -> Any:
        return self.client.post(path, json.dumps(body), content_type="application/json",
                                **self._auth(headers))

    def delete(self, path: str) -> Any:
        return self.client.delete(path, **self._auth({}))



@pytest.fixture
def as_(demo: None, client: Client) -> Any:
    User.objects.create_user("outsider")
    return lambda username: Caller(client, username)


def _policy() -> Document:
    return Document.objects.get(collection__slug="refund-policy", title="Refund policy")


def test_each_person_lists_the_collections_they_may_read(as_: Any) -> None:
    listed = as_("operator").get(BASE)
    assert listed.status_code == 200
    assert listed.json() == [{"slug": "refund-policy", "name": "Refund policy",
                              "description": "The customer refund policy the front desk quotes.",
                              "documents": 1, "writable": False}]
    assert as_("admin").get(BASE).json()[0]["writable"] is True
    assert as_("reviewer").get(BASE).json() == []
    assert as_("outsider").get(BASE).json() == []


def test_an_admin_adds_a_document_and_new_versions_re_embed_only_what_changed(as_: Any) -> None:
    admin = as_("admin")
    first = "Shipping is free above 50 EUR.\n\nParcels leave the warehouse within two days."
    created = admin.post(DOCS, {"title": "Shipping", "text": first})
    assert created.status_code == 201, created.content
    body = created.json()
    assert body["version"] == 1 and body["embedded"] >= 1 and body["reused"] == 0
    doc = Document.objects.get(pk=body["id"])
    assert doc.title == "Shipping" and doc.collection.slug == "refund-policy"

    again = admin.post(DOCS, {"title": "Shipping", "text": first})
    assert again.status_code == 201 and again.json()["version"] == 1
    assert again.json()["embedded"] == 0

    changed = admin.post(DOCS, {"title": "Shipping", "text": first.replace("two", "three")})
    assert changed.status_code == 201
    out = changed.json()
    assert out["id"] == body["id"] and out["version"] == 2 and out["embedded"] >= 1
    assert out["embedded"] + out["reused"] == Chunk.objects.filter(
        document=doc, retired_at__isnull=True).count()
    assert out["retired"] >= 1
    kinds = set(Event.objects.filter(kind__startswith="config.knowledge").values_list(
        "kind", flat=True))
    assert {"config.knowledge_ingested", "config.knowledge_updated"} <= kinds


def test_search_answers_with_scores_and_ids(as_: Any) -> None:
    found = as_("operator").get(f"{BASE}/refund-policy/search", q="damaged items refund", k=3)
    assert found.status_code == 200, found.content
    body = found.json()
    assert body["collection"] == "refund-policy" and body["query"] == "damaged items refund"
    [hit] = body["results"]  # the policy is one chunk
    policy = _policy()
    assert hit["document_id"] == str(policy.pk) and hit["version"] == 1
    assert hit["title"] == "Refund policy" and hit["ordinal"] == 0
    assert isinstance(hit["score"], float) and hit["score"] > 0
    assert hit["citation"] == f"[doc:{policy.pk}@v1#0]"
    assert Chunk.objects.filter(pk=hit["chunk_id"], document=policy).exists()


BAD_SEARCHES = [
    ({}, "q"), ({"q": ""}, "q"), ({"q": "x" * 1001}, "q"), ({"q": "refund", "k": "0"}, "k"),
    ({"q": "refund", "k": "21"}, "k"), ({"q": "refund", "k": "many"}, "k"),
    ({"q": "nul\x00"}, "q"), ({"q": "   "}, "q: the query is empty"),
]


def test_a_bad_search_says_why(as_: Any) -> None:
    operator = as_("operator")
    for params, problem in BAD_SEARCHES:
        response = operator.get(f"{BASE}/refund-policy/search", **params)
        assert response.status_code == 400, (params, response.content)
        error = response.json()["error"]
        assert error.startswith("invalid request") and problem in error, (params, error)


def test_an_admin_deletes_a_document_for_real(as_: Any) -> None:
    admin, policy = as_("admin"), _policy()
    chunks = list(Chunk.objects.filter(document=policy).values_list("pk", flat=True))
    assert as_("operator").delete(f"{DOCS}/{policy.pk}").status_code == 403
    deleted = admin.delete(f"{DOCS}/{policy.pk}")
    assert deleted.status_code == 204 and deleted.content == b""
    assert not Document.objects.filter(pk=policy.pk).exists()
    assert not Chunk.objects.filter(pk__in=chunks).exists()
    assert as_("operator").get(f"{BASE}/refund-policy/search", q="refund").json()[
        "results"] == []
    assert admin.delete(f"{DOCS}/{policy.pk}").status_code == 404
    assert admin.delete(f"{DOCS}/not-a-uuid").status_code == 404
    assert Event.objects.filter(kind="config.knowledge_deleted",
                                data__document=str(policy.pk)).exists()


def test_an_outsider_cannot_probe_and_a_reader_cannot_write(as_: Any) -> None:
    policy = _policy()
    calls = {
        "list search": lambda who, slug: who.get(f"{BASE}/{slug}/search", q="refund"),
        "add": lambda who, slug: who.post(f"{BASE}/{slug}/documents",
                                          {"title": "Probe", "text": "probe"}),
        "delete": lambda who, slug: who.delete(f"{BASE}/{slug}/documents/{policy.pk}"),
    }
    for name, call in calls.items():
        for who in ("outsider", "reviewer"):
            hidden, unknown = call(as_(who), "refund-policy"), call(as_(who), "no-such-thing")
            assert hidden.status_code == unknown.status_code == 404, (name, who)
            assert hidden.json() == unknown.json() == {"error": "no such knowledge collection"}
    assert calls["add"](as_("operator"), "refund-policy").status_code == 403
    assert calls["delete"](as_("operator"), "refund-policy").status_code == 403
    assert "may not change" in calls["add"](as_("operator"), "refund-policy").json()["error"]
    assert not Document.objects.filter(title="Probe").exists()
    assert Document.objects.filter(pk=policy.pk).exists()


BAD_DOCUMENTS = [
    ({"title": "Both", "text": "a", "url": "https://example.com/"},
     "exactly one of text, url or file"),
    ({"title": "Neither"}, "exactly one of text, url or file"),
    ({"title": "F", "file": "aGk=", "text": "a", "media_type": "text/plain"},
     "exactly one of text, url or file"),
    ({"title": "F", "file": "aGk="}, "media_type goes with file"),
    ({"title": "F", "text": "a", "media_type": "text/plain"}, "media_type goes with file"),
    ({"title": "F", "file": "aGk=", "media_type": "image/png"}, "media_type must be one of"),
    ({"title": "F", "file": "not base64!", "media_type": "text/plain"}, "file:"),
    ({"title": "F", "file": "/w==", "media_type": "text/plain"}, "not valid UTF-8"),
    ({"title": "F", "file": "JVBERi0xLjQKZ2FyYmFnZQ==", "media_type": "application/pdf"},
     "file:"),
    ({"title": "", "text": "a"}, "title"),
    ({"title": "T", "text": ""}, "text"),
    ({"title": "T", "text": "nul \x00 inside"}, "text"),
    ({"title": "   ", "text": "spaces only"}, "title"),
    ({"title": "T", "text": "   \n "}, "no text"),
    ({"title": "T", "text": 5}, "text"),
    ([], "invalid request"),
]


def test_a_bad_document_says_why_and_writes_nothing(as_: Any) -> None:
    admin, before = as_("admin"), Document.objects.count()
    for body, problem in BAD_DOCUMENTS:
        response = admin.post(DOCS, body)
        assert response.status_code == 400, (body, response.content)
        assert problem in response.json()["error"], (body, response.json())
    assert Document.objects.count() == before


def test_an_admin_uploads_html_and_pdf_files(as_: Any) -> None:
    """Uploaded files go through the same extractors as fetched ones: HTML loses its markup
    and scripts, a PDF gives its text; both are then searchable and cited like any text."""
    import base64

    from tests.test_knowledge import _tiny_pdf

    admin = as_("admin")
    html = (b"<html><head><script>alert(1)</script></head><body><h1>Returns</h1>"
            b"<p>Opened software cannot be returned after 14 days.</p></body></html>")
    created = admin.post(DOCS, {"title": "Software returns", "media_type": "text/html",
                                "file": base64.b64encode(html).decode()})
    assert created.status_code == 201, created.content
    [text] = Document.objects.get(pk=created.json()["id"]).versions.values_list("text",
                                                                                flat=True)
    assert "Opened software cannot be returned" in text and "alert" not in text
    pdf = admin.post(DOCS, {"title": "Gift cards", "media_type": "application/pdf",
                            "file": base64.b64encode(_tiny_pdf(
                                "Gift cards are never refunded in cash.")).decode()})
    assert pdf.status_code == 201, pdf.content
    found = admin.get(f"{BASE}/refund-policy/search", q="gift cards refunded in cash", k=3)
    top = found.json()["results"][0]
    assert top["title"] == "Gift cards" and "never refunded in cash" in top["text"]


def test_a_body_over_the_upload_limit_is_413_not_a_server_error(as_: Any,
                                                                settings: Any) -> None:
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 10_000
    before = Document.objects.count()
    refused = as_("admin").post(DOCS, {"title": "Big", "text": "x" * 20_000})
    assert refused.status_code == 413 and "larger than 10000 bytes" in refused.json()["error"]
    assert Document.objects.count() == before


def test_a_retried_add_with_the_same_key_is_done_once(as_: Any) -> None:
    admin = as_("admin")
    body = {"title": "Warranty", "text": "Two years on everything."}
    first = admin.post(DOCS, body, HTTP_IDEMPOTENCY_KEY="kb-1")
    second = admin.post(DOCS, body, HTTP_IDEMPOTENCY_KEY="kb-1")
    assert first.status_code == second.status_code == 201
    assert second["Idempotent-Replayed"] == "true" and second.json() == first.json()
    assert Event.objects.filter(kind="config.knowledge_ingested",
                                data__title="Warranty").count() == 1


# --- by URL -----------------------------------------------------------------------------------

PAGE = (b"<html><head><title>t</title><script>steal()</script></head><body><h1>Returns</h1>"
        b"<p>Returns are free within 30 days.</p></body></html>")


@pytest.fixture
def site() -> Iterator[str]:
    """A loopback web server: /page.html (HTML), /big (over the size limit), /moved (a
    redirect to a private address), /missing (404)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "http://10.1.2.3/inside")
                self.end_headers()
                return
            if self.path.split("?")[0] == "/page.html":
                status, kind, body = 200, "text/html; charset=utf-8", PAGE
            elif self.path == "/big":
                status, kind, body = 200, "text/plain", b"x" * (5 * 1024 * 1024 + 10)
            else:
                status, kind, body = 404, "text/plain", b"no"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_document_comes_from_a_url_with_its_html_extracted(as_: Any, site: str,
                                                             settings: Any) -> None:
    settings.SWITCHBOARD_KNOWLEDGE_FETCH_ALLOWED_HOSTS = ["127.0.0.1"]
    created = as_("admin").post(DOCS, {"title": "Returns page",
                                       "url": f"{site}/page.html?token=s3cr3t#top"})
    assert created.status_code == 201, created.content
    # The URL is kept without its query: a token in it never reaches the ledger.
    assert created.json()["source_url"] == f"{site}/page.html"
    assert not any("s3cr3t" in json.dumps(data) for data in Event.objects.filter(
        kind="config.knowledge_ingested").values_list("data", flat=True))
    doc = Document.objects.get(pk=created.json()["id"])
    text = doc.versions.get(number=1).text
    assert "Returns are free within 30 days." in text and "steal" not in text


@pytest.mark.parametrize("path, problem", [
    ("/big", "larger than"), ("/missing", "HTTP 404"), ("/moved", "10.1.2.3 is a private"),
])
def test_a_url_that_fails_is_refused_with_its_reason(as_: Any, site: str, settings: Any,
                                                     path: str, problem: str) -> None:
    settings.SWITCHBOARD_KNOWLEDGE_FETCH_ALLOWED_HOSTS = ["127.0.0.1"]
    response = as_("admin").post(DOCS, {"title": "Remote", "url": site + path})
    assert response.status_code == 422, response.content
    assert problem in response.json()["error"]
    assert not Document.objects.filter(title="Remote").exists()


INSIDE = [
    ("http://127.0.0.1:9/x", "127.0.0.1 is a loopback address"),
    ("http://[::1]/", "::1 is a loopback address"),
    ("http://10.0.0.8/", "10.0.0.8 is a private address"),
    ("http://192.168.1.1/admin", "192.168.1.1 is a private address"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
    ("http://0.0.0.0/", "0.0.0.0 is an unspecified address"),
    ("http://[::ffff:10.0.0.1]/", "10.0.0.1 is a private address"),
    ("http://localhost/", "is a loopback address"),
    ("file:///etc/passwd", "only http and https"), ("ftp://example.com/x", "only http and https"),
    ("http://user:pw@example.com/", "credentials"), ("http:///nohost", "no host"),
    ("http://example.com:99999/", "port"),
]


def test_a_url_reaching_inside_is_refused_before_any_connection(as_: Any) -> None:
    admin = as_("admin")
    for url, problem in INSIDE:
        response = admin.post(DOCS, {"title": "Inside", "url": url})
        assert response.status_code == 422, (url, response.content)
        assert problem in response.json()["error"], (url, response.json())
    assert not Document.objects.filter(title="Inside").exists()


def test_the_operations_are_in_the_openapi_schema(client: Client, db: Any) -> None:
    paths = client.get("/api/v1/openapi.json").json()["paths"]
    assert set(paths[BASE]) == {"get"}
    assert set(paths[f"{BASE}/{{slug}}/documents"]) == {"post"}
    assert set(paths[f"{BASE}/{{slug}}/search"]) == {"get"}
    assert set(paths[f"{BASE}/{{slug}}/documents/{{document_id}}"]) == {"delete"}
    post = paths[f"{BASE}/{{slug}}/documents"]["post"]
    assert {"201", "403", "404", "422"} <= set(post["responses"])
    assert any(p["name"] == "Idempotency-Key" for p in post["parameters"])


def test_a_collection_past_the_scan_limit_says_to_install_pgvector(as_: Any,
                                                                  settings: Any) -> None:
    from django.db import connection

    from knowledge import index

    if connection.vendor != "postgresql" or index._has_pgvector():
        pytest.skip("the exact scan serves PostgreSQL without pgvector (the distributed pass)")
    assert as_("admin").post(DOCS, {"title": "Vouchers", "text": "Vouchers last a year."}
                             ).status_code == 201  # two live chunks, one over the limit
    settings.SWITCHBOARD_KNOWLEDGE_SCAN_LIMIT = 1
    refused = as_("operator").get(f"{BASE}/refund-policy/search", q="refund")
    assert refused.status_code == 422 and "pgvector" in refused.json()["error"]
