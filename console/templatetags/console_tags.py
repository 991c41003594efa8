from __future__ import annotations

import json
from typing import Any

from django import template

register = template.Library()


@register.filter
def as_json(value: Any) -> str:
    """Compact JSON for display. Returns plain text: autoescaping still applies."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
