from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('approvals', '0002_poison_task'),
    ]

    operations = [
        migrations.AlterField(
            model_name='approvalrequest',
            name='reason',
            field=models.CharField(choices=[('sensitive_action', 'sensitive action'), ('budget_exhausted', 'budget exhausted'), ('step_budget_exhausted', 'step budget exhausted'), ('quota_exhausted', 'quota exhausted'), ('low_confidence', 'low confidence'), ('qc_mismatch', 'QC mismatch'), ('unknown_outcome', 'unknown outcome of a non-idempotent call'), ('agent_retired', 'agent retired'), ('poison_task', 'task kept losing its worker'), ('configuration_error', 'configuration error')], max_length=30),
        ),
    ]
