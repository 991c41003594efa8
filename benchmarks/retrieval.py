"""Retrieval quality and speed of the knowledge base.

    .venv/bin/python benchmarks/retrieval.py                 # SQLite (sqlite-vec + FTS5)
    .venv/bin/python benchmarks/retrieval.py --postgres      # and PostgreSQL, side by side
    .venv/bin/python benchmarks/retrieval.py --check         # exit 1 if hybrid recall@5 < 0.9

Quality: the evaluation set (knowledge/eval: thirty documents, forty labelled questions) is
ingested once per embedder candidate (``local``: WordLlama l2_supercat, 256 dimensions;
``local-64``: the same truncated to 64) and every question asked in three modes: full text
alone, vector alone and hybrid (reciprocal-rank fusion). It prints recall@5 and MRR.

Scale: ``--chunks`` (default 10,000) chunks are made by ingesting synthetic documents of ten
paragraphs each (sentences of the evaluation set shuffled, with a serial number) through
``ingest``, one transaction and ledger event a document as in production; it prints the ingest
rate, the time to post a new version of 100 documents with one paragraph changed, and query
latency p50/p95 in each mode over the full collection.

Each database is a throwaway: SQLite in a temporary directory, PostgreSQL created on
``--postgres-url`` (default ``$BENCH_POSTGRES_URL`` or postgresql://postgres@127.0.0.1:5432/postgres)
and dropped afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
CANDIDATES = ("local", "local-64")
MODES = ("text", "vector", "hybrid")
PARAGRAPHS_PER_DOC = 10


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def quality() -> dict[str, Any]:
    from knowledge import eval as evaluation
    from knowledge.models import Collection

    out: dict[str, Any] = {}
    for name in CANDIDATES:
        collection = Collection.objects.create(slug=f"eval-{name}", name=name, embedder=name)
        started = time.perf_counter()
        ids = evaluation.load(collection)
        load_s = time.perf_counter() - started
        out[name] = {"load_s": round(load_s, 2)}
        for mode in MODES:
            score = evaluation.evaluate(collection, ids, mode=mode, k=5)
            out[name][mode] = {"recall": score.recall, "mrr": score.mrr,
                               "misses": score.misses}
    return out


def _sentences() -> list[str]:
    from knowledge import eval as evaluation

    found: list[str] = []
    for doc in evaluation.documents():
        found.extend(s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(doc["text"].split()))
                     if len(s.strip()) > 20)
    return found


def _synthetic(rng: random.Random, sentences: list[str], serial: int) -> list[str]:
    return [f"Reference {serial}-{p}. " + " ".join(rng.sample(sentences, 5))
            for p in range(PARAGRAPHS_PER_DOC)]


def scale(chunks: int, queries: int) -> dict[str, Any]:
    from django.contrib.auth.models import User

    from knowledge import eval as evaluation
    from knowledge import index
    from knowledge.models import Chunk, Collection
    from knowledge.services import ingest, search

    rng = random.Random(15)
    sentences = _sentences()
    by = User.objects.create_user("bench-writer")
    collection = Collection.objects.create(slug="scale", name="Scale", embedder="local")
    docs = max(1, chunks // PARAGRAPHS_PER_DOC)
    bodies = {}
    started = time.perf_counter()
    for serial in range(docs):
        bodies[serial] = _synthetic(rng, sentences, serial)
        ingest(collection, title=f"Synthetic document {serial}",
               text="\n\n".join(bodies[serial]), by=by)
    ingest_s = time.perf_counter() - started
    live = Chunk.objects.filter(collection=collection, retired_at__isnull=True).count()
    updated = rng.sample(range(docs), min(100, docs))
    started = time.perf_counter()
    embedded = 0
    for serial in updated:
        paragraphs = list(bodies[serial])
        paragraphs[3] = f"Reference {serial}-3 revised. " + " ".join(rng.sample(sentences, 5))
        embedded += ingest(collection, title=f"Synthetic document {serial}",
                           text="\n\n".join(paragraphs), by=by).embedded
    update_s = time.perf_counter() - started
    asked = [q["q"] for q in evaluation.questions()]
    latency: dict[str, Any] = {}
    for mode in MODES:
        search(collection, asked[0], k=5, mode=mode)  # warm the model and caches
        times = []
        for i in range(queries):
            started = time.perf_counter()
            search(collection, asked[i % len(asked)], k=5, mode=mode)
            times.append((time.perf_counter() - started) * 1000)
        latency[mode] = {"p50_ms": percentile(times, 0.5), "p95_ms": percentile(times, 0.95)}
    return {"documents": docs, "chunks": live, "ingest_s": ingest_s,
            "chunks_per_s": live / ingest_s if ingest_s else 0.0,
            "update_docs": len(updated), "update_s": update_s, "update_embedded": embedded,
            "latency": latency, "vector_backend": index.vector_backend()}


def worker(args: argparse.Namespace) -> None:
    from throwaway import setup_django

    setup_django()
    from django.db import connection

    result = {"vendor": connection.vendor, "quality": quality()}
    if args.chunks:
        result["scale"] = scale(args.chunks, args.queries)
    Path(args.out).write_text(json.dumps(result))


def _worker_args(args: argparse.Namespace) -> list[str]:
    return ["--chunks", str(args.chunks), "--queries", str(args.queries)]


def run_sqlite(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        env.update(DATABASE_URL=f"sqlite:///{tmp}/retrieval.sqlite3",
                   DJANGO_SETTINGS_MODULE="console.settings")
        print(f"SQLite: {args.chunks} chunks into {tmp} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, __file__, "--worker", *_worker_args(args), "--out",
                        str(out)], env=env, cwd=ROOT, check=True)
        return json.loads(out.read_text())


def run_postgres(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from throwaway import run_worker

    return run_worker(__file__, _worker_args(args), postgres_url=args.postgres_url,
                      prefix="switchboard_bench_retrieval", keep=args.keep,
                      announce=f"PostgreSQL: {args.chunks} chunks into {{name}} ...")


def report(results: dict[str, dict[str, Any]]) -> float:
    """Print the tables; returns the lowest hybrid recall@5 of the default embedder."""
    names = list(results)
    head = "".join(f" {n + ' R@5':>14} {n + ' MRR':>14}" for n in names)
    print(f"\nRetrieval quality, {len(_questions())} questions over 30 documents (k=5):")
    print(f"{'embedder':<10} {'mode':<7}{head}")
    for embedder in CANDIDATES:
        for mode in MODES:
            cells = "".join(f" {results[n]['quality'][embedder][mode]['recall']:>14.3f}"
                            f" {results[n]['quality'][embedder][mode]['mrr']:>14.3f}"
                            for n in names)
            print(f"{embedder:<10} {mode:<7}{cells}")
    for name in names:
        misses = results[name]["quality"]["local"]["hybrid"]["misses"]
        if misses:
            print(f"{name}: hybrid (local) missed: " + "; ".join(misses))
    if all("scale" in r for r in results.values()):
        print("\nAt scale (local embedder):")
        print(f"{'':<28}" + "".join(f" {n:>16}" for n in names))
        rows = [("vector index", lambda s: s["vector_backend"]),
                ("live chunks", lambda s: f"{s['chunks']}"),
                ("ingest, chunks/s", lambda s: f"{s['chunks_per_s']:.0f}"),
                ("ingest, total s", lambda s: f"{s['ingest_s']:.1f}"),
                ("100 new versions, s", lambda s: f"{s['update_s']:.1f}"),
                ("  chunks re-embedded", lambda s: f"{s['update_embedded']}")]
        for mode in MODES:
            rows.append((f"{mode} query p50 / p95 ms",
                         lambda s, m=mode: f"{s['latency'][m]['p50_ms']:.1f} / "
                                           f"{s['latency'][m]['p95_ms']:.1f}"))
        for label, cell in rows:
            print(f"{label:<28}" + "".join(f" {cell(results[n]['scale']):>16}" for n in names))
    return min(r["quality"]["local"]["hybrid"]["recall"] for r in results.values())


def _questions() -> list[Any]:
    sys.path.insert(0, str(ROOT))
    import yaml

    return yaml.safe_load((ROOT / "knowledge" / "eval" / "questions.yaml").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunks", type=int, default=10_000,
                        help="chunks for the scale measurement (0 skips it)")
    parser.add_argument("--queries", type=int, default=200, help="queries per mode at scale")
    parser.add_argument("--postgres", action="store_true", help="measure PostgreSQL too")
    parser.add_argument("--postgres-url", default=os.environ.get("BENCH_POSTGRES_URL",
                                                                 DEFAULT_PG))
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chunks < 0 or args.queries < 1:
        parser.error("--chunks must be at least 0 and --queries at least 1")
    if args.worker:
        worker(args)
        return 0
    results = {"SQLite": run_sqlite(args)}
    if args.postgres:
        results["PostgreSQL"] = run_postgres(args)
    recall = report(results)
    met = recall >= 0.9
    print(f"\ntarget: hybrid recall@5 >= 0.9 with the local embedder: "
          f"{'MET' if met else 'MISSED'} ({recall:.3f})")
    return 1 if args.check and not met else 0


if __name__ == "__main__":
    sys.exit(main())
