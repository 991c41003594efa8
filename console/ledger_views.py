"""The ledger viewer: every event, newest first, filtered by run, actor, kind and time.

Admins only (staff, superusers, members of the "admin" group). Pages of PAGE_SIZE go by id
(keyset: ``before=<id>`` for older, ``after=<id>`` for newer), so a page costs the same two
bounded queries at the end of a ledger of millions of events as at its start, and the links
keep the filters. Not by gseq: the newest events have none until the sequencer seals them
(audit.ledger.seal), seconds later; nor by seq, which counts within one chain only."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib.auth.decorators import login_required
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from audit.ledger import CONFIG_CHAIN
from audit.models import Event
from console.access import is_admin

PAGE_SIZE = 50


def can_read_ledger(user: Any) -> bool:
    """Staff, superusers and members of the admin group may read the whole ledger."""
    return bool(user.is_authenticated and user.is_active and (user.is_staff or is_admin(user)))


class LedgerFilter(forms.Form):
    run = forms.UUIDField(required=False, label="Run (chain id)")
    actor = forms.CharField(required=False, max_length=200,
                            widget=forms.TextInput(attrs={"placeholder": "user:operator"}))
    kind = forms.CharField(required=False, max_length=64, label="Kind (or prefix)",
                           widget=forms.TextInput(attrs={"placeholder": "task."}))
    since = forms.DateTimeField(required=False, label="From",
                                widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))
    until = forms.DateTimeField(required=False, label="Until",
                                widget=forms.DateTimeInput(attrs={"type": "datetime-local"}))
    before = forms.IntegerField(required=False, min_value=1, widget=forms.HiddenInput)
    after = forms.IntegerField(required=False, min_value=0, widget=forms.HiddenInput)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        since, until = data.get("since"), data.get("until")
        if since and until and since >= until:
            raise forms.ValidationError("“From” must be earlier than “Until”.")
        if data.get("before") is not None and data.get("after") is not None:
            raise forms.ValidationError("A page is either before or after an event, not both.")
        return data

    def matching(self) -> QuerySet[Event]:
        """Every event the filters match, in no order and from no page."""
        data = self.cleaned_data
        events = Event.objects.only("chain", "seq", "gseq", "kind", "at", "actor", "data")
        if data.get("run"):
            events = events.filter(chain=data["run"])
        if data.get("actor"):
            events = events.filter(actor=data["actor"].strip())
        if data.get("kind"):
            events = events.filter(kind__startswith=data["kind"].strip())
        if data.get("since"):
            events = events.filter(at__gte=data["since"])
        if data.get("until"):
            events = events.filter(at__lt=data["until"])
        return events

    def page(self) -> tuple[list[Event], int | None, int | None]:
        """This page's events, newest first, and the ids the older and newer pages start from
        (None when there is none)."""
        data = self.cleaned_data
        events = self.matching()
        before, after = data.get("before"), data.get("after")
        if after is not None:
            rows = list(events.filter(id__gt=after).order_by("id")[:PAGE_SIZE + 1])
            has_newer = len(rows) > PAGE_SIZE
            rows = rows[:PAGE_SIZE][::-1]
            # An empty page past the newest event still leads back to the older ones.
            older_from = rows[-1].pk if rows else after + 1
            has_older = events.filter(id__lt=older_from).exists()
            newer_from = rows[0].pk if rows else after
        else:
            rows = list((events.filter(id__lt=before) if before else events)
                        .order_by("-id")[:PAGE_SIZE + 1])
            has_older = len(rows) > PAGE_SIZE
            rows = rows[:PAGE_SIZE]
            older_from = rows[-1].pk if rows else 0
            newer_from = rows[0].pk if rows else (before or 1) - 1
            has_newer = bool(before) and events.filter(id__gt=newer_from).exists()
        return rows, older_from if has_older else None, newer_from if has_newer else None


@login_required
def ledger(request: HttpRequest) -> HttpResponse:
    if not can_read_ledger(request.user):
        return HttpResponse("Only admins may read the ledger.", status=403)
    form = LedgerFilter(request.GET)
    if not form.is_valid():
        return render(request, "console/ledger.html", {"form": form, "events": []}, status=400)
    page, older, newer = form.page()

    def link(**cursor: int) -> str:
        query = request.GET.copy()
        for key in ("before", "after"):
            query.pop(key, None)
        query.update({key: str(value) for key, value in cursor.items()})
        return query.urlencode()

    return render(request, "console/ledger.html", {
        "form": form,
        "events": page,
        "older": link(before=older) if older is not None else None,
        "newer": link(after=newer) if newer is not None else None,
        "newest": link() if newer is not None else None,
        "page_size": PAGE_SIZE,
        "config_chain": CONFIG_CHAIN,
    })
