"""Sockets follow access, against the real channel layer of each mode: deactivating a person,
taking them out of a group or revoking an object permission closes the sockets they may no longer
hold at once (console.socket_access), other people's sockets carry on, and every push re-checks
access even when no revoke message came (rows changed with QuerySet.update send no signal)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth.models import Group, Permission, User
from guardian.shortcuts import assign_perm, remove_perm

from approvals import services as approvals
from approvals.models import ApprovalRequest
from console.consumers import CLOSE_FORBIDDEN
from orchestration.models import Process, Run
from tests.conftest import ROOT, subprocess_database_url
from tests.test_live import _waiting_refund, connect, until

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

SUCCEEDED = 'id="run-status">succeeded<'
EMPTY_QUEUE = "Nothing is waiting for you."


@pytest.fixture
def runner(runner: None, demo: None) -> None:
    """The worker, with the demo data seeded."""


@sync_to_async
def people(*usernames: str) -> list[User]:
    return [User.objects.get(username=name) for name in usernames]


async def opened(path: str, user: User) -> WebsocketCommunicator:
    communicator, connected = await connect(path, user)
    assert connected, f"{user.username} could not open {path}"
    return communicator


async def quiet(*communicators: WebsocketCommunicator) -> None:
    """Let pushes already on their way arrive (in distributed mode the run's last ledger events
    come through Redis after it is seen waiting), so a later silence means something."""
    for communicator in communicators:
        for _ in range(20):
            if await communicator.receive_nothing(timeout=0.5):
                break
            await communicator.receive_output(timeout=1)


async def assert_forbidden(communicator: WebsocketCommunicator) -> None:
    """The socket is closed for lost access, and nothing follows the close. (The wait is long:
    the close comes through Redis, and the suite keeps both cores busy.)"""
    assert await communicator.receive_output(timeout=30) == {
        "type": "websocket.close", "code": CLOSE_FORBIDDEN}
    assert await communicator.receive_nothing(timeout=0.3)


@sync_to_async
def approve(run: Run, username: str) -> ApprovalRequest:
    request = ApprovalRequest.objects.get(run_id=run.pk, status="pending")
    approvals.request_decide(request_id=request.pk, user=User.objects.get(username=username),
                             decision="approve")
    return request


@pytest.mark.parametrize("change", ["deactivated", "new password"])
async def test_it_closes_every_socket_of_someone_deactivated_or_given_a_new_password(
        runner: None, change: str) -> None:
    run = await sync_to_async(_waiting_refund)()
    operator, reviewer = await people("operator", "reviewer")
    page = await opened(f"/ws/runs/{run.pk}/", operator)
    runs = await opened("/ws/runs/", operator)
    others = await opened(f"/ws/runs/{run.pk}/", reviewer)

    def rename() -> None:
        operator.first_name = "Olga"
        operator.save()

    await quiet(page, runs, others)
    await sync_to_async(rename)()  # a change that takes nothing away tells no one
    assert await page.receive_nothing(timeout=0.5)

    def take_away() -> None:
        if change == "deactivated":
            operator.is_active = False
        else:  # signs out their other sessions, as on the next page load
            operator.set_password("a new one")
        operator.save()

    await sync_to_async(take_away)()
    await assert_forbidden(page)
    await assert_forbidden(runs)
    assert await others.receive_nothing(timeout=0.3)  # someone else's socket is left alone

    await approve(run, "reviewer")
    await until(others, SUCCEEDED)
    assert await page.receive_nothing(timeout=0.5)
    assert await runs.receive_nothing(timeout=0.1)
    for communicator in (page, runs, others):
        await communicator.disconnect()


@pytest.mark.parametrize("side", ["group", "user"])
async def test_it_closes_the_run_and_queue_sockets_of_someone_taken_out_of_the_group(
        runner: None, side: str) -> None:
    run = await sync_to_async(_waiting_refund)()
    reviewer, = await people("reviewer")
    page = await opened(f"/ws/runs/{run.pk}/", reviewer)  # seen through the group's view_run
    queue = await opened("/ws/review/", reviewer)  # the group is their only one
    others = await opened("/ws/review/", (await people("reviewer2"))[0])

    def take_out() -> None:
        if side == "group":
            Group.objects.get(name="reviewer").user_set.remove(reviewer)
        else:
            reviewer.groups.clear()

    await sync_to_async(take_out)()
    await assert_forbidden(page)
    await assert_forbidden(queue)

    request = await approve(run, "reviewer2")
    emptied = await until(others, EMPTY_QUEUE)
    assert f'id="approval-{request.pk}"' not in emptied
    assert await queue.receive_nothing(timeout=0.3)
    for communicator in (page, queue, others):
        await communicator.disconnect()


async def test_it_refreshes_a_queue_another_group_still_gives_without_the_lost_rows(
        runner: None) -> None:
    run = await sync_to_async(_waiting_refund)()
    reviewer, = await people("reviewer")
    auditors = await sync_to_async(Group.objects.create)(name="auditors")
    await sync_to_async(reviewer.groups.add)(auditors)
    request = await sync_to_async(ApprovalRequest.objects.get)(run_id=run.pk, status="pending")
    queue = await opened("/ws/review/", reviewer)
    await queue.send_to(text_data=json.dumps({"seq": None}))
    assert f'id="approval-{request.pk}"' in await queue.receive_from(timeout=5)
    runs = await opened("/ws/runs/", reviewer)
    await runs.send_to(text_data=json.dumps({"seq": None}))
    assert str(run.pk) in await runs.receive_from(timeout=5)
    page = await opened(f"/ws/runs/{run.pk}/", reviewer)

    await sync_to_async(reviewer.groups.set)([auditors])  # as the admin's user form does
    await assert_forbidden(page)
    # Still a member of a group: the queue stays open, shown at once without the reviewers' rows.
    refreshed = await queue.receive_from(timeout=5)
    assert EMPTY_QUEUE in refreshed and f'id="approval-{request.pk}"' not in refreshed
    # The runs list stays too, without the run they saw only as a reviewer.
    listed = await runs.receive_from(timeout=5)
    assert 'id="runs-list"' in listed and str(run.pk) not in listed
    for communicator in (queue, runs, page):
        await communicator.disconnect()


@pytest.mark.parametrize("holder", ["user", "group"])
async def test_it_closes_a_run_socket_when_the_object_permission_showing_it_is_revoked(
        runner: None, holder: str) -> None:
    run = await sync_to_async(_waiting_refund)()
    operator, = await people("operator")

    def grant() -> tuple[User, Process, User | Group]:
        starter = User.objects.create_user("starter", password="x")
        team = Group.objects.create(name="refund-team")
        starter.groups.add(team)
        process = Process.objects.get(slug="refund-exception")
        grantee = starter if holder == "user" else team
        assign_perm("orchestration.start_run", grantee, process)
        return starter, process, grantee

    starter, process, grantee = await sync_to_async(grant)()
    page = await opened(f"/ws/runs/{run.pk}/", starter)  # the permission is what lets them in
    others = await opened(f"/ws/runs/{run.pk}/", operator)

    await sync_to_async(remove_perm)("orchestration.start_run", grantee, process)
    await assert_forbidden(page)
    assert await others.receive_nothing(timeout=0.3)
    _, connected = await connect(f"/ws/runs/{run.pk}/", starter)
    assert not connected
    await page.disconnect()
    await others.disconnect()


@pytest.mark.parametrize("how", ["permission removed", "group deleted"])
async def test_it_closes_a_run_socket_when_the_group_granting_view_run_loses_it(
        runner: None, how: str) -> None:
    run = await sync_to_async(_waiting_refund)()
    operator, = await people("operator")

    def join_watchers() -> tuple[User, Group, Permission]:
        watcher = User.objects.create_user("watcher", password="x")
        watchers = Group.objects.create(name="watchers")
        view_run = Permission.objects.get(content_type__app_label="orchestration",
                                          codename="view_run")
        watchers.permissions.add(view_run)
        watcher.groups.add(watchers)
        return watcher, watchers, view_run

    watcher, watchers, view_run = await sync_to_async(join_watchers)()
    page = await opened(f"/ws/runs/{run.pk}/", watcher)
    others = await opened(f"/ws/runs/{run.pk}/", operator)

    def take_away() -> None:
        if how == "permission removed":
            watchers.permissions.remove(view_run)
        else:
            watchers.delete()

    await sync_to_async(take_away)()
    await assert_forbidden(page)
    assert await others.receive_nothing(timeout=0.3)
    await page.disconnect()
    await others.disconnect()


async def test_it_rechecks_access_at_every_push_even_if_no_revoke_message_came(
        runner: None) -> None:
    run = await sync_to_async(_waiting_refund)()
    operator, reviewer, reviewer2 = await people("operator", "reviewer", "reviewer2")
    page = await opened(f"/ws/runs/{run.pk}/", operator)
    runs = await opened("/ws/runs/", operator)
    queue = await opened("/ws/review/", reviewer)
    others = await opened("/ws/review/", reviewer2)

    def revoke_without_signals() -> None:
        User.objects.filter(pk=operator.pk).update(is_active=False)
        User.groups.through.objects.filter(user_id=reviewer.pk).delete()

    await quiet(page, runs, queue, others)
    await sync_to_async(revoke_without_signals)()
    # No one told the sockets: they stay open...
    assert await page.receive_nothing(timeout=0.5)
    assert await queue.receive_nothing(timeout=0.1)
    # ...until the next push, which finds the access gone and sends nothing.
    await runs.send_to(text_data=json.dumps({"seq": None}))  # a reconnecting page's resync
    await assert_forbidden(runs)
    await approve(run, "reviewer2")
    await until(others, EMPTY_QUEUE)
    await assert_forbidden(page)
    await assert_forbidden(queue)
    for communicator in (page, runs, queue, others):
        await communicator.disconnect()


@pytest.mark.distributed
async def test_it_closes_a_socket_when_another_process_deactivates_the_user(demo: None) -> None:
    """The admin's process is not the socket's: the revoke travels through Redis, and a process
    that exits right after the change still gets it out."""
    operator, = await people("operator")
    runs = await opened("/ws/runs/", operator)
    # The demo's own ledger events went out through Redis just before and may still push the
    # list (the operator may see it then): let them pass before the change under test.
    while not await runs.receive_nothing(timeout=0.5):
        await runs.receive_output()
    env = dict(os.environ, DATABASE_URL=subprocess_database_url(), REDIS_URL=settings.REDIS_URL)
    script = ("from django.contrib.auth.models import User\n"
              "user = User.objects.get(username='operator')\n"
              "user.is_active = False\n"
              "user.save()\n")
    await asyncio.to_thread(
        subprocess.run, [sys.executable, "manage.py", "shell", "-c", script],
        cwd=ROOT, env=env, check=True, timeout=60, capture_output=True)
    await assert_forbidden(runs)
    await runs.disconnect()
