"""The MemTrain document builder on real paragraphs: format, zero leaks, determinism, token window, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from memtrain.agent.prompts import MASK_TOKEN, MEMTRAIN_PROBLEM
from memtrain.data.corpus import load_corpus
from memtrain.data.documents import DocumentBuilderConfig, build_documents
from memtrain.data.entities import EntityExtractor, count_whole_word, find_leaks, partial_mentions


FIXTURES = Path(__file__).parent / "fixtures" / "corpora"


@pytest.fixture(scope="module")
def paragraphs() -> list[dict[str, str]]:
    return load_corpus(str(FIXTURES / "2wikimultihopqa_corpus_300.json")).paragraphs


@pytest.fixture(scope="module")
def extractor() -> EntityExtractor:
    return EntityExtractor()


def _config(**overrides) -> DocumentBuilderConfig:
    settings = dict(num_documents=12, num_neighbours=3, num_random=4, seed=7, show_progress=False)
    settings.update(overrides)
    return DocumentBuilderConfig(**settings)


def assert_no_leak(row: dict) -> None:
    answer = row["answers"][0]
    assert answer.lower() not in row["context"].lower()  # the plain case-insensitive search
    assert find_leaks(row["context"], answer) == []  # and across whitespace/apostrophe/dash variants
    for part in partial_mentions(answer):  # nor a name-like part on its own ("President Barre" for "Siad Barre")
        assert count_whole_word(part, row["context"]) == 0, (answer, part)


def test_rows_follow_the_contract_and_never_leak(paragraphs, extractor):
    result = build_documents(paragraphs, _config(), extractor=extractor)
    assert len(result.rows) == 12 and result.stats.built == 12
    by_id = {p["id"]: p for p in paragraphs}
    for row in result.rows:
        assert row["prompt"] == MEMTRAIN_PROBLEM
        assert_no_leak(row)
        blocks = row["context"].split("\n\n")
        assert len(blocks) == row["num_paragraphs"] == 8 == len(row["paragraph_ids"])
        assert [b.split("\n", 1)[0] for b in blocks] == [f"Document {i}:" for i in range(1, 9)]
        pivot_block = blocks[row["pivot_position"] - 1].split("\n", 1)[1]
        assert row["paragraph_ids"][row["pivot_position"] - 1] == row["pivot_id"]
        assert MASK_TOKEN in pivot_block
        assert row["num_masked"] == row["context"].count(MASK_TOKEN) >= 1
        pivot_text = by_id[row["pivot_id"]]["text"]
        assert row["answers"][0] in pivot_text  # verbatim in the pivot, before masking
        assert set(row["neighbour_ids"]) <= set(row["paragraph_ids"]) and len(row["neighbour_ids"]) == 3
        assert len(set(row["paragraph_ids"])) == 8
        # every unmasked block is the corpus paragraph itself
        for pid, block in zip(row["paragraph_ids"], blocks):
            body = block.split("\n", 1)[1]
            if MASK_TOKEN not in body:
                assert body == by_id[pid]["text"]
        assert json.loads(row["builder_config"])["num_random"] == 4
        assert row["num_tokens"] is None
    assert sum(result.stats.label_histogram.values()) == 12
    assert len({row["pivot_id"] for row in result.rows}) == 12
    assert result.stats.entities_dropped.get("partial_mention", 0) > 0  # counted in the build stats


def test_same_seed_same_rows_other_seed_other_rows(paragraphs, extractor):
    first = build_documents(paragraphs, _config(num_documents=5), extractor=extractor).rows
    again = build_documents(paragraphs, _config(num_documents=5), extractor=extractor).rows
    other = build_documents(paragraphs, _config(num_documents=5, seed=8), extractor=extractor).rows
    assert first == again
    assert [r["pivot_id"] for r in first] != [r["pivot_id"] for r in other]


def test_token_window_and_counts_match_the_real_tokenizer(paragraphs, extractor, tokenizer):
    config = _config(num_documents=8, tokenizer_name_or_path="unused", min_tokens=500, max_tokens=1100)
    result = build_documents(paragraphs, config, extractor=extractor, tokenizer=tokenizer)
    for row in result.rows:
        assert row["num_tokens"] == len(tokenizer(row["context"], add_special_tokens=False)["input_ids"])
        assert 500 <= row["num_tokens"] <= 1100
    assert result.stats.too_few_tokens + result.stats.too_many_tokens > 0
    assert result.stats.tokens_min >= 500 and result.stats.tokens_max <= 1100
    exact = build_documents(
        paragraphs, _config(num_documents=8, tokenizer_name_or_path="unused", min_tokens=500, max_tokens=1100,
                            exact_token_count=True), extractor=extractor, tokenizer=tokenizer
    ).rows  # fmt: skip
    assert [r["num_tokens"] for r in exact] == [r["num_tokens"] for r in result.rows]


@pytest.mark.slow  # loads the MiniLM encoder (~15 s on 2 busy cores); dense search itself is tested in test_data_neighbours
def test_dense_neighbours_build_leak_free_documents(extractor):
    corpus = load_corpus(str(FIXTURES / "musique_train_corpus_60.json")).paragraphs
    config = _config(num_documents=4, neighbour_method="dense", embedding_model="minilm")
    result = build_documents(corpus, config, extractor=extractor)
    assert result.stats.built == 4
    for row in result.rows:
        assert_no_leak(row)


def test_entities_in_headers_are_dropped_not_masked(paragraphs, extractor):
    # CARDINAL entities such as "3" would otherwise turn "Document 3:" into "Document [MASK]:"
    result = build_documents(paragraphs, _config(num_documents=40, entity_labels=["CARDINAL", "DATE"]),
                             extractor=EntityExtractor(nlp=extractor.nlp, labels=["CARDINAL", "DATE"]))  # fmt: skip
    for row in result.rows:
        assert_no_leak(row)
        assert re.findall(r"^Document (\d+):", row["context"], flags=re.M) == [str(i) for i in range(1, 9)]
    assert sum(result.stats.entities_dropped.values()) > 0


def test_bad_input_is_reported_clearly(paragraphs, extractor):
    with pytest.raises(ValueError, match=r"has 8 paragraphs but one document needs 150"):
        build_documents(paragraphs[:8], _config(num_neighbours=29, num_random=120), extractor=extractor)
    no_entities = [
        {"id": str(i), "title": "", "text": f"the small {word} sat quietly on the soft mat and looked around slowly"}
        for i, word in enumerate(["cat", "dog", "bird", "fox", "hen", "cow"])
    ]
    with pytest.raises(ValueError, match="None of the 6 paragraphs has a valid entity"):
        build_documents(no_entities, _config(num_neighbours=1, num_random=1), extractor=extractor)
    with pytest.raises(ValueError, match="need tokenizer_name_or_path"):
        DocumentBuilderConfig(min_tokens=10)
    with pytest.raises(ValueError, match="neighbour_method must be"):
        DocumentBuilderConfig(neighbour_method="tfidf")
    with pytest.raises(KeyError, match="lacks"):
        build_documents([{"text": "x"}] * 10, _config(num_neighbours=1, num_random=1), extractor=extractor)


def test_neighbours_and_filler_are_entity_bearing_paragraphs_like_the_paper(paragraphs, extractor):
    plain = [
        {
            "id": f"plain{i}",
            "title": "",
            "text": f"the small {word} sat quietly on the soft mat and looked around slowly",
        }
        for i, word in enumerate(["cat", "dog", "bird", "fox", "hen", "cow", "owl", "pig", "ram", "yak"] * 10)
    ]
    corpus = [p for pair in zip(paragraphs[:100], plain) for p in pair]  # half the corpus has no entity
    result = build_documents(corpus, _config(num_documents=10), extractor=extractor)
    assert result.stats.paragraphs_without_entity >= 100 and result.stats.built == 10
    used = {pid for row in result.rows for pid in row["paragraph_ids"]}
    assert not any(pid.startswith("plain") for pid in used)
    by_id = {p["id"]: p["text"] for p in corpus}
    assert all(extractor([by_id[pid]])[0] for pid in used)
    unfiltered = build_documents(corpus, _config(num_documents=10, filter_paragraphs=False), extractor=extractor)
    assert any(pid.startswith("plain") for row in unfiltered.rows for pid in row["paragraph_ids"])


def test_an_answer_readable_in_a_document_header_is_dropped(extractor):
    # "Document 3:" headers hold the numbers 1..8 of an 8-paragraph document: a pivot whose only entity is one of
    # them cannot be masked without leaving the answer in a header, so it yields no document
    names = ["Ada", "Bea", "Cyd", "Dot", "Eve", "Fay", "Gil", "Hal", "Ivy", "Jo", "Kit", "Lu"]
    corpus = [
        {"id": str(k), "title": "", "text": f"The old farmer {name.lower()}ward had {k} cats and kept them in a barn."}
        for k, name in zip(range(1, 13), names)
    ]
    cardinal = EntityExtractor(nlp=extractor.nlp, labels=["CARDINAL"])
    assert [e.text for e in cardinal([corpus[2]["text"]])[0]] == ["3"]
    result = build_documents(corpus, _config(num_documents=12), extractor=cardinal)
    assert sorted(int(row["answers"][0]) for row in result.rows) == [9, 10, 11, 12]
    assert result.stats.pivots_all_entities_leak == 8  # "1" and "2" may also sit inside "10".."12": embedded
    assert result.stats.entities_dropped["in_template"] >= 6
    for row in result.rows:
        assert_no_leak(row)


@pytest.mark.parametrize(
    ("counts", "hint"),
    [
        ({"too_many_tokens": 962, "pivots_without_entity": 3}, r"over max_tokens=2000 \(long paragraphs\): raise max"),
        ({"too_few_tokens": 5, "too_many_tokens": 1}, r"under min_tokens=400: lower min_tokens"),
        ({"pivots_without_entity": 7, "pivots_all_entities_leak": 2}, r"no usable entity: widen entity_labels"),
        ({"pivots_all_entities_leak": 4}, r"leak after masking: use a bigger corpus"),
        ({}, r"^Use a bigger corpus\.$"),
    ],
)
def test_a_short_build_names_the_main_reason_pivots_were_rejected(counts, hint):
    """The issue's one large .txt file: 962 pivots over max_tokens, and the hint said only "Use a bigger corpus"."""
    from memtrain.data.documents import BuildStats, shortfall_hint

    config = DocumentBuilderConfig(min_tokens=400, max_tokens=2000, tokenizer_name_or_path="smollm2-135m")
    assert re.search(hint, shortfall_hint(BuildStats(requested=8, built=3, **counts), config))
