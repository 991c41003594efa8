from django.db import migrations

# A step whose writes travel in one round trip with its commit states what it assumed (the
# task's lease, the run chain's head) as a statement of the same query: this function fails the
# transaction when an assumption no longer holds, so none of the step's writes land.
CREATE = """
CREATE OR REPLACE FUNCTION switchboard_expect(ok boolean, message text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF ok IS NOT TRUE THEN
        RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = message;
    END IF;
    RETURN true;
END
$$
"""
DROP = "DROP FUNCTION IF EXISTS switchboard_expect(boolean, text)"


def create(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(CREATE)


def drop(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROP)


class Migration(migrations.Migration):

    dependencies = [
        ('orchestration', '0014_dashboard_figure_indexes'),
    ]

    operations = [
        migrations.RunPython(create, drop),
    ]
