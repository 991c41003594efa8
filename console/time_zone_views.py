"""Each person's time zone: a small settings page at /settings/time-zone/."""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone

from console import time_zones


class TimeZoneForm(forms.Form):
    time_zone = forms.ChoiceField(required=False, label="Time zone")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["time_zone"].choices = [
            ("", f"The console's default ({settings.TIME_ZONE})"),
            *((zone, zone) for zone in time_zones.choices())]


@login_required
def time_zone_settings(request: HttpRequest) -> HttpResponse:
    current = time_zones.preferred_zone(request.user, request.session)
    if request.method == "POST":
        form = TimeZoneForm(request.POST)
        if form.is_valid():
            zone = form.cleaned_data["time_zone"]
            time_zones.time_zone_set(user=request.user, zone=zone)
            time_zones.remember(request.session, request.user, zone)
            messages.success(request, f"Times are now shown in {zone or settings.TIME_ZONE}.")
            return redirect("time_zone_settings")
        status = 400
    else:
        form = TimeZoneForm(initial={"time_zone": current})
        status = 200
    return render(request, "console/time_zone.html", {
        "form": form, "default_zone": settings.TIME_ZONE,
        "current_zone": timezone.get_current_timezone_name(), "now": timezone.now(),
    }, status=status)
