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
    {
        "slug": "contract-review",
        "name": "Contract review",
        "pattern": "autonomous_frontend",
        "description": "A planner splits a contract review into clause checks by specialists "
                       "and a legal sign-off by a person; large contracts' plans are reviewed "
                       "first.",
        "input_schema": {
            "type": "object", "additionalProperties": False,
            "required": ["contract_text", "counterparty", "value"],
            "properties": {
                "contract_text": {"type": "string", "minLength": 1, "maxLength": 100000},
                "counterparty": {"type": "string", "minLength": 1, "maxLength": 200},
                "value": {"type": "number", "minimum": 0},
                "force_low_confidence": {"type": "boolean"},
            },
        },
        "example": {"contract_text": "9.1 Liability is limited to the fees paid in the 12 "
                                     "months before the claim. 14.2 Either party may end this "
                                     "agreement with 90 days' written notice.",
                    "counterparty": "Northwind Traders", "value": 25000},
    },
]

# Each example is also its input schema's `examples` annotation (JSON Schema 2020-12): what the
# console's start form offers to fill in.
for _spec in PROCESSES:
    _spec["input_schema"]["examples"] = [_spec["example"]]


def plan(slug: str) -> dict[str, Any]:
    return yaml.safe_load((HERE / f"{slug}.yaml").read_text())


# The knowledge base's demo collection: the refund policy the front desk answers from
# (created by the knowledge app when seed_demo runs; a new version of the document changes the
# front desk's next answer).
KNOWLEDGE_SLUG = "refund-policy"
REFUND_POLICY_TITLE = "Refund policy"
REFUND_POLICY = (
    "Refunds are accepted within 30 days of delivery for any reason, and within 60 days for "
    "damaged or defective items. Refunds up to 100 EUR are paid without review; larger refunds "
    "need a reviewer's approval, and refunds over 1000 EUR need two. A refund goes back to the "
    "original payment method within 5 working days of its approval. Orders that were never "
    "delivered are refunded in full once the carrier confirms the loss.")

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
        "instructions": "You answer customers' questions about their orders. Read the "
                        "refund policy in the knowledge base (search_knowledge, collection "
                        "refund-policy), hand the looking up to the order desk, then reply by "
                        "email. Cite the policy passage you rely on by its citation id.",
        "tools": ["send_customer_email", "search_knowledge"],
        "script": [
            {"tool_calls": [
                {"name": "search_knowledge", "arguments": {
                    "collection": KNOWLEDGE_SLUG, "query": "refund policy {{input.message}}",
                    "k": 3}},
                {"name": "delegate_to_order-desk", "arguments": {
                    "task": "Look up order {{input.order_id}} and report its status.",
                    "context": "The customer wrote: {{input.message}}",
                    "acceptance": ["The order's status comes from the order system"]}},
            ], "tokens_in": 390, "tokens_out": 48},
            {"tool_calls": [
                {"name": "send_customer_email", "arguments": {
                    "to": "$input.customer_email", "subject": "About order {{input.order_id}}",
                    "body": "Your order {{last.key_facts.order_id}} is "
                            "{{last.key_facts.status}}."}},
            ], "tokens_in": 520, "tokens_out": 64},
            # The answer quotes the policy passage the search found, so a new version of
            # the policy document changes the next run's answer, and cites it.
            {"text": "I told the customer that order {{input.order_id}} is delivered. Our "
                     "refund policy says: {{tools.search_knowledge.results.0.text|sentence}} "
                     "{{tools.search_knowledge.results.0.citation}}\n```toml\nsummary = "
                     "\"The customer was told the order's status.\"\nopen_questions = []\n"
                     "citations = [{{tools.search_knowledge.results.0.citation|toml}}]\n```",
             "tokens_in": 610, "tokens_out": 40},
        ],
    },
    {
        "slug": "order-desk",
        "name": "Order desk",
        "instructions": "You look orders up for the front desk and report what you found. "
                        "You never write to customers.",
        "tools": ["lookup_order"],
        "script": [
            {"tool_calls": [
                {"name": "lookup_order", "arguments": {"order_id": "$input.order_id"}},
            ], "tokens_in": 260, "tokens_out": 30},
            {"text": "Order {{last.order_id}} is {{last.status}}.\n```toml\nsummary = "
                     "\"The order system has the order.\"\nopen_questions = []\n\n"
                     "[key_facts]\norder_id = {{last.order_id|toml}}\n"
                     "status = {{last.status|toml}}\n```", "tokens_in": 330, "tokens_out": 40},
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


# contract-review: the planner, two clause specialists and their auditor. The planner's first
# proposal gives a specialist a tool it is not granted (validation sends it back); the auditor
# fails the liability check's first answer (one rework), and answers with low confidence on
# the termination check when the run's input sets "force_low_confidence".
def _facts(summary: str, **facts: str) -> str:
    lines = "".join(f'{k} = "{v}"\n' for k, v in facts.items())
    return f'```toml\nsummary = "{summary}"\nopen_questions = []\n\n[key_facts]\n{lines}```'


CLAUSE = {"type": "object", "required": ["clause", "risk"],
          "properties": {"clause": {"type": "string", "minLength": 1},
                         "risk": {"enum": ["low", "medium", "high"]}}}
CONTRACT_TASKS: list[dict[str, Any]] = [
    {"key": "liability", "title": "Check the liability clause",
     "executor": {"type": "agent", "ref": "clause-liability"}, "tools": [],
     "spec": "Quote the liability clause and state the cap on liability.",
     "acceptance": ["The liability clause is quoted", "The cap on liability is stated"],
     "output_schema": CLAUSE, "budget": {"cost": "0.2"}},
    {"key": "termination", "title": "Check the termination clause",
     "executor": {"type": "agent", "ref": "clause-termination"}, "tools": [],
     "spec": "Quote the termination clause and state the notice period.",
     "acceptance": ["The termination clause is quoted", "The notice period is stated"],
     "output_schema": CLAUSE, "budget": {"cost": "0.2"}},
    {"key": "legal_signoff", "title": "Legal sign-off",
     "executor": {"type": "human", "ref": "reviewer"}, "depends_on": ["liability", "termination"],
     "spec": "Read the clause checks and decide whether to sign the contract.",
     "output_schema": {"type": "object", "required": ["decision"], "properties": {
         "decision": {"enum": ["sign", "do not sign"]}, "comments": {"type": "string"}}}},
]


def _plan_turn(tasks: list[dict[str, Any]], note: str) -> dict[str, Any]:
    import json

    body = json.dumps({"tasks": tasks, "result": {
        "signoff": "$tasks.legal_signoff.decision",
        "comments": "$tasks.legal_signoff.comments"}}, indent=1)
    return {"text": f"{note}\n```json\n{body}\n```", "tokens_in": 900, "tokens_out": 420}


def _audit(criteria: list[tuple[str, bool, str]], confidence: float) -> dict[str, Any]:
    import json

    return {"text": json.dumps({"criteria": [
        {"criterion": c, "pass": ok, "evidence": why} for c, ok, why in criteria],
        "confidence": confidence}), "tokens_in": 640, "tokens_out": 90}


_OVERREACH = [dict(CONTRACT_TASKS[0], tools=["lookup_order"]), *CONTRACT_TASKS[1:]]
LIABILITY_QUOTED = ("The liability clause is quoted", True, "clause 9.1 is quoted")
TERMINATION = [("The termination clause is quoted", True, "clause 14.2 is quoted"),
               ("The notice period is stated", True, "90 days")]
AGENTS += [
    {"slug": "contract-planner", "name": "Contract planner",
     "instructions": "You plan contract reviews: one task per clause to check, each done by "
                     "the specialist for it, then a legal sign-off by a person.",
     "tools": [],
     "script": [_plan_turn(_OVERREACH, "A first plan."),
                _plan_turn(CONTRACT_TASKS, "The plan, with no tools for the specialists.")]},
    {"slug": "clause-liability", "name": "Liability clause specialist",
     "instructions": "You read contracts' liability clauses and rate their risk.",
     "tools": [],
     "script": [
         {"text": "Clause 9.1 limits liability.\n" + _facts(
             "Liability is limited.", clause="9.1 Liability is limited", risk="low"),
          "tokens_in": 700, "tokens_out": 80},
         {"text": "Clause 9.1 caps liability at the fees of the prior 12 months.\n" + _facts(
             "Liability is capped at 12 months of fees.",
             clause="9.1 Liability is limited to the fees paid in the 12 months before the "
                    "claim", cap="fees of the prior 12 months", risk="low"),
          "tokens_in": 820, "tokens_out": 96}]},
    {"slug": "clause-termination", "name": "Termination clause specialist",
     "instructions": "You read contracts' termination clauses and rate their risk.",
     "tools": [],
     "script": [{"text": "Clause 14.2 allows termination on 90 days' notice.\n" + _facts(
         "Either party may terminate on 90 days' notice.",
         clause="14.2 Either party may end this agreement with 90 days' written notice",
         notice="90 days", risk="medium"), "tokens_in": 700, "tokens_out": 90}]},
    {"slug": "contract-auditor", "name": "Contract auditor",
     "instructions": "You audit clause checks against their acceptance criteria and say how "
                     "confident you are. You never take actions.",
     "tools": [],
     "script": [
         {"variants": [
             {"when": "task.liability", **_audit([LIABILITY_QUOTED, (
                 "The cap on liability is stated", False,
                 "the answer says liability is limited but not to what")], 0.9)},
             {"when": "input.force_low_confidence", **_audit(TERMINATION, 0.45)},
             _audit(TERMINATION, 0.9)]},
         _audit([LIABILITY_QUOTED, ("The cap on liability is stated", True,
                                    "fees of the prior 12 months")], 0.88)]},
]
