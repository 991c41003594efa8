"""What an agent's ``model_params`` may hold, per provider: the one rule the admin form, model
validation and the run time (``orchestration.agents.model_for``) share.

A value the provider's client cannot take (a temperature of "hot", a base URL without a scheme,
a scripted agent without a script) must be refused where the admin types it, with a message
naming the key; found at run time it could only fail every task of the agent. The keys are the
ones the clients read (``engine/providers.py``: ``_PASSTHROUGH`` for OpenAI-compatible servers,
max_tokens, temperature and top_p for Anthropic; ``engine/llm.py`` ScriptedModel for scripts);
any other key would be ignored silently, so a misspelt one is refused too. Plain Python: no
Django, so the engine side may call it as well.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

PROVIDERS = ("scripted", "openai", "anthropic")

# What every real provider's client reads besides the passthrough keys (agents.model_for).
_CLIENT_KEYS = ("base_url", "timeout_s", "max_retries")
_KEYS = {
    "scripted": ("script", "max_tokens"),
    "openai": (*_CLIENT_KEYS, "max_tokens", "temperature", "top_p", "stop", "seed"),
    "anthropic": (*_CLIENT_KEYS, "max_tokens", "temperature", "top_p"),
}
# Sampling temperature: OpenAI's API takes 0 to 2, Anthropic's 0 to 1.
_TEMPERATURE_MAX = {"openai": 2.0, "anthropic": 1.0}
_TURN_KEYS = ("text", "tool_calls", "tokens_in", "tokens_out")
_TURN_EXAMPLE = ('{"text": "...", "tool_calls": [{"name": "tool", "arguments": {...}}], '
                 '"tokens_in": 10, "tokens_out": 20}')


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _positive_int(value: Any) -> str:
    return "" if _is_int(value) and value > 0 else "must be a whole number above 0, e.g. 1024"


def _timeout(value: Any) -> str:
    if _is_number(value) and 0 < value <= 3600:
        return ""
    return "must be a number of seconds above 0 and at most 3600, e.g. 60"


def _retries(value: Any) -> str:
    if _is_int(value) and 0 <= value <= 10:
        return ""
    return "must be a whole number from 0 to 10, e.g. 2"


def _base_url(value: Any) -> str:
    if isinstance(value, str):
        try:
            parts = urlsplit(value)
        except ValueError:
            parts = None
        if parts is not None and parts.scheme in ("http", "https") and parts.hostname:
            return ""
    return 'must be an http:// or https:// URL, e.g. "http://127.0.0.1:8080/v1"'


def _top_p(value: Any) -> str:
    return "" if _is_number(value) and 0 <= value <= 1 else "must be a number from 0 to 1"


def _stop(value: Any) -> str:
    if isinstance(value, str) and value:
        return ""
    if (isinstance(value, list) and 0 < len(value) <= 4
            and all(isinstance(s, str) and s for s in value)):
        return ""
    return "must be a non-empty string or a list of 1 to 4 non-empty strings"


def _seed(value: Any) -> str:
    return "" if _is_int(value) else "must be a whole number"


def _variant_problems(where: str, variants: Any) -> list[str]:
    """A turn of variants: a non-empty list of turns, each but the last with a ``when`` path
    (the first whose path is true in the request is used)."""
    if not isinstance(variants, list) or not variants:
        return [f"{where}: variants must be a non-empty list of turns"]
    problems = []
    for n, variant in enumerate(variants, 1):
        here = f"{where} variant {n}"
        if not isinstance(variant, dict):
            problems.append(f"{here} must be an object like {_TURN_EXAMPLE}")
            continue
        when = variant.get("when")
        if when is not None and (not isinstance(when, str) or not when.strip()):
            problems.append(f'{here}: when must be a path such as "input.flag"')
        problems += _turn_problems(here, {k: v for k, v in variant.items() if k != "when"})
    return problems


def _turn_problems(index: int | str, turn: Any) -> list[str]:
    where = f"script turn {index}" if isinstance(index, int) else index
    if not isinstance(turn, dict):
        return [f"{where} must be an object like {_TURN_EXAMPLE}"]
    if "variants" in turn:
        extra = [key for key in turn if key != "variants"]
        return ([f"{where}: a turn with variants has no other keys (found {extra[0]!r})"]
                if extra else _variant_problems(where, turn["variants"]))
    problems = [f"{where} has unknown key {key!r} (allowed: {', '.join(_TURN_KEYS)})"
                for key in turn if key not in _TURN_KEYS]
    if turn.get("text") is not None and not isinstance(turn["text"], str):
        problems.append(f"{where}: text must be a string")
    for key in ("tokens_in", "tokens_out"):
        if key in turn and not (_is_int(turn[key]) and turn[key] >= 0):
            problems.append(f"{where}: {key} must be a whole number of at least 0")
    calls = turn.get("tool_calls", [])
    if not isinstance(calls, list):
        return [*problems, f"{where}: tool_calls must be a list"]
    for n, call in enumerate(calls, 1):
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
            problems.append(f'{where}: tool call {n} must be an object with a "name"')
        elif not isinstance(call.get("arguments", {}), dict):
            problems.append(f"{where}: tool call {n}'s arguments must be an object")
    return problems


def _script_problems(script: Any) -> list[str]:
    if not isinstance(script, list) or not script:
        return ["script must be a non-empty list of assistant turns, each like " + _TURN_EXAMPLE]
    return [p for i, turn in enumerate(script, 1) for p in _turn_problems(i, turn)]


def check_model_params(provider: str, params: Any) -> list[str]:
    """Every problem with ``params`` for ``provider``, each naming its key; empty when the
    provider's client can be built from them and will use every key."""
    if provider not in PROVIDERS:
        return [f"unknown provider {provider!r}: one of {', '.join(PROVIDERS)}"]
    if not isinstance(params, dict):
        return ['model_params must be a JSON object, e.g. {"max_tokens": 1024}']
    allowed = _KEYS[provider]
    problems = [f"unknown key {key!r} for the {provider} provider (allowed: "
                f"{', '.join(allowed)})" for key in params if key not in allowed]
    if provider == "scripted":
        problems += _script_problems(params.get("script"))
    checks: dict[str, Callable[[Any], str]] = {
        "max_tokens": _positive_int, "timeout_s": _timeout, "max_retries": _retries,
        "base_url": _base_url, "top_p": _top_p, "stop": _stop, "seed": _seed,
    }
    for key, check in checks.items():
        if key in params and key in allowed:
            why = check(params[key])
            if why:
                problems.append(f"{key} {why}")
    if "temperature" in params and provider in _TEMPERATURE_MAX:
        top = _TEMPERATURE_MAX[provider]
        value = params["temperature"]
        if not (_is_number(value) and 0 <= value <= top):
            problems.append(f"temperature must be a number from 0 to {top:g} for the "
                            f"{provider} provider")
    return problems
