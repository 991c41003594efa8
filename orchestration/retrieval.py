"""Knowledge for agents, as orchestration sees it: the ``search_knowledge`` tool's search under
the calling identity's collection grants, the chunks of a task's just-in-time context, and the
plan checks of a task's ``knowledge:`` collections.

The knowledge base itself is another app, which depends on orchestration (a collection may
belong to a process); it installs its ``Source`` here when Django is ready, so orchestration
never imports it (the same inversion as approvals' decision signal)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from orchestration.engine.errors import ConfigurationError
from orchestration.engine.knowledge import citation, query_of, within_budget
from orchestration.engine.plan import Plan
from orchestration.engine.runner import TaskContext

# How many chunks of each collection a task's context is chosen from.
CANDIDATES = 10


class Source(Protocol):
    def missing(self, slugs: Iterable[str]) -> list[str]:
        """The slugs that name no collection."""
        ...

    def unreadable(self, user_id: Any, slugs: Iterable[str]) -> list[str]:
        """The slugs this active user may not read (no collection counts as not readable)."""
        ...

    def search(self, slug: str, query: str, k: int) -> list[dict[str, Any]]:
        """The best ``k`` live chunks: chunk_id, document_id, title, version, ordinal, text,
        score (no permission check: callers check first)."""
        ...


_source: Source | None = None


def install(source: Source) -> None:
    global _source
    _source = source


def source() -> Source:
    if _source is None:
        raise ConfigurationError("no knowledge base is installed (the knowledge app is not in "
                                 "INSTALLED_APPS)")
    return _source


class KnowledgeRefused(Exception):
    """The caller may not search that collection (or it does not exist: the same answer, so
    a refused caller cannot probe which collections exist)."""


def identity_of(caller: str) -> Any:
    """The user id behind an acting identity (``agent:<slug>``, ``process:<slug>``). The
    models come from the app registry: the tool that calls this is imported by the models'
    own checks (config_checks), so an import here would close a cycle."""
    from django.apps import apps

    Agent, Process = apps.get_model("orchestration", "Agent"), apps.get_model(  # noqa: N806
        "orchestration", "Process")
    kind, _, slug = caller.partition(":")
    if kind == "agent":
        return Agent.objects.filter(slug=slug).values_list("user_id", flat=True).first()
    if kind == "process":
        return Process.objects.filter(slug=slug).values_list("service_user_id",
                                                             flat=True).first()
    return None


def _hit(hit: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    out = {"chunk_id": str(hit["chunk_id"]), "document_id": str(hit["document_id"]),
           "title": str(hit["title"]), "version": int(hit["version"]),
           "ordinal": int(hit["ordinal"]), "text": str(hit["text"]),
           "score": round(float(hit["score"]), 6), **extra}
    out["citation"] = citation(out)
    return out


def search_as(caller: str, collection: str, query: str, k: int) -> dict[str, Any]:
    """The ``search_knowledge`` tool: ``collection``'s best ``k`` chunks for ``query`` if the
    caller holds ``read_collection`` on it. Runs on a tool runner thread, whose database
    connection is closed after each call (orchestration/apps.py)."""
    user_id = identity_of(caller) if caller else None
    found = source()
    if user_id is None or found.unreadable(user_id, [collection]):
        raise KnowledgeRefused(f"the knowledge collection {collection!r} does not exist or "
                               f"is not granted to {caller or 'this caller'}")
    hits = found.search(collection, query, k)
    return {"collection": collection, "results": [_hit(h) for h in hits]}


def task_chunks(ctx: TaskContext, user_id: Any) -> dict[str, Any]:
    """A task's just-in-time knowledge: the best chunks of its collections for its spec, as
    many as its knowledge budget holds. ConfigurationError when its agent may not read one
    (a grant revoked since the plan was checked): people decide, the task escalates."""
    spec = ctx.spec
    found = source()
    refused = found.unreadable(user_id, spec.knowledge)
    if refused:
        raise ConfigurationError(f"task {spec.key!r}: its agent {spec.executor_ref!r} may not "
                                 f"read the knowledge collection(s) {', '.join(refused)}")
    query = query_of(ctx)
    hits = [_hit(h, collection=slug) for slug in spec.knowledge
            for h in found.search(slug, query, CANDIDATES)]
    hits.sort(key=lambda h: -h["score"])
    return {"collections": list(spec.knowledge), "query": query,
            "chunks": within_budget(hits, spec.knowledge_tokens)}


def plan_problems(plan: Plan, readers: Mapping[str, Any]) -> list[str]:
    """What is wrong with the plan's ``knowledge:`` entries: a collection that does not exist,
    or one the task's agent (its user id in ``readers``, by agent slug, where the agent is
    known) may not read."""
    tasks = [t for t in plan.tasks if t.knowledge]
    if not tasks:
        return []
    try:
        found = source()
    except ConfigurationError as exc:
        return [str(exc)]
    problems: list[str] = []
    for task in tasks:
        missing = found.missing(task.knowledge)
        problems += [f"task {task.key!r}: there is no knowledge collection {slug!r}"
                     for slug in missing]
        user_id = readers.get(task.executor_ref)
        if user_id is None:
            continue
        problems += [f"task {task.key!r}: agent {task.executor_ref!r} may not read the "
                     f"knowledge collection {slug!r}"
                     for slug in found.unreadable(user_id, task.knowledge) if slug not in missing]
    return problems

