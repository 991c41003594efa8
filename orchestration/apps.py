"""The orchestration app: when Django is ready, the outbox's topics are routed to their Celery
tasks and orchestration starts listening for approval decisions."""

from django.apps import AppConfig


class OrchestrationConfig(AppConfig):
    name = "orchestration"
    verbose_name = "Orchestration"

    def ready(self) -> None:
        from django.db import connections

        from approvals.signals import approval_resolved
        from orchestration import handlers, metrics, planning, tasks
        from orchestration.engine import contracts

        metrics.install()
        planning.register()
        # A tool's runner thread is kept for later calls: it keeps no connection open.
        contracts.after_each_call(connections.close_all)

        tasks.route_topics()
        approval_resolved.connect(handlers.on_approval_resolved,
                                  dispatch_uid="orchestration.resume_after_decision")
