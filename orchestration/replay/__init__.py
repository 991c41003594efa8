"""Replay: re-run a run's engine logic over its ledger and check that the same decisions come out.

Nothing external is called. Model turns and tool results are fed back from the recorded events
through a model and tools that can only answer from the ledger (a step the ledger does not hold
fails instead of calling out), people's decisions are applied when the original run received
them, and the approval policies in force when the run started are evaluated again, by the same
rules the live run used (approvals/rules.py, orchestration/rules.py). The replay writes its own
events to an in-memory store; task by task and for the run's states they are compared with the
original ones, and the first difference is reported.

Modules: ``comparison`` (what is compared), ``ledger`` (the original ledger, indexed),
``doubles`` (model, tools, governor and store answering from the ledger), ``driver``.
"""

from __future__ import annotations

from orchestration.replay.comparison import Divergence, Recorded, ReplayResult, compare
from orchestration.replay.doubles import (
    NotRecorded,
    RecordedModel,
    ReplayGovernor,
    ReplayStore,
    policies_as_of,
)
from orchestration.replay.driver import MAX_ITERATIONS, replay
from orchestration.replay.ledger import ledger_of

__all__ = ["MAX_ITERATIONS", "Divergence", "NotRecorded", "Recorded", "RecordedModel",
           "ReplayGovernor", "ReplayResult", "ReplayStore", "compare", "ledger_of",
           "policies_as_of", "replay"]
