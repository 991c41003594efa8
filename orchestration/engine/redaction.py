"""Redact secrets from anything about to be recorded or shown, in the forms they travel in.

A tool that echoes a credential rarely echoes it verbatim: it comes back base64-encoded (an
``Authorization: Basic`` header, a token inside a JSON blob that was itself encoded), hex, or
percent-encoded in a URL. So each secret is searched for as itself and as:

- base64 (standard and URL-safe alphabets), whole, with and without padding, and as the run of
  characters that encodes it inside the base64 of a longer text: that text may put the secret
  at any of three byte offsets modulo 3, and each offset encodes it differently;
- hex, lower and upper case;
- percent-encoded (``quote`` with and without ``/`` kept, ``quote_plus``), escapes in any
  case.

The variants of a set of secrets are compiled into one regular expression, once per set.
This is defence in depth: credentials are injected where a call needs them and must not reach
a model or the ledger in the first place.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any
from urllib.parse import quote, quote_plus

from jsonkit import map_strings

REDACTED = "[redacted]"
# Encoded forms shorter than this are too likely to occur by chance to be cut out of text.
_MIN_ENCODED = 8
_ESCAPE = re.compile(r"%[0-9A-F]{2}")


def redact(value: Any, secrets: Sequence[str]) -> Any:
    """``value`` with every form of every secret replaced by ``[redacted]``, in strings,
    mapping keys and values, lists and tuples, at any depth."""
    pattern = _pattern(tuple(s for s in secrets if s))
    if pattern is None:
        return value
    return map_strings(value, lambda text: pattern.sub(REDACTED, text), keys=True)


@lru_cache(maxsize=32)
def _pattern(secrets: tuple[str, ...]) -> re.Pattern[str] | None:
    forms = {form for secret in secrets for form in variants(secret)}
    if not forms:
        return None
    # Longest first: where a whole encoding and a part of it start at the same place, the
    # whole one is cut.
    ordered = sorted(forms, key=lambda f: (-len(f), f))
    return re.compile("|".join(_ESCAPE.sub(_either_case, re.escape(f)) for f in ordered))


def _either_case(escape: re.Match[str]) -> str:
    """A percent escape matches in upper, lower or mixed case (%2F, %2f)."""
    return f"%(?i:{escape.group(0)[1:]})"


def variants(secret: str) -> set[str]:
    """Every form of ``secret`` that ``redact`` looks for."""
    raw = secret.encode("utf-8")
    encoded = set(_base64_forms(raw)) | {raw.hex(), raw.hex().upper()}
    encoded |= set(_percent_forms(secret))
    return {secret} | {form for form in encoded if len(form) >= _MIN_ENCODED}


def _base64_forms(raw: bytes) -> Iterable[str]:
    whole = base64.b64encode(raw).decode("ascii")
    standard = {whole, whole.rstrip("=")}
    for offset in range(3):
        standard.add(_aligned(raw, offset))
    for form in standard:
        yield form
        yield form.translate(_URLSAFE)


_URLSAFE = str.maketrans("+/", "-_")


def _aligned(raw: bytes, offset: int) -> str:
    """The base64 characters that encode ``raw`` alone when it sits ``offset`` bytes (mod 3)
    into a longer text: each character carries 6 bits, and only those whose bits all come
    from ``raw`` are the same whatever surrounds it."""
    padded = base64.b64encode(bytes(offset) + raw + bytes(2)).decode("ascii")
    first_bit, end_bit = 8 * offset, 8 * (offset + len(raw))
    first = -(-first_bit // 6)  # the first character starting at or after the secret
    last = end_bit // 6  # characters before this one end inside the secret
    return padded[first:last]


def _percent_forms(secret: str) -> Iterable[str]:
    return (quote(secret, safe=""), quote(secret), quote_plus(secret))
