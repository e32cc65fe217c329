"""Recall probes: the memory has always read the chunk it is asked about, and the entity is masked."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from memtrain.agent.prompts import TARGET_TOKEN
from memtrain.agent.recall import (
    build_recall_probes,
    choose_probe_positions,
    in_template_text,
    probe_candidates,
    row_document_template,
    touches_chunk_edge,
)
from memtrain.agent.trajectory import Trajectory
from memtrain.data.documents import DEFAULT_DOCUMENT_TEMPLATE


def test_any_policy_picks_the_memory_uniformly_then_a_chunk_it_has_read():
    # PAPER.md section 4: k uniform over the memories, then l uniform over 1..k; a uniform draw over (k, l) pairs
    # would pick k = 8 22% of the time and k = 1 2.8%
    rng = random.Random(0)
    firsts = Counter(choose_probe_positions(8, "any", rng)[0] for _ in range(16_000))
    per_k = Counter(k for k, _ in firsts.elements())
    for k in range(1, 9):
        assert abs(per_k[k] / 16_000 - 1 / 8) < 0.012, (k, per_k[k])
    for chunk in range(1, 5):  # given k = 4, each read chunk equally often
        assert abs(firsts[(4, chunk)] / per_k[4] - 1 / 4) < 0.05


def test_any_policy_only_pairs_a_memory_with_chunks_it_has_read():
    pairs = choose_probe_positions(4, "any", random.Random(0))
    assert len(pairs) == 4 + 3 + 2 + 1
    assert all(1 <= chunk <= k <= 4 for k, chunk in pairs)
    assert (1, 1) in pairs  # the first chunk is eligible (the reference code never picks it)


def test_latest_policy_asks_about_the_chunk_just_read():
    pairs = choose_probe_positions(3, "latest", random.Random(0))
    assert sorted(pairs) == [(1, 1), (2, 2), (3, 3)]


def test_no_chunk_read_no_probe():
    assert choose_probe_positions(0, "any", random.Random(0)) == []
    with pytest.raises(ValueError, match="policy"):
        choose_probe_positions(2, "oldest", random.Random(0))


def _trajectory(chunks: list[str]) -> Trajectory:
    memories = ["No previous memory"] + [f"memory after chunk {i}" for i in range(1, len(chunks) + 1)]
    return Trajectory(doc_id="d", group=0, problem="p", chunks=chunks, memories=memories)


def _finder(texts: list[str]) -> list[list[str]]:
    known = ["Lothair II", "Tuscany", "Elmham"]
    return [[entity for entity in known if entity in text] for text in texts]


def _masker(text: str, entity: str) -> str:
    return text.replace(entity, TARGET_TOKEN)


def test_probe_masks_an_entity_of_a_read_chunk_and_uses_that_memory():
    chunks = ["Teutberga married Lothair II.", "No names here at all.", "Lambert was margrave of Tuscany."]
    probes = build_recall_probes([_trajectory(chunks)] * 5, _finder, _masker, "any", seed=3)
    for probe in probes:
        assert probe is not None
        assert probe.chunk_index <= probe.memory_step
        assert probe.memory == f"memory after chunk {probe.memory_step}"
        assert TARGET_TOKEN in probe.masked_chunk and probe.entity not in probe.masked_chunk
        assert probe.chunk_index in {1, 3}  # chunk 2 has no entity


def test_probes_are_deterministic_for_a_seed_and_none_without_entities():
    chunks = ["Teutberga married Lothair II.", "Lambert was margrave of Tuscany.", "Theodred of Elmham."]
    first = build_recall_probes([_trajectory(chunks)] * 4, _finder, _masker, "any", seed=11)
    again = build_recall_probes([_trajectory(chunks)] * 4, _finder, _masker, "any", seed=11)
    assert first == again
    empty = build_recall_probes([_trajectory(["nothing", "to see"])], _finder, _masker, "any", seed=0)
    assert empty == [None]


def test_ner_runs_once_per_distinct_chunk():
    seen: list[str] = []

    def counting_finder(texts: list[str]) -> list[list[str]]:
        seen.extend(texts)
        return _finder(texts)

    chunks = ["Teutberga married Lothair II.", "Lambert was margrave of Tuscany."]
    build_recall_probes([_trajectory(chunks)] * 8, counting_finder, _masker, "any", seed=0)
    assert sorted(seen) == sorted(set(seen))


def test_an_entity_cut_by_the_chunk_edge_is_never_the_answer():
    assert touches_chunk_edge("  Lothair II married Teutberga", "Lothair II")
    assert touches_chunk_edge("The sets were designed by Manuel Fontan", "Manuel Fontan")  # cut mid-word
    assert not touches_chunk_edge("Teutberga married Lothair II.", "Lothair II")
    chunks = ["Tuscany was ruled by Lambert and Lothair II"]  # both known entities touch an edge
    assert build_recall_probes([_trajectory(chunks)], _finder, _masker, "any", seed=0) == [None]


@pytest.fixture(scope="module")
def spacy_tools():
    from memtrain.agent.recall import default_entity_tools

    return default_entity_tools()  # real spaCy NER and the real leak-free [TARGET] masker


# Token chunks of a rendered document: a header cut at the start, whole headers inside, one cut at the end.
RENDERED_CHUNKS = [
    "ment 11:\nTeutberga married Lothair II in Aachen.\n\nDocument 12:\nLambert was margrave of Tuscany."
    "\n\nDocument 13:\nTheodred was bishop of Elmham.\n\nDocument 14",
    ":\nMarie Curie was born in Warsaw.\n\nDocument 15:\nOtto von Bismarck served as chancellor.\n\nDocu",
]


def test_no_probe_answer_is_template_text_of_the_rendered_document(spacy_tools):
    find_entities, mask_entity = spacy_tools
    found = find_entities(RENDERED_CHUNKS)
    assert {"12", "13"} & set(found[0])  # spaCy does tag header numbers: the guard is needed
    counts: Counter[str] = Counter()
    probes = build_recall_probes([_trajectory(RENDERED_CHUNKS)] * 40, find_entities, mask_entity, seed=0,
                                 counts=counts)  # fmt: skip
    assert all(probes)
    for probe in probes:
        assert not re.search(r"\d+\s*$|^\s*\d+$", probe.entity), probe.entity  # never a header number
        assert "Document [TARGET]" not in probe.masked_chunk and "ment [TARGET]" not in probe.masked_chunk
        assert TARGET_TOKEN in probe.masked_chunk
    assert counts["template_text"] > 0 and counts["candidates"] > counts["template_text"]


def test_in_template_text_sees_whole_and_cut_headers():
    assert in_template_text("Document 12:\nThe 12 men.", "12")  # the header holds it, so masking would expose it
    assert in_template_text("ment 12:\nThe men.", "12") and in_template_text("The men.\n\nDocument 12", "12")
    assert not in_template_text("Document 3:\nThe 12 men.", "12")
    assert not in_template_text("Document 3:\nThe 12 men.", "12", template="Chapter {index}.\n{text}")
    counts: Counter[str] = Counter()
    assert probe_candidates("Document 7:\nIn 7 days Rome fell", ["7", "Rome"], counts=counts) == ["Rome"]
    assert probe_candidates("Document 7:\nIn 7 days Rome fell", ["7"], template=None) == ["7"]
    assert counts == Counter(candidates=2, template_text=1)


def test_each_trajectory_is_guarded_with_the_template_its_row_was_built_with():
    custom = "Chapter {index}.\n{text}"
    rows = [{"builder_config": json.dumps({"document_template": custom})}, {"builder_config": "not json"}, {}]
    assert [row_document_template(row) for row in rows] == [
        custom,
        DEFAULT_DOCUMENT_TEMPLATE,
        DEFAULT_DOCUMENT_TEMPLATE,
    ]

    def finder(texts: list[str]) -> list[list[str]]:
        return [["7", "Rome"] for _ in texts]

    chunks = ["Chapter 7.\nIn 7 days Rome fell to the Goths."]
    counts: Counter[str] = Counter()
    probes = build_recall_probes(
        [_trajectory(chunks)] * 2, finder, _masker, seed=0, template=[custom, None], counts=counts
    )
    assert probes[0].entity == "Rome"  # "7" is the chapter header's number under the row's own template
    assert counts["template_text"] == 1
    with pytest.raises(ValueError, match="templates"):
        build_recall_probes([_trajectory(chunks)], finder, _masker, template=[custom, custom])


# ---------------------------------------------------------------- entities tagged once (the builder's column)


@pytest.fixture(scope="module")
def built_rows() -> list[dict]:
    """Six documents built with the real spaCy rule, each twice (G1 = 2), as the trainer's batch holds them."""
    from pathlib import Path

    from memtrain.data.corpus import load_corpus
    from memtrain.data.documents import DocumentBuilderConfig, build_documents

    corpus = Path(__file__).parent / "fixtures" / "corpora" / "2wikimultihopqa_corpus_300.json"
    config = DocumentBuilderConfig(num_documents=6, num_neighbours=3, num_random=10, seed=5, show_progress=False)
    rows = build_documents(load_corpus(str(corpus)).paragraphs, config).rows
    return [dict(row) for row in rows for _ in range(2)]


def _raising_finder(texts: list[str]) -> list[list[str]]:
    raise AssertionError(f"NER ran at train time on {len(texts)} texts")


def _rollouts(tokenizer, rows: list[dict], chunk_size: int, max_chunks: int) -> list[Trajectory]:
    from memtrain.agent.chunking import chunk_context

    out = []
    for row in rows:
        chunked = chunk_context(tokenizer, row["context"], chunk_size, max_chunks)
        trajectory = _trajectory(chunked.chunks)
        trajectory.truncated_tokens = chunked.truncated_tokens
        out.append(trajectory)
    return out


@pytest.mark.parametrize("max_chunks", [4, 100])  # centre-truncated (a chunk straddles the cut), and whole
def test_stored_entities_give_the_probes_tagging_at_train_time_gives(tokenizer, spacy_tools, built_rows, max_chunks):
    from memtrain.agent.recall import RecallEntities

    find_entities, mask_entity = spacy_tools
    trajectories = _rollouts(tokenizer, built_rows, 160, max_chunks)
    assert all(t.num_chunks > 1 for t in trajectories)
    assert any(t.truncated_tokens > 0 for t in trajectories) == (max_chunks == 4)
    without = [{k: v for k, v in row.items() if k != "entities"} for row in built_rows]

    stored = RecallEntities(tokenizer, 160, max_chunks, _raising_finder).start(built_rows).result(trajectories)
    tagged = RecallEntities(tokenizer, 160, max_chunks, find_entities).start(without).result(trajectories)
    assert stored == tagged
    assert all(c is not None and len(c) == t.num_chunks for c, t in zip(stored, trajectories))
    assert sum(len(entities) for chunks in stored for entities in chunks) > 20 * len(built_rows)
    for chunks, trajectory in zip(stored, trajectories):
        for entities, text in zip(chunks, trajectory.chunks):
            assert all(entity in text for entity in entities)

    templates = [row_document_template(row) for row in built_rows]
    probes = [
        build_recall_probes(trajectories, None, mask_entity, seed=9, template=templates, chunk_entities=found)
        for found in (stored, tagged)
    ]
    assert probes[0] == probes[1]
    assert sum(p is not None for p in probes[0]) >= len(built_rows) - 1
    for probe in filter(None, probes[0]):
        assert TARGET_TOKEN in probe.masked_chunk and probe.entity not in probe.masked_chunk


def test_no_ner_at_train_time_when_rows_carry_entities(tokenizer, spacy_tools, built_rows):
    from memtrain.agent.recall import RecallEntities

    trajectories = _rollouts(tokenizer, built_rows, 160, 4)
    pending = RecallEntities(tokenizer, 160, 4, _raising_finder).start(built_rows)
    chunk_entities = pending.result(trajectories)
    assert pending.ner_seconds == 0.0
    probes = build_recall_probes(trajectories, _raising_finder, spacy_tools[1], seed=1, chunk_entities=chunk_entities)
    assert any(probes)


def test_rows_without_entities_are_tagged_in_the_background_and_logged_once(tokenizer, built_rows, caplog):
    from memtrain.agent.recall import RecallEntities

    calls = []

    def finder(texts: list[str]) -> list[list[str]]:
        calls.append(len(texts))
        return [[] for _ in texts]

    without = [{k: v for k, v in row.items() if k != "entities"} for row in built_rows[:4]]
    tools = RecallEntities(tokenizer, 160, 4, finder)
    with caplog.at_level("WARNING", logger="memtrain.agent.recall"):
        for _ in range(2):
            pending = tools.start(without)
            assert pending.result(_rollouts(tokenizer, without, 160, 4)) == [[[]] * 4] * 4
    tools.close()
    assert len(calls) == 4  # two documents per step, each once though it has two rollouts
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "2 of 2 documents have no 'entities' column" in warnings[0] and "build-data" in warnings[0]


def test_rollouts_whose_chunks_are_not_the_documents_fall_back_to_tagging_their_chunks(tokenizer, built_rows):
    from memtrain.agent.recall import RecallEntities

    odd = _trajectory(["Teutberga married Lothair II in Aachen."])  # one chunk, the document has several at this size
    (found,) = RecallEntities(tokenizer, 160, 4, _raising_finder).start(built_rows[:1]).result([odd])
    assert found is None
    (probe,) = build_recall_probes([odd], _finder, _masker, seed=0, chunk_entities=[found])
    assert probe is not None
