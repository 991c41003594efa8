"""The append-only ledger: one hash chain per run (chain id = run id), one per other named chain
(configuration changes), and one global chain over every event (see audit/chain.py)."""

from __future__ import annotations

from django.db import models


class ChainHead(models.Model):
    """The tip of one chain. Appends lock this row, so sequence numbers never race.

    The global chain's head is the row whose chain is ``audit.ledger.GLOBAL_CHAIN``: its ``seq``
    is the last ``gseq`` and its ``head_hash`` the last ``ghash``."""

    chain = models.UUIDField(primary_key=True)
    seq = models.PositiveBigIntegerField(default=0)
    head_hash = models.CharField(max_length=64)

    def __str__(self) -> str:
        return f"{self.chain}@{self.seq}"


class Event(models.Model):
    chain = models.UUIDField(db_index=True)
    seq = models.PositiveBigIntegerField()
    kind = models.CharField(max_length=64, db_index=True)
    at = models.DateTimeField()
    actor = models.CharField(max_length=200)
    data = models.JSONField(default=dict)
    # The exact canonical JSON that was hashed; verification recomputes from these bytes.
    body = models.TextField()
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)
    # The global chain: position among all events, and the link to the event before it.
    gseq = models.PositiveBigIntegerField(unique=True)
    gprev_hash = models.CharField(max_length=64)
    ghash = models.CharField(max_length=64)

    class Meta:
        ordering = ["chain", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["chain", "seq"], name="audit_event_chain_seq_unique")
        ]

    def __str__(self) -> str:
        return f"{self.chain}#{self.seq} {self.kind}"

    def save(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not self._state.adding:
            raise ValueError("ledger events are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise ValueError("ledger events are append-only")
