"""Drive a run to the end in this process with a thread pool (engine tests and benchmarks)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Mapping

from orchestration.engine.runner import Executor, advance, execute
from orchestration.engine.states import TaskStatus
from orchestration.engine.store import RunStore


def drive(
    store: RunStore, run_id: str, executors: Mapping[str, Executor], *, workers: int = 8
) -> str:
    """Advance and execute until nothing is in flight; returns the run's final status."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        with store.locked(run_id) as snapshot:  # tasks queued earlier, e.g. after recover()
            queued = [k for k, t in snapshot.tasks.items() if t.status == TaskStatus.QUEUED]
        result = advance(store, run_id)
        pending = {pool.submit(execute, store, run_id, key, executors)
                   for key in [*queued, *result.released]}
        while pending:
            done, pending = concurrent.futures.wait(
                pending, return_when=concurrent.futures.FIRST_COMPLETED
            )
            for future in done:
                future.result()
                step = advance(store, run_id)
                result = step
                pending |= {
                    pool.submit(execute, store, run_id, key, executors) for key in step.released
                }
        return advance(store, run_id).status
