#!/usr/bin/env python3
"""Verify a ledger export (``manage.py audit_export``) without Switchboard: standard library only.

    python verify_export.py FILE.jsonl

For every line it recomputes the event's hash from its body and prev_hash, its global hash from
gprev_hash and hash, and checks that the body names the same chain, seq, kind, at, actor and
data as the line. Between lines it checks each chain's links (consecutive seqs, prev_hash equal
to the previous event's hash, GENESIS before seq 1) and the global links between consecutive
gseqs present in the file. A filtered export (--since, --until, --run) is checked as far as it
reaches: the first event of each chain in the file anchors that chain.

Exit status 0 when everything holds, 1 naming the first problem, 2 for unreadable input.
The hash functions mirror hashchain/__init__.py."""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

GENESIS = "0" * 64
FIELDS = ("chain", "seq", "gseq", "kind", "at", "actor", "data", "body", "prev_hash", "hash",
          "gprev_hash", "ghash")
BODY_FIELDS = ("chain", "seq", "kind", "at", "actor", "data")


def chain_hash(prev_hash: str, body: str) -> str:
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


class Broken(Exception):
    """The first problem found, with where it is."""


def check_line(number: int, raw: str) -> dict[str, Any]:
    try:
        event = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise Broken(f"line {number}: not valid JSON ({exc.msg})") from None
    if not isinstance(event, dict) or (missing := [f for f in FIELDS if f not in event]):
        raise Broken(f"line {number}: not an event (missing {', '.join(missing) or 'all'})")
    if not all(isinstance(event[f], int) and not isinstance(event[f], bool)
               for f in ("seq", "gseq")) or not all(
            isinstance(event[f], str) for f in ("chain", "body", "prev_hash", "hash",
                                                 "gprev_hash", "ghash")):
        raise Broken(f"line {number}: seq and gseq must be integers, chain, body and hashes "
                     "strings")
    where = f"line {number} (chain {event['chain']} seq {event['seq']}, gseq {event['gseq']})"
    if chain_hash(event["prev_hash"], event["body"]) != event["hash"]:
        raise Broken(f"{where}: hash mismatch: the hash does not match body and prev_hash")
    if chain_hash(event["gprev_hash"], event["hash"]) != event["ghash"]:
        raise Broken(f"{where}: global hash mismatch: ghash does not match gprev_hash and hash")
    try:
        body = json.loads(event["body"])
    except json.JSONDecodeError:
        raise Broken(f"{where}: body is not valid JSON") from None
    for name in BODY_FIELDS:
        if not isinstance(body, dict) or body.get(name) != event[name]:
            raise Broken(f"{where}: {name!r} differs from the hashed body")
    event["where"] = where
    return event


def verify(lines: Any) -> tuple[int, int]:
    """(events, chains) when the file holds; raises Broken at the first problem."""
    tips: dict[str, tuple[int, str]] = {}  # chain -> (seq, hash) of its last event so far
    last: tuple[int, str] | None = None  # (gseq, ghash) of the previous line
    count = 0
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        event = check_line(number, raw)
        count += 1
        where, chain, seq = event["where"], event["chain"], event["seq"]
        tip = tips.get(chain)
        if tip is None:
            if seq == 1 and event["prev_hash"] != GENESIS:
                raise Broken(f"{where}: prev_hash link broken: seq 1 must follow GENESIS")
        elif seq != tip[0] + 1:
            raise Broken(f"{where}: sequence gap: expected seq {tip[0] + 1} of this chain, "
                         f"found {seq} (an event is missing or out of order)")
        elif event["prev_hash"] != tip[1]:
            raise Broken(f"{where}: prev_hash link broken: it does not match the hash of seq "
                         f"{tip[0]}")
        tips[chain] = (seq, event["hash"])
        gseq = event["gseq"]
        if last is not None:
            if gseq <= last[0]:
                raise Broken(f"{where}: global order broken: gseq {gseq} follows {last[0]}")
            if gseq == last[0] + 1 and event["gprev_hash"] != last[1]:
                raise Broken(f"{where}: global order broken: gprev_hash does not match the "
                             f"ghash of gseq {last[0]}")
        if gseq == 1 and event["gprev_hash"] != GENESIS:
            raise Broken(f"{where}: global order broken: gseq 1 must follow GENESIS")
        last = (gseq, event["ghash"])
    return count, len(tips)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} FILE.jsonl", file=sys.stderr)
        return 2
    try:
        with open(argv[1], encoding="utf-8") as lines:
            events, chains = verify(lines)
    except OSError as exc:
        print(f"cannot read {argv[1]}: {exc.strerror}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as exc:
        print(f"BROKEN: {argv[1]} is not UTF-8 text ({exc.reason})", file=sys.stderr)
        return 1
    except Broken as broken:
        print(f"BROKEN {broken}", file=sys.stderr)
        return 1
    print(f"OK: {events} event(s) in {chains} chain(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
