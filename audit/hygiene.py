"""Input hygiene: refuse JSON values that cannot be stored, hashed or read back faithfully.

Everything a person or an integrator writes (run input, edited arguments, a budget, a note)
ends up in a database row and in a ledger event whose hash is taken over its canonical JSON
(hashchain/__init__.py, which refuses NaN). A value that breaks any of those must be refused when it
arrives, with a message naming what and where, never discovered later by a crash. Here, below
approvals and orchestration, so that their services and the console check the same way.

Refused anywhere in a value (at any depth, in strings and in object keys alike):

- NaN, Infinity and -Infinity (floats or Decimals): JSON has no such numbers;
- numbers of magnitude above ``MAX_NUMBER`` (2**53 - 1, the range every JSON reader holds
  exactly, RFC 7493); a decimal literal too large for a float arrives as Infinity;
- lone surrogates (``\\ud800``): not Unicode, so not encodable as UTF-8 for either database;
- NUL (``\\u0000``): PostgreSQL text and jsonb cannot hold it;
- nesting deeper than ``MAX_DEPTH`` containers.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

MAX_DEPTH = 64
MAX_NUMBER = 2**53 - 1

_RANGE = f"the largest magnitude allowed is {MAX_NUMBER}"

__all__ = ["MAX_DEPTH", "MAX_NUMBER", "Refused", "check", "loads"]


class Refused(ValueError):
    """A value refused by ``check``: ``problem`` says what is not allowed, ``path`` where
    (slash-separated, a JSON pointer without its leading slash), ``why`` the rule. The message
    never quotes the bad text itself, which may not even be printable or encodable."""

    def __init__(self, path: str, problem: str, why: str = "") -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{problem} is not allowed" + (f" at {path}" if path else "") +
                         (f" ({why})" if why else ""))


def _escaped(text: str) -> str:
    """``text`` safe to show: lone surrogates and NUL as \\u escapes, '~' and '/' as in a JSON
    pointer (RFC 6901), so a key holding a slash cannot pass for two path steps."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\u0000")
    return text.replace("~", "~0").replace("/", "~1")


def _join(path: str, step: str | int) -> str:
    step = _escaped(step) if isinstance(step, str) else str(step)
    return f"{path}/{step}" if path else step


def _check_text(text: str, path: str, what: str) -> None:
    if "\x00" in text:
        raise Refused(path, f"a NUL character (\\u0000) in {what}", "it cannot be stored")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        raise Refused(path, f"a lone surrogate (\\u{code:04x}) in {what}",
                      "it is not valid Unicode") from None


def _check_number(value: float | int | Decimal, path: str) -> None:
    if isinstance(value, Decimal):
        finite, nan = value.is_finite(), value.is_nan()
    elif isinstance(value, float):
        finite, nan = math.isfinite(value), math.isnan(value)
    else:
        finite, nan = True, False
    if nan:
        raise Refused(path, "NaN", "numbers must be finite")
    if not finite:
        raise Refused(path, "Infinity (or a number too large to represent)",
                      "numbers must be finite")
    # Compared, never formatted: an int of thousands of digits cannot even be printed. A
    # Decimal's copy_abs ignores the context, whose abs() would overflow on 1E+999999999.
    if (value.copy_abs() if isinstance(value, Decimal) else abs(value)) > MAX_NUMBER:
        raise Refused(path, "a number out of range", _RANGE)


def _walk(value: Any, path: str, depth: int) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, str):
        _check_text(value, path, "a string")
    elif isinstance(value, (int, float, Decimal)):
        _check_number(value, path)
    elif isinstance(value, (dict, list, tuple)):
        # Containers count from 1 (the value itself), so MAX_DEPTH nested objects pass.
        if depth >= MAX_DEPTH:
            raise Refused(path, f"nesting deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str):
                    _check_text(key, _join(path, key), "a key")
                _walk(item, _join(path, key if isinstance(key, str) else str(key)), depth + 1)
        else:
            for index, item in enumerate(value):
                _walk(item, _join(path, index), depth + 1)
    # Anything else did not come from JSON (a caller's own UUID, say): not ours to judge.


def check(value: Any, where: str = "") -> None:
    """Raise ``Refused`` unless ``value`` (decoded JSON) is fit to store; ``where`` names the
    value in messages (``input`` makes a path like ``input/items/0/name``)."""
    _walk(value, where, 0)


def loads(text: str | bytes, where: str = "") -> Any:
    """``json.loads`` that returns only values ``check`` accepts.

    A syntax error propagates as ``json.JSONDecodeError``, for the caller to phrase; anything
    else wrong raises ``Refused``. NaN and Infinity literals are decoded as floats on purpose
    and then refused by the walk, which can say where they were."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise
    except UnicodeDecodeError:
        raise Refused(where, "text that is not valid UTF-8") from None
    except RecursionError:
        # The decoder recurses per level: very deep input exhausts the stack long before the
        # walk below could refuse it.
        raise Refused(where, f"nesting deeper than {MAX_DEPTH} levels") from None
    except ValueError:
        # e.g. an integer literal of more digits than Python converts (4,300 by default).
        raise Refused(where, "a number out of range", _RANGE) from None
    check(value, where)
    return value
