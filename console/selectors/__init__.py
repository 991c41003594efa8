"""The console's read models: what its pages, API and live sockets show, computed once.

Views, the API and the websocket consumers read through these names; what a run waits on
comes from one rule (orchestration.engine.waiting) fed by console.selectors.waiting."""

from console.selectors.figures import (
    WINDOW_DAYS,
    Breakdown,
    CostRow,
    DashboardFigures,
    Scorecard,
    agent_grants,
    agent_scorecards,
    cost_breakdowns,
    dashboard_figures,
    escalation_reasons,
    recent_runs,
    tool_usage,
)
from console.selectors.runs import approval_out, first_unfinished, run_out, run_page
from console.selectors.waiting import people_waited_on, run_waiting_on, runs_waiting_on

__all__ = [
    "WINDOW_DAYS",
    "Breakdown",
    "CostRow",
    "DashboardFigures",
    "Scorecard",
    "agent_grants",
    "agent_scorecards",
    "approval_out",
    "cost_breakdowns",
    "dashboard_figures",
    "escalation_reasons",
    "first_unfinished",
    "people_waited_on",
    "recent_runs",
    "run_out",
    "run_page",
    "run_waiting_on",
    "runs_waiting_on",
    "tool_usage",
]
