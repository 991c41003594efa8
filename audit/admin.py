"""The Django admin for ledger events, read-only, and the read-only mixin for every admin of
what the runtime records."""

from __future__ import annotations

from typing import Any

from django.contrib import admin

from audit.models import Event


class ReadOnly:
    """A ModelAdmin or inline mixin for what the runtime records (ledger events, runs, tasks,
    approval requests and decisions): only the services that write their ledger events may
    create, change or delete them. An edit here would bypass the ledger; a deletion would leave
    a hole in it that nothing records; and saving a whole row read a moment ago would overwrite
    what a worker wrote since. The admin shows them, with no delete action."""

    def has_add_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False


@admin.register(Event)
class EventAdmin(ReadOnly, admin.ModelAdmin):
    list_display = ["chain", "seq", "kind", "actor", "at"]
    list_filter = ["kind"]
    search_fields = ["chain", "actor"]
