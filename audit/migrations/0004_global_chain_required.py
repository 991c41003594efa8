"""Every event now has its place in the global chain (filled by 0003)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("audit", "0003_global_chain")]
    operations = [
        migrations.AlterField("event", "gseq", models.PositiveBigIntegerField(unique=True)),
        migrations.AlterField("event", "gprev_hash", models.CharField(max_length=64)),
        migrations.AlterField("event", "ghash", models.CharField(max_length=64)),
    ]
