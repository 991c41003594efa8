"""Signals orchestration sends. Receivers live in apps above it (console), so nothing here
imports them."""

from django.dispatch import Signal

# Sent by the sweeping process after each sweep (orchestration/sweep.py), outside any
# transaction: periodic housekeeping of other apps hangs off it (no beat to configure).
swept = Signal()

# Sent by ``seed_demo`` inside its transaction, once the demo's people, tools, agents and
# processes exist: apps above orchestration add their own demo data (the knowledge base's
# refund policy collection).
demo_seeded = Signal()
