"""The knowledge app: on SQLite every new connection loads the sqlite-vec extension, so the
vector index is there for the migrations, the web process and every worker thread alike."""

from django.apps import AppConfig


class KnowledgeConfig(AppConfig):
    name = "knowledge"
    verbose_name = "Knowledge"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.backends.signals import connection_created

        from knowledge import index

        connection_created.connect(index.on_connection_created,
                                   dispatch_uid="knowledge.load_sqlite_vec")
