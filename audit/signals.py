"""Signals the ledger sends. Receivers live outside `audit`, so nothing here imports them."""

from django.dispatch import Signal

# Sent once the transaction that appended events has committed, once per chain, with keyword
# arguments chain (uuid.UUID), seq (int) and kind (str) of the newest event, and kinds
# (frozenset of str): every kind that transaction appended to the chain.
event_appended = Signal()
