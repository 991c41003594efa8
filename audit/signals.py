"""Signals the ledger sends. Receivers live outside `audit`, so nothing here imports them."""

from django.dispatch import Signal

# Sent once the transaction that appended an event has committed, with keyword arguments
# chain (uuid.UUID), seq (int) and kind (str).
event_appended = Signal()
