"""Tool contracts: a JSON Schema for input and output, a timeout, an implementation."""

from __future__ import annotations

import contextvars
import inspect
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import jsonschema

from jsonkit import check_schema, schema_problems
from orchestration.engine.errors import (
    ToolFailed,
    ToolInputInvalid,
    ToolOutputInvalid,
    ToolStopped,
    ToolTimeout,
    UngatedCall,
    UnknownTool,
)

log = logging.getLogger("switchboard.tools")
ToolFn = Callable[..., Any]
StopCheck = Callable[[], str]

# Set only by the gate (orchestration/engine/gate.py) around the one call it lets through: a
# contract called from anywhere else refuses, so there is no second path to a side effect.
_gate_open: ContextVar[bool] = ContextVar("switchboard_gate_open", default=False)

# How often a running call looks at its stop check (cancel, kill switch, revoked grant).
STOP_POLL_S = 0.5


@contextmanager
def opened_by_gate() -> Iterator[None]:
    token = _gate_open.set(True)
    try:
        yield
    finally:
        _gate_open.reset(token)


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
    _takes_cancel: bool = False
    _takes_caller: bool = False

    def __post_init__(self) -> None:
        self._takes_key = _accepts_keyword(self.fn, "idempotency_key")
        self._takes_cancel = _accepts_keyword(self.fn, "cancel")
        self._takes_caller = _accepts_keyword(self.fn, "caller")
        check_schema(self.input_schema)
        check_schema(self.output_schema)
        self._in = jsonschema.Draft202012Validator(self.input_schema)
        self._out = jsonschema.Draft202012Validator(self.output_schema)

    def validate_input(self, args: Any) -> None:
        assert self._in is not None
        problems = schema_problems(self._in, args)
        if problems:
            detail = "; ".join(map(str, problems))
            raise ToolInputInvalid(f"arguments for {self.name} are invalid: {detail}")

    def validate_output(self, result: Any) -> None:
        assert self._out is not None
        problems = schema_problems(self._out, result)
        if problems:
            detail = "; ".join(map(str, problems))
            raise ToolOutputInvalid(f"{self.name} returned output that breaks its schema: {detail}")

    def call(self, args: Mapping[str, Any], *, timeout_s: float | None = None,
             idempotency_key: str | None = None, stop: StopCheck | None = None,
             caller: str | None = None, validated: bool = False) -> Any:
        """Validate, run with a timeout, verify. Never repairs arguments.

        Only the gate may call this. ``idempotency_key`` reaches implementations that take an
        ``idempotency_key`` keyword (HTTP tools send it as the ``Idempotency-Key`` header), so
        the system behind the tool can recognise a repeated call. ``stop`` is asked every
        ``STOP_POLL_S`` while the call runs; a non-empty answer ends the call as a timeout
        does. Either way an implementation that takes a ``cancel`` keyword gets a
        ``threading.Event`` that is set then, so it can kill its subprocess (the sandbox does);
        one that does not is abandoned in its thread, its result discarded (an HTTP tool's
        request is bounded by its own timeout, which httpx enforces).

        ``caller`` (the acting identity the gate checked, e.g. ``agent:frontdesk``) reaches
        implementations that take a ``caller`` keyword, for a tool whose own data has grants
        of its own (search_knowledge's collections). It is set after the arguments, so a
        model can never name someone else: the input schemas refuse unknown keys anyway.
        ``validated``: the gate has just validated these very arguments."""
        if not _gate_open.get():
            raise UngatedCall(f"{self.name} was called outside the gate; every side effect "
                              "goes through orchestration.engine.gate")
        if not validated:
            self.validate_input(args)
        limit = self.timeout_s if timeout_s is None else timeout_s
        kwargs = dict(args)
        if idempotency_key is not None and self._takes_key:
            kwargs["idempotency_key"] = idempotency_key
        if self._takes_caller:
            kwargs["caller"] = caller or ""
        try:
            if limit is None and stop is None:
                result = self.fn(**kwargs)
            else:
                result = self._watched(kwargs, limit, stop)
        except (ToolTimeout, ToolStopped, ToolInputInvalid):
            raise
        except Exception as exc:  # the implementation's own failure, reported as data
            raise ToolFailed(f"{self.name} failed: {type(exc).__name__}: {exc}") from exc
        self.validate_output(result)
        return result

    def _watched(self, kwargs: dict[str, Any], limit: float | None,
                 stop: StopCheck | None) -> Any:
        """Run the implementation on a thread of its own while this one watches the clock and
        the stop check (``_Runner``: an idle one if there is one, else a new one)."""
        cancel = threading.Event()
        if self._takes_cancel:
            kwargs["cancel"] = cancel
        box: dict[str, Any] = {}
        done = threading.Event()
        name = f"switchboard-tool-{self.name}"

        def work() -> None:
            threading.current_thread().name = name
            try:
                box["result"] = self.fn(**kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the watching thread
                box["error"] = exc
            finally:
                done.set()

        _Runner.run(work)
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            wait = STOP_POLL_S if deadline is None else min(STOP_POLL_S,
                                                            deadline - time.monotonic())
            if done.wait(max(0.0, wait)):
                break
            if deadline is not None and time.monotonic() >= deadline:
                cancel.set()
                raise ToolTimeout(f"{self.name} did not answer within {limit:g} s")
            try:
                why = stop() if stop is not None else ""
            except Exception:  # noqa: BLE001 - e.g. the database is briefly away
                # No stop signal could be read: the call goes on (its outcome is recorded
                # when it ends, through the same outage), and the next poll asks again.
                log.warning("%s: the stop check failed; asking again", self.name,
                            exc_info=True)
                why = ""
            if why:
                cancel.set()
                raise ToolStopped(why)
        if "error" in box:
            raise box["error"]
        return box["result"]


class _Runner:
    """A thread that runs tool implementations, one call at a time, each in a context of its
    own (as a new thread would start with). Not a pool of fixed size: a call takes an idle
    runner or starts a new one, so an implementation that ignores ``cancel`` keeps only its own
    runner busy, never a slot later calls would queue behind. A runner goes back to the idle
    ones when its call returns, and ends after ``IDLE_S`` without work. Starting a thread cost
    a tool call about 0.7 ms here; handing work to an idle one, a few tens of microseconds."""

    IDLE_S = 60.0
    _idle: list[_Runner] = []
    _lock = threading.Lock()
    _ids = itertools.count(1)

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        threading.Thread(target=self._loop, name=f"switchboard-tool-{next(self._ids)}",
                         daemon=True).start()

    @classmethod
    def run(cls, job: Callable[[], None]) -> None:
        with cls._lock:
            runner = cls._idle.pop() if cls._idle else None
        (runner or cls())._jobs.put(job)

    def _loop(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self._lock:
                    if self in self._idle:
                        self._idle.remove(self)
                        return
                continue  # taken as the wait ended: its call is on the way
            contextvars.Context().run(job)
            for cleanup in _after_each_call:
                try:
                    cleanup()
                except Exception:  # noqa: BLE001 - a runner outlives a failed cleanup
                    log.warning("cleaning up after a tool call failed", exc_info=True)
            with self._lock:
                self._idle.append(self)

    @classmethod
    def _forked(cls) -> None:
        """A forked child has none of its parent's threads."""
        cls._lock = threading.Lock()
        cls._idle = []


os.register_at_fork(after_in_child=_Runner._forked)

# Run on a runner thread after each call it ran (the Django side closes the thread's database
# connections, as a thread of its own per call used to leave none open for the next call).
_after_each_call: list[Callable[[], None]] = []


def after_each_call(cleanup: Callable[[], None]) -> None:
    if cleanup not in _after_each_call:
        _after_each_call.append(cleanup)


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
