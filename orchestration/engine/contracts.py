"""Tool contracts: a JSON Schema for input and output, a timeout, an implementation."""

from __future__ import annotations

import concurrent.futures
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import jsonschema

from orchestration.engine.errors import (
    ToolFailed,
    ToolInputInvalid,
    ToolOutputInvalid,
    ToolTimeout,
    UnknownTool,
)

ToolFn = Callable[..., Any]

_timeout_pool = concurrent.futures.ThreadPoolExecutor(
    max_workers=8, thread_name_prefix="switchboard-tool"
)


def _describe(error: jsonschema.ValidationError) -> str:
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{where}: {error.message}" if where else error.message


@dataclass(slots=True)
class ToolContract:
    name: str
    fn: ToolFn
    input_schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "object"})
    output_schema: Mapping[str, Any] = field(default_factory=dict)
    timeout_s: float | None = 10.0
    idempotent: bool = True
    description: str = ""
    cost_per_call: Decimal = Decimal("0")
    _in: jsonschema.Draft202012Validator | None = None
    _out: jsonschema.Draft202012Validator | None = None
    _takes_key: bool = False

    def __post_init__(self) -> None:
        self._takes_key = _accepts_keyword(self.fn, "idempotency_key")
        jsonschema.Draft202012Validator.check_schema(self.input_schema)
        jsonschema.Draft202012Validator.check_schema(self.output_schema)
        self._in = jsonschema.Draft202012Validator(self.input_schema)
        self._out = jsonschema.Draft202012Validator(self.output_schema)

    def validate_input(self, args: Any) -> None:
        assert self._in is not None
        errors = sorted(self._in.iter_errors(args), key=lambda e: list(e.absolute_path))
        if errors:
            detail = "; ".join(_describe(e) for e in errors[:5])
            raise ToolInputInvalid(f"arguments for {self.name} are invalid: {detail}")

    def validate_output(self, result: Any) -> None:
        assert self._out is not None
        errors = sorted(self._out.iter_errors(result), key=lambda e: list(e.absolute_path))
        if errors:
            detail = "; ".join(_describe(e) for e in errors[:5])
            raise ToolOutputInvalid(f"{self.name} returned output that breaks its schema: {detail}")

    def call(self, args: Mapping[str, Any], *, timeout_s: float | None = None,
             idempotency_key: str | None = None) -> Any:
        """Validate, run with a timeout, verify. Never repairs arguments.

        ``idempotency_key`` reaches implementations that take an ``idempotency_key`` keyword
        (HTTP tools send it as the ``Idempotency-Key`` header), so the system behind the tool
        can recognise a repeated call."""
        self.validate_input(args)
        limit = self.timeout_s if timeout_s is None else timeout_s
        kwargs = dict(args)
        if idempotency_key is not None and self._takes_key:
            kwargs["idempotency_key"] = idempotency_key
        try:
            if limit is None:
                result = self.fn(**kwargs)
            else:
                future = _timeout_pool.submit(self.fn, **kwargs)
                try:
                    result = future.result(timeout=limit)
                except concurrent.futures.TimeoutError:
                    future.cancel()
                    raise ToolTimeout(f"{self.name} did not answer within {limit:g} s") from None
        except (ToolTimeout, ToolInputInvalid):
            raise
        except Exception as exc:  # the implementation's own failure, reported as data
            raise ToolFailed(f"{self.name} failed: {type(exc).__name__}: {exc}") from exc
        self.validate_output(result)
        return result


def _accepts_keyword(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    param = params.get(name)
    return param is not None and param.kind in (inspect.Parameter.KEYWORD_ONLY,
                                                inspect.Parameter.POSITIONAL_OR_KEYWORD)


class ToolRegistry:
    """Named contracts. The engine looks implementations up here and nowhere else."""

    def __init__(self) -> None:
        self._tools: dict[str, ToolContract] = {}

    def register(self, contract: ToolContract) -> ToolContract:
        self._tools[contract.name] = contract
        return contract

    def tool(
        self,
        name: str,
        *,
        input_schema: Mapping[str, Any],
        output_schema: Mapping[str, Any],
        timeout_s: float | None = 10.0,
        idempotent: bool = True,
        description: str = "",
    ) -> Callable[[ToolFn], ToolFn]:
        def decorate(fn: ToolFn) -> ToolFn:
            self.register(
                ToolContract(
                    name=name,
                    fn=fn,
                    input_schema=input_schema,
                    output_schema=output_schema,
                    timeout_s=timeout_s,
                    idempotent=idempotent,
                    description=description or (fn.__doc__ or "").strip(),
                )
            )
            return fn

        return decorate

    def get(self, name: str) -> ToolContract:
        try:
            return self._tools[name]
        except KeyError:
            raise UnknownTool(f"no tool or function named {name!r} is registered") from None

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def names(self) -> list[str]:
        return sorted(self._tools)
