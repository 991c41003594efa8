"""Signals orchestration sends. Receivers live in apps above it (console), so nothing here
imports them."""

from django.dispatch import Signal

# Sent by the sweeping process after each sweep (orchestration/sweep.py), outside any
# transaction: periodic housekeeping of other apps hangs off it (no beat to configure).
swept = Signal()
