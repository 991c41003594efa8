"""Live updates at the websocket level, against the real channel layer of each mode (in-memory
on the server's loop standalone, Redis distributed): who may connect, pushes after commit,
resync by the last seen ledger seq, and sockets closed at sign-out."""

from __future__ import annotations

import json

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client

from approvals import services as approvals
from approvals.models import ApprovalRequest
from audit.models import Event
from console.consumers import CLOSE_SIGNED_OUT
from console.routing import websocket_application
from orchestration import services
from orchestration.models import Process, Run
from tests.conftest import wait_for_run

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

REFUND = {"order_id": "ORD-1042", "reason": "damaged", "customer_email": "kim@example.com",
          "amount": 500}


@pytest.fixture
def runner(runner: None, demo: None) -> None:
    """The worker, with the demo data seeded."""


def _session_cookie(user: User) -> str:
    client = Client()
    client.force_login(user)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"


async def connect(path: str, user: User | None = None, *,
                  origin: str = "http://127.0.0.1") -> tuple[WebsocketCommunicator, bool]:
    headers = [(b"origin", origin.encode()), (b"host", b"127.0.0.1")]
    if user is not None:
        cookie = await sync_to_async(_session_cookie)(user)
        headers.append((b"cookie", cookie.encode()))
    communicator = WebsocketCommunicator(websocket_application(), path, headers=headers)
    connected, _ = await communicator.connect(timeout=5)
    return communicator, connected


def _waiting_refund(username: str = "operator") -> Run:
    user = User.objects.get(username=username)
    process = Process.objects.select_related("current_version").get(slug="refund-exception")
    run = services.run_create(process=process, input=dict(REFUND), user=user)
    run = wait_for_run(run.pk, timeout=60)
    assert run.status == "waiting", run.status
    return run


def _head(run: Run) -> int:
    return Event.objects.filter(chain=run.pk).order_by("-seq").values_list("seq", flat=True)[0]


async def until(communicator: WebsocketCommunicator, needle: str, *, timeout: float = 60) -> str:
    """Fragments pushed to this socket until one contains `needle`."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen = []
    while loop.time() < deadline:
        try:
            message = await communicator.receive_from(timeout=deadline - loop.time())
        except TimeoutError:
            break
        seen.append(message)
        if needle in message:
            return message
    raise AssertionError(f"no pushed fragment contained {needle!r}; got {len(seen)} fragments")


async def test_it_refuses_an_anonymous_socket(runner: None) -> None:
    _, connected = await connect("/ws/runs/")
    assert not connected


async def test_it_refuses_a_foreign_origin(runner: None) -> None:
    operator = await sync_to_async(User.objects.get)(username="operator")
    _, connected = await connect("/ws/runs/", operator, origin="https://evil.example")
    assert not connected
    communicator, connected = await connect("/ws/runs/", operator)
    assert connected
    await communicator.disconnect()


async def test_it_refuses_an_outsider_a_run_they_may_not_see(runner: None) -> None:
    run = await sync_to_async(_waiting_refund)()
    outsider = await sync_to_async(User.objects.create_user)("outsider", password="x")
    _, connected = await connect(f"/ws/runs/{run.pk}/", outsider)
    assert not connected
    _, connected = await connect("/ws/review/", outsider)
    assert not connected  # a member of no decider group has no review queue
    operator = await sync_to_async(User.objects.get)(username="operator")
    communicator, connected = await connect(f"/ws/runs/{run.pk}/", operator)
    assert connected
    await communicator.disconnect()


async def test_it_pushes_the_run_page_fragment_to_its_owner_after_a_decision(
        runner: None) -> None:
    run = await sync_to_async(_waiting_refund)()
    operator = await sync_to_async(User.objects.get)(username="operator")
    reviewer = await sync_to_async(User.objects.get)(username="reviewer")
    page, connected = await connect(f"/ws/runs/{run.pk}/", operator)
    assert connected
    queue, connected = await connect("/ws/review/", reviewer)
    assert connected
    assert await page.receive_nothing(timeout=0.5)

    request = await sync_to_async(ApprovalRequest.objects.get)(run_id=run.pk, status="pending")
    await sync_to_async(approvals.request_decide)(request_id=request.pk, user=reviewer,
                                                  decision="approve")
    fragment = await until(page, 'id="run-status">succeeded<')
    assert fragment.strip().startswith('<div id="run-live"')
    assert "refund_id" in fragment
    emptied = await until(queue, "Nothing is waiting for you.")
    assert f'id="approval-{request.pk}"' not in emptied
    await page.disconnect()
    await queue.disconnect()


async def test_it_resyncs_a_reconnecting_client_from_its_last_seq(runner: None) -> None:
    run = await sync_to_async(_waiting_refund)()
    head = await sync_to_async(_head)(run)
    operator = await sync_to_async(User.objects.get)(username="operator")
    page, connected = await connect(f"/ws/runs/{run.pk}/", operator)
    assert connected
    await page.send_to(text_data=json.dumps({"seq": head}))
    assert await page.receive_nothing(timeout=0.5)  # up to date: nothing to resend
    await page.send_to(text_data=json.dumps({"seq": head - 2}))
    fragment = await page.receive_from(timeout=5)
    assert f'data-seq="{head}"' in fragment and 'id="run-status">waiting<' in fragment
    await page.send_to(text_data=json.dumps({"seq": "nonsense"}))
    assert await page.receive_nothing(timeout=0.3)
    await page.disconnect()


async def test_it_closes_the_sockets_of_a_user_who_signs_out(runner: None) -> None:
    operator = await sync_to_async(User.objects.get)(username="operator")
    communicator, connected = await connect("/ws/runs/", operator)
    assert connected

    def sign_out() -> None:
        client = Client()
        client.force_login(operator)
        client.post("/logout/")

    await sync_to_async(sign_out)()
    closed = await communicator.receive_output(timeout=5)
    assert closed == {"type": "websocket.close", "code": CLOSE_SIGNED_OUT}


async def test_the_channel_layers_reads_outlast_its_blocking_waits() -> None:
    """A consumer waits for its messages with a blocking pop of ``brpop_timeout`` seconds;
    a socket read timeout no longer than that raced the answer, and on a busy machine took
    the consumer and its socket down ("Timeout reading from ...")."""
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if not hasattr(layer, "brpop_timeout"):
        pytest.skip("the in-memory channel layer (standalone pass) does not block on Redis")
    client = layer.connection(0)
    try:
        connection = await client.connection_pool.get_connection()
        try:
            assert connection.socket_timeout >= 3 * layer.brpop_timeout
        finally:
            await client.connection_pool.release(connection)
    finally:
        await client.aclose()


@pytest.mark.parametrize("loop_state", ["stopped", "closed"])
async def test_a_send_to_a_loop_that_ends_meanwhile_leaves_no_coroutine_behind(
        monkeypatch: pytest.MonkeyPatch, loop_state: str) -> None:
    """A worker thread's announcement races the end of the process's socket loop: whether the
    loop stops before it runs the send or closes right after it was looked at, nothing is
    left unawaited (or raised to the worker)."""
    import asyncio
    import gc
    import warnings

    from channels.layers import InMemoryChannelLayer

    from console import live

    loop = asyncio.new_event_loop()
    if loop_state == "closed":
        loop.close()
    monkeypatch.setattr(live, "_loop", loop)
    monkeypatch.setattr(live, "_in_memory", lambda: True)
    monkeypatch.setattr(live, "get_channel_layer", InMemoryChannelLayer)
    monkeypatch.setattr(loop, "is_running", lambda: True)  # as it was when looked at
    monkeypatch.setattr(loop, "is_closed", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        live.send("runs", {"type": "runs.changed", "run": "r"})
        if not loop.is_closed():
            monkeypatch.undo()
            loop.close()  # stopped without running what was handed to it
        gc.collect()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []


async def test_a_send_started_on_a_loop_that_then_closes_has_delivered_its_message() -> None:
    """The in-memory layer's messages are in their channels' queues as soon as the send is
    started on the socket loop, and nothing is left unawaited when that loop closes without
    running again (as a test's loop does when the test ends)."""
    import asyncio
    import gc
    import threading
    import warnings

    from channels.layers import InMemoryChannelLayer

    from console import live

    layer = InMemoryChannelLayer()
    loop = asyncio.new_event_loop()

    async def announce() -> None:
        await layer.group_add("runs", "specific.inbox")
        live._start_send(loop, layer, "runs", {"type": "runs.changed", "run": "r"})

    def on_its_own_thread() -> None:  # (this test's own loop is running on this one)
        loop.run_until_complete(announce())
        loop.close()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        thread = threading.Thread(target=on_its_own_thread)
        thread.start()
        thread.join()
        gc.collect()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
    assert layer.channels["specific.inbox"].qsize() == 1
