"""The knowledge app: on SQLite every new connection loads the sqlite-vec extension, so the
vector index is there for the migrations, the web process and every worker thread alike. It
also gives orchestration's agents their way in (the ``search_knowledge`` tool and tasks'
just-in-time knowledge, orchestration/retrieval.py) and adds its demo data when ``seed_demo``
runs; orchestration never imports it."""

from django.apps import AppConfig


class KnowledgeConfig(AppConfig):
    name = "knowledge"
    verbose_name = "Knowledge"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.db.backends.signals import connection_created

        from knowledge import demo, index
        from knowledge.agent_source import CollectionSource
        from orchestration import retrieval
        from orchestration.signals import demo_seeded

        connection_created.connect(index.on_connection_created,
                                   dispatch_uid="knowledge.load_sqlite_vec")
        retrieval.install(CollectionSource())
        demo_seeded.connect(demo.seed, dispatch_uid="knowledge.demo")
