"""Embedding providers: a local offline model shipped inside a Python package (the default) and
any OpenAI-compatible embeddings endpoint through the official SDK.

The local model is WordLlama's ``l2_supercat`` token-embedding table, whose weights and
tokenizer come in the ``wordllama`` wheel: nothing is downloaded at run time. WordLlama's own
loader looks for the tokenizer in a directory the wheel does not use and would then try Hugging
Face, so it is pointed at the package directory with downloads disabled. Loaded once per process.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from django.conf import settings


@runtime_checkable
class Embedder(Protocol):
    name: str
    dims: int

    def embed(self, texts: list[str]) -> np.ndarray: ...

    def cost(self, texts: Sequence[str]) -> tuple[int, Decimal]: ...


def normalized(vectors: Any) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array.reshape(1, -1)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.where(norms == 0, 1.0, norms)


_local_lock = threading.Lock()
_local_models: dict[int, Any] = {}


def _wordllama(dims: int) -> Any:
    with _local_lock:
        model = _local_models.get(dims)
        if model is None:
            import wordllama
            from wordllama import WordLlama

            model = WordLlama.load(config="l2_supercat", dim=256,
                                   trunc_dim=None if dims == 256 else dims,
                                   cache_dir=Path(wordllama.__file__).parent,
                                   disable_download=True)
            _local_models[dims] = model
        return model


class LocalEmbedder:
    """WordLlama l2_supercat: averaged token embeddings, 256 dimensions (or the first ``dims``
    of them, the model being trained so that prefixes still work). Free."""

    def __init__(self, dims: int = 256) -> None:
        self.dims = dims
        self.name = "local" if dims == 256 else f"local-{dims}"

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dims), dtype=np.float32)
        return normalized(_wordllama(self.dims).embed(list(texts), norm=False))

    def cost(self, texts: Sequence[str]) -> tuple[int, Decimal]:
        model = _wordllama(self.dims)
        tokens = sum(len(enc.ids) for enc in model.tokenize(list(texts))) if texts else 0
        return tokens, Decimal(0)


class OpenAIEmbedder:
    """Any OpenAI-compatible ``/embeddings`` endpoint, configured by
    SWITCHBOARD_EMBEDDINGS_BASE_URL and SWITCHBOARD_EMBEDDINGS_MODEL, its key the credential
    ``embeddings`` (SWITCHBOARD_CREDENTIAL_EMBEDDINGS, never logged). Its cost is priced like model
    calls, from the ModelPrice of provider ``openai`` and the model's name (input tokens)."""

    BATCH = 128

    def __init__(self, *, base_url: str | None = None, model: str | None = None,
                 api_key: str | None = None, dims: int | None = None,
                 timeout_s: float = 30.0) -> None:
        self.base_url = base_url or settings.SWITCHBOARD_EMBEDDINGS_BASE_URL or None
        self.model = model or settings.SWITCHBOARD_EMBEDDINGS_MODEL
        self.api_key = api_key or settings.SWITCHBOARD_CREDENTIALS.get("embeddings", "")
        self.timeout_s = timeout_s
        self.name = "openai"
        self._dims = dims

    @property
    def dims(self) -> int:
        if self._dims is None:
            self._dims = int(self.embed(["dimensions probe"]).shape[1])
        return self._dims

    def _client(self) -> Any:
        import openai

        if not self.api_key:
            raise ValueError("the openai embedder needs its key: set "
                             "SWITCHBOARD_CREDENTIAL_EMBEDDINGS")
        return openai.OpenAI(api_key=self.api_key, base_url=self.base_url,
                             timeout=self.timeout_s, max_retries=1)

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self._dims or 0), dtype=np.float32)
        client = self._client()
        rows: list[list[float]] = []
        for start in range(0, len(texts), self.BATCH):
            batch = list(texts[start:start + self.BATCH])
            response = client.embeddings.create(model=self.model, input=batch)
            data = sorted(response.data, key=lambda item: item.index)
            if len(data) != len(batch):
                raise ValueError(f"the embeddings endpoint returned {len(data)} vectors "
                                 f"for {len(batch)} texts")
            rows.extend(list(item.embedding) for item in data)
        vectors = normalized(rows)
        self._dims = int(vectors.shape[1])
        return vectors

    def cost(self, texts: Sequence[str]) -> tuple[int, Decimal]:
        """An estimate before the call: four characters a token, priced per million."""
        from orchestration.models import ModelPrice

        tokens = sum(math.ceil(len(t) / 4) for t in texts)
        price = ModelPrice.objects.filter(provider="openai", model_name=self.model).first()
        per_mtok = price.input_per_mtok if price is not None else Decimal(0)
        return tokens, (Decimal(tokens) * per_mtok / Decimal(1_000_000))


EMBEDDERS: dict[str, Callable[[], Embedder]] = {
    "local": lambda: LocalEmbedder(256),
    "local-64": lambda: LocalEmbedder(64),
    "openai": OpenAIEmbedder,
}


def embedder_named(name: str) -> Embedder:
    try:
        return EMBEDDERS[name]()
    except KeyError:
        raise ValueError(f"unknown embedder {name!r}; one of "
                         f"{', '.join(sorted(EMBEDDERS))}") from None


def embedder_for(collection: Any) -> Embedder:
    return embedder_named(collection.embedder)


def to_blob(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def from_blob(blob: bytes | memoryview) -> np.ndarray:
    return np.frombuffer(bytes(blob), dtype="<f4")
