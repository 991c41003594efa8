"""The append-only ledger: one hash chain per run (chain id = run id), one per other named chain
(configuration changes), and one global chain over every event (see hashchain/__init__.py).

An event joins its own chain when it is appended and the global chain a little later, when
``audit.ledger.seal`` gives it its global position: until then gseq, gprev_hash and ghash are
NULL."""

from __future__ import annotations

from django.db import models
from django.db.models import Q


class ChainHead(models.Model):
    """The tip of one chain. Appends lock this row, so sequence numbers never race.

    The global chain's head is the row whose chain is ``audit.ledger.GLOBAL_CHAIN``: its ``seq``
    is the last ``gseq`` and its ``head_hash`` the last ``ghash``. Only ``seal`` locks it."""

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
    # The global chain: position among all events, and the link to the event before it. NULL
    # until the event is sealed (audit.ledger.seal), then never changed again. NULL rather than
    # "" for the hashes too: "not sealed" must not look like a value, and the check constraint
    # and the PostgreSQL trigger test all three columns the same way.
    gseq = models.PositiveBigIntegerField(unique=True, null=True)
    gprev_hash = models.CharField(max_length=64, null=True)  # noqa: DJ001
    ghash = models.CharField(max_length=64, null=True)  # noqa: DJ001

    class Meta:
        ordering = ["chain", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["chain", "seq"], name="audit_event_chain_seq_unique"),
            # Sealing fills the three global columns together; a row with only some of them is
            # a bug or tampering, never a state the ledger passes through.
            models.CheckConstraint(
                condition=(Q(gseq__isnull=True, gprev_hash__isnull=True, ghash__isnull=True)
                           | Q(gseq__isnull=False, gprev_hash__isnull=False,
                               ghash__isnull=False)),
                name="audit_event_sealed_whole"),
        ]
        indexes = [
            # seal() looks for unsealed events in id order on every sweep; this index holds only
            # those few rows, so the lookup stays cheap however long the ledger grows.
            models.Index(fields=["id"], condition=Q(gseq__isnull=True),
                         name="audit_event_unsealed"),
        ]

    def __str__(self) -> str:
        return f"{self.chain}#{self.seq} {self.kind}"

    def save(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not self._state.adding:
            raise ValueError("ledger events are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise ValueError("ledger events are append-only")
