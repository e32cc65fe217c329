"""Chunk boundaries, centre truncation and problem capping on the real SmolLM2 tokenizer."""

from __future__ import annotations

import pytest

from memtrain.agent.chunking import cap_problem, centre_truncate, chunk_char_spans, chunk_context


TEXT = " ".join(f"Sentence number {i} mentions the city of Lyon and the river Rhone." for i in range(40))


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chunks_cover_the_text_in_fixed_size_pieces(tokenizer):
    token_ids = ids_of(tokenizer, TEXT)
    chunked = chunk_context(tokenizer, TEXT, chunk_size=64, max_chunks=100)
    assert chunked.total_tokens == len(token_ids)
    assert chunked.truncated_tokens == 0
    assert chunked.num_chunks == -(-len(token_ids) // 64)
    assert all(len(ids) == 64 for ids in chunked.chunk_token_ids[:-1])
    assert 0 < len(chunked.chunk_token_ids[-1]) <= 64
    assert sum(chunked.chunk_token_ids, []) == token_ids
    assert "".join(chunked.chunks) == TEXT
    assert chunked.chunks == [tokenizer.decode(ids) for ids in chunked.chunk_token_ids]


def test_a_text_exactly_one_chunk_long_is_one_chunk(tokenizer):
    token_ids = ids_of(tokenizer, TEXT)[:50]
    text = tokenizer.decode(token_ids)
    chunked = chunk_context(tokenizer, text, chunk_size=len(ids_of(tokenizer, text)), max_chunks=3)
    assert chunked.num_chunks == 1 and chunked.truncated_tokens == 0


def test_long_text_is_centre_truncated_keeping_head_and_tail(tokenizer):
    token_ids = ids_of(tokenizer, TEXT)
    chunk_size, max_chunks = 30, 3
    budget = chunk_size * max_chunks
    assert len(token_ids) > budget
    chunked = chunk_context(tokenizer, TEXT, chunk_size=chunk_size, max_chunks=max_chunks)
    kept = sum(chunked.chunk_token_ids, [])
    assert kept == token_ids[:45] + token_ids[-45:]
    assert chunked.num_chunks == max_chunks
    assert chunked.truncated_tokens == len(token_ids) - budget
    assert chunked.chunks[0].startswith("Sentence number 0 ")
    assert chunked.chunks[-1].endswith("river Rhone.")


def test_centre_truncate_odd_budget_keeps_one_more_head_token():
    assert centre_truncate(list(range(10)), 5) == [0, 1, 2, 8, 9]
    assert centre_truncate(list(range(10)), 1) == [0]
    assert centre_truncate(list(range(4)), 10) == [0, 1, 2, 3]


@pytest.mark.parametrize("context", ["", "   \n\t  "])
def test_empty_or_whitespace_context_gives_no_chunks(tokenizer, context):
    chunked = chunk_context(tokenizer, context, chunk_size=16, max_chunks=2)
    assert chunked.chunks == [] and chunked.chunk_token_ids == []
    assert chunked.total_tokens == 0 and chunked.truncated_tokens == 0


@pytest.mark.parametrize("chunk_size,max_chunks", [(0, 2), (8, 0), (-1, 1)])
def test_non_positive_sizes_are_rejected(tokenizer, chunk_size, max_chunks):
    with pytest.raises(ValueError, match="must be a positive"):
        chunk_context(tokenizer, TEXT, chunk_size=chunk_size, max_chunks=max_chunks)


def test_cap_problem_keeps_short_problems_verbatim(tokenizer):
    problem = "  Which river flows through Lyon?  "
    assert cap_problem(tokenizer, problem, 100) == (problem, 0)


def test_cap_problem_keeps_the_beginning_within_budget(tokenizer):
    token_ids = ids_of(tokenizer, TEXT)
    capped, dropped = cap_problem(tokenizer, TEXT, 20)
    assert dropped == len(token_ids) - 20
    assert capped == tokenizer.decode(token_ids[:20])
    assert len(ids_of(tokenizer, capped)) <= 20
    with pytest.raises(ValueError, match="max_problem_tokens"):
        cap_problem(tokenizer, TEXT, 0)


@pytest.mark.parametrize("max_chunks", [100, 3])  # whole, and centre-truncated (a chunk straddles the cut)
def test_chunk_char_spans_are_the_text_each_chunk_decodes_to(tokenizer, max_chunks):
    text = TEXT + " Zürich, São Paulo — naïve café."
    chunked = chunk_context(tokenizer, text, chunk_size=64, max_chunks=max_chunks)
    spans = chunk_char_spans(tokenizer, text, chunk_size=64, max_chunks=max_chunks)
    assert len(spans) == chunked.num_chunks
    for runs, chunk in zip(spans, chunked.chunks):
        assert "".join(text[a:b] for a, b in runs).strip() == chunk.strip()
    assert [len(runs) for runs in spans] == ([1] * len(spans) if max_chunks == 100 else [1, 2, 1])
    assert chunk_char_spans(tokenizer, "  ", chunk_size=64, max_chunks=3) == []


def test_chunk_char_spans_without_offsets_measure_decoded_prefixes(tokenizer):
    class NoOffsets:  # a slow tokenizer: no offset mapping
        is_fast = False

        def __call__(self, text, **kwargs):
            return tokenizer(text, add_special_tokens=False)

        def decode(self, ids, **kwargs):
            return tokenizer.decode(ids, **kwargs)

    for max_chunks in (100, 3):
        fast = chunk_char_spans(tokenizer, TEXT, chunk_size=64, max_chunks=max_chunks)
        slow = chunk_char_spans(NoOffsets(), TEXT, chunk_size=64, max_chunks=max_chunks)
        assert [[text for text in (TEXT[a:b].strip() for a, b in runs)] for runs in slow] == [
            [TEXT[a:b].strip() for a, b in runs] for runs in fast
        ]
