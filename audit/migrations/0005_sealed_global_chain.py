"""The global chain moves off the append path: events are appended with gseq, gprev_hash and ghash
NULL and sealed into the global chain later, in batches, by ``audit.ledger.seal``.

- The three global columns become nullable (NULL: not sealed yet); a check constraint keeps them
  all NULL or all set.
- A partial index over the unsealed events' ids makes seal's lookup cheap.
- On PostgreSQL the append-only trigger function of 0002 is replaced: it still refuses every
  DELETE and UPDATE, except the one UPDATE sealing makes, filling the three global columns of a
  row that had none, every other column unchanged.

Going back seals whatever is still unsealed (the columns become NOT NULL again) before the
strict trigger function returns."""

import hashlib
import uuid

from django.db import migrations, models

GENESIS = "0" * 64
GLOBAL_CHAIN = uuid.UUID(int=0)
BATCH = 2000

# The whole row, but for the global columns, must be unchanged: comparing the rows as jsonb
# also covers any column added to audit_event later without touching this function.
SEALABLE = """
CREATE OR REPLACE FUNCTION audit_event_append_only() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'UPDATE'
       AND OLD.gseq IS NULL AND OLD.gprev_hash IS NULL AND OLD.ghash IS NULL
       AND NEW.gseq IS NOT NULL AND NEW.gprev_hash IS NOT NULL AND NEW.ghash IS NOT NULL
       AND (to_jsonb(NEW) - 'gseq' - 'gprev_hash' - 'ghash')
           = (to_jsonb(OLD) - 'gseq' - 'gprev_hash' - 'ghash') THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'audit_event is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;
"""
# 0002's function, as it was.
STRICT = """
CREATE OR REPLACE FUNCTION audit_event_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'audit_event is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql;
"""


def _link(gprev_hash: str, event_hash: str) -> str:
    # hashchain.global_hash, frozen here so later changes to it cannot alter this migration.
    return hashlib.sha256(f"{gprev_hash}\n{event_hash}".encode()).hexdigest()


def allow_sealing(apps, schema_editor):  # type: ignore[no-untyped-def]
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(SEALABLE, params=None)


def seal_all_then_forbid(apps, schema_editor):  # type: ignore[no-untyped-def]
    """Backwards: every event gets its global position (as seal() would give it, in id order)
    so the columns can be NOT NULL again, then the trigger refuses every UPDATE once more."""
    connection = schema_editor.connection
    ChainHead = apps.get_model("audit", "ChainHead")
    global_param = ChainHead._meta.pk.get_db_prep_value(GLOBAL_CHAIN, connection)
    with connection.cursor() as cursor:
        cursor.execute("SELECT seq, head_hash FROM audit_chainhead WHERE chain = %s",
                       [global_param])
        row = cursor.fetchone()
        gseq, ghash = (row[0], row[1]) if row else (0, GENESIS)
        while True:
            cursor.execute("SELECT id, hash FROM audit_event WHERE gseq IS NULL ORDER BY id "
                           "LIMIT %s", [BATCH])
            rows = cursor.fetchall()
            if not rows:
                break
            updates = []
            for pk, event_hash in rows:
                gseq += 1
                link = _link(ghash, event_hash)
                updates.append((gseq, ghash, link, pk))
                ghash = link
            cursor.executemany("UPDATE audit_event SET gseq = %s, gprev_hash = %s, ghash = %s "
                               "WHERE id = %s", updates)
        if row is None:
            cursor.execute("INSERT INTO audit_chainhead (chain, seq, head_hash) "
                           "VALUES (%s, %s, %s)", [global_param, gseq, ghash])
        else:
            cursor.execute("UPDATE audit_chainhead SET seq = %s, head_hash = %s WHERE chain = %s",
                           [gseq, ghash, global_param])
        if connection.vendor == "postgresql":
            cursor.execute(STRICT)


class Migration(migrations.Migration):
    dependencies = [("audit", "0004_global_chain_required")]
    operations = [
        migrations.AlterField("event", "gseq",
                              models.PositiveBigIntegerField(null=True, unique=True)),
        migrations.AlterField("event", "gprev_hash",
                              models.CharField(max_length=64, null=True)),  # noqa: DJ001
        migrations.AlterField("event", "ghash",
                              models.CharField(max_length=64, null=True)),  # noqa: DJ001
        migrations.AddIndex(
            "event",
            models.Index(fields=["id"], condition=models.Q(gseq__isnull=True),
                         name="audit_event_unsealed"),
        ),
        migrations.AddConstraint(
            "event",
            models.CheckConstraint(
                condition=(models.Q(gseq__isnull=True, gprev_hash__isnull=True,
                                    ghash__isnull=True)
                           | models.Q(gseq__isnull=False, gprev_hash__isnull=False,
                                      ghash__isnull=False)),
                name="audit_event_sealed_whole"),
        ),
        migrations.RunPython(allow_sealing, seal_all_then_forbid),
    ]
