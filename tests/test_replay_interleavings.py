"""Replay does not depend on how side-by-side tasks interleaved in production.

One contract-review run with a low-confidence audit is recorded: its clause checks `liability`
(reworked once after QC) and `termination` (waits for a reviewer) run side by side. Its ledger
is then re-ordered into each order production could have written, by explicit moves of named
events, and every copy must replay: (a) termination waits, is approved and requeued while
liability still runs, so the run never waits; (b) the decision is recorded while liability runs
but the resume requeues termination after liability ended, so the run waits in between; (c)
liability runs to its end before termination starts; (d) liability ends while termination waits
for the decision. Copies that no production run could have written must not replay."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import pytest

from orchestration.models import Run
from orchestration.replay import replay
from orchestration.replay.comparison import Recorded
from orchestration.replay.ledger import ledger_of
from tests.conftest import wait_for
from tests.test_contract_review import CONTRACT, Api, request_for

Events = list[Recorded]
Pred = Callable[[Recorded], bool]


def record_flagged_run(client: Any) -> Run:
    """The run of tests/test_contract_review.py's flagged small contract, to its success."""
    operator, reviewer = Api(client, "operator"), Api(client, "reviewer")
    run_id = operator.post("/api/v1/runs", {"process": "contract-review", "input": {
        **CONTRACT, "value": 5000, "force_low_confidence": True}}).json()["id"]
    unsure = request_for(run_id, "low_confidence")
    assert unsure.task_key == "termination"
    assert reviewer.post(f"/api/v1/approvals/{unsure.pk}/decision",
                         {"decision": "approve"}).status_code == 200
    signoff = request_for(run_id, "human_task")
    assert reviewer.post(f"/api/v1/approvals/{signoff.pk}/decision", {
        "decision": "respond", "output": {"decision": "do not sign"}}).status_code == 200
    return wait_for(lambda: Run.objects.filter(pk=run_id, status="succeeded").first(),
                    timeout=60, what="the run to succeed")


# Moves. Until `renumbered`, every event keeps its original seq, so a named set of events is a
# set of seqs and stays the same set however the copy is re-ordered.

def named(seqs: Collection[int]) -> Pred:
    return lambda e: e.seq in seqs


def any_of(*preds: Pred) -> Pred:
    return lambda e: any(pred(e) for pred in preds)


def only(events: Events, pred: Pred) -> int:
    """The index of the one event ``pred`` names (an anchor must be unambiguous)."""
    found = [i for i, e in enumerate(events) if pred(e)]
    assert len(found) == 1, f"an anchor names {len(found)} events"
    return found[0]


def move_after(events: Events, pred: Pred, anchor: Pred) -> Events:
    """The events ``pred`` names, in their order, taken out and put right after ``anchor``."""
    moved, rest = [e for e in events if pred(e)], [e for e in events if not pred(e)]
    assert moved, "a move names no events"
    at = only(rest, anchor) + 1
    return rest[:at] + moved + rest[at:]


def move_before(events: Events, pred: Pred, anchor: Pred) -> Events:
    moved, rest = [e for e in events if pred(e)], [e for e in events if not pred(e)]
    assert moved, "a move names no events"
    at = only(rest, anchor)
    return rest[:at] + moved + rest[at:]


def insert_after(events: Events, anchor: Pred, *new: Recorded) -> Events:
    at = only(events, anchor) + 1
    return events[:at] + list(new) + events[at:]


def without(events: Events, pred: Pred) -> Events:
    return [e for e in events if not pred(e)]


def renumbered(events: Events) -> Events:
    """The copy as a ledger: seq 1, 2, 3... in its new order."""
    return [Recorded(seq=i, kind=e.kind, data=e.data, at=e.at)
            for i, e in enumerate(events, start=1)]


class Named:
    """The events the interleavings move, found by what they are in the recorded run."""

    def __init__(self, events: Events) -> None:
        def seqs(pred: Pred) -> frozenset[int]:
            return frozenset(e.seq for e in events if pred(e))

        def task(e: Recorded) -> str:
            return str(e.data.get("task", ""))

        def is_(kind: str, key: str) -> Pred:
            return lambda e: e.kind == kind and task(e) == key

        asked = next(e for e in events if e.kind == "approval.requested"
                     and e.data.get("reason") == "low_confidence")
        request = asked.data["request"]
        first = next(e.seq for e in events if is_("task.started", "termination")(e))
        requeue = next(e for e in events if is_("task.requeued", "termination")(e))
        assert requeue.data["reason"] == f"approval {request} approved"
        signoff_queued = next(e.seq for e in events if is_("task.queued", "legal_signoff")(e))
        self.waiting_reason = f"termination: {asked.data['detail']}"
        self.liability_started = named(seqs(is_("task.started", "liability")))
        self.termination_queued = named(seqs(is_("task.queued", "termination")))
        self.liability_rework = named(seqs(is_("task.rework", "liability")))
        self.liability_end = named(seqs(is_("task.succeeded", "liability")))
        self.termination_asked = named({asked.seq})
        # termination's first attempt: started, the model, the checks, its wait and request
        self.first_attempt = named(seqs(lambda e: task(e) == "termination"
                                        and first <= e.seq <= asked.seq))
        self.decision = named(seqs(lambda e: e.kind in ("approval.decision",
                                                        "approval.resolved")
                                   and e.data.get("request") == request))
        self.resolved = named(seqs(lambda e: e.kind == "approval.resolved"
                                   and e.data.get("request") == request))
        self.requeue = named({requeue.seq})
        self.termination_end = named(seqs(is_("task.succeeded", "termination")))
        self.second_attempt = named(seqs(lambda e: task(e) == "termination"
                                         and e.seq > requeue.seq))
        # Whether the run waited for termination depends on the recorded interleaving: every
        # copy decides that for itself.
        self.run_waits = named(seqs(lambda e: e.kind == "run.state" and e.seq < signoff_queued
                                    and "waiting" in (e.data.get("from"), e.data.get("to"))))
        self.the_run_waits = Recorded(seq=-1, kind="run.state", data={
            "from": "running", "to": "waiting", "reason": self.waiting_reason})
        self.the_run_resumes = Recorded(seq=-2, kind="run.state", data={
            "from": "waiting", "to": "running", "reason": "resumed"})
        self.waits = named({-1})
        self.resumes = named({-2})


def interleavings(events: Events) -> dict[str, Events]:
    """Each order production could have written this run's ledger in (before renumbering)."""
    n = Named(events)
    # Both tasks are released by one advance as the run starts (it claims the first for the
    # worker that runs it and queues the second): every copy starts that way.
    base = move_after(without(events, n.run_waits), n.termination_queued, n.liability_started)
    whole_termination = any_of(n.first_attempt, n.decision, n.requeue, n.second_attempt)
    # (c) liability first: then termination alone, so the run waits for its reviewer.
    serial = move_after(base, whole_termination, n.liability_end)
    serial = insert_after(serial, n.termination_asked, n.the_run_waits)
    serial = insert_after(serial, n.requeue, n.the_run_resumes)
    # (d) termination waits while liability runs; liability ends before the decision, so the
    # run waits from liability's end until the resume.
    waited = move_after(serial, n.first_attempt, n.termination_queued)
    # (b) the decision is recorded while liability is reworked, but the resume (a transaction
    # of its own) requeues termination only after liability ended and the run went waiting.
    resumed_late = move_after(waited, n.decision, n.liability_rework)
    # (a) decision and resume both while liability runs: the run never waits; termination's
    # second attempt runs after liability's end, or (a') before it.
    no_wait = move_after(without(resumed_late, any_of(n.waits, n.resumes)),
                         n.requeue, n.resolved)
    both_before = move_before(no_wait, n.second_attempt, n.liability_end)
    return {"(a) resumed while liability runs": no_wait,
            "(a') termination done while liability runs": both_before,
            "(b) decided while liability runs, resumed after it": resumed_late,
            "(c) liability then termination": serial,
            "(d) liability ends while termination waits": waited}


def assert_consistent(events: Events, recorded: Events) -> None:
    """A copy only changes how the tasks interleaved: each task's events, and the decision's
    request → decision → requeue, keep their recorded order; the sign-off comes after both."""
    position = {e.seq: i for i, e in enumerate(events)}
    streams: dict[str, list[int]] = {}
    for e in recorded:
        if e.seq in position and e.data.get("task"):
            streams.setdefault(str(e.data["task"]), []).append(position[e.seq])
    for key, places in streams.items():
        assert places == sorted(places), f"task {key}'s own events are out of order"
    n = Named(recorded)
    chain = [i for i, e in enumerate(events)
             if n.termination_asked(e) or n.decision(e) or n.requeue(e)]
    assert [events[i].kind for i in chain] == [
        "approval.requested", "approval.decision", "approval.resolved", "task.requeued"]
    signoff = next(i for i, e in enumerate(events) if e.data.get("task") == "legal_signoff")
    assert all(i < signoff for i, e in enumerate(events)
               if n.liability_end(e) or n.second_attempt(e))


@pytest.mark.django_db(transaction=True)
def test_every_production_interleaving_of_side_by_side_tasks_replays(
        runner: None, demo: None, client: Any) -> None:
    run = record_flagged_run(client)
    recorded = ledger_of(run)
    assert replay(run).ok
    copies = interleavings(recorded)
    n = Named(recorded)
    for events in copies.values():
        assert_consistent(events, recorded)
    # where liability ends and the run waits, among termination's wait, decision and requeue
    landmarks = {name: [label for e in events for label, pred in (
        ("termination waits", n.termination_asked), ("decided", n.resolved),
        ("requeued", n.requeue), ("termination ends", n.termination_end),
        ("liability ends", n.liability_end), ("run waits", n.waits),
        ("run resumes", n.resumes)) if pred(e)] for name, events in copies.items()}
    assert landmarks == {
        "(a) resumed while liability runs": [
            "termination waits", "decided", "requeued", "liability ends", "termination ends"],
        "(a') termination done while liability runs": [
            "termination waits", "decided", "requeued", "termination ends", "liability ends"],
        "(b) decided while liability runs, resumed after it": [
            "termination waits", "decided", "liability ends", "run waits", "requeued",
            "run resumes", "termination ends"],
        "(c) liability then termination": [
            "liability ends", "termination waits", "run waits", "decided", "requeued",
            "run resumes", "termination ends"],
        "(d) liability ends while termination waits": [
            "termination waits", "liability ends", "run waits", "decided", "requeued",
            "run resumes", "termination ends"]}
    failures = {}
    for name, events in copies.items():
        result = replay(run, events=renumbered(events))
        if not result.ok:
            failures[name] = result.summary()
    assert not failures, failures


def changed(events: Events, pred: Pred, **data: Any) -> Events:
    """The copy with the one event ``pred`` names recording something else."""
    at = only(events, pred)
    e = events[at]
    return events[:at] + [Recorded(seq=e.seq, kind=e.kind, data={**e.data, **data},
                                   at=e.at)] + events[at + 1:]


@pytest.mark.django_db(transaction=True)
def test_a_ledger_no_production_run_could_have_written_does_not_replay(
        runner: None, demo: None, client: Any) -> None:
    run = record_flagged_run(client)
    recorded = ledger_of(run)
    copies, n = interleavings(recorded), Named(recorded)
    no_wait, serial = copies["(a) resumed while liability runs"], copies[
        "(c) liability then termination"]
    done_first = copies["(a') termination done while liability runs"]
    liability_output = next(e for e in recorded if n.liability_end(e)).data["output"]
    wrong = {
        # the run waited although no task was waiting: termination was done, liability ran
        "a wait while nothing waits": ("run", insert_after(insert_after(
            done_first, n.termination_end, n.the_run_waits), n.waits, n.the_run_resumes)),
        # the run never waited although termination waited alone for its reviewer
        "no wait while only termination waits": ("run", without(
            serial, any_of(n.waits, n.resumes))),
        # the recorded answer of liability is not the one its model's turns give
        "another liability answer": ("task liability", changed(
            no_wait, n.liability_end, output={**liability_output, "answer": "No cap."})),
    }
    for name, (stream, events) in wrong.items():
        result = replay(run, events=renumbered(events))
        assert not result.ok, name
        assert result.divergence is not None and result.divergence.stream == stream, (
            name, result.summary())


def test_a_budget_raise_is_due_where_the_resume_requeued_less_its_own_raise() -> None:
    """The resume writes budget.raised in the waiting task's stream and then requeues it; the
    replay writes that budget.raised itself when it applies the decision, so the decision must
    not wait for it (it would never come due while another task still runs)."""
    from orchestration.replay.comparison import Recorded
    from orchestration.replay.ledger import Ledger

    events = [
        Recorded(1, "run.state", {"from": "queued", "to": "running"}),
        Recorded(2, "task.started", {"task": "a", "attempt": 1}),
        Recorded(3, "task.waiting", {"task": "a", "error": "budget_exhausted: spent"}),
        Recorded(4, "task.started", {"task": "b", "attempt": 1}),
        Recorded(5, "approval.resolved", {"request": "r1", "status": "budget_raised",
                                          "resolution": {"action": "raise_budget",
                                                         "budget": {"tokens": 5}}}),
        Recorded(6, "model.called", {"task": "b", "step": 1, "response": {}}),
        Recorded(7, "budget.raised", {"task": "a", "raise": {"tokens": 5}}),
        Recorded(8, "task.requeued", {"task": "a", "reason": "approval r1 budget_raised"}),
    ]
    [before] = Ledger(events).before
    assert before == {"run": 1, "task a": 2, "task b": 2}
