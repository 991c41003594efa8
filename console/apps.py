"""The console app: when Django is ready, live updates, sign-in auditing, socket access,
housekeeping and reviewers' notifications are connected to the signals they follow."""

from django.apps import AppConfig


class ConsoleConfig(AppConfig):
    name = "console"
    verbose_name = "Console"

    def ready(self) -> None:
        from django.contrib.auth.signals import user_logged_out, user_login_failed

        from audit.signals import event_appended
        from console import live

        # audit.ledger.append sends event_appended once the appending transaction commits.
        event_appended.connect(live.on_event_appended, dispatch_uid="console.live")
        from console.idempotency import on_swept
        from orchestration.signals import swept

        # Expired Idempotency-Keys go with the workers' periodic sweep.
        swept.connect(on_swept, dispatch_uid="console.idempotency.purge")
        user_logged_out.connect(live.on_logged_out, dispatch_uid="console.live.logout")
        from console.auth_views import count_failure

        # Every failed password check counts towards the sign-in throttle, whichever page asked.
        user_login_failed.connect(count_failure, dispatch_uid="console.auth_views.failures")
        from console import socket_access

        # Deactivations, group and permission removals close or refresh the user's sockets.
        socket_access.connect()
        from console import notifications, tasks

        # Reviewers hear of requests opening and nearing their deadline (outbox topic notify).
        notifications.connect(tasks.deliver_notification)
        from django.contrib.auth.signals import user_logged_in

        from console.time_zones import on_logged_in

        # The person's time zone goes into the session at sign-in, so pages never query it.
        user_logged_in.connect(on_logged_in, dispatch_uid="console.time_zones.login")
