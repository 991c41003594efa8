"""The one gate every side effect passes: an agent's tool call and a plan-level ``tool`` or
``function`` task alike, in the same order.

1. stop signals (the run cancelled, a kill switch, the acting agent retired);
2. the acting identity and its grant (an agent, or a process's own service identity);
3. the argument schema;
4. the approval policy (a reviewer's edit comes back here already re-matched);
5. a non-idempotent call whose earlier attempt has no recorded outcome waits for people;
6. quota and rate limit;
7. the budget reservation;
8. the call, with its timeout, its idempotency key and the stop signals watched while it runs;
9. the result schema (in the contract), redaction, and the ledger record.

``ToolContract.call`` refuses to run unless this gate opened it, so a tool called any other
way fails loudly instead of skipping the checks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from hashchain import canonical_json
from orchestration.engine.contracts import STOP_POLL_S, ToolContract, opened_by_gate
from orchestration.engine.errors import (
    ConfigurationError,
    ContractError,
    ToolInputInvalid,
    ToolStopped,
    ToolTimeout,
)
from orchestration.engine.governance import Governor, Usage
from orchestration.engine.redaction import redact
from orchestration.engine.tracing import tool_span, tool_verdict

log = logging.getLogger("switchboard.gate")

# The ledger events a resume reads back (Journal.fold).
JOURNAL_KINDS = ("model.called", "tool.intent", "tool.called", "tool.failed", "tool.denied",
                 "delegation.refused", "knowledge.retrieved")
# What the checks of an answer recorded (engine/verify.py), by kind and rework round.
CHECK_KINDS = ("sentinel.passed", "sentinel.failed", "qc.checked", "qc.passed", "qc.failed",
               "task.rework")


@dataclass(slots=True)
class Journal:
    """What the ledger already holds for a task: recorded turns and tool outcomes."""

    turns: dict[int, dict[str, Any]] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    intents: set[str] = field(default_factory=set)
    checks: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    # The chunks a task's prompt was given (engine/knowledge.py), once retrieved.
    knowledge: list[dict[str, Any]] | None = None

    @classmethod
    def fold(cls, events: Iterable[tuple[str, Mapping[str, Any]]]) -> Journal:
        """The journal of one task from its ledger events, in order."""
        journal = cls()
        for kind, data in events:
            if kind == "model.called":
                journal.turns[int(data["step"])] = data["response"]
            elif kind == "tool.intent":
                journal.intents.add(data["idempotency_key"])
            elif kind == "tool.called":
                journal.results[data["idempotency_key"]] = {
                    "result": data["result"], "arguments": data.get("arguments")}
            elif kind in ("tool.failed", "delegation.refused"):
                journal.results[data["idempotency_key"]] = {"error": data["error"]}
            elif kind == "tool.denied":
                journal.results[data["idempotency_key"]] = {"error": data["error"],
                                                             "denied": True}
            elif kind == "knowledge.retrieved":
                journal.knowledge = list(data.get("chunks") or [])
            elif kind in CHECK_KINDS:
                journal.checks[(kind, int(data.get("round", 0)))] = dict(data)
        return journal


class StepLog(Protocol):
    def journal(self) -> Journal: ...

    def record(self, kind: str, data: dict[str, Any], *, usage: Usage,
               reserved: Usage | None = None,
               transcript: list[dict[str, Any]] | None = None, ahead: Any = None) -> None:
        """Checkpoint one step; settle its reservation against the real usage atomically.
        ``transcript`` is a model call's conversation, kept beside the ledger (not in it).
        ``ahead``: the governor's checks of the next call (``Governor.ahead_of_tool``), for a
        log that can run them in the same transaction; one that cannot leaves them alone."""
        ...


class StepStore(Protocol):
    def journal(self, run_id: str, key: str) -> Journal: ...

    def record_step(self, run_id: str, kind: str, data: dict[str, Any], *, usage: Usage,
                    reserved: Usage | None = None, lease: str = "",
                    transcript: list[dict[str, Any]] | None = None,
                    ahead: Any = None) -> None: ...


@dataclass(slots=True)
class StoreLog:
    """A task's step log on a run store, under the task's lease."""

    store: StepStore
    run_id: str
    key: str
    lease: str = ""

    def journal(self) -> Journal:
        return self.store.journal(self.run_id, self.key)

    def record(self, kind: str, data: dict[str, Any], *, usage: Usage,
               reserved: Usage | None = None,
               transcript: list[dict[str, Any]] | None = None, ahead: Any = None) -> None:
        self.store.record_step(self.run_id, kind, data, usage=usage, reserved=reserved,
                               lease=self.lease, transcript=transcript, ahead=ahead)


# Resolves a tool's name to its contract: None when no such tool exists, ConfigurationError
# when it exists but is configured so that no call can work (only calls to it fail).
Contracts = Callable[[str], ToolContract | None]


def contract_lookup(tools: Mapping[str, ToolContract],
                    unusable: Mapping[str, str]) -> Contracts:
    def lookup(name: str) -> ToolContract | None:
        if name in unusable:
            raise ConfigurationError(unusable[name])
        return tools.get(name)

    return lookup


def checks_ahead(make: Callable[..., Any], *args: Any) -> Any:
    """The next call's checks to run with a record (``make(*args)``), or None when they
    cannot be set up: the record of a call that was made never depends on them (the next call
    then asks as usual)."""
    try:
        return make(*args)
    except Exception:  # noqa: BLE001 - any failure only costs the next call its shortcut
        log.warning("the next call's checks could not be run ahead", exc_info=True)
        return None


@dataclass(slots=True)
class Verdict:
    """What came of one call through the gate.

    ``pause`` (``"<reason>: <detail>"``) means the call cannot go on without people or was
    stopped; otherwise ``content`` is what a model is told and ``is_error`` whether the call
    failed, and ``result`` the redacted result of a call that succeeded."""

    content: str = ""
    is_error: bool = False
    result: Any = None
    pause: str = ""
    # For a failed call: the error itself, without the advice ``content`` gives a model.
    error: str = ""
    # The arguments the call ran with (a reviewer's edit included), and whether a reviewer
    # refused it.
    arguments: Any = None
    denied: bool = False

    def __post_init__(self) -> None:
        if self.is_error and not self.error:
            self.error = self.content


@dataclass(slots=True)
class ToolGate:
    contracts: Contracts
    log: StepLog
    journal: Journal
    governor: Governor
    granted: Callable[[str], bool]
    task: str
    actor: str
    secrets: Sequence[str] = ()
    # A plan-level step is one step of its run (budgeted like a model turn); an agent's tool
    # call is part of the model turn that asked for it.
    steps: int = 0
    # Whether the grant is asked again while a call runs (replay answers grants from the
    # ledger, once per call, so it does not).
    watch_grant: bool = True

    def call(self, key: str, name: str, arguments: Any,
             ahead: Callable[[str], Any] | None = None) -> Verdict:
        """``ahead``: given what the model will be told of a call that succeeds, the
        governor's checks of the call after it, to run with this call's record."""
        # An execute_tool span under the task's span: the tool's name and the call's key only.
        with tool_span(name=name, call_id=key, task=self.task, actor=self.actor) as span:
            verdict = self._call(key, name, arguments, ahead)
            tool_verdict(span, is_error=verdict.is_error, pause=verdict.pause)
        return verdict

    def ahead_of(self, key: str, name: str) -> Any:
        """The governor's checks of tool call ``key`` to run ahead; None for a call answered
        from the journal or a tool that is unknown or unusable (its call asks as usual)."""
        if key in self.journal.results:
            return None
        try:
            contract = self.contracts(name)
        except ConfigurationError:
            return None
        if contract is None:
            return None
        return self.governor.ahead_of_tool(name, key, Usage(steps=self.steps, tool_calls=1,
                                                            cost=contract.cost_per_call))

    def _call(self, key: str, name: str, arguments: Any,
              ahead: Callable[[str], Any] | None = None) -> Verdict:
        recorded = self.journal.results.get(key)
        if recorded is not None:
            if "error" in recorded:
                if recorded.get("denied"):
                    return Verdict(f"A reviewer rejected this call: {recorded['error']}", True,
                                   error=f"rejected by a reviewer: {recorded['error']}",
                                   denied=True)
                return Verdict(recorded["error"], True)
            return Verdict(canonical_json(recorded["result"]), False, recorded["result"],
                           arguments=recorded.get("arguments"))

        checked = time.monotonic()
        stop = self.governor.stopped(tool=name, key=key)
        if stop:
            return Verdict(pause=stop)
        base = {"task": self.task, "actor": self.actor, "tool": name, "idempotency_key": key}
        shown = redact(arguments, self.secrets)
        refused = f"tool {name!r} is not granted to {self.actor}; the call was refused"
        if not self.granted(name):
            self.log.record("tool.refused", {**base, "arguments": shown, "error": refused},
                            usage=Usage())
            return Verdict(refused, True)
        try:
            contract = self.contracts(name)
        except ConfigurationError as exc:
            return Verdict(pause=f"configuration_error: {redact(str(exc), self.secrets)}")
        if contract is None:
            self.log.record("tool.refused", {**base, "arguments": shown, "error": refused},
                            usage=Usage())
            return Verdict(refused, True)
        try:
            if not isinstance(arguments, Mapping):
                raise ToolInputInvalid(f"arguments for {name} must be a JSON object, got "
                                       f"{type(arguments).__name__}")
            contract.validate_input(arguments)
        except ToolInputInvalid as exc:
            error = redact(str(exc), self.secrets)  # a schema error quotes the values
            self.log.record("tool.rejected", {**base, "arguments": shown, "error": error},
                            usage=Usage())
            return Verdict(f"{error}. Fix the arguments and call again.", True, error=error)

        gate = self.governor.gate(contract, arguments, key)
        if gate.action == "wait":
            return Verdict(pause=f"awaiting_approval: {gate.message}")
        if gate.action == "deny":
            self.log.record("tool.denied", {**base, "arguments": shown, "error": gate.message},
                            usage=Usage())
            return Verdict(f"A reviewer rejected this call: {gate.message}", True,
                           error=f"rejected by a reviewer: {gate.message}", denied=True)
        validated = gate.arguments is None  # the contract validates an edit once more
        if gate.arguments is not None:
            arguments = gate.arguments  # a reviewer's edit, already re-validated and re-matched
            shown = redact(arguments, self.secrets)

        if key in self.journal.intents and not contract.idempotent:
            decided = self.governor.outcome_decision(key)
            if decided == "reject":
                return Verdict("A reviewer decided this call must not be repeated; treat it as "
                               "not done.", True)
            if decided != "rerun":
                return Verdict(pause=f"unknown_outcome: {name} may or may not have run "
                                     f"(call {key})")
        refused = self.governor.admit(contract, key)
        if refused:
            return Verdict(pause=refused)
        if time.monotonic() - checked > STOP_POLL_S:  # e.g. a rate limit made it wait
            stop = self.governor.stopped(tool=name, key=key)
            if stop:
                return Verdict(pause=stop)
        worst = Usage(steps=self.steps, tool_calls=1, cost=contract.cost_per_call)
        refused = self.governor.reserve(worst)
        if refused:
            return Verdict(pause=refused)
        if not contract.idempotent:
            # Written before the call: if we die mid-call, a resume knows not to repeat it.
            self.log.record("tool.intent", {**base, "arguments": shown}, usage=Usage())
        return self._invoke(contract, key, dict(arguments), base, shown, worst, ahead,
                            validated)

    def _invoke(self, contract: ToolContract, key: str, arguments: dict[str, Any],
                base: dict[str, Any], shown: Any, worst: Usage,
                ahead: Callable[[str], Any] | None, validated: bool) -> Verdict:
        name = contract.name

        def stop() -> str:
            why = self.governor.stopped(tool=name, key=key)
            if not why and self.watch_grant and not self.granted(name):
                why = f"revoked: {self.actor} lost its grant on {name} during the call"
            return why

        started = time.perf_counter()
        spent = Usage(steps=self.steps, tool_calls=1, cost=contract.cost_per_call)
        try:
            with opened_by_gate():
                result = contract.call(arguments, idempotency_key=key, stop=stop,
                                       caller=self.actor, validated=validated)
        except (ToolTimeout, ToolStopped) as exc:
            latency = round((time.perf_counter() - started) * 1000, 3)
            error = redact(str(exc), self.secrets)
            stopped = isinstance(exc, ToolStopped)
            if contract.idempotent and not stopped:
                self.log.record("tool.failed", {**base, "arguments": shown, "error": error,
                                                "latency_ms": latency},
                                usage=spent, reserved=worst)
                return Verdict(error, True)
            # Cut short: whether it took effect is unknown. Not a result (the journal keeps
            # the intent open), so nothing repeats it without a person's decision.
            self.log.record("tool.interrupted", {**base, "arguments": shown, "error": error,
                                                 "stopped": stopped, "latency_ms": latency},
                            usage=spent, reserved=worst)
            if stopped and error.startswith("revoked") and contract.idempotent:
                return Verdict(error, True)
            if stopped and not error.startswith("revoked"):
                return Verdict(pause=error)
            return Verdict(pause=f"unknown_outcome: {error}; it may or may not have taken "
                                 f"effect (call {key})")
        except ContractError as exc:
            latency = round((time.perf_counter() - started) * 1000, 3)
            error = redact(str(exc), self.secrets)
            self.log.record("tool.failed", {**base, "arguments": shown, "error": error,
                                            "latency_ms": latency},
                            usage=spent, reserved=worst)
            return Verdict(error, True)
        latency = round((time.perf_counter() - started) * 1000, 3)
        clean = redact(result, self.secrets)
        content = canonical_json(clean)
        self.log.record("tool.called", {**base, "arguments": shown, "result": clean,
                                        "latency_ms": latency},
                        usage=spent, reserved=worst,
                        ahead=checks_ahead(ahead, content) if ahead else None)
        return Verdict(content, False, clean, arguments=shown)
