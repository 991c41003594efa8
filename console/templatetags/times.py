"""``{{ value|when }}``: one way to show a moment on every page.

Date and time to the second in the reader's zone (console/time_zones.py activates it), with the
zone's abbreviation, in a ``<time>`` element whose ``datetime`` is the same moment in UTC
(ISO 8601): ``<time datetime="2026-12-06T09:14:52Z">2026-12-06 10:14:52 CET</time>``.
``{{ value|when:"time" }}`` leaves the date out (for times on a page about one day's run).
Nothing (None, "") renders as "", so ``|default:"never"`` still works after it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django import template
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

register = template.Library()

FORMATS = {"": "%Y-%m-%d %H:%M:%S %Z", "time": "%H:%M:%S %Z"}


@register.filter(is_safe=True)
def when(value: Any, part: str = "") -> SafeString | str:
    if value in (None, ""):
        return ""
    if not isinstance(value, datetime):
        raise template.TemplateSyntaxError(f"|when takes a datetime, not {type(value).__name__}")
    if part not in FORMATS:
        raise template.TemplateSyntaxError(f"|when:{part!r}: use |when or |when:\"time\"")
    if timezone.is_naive(value):
        value = timezone.make_aware(value, UTC)
    utc = value.astimezone(UTC).replace(microsecond=0)
    local = timezone.localtime(utc)
    return format_html('<time datetime="{}">{}</time>',
                       utc.isoformat().replace("+00:00", "Z"), local.strftime(FORMATS[part]))
