"""Splitting a document into chunks on paragraph and sentence boundaries.

Each paragraph is chunked on its own (short ones, like headings, join the paragraph after them),
so editing one paragraph changes only its own chunks and a new version re-embeds just those.
A paragraph longer than the chunk size is cut at sentence ends (words, for a sentence longer
than a chunk), each next piece repeating up to ``overlap`` characters of whole sentences."""

from __future__ import annotations

import re

_PARAGRAPHS = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _units(paragraph: str, size: int) -> list[str]:
    """Sentences no longer than ``size`` (longer ones cut between words, or hard)."""
    units: list[str] = []
    for sentence in _SENTENCE_END.split(paragraph):
        sentence = sentence.strip()
        while len(sentence) > size:
            cut = sentence.rfind(" ", 0, size + 1)
            cut = cut if cut > size // 2 else size
            units.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence:
            units.append(sentence)
    return units


def _split_long(paragraph: str, size: int, overlap: int) -> list[str]:
    chunks: list[str] = []
    current: list[str] = []
    for unit in _units(paragraph, size):
        if current and len(" ".join([*current, unit])) > size:
            chunks.append(" ".join(current))
            carried: list[str] = []
            for previous in reversed(current):
                if len(" ".join([previous, *carried, unit])) > min(overlap + len(unit), size):
                    break
                if len(" ".join([previous, *carried])) > overlap:
                    break
                carried.insert(0, previous)
            current = carried
        current.append(unit)
    if current:
        chunks.append(" ".join(current))
    return chunks


def chunk_text(text: str, size: int = 800, overlap: int = 100) -> list[str]:
    """The text's chunks, in order, none longer than ``size`` characters."""
    if size < 1 or not 0 <= overlap < size:
        raise ValueError("the chunk size must be positive and the overlap smaller than it")
    paragraphs = [" ".join(p.split()) for p in _PARAGRAPHS.split(text.replace("\r\n", "\n"))]
    paragraphs = [p for p in paragraphs if p]
    chunks: list[str] = []
    pending = ""
    for paragraph in paragraphs:
        joined = f"{pending}\n{paragraph}" if pending else paragraph
        if pending and len(joined) > size:
            chunks.append(pending)
            joined = paragraph
        if len(joined) < size // 4:
            pending = joined  # a heading or a one-liner: it joins the next paragraph
            continue
        pending = ""
        chunks.extend([joined] if len(joined) <= size else _split_long(joined, size, overlap))
    if pending:
        chunks.append(pending)
    return chunks
