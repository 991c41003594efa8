"""Tools and deterministic functions the demo processes use. Plain Python, no Django.

They are deterministic stand-ins for real systems (a vendor master, a sanctions list, an order
database, a payment rail, a mail relay): same input, same output, no network.
"""

from __future__ import annotations

import hashlib
import re
import threading
from typing import Any

from orchestration.engine import sandbox
from orchestration.engine.contracts import ToolRegistry

registry = ToolRegistry()

_OBJ = "object"


def _ref(prefix: str, *parts: str) -> str:
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:10]
    return f"{prefix}-{digest}"


# ---- vendor onboarding --------------------------------------------------------------------

SANCTIONED = {"acme shell co", "blocked trading ltd"}


@registry.tool(
    "validate_vendor",
    input_schema={
        "type": _OBJ, "additionalProperties": False,
        "required": ["name", "country", "iban", "email"],
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 200},
            "country": {"type": "string", "pattern": "^[A-Z]{2}$"},
            "iban": {"type": "string", "minLength": 15, "maxLength": 34},
            "email": {"type": "string", "pattern": "^[^@\\s]+@[^@\\s]+$"},
        },
    },
    output_schema={
        "type": _OBJ, "required": ["vendor_ref", "name"],
        "properties": {"vendor_ref": {"type": "string"}, "name": {"type": "string"}},
    },
)
def validate_vendor(name: str, country: str, iban: str, email: str) -> dict[str, Any]:
    """Normalise the vendor's details and give the application a reference."""
    clean = " ".join(name.split())
    return {"vendor_ref": _ref("VND", clean.lower(), country, iban), "name": clean}


@registry.tool(
    "check_sanctions",
    input_schema={
        "type": _OBJ, "additionalProperties": False, "required": ["name", "country"],
        "properties": {"name": {"type": "string"}, "country": {"type": "string"}},
    },
    output_schema={
        "type": _OBJ, "required": ["clear", "list"],
        "properties": {"clear": {"type": "boolean"}, "list": {"type": "string"}},
    },
)
def check_sanctions(name: str, country: str) -> dict[str, Any]:
    """Screen the vendor against the consolidated sanctions list."""
    return {"clear": name.lower() not in SANCTIONED, "list": "consolidated-2026-11"}


@registry.tool(
    "verify_bank_account",
    input_schema={
        "type": _OBJ, "additionalProperties": False, "required": ["iban"],
        "properties": {"iban": {"type": "string"}},
    },
    output_schema={
        "type": _OBJ, "required": ["valid", "bank"],
        "properties": {"valid": {"type": "boolean"}, "bank": {"type": "string"}},
    },
)
def verify_bank_account(iban: str) -> dict[str, Any]:
    """Check the IBAN's shape and its ISO 7064 mod-97 checksum."""
    compact = re.sub(r"\s+", "", iban).upper()
    valid = bool(re.fullmatch(r"[A-Z]{2}[0-9]{2}[A-Z0-9]{11,30}", compact))
    if valid:
        rearranged = compact[4:] + compact[:4]
        digits = "".join(str(int(ch, 36)) for ch in rearranged)
        valid = int(digits) % 97 == 1
    return {"valid": valid, "bank": compact[4:8] if valid else ""}


@registry.tool(
    "assess_risk",
    input_schema={
        "type": _OBJ, "additionalProperties": False,
        "required": ["sanctions_clear", "bank_valid", "country"],
        "properties": {
            "sanctions_clear": {"type": "boolean"},
            "bank_valid": {"type": "boolean"},
            "country": {"type": "string"},
        },
    },
    output_schema={
        "type": _OBJ, "required": ["score", "tier"],
        "properties": {"score": {"type": "integer"}, "tier": {"enum": ["low", "medium", "high"]}},
    },
)
def assess_risk(sanctions_clear: bool, bank_valid: bool, country: str) -> dict[str, Any]:
    """Combine the screening results into a risk tier."""
    score = 10 + (0 if sanctions_clear else 70) + (0 if bank_valid else 30)
    score += 0 if country in {"DE", "FR", "GB", "NL", "US", "IE"} else 15
    tier = "low" if score < 30 else "medium" if score < 60 else "high"
    return {"score": score, "tier": tier}


@registry.tool(
    "create_vendor_record",
    input_schema={
        "type": _OBJ, "additionalProperties": False, "required": ["vendor_ref", "name", "tier"],
        "properties": {
            "vendor_ref": {"type": "string"}, "name": {"type": "string"},
            "tier": {"type": "string"},
        },
    },
    output_schema={
        "type": _OBJ, "required": ["vendor_id", "status"],
        "properties": {"vendor_id": {"type": "string"}, "status": {"type": "string"}},
    },
)
def create_vendor_record(vendor_ref: str, name: str, tier: str) -> dict[str, Any]:
    """Create the vendor in the vendor master (on hold unless the tier is low)."""
    return {"vendor_id": vendor_ref.replace("VND", "V"),
            "status": "active" if tier == "low" else "on_hold"}


@registry.tool(
    "notify_procurement",
    input_schema={
        "type": _OBJ, "additionalProperties": False, "required": ["vendor_id", "status"],
        "properties": {"vendor_id": {"type": "string"}, "status": {"type": "string"}},
    },
    output_schema={
        "type": _OBJ, "required": ["message_id"],
        "properties": {"message_id": {"type": "string"}},
    },
)
def notify_procurement(vendor_id: str, status: str) -> dict[str, Any]:
    """Tell procurement the vendor is set up."""
    return {"message_id": _ref("MSG", vendor_id, status)}


# ---- refunds and customer service ---------------------------------------------------------

@registry.tool(
    "lookup_order",
    input_schema={
        "type": _OBJ, "additionalProperties": False, "required": ["order_id"],
        "properties": {"order_id": {"type": "string", "pattern": "^[A-Z0-9-]{3,40}$"}},
    },
    output_schema={
        "type": _OBJ,
        "required": ["order_id", "total", "currency", "status", "days_since_delivery"],
        "properties": {
            "order_id": {"type": "string"}, "total": {"type": "number"},
            "currency": {"type": "string"}, "status": {"type": "string"},
            "days_since_delivery": {"type": "integer"},
        },
    },
)
def lookup_order(order_id: str) -> dict[str, Any]:
    """Read an order from the order system."""
    seed = int(hashlib.sha256(order_id.encode()).hexdigest()[:8], 16)
    return {"order_id": order_id, "total": float(50 + seed % 9000), "currency": "EUR",
            "status": "delivered", "days_since_delivery": seed % 40}


@registry.tool(
    "lookup_refund_policy",
    input_schema={
        "type": _OBJ, "additionalProperties": False, "required": ["reason"],
        "properties": {"reason": {"type": "string"}},
    },
    output_schema={
        "type": _OBJ, "required": ["window_days", "max_without_review"],
        "properties": {"window_days": {"type": "integer"},
                       "max_without_review": {"type": "number"}},
    },
)
def lookup_refund_policy(reason: str) -> dict[str, Any]:
    """Return the refund policy that applies to a reason."""
    window = 60 if reason.lower() in {"damaged", "defective", "not delivered"} else 30
    return {"window_days": window, "max_without_review": 100.0}


@registry.tool(
    "issue_refund",
    input_schema={
        "type": _OBJ, "additionalProperties": False, "required": ["order_id", "amount"],
        "properties": {
            "order_id": {"type": "string"},
            "amount": {"type": "number", "exclusiveMinimum": 0, "maximum": 100000},
            "note": {"type": "string", "maxLength": 500},
        },
    },
    output_schema={
        "type": _OBJ, "required": ["refund_id", "amount"],
        "properties": {"refund_id": {"type": "string"}, "amount": {"type": "number"}},
    },
    idempotent=False,
)
def issue_refund(order_id: str, amount: float, note: str = "") -> dict[str, Any]:
    """Pay a refund to the customer's original payment method."""
    return {"refund_id": _ref("RF", order_id, f"{amount:.2f}"), "amount": amount}


@registry.tool(
    "send_customer_email",
    input_schema={
        "type": _OBJ, "additionalProperties": False, "required": ["to", "subject", "body"],
        "properties": {
            "to": {"type": "string", "pattern": "^[^@\\s]+@[^@\\s]+$"},
            "subject": {"type": "string", "maxLength": 200},
            "body": {"type": "string", "maxLength": 5000},
        },
    },
    output_schema={
        "type": _OBJ, "required": ["message_id"],
        "properties": {"message_id": {"type": "string"}},
    },
    idempotent=False,
)
def send_customer_email(to: str, subject: str, body: str) -> dict[str, Any]:
    """Send an email to a customer through the mail relay."""
    return {"message_id": _ref("MAIL", to, subject, body)}


@registry.tool(
    "classify_inquiry",
    input_schema={
        "type": _OBJ, "additionalProperties": False, "required": ["message"],
        "properties": {"message": {"type": "string", "maxLength": 10000}},
    },
    output_schema={
        "type": _OBJ, "required": ["intent"],
        "properties": {"intent": {"enum": ["order_status", "refund", "other"]}},
    },
)
def classify_inquiry(message: str) -> dict[str, Any]:
    """Classify what a customer is asking for."""
    text = message.lower()
    if "refund" in text or "money back" in text:
        return {"intent": "refund"}
    if "where" in text or "order" in text or "deliver" in text:
        return {"intent": "order_status"}
    return {"intent": "other"}


@registry.tool(
    "draft_reply",
    input_schema={
        "type": _OBJ, "additionalProperties": False, "required": ["intent", "order"],
        "properties": {"intent": {"type": "string"}, "order": {"type": "object"}},
    },
    output_schema={
        "type": _OBJ, "required": ["subject", "body"],
        "properties": {"subject": {"type": "string"}, "body": {"type": "string"}},
    },
)
def draft_reply(intent: str, order: dict[str, Any]) -> dict[str, Any]:
    """Write a reply from a template for the inquiry's intent."""
    oid = order.get("order_id", "")
    if intent == "order_status":
        body = f"Your order {oid} is {order.get('status', 'in progress')}."
    elif intent == "refund":
        body = f"We have received your refund request for order {oid}."
    else:
        body = "Thank you for your message; a colleague will reply shortly."
    return {"subject": f"About your order {oid}".strip(), "body": body}


@registry.tool(
    "decide_refund",
    input_schema={
        "type": _OBJ, "additionalProperties": False, "required": ["requested", "order", "policy"],
        "properties": {
            "requested": {"type": "number"}, "order": {"type": "object"},
            "policy": {"type": "object"},
        },
    },
    output_schema={
        "type": _OBJ, "required": ["approve", "amount", "reason"],
        "properties": {"approve": {"type": "boolean"}, "amount": {"type": "number"},
                       "reason": {"type": "string"}},
    },
)
def decide_refund(requested: float, order: dict[str, Any],
                  policy: dict[str, Any]) -> dict[str, Any]:
    """Apply the refund policy: the order must be delivered and inside the refund window."""
    in_window = int(order.get("days_since_delivery", 0)) <= int(policy.get("window_days", 30))
    approve = in_window and order.get("status") == "delivered" and requested > 0
    reason = "within policy" if approve else "outside the refund window"
    return {"approve": approve, "amount": float(requested), "reason": reason}


# ---- knowledge -----------------------------------------------------------------------------

_HIT = {
    "type": _OBJ,
    "required": ["chunk_id", "document_id", "title", "version", "ordinal", "text", "score",
                 "citation"],
    "properties": {
        "chunk_id": {"type": "string"}, "document_id": {"type": "string"},
        "title": {"type": "string"}, "version": {"type": "integer"},
        "ordinal": {"type": "integer"}, "text": {"type": "string"},
        "score": {"type": "number"}, "citation": {"type": "string"},
    },
}


@registry.tool(
    "search_knowledge",
    input_schema={
        "type": _OBJ, "additionalProperties": False, "required": ["collection", "query"],
        "properties": {
            "collection": {"type": "string", "pattern": "^[-a-zA-Z0-9_]{1,50}$"},
            "query": {"type": "string", "minLength": 1, "maxLength": 1000},
            "k": {"type": "integer", "minimum": 1, "maximum": 20, "default": 5},
        },
    },
    output_schema={
        "type": _OBJ, "required": ["collection", "results"],
        "properties": {"collection": {"type": "string"},
                       "results": {"type": "array", "items": _HIT}},
    },
    timeout_s=30.0,
)
def search_knowledge(collection: str, query: str, k: int = 5, *,
                     caller: str = "") -> dict[str, Any]:
    """Search a knowledge collection (by its slug) for the passages that best answer a query.
    Each result has the passage's text, its document's title and version, a score, and a
    citation id: cite the passages you rely on by their citation ids."""
    # Django-side (the collection's grants are the caller's); read at call time, so the
    # tools stay importable without Django configured.
    from orchestration.retrieval import search_as

    return search_as(caller, collection, query, k)


# ---- people --------------------------------------------------------------------------------

@registry.tool(
    "ask_human",
    input_schema={
        "type": _OBJ, "additionalProperties": False, "required": ["question"],
        "properties": {
            "question": {"type": "string", "minLength": 1, "maxLength": 4000},
            # Filled in by the gate with the person's answer (orchestration/rules.py); an
            # answer the agent wrote itself is replaced.
            "answer": {"type": "string", "maxLength": 20000},
        },
    },
    output_schema={
        "type": _OBJ, "required": ["answer"], "properties": {"answer": {"type": "string"}},
    },
)
def ask_human(question: str, answer: str = "") -> dict[str, Any]:
    """Ask a person a question and wait for the answer (the run waits until someone from the
    reviewers responds). Give only the question."""
    return {"answer": answer}


# ---- risky: code execution, only ever inside the sandbox ---------------------------------

@registry.tool(
    "run_python",
    input_schema={
        "type": _OBJ, "additionalProperties": False, "required": ["code"],
        "properties": {"code": {"type": "string", "maxLength": 20000}},
    },
    output_schema={
        "type": _OBJ, "required": ["exit_code", "stdout", "stderr"],
        "properties": {"exit_code": {"type": "integer"}, "stdout": {"type": "string"},
                       "stderr": {"type": "string"}},
    },
    timeout_s=10.0,
)
def run_python(code: str, *, cancel: threading.Event | None = None) -> dict[str, Any]:
    """Run a Python snippet (standard library only) in an isolated sandbox: no network, no
    access to the server's files or processes, 5 s and 256 MB. Refuses when no sandbox is
    available."""
    return sandbox.run_python(code, config=_sandbox_config(),
                              limits=sandbox.Limits(timeout_s=5.0, memory_mb=256), cancel=cancel)


def _sandbox_config() -> sandbox.SandboxConfig:
    # Read at call time, so the tools stay importable without Django configured.
    from django.conf import settings

    return sandbox.SandboxConfig(bwrap=settings.SWITCHBOARD_SANDBOX_BWRAP,
                                 uid=settings.SWITCHBOARD_SANDBOX_UID,
                                 gid=settings.SWITCHBOARD_SANDBOX_GID)
