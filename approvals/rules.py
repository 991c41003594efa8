"""Which approval policy governs a call: the one rule production's matcher and replay share.

Django-free: it works on anything with a policy version's fields (``tool``, ``risk_class``,
``conditions``, ``required_approvals``, ``number``), a model row or a plain dataclass, so the
live matcher (approvals.services) and replay (policies as they were) cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from approvals import conditions


class PolicyShape(Protocol):
    tool: str
    risk_class: str
    conditions: Any
    required_approvals: int
    number: int


def policy_matches(version: PolicyShape, tool: str, risk_class: str, arguments: Any) -> bool:
    """Whether ``version`` applies to this call: its tool and risk class (blank = any) and all
    of its argument conditions (approvals/conditions.py reads them)."""
    if version.tool and version.tool != tool:
        return False
    if version.risk_class and version.risk_class != risk_class:
        return False
    return all(conditions.holds(c, arguments) for c in version.conditions or [])


def strictest[V: PolicyShape](versions: Iterable[V]) -> V | None:
    """The winner among matching versions: most required approvals, then the higher version
    number; None when nothing matched."""
    return max(versions, key=lambda v: (v.required_approvals, v.number), default=None)


def strictest_match[V: PolicyShape](versions: Iterable[V], tool: str, risk_class: str,
                                    arguments: Any) -> V | None:
    """The strictest of ``versions`` that matches the call, or None."""
    return strictest(v for v in versions if policy_matches(v, tool, risk_class, arguments))


def is_upgrade(candidate: PolicyShape | None, *, same_version: bool,
               current_required: int) -> bool:
    """Whether edited arguments that match ``candidate`` move a request to it: only a different
    version that needs more approvals does; editing can never lower the bar."""
    if candidate is None or same_version:
        return False
    return candidate.required_approvals > current_required
