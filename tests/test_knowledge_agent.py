"""Agents and the knowledge base: the front desk of ``customer-inquiry`` searches the refund
policy through the governed ``search_knowledge`` tool and cites what it found (a new version of
the policy changes its next answer); an agent without the collection's read grant is refused
at the tool, recorded, without a crash; a task that declares ``knowledge:`` gets the best
chunks in its prompt, recorded once, and replay takes the recorded chunks instead of
searching again. Runs in both passes (a real Celery worker in the distributed one)."""

from __future__ import annotations

import json
import re
import tomllib
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client
from guardian.shortcuts import assign_perm, remove_perm

from audit.models import Event
from console.models import ApiToken
from knowledge.models import Collection, Document
from knowledge.services import delete_document
from orchestration import services
from orchestration.models import Agent, Process, Run, Task, Tool, Transcript
from orchestration.replay import ledger_of, replay
from tests.conftest import DISTRIBUTED, wait_for_run

INQUIRY = {"customer_email": "kim@example.com", "order_id": "ORD-1042",
           "message": "Can I still get a refund?"}
CITATION = re.compile(r"\[doc:([0-9a-f-]{36})@v(\d+)#(\d+)\]")



def events(run: Run, kind: str) -> list[dict[str, Any]]:
    return [e.data for e in Event.objects.filter(chain=run.pk, kind=kind).order_by("seq")]


def _admin_api(client: Client) -> Any:
    token = ApiToken.issue(User.objects.get(username="admin"), name="kb")[1]

    def post(path: str, body: dict[str, Any]) -> Any:
        return client.post(path, json.dumps(body), content_type="application/json",
                           HTTP_AUTHORIZATION=f"Bearer {token}")

    return post


def _inquiry(api: Any) -> Run:
    created = api.post("/api/v1/runs", {"process": "customer-inquiry", "input": INQUIRY})
    assert created.status_code == 201, created.content
    run = wait_for_run(created.json()["id"], timeout=60)
    assert run.status == "succeeded", run.error
    return run


@pytest.mark.django_db(transaction=True)
def test_the_front_desk_answers_from_the_policy_and_cites_it(runner: None, api: Any) -> None:
    run = _inquiry(api)
    [search] = [c for c in events(run, "tool.called") if c["tool"] == "search_knowledge"]
    assert search["actor"] == "agent:frontdesk"
    assert search["arguments"]["collection"] == "refund-policy"
    top = search["result"]["results"][0]
    policy = Document.objects.get(collection__slug="refund-policy", title="Refund policy")
    assert top["document_id"] == str(policy.pk) and top["version"] == 1
    assert top["title"] == "Refund policy" and top["text"].startswith("Refunds are accepted")
    assert top["citation"] == f"[doc:{policy.pk}@v1#{top['ordinal']}]"
    assert {"chunk_id", "score"} <= set(top)

    # The answer quotes the passage found and cites it; so does its handoff envelope.
    output = Task.objects.get(run=run, key="answer").output
    assert "Refunds are accepted within 30 days of delivery" in output["answer"]
    assert top["citation"] in output["answer"]
    assert tomllib.loads(output["handoff"])["citations"] == [top["citation"]]
    assert top["citation"] in run.result["answer"]
    # classify, the search, the handoff, the lookup and the email
    assert api.get(f"/api/v1/runs/{run.pk}").json()["usage"]["tool_calls"] == 5

    # The trace shows the chunks retrieved, as the tool call's result.
    client = Client()
    client.force_login(User.objects.get(username="operator"))
    seq = Event.objects.get(chain=run.pk, kind="tool.called",
                            data__tool="search_knowledge").seq
    page = client.get(f"/runs/{run.pk}/trace/tool-{seq}").content.decode()
    assert "Refunds are accepted within 30 days" in page and top["chunk_id"] in page

    # The search is a recorded tool call: replay answers it from the ledger, policy or not.
    delete_document(policy, by=None)
    result = replay(Run.objects.get(pk=run.pk))
    assert result.ok, result.summary()


@pytest.mark.django_db(transaction=True)
def test_a_new_version_of_the_policy_changes_the_next_answer(runner: None, api: Any,
                                                             client: Client) -> None:
    first = Task.objects.get(run=_inquiry(api), key="answer").output["answer"]
    assert "30 days" in first and "@v1#" in first

    text = ("Refunds are accepted within 45 days of delivery, <script>alert('x')</script> for "
            "any reason. A refund goes back to the original payment method.")
    posted = _admin_api(client)("/api/v1/knowledge/refund-policy/documents",
                                {"title": "Refund policy", "text": text})
    assert posted.status_code == 201, posted.content
    assert posted.json()["version"] == 2 and posted.json()["embedded"] >= 1

    run = _inquiry(api)
    answer = Task.objects.get(run=run, key="answer").output["answer"]
    assert "Refunds are accepted within 45 days of delivery" in answer and "30 days" not in answer
    policy = Document.objects.get(collection__slug="refund-policy", title="Refund policy")
    assert {(doc, version) for doc, version, _ in CITATION.findall(answer)} == {
        (str(policy.pk), "2")}
    # What a document says is data on every page: the trace escapes it.
    seq = Event.objects.get(chain=run.pk, kind="tool.called", data__tool="search_knowledge").seq
    viewer = Client()
    viewer.force_login(User.objects.get(username="operator"))
    page = viewer.get(f"/runs/{run.pk}/trace/tool-{seq}").content.decode()
    assert "&lt;script&gt;alert(" in page and "<script>alert(" not in page
    assert replay(Run.objects.get(pk=run.pk)).ok


@pytest.mark.django_db(transaction=True)
def test_an_agent_without_the_collection_grant_is_refused_at_the_tool(runner: None,
                                                                      api: Any) -> None:
    frontdesk = Agent.objects.get(slug="frontdesk")
    remove_perm("knowledge.read_collection", frontdesk.user,
                Collection.objects.get(slug="refund-policy"))
    run = _inquiry(api)  # the refusal is the tool's answer, not a crash
    [failed] = [d for d in events(run, "tool.failed") if d["tool"] == "search_knowledge"]
    assert failed["actor"] == "agent:frontdesk"
    assert ("the knowledge collection 'refund-policy' does not exist or is not granted to "
            "agent:frontdesk") in failed["error"]
    assert not [c for c in events(run, "tool.called") if c["tool"] == "search_knowledge"]
    answer = Task.objects.get(run=run, key="answer").output["answer"]
    assert "Refunds are accepted" not in answer and not CITATION.search(answer)
    assert replay(Run.objects.get(pk=run.pk)).ok


def _agent(slug: str, script: list[dict[str, Any]], tools: tuple[str, ...] = ()) -> Agent:
    user = User.objects.create(username=f"agent-{slug}")
    agent = Agent.objects.create(slug=slug, name=slug, user=user, provider="scripted",
                                 model_name="scripted-demo", model_params={"script": script})
    for tool in tools:
        assign_perm("orchestration.invoke_tool", user, Tool.objects.get(slug=tool))
    return agent


def _process(slug: str, task: dict[str, Any]) -> Process:
    process = Process.objects.create(slug=slug, name=slug, pattern="agent_workflow")
    services.process_publish(process=process, input_schema={"type": "object"},
                             plan={"tasks": [{"key": "work", "title": "Refund window",
                                              "executor": {"type": "agent",
                                                           "ref": task["agent"]},
                                              **{k: v for k, v in task.items()
                                                 if k != "agent"}}]})
    assign_perm("orchestration.start_run", User.objects.get(username="operator"), process)
    return process


@pytest.mark.django_db(transaction=True)
def test_an_unknown_collection_gets_the_same_refusal(runner: None, api: Any) -> None:
    _agent("prober", [{"tool_calls": [{"name": "search_knowledge", "arguments": {
        "collection": "secret-plans", "query": "anything"}}]}, {"text": "Nothing found."}],
        ("search_knowledge",))
    _process("probe", {"agent": "prober", "spec": "Look around."})
    run_id = api.post("/api/v1/runs", {"process": "probe", "input": {}}).json()["id"]
    run = wait_for_run(run_id, timeout=60)
    assert run.status == "succeeded", run.error
    [failed] = events(run, "tool.failed")
    assert ("the knowledge collection 'secret-plans' does not exist or is not granted to "
            "agent:prober") in failed["error"]


@pytest.mark.django_db(transaction=True)
def test_a_task_gets_its_knowledge_just_in_time_and_replay_reads_it_back(
        runner: None, api: Any) -> None:
    agent = _agent("policy-reader", [{"text": "The window is 30 days.\n```toml\nsummary = "
                                              "\"The refund window.\"\n```"}])
    assign_perm("knowledge.read_collection", agent.user,
                Collection.objects.get(slug="refund-policy"))
    _process("policy-question", {"agent": "policy-reader", "knowledge": ["refund-policy"],
                                 "knowledge_tokens": 200,
                                 "spec": "How many days after delivery are refunds accepted?"})
    run_id = api.post("/api/v1/runs", {"process": "policy-question", "input": {}}).json()["id"]
    run = wait_for_run(run_id, timeout=60)
    assert run.status == "succeeded", run.error

    [retrieved] = events(run, "knowledge.retrieved")
    assert retrieved["task"] == "work" and retrieved["collections"] == ["refund-policy"]
    assert "How many days after delivery" in retrieved["query"]
    [chunk] = retrieved["chunks"]  # the policy is one chunk, and it fits 200 tokens
    assert chunk["text"].startswith("Refunds are accepted") and len(chunk["text"]) <= 800
    assert retrieved["tokens"] <= 200 == retrieved["budget_tokens"]
    prompt = Transcript.objects.get(run_id=run.pk, task="work", step=1).messages
    user = next(m["content"] for m in prompt if m["role"] == "user")
    assert chunk["citation"] in user and "Refunds are accepted within 30 days" in user
    # The trace shows what the prompt was given, as a span of the task.
    viewer = Client()
    viewer.force_login(User.objects.get(username="operator"))
    seq = Event.objects.get(chain=run.pk, kind="knowledge.retrieved").seq
    trace = viewer.get(f"/runs/{run.pk}/trace/").content.decode()
    assert f'knowledge-{seq}' in trace and "knowledge: refund-policy" in trace
    span = viewer.get(f"/runs/{run.pk}/trace/knowledge-{seq}").content.decode()
    assert chunk["chunk_id"] in span and "Refunds are accepted within 30 days" in span
    assert viewer.get(f"/runs/{run.pk}/").status_code == 200

    # The replay gives the prompt the recorded chunks: even with the policy gone it matches.
    delete_document(Document.objects.get(collection__slug="refund-policy"), by=None)
    result = replay(Run.objects.get(pk=run.pk))
    assert result.ok, result.summary()
    # An altered record of what was retrieved is a difference the replay reports.
    altered = ledger_of(Run.objects.get(pk=run.pk))
    for i, e in enumerate(altered):
        if e.kind == "knowledge.retrieved":
            data = {**e.data, "chunks": [{**chunk, "chunk_id": "forged", "text": "Never."}]}
            altered[i] = type(e)(seq=e.seq, kind=e.kind, data=data, at=e.at)
    assert not replay(Run.objects.get(pk=run.pk), events=altered).ok


@pytest.mark.skipif(DISTRIBUTED, reason="the search is broken in this process; the standalone "
                                         "pass runs its tasks here")
def test_a_task_whose_retrieval_failed_replays_as_it_ended(runner: None, api: Any,
                                                             monkeypatch: Any) -> None:
    """An embeddings endpoint down (any error of the search) fails the attempt before anything
    is recorded; the replay, which never searches, ends the attempt with the same error."""
    from orchestration import retrieval

    agent = _agent("unlucky-reader", [{"text": "x"}])
    assign_perm("knowledge.read_collection", agent.user,
                Collection.objects.get(slug="refund-policy"))
    _process("kb-broken", {"agent": "unlucky-reader", "knowledge": ["refund-policy"]})

    def down(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the embeddings endpoint is down")

    monkeypatch.setattr(retrieval.source(), "search", down)
    run_id = api.post("/api/v1/runs", {"process": "kb-broken", "input": {}}).json()["id"]
    run = wait_for_run(run_id, timeout=60)
    assert run.status == "failed" and "the embeddings endpoint is down" in run.error
    assert not events(run, "knowledge.retrieved") and not events(run, "model.called")
    result = replay(run)
    assert result.ok, result.summary()


@pytest.mark.django_db
def test_a_plan_naming_a_collection_its_agent_may_not_read_is_refused(demo: None) -> None:
    agent = _agent("outside-reader", [{"text": "x"}])
    process = Process.objects.create(slug="kb-plan", name="kb", pattern="agent_workflow")

    def publish(slugs: list[str]) -> None:
        services.process_publish(process=process, input_schema={"type": "object"}, plan={
            "tasks": [{"key": "work", "executor": {"type": "agent", "ref": agent.slug},
                       "knowledge": slugs}]})

    with pytest.raises(services.ServiceError, match="no knowledge collection 'no-such'"):
        publish(["no-such"])
    with pytest.raises(services.ServiceError, match="may not read the knowledge collection "
                                                    "'refund-policy'"):
        publish(["refund-policy"])
    assign_perm("knowledge.read_collection", agent.user,
                Collection.objects.get(slug="refund-policy"))
    publish(["refund-policy"])
    with pytest.raises(services.ServiceError, match="only an agent task takes knowledge"):
        services.process_publish(process=process, input_schema={"type": "object"}, plan={
            "tasks": [{"key": "fn", "executor": {"type": "function", "ref": "classify_inquiry"},
                       "knowledge": ["refund-policy"]}]})


@pytest.mark.django_db(transaction=True)
def test_a_read_grant_revoked_after_publishing_escalates_the_task(runner: None,
                                                                  api: Any) -> None:
    agent = _agent("late-reader", [{"text": "x"}])
    collection = Collection.objects.get(slug="refund-policy")
    assign_perm("knowledge.read_collection", agent.user, collection)
    _process("kb-revoked", {"agent": "late-reader", "knowledge": ["refund-policy"]})
    remove_perm("knowledge.read_collection", agent.user, collection)
    run_id = api.post("/api/v1/runs", {"process": "kb-revoked", "input": {}}).json()["id"]
    run = wait_for_run(run_id, timeout=60)
    assert run.status == "waiting"
    task = Task.objects.get(run=run, key="work")
    assert task.error.startswith("configuration_error: task 'work': its agent 'late-reader' "
                                 "may not read the knowledge collection(s) refund-policy")
    assert not events(run, "knowledge.retrieved") and not events(run, "model.called")


@pytest.mark.django_db(transaction=True)
def test_searches_count_against_the_tools_quota_per_run(runner: None, api: Any) -> None:
    assert Tool.objects.get(slug="search_knowledge").quota_per_run == 10  # the demo's
    Tool.objects.filter(slug="search_knowledge").update(quota_per_run=2)
    search = {"name": "search_knowledge", "arguments": {"collection": "refund-policy",
                                                        "query": "refund window"}}
    reader = _agent("eager-reader", [{"tool_calls": [search]}] * 3 + [{"text": "Done."}],
                    ("search_knowledge",))
    assign_perm("knowledge.read_collection", reader.user,
                Collection.objects.get(slug="refund-policy"))
    _process("eager", {"agent": "eager-reader", "spec": "Search a lot."})
    run = wait_for_run(api.post("/api/v1/runs", {"process": "eager", "input": {}}).json()["id"],
                       timeout=60)
    assert run.status == "waiting"
    assert len([c for c in events(run, "tool.called") if c["tool"] == "search_knowledge"]) == 2
    assert Task.objects.get(run=run, key="work").error.startswith(
        "quota_exhausted: search_knowledge may be called 2 times")
