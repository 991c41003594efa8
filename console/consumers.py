"""Websocket consumers for live pages. Each checks sign-in and permission before it joins a
group, renders the page's own fragment for its own user, and resends it on (re)connect when the
client's last seen event is behind, so nothing is missed while a socket was down.

Sockets follow access: every push re-reads the user behind the socket's session and renders for
that user as the database has them now, so a deactivated user or a permission taken away sends
nothing more even when no one said so; an `access.revoked` message (console.socket_access) makes
the check at once and closes the socket if the page is no longer theirs."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.contrib.auth import get_user
from django.http import Http404, HttpRequest
from django.template.loader import render_to_string
from django.utils import timezone

from console import live, time_zones

# Changes arriving within this window are shown with one render.
DEBOUNCE_SECONDS = 0.15
# Close codes: the htmx ws extension does not reconnect after these.
CLOSE_SIGNED_OUT = 4401
CLOSE_FORBIDDEN = 4403


class LiveConsumer(AsyncWebsocketConsumer):
    """Base: join the user's group plus `authorize()`'s groups; push `render()` on change."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.joined: list[str] = []
        self.last_html: str | None = None
        self.pending: asyncio.Task[None] | None = None
        self.dirty = False
        # Set once the socket is being closed: nothing is sent after that, whatever arrives
        # before the server's disconnect.
        self.closed = False
        # One render or access check at a time, so a fragment rendered before access was taken
        # cannot go out after the check that closed the socket.
        self.lock = asyncio.Lock()

    # Subclasses provide these two (both run in a database thread, for the user as they are now).
    def authorize(self, user: Any) -> list[str] | None:
        """The groups to join, or None to refuse."""
        raise NotImplementedError

    def render(self, user: Any) -> str | None:
        """The fragment for this user now, or None if they may no longer see it."""
        raise NotImplementedError

    def behind(self, seq: int | None) -> bool:
        """Whether a client that has seen `seq` needs the fragment again."""
        return True

    @property
    def user(self) -> Any:
        return self.scope.get("user")

    def viewer(self) -> Any | None:
        """The socket's user as its session stands now, or None once they are deactivated or
        deleted or their password changed. The scope's user was read at connect and caches its
        permissions for the socket's life, so it never decides what is sent."""
        request = HttpRequest()
        request.session = self.scope["session"]
        user = get_user(request)
        return user if user.is_authenticated and user.pk == self.user.pk else None

    def _authorize(self) -> list[str] | None:
        user = self.viewer()
        return None if user is None else self.authorize(user)

    def _render(self) -> str | None:
        user = self.viewer()
        if user is None:
            return None
        # In the reader's own zone, as their page was (console/time_zones.py). A socket's
        # session is never saved, so nothing is written to it here.
        zone = time_zones.preferred_zone(user, self.scope.get("session"), keep=False)
        with timezone.override(zone or None):
            return self.render(user)

    async def connect(self) -> None:
        live.bind_loop(asyncio.get_running_loop())
        if self.user is None or not self.user.is_authenticated:
            await self.close()
            return
        groups = await database_sync_to_async(self._authorize)()
        if groups is None:
            await self.close()
            return
        await self.follow(groups)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        self.closed = True
        if self.pending is not None:
            self.pending.cancel()
        await self.follow(None)

    async def follow(self, groups: list[str] | None) -> None:
        """Be in the user's group and these (none at all for None), and in no others."""
        wanted = [] if groups is None else [live.user_group(self.user.pk), *groups]
        for group in self.joined:
            if group not in wanted:
                await self.channel_layer.group_discard(group, self.channel_name)
        for group in wanted:
            if group not in self.joined:
                await self.channel_layer.group_add(group, self.channel_name)
        self.joined = wanted

    async def end(self, code: int) -> None:
        """Close now and leave every group: the server's disconnect comes later."""
        self.closed = True
        await self.follow(None)
        await self.close(code=code)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """The client says which event it last saw: {"seq": 12} (or null after a fresh load)."""
        try:
            seq = json.loads(text_data or "{}").get("seq")
        except (ValueError, AttributeError):
            return
        if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool)):
            return
        if await database_sync_to_async(self.behind)(seq):
            self.last_html = None
            await self.push()

    async def push(self) -> None:
        async with self.lock:
            if self.closed:
                return
            html = await database_sync_to_async(self._render)()
            if html is None:
                await self.end(CLOSE_FORBIDDEN)
            elif html != self.last_html:
                self.last_html = html
                await self.send(text_data=html)

    def changed(self) -> None:
        if self.closed:
            return
        # A change announced while a render is under way may not be in it: render once more.
        self.dirty = True
        if self.pending is None or self.pending.done():
            self.pending = asyncio.get_running_loop().create_task(self._push_soon())

    async def _push_soon(self) -> None:
        while self.dirty:
            await asyncio.sleep(DEBOUNCE_SECONDS)
            self.dirty = False
            await self.push()

    # Channel-layer messages (see console.live and console.socket_access).
    async def run_changed(self, message: dict[str, Any]) -> None:
        self.changed()

    async def runs_changed(self, message: dict[str, Any]) -> None:
        self.changed()

    async def queue_changed(self, message: dict[str, Any]) -> None:
        self.changed()

    async def session_ended(self, message: dict[str, Any]) -> None:
        async with self.lock:
            if not self.closed:
                await self.end(CLOSE_SIGNED_OUT)

    async def access_revoked(self, message: dict[str, Any]) -> None:
        """Some of this user's access was taken away: close the socket if the page is no longer
        theirs; otherwise keep only the groups they may still hear and show the page as it now
        stands for them (a list loses the rows they may no longer see) without waiting."""
        async with self.lock:
            if self.closed:
                return
            groups = await database_sync_to_async(self._authorize)()
            if groups is None:
                await self.end(CLOSE_FORBIDDEN)
                return
            await self.follow(groups)
        await self.push()

    def http_request(self, user: Any) -> HttpRequest:
        """A request standing for this socket's user, so fragments render as on the page."""
        request = HttpRequest()
        request.method = "GET"
        request.user = user
        request.session = self.scope.get("session")  # type: ignore[assignment]
        secret = self.scope.get("cookies", {}).get(settings.CSRF_COOKIE_NAME, "")
        if len(secret) == 32 and secret.isalnum():
            request.META["CSRF_COOKIE"] = secret
        return request


class RunConsumer(LiveConsumer):
    """One run's page: its status, tasks and ledger."""

    @property
    def run_id(self) -> str:
        return str(self.scope["url_route"]["kwargs"]["run_id"])

    def authorize(self, user: Any) -> list[str] | None:
        from console.access import get_run_for_user

        try:
            run = get_run_for_user(user, self.run_id)
        except Http404:
            return None
        return [live.run_group(run.pk)]

    def behind(self, seq: int | None) -> bool:
        from audit.models import Event

        head = (Event.objects.filter(chain=self.run_id).order_by("-seq")
                .values_list("seq", flat=True).first()) or 0
        return seq is None or seq < head

    def render(self, user: Any) -> str | None:
        from console.selectors import run_page

        request = self.http_request(user)
        try:
            context = run_page(user, self.run_id)  # get_run_for_user: 404 if not theirs
        except Http404:
            return None
        return render_to_string("console/run_detail.html#live", context, request=request)


class RunsConsumer(LiveConsumer):
    """The dashboard's list of recent runs this user may see."""

    def authorize(self, user: Any) -> list[str] | None:
        return [live.runs_group()]

    def render(self, user: Any) -> str | None:
        from console.selectors import recent_runs

        request = self.http_request(user)
        return render_to_string("console/dashboard.html#runs", {"runs": recent_runs(user)},
                                request=request)


class ReviewConsumer(LiveConsumer):
    """The review queue of a member of one or more decider groups."""

    def authorize(self, user: Any) -> list[str] | None:
        group_ids = list(user.groups.values_list("pk", flat=True))
        if not group_ids:
            return None
        return [live.review_group(pk) for pk in group_ids]

    def render(self, user: Any) -> str | None:
        from console.review import queue_context

        if self.authorize(user) is None:  # in no group any more: no queue
            return None
        request = self.http_request(user)
        return render_to_string("console/review_queue.html#queue", queue_context(user),
                                request=request)
