"""Replaying a planned run's planning: the planner's recorded turns are fed back in order, each
proposal is validated again (orchestration/planning.py's checks), and the design gate and the
reviewers' recorded decisions on plans are applied by the rules production used
(orchestration/engine/planner.py, orchestration/rules.py)."""

from __future__ import annotations

from collections import deque
from typing import Any

from approvals.models import Reason
from orchestration import planning, rules
from orchestration.engine import planner
from orchestration.engine.errors import EngineError, PlanError
from orchestration.engine.plan import Plan
from orchestration.engine.states import RunStatus
from orchestration.engine.store import TaskSnapshot
from orchestration.models import Agent
from orchestration.replay.doubles import ReplayStore, Request, State


class PlanReplay:
    """The planning phase of one replayed run, on the replay's store."""

    def __init__(self, run_id: str, plan: Plan, store: ReplayStore, state: State,
                 run_input: Any = None) -> None:
        self.run_id, self.store, self.state, self.run_input = run_id, store, state, run_input
        self.planning, self.gate = plan.planning, plan.design_gate
        self.turns: deque[Any] = deque(e.data.get("response") or {}
                                       for e in state.ledger.events
                                       if e.kind == planner.PROPOSED)
        agent = Agent.objects.filter(slug=self.planning.get("agent", "")).first()
        self.budget = (agent.step_budget if agent is not None else 0) or planner.DEFAULT_TURNS
        self.history: list[tuple[str, dict[str, Any]]] = []
        self.version = 0
        self.current: tuple[Plan, int] | None = None
        self.accepted: Plan | None = None

    def _record(self, kind: str, data: dict[str, Any]) -> None:
        self.store.record(self.run_id, kind, data)
        self.history.append((kind, data))

    def _status(self) -> str:
        return self.store.runs[self.run_id].snapshot.status

    def turn(self) -> None:
        """One planner turn, from the ledger (the run is pending or planning)."""
        if self._status() == RunStatus.PENDING:
            self.store.set_run_status(self.run_id, RunStatus.PLANNING,
                                      reason="the planner plans the run")
        if not self.turns:
            raise EngineError("replay: the ledger holds no further planner turn; a replay "
                              "never calls a model")
        response = self.turns.popleft()
        self.version += 1
        self._record(planner.PROPOSED, {"version": self.version, "response": response})
        try:
            proposed: Any = planner.extract(str(response.get("text", "")))
            plan, errors, used = planning.check_for(self.run_id, proposed)
        except PlanError as exc:
            proposed, plan, errors, used = None, None, [str(exc)], []
        if plan is None:
            self._record(planner.REJECTED, {"version": self.version, "errors": errors})
            if not planner.turns_left(self.budget, self.history):
                self.store.set_run_status(self.run_id, RunStatus.AWAITING_PLAN_APPROVAL,
                                          reason="plan_invalid: the planner found no valid plan")
                self._open(Reason.PLAN_INVALID, proposed if isinstance(proposed, dict) else {})
            return
        self._record(planner.VALIDATED, {"version": self.version,
                                         "estimate": str(planner.estimate(plan))})
        self.current = (plan, self.version)
        reasons = planner.gate_reasons(self.gate, plan, used, self.run_input)
        if not reasons:
            self._accept(plan, self.version)
            return
        self.store.set_run_status(self.run_id, RunStatus.AWAITING_PLAN_APPROVAL,
                                  reason="plan_review: " + "; ".join(reasons))
        self._open(Reason.PLAN_REVIEW, plan.to_dict())

    def _open(self, reason: str, arguments: Any) -> None:
        self.state.open_request(task="", call_key="", reason=reason, tool="",
                                arguments=arguments, policy=None)

    def _accept(self, plan: Plan, version: int) -> None:
        snapshot = self.store.runs[self.run_id].snapshot
        snapshot.plan = plan
        snapshot.tasks = {t.key: TaskSnapshot(key=t.key, status="pending") for t in plan.tasks}
        self.accepted = plan
        self.store.set_run_status(self.run_id, RunStatus.QUEUED,
                                  reason=f"plan v{version} accepted")

    def resolve(self, request: Request, resolution: dict[str, Any]) -> None:
        """A reviewer's recorded decision on a plan request, by production's rule."""
        if self._status() != RunStatus.AWAITING_PLAN_APPROVAL:
            return
        todo = rules.plan_resolution(reason=request.reason, status=request.status,
                                     resolution=resolution)
        if todo.action == "cancel":
            return  # reaches the replay as the run's own recorded cancel request
        if todo.action == "accept" and self.current is not None:
            plan, version = self.current
            self._record(planner.APPROVED, {"version": version})
            self._accept(plan, version)
            return
        if todo.action == "edit":
            self.version += 1
            self._record(planner.EDITED, {"version": self.version, "plan": todo.plan})
            plan, errors, _ = planning.check_for(self.run_id, todo.plan)
            if plan is not None:
                self._record(planner.VALIDATED, {"version": self.version,
                                                 "estimate": str(planner.estimate(plan))})
                self._record(planner.APPROVED, {"version": self.version})
                self._accept(plan, self.version)
                return
            self._record(planner.REJECTED, {"version": self.version, "errors": errors,
                                            "by_planner": False})
            todo = rules.PlanDecision("replan", note="the edited plan is no longer valid: "
                                      + "; ".join(errors))
        self._record(planner.FEEDBACK, {"note": todo.note})
        self.store.set_run_status(self.run_id, RunStatus.PLANNING,
                                  reason="sent back to the planner")
