"""Redaction catches a secret in the forms it travels in, not only verbatim: base64 (either
alphabet, padded or not, inside the base64 of a longer text at any alignment), hex and
percent-encoding; in keys and values at any depth; and a run whose tool hands back an encoded
credential shows no trace of it in the run, the API or the ledger export."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import override_settings
from guardian.shortcuts import assign_perm

from orchestration import services
from orchestration.engine import agent
from orchestration.engine.redaction import REDACTED, redact, variants
from orchestration.models import Agent, Process, Tool
from tests.conftest import TEST_CRM_SECRET, wait_for_run

SECRET = "sk-demo/Key+42=ok&more"  # characters every encoding treats specially

ENCODINGS: dict[str, Callable[[bytes], str]] = {
    "raw": lambda b: b.decode(),
    "base64": lambda b: base64.b64encode(b).decode(),
    "base64, no padding": lambda b: base64.b64encode(b).decode().rstrip("="),
    "base64url": lambda b: base64.urlsafe_b64encode(b).decode(),
    "base64url, no padding": lambda b: base64.urlsafe_b64encode(b).decode().rstrip("="),
    "hex": lambda b: b.hex(),
    "HEX": lambda b: b.hex().upper(),
    "quote": lambda b: quote(b.decode(), safe=""),
    "quote, / kept": lambda b: quote(b.decode()),
    "quote_plus": lambda b: quote_plus(b.decode()),
    "quote, lower-case escapes": lambda b: re.sub(r"%[0-9A-F]{2}", lambda m: m[0].lower(),
                                                  quote(b.decode(), safe="")),
    "quote, mixed-case escapes": lambda b: quote(b.decode(), safe="").replace("%2F", "%2f"),
}


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_each_encoding_of_a_secret_inside_a_longer_string_is_redacted(encoding: str) -> None:
    encoded = ENCODINGS[encoding](SECRET.encode())
    assert encoded and encoded != SECRET or encoding == "raw"
    text = f"before {encoded} after"
    assert redact(text, [SECRET]) == f"before {REDACTED} after"


@pytest.mark.parametrize("encoding", [e for e in ENCODINGS if e.startswith("base64")])
@pytest.mark.parametrize("lead", range(6))
@pytest.mark.parametrize("tail", range(3))
def test_the_base64_of_a_longer_text_holding_the_secret_is_redacted(
    encoding: str, lead: int, tail: int
) -> None:
    """Whatever the secret's offset modulo 3 in the text, the characters that encode it go."""
    text = b"X" * lead + b'{"Authorization": "Bearer ' + SECRET.encode() + b'"}' + b"Y" * tail
    encoded = ENCODINGS[encoding](text)
    assert SECRET not in encoded  # only the encoding is there to find
    redacted = redact(f"blob={encoded};", [SECRET])
    assert REDACTED in redacted
    decoded = _decode_fragments(redacted)
    assert SECRET.encode()[:6] not in decoded and SECRET.encode()[-6:] not in decoded


def _decode_fragments(text: str) -> bytes:
    """What someone could decode from the pieces of base64 left around the redaction."""
    out = b""
    for piece in text.replace("blob=", "").rstrip(";").split(REDACTED):
        piece = piece.replace("-", "+").replace("_", "/").rstrip("=")
        for start in range(4):
            chunk = piece[start:]
            chunk = chunk[: len(chunk) - len(chunk) % 4]
            out += base64.b64decode(chunk) if chunk else b""
    return out


def test_keys_values_and_nesting_are_redacted_and_other_values_kept() -> None:
    b64 = base64.b64encode(SECRET.encode()).decode()
    value = {f"token {SECRET}": [{"auth": f"Basic {b64}"}, (SECRET.encode().hex(), 7)],
             "count": 3, "ok": True, "none": None}
    assert redact(value, [SECRET]) == {
        f"token {REDACTED}": [{"auth": f"Basic {REDACTED}"}, (REDACTED, 7)],
        "count": 3, "ok": True, "none": None}


def test_nothing_changes_without_secrets_and_short_encodings_are_not_cut() -> None:
    value = {"a": ["text", 1]}
    assert redact(value, []) is value
    assert redact(value, [""]) is value
    # "ab" is 6162 in hex and YWI in base64: far too common to cut out of text.
    assert variants("ab") == {"ab"}
    assert redact("6162 YWI ab", ["ab"]) == f"6162 YWI {REDACTED}"


def test_the_forms_are_worked_out_once_per_set_of_secrets() -> None:
    secrets = [SECRET, "second-secret-value-123"]
    big = {"rows": ["nothing to see here " * 50] * 200}
    redact(big, secrets)
    started = time.perf_counter()
    for _ in range(20):
        redact(big, secrets)
    per_call = (time.perf_counter() - started) / 20
    assert per_call < 0.05, f"{per_call * 1000:.1f} ms for 200 kB"


def test_the_agent_loop_uses_this_redaction() -> None:
    assert agent.redact is redact


# ---- through a run ---------------------------------------------------------------------------

class _EncodesAuth(BaseHTTPRequestHandler):
    """A tool server that hands the credential back, encoded every way but verbatim."""

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        reply = json.dumps(_encoded_reply(token)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


def _encoded_reply(token: str) -> dict[str, str]:
    wrapped = b'{"user": "kim", "token": "' + token.encode() + b'"}'
    return {
        "base64": base64.b64encode(token.encode()).decode(),
        "wrapped": base64.b64encode(wrapped).decode(),
        "hex": token.encode().hex(),
        "url": f"https://example.test/cb?t={quote_plus(token)}",
        base64.urlsafe_b64encode(token.encode()).decode(): "as a key",
    }


@pytest.fixture
def encoding_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EncodesAuth)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()


def _traces(text: str, secret: str) -> list[str]:
    """Forms of ``secret`` found in ``text``: what the tool server sent, each encoding worked
    out here independently, and the redaction's own list."""
    sent = _encoded_reply(secret)
    forms = {secret, sent["wrapped"], sent["url"], *(sent[k] for k in ("base64", "hex"))}
    forms |= {encode(secret.encode()) for encode in ENCODINGS.values()}
    forms |= {k for k, v in sent.items() if v == "as a key"}
    return sorted(form for form in forms | variants(secret) if form in text)


@pytest.mark.django_db(transaction=True)
def test_a_run_whose_tool_returns_the_encoded_credential_shows_no_trace_of_it(
    runner: None, api: Any, operator: User, encoding_server: int, tmp_path: Path
) -> None:
    """In the distributed pass the Celery worker holds the credential (from its environment)."""
    secret = TEST_CRM_SECRET
    Tool.objects.create(
        slug="crm_token", name="CRM token", kind=Tool.Kind.HTTP, http_method="POST",
        url_template=f"http://127.0.0.1:{encoding_server}/token", credential_ref="crm",
        timeout_s=5, input_schema={"type": "object"}, output_schema={"type": "object"})
    user = User.objects.create(username="agent-token-reader")
    reader = Agent.objects.create(
        slug="token-reader", name="Token reader", user=user, provider="scripted",
        model_name="scripted-demo", model_params={"script": [
            {"tool_calls": [{"name": "crm_token", "arguments": {}}]},
            {"text": "Token {{last.base64}} wrapped {{last.wrapped}} hex {{last.hex}}"}]})
    assign_perm("orchestration.invoke_tool", user, Tool.objects.get(slug="crm_token"))
    process = Process.objects.create(slug="token", name="Token", pattern="agent_workflow")
    services.process_publish(process=process, input_schema={"type": "object"}, plan={
        "tasks": [{"key": "read", "title": "Read",
                   "executor": {"type": "agent", "ref": reader.slug}}]})

    with override_settings(SWITCHBOARD_CREDENTIALS={"crm": secret}):
        created = api.post("/api/v1/runs", {"process": "token", "input": {}})
        assert created.status_code == 201, created.content
        run = wait_for_run(created.json()["id"])
    assert run.status == "succeeded", run.error

    result = json.dumps(run.result)
    assert REDACTED in result  # the tool's answer is there, with the credential cut out
    assert "as a key" in result
    assert _traces(result, secret) == []
    answer = api.get(f"/api/v1/runs/{run.pk}")
    events = api.get(f"/api/v1/runs/{run.pk}/events?after=0")
    assert answer.status_code == events.status_code == 200
    for body in (answer.content.decode(), events.content.decode()):
        assert REDACTED in body
        assert _traces(body, secret) == []
    export = tmp_path / "run.jsonl"
    call_command("audit_export", run=str(run.pk), output=str(export), stdout=io.StringIO())
    ledger = export.read_text()
    assert '"tool.called"' in ledger and REDACTED in ledger
    assert _traces(ledger, secret) == []
