"""Console template helpers: JSON for display, lookups by key, and the banner of engaged kill
switches."""

from __future__ import annotations

import json
from typing import Any

from django import template

register = template.Library()


@register.filter
def as_json(value: Any) -> str:
    """Compact JSON for display. Returns plain text: autoescaping still applies."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


@register.filter
def get(mapping: Any, key: Any) -> Any:
    """``mapping[key]``, or None: for dictionaries keyed by something only known per row."""
    return mapping.get(key) if isinstance(mapping, dict) else None


@register.inclusion_tag("console/kill_switches.html")
def kill_switch_banner() -> dict[str, Any]:
    """Every engaged kill switch, on every page: people must see that work is stopped."""
    from orchestration.models import KillSwitch

    return {"switches": list(KillSwitch.objects.filter(released_at__isnull=True)
                             .select_related("engaged_by").order_by("engaged_at"))}
