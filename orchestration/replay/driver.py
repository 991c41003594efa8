"""The replay driver: re-run a run's plan on the stand-ins, apply the people's decisions when
the original run received them, and compare what comes out with the ledger."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import jsonschema

from orchestration import rules
from orchestration.engine.agent import AgentSpec, run_agent
from orchestration.engine.contracts import ToolContract
from orchestration.engine.delegation import Delegator
from orchestration.engine.errors import EngineError
from orchestration.engine.gate import Journal, StoreLog, ToolGate, contract_lookup
from orchestration.engine.human import HUMAN_TASK, call_key, human_outcome, no_group
from orchestration.engine.knowledge import knowledge_for
from orchestration.engine.plan import Plan, parse_plan
from orchestration.engine.runner import (
    Outcome,
    TaskContext,
    advance,
    execute,
    run_contract_task,
    stopped_outcome,
)
from orchestration.engine.states import RUN_TERMINAL, RunStatus, TaskStatus
from orchestration.engine.verify import Verifier, check_run
from orchestration.models import Agent, Run, Tool
from orchestration.replay.comparison import Recorded, ReplayResult, compare
from orchestration.replay.doubles import (
    NotRecorded,
    RecordedAuditor,
    RecordedModel,
    ReplayGovernor,
    ReplayStore,
    State,
    policies_as_of,
    recorded_contract,
)
from orchestration.replay.ledger import Ledger, Stimuli, ledger_of
from orchestration.replay.planning import PlanReplay
from orchestration.services import KILL_SWITCH_RELEASED

MAX_ITERATIONS = 10_000


class Replay:
    def __init__(self, run_id: str, events: list[Recorded], plan: Plan, run_input: Any,
                 hydration_limit: int, policies: Any, process: str = "") -> None:
        self.run_id = run_id
        self.process_actor = f"process:{process}"  # who the plan-level steps act as
        self.ledger = Ledger(events)
        self.store = ReplayStore()
        self.stimuli = self.store.stimuli = Stimuli(self.ledger)
        self.state = State(run_id=run_id, ledger=self.ledger, store=self.store)
        self.store.state = self.state
        self.plan, self.policies = plan, policies
        self.store.create_run(run_id, plan, run_input, hydration_limit)
        snapshot = self.store.runs[run_id].snapshot
        for key, output in self.ledger.reused.items():
            if key in snapshot.tasks:
                snapshot.tasks[key].status = TaskStatus.SUCCEEDED
                snapshot.tasks[key].output = output
        self.agents = {a.slug: a for a in Agent.objects.all()}
        rows = list(Tool.objects.all())
        self.risk = {t.slug: t.risk_class for t in rows}
        self.tools: dict[str, ToolContract] = {}
        self.unusable: dict[str, str] = {}
        for row in rows:
            try:
                self.tools[row.slug] = recorded_contract(_contract_shape(row), self.state)
            except jsonschema.SchemaError as exc:  # production escalated configuration_error
                self.unusable[row.slug] = (f"tool {row.slug!r} has a schema that is not valid "
                                           f"JSON Schema: {exc.message}")
        self.executors = {"tool": self._tool, "function": self._tool, "agent": self._agent,
                          "audit": self._audit, "human": self._human}
        # A planned run plans first, from its planner's recorded turns.
        self.planner = PlanReplay(run_id, plan, self.store, self.state,
                                  run_input) if plan.planning else None

    @property
    def pending(self) -> list[Recorded]:
        return self.stimuli.pending

    # executors -----------------------------------------------------------------------
    def _tool(self, ctx: TaskContext) -> Outcome:
        task = ctx.spec.key
        self.state.current_key = ctx.idempotency_key(0)
        log = StoreLog(self.store, self.run_id, task)
        gate = ToolGate(contracts=contract_lookup(self.tools, self.unusable), log=log,
                        journal=log.journal(),
                        governor=ReplayGovernor(self.state, ctx, self.policies, self.risk),
                        granted=self._granted(task), task=task, actor=self.process_actor,
                        steps=1, watch_grant=False)
        return run_contract_task(ctx, gate)

    def _granted(self, task: str) -> Any:
        """Grants as they were: a call the original run refused is refused again."""
        refused = self.ledger.refused[task]

        def granted(name: str) -> bool:
            if refused and refused[0] == name:
                refused.popleft()
                return False
            return True

        return granted

    def _agent(self, ctx: TaskContext) -> Outcome:
        task = ctx.spec.key
        end = self.ledger.end(task, ctx.attempt)
        if end.startswith("configuration_error"):
            return stopped_outcome(end, key=f"{ctx.run_id}:{task}:configuration:{ctx.attempt}")
        if end.startswith("agent_retired"):
            return Outcome(status=TaskStatus.WAITING, error=end, escalation={
                "reason": "agent_retired", "detail": end,
                "call_key": f"{ctx.run_id}:{task}:retired"})
        agent = self.agents.get(ctx.spec.executor_ref)
        if agent is None:
            return Outcome(status=TaskStatus.FAILED,
                           error=f"no agent named {ctx.spec.executor_ref!r}")
        spec = AgentSpec(slug=agent.slug, instructions=agent.instructions,
                         step_budget=agent.step_budget + self.state.extra_steps[task],
                         token_budget=agent.token_budget or None,
                         max_output_tokens=int(agent.model_params.get("max_tokens", 1024)))
        governor = ReplayGovernor(self.state, ctx, self.policies, self.risk)
        log = StoreLog(self.store, self.run_id, task)
        verifier = self._verifier(ctx, governor, log, self.plan.verification.auditor)
        delegator = None
        if ctx.spec.delegates:  # handoffs add tasks to the replay's plan, as production's did
            delegator = Delegator(store=self.store, run_id=self.run_id, spec=ctx.spec,
                                  plan=self.store.runs[self.run_id].snapshot.plan, log=log,
                                  journal=Journal(), governor=governor,
                                  actor=f"agent:{agent.slug}")
        try:  # the chunks the original gave the prompt: a replay never searches
            knowledge = knowledge_for(ctx, log, lambda: self._knowledge(task),
                                      actor=f"agent:{agent.slug}")
        except NotRecorded as exc:
            # The original's retrieval failed before anything was recorded (an embeddings
            # endpoint down, a collection past its scan limit): its attempt ended with that
            # error, and so does the replay's.
            return Outcome(status=TaskStatus.FAILED,
                           error=self.ledger.end(task, ctx.attempt) or str(exc))
        return run_agent(ctx, spec, RecordedModel(self.ledger, task), self.tools, log,
                         granted=self._granted(task), governor=governor,
                         unusable=self.unusable, watch_grant=False, verifier=verifier,
                         delegator=delegator, knowledge=knowledge)

    def _knowledge(self, task: str) -> dict[str, Any]:
        recorded = self.ledger.knowledge.get(task)
        if recorded is None:
            raise NotRecorded(f"replay: the ledger holds no knowledge retrieved for task {task}; "
                              "a replay never searches")
        return recorded

    def _verifier(self, ctx: TaskContext, governor: ReplayGovernor, log: StoreLog,
                  auditor: str) -> Verifier:
        """The checks as production ran them, the auditor answering from the ledger."""
        audited = bool(auditor and ctx.spec.acceptance)
        return Verifier(spec=ctx.spec, settings=self.plan.verification, run_id=ctx.run_id,
                        run_input=ctx.run_input, outputs=ctx.dep_outputs, record=log.record,
                        recorded={}, decided=governor.qc_decision, governor=governor,
                        auditor=RecordedAuditor(self.ledger, ctx.spec.key) if audited else None,
                        auditor_slug=auditor)

    def _audit(self, ctx: TaskContext) -> Outcome:
        governor = ReplayGovernor(self.state, ctx, self.policies, self.risk)
        log = StoreLog(self.store, self.run_id, ctx.spec.key)
        verifier = self._verifier(ctx, governor, log, ctx.spec.executor_ref)
        verifier.recorded = log.journal().checks
        return check_run(ctx, verifier)

    def _human(self, ctx: TaskContext) -> Outcome:
        """A person's task: the same rule as production's, asked with the replay's twin of
        the task's request (its recorded response applied when the original received it)."""
        request = self.state.latest(call_key(ctx), HUMAN_TASK)
        if request is None:
            end = self.ledger.end(ctx.spec.key, ctx.attempt)
            if end.startswith("configuration_error"):  # its group did not exist then
                return no_group(ctx, end)
            return human_outcome(ctx, status=None)
        return human_outcome(ctx, status=request.status, output=request.output,
                             note=request.note)

    def _ended_at(self, key: str) -> float:
        """Production ran tasks side by side; the replay runs one at a time, each in the order
        the original's attempts ended (plan order for ties and for attempts that never ended),
        so a task that waited while another still ran waits here while that one is queued."""
        attempt = self.store.runs[self.run_id].snapshot.tasks[key].attempts + 1
        return self.ledger.ended_at.get((key, attempt), float("inf"))

    # people's decisions, when the original run received them ---------------------------
    def _due(self, stimulus: Recorded) -> bool:
        return self.stimuli.due(stimulus)

    def _apply(self, stimulus: Recorded) -> None:
        self.stimuli.take(stimulus)
        snapshot = self.store.runs[self.run_id].snapshot
        if stimulus.kind == "run.cancel_requested":
            snapshot.cancel_requested = True
            self.store.record(self.run_id, "run.cancel_requested", {})
            for request in self.state.requests.values():
                if request.status == "pending":
                    request.status = "cancelled"
            return
        data = stimulus.data
        if stimulus.kind == "task.requeued":  # a kill switch was released
            task = snapshot.tasks.get(data.get("task", ""))
            if task is not None and task.status == TaskStatus.WAITING:
                self.store.requeue_task(self.run_id, task.key, reason=KILL_SWITCH_RELEASED)
            return
        request = self.state.requests.get(data.get("request", ""))
        if request is None:
            return  # the replay never asked for it; the comparison shows where it differs
        resolution = data.get("resolution") or {}
        request.status = data.get("status", "")
        request.note = resolution.get("note", "")
        if "arguments" in resolution:
            request.arguments = resolution["arguments"]
        if "output" in resolution:
            request.output = resolution["output"]
        if request.reason in rules.PLAN_REASONS and self.planner is not None:
            self.planner.resolve(request, resolution)
            return
        task = snapshot.tasks.get(request.task)

        def agent_steps() -> int | None:
            plan = self.store.runs[self.run_id].snapshot.plan
            agent = self.agents.get(plan.by_key()[request.task].executor_ref)
            return agent.step_budget if agent is not None else None

        # The same rule production's resume applies (orchestration/rules.py).
        todo = rules.apply_resolution(
            task_waiting=task is not None and task.status == TaskStatus.WAITING,
            reason=request.reason, resolution=resolution, agent_step_budget=agent_steps)
        if todo.action in ("cancel", "nothing"):
            return  # a stop reaches the replay as the run's own recorded cancel request
        if todo.action == "fail":
            self.store.finish_task(self.run_id, request.task, TaskStatus.FAILED,
                                   error=todo.error)
            return
        if todo.budget is not None:
            self.state.extra_steps[request.task] += int(todo.budget.get("steps", 0))
            self.store.record(self.run_id, "budget.raised", {"task": request.task,
                                                             "raise": todo.budget})
        self.store.requeue_task(self.run_id, request.task,
                                reason=f"approval {request.id} {request.status}")
        # As production's resume does: the run resumes before the task runs again (a task
        # that waits again at once, e.g. a human task after its group was created, makes the
        # run wait a second time).
        advance(self.store, self.run_id)

    def run(self) -> str:
        for _ in range(MAX_ITERATIONS):
            for stimulus in list(self.pending):
                if self._due(stimulus):
                    self._apply(stimulus)
            if self.planner is not None:
                snapshot = self.store.runs[self.run_id].snapshot
                if (snapshot.status in (RunStatus.PENDING, RunStatus.PLANNING)
                        and not snapshot.cancel_requested):
                    self.planner.turn()
                    continue
                self.plan = self.planner.accepted or self.plan
            with self.store.locked(self.run_id) as snapshot:
                # (the run's own plan: delegated tasks join it as they are delegated)
                queued = [t.key for t in snapshot.plan.tasks
                          if snapshot.tasks[t.key].status == TaskStatus.QUEUED]
            if queued:
                asked = set(self.state.requests)
                execute(self.store, self.run_id, min(queued, key=self._ended_at),
                        self.executors)
                # A decision the original received while this task ran is applied before the
                # run's state is settled, as production's resume did alongside it. Not one on
                # a request this task just raised: production settles the run's state in the
                # transaction that records the task's end and its request, before anyone can
                # see the request, let alone decide it.
                raised = set(self.state.requests) - asked
                for stimulus in list(self.pending):
                    if self._due(stimulus) and stimulus.data.get("request") not in raised:
                        self._apply(stimulus)
                advance(self.store, self.run_id)
                continue
            result = advance(self.store, self.run_id)
            if result.released:
                continue
            if result.status in RUN_TERMINAL or not self.pending:
                return str(result.status)
            self._apply(self.pending[0])
        raise EngineError(f"the replay did not settle within {MAX_ITERATIONS} steps")


def _contract_shape(tool: Tool) -> ToolContract:
    """A tool row's contract (schemas, idempotency), without its implementation."""
    return ToolContract(name=tool.slug, fn=lambda **_: None, input_schema=tool.input_schema,
                        output_schema=tool.output_schema, idempotent=tool.idempotent,
                        description=tool.description, cost_per_call=tool.cost_per_call)


def _as_recorded(events: Iterable[Any]) -> list[Recorded]:
    return [Recorded(seq=e.seq, kind=e.kind, data=e.data) for e in events]


def replay(run: Run, *, events: list[Recorded] | None = None,
           plan: Mapping[str, Any] | None = None,
           policies_at: datetime | None = None) -> ReplayResult:
    """Replay ``run`` from its ledger (or from ``events``, e.g. an altered copy) under its pinned
    plan (or ``plan``) and the policies in force when it started (or at ``policies_at``)."""
    original = ledger_of(run) if events is None else list(events)
    parsed = parse_plan(plan if plan is not None else run.process_version.plan)
    replayer = Replay(str(run.pk), original, parsed, run.input,
                      run.process_version.hydration_limit,
                      policies_as_of(policies_at or run.created_at),
                      process=run.process_version.process.slug)
    error, status = "", ""
    try:
        status = replayer.run()
    except EngineError as exc:
        error = str(exc)
    replayed = _as_recorded(replayer.store.events(str(run.pk)))
    compared, divergence = compare(original, replayed)
    return ReplayResult(run_id=str(run.pk), compared=compared, status=status,
                        divergence=divergence, error=error if divergence is None else "")
