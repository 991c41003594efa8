"""The full-text index: an FTS5 table on SQLite; on PostgreSQL a ``tsvector`` column of the chunk
table (set when a chunk is indexed, cleared when it retires) with a GIN index. Vector tables
are created on first use, one per dimension count (see knowledge/index.py)."""

from typing import Any

from django.db import migrations

SQLITE_UP = ("CREATE VIRTUAL TABLE IF NOT EXISTS knowledge_fts USING fts5("
             "chunk_id UNINDEXED, collection_id UNINDEXED, body, "
             "tokenize = 'porter unicode61')")
SQLITE_DOWN = "DROP TABLE IF EXISTS knowledge_fts"
PG_UP = ["ALTER TABLE knowledge_chunk ADD COLUMN IF NOT EXISTS tsv tsvector",
         "CREATE INDEX IF NOT EXISTS knowledge_chunk_tsv ON knowledge_chunk USING GIN (tsv)"]
PG_DOWN = ["DROP INDEX IF EXISTS knowledge_chunk_tsv",
           "ALTER TABLE knowledge_chunk DROP COLUMN IF EXISTS tsv"]


def _run(statements: dict[str, list[str]]) -> Any:
    def run(apps: Any, schema_editor: Any) -> None:
        for sql in statements.get(schema_editor.connection.vendor, []):
            schema_editor.execute(sql)
    return run


class Migration(migrations.Migration):
    dependencies = [("knowledge", "0001_initial")]

    operations = [
        migrations.RunPython(_run({"sqlite": [SQLITE_UP], "postgresql": PG_UP}),
                             _run({"sqlite": [SQLITE_DOWN], "postgresql": PG_DOWN})),
    ]
