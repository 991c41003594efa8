"""Sentinel and QC: what checks an agent task's answer before it is handed on.

When an agent gives its final answer, ``Verifier.check`` runs, in order:

1. **sentinel** (deterministic, cheap): the handoff's ``key_facts`` match the task's declared
   ``output_schema``; every tool the task called is in its ``tools`` scope; each declared
   check holds (``require`` a value, ``equal`` two values, a text ``contains`` a value, where
   the values are what the task actually did: its tool calls' arguments and results);
2. **QC** (when the plan names an auditor and the task has acceptance criteria): the audit
   agent returns, per criterion, pass or fail with evidence, and a confidence from 0 to 1.

A failed check sends the task back to its agent with the findings (the conversation goes on,
so a resumed task replays the same turns), up to the plan's rework limit; past it the task
waits for a person (``qc_mismatch``); a confidence under the threshold waits for a person too
(``low_confidence``). A task one of whose calls a reviewer rejected is not reworked: what the
reviewer refused is not asked again, and a check that fails because of it fails the task.

Every check is recorded (``sentinel.passed``/``sentinel.failed``, ``qc.checked`` with the
audit's answer, ``task.rework``); a resumed task reads the recorded audit back instead of
asking the auditor again, and a person's decision on an escalation (accept, or send back with a
note) is looked up by the escalation's call key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import jsonschema

from jsonkit import schema_problems
from orchestration.engine.governance import Governor, Usage
from orchestration.engine.handoff import HandoffError, parse_envelope
from orchestration.engine.llm import Message, Model, ModelRequest, ModelResponse, ProviderError
from orchestration.engine.plan import TaskSpec, Verification
from orchestration.engine.runner import Outcome, TaskContext, stopped_outcome
from orchestration.engine.states import TaskStatus
from orchestration.engine.transcript import conversation

MISSING = object()
_REF = re.compile(r"^\$(input|tasks|output|args)((?:\.[A-Za-z0-9_-]+)*)$")
_JSON_BLOCK = re.compile(r"```(?:json)?\s*\n(.*?)\n```", re.DOTALL)

# Decisions a person made on an escalation: "accept", "rework" (with a note) or "" (none yet).
Decided = Callable[[str], tuple[str, str]]


@dataclass(slots=True)
class Call:
    """One tool call the task made, with the arguments that actually ran (a reviewer's edit
    included) and its result or error."""

    tool: str
    arguments: Any
    result: Any = None
    error: str = ""
    denied: bool = False


@dataclass(slots=True)
class Judgement:
    """What the checks decided: ``pass``, ``rework`` (with ``findings``), ``escalate`` (with
    ``reason`` and ``key``) or ``fail``."""

    action: str
    findings: list[str] = field(default_factory=list)
    reason: str = ""
    key: str = ""
    error: str = ""
    # For an escalation: what the reviewer needs (the answer, the audit, the attempt).
    context: dict[str, Any] = field(default_factory=dict)

    def detail(self) -> str:
        return f"{self.reason}: " + "; ".join(self.findings)


@dataclass(slots=True)
class Audit:
    criteria: list[dict[str, Any]]
    confidence: float

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [c for c in self.criteria if not c.get("pass")]


def key_facts(output: Mapping[str, Any]) -> dict[str, Any]:
    handoff = output.get("handoff")
    if not isinstance(handoff, str) or not handoff.strip():
        return {}
    try:
        return dict(parse_envelope(handoff, source="the task's").key_facts)
    except HandoffError:
        return {}


def lookup(ref: Any, *, run_input: Any, outputs: Mapping[str, Any], output: Any,
           calls: Sequence[Call]) -> Any:
    """A check's value: a ``$``-reference into what the run and the task did, or a literal."""
    if not isinstance(ref, str) or not ref.startswith("$"):
        return ref
    match = _REF.match(ref)
    if match is None:
        return MISSING
    root, parts = match.group(1), [p for p in match.group(2).split(".") if p]
    node: Any
    if root == "input":
        node = run_input
    elif root == "tasks":
        node = outputs
    elif root == "output":
        node = {**(output or {}), "key_facts": key_facts(output or {})}
    else:
        node = {}
        for call in calls:
            if not call.error:
                node[call.tool] = call.arguments
    for part in parts:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, Mapping) and root == "tasks" and part == "key_facts":
            node = key_facts(node)
        else:
            return MISSING
    return node


def _number(value: Any) -> Decimal | None:
    if isinstance(value, bool):
        return None
    try:
        return Decimal(str(value)) if isinstance(value, int | float | str) else None
    except InvalidOperation:
        return None


def _same(a: Any, b: Any) -> bool:
    na, nb = _number(a), _number(b)
    if na is not None and nb is not None:
        return na == nb
    return a == b


def _spelled(value: Any) -> list[str]:
    """The ways a value may be written in text: 80, 80.0 and 80.00 are one amount."""
    number = _number(value)
    if number is None or isinstance(value, str):
        return [str(value)]
    forms = {str(value), f"{number:.2f}"}
    if number == number.to_integral_value():
        forms.add(str(int(number)))
    return sorted(forms)


def _shown(value: Any) -> str:
    return "nothing" if value is MISSING or value is None else json.dumps(value, default=str)


def sentinel(spec: TaskSpec, output: Mapping[str, Any], calls: Sequence[Call], *,
             run_input: Any, outputs: Mapping[str, Any]) -> list[str]:
    """The deterministic checks of one task's answer; each finding says what is wrong."""
    findings: list[str] = []
    if spec.output_schema:
        validator = jsonschema.Draft202012Validator(dict(spec.output_schema))
        for problem in schema_problems(validator, key_facts(output), limit=3):
            findings.append(f"output: key_facts{problem.at()}: {problem.message}")
    if spec.tools is not None:
        for name in sorted({c.tool for c in calls} - set(spec.tools)):
            findings.append(f"scope: the task called {name}, which its plan entry does not "
                            f"allow (allowed: {', '.join(spec.tools) or 'none'})")

    def value(ref: Any) -> Any:
        return lookup(ref, run_input=run_input, outputs=outputs, output=output, calls=calls)

    for check in spec.checks:
        message = check.get("message", "")
        if "require" in check:
            found = value(check["require"])
            if found is MISSING or found in (None, "", [], {}):
                findings.append(message or f"required: {check['require']} is missing")
        if "equal" in check:
            left, right = (value(r) for r in check["equal"])
            if left is MISSING or right is MISSING or not _same(left, right):
                a, b = check["equal"]
                findings.append(message or f"mismatch: {a} is {_shown(left)} but {b} is "
                                           f"{_shown(right)}")
        if "contains" in check:
            text, wanted = (value(r) for r in check["contains"])
            if (text is MISSING or wanted is MISSING or wanted in (None, "")
                    or not any(form in str(text) for form in _spelled(wanted))):
                a, b = check["contains"]
                findings.append(message or f"mismatch: {a} does not mention {b} "
                                           f"({_shown(wanted)})")
    return findings


def shown_output(output: Mapping[str, Any]) -> dict[str, Any]:
    """What an auditor reads of an agent task's output."""
    return {"answer": output.get("answer", ""), "key_facts": key_facts(output),
            "tool_results": output.get("tool_results", {})}


def audit_prompt(spec: TaskSpec, output: Mapping[str, Any], run_input: Any) -> str:
    criteria = "\n".join(f"- {c}" for c in spec.acceptance)
    shown = output.get("tasks") if "tasks" in output else shown_output(output)
    return (f"Audit task {spec.title or spec.key}: {spec.spec}\n\nAcceptance criteria:\n"
            f"{criteria}\n\nRun input (JSON):\n{json.dumps(run_input, sort_keys=True)}\n\n"
            f"What the task produced (JSON):\n{json.dumps(shown, sort_keys=True, default=str)}"
            "\n\nAnswer with JSON only: {\"criteria\": [{\"criterion\": ..., \"pass\": true|"
            "false, \"evidence\": ...}], \"confidence\": a number from 0 to 1}.")


def parse_audit(text: str, acceptance: Sequence[str]) -> Audit:
    """The auditor's answer; an answer that cannot be read is an audit with no confidence."""
    block = _JSON_BLOCK.search(text or "")
    try:
        data = json.loads(block.group(1) if block else text)
        criteria = [{"criterion": str(c.get("criterion", "")), "pass": c.get("pass") is True,
                     "evidence": str(c.get("evidence", ""))} for c in data["criteria"]]
        confidence = float(data["confidence"])
    except (ValueError, TypeError, KeyError, AttributeError):
        return Audit([{"criterion": "the audit's answer", "pass": False,
                       "evidence": "the auditor's answer was not the JSON asked for"}], 0.0)
    if not 0 <= confidence <= 1:
        confidence = 0.0
    named = {c["criterion"] for c in criteria}
    for wanted in acceptance:
        if wanted not in named:
            criteria.append({"criterion": wanted, "pass": False,
                             "evidence": "the audit did not address this criterion"})
    return Audit(criteria, confidence)


def escalated(judged: Judgement) -> Outcome:
    """The waiting outcome of an escalated check, with what the reviewer needs to decide."""
    outcome = stopped_outcome(judged.detail(), key=judged.key)
    if outcome.escalation is not None:
        outcome.escalation = {**outcome.escalation, "context": judged.context}
    return outcome


def check_run(ctx: TaskContext, verifier: Verifier) -> Outcome:
    """The run's own check (the plan's ``run_check`` task): the auditor reads every task's
    output against the goal's criteria. There is no agent to send it back to: a failure or a
    low confidence waits for a person, who accepts the run or fails it with a note."""
    outputs = {k: shown_output(v) if isinstance(v, Mapping) and "handoff" in v else v
               for k, v in ctx.dep_outputs.items()}
    verifier.settings = Verification(auditor=verifier.settings.auditor, rework_limit=0,
                                     confidence=verifier.settings.confidence)
    judged = verifier.check({"tasks": outputs}, [], 0)
    if judged.action == "pass":
        return Outcome(output={"verdict": "passed", "criteria": verifier.criteria})
    if judged.action == "escalate":
        return escalated(judged)
    return Outcome(status=TaskStatus.FAILED,
                   error=judged.error or "the run's check failed: " + "; ".join(judged.findings))


@dataclass(slots=True)
class Verifier:
    """The checks of one agent task, with what they need: the plan's QC settings, the
    auditor's model (None: no QC), the governor that budgets its calls, the step log that
    records them, what was recorded already and how people decided escalations."""

    spec: TaskSpec
    settings: Verification
    run_id: str
    run_input: Any
    outputs: Mapping[str, Any]
    record: Callable[..., None]
    recorded: Mapping[tuple[str, int], Mapping[str, Any]]
    decided: Decided
    governor: Governor
    auditor: Model | None = None
    auditor_slug: str = ""
    pricing: Callable[[int, int], Decimal] = lambda i, o: Decimal("0")
    audits: list[tuple[str, ModelResponse]] = field(default_factory=list)
    criteria: list[dict[str, Any]] = field(default_factory=list)  # the last audit's verdicts
    confidence: float | None = None  # and its confidence

    def _log(self, kind: str, round_: int, data: dict[str, Any], usage: Usage | None = None,
             reserved: Usage | None = None,
             transcript: list[dict[str, Any]] | None = None) -> None:
        if (kind, round_) in self.recorded:
            return  # a resumed task: written before the worker was lost
        # The auditor's conversation goes with its qc.checked, to be kept beside the ledger.
        extra = {"transcript": transcript} if transcript is not None else {}
        self.record(kind, {"task": self.spec.key, "round": round_, **data},
                    usage=usage or Usage(), reserved=reserved, **extra)

    def rework(self, round_: int, findings: list[str]) -> None:
        self._log("task.rework", round_, {"findings": findings, "attempt": round_ + 2})

    def check(self, output: Mapping[str, Any], calls: Sequence[Call], round_: int) -> Judgement:
        judged = self._check(output, calls, round_)
        if judged.action == "escalate":
            judged.context = {"attempt": round_ + 1, "findings": judged.findings,
                              "criteria": self.criteria, "confidence": self.confidence,
                              "answer": output.get("answer", ""),
                              "key_facts": key_facts(output)}
        return judged

    def _check(self, output: Mapping[str, Any], calls: Sequence[Call], round_: int) -> Judgement:
        escalation = f"{self.run_id}:{self.spec.key}:qc:{round_}"
        decision, note = self.decided(escalation)
        if decision:
            # The audit that led to the escalation stays in the auditor's conversation.
            recorded = self.recorded.get(("qc.checked", round_))
            if recorded is not None:
                self.audits.append((audit_prompt(self.spec, output, self.run_input),
                                    ModelResponse.from_dict(recorded["response"])))
        if decision == "accept":
            return Judgement("pass")
        if decision == "rework":
            return Judgement("rework", [f"a reviewer sent the work back: {note or 'no note'}"])
        findings = sentinel(self.spec, output, calls, run_input=self.run_input,
                            outputs=self.outputs)
        if findings:
            self._log("sentinel.failed", round_, {"findings": findings})
            return self._after_findings(findings, calls, round_, escalation)
        self._log("sentinel.passed", round_, {})
        if self.auditor is None or not self.spec.acceptance:
            return Judgement("pass")
        audit = self._audit(output, round_)
        if isinstance(audit, Judgement):
            return audit
        failed = [f"{c['criterion']}: {c['evidence']}" for c in audit.failed]
        if failed:
            return self._after_findings(failed, calls, round_, escalation, qc=True)
        if audit.confidence < self.settings.confidence:
            return Judgement("escalate", [f"the auditor's confidence {audit.confidence:g} is "
                                        f"below {self.settings.confidence:g}"],
                           reason="low_confidence", key=escalation)
        self._log("qc.passed", round_, {"confidence": audit.confidence})
        return Judgement("pass")

    def _after_findings(self, findings: list[str], calls: Sequence[Call], round_: int,
                        escalation: str, qc: bool = False) -> Judgement:
        if qc:
            self._log("qc.failed", round_, {"findings": findings})
        denied = [c for c in calls if c.denied]
        if denied:
            refused = "; ".join(f"{c.tool}: {c.error}" for c in denied)
            return Judgement("fail", findings, error="checks failed after a reviewer refused a "
                                                   f"call ({refused}): " + "; ".join(findings))
        if round_ >= self.settings.rework_limit:
            return Judgement("escalate", findings, reason="qc_mismatch", key=escalation)
        return Judgement("rework", findings)

    def _audit(self, output: Mapping[str, Any], round_: int) -> Audit | Judgement:
        assert self.auditor is not None
        recorded = self.recorded.get(("qc.checked", round_))
        messages = [Message("system", "You audit other agents' work against acceptance "
                                      "criteria. You never take actions.")]
        for prompt, earlier in self.audits:  # the auditor sees its earlier verdicts
            messages += [Message("user", prompt), Message("assistant", earlier.text)]
        prompt = audit_prompt(self.spec, output, self.run_input)
        messages.append(Message("user", prompt))
        if recorded is not None:
            response = ModelResponse.from_dict(recorded["response"])
            audit = parse_audit(response.text, self.spec.acceptance)
        else:
            worst_in = sum(len(m.content) for m in messages) // 3 + 64
            worst = Usage(tokens_in=worst_in, tokens_out=1024,
                          cost=self.pricing(worst_in, 1024))
            refused = self.governor.reserve(worst)
            if refused:
                return Judgement("escalate", [refused], reason=refused.split(":", 1)[0],
                               key=f"{self.run_id}:{self.spec.key}:qc:{round_}:budget")
            try:
                response = self.auditor.complete(ModelRequest(
                    messages=tuple(messages),
                    variables={"input": self.run_input, "task": {self.spec.key: True}}))
            except ProviderError as exc:
                self.governor.release(worst)
                return Judgement("escalate", [f"the auditor could not answer: {exc}"],
                               reason="low_confidence",
                               key=f"{self.run_id}:{self.spec.key}:qc:{round_}")
            audit = parse_audit(response.text, self.spec.acceptance)
            cost = self.pricing(response.tokens_in, response.tokens_out)
            self._log("qc.checked", round_, {
                "actor": f"agent:{self.auditor_slug}", "auditor": self.auditor_slug,
                "response": response.to_dict(), "criteria": audit.criteria,
                "confidence": audit.confidence, "tokens_in": response.tokens_in,
                "tokens_out": response.tokens_out, "cost": str(cost)},
                usage=Usage(tokens_in=response.tokens_in, tokens_out=response.tokens_out,
                            cost=cost), reserved=worst, transcript=conversation(messages))
        self.audits.append((prompt, response))
        self.criteria, self.confidence = audit.criteria, audit.confidence
        return audit
