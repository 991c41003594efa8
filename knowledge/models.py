"""Collections, documents, their versions and the chunks search reads.

A chunk belongs to the version that introduced it and stays live while later versions keep its
text unchanged, so a new version re-embeds only what changed; retired chunks keep their row (a
citation of an older version still resolves) but leave the search indexes. Deleting a document
deletes all of it for real."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

CHUNK_SIZE_MIN = 100
CHUNK_SIZE_MAX = 8000


class Collection(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    slug = models.SlugField(unique=True)
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    # The owner: a team, a process, or (both empty) the administrators.
    team = models.ForeignKey("auth.Group", null=True, blank=True, on_delete=models.SET_NULL,
                             related_name="knowledge_collections")
    process = models.ForeignKey("orchestration.Process", null=True, blank=True,
                                on_delete=models.SET_NULL, related_name="knowledge_collections")
    chunk_size = models.PositiveIntegerField(
        default=800, help_text="characters per chunk",
        validators=[MinValueValidator(CHUNK_SIZE_MIN), MaxValueValidator(CHUNK_SIZE_MAX)])
    chunk_overlap = models.PositiveIntegerField(
        default=100, help_text="characters a long paragraph's next chunk repeats")
    embedder = models.CharField(max_length=40, default="local",
                                help_text="local (offline, shipped model) or openai")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]
        permissions = [("read_collection", "Can search the collection"),
                       ("write_collection", "Can add and delete documents")]

    def __str__(self) -> str:
        return self.slug

    def clean(self) -> None:
        from knowledge.embeddings import EMBEDDERS

        errors: dict[str, str] = {}
        if not CHUNK_SIZE_MIN <= (self.chunk_size or 0) <= CHUNK_SIZE_MAX:
            errors["chunk_size"] = f"must be between {CHUNK_SIZE_MIN} and {CHUNK_SIZE_MAX}"
        elif self.chunk_overlap is not None and self.chunk_overlap >= self.chunk_size:
            errors["chunk_overlap"] = "must be smaller than the chunk size"
        if self.embedder not in EMBEDDERS:
            errors["embedder"] = f"unknown embedder; one of {', '.join(sorted(EMBEDDERS))}"
        if errors:
            raise ValidationError(errors)


class Document(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    collection = models.ForeignKey(Collection, on_delete=models.CASCADE,
                                   related_name="documents")
    title = models.CharField(max_length=300)
    source_url = models.URLField(max_length=2000, blank=True)
    version = models.PositiveIntegerField(default=0, help_text="the current version's number")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["title"]
        constraints = [models.UniqueConstraint(fields=["collection", "title"],
                                               name="knowledge_document_unique_title")]

    def __str__(self) -> str:
        return self.title


class DocumentVersion(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    text = models.TextField()
    content_hash = models.CharField(max_length=64)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                   on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["document", "number"]
        constraints = [models.UniqueConstraint(fields=["document", "number"],
                                               name="knowledge_version_unique_number")]

    def __str__(self) -> str:
        return f"{self.document} v{self.number}"


class Chunk(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    collection = models.ForeignKey(Collection, on_delete=models.CASCADE, related_name="chunks")
    document = models.ForeignKey(Document, on_delete=models.CASCADE, related_name="chunks")
    version = models.ForeignKey(DocumentVersion, on_delete=models.CASCADE,
                                related_name="chunks", help_text="the version that introduced it")
    ordinal = models.PositiveIntegerField(help_text="position in the current version")
    text = models.TextField()
    text_hash = models.CharField(max_length=64)
    # float32, little-endian, unit length (cosine similarity is a dot product).
    embedding = models.BinaryField()
    dims = models.PositiveIntegerField()
    retired_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["document", "ordinal"]
        indexes = [models.Index(fields=["collection", "retired_at"],
                                name="knowledge_chunk_live"),
                   models.Index(fields=["document", "text_hash"],
                                name="knowledge_chunk_hash")]

    def __str__(self) -> str:
        return f"{self.document} #{self.ordinal}"
