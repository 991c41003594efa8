"""The retrieval evaluation: thirty short documents and forty labelled questions written for
this project (documents.yaml, questions.yaml), and the measures benchmarks/retrieval.py prints
and the tests assert.

recall@k is, per question, the share of its answering documents among the documents of the
top ``k`` chunks, averaged; MRR is the mean of 1/rank of the first answering document (0 when
none is in the top ``k``)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
TARGET_RECALL = 0.9


@cache
def documents() -> list[dict[str, str]]:
    return yaml.safe_load((HERE / "documents.yaml").read_text())


@cache
def questions() -> list[dict[str, Any]]:
    return yaml.safe_load((HERE / "questions.yaml").read_text())


@dataclass
class Score:
    mode: str
    recall: float
    mrr: float
    misses: list[str] = field(default_factory=list)


def load(collection: Any, *, by: Any = None) -> dict[str, Any]:
    """Ingest every evaluation document into ``collection``; document pk -> evaluation id."""
    from knowledge.services import ingest

    ids = {}
    for doc in documents():
        result = ingest(collection, title=doc["title"], text=doc["text"], by=by)
        ids[result.document.pk] = doc["id"]
    return ids


def evaluate(collection: Any, ids: dict[Any, str], *, mode: str, k: int = 5) -> Score:
    from knowledge.services import search

    recalls, ranks, misses = [], [], []
    for item in questions():
        wanted = set(item["answers"])
        found: list[str] = []
        for hit in search(collection, item["q"], k=k, mode=mode):
            doc = ids.get(hit.document_id)
            if doc is not None and doc not in found:
                found.append(doc)
        recalls.append(len(wanted & set(found)) / len(wanted))
        first = next((i for i, doc in enumerate(found, start=1) if doc in wanted), None)
        ranks.append(1.0 / first if first else 0.0)
        if first is None:
            misses.append(item["q"])
    return Score(mode=mode, recall=statistics.fmean(recalls), mrr=statistics.fmean(ranks),
                 misses=misses)
