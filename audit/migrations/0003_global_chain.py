"""The global chain: add gseq, gprev_hash and ghash, and fill them for the events that exist.

Existing events join the global chain in (at, chain, seq) order. On PostgreSQL the append-only
trigger of 0002 would refuse the UPDATE that fills the new columns, so it is disabled for this
migration's transaction only (ALTER TABLE also locks the table, so nothing appends meanwhile).
0004 then makes the columns required and gseq unique."""

import hashlib
import uuid

from django.db import migrations, models

GENESIS = "0" * 64
GLOBAL_CHAIN = uuid.UUID(int=0)
BATCH = 2000


def _link(gprev_hash: str, event_hash: str) -> str:
    # hashchain.global_hash, frozen here so later changes to it cannot alter this migration.
    return hashlib.sha256(f"{gprev_hash}\n{event_hash}".encode()).hexdigest()


def fill(apps, schema_editor):  # type: ignore[no-untyped-def]
    connection = schema_editor.connection
    postgres = connection.vendor == "postgresql"
    ChainHead = apps.get_model("audit", "ChainHead")
    global_param = ChainHead._meta.pk.get_db_prep_value(GLOBAL_CHAIN, connection)
    with connection.cursor() as cursor:
        if postgres:
            cursor.execute("ALTER TABLE audit_event DISABLE TRIGGER audit_event_no_update_delete")
        cursor.execute(
            "UPDATE audit_event SET gseq = ordered.n FROM ("
            " SELECT id, ROW_NUMBER() OVER (ORDER BY at, chain, seq, id) AS n FROM audit_event"
            ") AS ordered WHERE audit_event.id = ordered.id"
        )
        last_gseq, last_ghash = 0, GENESIS
        while True:
            cursor.execute("SELECT id, gseq, hash FROM audit_event WHERE gseq > %s "
                           "ORDER BY gseq LIMIT %s", [last_gseq, BATCH])
            rows = cursor.fetchall()
            if not rows:
                break
            updates = []
            for pk, gseq, event_hash in rows:
                ghash = _link(last_ghash, event_hash)
                updates.append((last_ghash, ghash, pk))
                last_gseq, last_ghash = gseq, ghash
            cursor.executemany("UPDATE audit_event SET gprev_hash = %s, ghash = %s WHERE id = %s",
                               updates)
        cursor.execute("INSERT INTO audit_chainhead (chain, seq, head_hash) VALUES (%s, %s, %s)",
                       [global_param, last_gseq, last_ghash])
        if postgres:
            cursor.execute("ALTER TABLE audit_event ENABLE TRIGGER audit_event_no_update_delete")


def unfill(apps, schema_editor):  # type: ignore[no-untyped-def]
    ChainHead = apps.get_model("audit", "ChainHead")
    ChainHead.objects.filter(chain=GLOBAL_CHAIN).delete()


class Migration(migrations.Migration):
    dependencies = [("audit", "0002_append_only_trigger")]
    operations = [
        migrations.AddField("event", "gseq", models.PositiveBigIntegerField(null=True)),
        migrations.AddField("event", "gprev_hash", models.CharField(max_length=64, default="")),
        migrations.AddField("event", "ghash", models.CharField(max_length=64, default="")),
        migrations.RunPython(fill, unfill),
    ]
