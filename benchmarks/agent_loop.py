"""Per-step cost of a governed agent loop: Switchboard's engine (ledger on) against LangGraph
(checkpointer on, durability "sync"), on SQLite and on PostgreSQL.

    .venv/bin/pip install -r benchmarks/requirements.txt
    .venv/bin/python benchmarks/agent_loop.py

The loop is the same on both sides: a scripted model makes 20 tool-calling turns (each calls
``lookup_order``) and then answers. A *step* is one model turn plus its tool call.

- Engine: ``orchestration.agents.run_agent_task``, exactly as a worker runs an agent task: the
  agent, its scripted model and its granted tools are loaded from the database, every model and
  tool call is checked (grant, budgets, approval policy, quota) and checkpointed by
  ``DjangoRunStore.record_step`` (a hash-chained ledger event plus the run's counters, in one
  transaction). A second row, "engine, ledger only", drives ``run_agent`` with the same
  ``StoreLog(DjangoRunStore)`` step log but without the governor, to show what governance costs.
  A step ends when ``record("tool.called", ...)`` has returned, i.e. after its commit.
- LangGraph: a ``StateGraph`` with an ``agent`` node (the same ``ScriptedModel``) and a ``tools``
  node (the same ``lookup_order`` function), looping until the final turn, compiled with
  ``SqliteSaver`` or ``PostgresSaver`` and streamed with ``durability="sync"``. A step ends when
  the ``tools`` update of that step is yielded; the checkpoints of each super-step are awaited
  before the next one starts, so step k's interval holds the writes of one agent and one tools
  super-step.

Both sides use the same throwaway database per backend (a temp SQLite file each, WAL with
synchronous=NORMAL on both; one fresh PostgreSQL database, created and dropped here). Each
backend runs in its own subprocess, since Django reads its settings once per process. Numbers are
microseconds per step over steps 2..20 of every measured run (step 1 also pays for set-up that
differs between the two); "whole run" is the loop's wall time divided by 20.

Options: ``--runs N`` (measured runs per loop, default 10), ``--warmup N`` (default 1),
``--only sqlite|postgres``, ``--postgres-url`` (server to create the throwaway database on;
default ``$BENCH_POSTGRES_URL`` or postgresql://postgres@127.0.0.1:5432/postgres),
``--json PATH`` (write the numbers), ``--check`` (exit 1 if a target is missed).
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypedDict

ROOT = Path(__file__).resolve().parent.parent
STEPS = 20  # tool-calling turns; the script has one more, the final answer
STEP_BUDGET = 25
TOOL = "lookup_order"
AGENT = "bench-agent"
RUN_INPUT = {"customer_email": "kim@example.com", "order_id": "ORD-1042"}
TARGET_RATIO = 0.5  # engine per-step time at most half of LangGraph's
FLAT_TOLERANCE = 1.25  # step 20 may cost at most this much more than step 2
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
LOOPS = ("engine", "engine_ledger_only", "langgraph")
LABELS = {
    "engine": "engine (run_agent_task)",
    "engine_ledger_only": "engine, ledger only",
    "langgraph": "langgraph ({saver}, sync)",
}


def script() -> list[dict[str, Any]]:
    """20 tool-calling turns, then a final answer; fixed token counts keep budgets out of it."""
    turns: list[dict[str, Any]] = [
        {"text": f"Looking up order {i}.",
         "tool_calls": [{"name": TOOL, "arguments": {"order_id": f"ORD-{1000 + i}"}}],
         "tokens_in": 200, "tokens_out": 20}
        for i in range(1, STEPS + 1)
    ]
    turns.append({"text": "All orders checked: they were delivered.", "tokens_in": 200,
                  "tokens_out": 20})
    return turns


# ---- statistics ---------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarise(runs: list[list[float]], totals: list[float]) -> dict[str, Any]:
    """``runs`` holds per-step seconds (steps 1..20) of each measured run."""
    pooled = [us for run in runs for us in run[1:]]  # steps 2..20
    step2 = statistics.median(run[1] for run in runs)
    step20 = statistics.median(run[STEPS - 1] for run in runs)
    return {
        "median_us": statistics.median(pooled),
        "p95_us": percentile(pooled, 0.95),
        "whole_run_us": statistics.median(totals) / STEPS,
        "step1_us": statistics.median(run[0] for run in runs),
        "step2_us": step2,
        "step20_us": step20,
        "flatness": step20 / step2,
        "per_step_median_us": [statistics.median(run[i] for run in runs) for i in range(STEPS)],
        "runs": len(runs),
    }


# ---- the worker: one backend, in its own process --------------------------------------------

class StepClock:
    """Marks the end of every step; ``start`` marks where step 1 begins."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def start(self) -> None:
        self.marks = [time.perf_counter()]

    def mark(self) -> None:
        self.marks.append(time.perf_counter())

    def steps_us(self) -> list[float]:
        if len(self.marks) != STEPS + 1:
            raise RuntimeError(f"expected {STEPS} steps, saw {len(self.marks) - 1}")
        return [(b - a) * 1e6 for a, b in zip(self.marks, self.marks[1:], strict=False)]


def worker(backend: str, checkpoint_url: str, runs: int, warmup: int, out: Path) -> None:
    """Set up Django on ``$DATABASE_URL``, migrate, seed, and time all three loops."""
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings")
    # A throwaway key for the benchmark's processes (start-up refuses none with DEBUG off).
    os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(50))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    engine = EngineBench()
    lang = LangGraphBench(backend, checkpoint_url, prompt=engine.prompt())
    loops: dict[str, Callable[[], tuple[list[float], float]]] = {
        "engine": engine.run_governed,
        "engine_ledger_only": engine.run_ledger_only,
        "langgraph": lang.run,
    }
    samples: dict[str, list[list[float]]] = {name: [] for name in loops}
    totals: dict[str, list[float]] = {name: [] for name in loops}
    try:
        for index in range(warmup + runs):
            for name, loop in loops.items():  # interleaved, so drift hits all three alike
                steps, total = loop()
                if index >= warmup:
                    samples[name].append(steps)
                    totals[name].append(total)
        trips = ({name: round_trips(lang.pgconn() if name == "langgraph" else None, loop)
                  for name, loop in loops.items()} if backend == "postgres" else {})
    finally:
        lang.close()
    result = {name: summarise(samples[name], totals[name]) for name in loops}
    for name, count in trips.items():
        result[name]["round_trips"] = count
    result["langgraph"]["saver"] = lang.saver_name
    result["engine"]["ledger_verified"] = engine.verified
    out.write_text(json.dumps(result))


def round_trips(pgconn: Any, loop: Callable[[], tuple[list[float], float]]) -> float:
    """Requests one more run of ``loop`` sent to PostgreSQL per step, from libpq's trace of
    its connection (Django's, or ``pgconn``): each simple query, and each Sync that ends a
    batch of extended-protocol messages, waits for the server once."""
    if pgconn is None:
        from django.db import connection

        connection.ensure_connection()
        pgconn = connection.connection.pgconn
    with tempfile.TemporaryDirectory(prefix="switchboard-trace-") as tmp:
        path = Path(tmp) / "libpq.trace"
        with path.open("wb") as trace:
            pgconn.trace(trace.fileno())
            try:
                loop()
            finally:
                pgconn.untrace()
        sent = [line.split("\t")[3] for line in path.read_text(errors="replace").splitlines()
                if line.count("\t") >= 3 and line.split("\t")[1] == "F"]
    return sum(1 for message in sent if message in ("Query", "Sync")) / STEPS


class EngineBench:
    def __init__(self) -> None:
        from django.contrib.auth.models import User
        from guardian.shortcuts import assign_perm

        from orchestration import services
        from orchestration.builtin_tools import registry
        from orchestration.models import Agent, Process, Tool

        base = registry.get(TOOL)
        tool = Tool.objects.create(
            slug=TOOL, name="Look up an order", implementation=TOOL,
            input_schema=dict(base.input_schema), output_schema=dict(base.output_schema),
            risk_class=Tool.Risk.READ,
        )
        user = User.objects.create(username=f"agent-{AGENT}")
        self.agent = Agent.objects.create(
            slug=AGENT, name="Benchmark agent", user=user, provider="scripted",
            model_name="scripted-bench", model_params={"script": script()},
            step_budget=STEP_BUDGET, token_budget=1_000_000,
        )
        assign_perm("orchestration.invoke_tool", user, tool)
        process = Process.objects.create(slug="bench", name="Benchmark",
                                         pattern=Process.Pattern.AGENT_WORKFLOW)
        self.version = services.process_publish(
            process=process, input_schema={"type": "object"},
            plan={"tasks": [{"key": "work", "title": "Work",
                             "executor": {"type": "agent", "ref": AGENT}}]},
        )
        self.verified = True

    def _new_run(self) -> Any:
        """A run with its one agent task claimed, as ``runner.execute`` leaves it (no dispatch)."""
        from django.db import transaction
        from django.utils import timezone

        from audit import ledger
        from orchestration.engine.runner import TaskContext
        from orchestration.engine.states import RunStatus, TaskStatus
        from orchestration.models import Run, Task
        from orchestration.store import DjangoRunStore

        with transaction.atomic():
            run = Run.objects.create(process_version=self.version, input=RUN_INPUT,
                                     status=RunStatus.RUNNING)
            Task.objects.create(run=run, key="work", title="Work", executor_type="agent",
                                executor_ref=AGENT, status=TaskStatus.RUNNING, attempts=1,
                                started_at=timezone.now())
            ledger.open_chain(run.pk)
            ledger.append(run.pk, "run.created", {"process": "bench", "input": RUN_INPUT},
                          actor="system")
        spec, run_input, outputs = DjangoRunStore().task_inputs(str(run.pk), "work")
        return TaskContext(run_id=str(run.pk), spec=spec, attempt=1, run_input=run_input,
                           dep_outputs=outputs)

    def prompt(self) -> str:
        from orchestration.engine.agent import build_prompt

        return build_prompt(self._new_run())

    @contextmanager
    def _timed_log(self, clock: StepClock) -> Iterator[type]:
        """Swap the step log ``orchestration.agents`` uses (``StoreLog``) for a subclass
        that marks step ends."""
        from orchestration import agents

        original = agents.StoreLog

        class TimedLog(original):  # type: ignore[misc, valid-type]
            def journal(self) -> Any:
                journal = super().journal()
                clock.start()
                return journal

            def record(self, kind: str, data: dict[str, Any], **kwargs: Any) -> None:
                super().record(kind, data, **kwargs)  # returns after the commit
                if kind == "tool.called":
                    clock.mark()

        agents.StoreLog = TimedLog
        try:
            yield TimedLog
        finally:
            agents.StoreLog = original

    def _check(self, ctx: Any, outcome: Any) -> None:
        from audit import verify
        from audit.models import Event
        from orchestration.engine.states import TaskStatus

        if outcome.status != TaskStatus.SUCCEEDED:
            raise RuntimeError(f"the engine loop ended {outcome.status}: {outcome.error}")
        kinds = list(Event.objects.filter(chain=ctx.run_id).values_list("kind", flat=True))
        if kinds.count("model.called") != STEPS + 1 or kinds.count("tool.called") != STEPS:
            raise RuntimeError(f"unexpected ledger events: {kinds}")
        self.verified = self.verified and verify.verify_chain(uuid.UUID(ctx.run_id)).ok

    def run_governed(self) -> tuple[list[float], float]:
        from orchestration.agents import run_agent_task

        ctx = self._new_run()
        clock = StepClock()
        with self._timed_log(clock):
            started = time.perf_counter()
            outcome = run_agent_task(ctx)
            total = (time.perf_counter() - started) * 1e6
        self._check(ctx, outcome)
        return clock.steps_us(), total

    def run_ledger_only(self) -> tuple[list[float], float]:
        from orchestration.agents import model_for
        from orchestration.engine.agent import AgentSpec, run_agent
        from orchestration.models import Tool
        from orchestration.store import DjangoRunStore
        from orchestration.tooling import contract_for

        ctx = self._new_run()
        clock = StepClock()
        with self._timed_log(clock) as log_class:
            started = time.perf_counter()
            outcome = run_agent(
                ctx, AgentSpec(slug=AGENT, step_budget=STEP_BUDGET),
                model_for(self.agent), {t.slug: contract_for(t) for t in Tool.objects.all()},
                log_class(DjangoRunStore(), ctx.run_id, ctx.spec.key),
                granted=lambda name: True,
            )
            total = (time.perf_counter() - started) * 1e6
        self._check(ctx, outcome)
        return clock.steps_us(), total


class LangGraphBench:
    def __init__(self, backend: str, url: str, *, prompt: str) -> None:
        from langgraph.graph import END, START, StateGraph

        from hashchain import canonical_json
        from orchestration.builtin_tools import registry
        from orchestration.engine.llm import Message, ModelRequest, ScriptedModel, ToolCall

        model = ScriptedModel(script(), name="scripted-bench")
        lookup = registry.get(TOOL).fn  # the same function the engine's contract wraps

        def agent(state: State) -> dict[str, Any]:
            messages = [Message(m["role"], m["content"], tool_call_id=m.get("tool_call_id", ""),
                                tool_calls=[ToolCall(**c) for c in m.get("tool_calls", [])])
                        for m in state["messages"]]
            response = model.complete(ModelRequest(messages=messages,
                                                   variables={"input": RUN_INPUT}))
            return {"messages": [{"role": "assistant", "content": response.text,
                                  "tool_calls": [c.to_dict() for c in response.tool_calls]}]}

        def tools(state: State) -> dict[str, Any]:
            calls = state["messages"][-1]["tool_calls"]
            return {"messages": [{"role": "tool", "tool_call_id": c["id"],
                                  "content": canonical_json(lookup(**c["arguments"]))}
                                 for c in calls]}

        def route(state: State) -> str:
            return "tools" if state["messages"][-1].get("tool_calls") else END

        graph = StateGraph(State)
        graph.add_node("agent", agent)
        graph.add_node("tools", tools)
        graph.add_edge(START, "agent")
        graph.add_conditional_edges("agent", route, ["tools", END])
        graph.add_edge("tools", "agent")

        self.prompt = prompt
        self._exit: Callable[[], None]
        if backend == "sqlite":
            import sqlite3

            from langgraph.checkpoint.sqlite import SqliteSaver

            conn = sqlite3.connect(url, check_same_thread=False)
            conn.execute("PRAGMA synchronous=NORMAL")  # the engine's SQLite setting
            saver: Any = SqliteSaver(conn)
            self._exit = conn.close
            self.saver_name = "SqliteSaver"
        else:
            from langgraph.checkpoint.postgres import PostgresSaver

            manager = PostgresSaver.from_conn_string(url)
            saver = manager.__enter__()
            self._exit = lambda: manager.__exit__(None, None, None)
            self.saver_name = "PostgresSaver"
        saver.setup()
        self.graph = graph.compile(checkpointer=saver)

    def run(self) -> tuple[list[float], float]:
        config = {"configurable": {"thread_id": uuid.uuid4().hex}, "recursion_limit": 100}
        clock = StepClock()
        clock.start()
        started = clock.marks[0]
        stream = self.graph.stream(
            {"messages": [{"role": "user", "content": self.prompt}]}, config,
            stream_mode="updates", durability="sync",
        )
        last: dict[str, Any] = {}
        for update in stream:
            if "tools" in update:
                clock.mark()
            last = update
        total = (time.perf_counter() - started) * 1e6
        final = last.get("agent", {}).get("messages", [{}])[-1]
        if final.get("tool_calls") or not final.get("content"):
            raise RuntimeError(f"the LangGraph loop did not end with an answer: {last}")
        return clock.steps_us(), total

    def pgconn(self) -> Any:
        """The PostgreSQL saver's connection (libpq's handle)."""
        return self.graph.checkpointer.conn.pgconn

    def close(self) -> None:
        self._exit()


class State(TypedDict):
    """LangGraph's state: the conversation, appended to by each node (plain dicts)."""

    messages: Annotated[list[dict[str, Any]], operator.add]


# ---- the driver: throwaway databases, one subprocess per backend, the table ------------------

def _pg_admin(url: str, sql: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)


def _with_db(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="switchboard-bench-") as tmp:
        out = Path(tmp) / "result.json"
        dbname = f"switchboard_bench_{os.getpid()}"
        if backend == "sqlite":
            database_url = f"sqlite:///{Path(tmp) / 'switchboard.sqlite3'}"
            checkpoint_url = str(Path(tmp) / "langgraph.sqlite3")
        else:
            _pg_admin(args.postgres_url, f'DROP DATABASE IF EXISTS "{dbname}"')
            _pg_admin(args.postgres_url, f'CREATE DATABASE "{dbname}"')
            database_url = checkpoint_url = _with_db(args.postgres_url, dbname)
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        env.update(DATABASE_URL=database_url, DJANGO_SETTINGS_MODULE="console.settings",
                   PYTHONPATH=str(ROOT))
        try:
            subprocess.run(
                [sys.executable, __file__, "--worker", backend, "--checkpoint-url",
                 checkpoint_url, "--runs", str(args.runs), "--warmup", str(args.warmup),
                 "--out", str(out)],
                env=env, cwd=ROOT, check=True,
            )
            return json.loads(out.read_text())
        finally:
            if backend == "postgres":
                _pg_admin(args.postgres_url, f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def postgres_reachable(url: str) -> str:
    try:
        _pg_admin(url, "SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure means "skip, and say why"
        return f"{type(exc).__name__}: {exc}".strip()
    return ""


def verdicts(result: dict[str, Any]) -> dict[str, Any]:
    engine, lang = result["engine"], result["langgraph"]
    ratio = engine["median_us"] / lang["median_us"]
    return {
        "ratio_median": ratio,
        "ratio_p95": engine["p95_us"] / lang["p95_us"],
        "ratio_whole_run": engine["whole_run_us"] / lang["whole_run_us"],
        "ratio_ledger_only": result["engine_ledger_only"]["median_us"] / lang["median_us"],
        "meets_ratio": ratio <= TARGET_RATIO,
        "meets_flat": engine["flatness"] <= FLAT_TOLERANCE,
    }


def print_table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    print()
    print(f"Agent loop: {STEPS} steps (model turn + tool call, both checkpointed), "
          f"{args.runs} measured runs after {args.warmup} warm-up; microseconds per step, "
          f"steps 2..{STEPS} pooled")
    head = (f"{'database':<9} {'loop':<30} {'median':>8} {'p95':>8} {'whole run':>10} "
            f"{'step 2':>8} {'step 20':>8} {'20/2':>6}")
    print(head)
    print("-" * len(head))
    for backend, result in results.items():
        for name in LOOPS:
            row = result[name]
            label = LABELS[name].format(saver=result["langgraph"].get("saver", ""))
            print(f"{backend:<9} {label:<30} {row['median_us']:>8.0f} {row['p95_us']:>8.0f} "
                  f"{row['whole_run_us']:>10.0f} {row['step2_us']:>8.0f} "
                  f"{row['step20_us']:>8.0f} {row['flatness']:>6.2f}")
        if "round_trips" in result["engine"]:
            print(f"{'':<9} round trips a step (libpq trace of one more run): " + ", ".join(
                f"{LABELS[name].format(saver=result['langgraph'].get('saver', ''))} "
                f"{result[name]['round_trips']:.1f}" for name in LOOPS))
        v = result["verdict"]
        print(f"{'':<9} ratio engine/langgraph: median {v['ratio_median']:.2f}, "
              f"p95 {v['ratio_p95']:.2f}, whole run {v['ratio_whole_run']:.2f} "
              f"(ledger only: {v['ratio_ledger_only']:.2f})")
        print(f"{'':<9} target ratio <= {TARGET_RATIO}: "
              f"{'met' if v['meets_ratio'] else 'MISSED'}; flat (step 20 <= "
              f"{FLAT_TOLERANCE}x step 2): {'met' if v['meets_flat'] else 'MISSED'}; "
              f"ledger chains verified: {result['engine']['ledger_verified']}")
        print()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="measured runs per loop")
    parser.add_argument("--warmup", type=int, default=1, help="discarded runs per loop")
    parser.add_argument("--only", choices=["sqlite", "postgres"], action="append")
    parser.add_argument("--postgres-url", default=os.environ.get("BENCH_POSTGRES_URL",
                                                                 DEFAULT_PG))
    parser.add_argument("--json", type=Path, help="write the numbers to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--worker", choices=["sqlite", "postgres"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-url", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be at least 1 and --warmup at least 0")

    if args.worker:
        worker(args.worker, args.checkpoint_url, args.runs, args.warmup, args.out)
        return 0

    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for backend in args.only or ["sqlite", "postgres"]:
        if backend == "postgres" and (why := postgres_reachable(args.postgres_url)):
            skipped[backend] = f"PostgreSQL unreachable at {args.postgres_url}: {why}"
            print(f"skipping postgres: {skipped[backend]}", file=sys.stderr)
            continue
        print(f"running {backend} ...", file=sys.stderr, flush=True)
        results[backend] = run_backend(backend, args)
        results[backend]["verdict"] = verdicts(results[backend])
    print_table(results, args)
    for backend, why in skipped.items():
        print(f"{backend}: skipped ({why})")
    if args.json:
        args.json.write_text(json.dumps({
            "steps": STEPS, "runs": args.runs, "warmup": args.warmup,
            "target_ratio": TARGET_RATIO, "flat_tolerance": FLAT_TOLERANCE,
            "results": results, "skipped": skipped,
        }, indent=2) + "\n")
    missed = any(not (r["verdict"]["meets_ratio"] and r["verdict"]["meets_flat"])
                 for r in results.values())
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
