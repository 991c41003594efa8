"""The ledger as evidence: the run chains and the global chain catch tampering (audit_verify),
exports verify outside the application (audit/verify_export.py), the ledger viewer is for
admins only, and the migration that introduced the global chain fills it for existing events.

Events join the global chain when ledger.seal() runs, not when they are appended: fixtures that
need global positions seal, as the worker sweep, audit_verify and audit_export do."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Group, User
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import DatabaseError, connection, transaction
from django.test import Client
from django.utils import timezone

from audit import ledger, verify
from audit.models import ChainHead, Event
from hashchain import GENESIS, canonical_json, chain_hash, global_hash
from orchestration import services
from orchestration.models import Process
from tests.conftest import POSTGRES, ROOT, wait_for_run

VERIFY_EXPORT = ROOT / "audit" / "verify_export.py"
XSS = "<script>alert('owned')</script>"



# --- helpers ----------------------------------------------------------------------------------


@contextlib.contextmanager
def tamperable() -> Iterator[None]:
    """What an attacker with database superuser rights does on PostgreSQL to get past the
    append-only trigger: replica mode skips ordinary triggers. Restored afterwards."""
    if not POSTGRES:
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute("SET session_replication_role = replica")
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SET session_replication_role = DEFAULT")


def sql(statement: str, params: list[Any]) -> None:
    with tamperable(), connection.cursor() as cursor:
        cursor.execute(statement, params)


def db(field: str, value: Any) -> Any:
    return Event._meta.get_field(field).get_db_prep_value(value, connection)


def event(chain: uuid.UUID, seq: int) -> Event:
    return Event.objects.get(chain=chain, seq=seq)


def audit_verify(*args: str) -> tuple[int, str]:
    """(exit status, everything printed) of `manage.py audit_verify`."""
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("audit_verify", *args, stdout=out, stderr=err)
    except CommandError as exc:
        return exc.returncode, f"{out.getvalue()}{err.getvalue()}{exc}"
    return 0, out.getvalue() + err.getvalue()


def verify_file(path: Path) -> subprocess.CompletedProcess[str]:
    # -I: isolated, so the script cannot lean on the project's packages or settings.
    return subprocess.run([sys.executable, "-I", str(VERIFY_EXPORT), str(path)],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def runs(operator: User, vendor_input: dict[str, str]) -> tuple[uuid.UUID, uuid.UUID]:
    """Two runs (never dispatched: the test's transaction never commits) with interleaved
    events, so the global chain alternates between them, and one configuration change; all
    sealed into the global chain."""
    process = Process.objects.get(slug="vendor-onboarding")
    first = services.run_create(process=process, input=vendor_input, user=operator).pk
    second = services.run_create(process=process, input=vendor_input, user=operator).pk
    with transaction.atomic():
        for step in range(1, 4):
            for chain in (first, second):
                ledger.append(chain, "test.step", {"n": step, "note": f"step {step}"},
                              actor="user:tester")
        ledger.append(ledger.CONFIG_CHAIN, "config.changed", {"model": "tool", "new": {"x": 1}},
                      actor="user:ledger-test")
    assert ledger.seal() == Event.objects.count()
    return first, second


# --- the global chain -------------------------------------------------------------------------


def test_it_links_every_event_into_one_global_chain(runs: tuple[uuid.UUID, uuid.UUID]) -> None:
    events = list(Event.objects.order_by("gseq"))
    assert [e.gseq for e in events] == list(range(1, len(events) + 1))
    assert events[0].gprev_hash == GENESIS
    for previous, current in zip(events, events[1:], strict=False):
        assert current.gprev_hash == previous.ghash
    for e in events:
        assert e.ghash == global_hash(e.gprev_hash, e.hash)
    assert verify.global_head() == (len(events), events[-1].ghash)
    steps = [e.chain for e in events if e.kind == "test.step"]
    assert steps[:2] == list(runs)  # the two runs' appends interleave in gseq order


def test_it_seals_appended_events_into_the_global_chain_later(
        runs: tuple[uuid.UUID, uuid.UUID]) -> None:
    head = verify.global_head()
    with transaction.atomic():
        appended = [ledger.append(runs[1], "test.step", {"n": n}, actor="user:tester")
                    for n in (4, 5)]
    assert [(e.gseq, e.gprev_hash, e.ghash) for e in appended] == [(None, None, None)] * 2
    assert verify.global_head() == head  # appending leaves the global chain alone
    assert verify.verify_chain(runs[1]).ok
    assert verify.verify_global().unsealed == 2
    status, output = audit_verify()  # seals first, so it covers both
    assert status == 0, output
    sealed = list(Event.objects.filter(pk__in=[e.pk for e in appended]).order_by("gseq"))
    assert [e.gseq for e in sealed] == [head[0] + 1, head[0] + 2]
    assert sealed[0].gprev_hash == head[1]
    assert verify.global_head() == (head[0] + 2, sealed[1].ghash)
    assert verify.verify_global().unsealed == 0
    assert ledger.seal() == 0


def test_it_appends_to_the_configuration_chain_without_a_run(runs: Any) -> None:
    config = list(Event.objects.filter(chain=ledger.CONFIG_CHAIN).order_by("seq"))
    assert config[0].prev_hash == GENESIS
    assert (config[-1].kind, config[-1].actor) == ("config.changed", "user:ledger-test")
    assert ChainHead.objects.get(chain=ledger.CONFIG_CHAIN).seq == len(config)
    assert verify.verify_chain(ledger.CONFIG_CHAIN).ok


def test_it_refuses_to_append_to_the_global_chain_itself(db: Any) -> None:
    with transaction.atomic(), pytest.raises(ValueError, match="global chain"):
        ledger.append(ledger.GLOBAL_CHAIN, "test.step", {}, actor="user:tester")


def test_it_announces_an_event_once_its_transaction_commits(
        db: Any, django_capture_on_commit_callbacks: Any) -> None:
    from audit.signals import event_appended

    heard: list[tuple[uuid.UUID, int, str]] = []

    def receiver(sender: Any, chain: uuid.UUID, seq: int, kind: str, **kwargs: Any) -> None:
        heard.append((chain, seq, kind))

    event_appended.connect(receiver)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            with transaction.atomic():
                ledger.append(ledger.CONFIG_CHAIN, "config.changed", {}, actor="user:tester")
                assert heard == []
        seq = ChainHead.objects.get(chain=ledger.CONFIG_CHAIN).seq
        assert heard == [(ledger.CONFIG_CHAIN, seq, "config.changed")]
    finally:
        event_appended.disconnect(receiver)


# --- audit_verify -----------------------------------------------------------------------------


def test_it_verifies_an_untouched_ledger(runs: tuple[uuid.UUID, uuid.UUID]) -> None:
    status, output = audit_verify()
    assert status == 0, output
    chains = ChainHead.objects.exclude(chain=ledger.GLOBAL_CHAIN).count()
    assert f"OK: {chains} chain(s), {Event.objects.count()} event(s)" in output
    gseq, ghash = verify.global_head()
    assert f"global head: gseq {gseq} ghash {ghash}" in output
    status, output = audit_verify("--run", str(runs[0]))
    assert status == 0, output
    assert f"chain {runs[0]}: 4 events, intact" in output


def test_it_catches_edited_data(runs: tuple[uuid.UUID, uuid.UUID]) -> None:
    target = event(runs[0], 2)
    sql("UPDATE audit_event SET data = %s WHERE id = %s",
        [db("data", {"n": 1, "note": "paid twice"}), target.pk])
    status, output = audit_verify()
    assert status == 1
    assert f"BROKEN chain {runs[0]} seq 2 (gseq {target.gseq}): column 'data'" in output
    assert audit_verify("--run", str(runs[0]))[0] == 1
    assert audit_verify("--run", str(runs[1]))[0] == 0  # the other run's chain still holds


def test_it_catches_an_edited_body(runs: tuple[uuid.UUID, uuid.UUID]) -> None:
    target = event(runs[1], 3)
    body = json.loads(target.body)
    body["data"]["note"] = "rewritten"
    sql("UPDATE audit_event SET body = %s WHERE id = %s", [canonical_json(body), target.pk])
    status, output = audit_verify()
    assert status == 1
    assert f"BROKEN chain {runs[1]} seq 3 (gseq {target.gseq}): hash mismatch" in output


def test_it_catches_a_consistently_rewritten_event_in_the_global_chain(
        runs: tuple[uuid.UUID, uuid.UUID]) -> None:
    # The last event of a run rewritten with its own hash, ghash and its chain head: the run's
    # chain holds, but the next event in the global chain still links to the old ghash.
    target = event(runs[0], 4)
    body = json.loads(target.body)
    body["data"]["note"] = "rewritten"
    new_body = canonical_json(body)
    new_hash = chain_hash(target.prev_hash, new_body)
    sql("UPDATE audit_event SET body = %s, data = %s, hash = %s, ghash = %s WHERE id = %s",
        [new_body, db("data", body["data"]), new_hash, global_hash(target.gprev_hash, new_hash),
         target.pk])
    sql("UPDATE audit_chainhead SET head_hash = %s WHERE chain = %s",
        [new_hash, ChainHead._meta.pk.get_db_prep_value(runs[0], connection)])
    assert verify.verify_chain(runs[0]).ok
    status, output = audit_verify()
    assert status == 1
    following = Event.objects.get(gseq=target.gseq + 1)
    assert (f"BROKEN global chain (gseq {following.gseq}): global order broken: gprev_hash does "
            f"not match the ghash of gseq {target.gseq} (the event is "
            f"{verify.chain_label(following.chain)} seq {following.seq})") in output


def test_it_catches_a_deleted_event(runs: tuple[uuid.UUID, uuid.UUID]) -> None:
    gone = event(runs[0], 2)
    sql("DELETE FROM audit_event WHERE id = %s", [gone.pk])
    status, output = audit_verify()
    assert status == 1
    assert (f"BROKEN chain {runs[0]} seq 3 (gseq {event(runs[0], 3).gseq}): sequence gap: "
            "expected seq 2, found 3 (an event is missing)") in output
    assert (f"BROKEN global chain (gseq {gone.gseq + 1}): global sequence gap: expected gseq "
            f"{gone.gseq}, found {gone.gseq + 1}") in output


def test_it_catches_a_deleted_last_event(runs: tuple[uuid.UUID, uuid.UUID]) -> None:
    last = Event.objects.order_by("-gseq").first()
    assert last is not None
    sql("DELETE FROM audit_event WHERE id = %s", [last.pk])
    status, output = audit_verify()
    assert status == 1
    n = last.gseq
    assert (f"BROKEN {verify.chain_label(last.chain)} seq {last.seq}: event missing: "
            f"the chain head records {last.seq} events but {last.seq - 1} remain") in output
    assert (f"BROKEN global chain (gseq {n}): event missing: the global head records {n} events "
            f"but {n - 1} remain") in output


def test_it_catches_a_forged_event(runs: tuple[uuid.UUID, uuid.UUID]) -> None:
    # Correctly linked into the run's chain and the global chain; only the heads disagree.
    tip = event(runs[1], 4)
    at = timezone.now()
    data = {"amount": 1_000_000}
    body = canonical_json({"chain": str(runs[1]), "seq": 5, "kind": "refund.issued",
                           "at": at.isoformat(), "actor": "user:mallory", "data": data})
    digest = chain_hash(tip.hash, body)
    gseq, gprev = verify.global_head()
    sql("INSERT INTO audit_event (chain, seq, kind, at, actor, data, body, prev_hash, hash, "
        "gseq, gprev_hash, ghash) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        [db("chain", runs[1]), 5, "refund.issued", db("at", at), "user:mallory", db("data", data),
         body, tip.hash, digest, gseq + 1, gprev, global_hash(gprev, digest)])
    status, output = audit_verify()
    assert status == 1
    assert (f"BROKEN chain {runs[1]} seq 5: event forged: the chain head records 4 events but 5 "
            "exist") in output
    assert (f"BROKEN global chain (gseq {gseq + 1}): event forged: the global head records "
            f"{gseq} events but {gseq + 1} exist") in output


def test_it_catches_a_run_cut_short_with_its_head_rewound(
        runs: tuple[uuid.UUID, uuid.UUID]) -> None:
    # The run's last event deleted and its chain head moved back: the run's chain looks whole,
    # the global chain does not.
    gone, kept = event(runs[0], 4), event(runs[0], 3)
    sql("DELETE FROM audit_event WHERE id = %s", [gone.pk])
    sql("UPDATE audit_chainhead SET seq = 3, head_hash = %s WHERE chain = %s",
        [kept.hash, ChainHead._meta.pk.get_db_prep_value(runs[0], connection)])
    assert verify.verify_chain(runs[0]).ok
    status, output = audit_verify()
    assert status == 1
    assert (f"BROKEN global chain (gseq {gone.gseq + 1}): global sequence gap: expected gseq "
            f"{gone.gseq}, found {gone.gseq + 1}; an event is missing") in output
    assert f"chain {runs[0]}" not in output.split("BROKEN global chain")[0]


def test_it_takes_events_appended_while_it_reads_for_appends(
        runs: tuple[uuid.UUID, uuid.UUID]) -> None:
    # Verification reads a chain's head before its events; an append committed in between is
    # past the head it read, and the head read again confirms it.
    chain = runs[0]
    head_before = (4, event(chain, 4).hash)
    with transaction.atomic():
        ledger.append(chain, "test.step", {"n": 5}, actor="user:tester")
    events = Event.objects.filter(chain=chain).order_by("seq")
    assert verify.check_chain(chain, events, head_before).ok
    stale = (4, event(chain, 3).hash)
    result = verify.check_chain(chain, events, stale)
    assert (result.ok, result.broken_seq) == (False, 4)
    assert "head's hash" in result.problem


def test_it_catches_swapped_seqs(runs: tuple[uuid.UUID, uuid.UUID]) -> None:
    second, third = event(runs[0], 2).pk, event(runs[0], 3).pk
    sql("UPDATE audit_event SET seq = %s WHERE id = %s", [1000, second])
    sql("UPDATE audit_event SET seq = %s WHERE id = %s", [2, third])
    sql("UPDATE audit_event SET seq = %s WHERE id = %s", [3, second])
    status, output = audit_verify()
    assert status == 1
    assert f"BROKEN chain {runs[0]} seq 2" in output
    assert "prev_hash link broken" in output


def test_it_catches_swapped_global_positions(runs: tuple[uuid.UUID, uuid.UUID]) -> None:
    # Two events of different runs trade places in the global order; each run's chain holds.
    a, b = event(runs[0], 3), event(runs[1], 3)
    sql("UPDATE audit_event SET gseq = %s WHERE id = %s", [10_000, a.pk])
    sql("UPDATE audit_event SET gseq = %s WHERE id = %s", [a.gseq, b.pk])
    sql("UPDATE audit_event SET gseq = %s WHERE id = %s", [b.gseq, a.pk])
    assert verify.verify_chain(runs[0]).ok and verify.verify_chain(runs[1]).ok
    status, output = audit_verify()
    assert status == 1
    assert (f"BROKEN global chain (gseq {min(a.gseq, b.gseq)}): global order broken: "
            "gprev_hash does not match") in output


def test_it_catches_tampering_with_the_configuration_chain(runs: Any) -> None:
    target = Event.objects.get(chain=ledger.CONFIG_CHAIN, actor="user:ledger-test")
    sql("UPDATE audit_event SET actor = %s WHERE id = %s", ["user:nobody", target.pk])
    status, output = audit_verify()
    assert status == 1
    assert f"BROKEN configuration chain {ledger.CONFIG_CHAIN} seq {target.seq}" in output
    assert "column 'actor'" in output


@pytest.mark.parametrize("run, message", [
    ("not-a-uuid", "must be a run id"),
    (str(uuid.UUID(int=7)), "has no chain"),
    (str(ledger.GLOBAL_CHAIN), "without --run"),
])
def test_it_rejects_a_bad_run_argument(db: Any, run: str, message: str) -> None:
    status, output = audit_verify("--run", run)
    assert status == 2
    assert message in output


@pytest.mark.postgres
def test_it_still_refuses_updates_once_the_tampering_session_ends(runs: Any) -> None:
    target = event(runs[0], 1)
    sql("UPDATE audit_event SET actor = %s WHERE id = %s", ["user:mallory", target.pk])
    with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("UPDATE audit_event SET actor = 'x' WHERE id = %s", [target.pk])


# --- a real run, exported and verified outside the application --------------------------------


@pytest.mark.django_db(transaction=True)
def test_it_verifies_and_exports_a_real_run(runner: None, api: Any, vendor_input: dict[str, str],
                                            tmp_path: Path) -> None:
    run_id = api.post("/api/v1/runs", {"process": "vendor-onboarding",
                                       "input": vendor_input}).json()["id"]
    run = wait_for_run(run_id)
    assert run.status == "succeeded", run.error
    status, output = audit_verify()
    assert status == 0, output
    assert audit_verify("--run", run_id)[0] == 0

    whole, one = tmp_path / "ledger.jsonl", tmp_path / "run.jsonl"
    call_command("audit_export", "--output", str(whole), stderr=io.StringIO())
    call_command("audit_export", "--run", run_id, "--output", str(one), stderr=io.StringIO())
    lines = one.read_text(encoding="utf-8").splitlines()
    assert len(lines) == Event.objects.filter(chain=run_id).count() > 10
    first = json.loads(lines[0])
    assert set(first) == {"chain", "seq", "gseq", "kind", "at", "actor", "data", "body",
                          "prev_hash", "hash", "gprev_hash", "ghash"}
    assert (first["chain"], first["seq"], first["kind"]) == (run_id, 1, "run.created")
    for path in (whole, one):
        checked = verify_file(path)
        assert checked.returncode == 0, checked.stderr
        assert checked.stdout.startswith("OK: ")

    # One byte flipped anywhere in a line: the file no longer verifies.
    raw = bytearray(one.read_bytes())
    offset = raw.index(b'"vendor_id"')
    raw[offset + 2] ^= 0x01
    flipped = tmp_path / "flipped.jsonl"
    flipped.write_bytes(bytes(raw))
    checked = verify_file(flipped)
    assert checked.returncode == 1
    line = raw[:offset].count(b"\n") + 1
    assert f"BROKEN line {line} (chain {run_id} seq " in checked.stderr

    # A line left out: the chain's links break there.
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[:3] + lines[4:]) + "\n", encoding="utf-8")
    checked = verify_file(cut)
    assert checked.returncode == 1
    assert "sequence gap: expected seq 4 of this chain, found 5" in checked.stderr


def test_it_exports_a_time_window(runs: tuple[uuid.UUID, uuid.UUID], tmp_path: Path) -> None:
    middle = event(runs[0], 3)
    out = io.StringIO()
    call_command("audit_export", "--since", middle.at.isoformat(), stdout=out)
    exported = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["gseq"] for e in exported] == list(range(middle.gseq, middle.gseq + len(exported)))
    assert all(e["at"] >= middle.at.isoformat() for e in exported)
    (tmp_path / "window.jsonl").write_text(out.getvalue(), encoding="utf-8")
    checked = verify_file(tmp_path / "window.jsonl")
    assert checked.returncode == 0, checked.stderr
    out = io.StringIO()
    call_command("audit_export", "--until", middle.at.isoformat(), stdout=out)
    assert [json.loads(line)["gseq"] for line in out.getvalue().splitlines()] == list(
        range(1, middle.gseq))


def test_it_refuses_a_bad_time(db: Any) -> None:
    with pytest.raises(CommandError, match="--since must be an ISO 8601"):
        call_command("audit_export", "--since", "yesterday", stdout=io.StringIO())


# --- the ledger viewer ------------------------------------------------------------------------


@pytest.fixture
def admin_client(client: Client, runs: Any) -> Client:
    client.force_login(User.objects.get(username="admin"))
    return client


def test_it_lists_events_newest_first_for_an_admin(admin_client: Client,
                                                   runs: tuple[uuid.UUID, uuid.UUID]) -> None:
    page = admin_client.get("/ledger/")
    assert page.status_code == 200
    text = page.content.decode()
    rows = [int(e.gseq) for e in page.context["events"]]
    assert rows == sorted(rows, reverse=True)
    assert len(rows) == Event.objects.count()
    assert str(runs[0])[:8] in text and "configuration" in text
    assert 'href="/ledger/"' in text  # the nav link


@pytest.mark.parametrize("query, expected", [
    ("kind=test.", {"test.step"}),
    ("kind=config.changed", {"config.changed"}),
    ("actor=user:ledger-test", {"config.changed"}),
])
def test_it_filters_by_kind_and_actor(admin_client: Client, query: str,
                                      expected: set[str]) -> None:
    page = admin_client.get(f"/ledger/?{query}")
    assert page.status_code == 200
    assert {e.kind for e in page.context["events"]} == expected


def test_it_filters_by_run_and_time(admin_client: Client,
                                    runs: tuple[uuid.UUID, uuid.UUID]) -> None:
    page = admin_client.get("/ledger/", {"run": str(runs[1])})
    assert [e.seq for e in page.context["events"]] == [4, 3, 2, 1]
    third = event(runs[1], 3)
    local = timezone.localtime(third.at).replace(tzinfo=None)
    page = admin_client.get("/ledger/", {"run": str(runs[1]),
                                         "since": local.isoformat(sep=" ")})
    assert [e.seq for e in page.context["events"]] == [4, 3]
    page = admin_client.get("/ledger/", {"run": str(runs[1]),
                                         "until": local.isoformat(sep=" ")})
    assert [e.seq for e in page.context["events"]] == [2, 1]


def test_it_pages_through_the_ledger(admin_client: Client,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from console import ledger_views

    monkeypatch.setattr(ledger_views, "PAGE_SIZE", 4)
    ids = list(Event.objects.filter(kind="test.step").order_by("-id")
               .values_list("id", flat=True))
    first = admin_client.get("/ledger/", {"kind": "test."})
    assert [e.pk for e in first.context["events"]] == ids[:4]
    older = first.context["older"]
    assert older and f"before={ids[3]}" in older
    second = admin_client.get(f"/ledger/?{older}")
    assert [e.pk for e in second.context["events"]] == ids[4:]
    assert second.context["older"] is None
    assert "« Newest" in second.content.decode() and "← Newer" in second.content.decode()


def test_it_rejects_a_bad_filter(admin_client: Client) -> None:
    page = admin_client.get("/ledger/", {"run": "nope", "since": "2026-01-02 00:00",
                                         "until": "2026-01-01 00:00"})
    assert page.status_code == 400
    assert "Enter a valid UUID" in page.content.decode()


def test_it_escapes_event_data(admin_client: Client, runs: tuple[uuid.UUID, uuid.UUID]) -> None:
    with transaction.atomic():
        ledger.append(runs[0], "model.called", {"output": XSS}, actor="agent:writer")
    page = admin_client.get("/ledger/")
    assert page.context["events"][0].gseq is None  # not sealed yet, listed all the same
    text = page.content.decode()
    assert XSS not in text
    assert "&lt;script&gt;alert(&#x27;owned&#x27;)&lt;/script&gt;" in text


def test_it_lets_members_of_the_admin_group_in(client: Client, runs: Any) -> None:
    member = User.objects.create_user("auditor")
    member.groups.add(Group.objects.get(name="admin"))
    client.force_login(member)
    assert client.get("/ledger/").status_code == 200


def test_it_forbids_the_ledger_to_operators(client: Client, operator: User) -> None:
    client.force_login(operator)
    response = client.get("/ledger/")
    assert response.status_code == 403
    assert 'href="/ledger/"' not in client.get("/").content.decode()


def test_it_sends_anonymous_visitors_to_sign_in(client: Client, db: Any) -> None:
    response = client.get("/ledger/")
    assert response.status_code == 302
    assert response["Location"] == "/login/?next=/ledger/"


# --- the migration that introduced the global chain -------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_it_fills_the_global_chain_for_events_that_existed_before_it() -> None:
    from django.db.migrations.executor import MigrationExecutor

    before = [("audit", "0002_append_only_trigger")]
    latest = [key for key in MigrationExecutor(connection).loader.graph.leaf_nodes()
              if key[0] == "audit"]
    MigrationExecutor(connection).migrate(before)
    try:
        chains = [uuid.UUID(int=10), uuid.UUID(int=11)]
        start = timezone.now() - timedelta(hours=1)
        heads = {c: GENESIS for c in chains}
        with connection.cursor() as cursor:
            for step in range(3):
                for i, chain in enumerate(reversed(chains)):
                    at = start + timedelta(minutes=step, seconds=i)
                    body = canonical_json({"chain": str(chain), "seq": step + 1, "kind": "old",
                                           "at": at.isoformat(), "actor": "system",
                                           "data": {"step": step}})
                    digest = chain_hash(heads[chain], body)
                    cursor.execute(
                        "INSERT INTO audit_event (chain, seq, kind, at, actor, data, body, "
                        "prev_hash, hash) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        [db("chain", chain), step + 1, "old", db("at", at), "system",
                         db("data", {"step": step}), body, heads[chain], digest])
                    heads[chain] = digest
            for chain, head in heads.items():
                cursor.execute("INSERT INTO audit_chainhead (chain, seq, head_hash) "
                               "VALUES (%s, 3, %s)", [db("chain", chain), head])
    finally:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(latest)

    order = list(Event.objects.order_by("gseq").values_list("chain", "seq"))
    assert order == [(chains[1], 1), (chains[0], 1), (chains[1], 2), (chains[0], 2),
                     (chains[1], 3), (chains[0], 3)]  # (at, chain, seq) order
    assert audit_verify()[0] == 0
    with transaction.atomic():
        appended = ledger.append(chains[0], "new", {}, actor="system")
    assert (appended.seq, appended.gseq) == (4, None)
    assert ledger.seal() == 1
    assert Event.objects.get(pk=appended.pk).gseq == 7
    status, output = audit_verify()
    assert status == 0, output
    if POSTGRES:  # the trigger is back on
        with pytest.raises(DatabaseError, match="append-only"), transaction.atomic():
            Event.objects.filter(pk=appended.pk).update(kind="x")


@pytest.mark.django_db(transaction=True)
def test_it_seals_what_is_left_when_the_sealed_global_chain_is_migrated_back() -> None:
    from django.db.migrations.executor import MigrationExecutor

    chain = uuid.UUID(int=12)
    with transaction.atomic():
        for n in range(3):
            ledger.append(chain, "old", {"n": n}, actor="system")
    assert ledger.seal(limit=1) == 1
    executor = MigrationExecutor(connection)
    # Every app's latest: going back unapplies the migrations of other apps that depend on
    # audit's later ones (orchestration's), and they must come back too.
    latest = executor.loader.graph.leaf_nodes()
    executor.migrate([("audit", "0004_global_chain_required")])
    try:
        assert list(Event.objects.order_by("seq").values_list("gseq", flat=True)) == [1, 2, 3]
        assert verify.verify_global().ok
    finally:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(latest)
    assert audit_verify()[0] == 0
