"""The Notifications settings page: a person turns the emails about approval requests on or
off for themselves (admins see everyone's choice in the admin)."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from console.models import NotificationPreference


@login_required
def notification_settings(request: HttpRequest) -> HttpResponse:
    user = request.user
    preference = NotificationPreference.objects.filter(user=user).first()
    if request.method == "POST":
        wanted = request.POST.get("email") == "on"
        NotificationPreference.objects.update_or_create(user=user, defaults={"email": wanted})
        messages.success(request, "Emails about approval requests are "
                                  f"{'on' if wanted else 'off'}.")
        return redirect("notification_settings")
    if request.method != "GET":
        return HttpResponse(status=405, headers={"Allow": "GET, POST"})
    return render(request, "console/notification_settings.html", {
        "email_on": preference is None or preference.email,
        "groups": sorted(user.groups.values_list("name", flat=True)),  # type: ignore[union-attr]
    })
