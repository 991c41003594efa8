"""What the agent loop asks before it spends anything: budgets, quotas, approvals.

The engine defines the questions; the Django side answers them against the database (atomic
reservations, quota counters, approval requests). ``Ungoverned`` answers yes to everything,
for the engine's own tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol


@dataclass(slots=True)
class Usage:
    steps: int = 0
    tool_calls: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost: Decimal = Decimal("0")

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out

    def is_zero(self) -> bool:
        return not (self.steps or self.tool_calls or self.tokens_in or self.tokens_out
                    or self.cost)


@dataclass(frozen=True, slots=True)
class Gate:
    """An approval policy's answer for one call: allow (maybe with edited arguments), wait for
    people, or deny (the message goes back to the model as the tool result)."""

    action: str  # "allow" | "wait" | "deny"
    arguments: Any = None
    message: str = ""


ALLOW = Gate("allow")


class Governor(Protocol):
    def reserve(self, worst: Usage) -> str:
        """Reserve the worst case atomically across every budget that applies.
        Returns "" when it fits, else the reason (``budget_exhausted: ...``)."""
        ...

    def release(self, reserved: Usage) -> None:
        """Give back a reservation whose call never ran."""
        ...

    def admit(self, tool: Any, key: str) -> str:
        """Quota and rate-limit check for one call: "" or ``quota_exhausted: ...``."""
        ...

    def gate(self, tool: Any, arguments: Mapping[str, Any], key: str) -> Gate: ...

    def outcome_decision(self, key: str) -> str:
        """For a non-idempotent call of unknown outcome: "rerun", "reject" or "" (undecided)."""
        ...

    def stopped(self, tool: str | None = None, key: str = "") -> str:
        """Asked before every model call (``tool`` None) and tool call, and while a tool call runs:
        "" to go on, else why the work must stop, starting with its code: ``cancelled``,
        ``paused`` (a kill switch), ``agent_retired``."""
        ...

    def begin_model_call(self, worst: Usage) -> str:
        """Before a model call: ``stopped()``, then ``reserve(worst)`` unless it stopped; ""
        to go on, else the first's answer (nothing is held then)."""
        ...

    # The next call's checks, asked ahead: a step log that can run them does so in the
    # transaction that records the call before (one commit instead of two). ``stopped``,
    # ``reserve`` and ``begin_model_call`` then answer the matching call from what that
    # transaction read; anything else asks as usual. None: nothing to run ahead.
    def ahead_of_tool(self, tool: str, key: str, worst: Usage) -> Any:
        """The stop signals, grant and policies for tool call ``key``, and its reservation."""
        ...

    def ahead_of_model(self, worst: Usage) -> Any:
        """The stop signals and the reservation for the next model call."""
        ...

    def release_ahead(self) -> None:
        """Give back what was reserved ahead for a call that did not come (the loop ended,
        or went another way)."""
        ...


class Ungoverned:
    def reserve(self, worst: Usage) -> str:
        return ""

    def release(self, reserved: Usage) -> None:
        return None

    def admit(self, tool: Any, key: str) -> str:
        return ""

    def gate(self, tool: Any, arguments: Mapping[str, Any], key: str) -> Gate:
        return ALLOW

    def outcome_decision(self, key: str) -> str:
        return ""

    def stopped(self, tool: str | None = None, key: str = "") -> str:
        return ""

    def begin_model_call(self, worst: Usage) -> str:
        return ""

    def ahead_of_tool(self, tool: str, key: str, worst: Usage) -> Any:
        return None

    def ahead_of_model(self, worst: Usage) -> Any:
        return None

    def release_ahead(self) -> None:
        return None
