"""Handoff envelopes: what one task passes to the next, as TOML, instead of its history.

An envelope holds a summary, key facts, artefacts and open questions. It is validated when it
is written and again when the receiving task reads it.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import tomli_w

from jsonkit import schema_problems
from orchestration.engine.errors import EngineError

MAX_SUMMARY = 600

ENVELOPE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["summary"],
    "additionalProperties": False,
    "properties": {
        "summary": {"type": "string", "minLength": 1, "maxLength": MAX_SUMMARY},
        "key_facts": {
            "type": "object",
            "additionalProperties": {"type": ["string", "number", "boolean"]},
        },
        "artefacts": {"type": "array", "items": {"type": "string"}},
        "open_questions": {"type": "array", "items": {"type": "string"}},
        # What the answer rests on: knowledge chunks' citation ids (engine/knowledge.py).
        "citations": {"type": "array", "items": {"type": "string", "maxLength": 200},
                      "maxItems": 50},
    },
}
_VALIDATOR = jsonschema.Draft202012Validator(ENVELOPE_SCHEMA)
_TOML_BLOCK = re.compile(r"```toml\s*\n(.*?)```", re.DOTALL)


class HandoffError(EngineError):
    """A handoff envelope is not valid TOML or breaks the envelope schema."""


@dataclass(slots=True)
class Envelope:
    summary: str
    key_facts: dict[str, Any] = field(default_factory=dict)
    artefacts: list[str] = field(default_factory=list)
    open_questions: list[str] = field(default_factory=list)
    citations: list[str] = field(default_factory=list)

    def to_toml(self) -> str:
        data: dict[str, Any] = {"summary": self.summary}
        if self.key_facts:
            data["key_facts"] = self.key_facts
        if self.artefacts:
            data["artefacts"] = self.artefacts
        if self.open_questions:
            data["open_questions"] = self.open_questions
        if self.citations:
            data["citations"] = self.citations
        text = tomli_w.dumps(data)
        parse_envelope(text)  # never hand on what the receiver would reject
        return text


def parse_envelope(text: str, *, source: str = "handoff") -> Envelope:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise HandoffError(f"{source} envelope is not valid TOML: {exc}") from None
    problems = schema_problems(_VALIDATOR, data, limit=1)
    if problems:
        raise HandoffError(f"{source} envelope is invalid at {problems[0].at()}: "
                           f"{problems[0].message}")
    return Envelope(summary=data["summary"], key_facts=dict(data.get("key_facts", {})),
                    artefacts=list(data.get("artefacts", [])),
                    open_questions=list(data.get("open_questions", [])),
                    citations=list(data.get("citations", [])))


def extract_block(text: str) -> str | None:
    """The TOML block of a final answer, if the agent wrote one."""
    match = _TOML_BLOCK.search(text)
    return match.group(1) if match else None


def summarise(text: str, limit: int = MAX_SUMMARY) -> str:
    """Extractive summary: whole leading sentences that fit within the limit."""
    clean = " ".join(text.split())
    if not clean:
        return "(no answer text)"
    sentences = re.split(r"(?<=[.!?])\s+", clean)
    out = ""
    for sentence in sentences:
        candidate = f"{out} {sentence}".strip()
        if len(candidate) > limit:
            break
        out = candidate
    return out or clean[: limit - 1] + "…"


def _scalar_facts(value: Any, prefix: str = "", out: dict[str, Any] | None = None,
                  limit: int = 20) -> dict[str, Any]:
    out = {} if out is None else out
    if isinstance(value, Mapping):
        for k, v in value.items():
            if len(out) >= limit:
                break
            _scalar_facts(v, f"{prefix}{k}" if not prefix else f"{prefix}.{k}", out, limit)
    elif isinstance(value, (str, int, float, bool)) and prefix and len(out) < limit:
        out[prefix] = value if not isinstance(value, str) else value[:200]
    return out


def envelope_for_output(task_key: str, output: Any) -> Envelope:
    """An envelope for a task that did not write one (a tool or a deterministic function)."""
    if isinstance(output, Mapping) and isinstance(output.get("handoff"), str):
        return parse_envelope(output["handoff"], source=f"task {task_key!r}")
    facts = _scalar_facts(output)
    return Envelope(summary=f"Output of {task_key}.", key_facts=facts)
