"""The orchestration engine alone: plans, scheduling, contracts and checkpoints on a MemoryStore."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import yaml

from hashchain import GENESIS, canonical_json, chain_hash
from orchestration.engine import runner
from orchestration.engine.contracts import ToolContract, ToolRegistry
from orchestration.engine.errors import PlanError, TransitionError
from orchestration.engine.local import drive
from orchestration.engine.plan import Plan, parse_plan
from orchestration.engine.runner import Executor, advance, execute
from orchestration.engine.states import RunStatus, check_run_transition, check_task_transition
from orchestration.engine.store import MemoryEvent, MemoryStore

VALUE_OUT = {"type": "object", "required": ["value"], "additionalProperties": False,
             "properties": {"value": {"type": "integer"}}}
PAIR_IN = {"type": "object", "required": ["x", "y"], "additionalProperties": False,
           "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}}
NOTHING_IN: dict[str, Any] = {"type": "object", "additionalProperties": False}


class WorkerKilled(BaseException):
    """Stands in for a worker process dying mid-task: not an Exception, so nothing catches it."""


class Calls:
    """Thread-safe call counts per tag."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def hit(self, tag: str) -> int:
        with self._lock:
            self.counts[tag] += 1
            return self.counts[tag]


def tool(name: str, ref: str, *, depends_on: tuple[str, ...] = (),
         args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"key": name, "executor": {"type": "tool", "ref": ref},
            "depends_on": list(depends_on), "args": dict(args or {})}


def start(plan: Plan | Mapping[str, Any], run_input: Mapping[str, Any] | None = None, *,
          hydration_limit: int = 3, run_id: str = "run-1") -> tuple[MemoryStore, str]:
    store = MemoryStore()
    parsed = plan if isinstance(plan, Plan) else parse_plan(plan)
    store.create_run(run_id, parsed, run_input or {}, hydration_limit=hydration_limit)
    return store, run_id


def status_of(store: MemoryStore, run_id: str) -> str:
    return store.runs[run_id].snapshot.status


def task_of(store: MemoryStore, run_id: str, key: str) -> Any:
    return store.runs[run_id].snapshot.tasks[key]


def kinds(store: MemoryStore, run_id: str, kind: str) -> list[MemoryEvent]:
    return [e for e in store.events(run_id) if e.kind == kind]


def executors_for(registry: ToolRegistry) -> dict[str, Executor]:
    return runner.default_executors(registry)


def arithmetic(calls: Calls) -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool("emit", input_schema={"type": "object", "required": ["value"],
                                         "properties": {"value": {"type": "integer"}}},
                   output_schema=VALUE_OUT)
    def emit(value: int) -> dict[str, int]:
        calls.hit("emit")
        return {"value": value}

    @registry.tool("add", input_schema=PAIR_IN, output_schema=VALUE_OUT)
    def add(x: int, y: int) -> dict[str, int]:
        calls.hit("add")
        time.sleep(0.01)
        return {"value": x + y}

    @registry.tool("mul", input_schema=PAIR_IN, output_schema=VALUE_OUT)
    def mul(x: int, y: int) -> dict[str, int]:
        calls.hit("mul")
        time.sleep(0.02)
        return {"value": x * y}

    return registry


DIAMOND: dict[str, Any] = {
    "tasks": [
        tool("a", "emit", args={"value": "$input.seed"}),
        tool("b", "add", depends_on=("a",), args={"x": "$tasks.a.value", "y": 1}),
        tool("c", "mul", depends_on=("a",), args={"x": "$tasks.a.value", "y": 10}),
        tool("d", "add", depends_on=("b", "c"), args={"x": "$tasks.b.value",
                                                      "y": "$tasks.c.value"}),
    ],
    "result": {"total": "$tasks.d.value", "left": "$tasks.b.value", "seed": "$input.seed"},
}


@pytest.mark.parametrize("render", [json.dumps, yaml.safe_dump], ids=["json", "yaml"])
def test_it_runs_a_diamond_in_dependency_order(render: Callable[[Any], str]) -> None:
    text = render(DIAMOND)
    assert isinstance(text, str)
    plan = parse_plan(text)
    assert [t.key for t in plan.tasks] == ["a", "b", "c", "d"]
    assert plan.by_key()["d"].depends_on == ("b", "c")

    calls = Calls()
    store, run_id = start(plan, {"seed": 2})
    assert drive(store, run_id, executors_for(arithmetic(calls))) == RunStatus.SUCCEEDED

    seq: dict[tuple[str, str], int] = {}
    for event in store.events(run_id):
        if event.kind in ("task.started", "task.succeeded"):
            assert (event.kind, event.data["task"]) not in seq, "each task runs exactly once"
            seq[(event.kind, event.data["task"])] = event.seq
    for spec in plan.tasks:
        started = seq[("task.started", spec.key)]
        for dep in spec.depends_on:
            assert seq[("task.succeeded", dep)] < started, f"{spec.key} started before {dep}"
    assert seq[("task.started", "a")] < seq[("task.started", "b")]
    assert store.result(run_id) == {"total": 23, "left": 3, "seed": 2}
    assert {k: task_of(store, run_id, k).output for k in "abcd"} == {
        "a": {"value": 2}, "b": {"value": 3}, "c": {"value": 20}, "d": {"value": 23}}
    assert calls.counts == {"emit": 1, "add": 2, "mul": 1}


@pytest.mark.parametrize(("source", "message"), [
    ({"tasks": [tool("a", "emit", depends_on=("b",)), tool("b", "emit", depends_on=("a",))]},
     "dependency cycle among: a, b"),
    ({"tasks": [tool("a", "emit"), tool("b", "emit", depends_on=("a", "ghost"))]},
     "task 'b' depends on unknown task 'ghost'"),
    ({"tasks": [tool("a", "emit"), tool("a", "add")]},
     "task key 'a' appears more than once"),
    ({"tasks": [{"key": "a", "executor": {"type": "robot", "ref": "emit"}}]},
     "plan is invalid at tasks/0/executor/type: 'robot' is not one of"),
    ("tasks: [ {key: a, executor: {type: tool, ref: emit}\n",
     "the plan is neither valid JSON nor valid YAML"),
    ("- just\n- a list\n", "the plan must be a mapping with a 'tasks' list"),
], ids=["cycle", "unknown-dependency", "duplicate-key", "bad-executor-type", "unparseable",
        "not-a-mapping"])
def test_it_rejects_invalid_plans(source: str | dict[str, Any], message: str) -> None:
    with pytest.raises(PlanError) as excinfo:
        parse_plan(source)
    assert message in str(excinfo.value)


def test_it_rejects_a_cycle_written_as_yaml_text() -> None:
    text = yaml.safe_dump({"tasks": [tool("a", "emit", depends_on=("c",)),
                                     tool("b", "emit", depends_on=("a",)),
                                     tool("c", "emit", depends_on=("b",)),
                                     tool("d", "emit")]})
    with pytest.raises(PlanError, match=r"dependency cycle among: a, b, c$"):
        parse_plan(text)


@pytest.mark.parametrize("limit", [3, 1])
def test_it_never_exceeds_the_hydration_limit(limit: int) -> None:
    lock = threading.Lock()
    state = {"now": 0, "peak": 0, "calls": 0}
    registry = ToolRegistry()

    @registry.tool("work", input_schema=NOTHING_IN, output_schema={"type": "object"})
    def work() -> dict[str, Any]:
        with lock:
            state["now"] += 1
            state["calls"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
        return {}

    plan = {"tasks": [tool(f"t{i}", "work") for i in range(10)]}
    store, run_id = start(plan, hydration_limit=limit)
    assert drive(store, run_id, executors_for(registry), workers=8) == RunStatus.SUCCEEDED

    assert state["calls"] == 10
    assert state["peak"] == limit

    active, ledger_peak = 0, 0
    for event in store.events(run_id):
        if event.kind == "task.queued":
            active += 1
        elif event.kind in ("task.succeeded", "task.failed"):
            active -= 1
        ledger_peak = max(ledger_peak, active)
    assert ledger_peak == limit


def crash_once_registry(calls: Calls, crash_task: str) -> ToolRegistry:
    registry = ToolRegistry()

    @registry.tool("step", input_schema={"type": "object", "required": ["name"],
                                         "properties": {"name": {"type": "string"}}},
                   output_schema={"type": "object", "required": ["name"]})
    def step(name: str) -> dict[str, str]:
        if calls.hit(name) == 1 and name == crash_task:
            raise WorkerKilled(f"worker died while running {name}")
        return {"name": name}

    return registry


CRASH_PLAN: dict[str, Any] = {
    "tasks": [
        tool("a", "step", args={"name": "a"}),
        tool("b", "step", depends_on=("a",), args={"name": "b"}),
        tool("c", "step", depends_on=("a",), args={"name": "c"}),
        tool("d", "step", depends_on=("b", "c"), args={"name": "d"}),
    ],
    "result": {"last": "$tasks.d.name"},
}


def crash_and_recover(calls: Calls) -> tuple[MemoryStore, str, dict[str, Executor]]:
    executors = executors_for(crash_once_registry(calls, "c"))
    store, run_id = start(CRASH_PLAN)
    with pytest.raises(WorkerKilled):
        drive(store, run_id, executors)

    assert calls.counts == {"a": 1, "b": 1, "c": 1}
    stale = [k for k, t in store.runs[run_id].snapshot.tasks.items() if t.status == "running"]
    assert stale == ["c"]
    assert task_of(store, run_id, "b").status == "succeeded"
    runner.recover(store, run_id, stale)
    assert task_of(store, run_id, "c").status == "queued"
    requeued = kinds(store, run_id, "task.requeued")
    assert [e.data["task"] for e in requeued] == ["c"]
    assert requeued[0].data["reason"]
    return store, run_id, executors


def assert_resumed(store: MemoryStore, run_id: str, calls: Calls) -> None:
    assert calls.counts == {"a": 1, "b": 1, "c": 2, "d": 1}
    assert status_of(store, run_id) == RunStatus.SUCCEEDED
    assert store.result(run_id) == {"last": "d"}
    assert task_of(store, run_id, "c").attempts == 2
    assert task_of(store, run_id, "a").attempts == 1
    assert task_of(store, run_id, "b").attempts == 1


def test_it_resumes_from_checkpoint_when_the_caller_dispatches_requeued_tasks() -> None:
    calls = Calls()
    store, run_id, executors = crash_and_recover(calls)

    assert execute(store, run_id, "c", executors) is True
    assert drive(store, run_id, executors) == RunStatus.SUCCEEDED
    assert_resumed(store, run_id, calls)


def test_it_resumes_from_checkpoint_by_driving_again() -> None:
    calls = Calls()
    store, run_id, executors = crash_and_recover(calls)

    assert drive(store, run_id, executors) == RunStatus.SUCCEEDED
    assert_resumed(store, run_id, calls)


def slow_counter(calls: Calls, delay: float = 0.0) -> dict[str, Executor]:
    registry = ToolRegistry()

    @registry.tool("once", input_schema=NOTHING_IN, output_schema={"type": "object"})
    def once() -> dict[str, Any]:
        calls.hit("once")
        time.sleep(delay)
        return {"ok": True}

    return executors_for(registry)


def test_it_executes_a_doubly_delivered_task_once() -> None:
    calls = Calls()
    executors = slow_counter(calls)
    store, run_id = start({"tasks": [tool("only", "once")]})
    assert advance(store, run_id).released == ["only"]

    assert execute(store, run_id, "only", executors) is True
    assert execute(store, run_id, "only", executors) is False
    assert calls.counts["once"] == 1
    assert len(kinds(store, run_id, "task.started")) == 1
    assert advance(store, run_id).status == RunStatus.SUCCEEDED


def test_it_executes_a_task_delivered_to_two_threads_at_once_once() -> None:
    calls = Calls()
    executors = slow_counter(calls, delay=0.05)
    store, run_id = start({"tasks": [tool("only", "once")]})
    assert advance(store, run_id).released == ["only"]

    barrier = threading.Barrier(2)
    results: list[bool] = []
    results_lock = threading.Lock()

    def deliver() -> None:
        barrier.wait()
        outcome = execute(store, run_id, "only", executors)
        with results_lock:
            results.append(outcome)

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)

    assert sorted(results) == [False, True]
    assert calls.counts["once"] == 1
    assert task_of(store, run_id, "only").attempts == 1
    assert len(kinds(store, run_id, "task.started")) == 1


def test_it_fails_a_task_whose_output_breaks_its_schema() -> None:
    registry = ToolRegistry()

    @registry.tool("liar", input_schema=NOTHING_IN, output_schema=VALUE_OUT)
    def liar() -> dict[str, Any]:
        return {"value": "not a number"}

    store, run_id = start({"tasks": [tool("only", "liar")]})
    assert drive(store, run_id, executors_for(registry)) == RunStatus.FAILED

    task = task_of(store, run_id, "only")
    assert task.status == "failed"
    assert task.output is None
    assert task.error == ("liar returned output that breaks its schema: "
                          "value: 'not a number' is not of type 'integer'")
    assert store.runs[run_id].error == f"only: {task.error}"
    assert not kinds(store, run_id, "tool.called")
    assert [e.data["error"] for e in kinds(store, run_id, "tool.failed")] == [task.error]


def test_a_contracts_schemas_are_checked_once_and_a_bad_one_every_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import jsonschema

    import jsonkit

    monkeypatch.setattr(jsonkit, "_checked", set())  # none remembered from earlier tests
    checked: list[Any] = []
    real = jsonschema.Draft202012Validator.check_schema
    monkeypatch.setattr(jsonschema.Draft202012Validator, "check_schema",
                        lambda schema, **kw: (checked.append(schema), real(schema, **kw)))
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1.5}}}
    for _ in range(3):
        ToolContract("counter", lambda n: n, input_schema=schema, output_schema=VALUE_OUT)
    assert checked.count(schema) == 1
    other = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}
    ToolContract("counter", lambda n: n, input_schema=other, output_schema=VALUE_OUT)
    assert checked.count(other) == 1  # another schema is checked in its own right
    bad = {"type": "object", "properties": {"n": {"type": "integr"}}}
    for _ in range(2):
        with pytest.raises(jsonschema.SchemaError):
            ToolContract("counter", lambda n: n, input_schema=bad)
    assert checked.count(bad) == 2
    # A tuple is no JSON array: the list's verdict is not taken for it.
    listed = {"type": "object", "required": ["n"]}
    ToolContract("counter", lambda n: n, input_schema=listed, output_schema=VALUE_OUT)
    with pytest.raises(jsonschema.SchemaError):
        ToolContract("counter", lambda n: n, input_schema={"type": "object", "required": ("n",)})


def test_it_fails_invalid_arguments_without_repairing_them() -> None:
    calls = Calls()
    registry = ToolRegistry()

    @registry.tool("double", input_schema={"type": "object", "required": ["n"],
                                           "properties": {"n": {"type": "integer"}}},
                   output_schema=VALUE_OUT)
    def double(n: int) -> dict[str, int]:
        calls.hit("double")
        return {"value": n * 2}

    plan = {"tasks": [tool("only", "double", args={"n": "$input.n"})]}
    store, run_id = start(plan, {"n": "5"})
    assert drive(store, run_id, executors_for(registry)) == RunStatus.FAILED

    assert calls.counts["double"] == 0
    task = task_of(store, run_id, "only")
    assert task.status == "failed"
    assert task.error == "arguments for double are invalid: n: '5' is not of type 'integer'"
    assert "only: arguments for double are invalid" in store.runs[run_id].error
    assert not kinds(store, run_id, "tool.called")
    assert store.runs[run_id].snapshot.input == {"n": "5"}


def test_it_fails_a_tool_that_exceeds_its_timeout() -> None:
    release = threading.Event()
    registry = ToolRegistry()

    @registry.tool("hang", input_schema=NOTHING_IN, output_schema={"type": "object"},
                   timeout_s=0.1)
    def hang() -> dict[str, Any]:
        release.wait(timeout=5)
        return {}

    store, run_id = start({"tasks": [tool("only", "hang")]})
    try:
        began = time.monotonic()
        assert drive(store, run_id, executors_for(registry)) == RunStatus.FAILED
        assert time.monotonic() - began < 2
    finally:
        release.set()

    task = task_of(store, run_id, "only")
    assert task.status == "failed"
    assert "did not answer within" in task.error
    assert task.error == "hang did not answer within 0.1 s"


def test_a_call_left_running_past_its_timeout_holds_up_no_later_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Tool implementations run on threads kept for later calls once idle: one that ignores
    its timeout keeps its own thread, the next call gets another at once, and a thread that
    is idle again is taken by a later call, with nothing of the call before in its context."""
    import contextvars

    from orchestration.engine import contracts
    from orchestration.engine.contracts import opened_by_gate
    from orchestration.engine.errors import ToolTimeout

    idle: list[Any] = []
    monkeypatch.setattr(contracts._Runner, "_idle", idle)  # none left by earlier tests

    def until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 5
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.01)

    release = threading.Event()
    seen = contextvars.ContextVar("seen", default="")
    threads: list[int] = []
    contexts: list[str] = []

    def hang() -> dict[str, Any]:
        threads.append(threading.get_ident())
        release.wait(timeout=5)
        return {}

    def quick() -> dict[str, Any]:
        threads.append(threading.get_ident())
        contexts.append(seen.get())
        seen.set("left by an earlier call")
        return {}

    hanging = ToolContract("hang", hang, output_schema={"type": "object"}, timeout_s=0.1)
    answering = ToolContract("quick", quick, output_schema={"type": "object"}, timeout_s=5)
    with opened_by_gate():
        with pytest.raises(ToolTimeout):
            hanging.call({})
        began = time.monotonic()
        assert answering.call({}) == {}
        assert time.monotonic() - began < 1  # not queued behind the hanging call
        until(lambda: len(idle) == 1)  # the second runner, back
        release.set()
        until(lambda: len(idle) == 2)  # the first, its call over, after it
        assert answering.call({}) == {}  # the one idle last is taken first
    assert threads[0] != threads[1] and threads[2] == threads[0]
    assert contexts == ["", ""]


def test_it_cancels_downstream_work_when_a_branch_fails() -> None:
    calls = Calls()
    registry = ToolRegistry()

    @registry.tool("ok", input_schema={"type": "object"}, output_schema={"type": "object"})
    def ok(tag: str, delay: float = 0.0) -> dict[str, Any]:
        calls.hit(tag)
        time.sleep(delay)
        return {"tag": tag}

    @registry.tool("boom", input_schema={"type": "object"}, output_schema={"type": "object"})
    def boom(tag: str) -> dict[str, Any]:
        calls.hit(tag)
        raise ValueError("the ledger is on fire")

    plan = {"tasks": [
        tool("a", "ok", args={"tag": "a"}),
        tool("b", "boom", depends_on=("a",), args={"tag": "b"}),
        tool("c", "ok", depends_on=("a",), args={"tag": "c", "delay": 0.1}),
        tool("d", "ok", depends_on=("b",), args={"tag": "d"}),
        tool("e", "ok", depends_on=("c",), args={"tag": "e"}),
        tool("f", "ok", depends_on=("d", "e"), args={"tag": "f"}),
    ]}
    store, run_id = start(plan)
    assert drive(store, run_id, executors_for(registry)) == RunStatus.FAILED

    assert calls.counts == {"a": 1, "b": 1, "c": 1}
    statuses = store.runs[run_id].snapshot.statuses()
    assert statuses == {"a": "succeeded", "b": "failed", "c": "succeeded",
                        "d": "cancelled", "e": "cancelled", "f": "cancelled"}
    for key in "def":
        assert task_of(store, run_id, key).error == "an upstream task failed"
    error = store.runs[run_id].error
    assert error == "b: boom failed: ValueError: the ledger is on fire"
    assert store.result(run_id) is None
    final = kinds(store, run_id, "run.state")[-1]
    assert final.data["to"] == "failed" and final.data["error"] == error


def test_it_chains_the_memory_ledger() -> None:
    calls = Calls()
    store, run_id = start(DIAMOND, {"seed": 4})
    assert drive(store, run_id, executors_for(arithmetic(calls))) == RunStatus.SUCCEEDED

    events = store.events(run_id)
    assert len(events) > 10
    assert events[0].kind == "run.created"
    assert events[0].prev_hash == GENESIS
    prev = GENESIS
    for number, event in enumerate(events, start=1):
        assert event.seq == number
        assert event.prev_hash == prev
        body = canonical_json({"run": run_id, "seq": event.seq, "kind": event.kind,
                               "actor": event.actor, "data": event.data})
        assert event.hash == chain_hash(prev, body)
        prev = event.hash
    assert len({e.hash for e in events}) == len(events)

    tampered = events[3]
    forged = canonical_json({"run": run_id, "seq": tampered.seq, "kind": tampered.kind,
                             "actor": tampered.actor, "data": {**tampered.data, "forged": 1}})
    assert chain_hash(tampered.prev_hash, forged) != tampered.hash


def test_it_enforces_the_state_machines() -> None:
    assert check_run_transition("queued", "running") is RunStatus.RUNNING
    with pytest.raises(TransitionError, match="a run cannot go from succeeded to running"):
        check_run_transition("succeeded", "running")
    with pytest.raises(TransitionError, match="a run cannot go from pending to succeeded"):
        check_run_transition("pending", "succeeded")
    with pytest.raises(TransitionError, match="a task cannot go from succeeded to queued"):
        check_task_transition("succeeded", "queued")
    with pytest.raises(ValueError):
        check_run_transition("running", "exploded")

    calls = Calls()
    store, run_id = start({"tasks": [tool("only", "once")]})
    assert drive(store, run_id, slow_counter(calls)) == RunStatus.SUCCEEDED
    with pytest.raises(TransitionError):
        store.set_run_status(run_id, RunStatus.RUNNING)
    assert status_of(store, run_id) == RunStatus.SUCCEEDED
    with pytest.raises(TransitionError):
        runner.recover(store, run_id, ["only"])
    assert task_of(store, run_id, "only").status == "succeeded"
