"""Evaluation harness: hand-computed aggregation, full-context budget skipping, and the four outputs of a real run."""

from __future__ import annotations

import html
import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest

from memtrain.agent.search_agent import split_answers
from memtrain.evaluation import (
    EvalConfig,
    Evaluator,
    aggregate_scores,
    build_longqa_rows,
    check_rows,
    evaluate,
    load_rows,
    render_markdown,
    score_prediction,
    select_rows,
)
from memtrain.metrics import exact_match, f1_score


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

HOTPOT = Path(__file__).parent / "fixtures" / "longqa" / "hotpotqa_train_12.json"


# --------------------------------------------------------------------------------------------------- scoring


def test_score_prediction_longqa_hand_computed():
    # lenient extraction takes the boxed answer; normalisation drops "The" and punctuation.
    scores = score_prediction("longqa", "I think \\boxed{The Eiffel Tower.}", ["Eiffel Tower"])
    assert scores == {"accuracy": 1.0, "em": 1.0, "f1": 1.0}
    # a gold inside a longer answer: sub-EM hit, EM miss, F1 = 2 * (2/4 * 2/2) / (2/4 + 2/2) = 2/3
    scores = score_prediction("longqa", "\\boxed{near the Eiffel Tower Paris}", ["Eiffel Tower"])
    assert scores["accuracy"] == 1.0 and scores["em"] == 0.0
    assert scores["f1"] == pytest.approx(2 / 3)
    # strict extraction finds no box in a plain reply: everything 0
    assert score_prediction("longqa", "Answer: Eiffel Tower", ["Eiffel Tower"], "strict") == {
        "accuracy": 0.0,
        "em": 0.0,
        "f1": 0.0,
    }
    assert score_prediction("longqa", "Answer: Eiffel Tower", ["Eiffel Tower"], "lenient")["em"] == 1.0


def test_score_prediction_memtrain_strict_and_lenient():
    assert score_prediction("memtrain", "\\boxed{the beatles}", ["The Beatles"]) == {
        "masked_entity_strict": 1.0,
        "masked_entity_lenient": 1.0,
        "masked_entity_f1": 1.0,
    }
    # not boxed: only the lenient rule accepts it; "Beatles" (article dropped) is wrong under both
    assert score_prediction("memtrain", "The Beatles", ["The Beatles"]) == {
        "masked_entity_strict": 0.0,
        "masked_entity_lenient": 1.0,
        "masked_entity_f1": 1.0,
    }
    beatles = score_prediction("memtrain", "\\boxed{Beatles}", ["The Beatles"])
    assert beatles["masked_entity_lenient"] == 0.0 and beatles["masked_entity_f1"] == 1.0  # F1 drops the article
    with pytest.raises(ValueError, match="Unknown task"):
        score_prediction("nope", "x", ["x"])


def test_aggregate_scores_hand_computed():
    replies = {
        # bucket 50: row a has 2 samples (hit, miss) -> 0.5; row b 1 hit -> 1.0; bucket mean 0.75
        "a": (["\\boxed{Paris}", "\\boxed{Lyon}"], ["Paris"], "50"),
        "b": (["\\boxed{Paris, France}"], ["Paris"], "50"),
        # bucket 100: one miss, one skipped row
        "c": (["\\boxed{Berlin}"], ["Bonn"], "100"),
        "d": (None, ["Bonn"], "100"),
    }
    scores = [
        None if texts is None else [score_prediction("longqa", t, golds, "strict") for t in texts]
        for texts, golds, _ in replies.values()
    ]
    result = aggregate_scores(scores, [bucket for *_, bucket in replies.values()])
    assert list(result["buckets"]) == ["50", "100"]  # numeric order, not string order
    b50, b100 = result["buckets"]["50"], result["buckets"]["100"]
    assert b50["accuracy"] == pytest.approx(0.75)
    assert b50["em"] == pytest.approx((0.5 + 0.0) / 2)  # "Paris, France" is not an exact match
    assert b50["f1"] == pytest.approx((0.5 + 2 / 3) / 2)  # F1("paris france", "paris") = 2/3
    assert (b50["n"], b50["skipped"]) == (2, 0)
    assert (b100["accuracy"], b100["n"], b100["skipped"]) == (0.0, 1, 1)
    # avg = mean of bucket means (each length weighs the same), not the mean over rows
    assert result["avg"]["accuracy"] == pytest.approx((0.75 + 0.0) / 2)
    assert (result["avg"]["n"], result["avg"]["skipped"]) == (3, 1)


def test_aggregate_all_skipped_bucket_and_errors():
    result = aggregate_scores([None, [{"accuracy": 1.0}]], ["a", "b"])
    assert result["buckets"]["a"] == {"n": 0, "skipped": 1}
    assert result["avg"]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="bucket labels"):
        aggregate_scores([None], ["a", "b"])
    with pytest.raises(ValueError, match="no samples"):
        aggregate_scores([[]], ["a"])


def test_markdown_table_layout():
    run = {
        "label": "m",
        "mode": "agent",
        "task": "longqa",
        "metrics": aggregate_scores([[{"accuracy": 1.0}], None, [{"accuracy": 0.0}]], ["50", "100", "100"]),
        "settings": {**EvalConfig().__dict__, "modes": ["agent"]},
    }
    table = render_markdown({"runs": [run]})
    assert "| Model | Mode | N=50 | N=100 | Avg |" in table
    assert "| m | agent | 100.0 | 0.0 (1 skipped) | 50.0 |" in table


# --------------------------------------------------------------------------------------------------- data


def test_rows_loading_and_checks(tmp_path):
    rows = [{"prompt": "q", "context": "c", "answers": ["a"], "num_docs": 5}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert load_rows(tmp_path / "rows.jsonl") == rows
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "built" / "dataset"))
    assert load_rows(tmp_path / "built") == rows
    (tmp_path / "bad.jsonl").write_text('{"prompt": 1}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        load_rows(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_rows(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="row 0: missing context"):
        check_rows([{"prompt": "q", "answers": ["a"]}], "longqa", "x.jsonl")
    with pytest.raises(ValueError, match="non-empty list"):
        check_rows([{"prompt": "q", "context": "c", "answers": "a"}], "longqa")
    with pytest.raises(ValueError, match="full_context"):
        EvalConfig(task="search", modes=("full_context",))


def test_select_rows_limits_each_bucket():
    rows = [{"num_docs": n, "i": i} for i, n in enumerate([5, 5, 5, 9, 9])]
    assert [r["i"] for r in select_rows(rows, "num_docs", 2)] == [0, 1, 3, 4]


# --------------------------------------------------------------------------------------------------- runs


@pytest.fixture
def generator(tokenizer):
    from conftest import build_tiny_model

    from memtrain.agent.generation import TransformersGenerator

    return TransformersGenerator(build_tiny_model(tokenizer, seed=0), tokenizer)


@pytest.fixture(scope="module")
def longqa_rows():
    return build_longqa_rows(HOTPOT, [10, 20], num_questions=1, seed=0)


def test_full_context_skips_rows_over_the_budget(tokenizer, generator):
    rows = [
        {"prompt": "Who?", "context": "Short text.", "answers": ["x"], "num_docs": 1},
        {"prompt": "Who?", "context": "word " * 400, "answers": ["x"], "num_docs": 1},
    ]
    config = EvalConfig(modes=("full_context",), max_answer_tokens=4, max_context_tokens=200)
    evaluator = Evaluator(tokenizer, generator, config)
    assert len(evaluator.full_context_prompt(rows[0])) < 200 < len(evaluator.full_context_prompt(rows[1]))
    output = evaluator.run(rows, "full_context")
    assert output.replies[1] is None and isinstance(output.replies[0][0], str)
    metrics = aggregate_scores(evaluator.score(rows, output), ["1", "1"])
    assert metrics["buckets"]["1"]["n"] == 1 and metrics["buckets"]["1"]["skipped"] == 1


def test_evaluate_writes_all_outputs(tmp_path, tokenizer, generator, longqa_rows):
    config = EvalConfig(
        modes=("agent", "full_context"),
        chunk_size=300,
        max_chunks=2,
        max_memory_tokens=8,
        max_answer_tokens=6,
        max_context_tokens=3000,
        num_samples=2,
        temperature=1.0,
        seed=3,
        num_trajectory_pages=2,
    )
    results = evaluate(longqa_rows, tokenizer, generator, config, tmp_path, label="tiny")

    def no_nan(constant):
        raise AssertionError(f"results.json holds {constant}, which is not strict JSON")

    on_disk = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"), parse_constant=no_nan)
    assert [run["metrics"]["buckets"].keys() for run in on_disk["runs"]] == [
        run["metrics"]["buckets"].keys() for run in results["runs"]
    ]
    assert [(r["label"], r["mode"]) for r in on_disk["runs"]] == [("tiny", "agent"), ("tiny", "full_context")]
    for run in on_disk["runs"]:
        assert set(run["metrics"]["buckets"]) == {"10", "20"}
        settings = run["settings"]
        assert (settings["num_samples"], settings["temperature"], settings["seed"]) == (2, 1.0, 3)
        for bucket, metrics in run["metrics"]["buckets"].items():
            assert metrics["n"] + metrics["skipped"] == 1
            for prediction in (p for p in run["predictions"] if p["bucket"] == bucket and p["replies"]):
                assert len(prediction["replies"]) == 2
    agent, full = on_disk["runs"]
    assert agent["metrics"]["avg"]["skipped"] == 0
    # the question's full-context prompt is ~1.9k tokens at N=10 but ~3.5k at N=20: over the 3,000 budget
    assert [full["metrics"]["buckets"][b]["skipped"] for b in ("10", "20")] == [0, 1]
    assert [p["replies"] is None for p in full["predictions"]] == [False, True]
    # recomputing the aggregate from the stored replies gives the stored metrics
    rescored = [[score_prediction("longqa", t, row["answers"]) for t in p["replies"]]
                for p, row in zip(agent["predictions"], longqa_rows)]  # fmt: skip
    assert aggregate_scores(rescored, [p["bucket"] for p in agent["predictions"]]) == agent["metrics"]

    table = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "| tiny | agent |" in table and "– (1 skipped) |" in table
    assert (tmp_path / "accuracy_vs_length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pages = sorted((tmp_path / "trajectories").glob("*.html"))
    assert [str(p.relative_to(tmp_path)) for p in pages] == agent["trajectory_pages"] and len(pages) == 2
    assert pages[0].read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    # each page shows what was scored: the scored reply, the gold answers and the scores
    first = pages[0].read_text(encoding="utf-8")
    reply = html.escape(agent["predictions"][0]["replies"][0])
    assert "<h3>Scored reply</h3>" in first and f'<div class="answer">{reply}</div>' in first
    assert "<h3>Gold answers</h3>" in first and f"<li>{html.escape(longqa_rows[0]['answers'][0])}</li>" in first
    assert "<h3>Scores</h3>" in first

    # a second model into the same folder joins the table instead of replacing it
    evaluate(longqa_rows[:1], tokenizer, generator, replace_modes(config), tmp_path, label="other")
    labels = [r["label"] for r in json.loads((tmp_path / "results.json").read_text())["runs"]]
    assert labels == ["tiny", "tiny", "other"]


def replace_modes(config: EvalConfig) -> EvalConfig:
    return replace(config, modes=("agent",), num_samples=1, num_trajectory_pages=0)


def test_seeded_runs_repeat(tokenizer, generator):
    rows = [{"prompt": "Who met Bob?", "context": "Ann met Bob in Oslo. " * 30, "answers": ["Ann"]}]
    config = EvalConfig(chunk_size=64, max_chunks=2, max_memory_tokens=6, max_answer_tokens=4, temperature=1.0)
    first = Evaluator(tokenizer, generator, config).run(rows, "agent").replies
    assert first == Evaluator(tokenizer, generator, config).run(rows, "agent").replies
    other = Evaluator(tokenizer, generator, replace(config, seed=1)).run(rows, "agent").replies
    assert other != first  # the seed is what makes it repeat, not greedy decoding


def test_memtrain_task_scores_recall_probes(tmp_path, tokenizer, generator):
    from memtrain.agent.prompts import MEMTRAIN_PROBLEM

    context = (
        "Marie Curie was born in Warsaw in 1867. She moved to Paris to study physics at the University of Paris. "
        "In 1903 she shared the Nobel Prize in Physics with Pierre Curie and Henri Becquerel. [MASK] later "
        "founded the Radium Institute in Paris. She died in 1934 in Passy, France."
    )
    rows = [{"prompt": MEMTRAIN_PROBLEM, "context": context, "answers": ["Marie Curie"]}]
    config = EvalConfig(task="memtrain", chunk_size=24, max_chunks=4, max_memory_tokens=6, max_answer_tokens=6)
    results = evaluate(rows, tokenizer, generator, config, tmp_path, label="tiny")
    metrics = results["runs"][0]["metrics"]["buckets"]["all"]
    assert set(metrics) >= {"masked_entity_strict", "masked_entity_lenient", "recall_strict", "recall_lenient"}
    assert metrics["n"] == 1 and not math.isnan(metrics["recall_strict"])


def test_cli_and_script_take_the_same_arguments(tmp_path, tokenizer):
    import runpy

    from conftest import save_tiny_checkpoint

    from memtrain.cli import main as cli_main
    from memtrain.evaluation.cli import parse_eval_args

    model_dir = save_tiny_checkpoint(tokenizer, tmp_path / "tiny")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Who?", "context": "Ann met Bob.", "answers": ["Ann"], "num_docs": 2}))
    argv = ["--model", str(model_dir), "--dataset", str(rows), "--max_answer_tokens", "3", "--output_dir",
            str(tmp_path / "out"), "--max-memory-tokens", "3", "--modes", "agent", "full_context"]  # fmt: skip

    # scripts/evaluate.py is memtrain.evaluation.cli.main: one parser for it and `memtrain eval`
    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "evaluate.py"))
    assert script["main"].__module__ == "memtrain.evaluation.cli"
    args, config = parse_eval_args(argv)
    assert (config.max_answer_tokens, config.max_memory_tokens, config.modes) == (3, 3, ("agent", "full_context"))

    assert script["main"](argv) == 0
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert [(r["mode"], r["metrics"]["avg"]["n"]) for r in runs] == [("agent", 1), ("full_context", 1)]
    assert runs[0]["settings"]["model"] == str(model_dir)
    assert cli_main(["eval", *argv, "--num_samples", "0"]) == 2  # a bad setting: clear error, no traceback


def test_search_task_with_a_real_bm25_retriever(tmp_path, tokenizer, generator):
    from memtrain.retrieval import Retriever

    retriever = Retriever.from_corpus(Path(__file__).parent / "fixtures" / "search" / "dpr_passages_200.jsonl")
    rows = [{"prompt": "Who wrote Hamlet?", "context": "", "answers": ["William Shakespeare"]}]
    config = EvalConfig(task="search", search_max_turns=1, search_max_new_tokens=6, num_trajectory_pages=1)
    results = evaluate(rows, tokenizer, generator, config, tmp_path, label="tiny", retriever=retriever)
    run = results["runs"][0]
    assert set(run["metrics"]["buckets"]["all"]) == {"em", "f1", "n", "skipped"}
    assert run["predictions"][0]["scores"][0] == {
        "em": exact_match(split_answers(run["predictions"][0]["replies"][0], 1)[0], ["William Shakespeare"]),
        "f1": f1_score(split_answers(run["predictions"][0]["replies"][0], 1)[0], ["William Shakespeare"]),
    }
    assert "## search: em (%)" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="needs a retriever"):
        evaluate(rows, tokenizer, generator, config, tmp_path / "none")


@pytest.mark.slow
def test_real_smollm2_longqa_end_to_end(tmp_path):
    from memtrain.cli import main as cli_main

    rows = tmp_path / "rows.jsonl"
    built = build_longqa_rows(HOTPOT, [10], num_questions=2, seed=0)
    rows.write_text("\n".join(json.dumps(r) for r in built), encoding="utf-8")
    argv = ["eval", "--model", "smollm2-135m", "--dataset", str(rows), "--output_dir", str(tmp_path / "out"),
            "--chunk_size", "1000", "--max_chunks", "4", "--max_memory_tokens", "96", "--max_answer_tokens", "32",
            "--modes", "agent", "full_context", "--max_context_tokens", "4000"]  # fmt: skip
    assert cli_main(argv) == 0
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert [r["mode"] for r in runs] == ["agent", "full_context"]
    assert runs[0]["metrics"]["buckets"]["10"]["n"] == 2
    assert all(any(reply.strip() for reply in p["replies"]) for p in runs[0]["predictions"])


def test_a_long_qa_build_is_evaluated_on_its_held_out_buckets_only(tmp_path):
    from datasets import Dataset, DatasetDict

    row = {"prompt": "q?", "context": "Document 1:\nt\nx", "answers": ["x"]}
    DatasetDict(
        {
            "train": Dataset.from_list([{**row, "num_docs": 200}] * 3),
            "test_n50": Dataset.from_list([{**row, "num_docs": 50}] * 2),
            "test_n100": Dataset.from_list([{**row, "num_docs": 100}]),
        }
    ).save_to_disk(str(tmp_path / "longqa" / "dataset"))
    rows = load_rows(tmp_path / "longqa")
    assert sorted(r["num_docs"] for r in rows) == [50, 50, 100]
    Dataset.from_list([row] * 4).save_to_disk(str(tmp_path / "plain"))
    assert len(load_rows(tmp_path / "plain")) == 4
