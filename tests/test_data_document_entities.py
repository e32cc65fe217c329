"""Entities tagged once per document: the builder's ``entities`` column, its units and its offsets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memtrain.agent.prompts import MASK_TOKEN
from memtrain.data.corpus import load_corpus
from memtrain.data.document_entities import (
    document_units,
    entities_in_ranges,
    read_entities,
    row_document_layout,
    tag_document,
)
from memtrain.data.documents import DocumentBuilderConfig, build_documents, template_spans
from memtrain.data.entities import EntityExtractor


FIXTURES = Path(__file__).parent / "fixtures" / "corpora"


@pytest.fixture(scope="module")
def extractor() -> EntityExtractor:
    return EntityExtractor()


@pytest.fixture(scope="module")
def built(extractor) -> list[dict]:
    paragraphs = load_corpus(str(FIXTURES / "2wikimultihopqa_corpus_300.json")).paragraphs
    config = DocumentBuilderConfig(num_documents=6, num_neighbours=3, num_random=6, seed=3, show_progress=False)
    return build_documents(paragraphs, config, extractor=extractor).rows


def _finder(extractor: EntityExtractor):
    return lambda texts: [[e.text for e in ents] for ents in extractor(texts)]


def test_builder_rows_carry_entities_whose_offsets_index_the_context(built):
    for row in built:
        entities = row["entities"]
        assert len(entities) > 10
        assert entities == sorted(entities, key=lambda e: (e["start"], e["end"], e["text"]))
        for entity in entities:
            assert set(entity) == {"text", "start", "end"}
            assert row["context"][entity["start"] : entity["end"]] == entity["text"]
        headers = template_spans(row["context"])
        assert not any(s < e["end"] and e["start"] < t for s, t in headers for e in entities)  # paragraphs only
        assert not any(MASK_TOKEN in e["text"] or row["answers"][0] == e["text"] for e in entities)
        assert read_entities(row) == entities


def test_stored_entities_equal_tagging_the_built_context_again(built, extractor):
    # the builder reuses the corpus filter's entities for unmasked paragraphs; tagging the finished text anew (what a
    # row without the column gets at train time) must give the very same candidates
    for row in built:
        template, separator = row_document_layout(row)
        again = tag_document(row["context"], _finder(extractor), template=template, separator=separator)
        assert again == row["entities"]


def test_the_column_survives_arrow_and_json_lines(built, tmp_path):
    from datasets import Dataset, load_dataset

    Dataset.from_list(built).to_json(str(tmp_path / "rows.jsonl"))
    Dataset.from_list(built).save_to_disk(str(tmp_path / "arrow"))
    for rows in (load_dataset("json", data_files=str(tmp_path / "rows.jsonl"))["train"], Dataset.load_from_disk(
        str(tmp_path / "arrow")
    )):  # fmt: skip
        assert [read_entities(row) for row in rows] == [row["entities"] for row in built]
    as_string = dict(built[0], entities=json.dumps(built[0]["entities"]))
    assert read_entities(as_string) == built[0]["entities"]
    assert read_entities({"context": "x"}) is None  # no column: the caller tags


def test_stored_offsets_that_no_longer_index_the_context_are_dropped(built):
    row = dict(built[0], context="Edited " + built[0]["context"])
    assert len(read_entities(row)) < len(built[0]["entities"])


def test_units_are_the_paragraphs_of_a_rendered_document():
    context = "Document 1:\nAlice met Bob.\n\nDocument 2:\nParis is big.\n\n\n\nPlain block without header."
    units = [context[s:e] for s, e in document_units(context)]
    assert units == ["Alice met Bob.", "Paris is big.", "Plain block without header."]
    custom = "<doc n=1>\nAlice met Bob.\n</doc>\n---\n<doc n=2>\nParis\n</doc>"
    units = [custom[s:e] for s, e in document_units(custom, "<doc n={index}>\n{text}\n</doc>", "\n---\n")]
    assert units == ["Alice met Bob.", "Paris"]
    long_block = "\n".join(f"Line {i} names Rome." for i in range(4000))
    pieces = document_units(long_block, max_chars=5000)
    assert all(e - s <= 5000 for s, e in pieces) and len(pieces) > 10
    assert "".join(long_block[s:e] for s, e in pieces).replace("\n", "") == long_block.replace("\n", "")
    assert all(long_block[s:e].startswith("\nLine") or s == 0 for s, e in pieces)  # cut at line breaks


def test_tagging_only_the_kept_ranges_finds_the_same_entities_there(built, extractor):
    context = built[0]["context"]
    ranges = [(0, len(context) // 4), (len(context) * 3 // 4, len(context))]  # a centre-truncated context's chunks
    everything = tag_document(context, _finder(extractor))
    kept = tag_document(context, _finder(extractor), within=ranges)
    assert len(kept) < len(everything)
    for lo, hi in ranges:
        assert entities_in_ranges(kept, [(lo, hi)]) == entities_in_ranges(everything, [(lo, hi)]) != []


def test_a_chunk_gets_the_entities_inside_it_once_each():
    entities = [
        {"text": "Paris", "start": 0, "end": 5},
        {"text": "Rome", "start": 8, "end": 12},
        {"text": "PARIS", "start": 20, "end": 25},
        {"text": "Oslo", "start": 28, "end": 32},
    ]
    assert entities_in_ranges(entities, [(0, 26)]) == ["Paris", "Rome"]  # case-insensitively once, first kept
    assert entities_in_ranges(entities, [(1, 30)]) == ["Rome", "PARIS"]  # "Paris" and "Oslo" stick out
    assert entities_in_ranges(entities, [(0, 5), (28, 32)]) == ["Paris", "Oslo"]  # both sides of a centre cut
    assert entities_in_ranges(entities, [(0, 26)], chunk="Paris, \ufffd...") == ["Paris"]  # must be in the text
