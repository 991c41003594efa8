from django.apps import AppConfig


class OrchestrationConfig(AppConfig):
    name = "orchestration"
    verbose_name = "Orchestration"

    def ready(self) -> None:
        from approvals.signals import approval_resolved
        from orchestration import handlers, metrics

        metrics.install()

        approval_resolved.connect(handlers.on_approval_resolved,
                                  dispatch_uid="orchestration.resume_after_decision")
