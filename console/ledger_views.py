"""The ledger viewer: every event, newest first, filtered by run, actor, kind and time.

Admins only (staff, superusers, members of the "admin" group). Pages go by id (keyset), so a
page costs the same at the end of a ledger of millions of events as at its start. Not by gseq:
the newest events have none until the sequencer seals them (audit.ledger.seal), seconds later."""

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

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        since, until = data.get("since"), data.get("until")
        if since and until and since >= until:
            raise forms.ValidationError("“From” must be earlier than “Until”.")
        return data

    def events(self) -> QuerySet[Event]:
        data = self.cleaned_data
        events = Event.objects.order_by("-id").only(
            "chain", "seq", "gseq", "kind", "at", "actor", "data")
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
        if data.get("before"):
            events = events.filter(id__lt=data["before"])
        return events


@login_required
def ledger(request: HttpRequest) -> HttpResponse:
    if not can_read_ledger(request.user):
        return HttpResponse("Only admins may read the ledger.", status=403)
    form = LedgerFilter(request.GET)
    if not form.is_valid():
        return render(request, "console/ledger.html", {"form": form, "events": []}, status=400)
    page = list(form.events()[:PAGE_SIZE + 1])
    more = len(page) > PAGE_SIZE
    page = page[:PAGE_SIZE]
    older = None
    if more:
        query = request.GET.copy()
        query["before"] = str(page[-1].pk)
        older = query.urlencode()
    newest = request.GET.copy()
    newest.pop("before", None)
    return render(request, "console/ledger.html", {
        "form": form,
        "events": page,
        "older": older,
        "newest": newest.urlencode() if "before" in request.GET else None,
        "config_chain": CONFIG_CHAIN,
    })
