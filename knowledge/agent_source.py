"""The knowledge base as orchestration's agents reach it (orchestration/retrieval.py): which
collections exist, which an identity may read, and search. Installed when Django is ready."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from knowledge import services
from knowledge.models import Collection


class CollectionSource:
    def missing(self, slugs: Iterable[str]) -> list[str]:
        wanted = list(slugs)
        found = set(Collection.objects.filter(slug__in=wanted).values_list("slug", flat=True))
        return [slug for slug in wanted if slug not in found]

    def unreadable(self, user_id: Any, slugs: Iterable[str]) -> list[str]:
        from django.contrib.auth import get_user_model

        wanted = list(slugs)
        user = get_user_model().objects.filter(pk=user_id).first()
        readable = set(services.readable(user).filter(slug__in=wanted)
                       .values_list("slug", flat=True)) if user is not None else set()
        return [slug for slug in wanted if slug not in readable]

    def search(self, slug: str, query: str, k: int) -> list[dict[str, Any]]:
        collection = Collection.objects.get(slug=slug)
        return [{"chunk_id": h.chunk_id, "document_id": h.document_id, "title": h.title,
                 "version": h.version, "ordinal": h.ordinal, "text": h.text, "score": h.score}
                for h in services.search(collection, query, k)]
