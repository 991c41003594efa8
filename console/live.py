"""Live updates: channel-layer group names and the broadcaster.

The broadcaster only announces *that* something changed (run, runs list, review queue); each
websocket consumer then renders the same template fragment its page uses, for its own user, so
permissions and CSRF tokens are per recipient. It runs after commit, from the ledger's
`event_appended` signal, never from domain code.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import time
import uuid
from typing import Any

from channels.layers import get_channel_layer
from django.conf import settings

log = logging.getLogger("switchboard.live")

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def run_group(run_id: Any) -> str:
    return f"run_{uuid.UUID(str(run_id)).hex}"


def runs_group() -> str:
    return "runs"


def review_group(group_id: int) -> str:
    return f"review_{int(group_id)}"


def user_group(user_id: int) -> str:
    return f"user_{int(user_id)}"


def bind_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Remember the server's event loop: the in-memory channel layer lives on it."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop.is_closed() or not _loop.is_running():
            _loop = loop


def _in_memory() -> bool:
    return settings.CHANNEL_LAYERS["default"]["BACKEND"].endswith("InMemoryChannelLayer")


COALESCE_SECONDS = 0.05
# How long a process about to exit waits for what it still has to send.
DRAIN_SECONDS = 2.0


class _Broadcaster:
    """Sends to the Redis channel layer from a loop of its own, off the caller's thread.

    A worker commits a step and moves on: it never waits for Redis (one event loop and one
    connection pool per process, instead of a loop per message). Announcements are coalesced
    over COALESCE_SECONDS and while a send is in flight: a page needs only the newest seq of its
    run, and a list page one nudge however many runs moved."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.pending: dict[tuple[str, str], dict[str, Any]] = {}
        self.loop = asyncio.new_event_loop()
        self.scheduled = False
        threading.Thread(target=self.loop.run_forever, name="switchboard-live",
                         daemon=True).start()
        atexit.register(self.drain)

    def drain(self, timeout: float = DRAIN_SECONDS) -> None:
        """Wait (at exit) for what is queued to go out: a short-lived process, such as a shell
        deactivating someone, must not take their sockets' access.revoked down with it."""
        if os.getpid() != self.pid:  # a forked child: the sending thread stayed in the parent
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if not self.scheduled:
                    return
            time.sleep(0.01)

    def put(self, group: str, message: dict[str, Any]) -> None:
        # A page re-renders its own fragment whatever the message names: one per group and
        # type is enough while a send is in flight.
        key = (group, str(message.get("type")))
        with self.lock:
            queued = self.pending.get(key)
            if queued is None or int(message.get("seq", 0)) >= int(queued.get("seq", 0)):
                self.pending[key] = message
            if self.scheduled:
                return
            self.scheduled = True
        asyncio.run_coroutine_threadsafe(self._flush(), self.loop)

    async def _flush(self) -> None:
        try:
            await self._send_pending()
        finally:
            # However this ends, the next announcement schedules a flush again.
            with self.lock:
                self.scheduled = False
        with self.lock:
            again = bool(self.pending)
            if again:
                self.scheduled = True
        if again:
            await self._flush()

    async def _send_pending(self) -> None:
        layer = get_channel_layer()
        while True:
            # Gather what arrives in the next few milliseconds: a run's steps come in quick
            # succession, and its page needs to hear only the last of them.
            await asyncio.sleep(COALESCE_SECONDS)
            with self.lock:
                batch, self.pending = self.pending, {}
                if not batch:
                    return
            for (group, _), message in batch.items():
                try:
                    await layer.group_send(group, message)
                except Exception:  # Redis away: pages resync by ledger seq when it is back
                    log.warning("could not send %s to %s", message.get("type"), group)


_broadcaster: _Broadcaster | None = None


def _remote_send(group: str, message: dict[str, Any]) -> None:
    global _broadcaster
    with _loop_lock:
        if _broadcaster is None or _broadcaster.pid != os.getpid():  # first use, or forked
            _broadcaster = _Broadcaster()
        broadcaster = _broadcaster
    broadcaster.put(group, message)


def send(group: str, message: dict[str, Any]) -> None:
    """Send to a group from synchronous code (a view, a worker thread, a Celery task)."""
    layer = get_channel_layer()
    if layer is None:
        return
    if not _in_memory():
        _remote_send(group, message)
        return
    loop = _loop
    if loop is None or loop.is_closed() or not loop.is_running():
        return  # no socket was ever opened in this process: nobody to tell
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        _start_send(loop, layer, group, message)
        return
    try:  # the coroutine is made on the loop, once it runs this
        loop.call_soon_threadsafe(_start_send, loop, layer, group, message)
    except RuntimeError:  # the loop closed since it was looked at: nobody left to tell
        return


def _start_send(loop: asyncio.AbstractEventLoop, layer: Any, group: str,
                message: dict[str, Any]) -> None:
    """Start the in-memory layer's group_send on its loop at once (an eager task, and the
    per-channel sends it starts too): the messages are in the channels' queues before this
    returns, whether or not the loop runs again. A loop closed with the task not yet started
    (a test's, as it ends) would drop it, and its coroutine would never be awaited."""
    factory = loop.get_task_factory()
    loop.set_task_factory(asyncio.eager_task_factory)
    try:
        loop.create_task(layer.group_send(group, message))
    finally:
        loop.set_task_factory(factory)


def announce(chain: Any, seq: int, kind: str, kinds: frozenset[str] = frozenset()) -> None:
    """Tell the pages showing this chain's run, the runs list and the review queues."""
    try:
        run_id = uuid.UUID(str(chain))
    except ValueError:
        return
    try:
        send(run_group(run_id), {"type": "run.changed", "seq": int(seq)})
        send(runs_group(), {"type": "runs.changed", "run": str(run_id)})
        if any(k.startswith("approval.") for k in kinds | {kind}):
            from approvals.models import ApprovalRequest

            groups = set(ApprovalRequest.objects.filter(run_id=run_id)
                         .values_list("decider_group_id", flat=True))
            for group_id in groups:
                if group_id is not None:
                    send(review_group(group_id), {"type": "queue.changed"})
    except Exception:  # a broadcast must never break the work that committed
        log.exception("could not announce %s event %s of chain %s", kind, seq, chain)


def on_event_appended(sender: Any, *, chain: Any, seq: int, kind: str,
                      kinds: frozenset[str] = frozenset(), **_: Any) -> None:
    announce(chain, seq, kind, kinds)


def on_logged_out(sender: Any, *, user: Any = None, **_: Any) -> None:
    """Close every live socket of a user who signs out."""
    if user is not None and user.pk is not None:
        try:
            send(user_group(user.pk), {"type": "session.ended"})
        except Exception:
            log.exception("could not close the sockets of user %s", user.pk)
