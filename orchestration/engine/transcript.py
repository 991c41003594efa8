"""A model call's conversation as plain data, for keeping beside the ledger (which records only
its digest): the role and text of each message, the tool calls an assistant made and the call
a tool result answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from orchestration.engine.llm import Message


def conversation(messages: Sequence[Message]) -> list[dict[str, Any]]:
    return [{"role": m.role, "content": m.content, "tool_call_id": m.tool_call_id,
             "tool_calls": [c.to_dict() for c in m.tool_calls], "is_error": m.is_error}
            for m in messages]

