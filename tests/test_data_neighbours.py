"""BM25 and dense neighbour search on real Wikipedia paragraphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from memtrain.data.corpus import load_corpus
from memtrain.data.neighbours import DEFAULT_EMBEDDING_MODEL, build_index, resolve_embedding_model


FIXTURES = Path(__file__).parent / "fixtures" / "corpora"


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return load_corpus(str(FIXTURES / "2wikimultihopqa_corpus_300.json")).texts


def _check_neighbours(index, items, k):
    scores, indices = index.neighbours_of(items, k)
    assert scores.shape == indices.shape == (len(items), k)
    for item, row_scores, row in zip(items, scores, indices):
        assert item not in row and len(set(row.tolist())) == k
        assert np.all(np.diff(row_scores) <= 1e-6)  # best first
    return scores, indices


def test_bm25_finds_a_paragraph_from_its_own_text_and_excludes_self(texts):
    index = build_index(texts, "bm25")
    scores, indices = index.search([texts[7], texts[120]], k=5)
    assert indices[:, 0].tolist() == [7, 120]
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    _, neighbours = _check_neighbours(index, [0, 7, 120], k=6)
    # Teutberga's closest paragraph is about her husband Lothair II
    assert "Lothair II" in texts[int(neighbours[0, 0])]
    empty_scores, _ = index.search(["the and of"], k=3)  # only stopwords: no match, zero scores
    assert np.all(empty_scores == 0)
    with pytest.raises(ValueError, match="need 1 <= k"):
        index.neighbours_of([0], k=len(texts))


def test_dense_exact_cosine_with_offline_minilm(texts):
    subset = texts[:80]
    index = build_index(subset, "dense", embedding_model="minilm", batch_size=32)
    embeddings = index.embeddings
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    scores, indices = _check_neighbours(index, [0, 5, 79], k=4)
    brute = embeddings @ embeddings.T  # exact cosine over the whole subset
    np.fill_diagonal(brute, -np.inf)
    for row, item in enumerate([0, 5, 79]):
        assert indices[row, 0] == int(np.argmax(brute[item]))
        assert np.isclose(scores[row, 0], brute[item].max(), atol=1e-5)
    query_scores, query_indices = index.search([subset[5]], k=1)
    assert query_indices[0, 0] == 5 and query_scores[0, 0] > 0.99


def test_embedding_model_resolution_and_bad_method():
    assert resolve_embedding_model(None) == DEFAULT_EMBEDDING_MODEL == "BAAI/bge-base-en-v1.5"
    assert (Path(resolve_embedding_model("minilm")) / "modules.json").is_file()
    assert resolve_embedding_model("my-org/my-encoder") == "my-org/my-encoder"
    with pytest.raises(ValueError, match="Unknown neighbour method 'tfidf'"):
        build_index(["a text"], "tfidf")
    with pytest.raises(ValueError, match="empty corpus"):
        build_index([], "bm25")
