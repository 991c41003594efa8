"""Template filter: whether a user may read the ledger (console/ledger_views.py decides)."""

from __future__ import annotations

from typing import Any

from django import template

from console.ledger_views import can_read_ledger

register = template.Library()


@register.filter
def may_read_ledger(user: Any) -> bool:
    """For the nav: whether this person may open the ledger viewer."""
    return can_read_ledger(user)
