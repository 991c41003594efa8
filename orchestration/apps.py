"""The orchestration app: when Django is ready, the outbox's topics are routed to their Celery
tasks and orchestration starts listening for approval decisions."""

from django.apps import AppConfig


class OrchestrationConfig(AppConfig):
    name = "orchestration"
    verbose_name = "Orchestration"

    def ready(self) -> None:
        from approvals.signals import approval_resolved
        from orchestration import handlers, metrics, planning, tasks

        metrics.install()
        planning.register()

        tasks.route_topics()
        approval_resolved.connect(handlers.on_approval_resolved,
                                  dispatch_uid="orchestration.resume_after_decision")
