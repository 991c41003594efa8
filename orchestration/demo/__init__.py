"""Demo data: the processes, tools, agents and people `seed_demo` creates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).parent

EMAIL = {"type": "string", "pattern": "^[^@\\s]+@[^@\\s]+$", "maxLength": 254}

PROCESSES: list[dict[str, Any]] = [
    {
        "slug": "vendor-onboarding",
        "name": "Vendor onboarding",
        "pattern": "deterministic",
        "description": "Validate a new vendor, screen it, verify its bank account, "
                       "assess risk and create the vendor record.",
        "input_schema": {
            "type": "object", "additionalProperties": False,
            "required": ["name", "country", "iban", "email"],
            "properties": {
                "name": {"type": "string", "minLength": 1, "maxLength": 200},
                "country": {"type": "string", "pattern": "^[A-Z]{2}$"},
                "iban": {"type": "string", "minLength": 15, "maxLength": 34},
                "email": EMAIL,
            },
        },
        "example": {"name": "Northwind Traders", "country": "DE",
                    "iban": "DE89370400440532013000", "email": "ap@northwind.example"},
    },
    {
        "slug": "refund-exception",
        "name": "Refund exception",
        "pattern": "agent_workflow",
        "description": "Handle a refund outside the standard flow: check the order and the "
                       "policy, decide, pay, and tell the customer.",
        "input_schema": {
            "type": "object", "additionalProperties": False,
            "required": ["order_id", "amount", "reason", "customer_email"],
            "properties": {
                "order_id": {"type": "string", "pattern": "^[A-Z0-9-]{3,40}$"},
                "amount": {"type": "number", "exclusiveMinimum": 0, "maximum": 100000},
                "reason": {"type": "string", "minLength": 1, "maxLength": 500},
                "customer_email": EMAIL,
            },
        },
        "example": {"order_id": "ORD-1042", "amount": 40, "reason": "damaged",
                    "customer_email": "kim@example.com"},
    },
    {
        "slug": "customer-inquiry",
        "name": "Customer inquiry",
        "pattern": "autonomous_frontend",
        "description": "Answer a customer's message about an order.",
        "input_schema": {
            "type": "object", "additionalProperties": False,
            "required": ["customer_email", "message", "order_id"],
            "properties": {
                "customer_email": EMAIL,
                "message": {"type": "string", "minLength": 1, "maxLength": 10000},
                "order_id": {"type": "string", "pattern": "^[A-Z0-9-]{3,40}$"},
            },
        },
        "example": {"customer_email": "kim@example.com", "order_id": "ORD-1042",
                    "message": "Where is my order?"},
    },
]


def plan(slug: str) -> dict[str, Any]:
    return yaml.safe_load((HERE / f"{slug}.yaml").read_text())
