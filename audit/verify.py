"""Verify the ledger: walk each chain and the global chain, compare them with their heads, and
say where each first breaks. Reads only; audit.ledger writes."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from audit.ledger import CONFIG_CHAIN, GLOBAL_CHAIN, unsealed_count
from audit.models import ChainHead, Event
from hashchain import GENESIS, chain_hash, global_hash

_CHUNK = 2000  # events read per query while walking a chain


@dataclass(frozen=True, slots=True)
class Verification:
    """The outcome for one chain (or the global chain): where it first breaks, and how."""

    chain: uuid.UUID
    events: int
    ok: bool
    broken_seq: int | None = None
    problem: str = ""
    # The global position of the event named by broken_seq, when known (and sealed).
    broken_gseq: int | None = None
    # Global chain only: events appended but not sealed yet, so not checked by it (yet).
    unsealed: int = 0

    def describe(self) -> str:
        if self.ok:
            pending = f"; {self.unsealed} not sealed yet" if self.unsealed else ""
            return f"{chain_label(self.chain)}: {self.events} events, intact{pending}"
        where = chain_label(self.chain)
        if self.broken_seq is not None:
            where += f" seq {self.broken_seq}"
        if self.broken_gseq is not None:
            where += f" (gseq {self.broken_gseq})"
        return f"{where}: {self.problem}"


def chain_label(chain: uuid.UUID) -> str:
    if chain == GLOBAL_CHAIN:
        return "global chain"
    if chain == CONFIG_CHAIN:
        return f"configuration chain {chain}"
    return f"chain {chain}"


_COLUMNS = ("chain", "seq", "kind", "at", "actor", "data", "body", "prev_hash", "hash", "gseq",
            "gprev_hash", "ghash")


Head = tuple[int, str]


def check_chain(chain: uuid.UUID, events: Iterable[Event], head: Head | None) -> Verification:
    """Walk one chain's events in seq order, then compare them with the chain head.

    ``head`` is read before the events: it must not record more events than are found (one was
    deleted) and its hash must be that of the event at its seq. Events past it are appends that
    committed meanwhile, unless the head, read again, still does not record them (forged)."""
    prev = GENESIS
    expected_seq = 1
    count = 0
    hash_at_head = GENESIS
    head_seq = head[0] if head else 0
    # A bad ghash is reported only if the chain itself holds: a rewritten event usually also
    # breaks the next event's prev_hash, and the run chain's own finding comes first.
    bad_ghash: Verification | None = None

    def broken(event: Event, problem: str) -> Verification:
        return Verification(chain, count, False, event.seq, problem, event.gseq)

    for event in events:
        count += 1
        if event.seq != expected_seq:
            what = "missing" if event.seq > expected_seq else "out of order or duplicated"
            return broken(event, f"sequence gap: expected seq {expected_seq}, found "
                                 f"{event.seq} (an event is {what})")
        if event.prev_hash != prev:
            return broken(event, "prev_hash link broken: it does not match the previous "
                                 "event's hash (an event was removed, inserted or reordered)")
        if chain_hash(prev, event.body) != event.hash:
            return broken(event, "hash mismatch: the hash does not match the recorded body")
        if (bad_ghash is None and event.gseq is not None
                and global_hash(event.gprev_hash or "", event.hash) != event.ghash):
            bad_ghash = broken(event, "global hash mismatch: ghash does not match gprev_hash "
                                      "and hash")
        try:
            body = json.loads(event.body)
        except json.JSONDecodeError:
            return broken(event, "body is not valid JSON")
        columns = {"chain": str(event.chain), "seq": event.seq, "kind": event.kind,
                   "actor": event.actor, "at": event.at.isoformat(), "data": event.data}
        for name, value in columns.items():
            if not isinstance(body, dict) or body.get(name) != value:
                return broken(event, f"column {name!r} differs from the hashed body")
        prev = event.hash
        if event.seq == head_seq:
            hash_at_head = event.hash
        expected_seq += 1
    now = _head(chain) if head is None or count > head_seq else head
    if now is None:
        if count:
            return Verification(chain, count, False, None,
                                "the chain head is missing (its row was deleted)")
        return Verification(chain, 0, True)  # never opened: nothing to check
    if now[0] < count:
        return Verification(chain, count, False, now[0] + 1,
                            f"event forged: the chain head records {now[0]} events but "
                            f"{count} exist")
    if head_seq > count:
        return Verification(chain, count, False, count + 1,
                            f"event missing: the chain head records {head_seq} events but "
                            f"{count} remain")
    if head is not None and head_seq and hash_at_head != head[1]:
        return Verification(chain, count, False, head_seq,
                            "the chain head's hash does not match the event at its seq")
    return bad_ghash or Verification(chain, count, True)


def _head(chain: uuid.UUID) -> Head | None:
    row = ChainHead.objects.filter(chain=chain).values_list("seq", "head_hash").first()
    return (row[0], row[1]) if row else None


def verify_chain(chain: uuid.UUID) -> Verification:
    """One chain (a run's, or CONFIG_CHAIN), streamed in seq order."""
    head = _head(chain)  # before the events: see check_chain
    events = Event.objects.filter(chain=chain).order_by("seq").only(*_COLUMNS)
    return check_chain(chain, events.iterator(chunk_size=_CHUNK), head)


def verify_chains() -> Iterator[Verification]:
    """Every chain but the global one, in one pass over the events in (chain, seq) order, merged
    with the chain heads in chain order. Yields one result per chain."""
    events = Event.objects.order_by("chain", "seq").only(*_COLUMNS).iterator(chunk_size=_CHUNK)
    heads = (ChainHead.objects.exclude(chain=GLOBAL_CHAIN).order_by("chain")
             .values_list("chain", "seq", "head_hash").iterator(chunk_size=_CHUNK))
    head = next(heads, None)  # the heads' query runs first: check_chain relies on that
    for chain, group in itertools.groupby(events, key=lambda e: e.chain):
        while head is not None and head[0] < chain:
            yield check_chain(head[0], (), (head[1], head[2]))
            head = next(heads, None)
        own = None
        if head is not None and head[0] == chain:
            own = (head[1], head[2])
            head = next(heads, None)
        yield check_chain(chain, group, own)
    while head is not None:
        yield check_chain(head[0], (), (head[1], head[2]))
        head = next(heads, None)


def verify_global() -> Verification:
    """The global chain over the sealed events: gseq gapless from 1, each gprev_hash the ghash
    before it, each ghash recomputed, and the global head (read first, as in check_chain) at
    its event. Event bodies are the run chains' job. Unsealed events are not part of it yet:
    they are counted in ``unsealed`` (call seal_all() first to cover every committed event)."""
    head = _head(GLOBAL_CHAIN)
    head_seq = head[0] if head else 0
    hash_at_head = GENESIS
    rows = (Event.objects.filter(gseq__isnull=False).order_by("gseq")
            .values_list("gseq", "chain", "seq", "hash", "gprev_hash", "ghash")
            .iterator(chunk_size=_CHUNK))
    prev = GENESIS
    expected = 1
    count = 0
    for gseq, chain, seq, event_hash, gprev_hash, ghash in rows:
        count += 1
        where = f" (the event is {chain_label(chain)} seq {seq})"
        if gseq != expected:
            return Verification(GLOBAL_CHAIN, count, False, None,
                                f"global sequence gap: expected gseq {expected}, found {gseq}; "
                                f"an event is missing{where}", gseq)
        if gprev_hash != prev:
            return Verification(GLOBAL_CHAIN, count, False, None,
                                "global order broken: gprev_hash does not match the ghash of "
                                f"gseq {gseq - 1}{where}", gseq)
        if global_hash(prev, event_hash) != ghash:
            return Verification(GLOBAL_CHAIN, count, False, None,
                                f"global hash mismatch: ghash does not match the event{where}",
                                gseq)
        if gseq == head_seq:
            hash_at_head = ghash
        prev = ghash
        expected += 1
    now = _head(GLOBAL_CHAIN) if head is None or count > head_seq else head
    if now is None:
        if count:
            return Verification(GLOBAL_CHAIN, count, False, None,
                                "the global chain head is missing (its row was deleted)")
        return Verification(GLOBAL_CHAIN, 0, True, unsealed=unsealed_count())
    if now[0] < count:
        return Verification(GLOBAL_CHAIN, count, False, None,
                            f"event forged: the global head records {now[0]} events but "
                            f"{count} exist", now[0] + 1)
    if head_seq > count:
        return Verification(GLOBAL_CHAIN, count, False, None,
                            f"event missing: the global head records {head_seq} events but "
                            f"{count} remain", count + 1)
    if head is not None and head_seq and hash_at_head != head[1]:
        return Verification(GLOBAL_CHAIN, count, False, None,
                            "the global head's hash does not match the event at its gseq",
                            head_seq)
    return Verification(GLOBAL_CHAIN, count, True, unsealed=unsealed_count())


def global_head() -> tuple[int, str]:
    """(last gseq, last ghash): record it somewhere else to anchor the whole ledger."""
    return _head(GLOBAL_CHAIN) or (0, GENESIS)
