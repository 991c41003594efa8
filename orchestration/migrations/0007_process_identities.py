"""Every existing process gets its service identity, granted the tools its current plan's
tool and function steps call, so upgrading keeps those steps running (now through the gate)."""

from django.db import migrations


def forwards(apps, schema_editor):  # type: ignore[no-untyped-def]
    from orchestration import grants, services
    from orchestration.models import Process

    if not Process.objects.exists():
        return
    # The real models, not the historical ones: identity creation and grants go through the
    # same services (and leave the same configuration events) as a new process's.
    for process in Process.objects.all():
        services.process_identity(process)
        grants.grant_plan_tools(process, by=None)


class Migration(migrations.Migration):
    dependencies = [
        ("orchestration", "0006_service_identity_kill_switch"),
        ("guardian", "0003_remove_groupobjectpermission_guardian_gr_content_ae6aec_idx_and_more"),
        ("audit", "0005_sealed_global_chain"),
    ]

    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]
