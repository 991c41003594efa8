"""Canonical JSON and the hash chains, shared by the ledger (audit) and the engine's in-memory
store without either depending on the other; pure Python, no Django.

Two chains cover every event:

- the chain of its run (or of another named chain, such as configuration changes): event ``seq``
  of that chain stores ``prev_hash`` (the ``hash`` of event ``seq - 1``, ``GENESIS`` for the
  first) and ``hash = chain_hash(prev_hash, body)``, where ``body`` is the exact canonical JSON
  of the event's chain, seq, kind, at, actor and data;
- the global chain over all events in the order audit.ledger.seal() sealed them (seconds after
  they were appended): event ``gseq`` stores ``gprev_hash`` (the ``ghash`` of event
  ``gseq - 1``, ``GENESIS`` for the first) and ``ghash = global_hash(gprev_hash, hash)``.
  Hashing the event's own ``hash`` commits the global link to the body and to the run chain's
  link at once, so editing, deleting, inserting or reordering an event anywhere breaks at least
  one of the two chains.

``audit/verify_export.py`` re-implements these two functions with the standard library only, for
auditors who verify an export outside the application; keep both in step.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

GENESIS = "0" * 64


def canonical_json(value: Any) -> str:
    """Sorted keys, no insignificant whitespace, UTF-8 kept as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def chain_hash(prev_hash: str, body: str) -> str:
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


def global_hash(gprev_hash: str, event_hash: str) -> str:
    """The global chain's link: the previous global hash and this event's chain hash."""
    return chain_hash(gprev_hash, event_hash)
