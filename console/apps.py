from django.apps import AppConfig


class ConsoleConfig(AppConfig):
    name = "console"
    verbose_name = "Console"

    def ready(self) -> None:
        from django.contrib.auth.signals import user_logged_out

        from audit.signals import event_appended
        from console import live

        # audit.ledger.append sends event_appended once the appending transaction commits.
        event_appended.connect(live.on_event_appended, dispatch_uid="console.live")
        user_logged_out.connect(live.on_logged_out, dispatch_uid="console.live.logout")
