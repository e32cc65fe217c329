"""Long-text QA builder: document counts, gold paragraphs, seeded shuffling, closed-book filtering."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import refusal

from memtrain.data.longqa import (
    ParagraphPool,
    answered_without_context,
    build_bucket,
    build_row,
    build_test_buckets,
    closed_book_prompt_ids,
    load_examples,
    parse_example,
    render_documents,
)
from memtrain.preflight import PreflightError


FIXTURES = Path(__file__).parent / "fixtures" / "longqa"
HOTPOT = FIXTURES / "hotpotqa_train_12.json"
MUSIQUE = FIXTURES / "musique_train_3.json"
DOC_HEADER = re.compile(r"^Document (\d+):$", re.MULTILINE)


@pytest.fixture(scope="module")
def examples():
    return load_examples(HOTPOT)


def documents_of(context: str) -> list[tuple[str, str]]:
    """(title, text) per "Document i:" block, checking the numbering is 1..N."""
    blocks = context.split("\n\n")
    out = []
    for i, block in enumerate(blocks, start=1):
        header, title, text = block.split("\n", 2)
        assert header == f"Document {i}:"
        out.append((title, text))
    return out


def test_parse_both_hotpot_layouts_agree(examples):
    raw = json.loads(HOTPOT.read_text(encoding="utf-8"))[0]
    hub_layout = {
        "id": raw["_id"],
        "question": raw["question"],
        "answer": raw["answer"],
        "supporting_facts": {
            "title": [f[0] for f in raw["supporting_facts"]],
            "sent_id": [f[1] for f in raw["supporting_facts"]],
        },
        "context": {"title": [c[0] for c in raw["context"]], "sentences": [c[1] for c in raw["context"]]},
    }
    from_hub = parse_example(hub_layout)
    assert from_hub.paragraphs == examples[0].paragraphs
    assert from_hub.gold_titles == examples[0].gold_titles == ["Alû", "Lilu (mythology)"]
    assert from_hub.answers == examples[0].answers == [raw["answer"]]
    # sentences are joined as written (they carry their own leading spaces)
    assert examples[0].paragraphs[0].text == "".join(raw["context"][0][1]).strip()


def test_musique_rows_with_aliases():
    example = load_examples(MUSIQUE)[0]
    raw = json.loads(MUSIQUE.read_text(encoding="utf-8"))[0]
    assert example.answers[0] == raw["answer"]
    assert set(raw["answer_aliases"]) <= set(example.answers)
    assert example.gold_titles == [p["title"] for p in raw["paragraphs"] if p["is_supporting"]]


def test_bad_rows_name_the_row_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"bad\.json row 1: no `question`"):
        path = tmp_path / "bad.json"
        path.write_text(
            json.dumps([{"question": "q", "answer": "a", "context": [], "supporting_facts": []}, {"x": 1}])
        )
        load_examples(path)
    with pytest.raises(ValueError, match="gold titles .* not among"):
        parse_example({"question": "q", "answer": "a", "context": [["A", ["x"]]], "supporting_facts": [["B", 0]]})
    with pytest.raises(FileNotFoundError, match="not a question file"):
        load_examples(tmp_path / "missing.json")


def test_bucket_document_counts_and_gold_present(examples):
    pool = ParagraphPool.from_examples(examples)
    assert len(pool) == 120  # 12 questions x 10 paragraphs, all titles distinct in this slice
    for num_docs in (50, 100):
        rows = build_bucket(examples, num_docs, seed=0, pool=pool)
        assert len(rows) == len(examples)
        for row, example in zip(rows, examples):
            docs = documents_of(row["context"])
            assert len(docs) == row["num_docs"] == num_docs
            titles = [t for t, _ in docs]
            assert len(set(titles)) == num_docs  # no paragraph twice
            assert {p.title for p in example.paragraphs} <= set(titles)  # gold + distractors all kept
            assert [titles[i - 1] for i in row["gold_positions"]] == [t for t in titles if t in example.gold_titles]
            assert sorted(titles[i - 1] for i in row["gold_positions"]) == sorted(example.gold_titles)
            for title, text in docs:  # padding comes from the pool, text unchanged
                assert any(p.title == title and p.text == text for p in pool.paragraphs)
            assert row["prompt"] == example.question and row["answers"] == example.answers


def test_shuffle_is_seeded(examples):
    pool = ParagraphPool.from_examples(examples)
    a = [build_row(e, 50, pool, seed=1) for e in examples]
    b = [build_row(e, 50, pool, seed=1) for e in examples]
    c = [build_row(e, 50, pool, seed=2) for e in examples]
    assert a == b
    assert [r["gold_positions"] for r in a] != [r["gold_positions"] for r in c]
    positions = {p for r in a for p in r["gold_positions"]}
    assert len(positions) > 10  # gold documents land at many depths, not at the front
    # a row depends on its own question only: building a subset gives the same text
    assert build_row(examples[3], 50, pool, seed=1) == a[3]


def test_pool_too_small_errors_or_caps(examples, caplog):
    pool = ParagraphPool.from_examples(examples)
    with pytest.raises(ValueError, match="needs 190 padding paragraphs but the pool has only 110"):
        build_row(examples[0], 200, pool, seed=0)
    row = build_row(examples[0], 200, pool, seed=0, strict=False)
    assert row["num_docs"] == 120 and len(documents_of(row["context"])) == 120
    assert "Capping" in caplog.text
    with pytest.raises(ValueError, match="more than num_docs=5"):
        build_row(examples[0], 5, pool, seed=0)


def test_test_buckets_share_questions(examples):
    buckets = build_test_buckets(examples, buckets=(20, 40), num_questions=5, seed=3)
    assert list(buckets) == ["test_n20", "test_n40"]
    ids20 = [r["question_id"] for r in buckets["test_n20"]]
    assert len(ids20) == 5 and ids20 == [r["question_id"] for r in buckets["test_n40"]]
    assert [r["num_docs"] for r in buckets["test_n40"]] == [40] * 5


def test_render_matches_memtrain_document_format():
    from memtrain.data.longqa import Paragraph

    text = render_documents([Paragraph("A", "alpha."), Paragraph("B", "beta.")])
    assert text == "Document 1:\nA\nalpha.\n\nDocument 2:\nB\nbeta."
    assert DOC_HEADER.findall(text) == ["1", "2"]


@pytest.mark.parametrize(
    ("completion", "answers", "expected"),
    [
        ("The answer is \\boxed{Lorne Michaels}.", ["Lorne Michaels"], True),
        ("\\boxed{the Lorne Michaels}", ["Lorne Michaels"], True),  # SQuAD normalisation drops articles
        ("I think it was \\boxed{Paris}", ["London"], False),
        (
            "I don't know. No previous memory says nothing.",
            ["no"],
            True,
        ),  # sub-EM is plain containment in the extracted line
        ("Let me think.\nAnswer: yes", ["no"], False),  # only the extracted answer is scored, not the whole reply
        ("\\boxed{yes}", ["no", "yes"], True),  # any alias
        ("", ["Paris"], False),
    ],
)
def test_answered_without_context_on_real_strings(completion, answers, expected):
    assert answered_without_context(completion, answers) is expected


def test_closed_book_prompt_uses_no_previous_memory(tokenizer):
    ids = closed_book_prompt_ids(tokenizer, "Who wrote Hamlet?")
    text = tokenizer.decode(ids)
    assert "No previous memory" in text and "Who wrote Hamlet?" in text and "<section>" not in text
    assert text.rstrip().endswith("assistant")  # ends on the assistant header, ready to generate


class CountingGenerator:
    """Wraps the real generator and records each call's batch size (one call per batch of closed-book prompts)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[int] = []

    def generate(self, prompt_ids, n=1, sampling=None):
        self.calls.append(len(prompt_ids))
        return self.inner.generate(prompt_ids, n=n, sampling=sampling)


def test_filter_with_tiny_random_model(tokenizer, tiny_model, examples):
    """Whatever the random model writes, the split is a partition and agrees with the decision function."""
    from memtrain.agent.generation import SamplingConfig, TransformersGenerator
    from memtrain.data.longqa import filter_examples_no_context, filter_no_context

    generator = CountingGenerator(TransformersGenerator(tiny_model, tokenizer))
    rows = build_bucket(examples[:5], 20, seed=0)
    kept, dropped = filter_no_context(rows, tokenizer, generator, SamplingConfig(max_new_tokens=6), batch_size=2)
    assert generator.calls == [2, 2, 1]
    assert sorted(r["id"] for r in kept + dropped) == sorted(r["id"] for r in rows)
    for row in dropped:
        assert answered_without_context(row["closed_book_completion"], row["answers"])
    kept_examples, dropped_rows = filter_examples_no_context(examples[:5], tokenizer, generator, batch_size=8)
    assert len(kept_examples) + len(dropped_rows) == 5 and generator.calls[-1] == 5


def test_filter_drops_what_the_model_answers(tokenizer, examples):
    """A model wired to write one answer closed-book: exactly the questions with that answer are dropped."""
    from test_agent_search_agent import build_chain_model

    from memtrain.agent.generation import TransformersGenerator
    from memtrain.data.longqa import filter_examples_no_context

    answer = examples[0].answers[0]
    model = build_chain_model(tokenizer, f"I recall it: \\boxed{{{answer}}}")
    kept, dropped = filter_examples_no_context(examples, tokenizer, TransformersGenerator(model, tokenizer))
    expected = [e.id for e in examples if any(a.lower() == answer.lower() for a in e.answers)]
    assert [row["id"] for row in dropped] == expected and expected[0] == examples[0].id
    assert dropped[0]["closed_book_completion"].startswith(f"I recall it: \\boxed{{{answer}}}")
    assert [e.id for e in kept] == [e.id for e in examples if e.id not in expected]


def test_build_script_from_recipe(tmp_path, monkeypatch):
    from datasets import load_from_disk

    from memtrain.data.longqa import main

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # the recipe's paths are relative to the repository root, where scripts are run
    recipe = repo / "recipes" / "data" / "longqa-hotpotqa-cpu.yaml"
    out = main([str(recipe), "--output_dir", str(tmp_path / "out"), "--test_buckets", "20", "25"])
    data = load_from_disk(str(out / "dataset"))
    assert sorted(data) == ["test_n20", "test_n25", "train"]
    assert set(data["train"]["num_docs"]) == {50} and len(data["train"]) == 12
    assert data["test_n25"]["question_id"] == data["test_n20"]["question_id"] and len(data["test_n20"]) == 3
    for split in ("train", "test_n20", "test_n25"):
        assert (out / "data" / f"{split}-00000-of-00001.parquet").is_file()
    assert "split: test_n25" in (out / "README.md").read_text()
    stats = json.loads((out / "build_stats.json").read_text())
    assert stats["rows"] == {"train": 12, "test_n20": 3, "test_n25": 3}
    with pytest.raises(PreflightError, match="overwrite_output_dir"):
        main([str(recipe), "--output_dir", str(out)])
    with pytest.raises(ValueError, match="pool has only"):
        main([str(recipe), "--output_dir", str(tmp_path / "big"), "--test_buckets", "500"])
    assert not (tmp_path / "big").exists() and not list(tmp_path.glob(".big*"))  # nothing half-written


def test_build_checks_its_push_and_output_folder_first_and_keeps_the_output_if_the_push_fails(tmp_path, monkeypatch):
    from huggingface_hub import constants
    from test_hub import FakeHubServer

    from memtrain.data.longqa import main
    from memtrain.preflight import PreflightError, PushError

    argv = ["--train_source", str(tmp_path / "not-loaded-yet.json"), "--output_dir", str(tmp_path / "out")]
    push = ["--push_to_hub", "true", "--hub_dataset_id", "me/longqa"]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PreflightError, match="the Hub is offline"):  # before the (missing) source is read
        main([*argv, *push])
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(PreflightError, match="cannot be created: .*a-file is a file"):
        main(["--train_source", str(HOTPOT), "--output_dir", str(tmp_path / "a-file" / "out")])
    FakeHubServer(monkeypatch, fail_commits=True)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_the_fake_hub")
    argv = ["--test_source", str(HOTPOT), "--test_buckets", "20", "--num_test_questions", "2"]
    with pytest.raises(PushError, match=r"holds the complete local output, but the push to me/longqa failed"):
        main([*argv, "--output_dir", str(tmp_path / "out"), *push])
    assert (tmp_path / "out" / "data" / "test_n20-00000-of-00001.parquet").is_file()


@pytest.mark.slow
def test_real_smollm2_closed_book_filter(examples):
    """SmolLM2-135M-Instruct closed-book on the 12 fixture questions: a consistent split, audited replies."""
    from memtrain.agent.generation import SamplingConfig, TransformersGenerator
    from memtrain.data.longqa import filter_examples_no_context
    from memtrain.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2-135m", dtype="float32")
    generator = TransformersGenerator(model, tokenizer)
    kept, dropped = filter_examples_no_context(
        examples, tokenizer, generator, SamplingConfig(max_new_tokens=48, do_sample=False), batch_size=12
    )
    assert len(kept) + len(dropped) == len(examples)
    for row in dropped:
        assert answered_without_context(row["closed_book_completion"], row["answers"])


@pytest.mark.parametrize(
    ("name", "content", "extra", "pattern"),
    [
        ("q.jsonl", b'{"question": "caf\xe9"}\n', [], r"Question file .*q.jsonl line 1 is not UTF-8 .*iconv"),
        ("q.jsonl", b"", ["--strict", "true"], r"--test_source .*q.jsonl holds no questions"),
        ("q.json", b"[]", [], r"--test_source .*q.json holds no questions"),
        ("q.json", b"question,answer\n", [], r"Question file .*q.json is not valid json \(Expecting value"),
        ("missing.jsonl", None, [], r"missing.jsonl is not a question file"),
        ("q.jsonl", b"{}", ["--num_test_questions", "-1"], r"--num_test_questions must be >= 1, got -1"),
        ("q.jsonl", b"{}", ["--num_test_questions", "0"], r"--num_test_questions must be >= 1, got 0"),
    ],
)
def test_bad_question_files_and_counts_are_one_line_errors(name, content, extra, pattern, tmp_path, capsys):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["build-longqa", "--test_source", str(tmp_path / name), "--output_dir", str(tmp_path / "out"), *extra]
    line = refusal(argv, capsys)
    assert re.search(pattern, line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written: no folder, staging or lock


def test_a_hub_question_source_that_cannot_load_is_one_line(tmp_path, capsys):
    """Offline (or a wrong id), build-longqa printed a ConnectionError traceback; now one line naming the source."""
    from memtrain import cli

    argv = ["build-longqa", "--train_source", "no-such-org/no-such-questions", "--output_dir", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "Could not load the questions 'no-such-org/no-such-questions'" in line and "local .json" in line
    assert not (tmp_path / "out").exists()
