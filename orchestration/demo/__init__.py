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


# Scripted agents: deterministic turns, so the demo runs offline. Token counts are what a real
# model of this size would report for these prompts; the price table turns them into cost.
AGENTS: list[dict[str, Any]] = [
    {
        "slug": "refund-investigator",
        "name": "Refund investigator",
        "instructions": "You investigate refund requests. Look up the order and the refund "
                        "policy, then state whether the refund fits the policy.",
        "tools": ["lookup_order", "lookup_refund_policy"],
        "script": [
            {"tool_calls": [
                {"name": "lookup_order", "arguments": {"order_id": "$input.order_id"}},
                {"name": "lookup_refund_policy", "arguments": {"reason": "$input.reason"}},
            ], "tokens_in": 412, "tokens_out": 58},
            {"text": "Order {{input.order_id}} was delivered and the request ({{input.reason}}) "
                     "is inside the policy window. A refund of {{input.amount}} fits.\n"
                     "```toml\nsummary = \"The order is eligible for the requested refund.\"\n"
                     "open_questions = []\n\n[key_facts]\norder_id = {{input.order_id|toml}}\n"
                     "amount = {{input.amount|toml}}\nreason = {{input.reason|toml}}\n```",
             "tokens_in": 655, "tokens_out": 96},
        ],
    },
    {
        "slug": "refund-executor",
        "name": "Refund executor",
        "instructions": "You issue refunds that an investigation supports, exactly as "
                        "requested, and report the refund reference.",
        "tools": ["issue_refund"],
        "script": [
            {"tool_calls": [
                {"name": "issue_refund", "arguments": {"order_id": "$input.order_id",
                                                        "amount": "$input.amount"}},
            ], "tokens_in": 380, "tokens_out": 41},
            {"text": "Refund {{last.refund_id}} of {{last.amount}} issued for order "
                     "{{input.order_id}}.\n```toml\nsummary = \"The refund was issued.\"\n"
                     "open_questions = []\n\n[key_facts]\nrefund_id = {{last.refund_id|toml}}\n"
                     "amount = {{last.amount|toml}}\n```", "tokens_in": 470, "tokens_out": 62},
        ],
    },
    {
        "slug": "customer-comms",
        "name": "Customer communications",
        "instructions": "You write short, clear emails to customers.",
        "tools": ["send_customer_email"],
        "script": [
            {"tool_calls": [
                {"name": "send_customer_email", "arguments": {
                    "to": "$input.customer_email", "subject": "Your refund",
                    "body": "We have refunded {{tasks.refund.key_facts.amount}} for order "
                            "{{input.order_id}} (refund {{tasks.refund.key_facts.refund_id}}). "
                            "It will reach your account within 5 working days."}},
            ], "tokens_in": 350, "tokens_out": 72},
            {"text": "The customer has been told about the refund.", "tokens_in": 440,
             "tokens_out": 14},
        ],
    },
    {
        "slug": "frontdesk",
        "name": "Front desk",
        "instructions": "You answer customers' questions about their orders. Look up what you "
                        "need, then reply by email.",
        "tools": ["lookup_order", "send_customer_email"],
        "script": [
            {"tool_calls": [
                {"name": "lookup_order", "arguments": {"order_id": "$input.order_id"}},
            ], "tokens_in": 390, "tokens_out": 35},
            {"tool_calls": [
                {"name": "send_customer_email", "arguments": {
                    "to": "$input.customer_email", "subject": "About order {{input.order_id}}",
                    "body": "Your order {{last.order_id}} is {{last.status}}."}},
            ], "tokens_in": 520, "tokens_out": 64},
            {"text": "I told the customer that order {{input.order_id}} is delivered.",
             "tokens_in": 610, "tokens_out": 22},
        ],
    },
]

# The audit agent: reads what a task produced and checks it against the task's acceptance
# criteria. It holds no tools.
AGENTS.append({
    "slug": "qc-auditor",
    "name": "QC auditor",
    "instructions": "You audit other agents' work against acceptance criteria and say how "
                    "confident you are. You never take actions.",
    "tools": [],
    "script": [
        {"text": '{"criteria": [{"criterion": "The order exists and was delivered", '
                 '"pass": true, "evidence": "lookup_order reports the order delivered"}, '
                 '{"criterion": "The request is inside the policy window", "pass": true, '
                 '"evidence": "the policy lookup puts the request inside its window"}], '
                 '"confidence": 0.92}', "tokens_in": 720, "tokens_out": 88},
    ],
})

MODEL_NAME = "scripted-demo"
# Per million tokens, so scripted runs show what a comparable hosted model would cost.
PRICES = {"input_per_mtok": "3.00", "output_per_mtok": "15.00"}


# Refunds above 100 need a reviewer; above 1000, two reviewers, and an unanswered request
# goes to the admins after its deadline.
POLICIES: list[dict[str, Any]] = [
    {"slug": "refund-over-100", "name": "Refunds over 100", "tool": "issue_refund",
     "conditions": [{"arg": "amount", "op": ">", "value": 100}], "required": 1,
     "deadline_minutes": 240, "on_expiry": "reject"},
    {"slug": "refund-over-1000", "name": "Refunds over 1000", "tool": "issue_refund",
     "conditions": [{"arg": "amount", "op": ">", "value": 1000}], "required": 2,
     "deadline_minutes": 240, "on_expiry": "escalate"},
]
