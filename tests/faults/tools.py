"""Test tools registered by the wrapped worker and server processes (never by the app).

``fault_side_effect`` is NOT idempotent: every call appends one line to a counter file outside
the ledger, so a second execution of the same call shows up as a second line.
``fault_step`` is idempotent and counted the same way, so re-executions can be compared with
what the ledger says. Both sleep a little to widen the window in which a kill lands mid-call.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from orchestration.builtin_tools import registry
from orchestration.engine.contracts import ToolContract

COUNTER_DIR_ENV = "SWITCHBOARD_FAULT_COUNTER_DIR"
SIDE_EFFECTS = "side_effects.jsonl"
STEPS = "idempotent_steps.jsonl"
SIDE_EFFECT_TOOL = "fault_side_effect"
STEP_TOOL = "fault_step"


def _append(name: str, record: dict[str, Any]) -> None:
    directory = os.environ.get(COUNTER_DIR_ENV)
    if not directory:
        raise RuntimeError(f"{COUNTER_DIR_ENV} is not set")
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(Path(directory) / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line)  # one write on an O_APPEND descriptor: lines never interleave
    finally:
        os.close(fd)


def _record(name: str, nonce: str, task: str, idempotency_key: str | None) -> dict[str, Any]:
    record = {"nonce": nonce, "task": task, "key": idempotency_key or f"nonce:{nonce}:{task}",
              "run": (idempotency_key or "").split(":")[0], "pid": os.getpid(),
              "at": time.time()}
    _append(name, record)
    return record


def fault_side_effect(nonce: str, order_id: str, idempotency_key: str | None = None) -> dict:
    """Charge an order (a stand-in for a payment rail): not safe to call twice."""
    _record(SIDE_EFFECTS, nonce, "charge", idempotency_key)
    time.sleep(0.3)
    return {"ref": f"CH-{nonce}", "order_id": order_id}


def fault_step(nonce: str, step: str, idempotency_key: str | None = None) -> dict:
    """Settle the books: safe to repeat."""
    _record(STEPS, nonce, step, idempotency_key)
    time.sleep(0.4)
    return {"settled": step}


def register() -> None:
    """Add both tools to the engine's registry (safe to call twice)."""
    if SIDE_EFFECT_TOOL not in registry:
        registry.register(ToolContract(
            name=SIDE_EFFECT_TOOL, fn=fault_side_effect, timeout_s=None, idempotent=False,
            input_schema={"type": "object", "additionalProperties": False,
                          "required": ["nonce", "order_id"],
                          "properties": {"nonce": {"type": "string"},
                                         "order_id": {"type": "string"}}},
            output_schema={"type": "object", "required": ["ref"],
                           "properties": {"ref": {"type": "string"}}},
            description="Charge an order (fault tests): not idempotent, counted outside the "
                        "ledger."))
    if STEP_TOOL not in registry:
        registry.register(ToolContract(
            name=STEP_TOOL, fn=fault_step, timeout_s=None, idempotent=True,
            input_schema={"type": "object", "additionalProperties": False,
                          "required": ["nonce", "step"],
                          "properties": {"nonce": {"type": "string"},
                                         "step": {"type": "string"}}},
            output_schema={"type": "object", "required": ["settled"],
                           "properties": {"settled": {"type": "string"}}},
            description="Settle (fault tests): idempotent, counted outside the ledger."))


PROCESS_SLUG = "fault-charge"
PROCESS_PLAN: dict[str, Any] = {
    "tasks": [
        {"key": "order", "title": "Look the order up",
         "executor": {"type": "tool", "ref": "lookup_order"},
         "args": {"order_id": "$input.order_id"}},
        {"key": "policy", "title": "Read the refund policy",
         "executor": {"type": "tool", "ref": "lookup_refund_policy"},
         "depends_on": ["order"], "args": {"reason": "damaged"}},
        {"key": "charge", "title": "Charge (not idempotent)",
         "executor": {"type": "tool", "ref": SIDE_EFFECT_TOOL},
         "depends_on": ["order", "policy"],
         "args": {"nonce": "$input.nonce", "order_id": "$tasks.order.order_id"}},
        {"key": "settle", "title": "Settle (idempotent)",
         "executor": {"type": "tool", "ref": STEP_TOOL},
         "depends_on": ["charge"], "args": {"nonce": "$input.nonce", "step": "settle"}},
    ],
    "result": {"charge": "$tasks.charge.ref", "settled": "$tasks.settle.settled"},
}
PROCESS_INPUT_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["nonce", "order_id"],
    "properties": {"nonce": {"type": "string", "minLength": 1, "maxLength": 100},
                   "order_id": {"type": "string", "pattern": "^[A-Z0-9-]{3,40}$"}},
}
