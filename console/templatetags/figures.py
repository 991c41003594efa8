"""Formatting for the console's figures: rates, money and waits."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

from django import template

register = template.Library()


@register.filter
def percent(value: float | None) -> str:
    """0.6667 -> "66.7%"; None (nothing to divide by) -> "—"."""
    return "—" if value is None else f"{value * 100:.1f}%"


@register.filter
def money(value: Decimal | float | None) -> str:
    """Cost with four decimals; None -> "—"."""
    return "—" if value is None else f"{Decimal(value):.4f}"


@register.filter
def ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


@register.filter
def wait(value: timedelta | None) -> str:
    """A duration as "1h 05m", "4m 10s" or "0s"."""
    if not value:
        return "0s"
    seconds = int(value.total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"
