"""The knowledge admin: collections with their read and write grants (object permissions, each
change audited on the configuration chain), and documents shown with their versions. Documents
are added through the API or ``knowledge.services.ingest``, which chunk, embed and index them;
deleting one here goes through ``delete_document`` so its index rows go too and it is logged."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from guardian.admin import GuardedModelAdmin

from audit.config import AuditedAdmin
from knowledge import services
from knowledge.models import Collection, Document, DocumentVersion


@admin.register(Collection)
class CollectionAdmin(AuditedAdmin, GuardedModelAdmin):
    list_display = ["slug", "name", "team", "process", "embedder", "chunk_size",
                    "chunk_overlap"]
    search_fields = ["slug", "name"]
    audit_what = "collection"

    def get_readonly_fields(self, request: Any, obj: Any = None) -> list[str]:
        # Existing chunks were cut and embedded with these: changing them would mix two kinds.
        return ["embedder", "chunk_size", "chunk_overlap"] if obj is not None else []

    def delete_model(self, request: Any, obj: Collection) -> None:
        # Each document through the service, so the index rows go too and each is logged.
        for document in obj.documents.all():
            services.delete_document(document, by=request.user)
        super().delete_model(request, obj)

    def delete_queryset(self, request: Any, queryset: Any) -> None:
        for collection in queryset:
            self.delete_model(request, collection)


class VersionInline(admin.TabularInline):
    model = DocumentVersion
    fields = ["number", "content_hash", "created_by", "created_at"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False


@admin.register(Document)
class DocumentAdmin(admin.ModelAdmin):
    list_display = ["title", "collection", "version", "updated_at"]
    list_filter = ["collection"]
    search_fields = ["title"]
    readonly_fields = ["collection", "title", "source_url", "version", "created_at",
                       "updated_at"]
    inlines = [VersionInline]

    def has_add_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def delete_model(self, request: Any, obj: Document) -> None:
        services.delete_document(obj, by=request.user)

    def delete_queryset(self, request: Any, queryset: Any) -> None:
        for document in queryset:
            services.delete_document(document, by=request.user)
