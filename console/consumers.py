"""Websocket consumers for live pages. Each checks sign-in and permission before it joins a
group, renders the page's own fragment for its own user, and resends it on (re)connect when the
client's last seen event is behind, so nothing is missed while a socket was down."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.http import Http404, HttpRequest
from django.template.loader import render_to_string

from console import live

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

    # Subclasses provide these two (both run in a database thread).
    def authorize(self) -> list[str] | None:
        """The groups to join, or None to refuse."""
        raise NotImplementedError

    def render(self) -> str | None:
        """The fragment for this user now, or None if they may no longer see it."""
        raise NotImplementedError

    def behind(self, seq: int | None) -> bool:
        """Whether a client that has seen `seq` needs the fragment again."""
        return True

    @property
    def user(self) -> Any:
        return self.scope.get("user")

    async def connect(self) -> None:
        live.bind_loop(asyncio.get_running_loop())
        if self.user is None or not self.user.is_authenticated:
            await self.close()
            return
        groups = await database_sync_to_async(self.authorize)()
        if groups is None:
            await self.close()
            return
        self.joined = [live.user_group(self.user.pk), *groups]
        for group in self.joined:
            await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.pending is not None:
            self.pending.cancel()
        for group in self.joined:
            await self.channel_layer.group_discard(group, self.channel_name)

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
        html = await database_sync_to_async(self.render)()
        if html is None:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        if html != self.last_html:
            self.last_html = html
            await self.send(text_data=html)

    def changed(self) -> None:
        # A change announced while a render is under way may not be in it: render once more.
        self.dirty = True
        if self.pending is None or self.pending.done():
            self.pending = asyncio.get_running_loop().create_task(self._push_soon())

    async def _push_soon(self) -> None:
        while self.dirty:
            await asyncio.sleep(DEBOUNCE_SECONDS)
            self.dirty = False
            await self.push()

    # Channel-layer messages (see console.live).
    async def run_changed(self, message: dict[str, Any]) -> None:
        self.changed()

    async def runs_changed(self, message: dict[str, Any]) -> None:
        self.changed()

    async def queue_changed(self, message: dict[str, Any]) -> None:
        self.changed()

    async def session_ended(self, message: dict[str, Any]) -> None:
        await self.close(code=CLOSE_SIGNED_OUT)

    def http_request(self) -> HttpRequest:
        """A request standing for this socket's user, so fragments render as on the page."""
        request = HttpRequest()
        request.method = "GET"
        request.user = self.user
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

    def authorize(self) -> list[str] | None:
        from console.access import get_run_for_user

        try:
            run = get_run_for_user(self.user, self.run_id)
        except Http404:
            return None
        return [live.run_group(run.pk)]

    def behind(self, seq: int | None) -> bool:
        from audit.models import Event

        head = (Event.objects.filter(chain=self.run_id).order_by("-seq")
                .values_list("seq", flat=True).first()) or 0
        return seq is None or seq < head

    def render(self) -> str | None:
        from console.views import _run_context

        request = self.http_request()
        try:
            context = _run_context(request, self.run_id)
        except Http404:
            return None
        return render_to_string("console/run_detail.html#live", context, request=request)


class RunsConsumer(LiveConsumer):
    """The dashboard's list of recent runs this user may see."""

    def authorize(self) -> list[str] | None:
        return [live.runs_group()]

    def render(self) -> str | None:
        from console.access import visible_runs

        request = self.http_request()
        runs = visible_runs(self.user).order_by("-created_at")[:50]
        return render_to_string("console/dashboard.html#runs", {"runs": runs}, request=request)


class ReviewConsumer(LiveConsumer):
    """The review queue of a member of one or more decider groups."""

    def authorize(self) -> list[str] | None:
        group_ids = list(self.user.groups.values_list("pk", flat=True))
        if not group_ids:
            return None
        return [live.review_group(pk) for pk in group_ids]

    def render(self) -> str | None:
        from console.review import pending_rows

        request = self.http_request()
        return render_to_string("console/review_queue.html#queue",
                                {"pending": pending_rows(self.user)}, request=request)
