"""Search-QA rows: real NQ and HotpotQA questions asked together, scored by the search_em reward."""

from __future__ import annotations

from pathlib import Path

import pytest

from memtrain.data.searchqa import build_multi_question_rows, load_qa_pairs, parse_qa_rows
from memtrain.rewards import REWARD_FUNCS


FIXTURES = Path(__file__).parent / "fixtures"


def test_pairs_one_question_from_each_source_deterministically():
    nq = load_qa_pairs(FIXTURES / "search" / "nq_test_17.jsonl", name="nq")
    hotpot = load_qa_pairs(FIXTURES / "longqa" / "hotpotqa_train_12.json", name="hotpotqa")
    assert len(nq) == 17 and len(hotpot) == 12
    rows = build_multi_question_rows([nq, hotpot], num_rows=10, seed=3)
    assert rows == build_multi_question_rows([nq, hotpot], num_rows=10, seed=3)
    assert len({row["id"] for row in rows}) == 10
    for row in rows:
        assert row["sources"] == ["nq", "hotpotqa"] and row["context"] == ""
        assert len(row["questions"]) == 2 and all(isinstance(a, list) and a for a in row["answers"])
        assert row["prompt"].startswith("1. ") and "\n2. " in row["prompt"]
    with pytest.raises(ValueError, match="smallest source has 12"):
        build_multi_question_rows([nq, hotpot], num_rows=13)


def test_bad_rows_name_the_row_and_key():
    with pytest.raises(ValueError, match="nq row 1 has no answer"):
        parse_qa_rows([{"question": "a?", "answer": "b"}, {"question": "c?"}], "nq")
    with pytest.raises(ValueError, match="row 0 has no `question`"):
        parse_qa_rows([{"answer": "b"}], "x")


def test_search_em_averages_exact_match_over_the_questions():
    reward = REWARD_FUNCS["search_em"]
    answers = [[["Wilhelm Conrad Röntgen"], ["Paris", "Paris, France"]]] * 3
    questions = [["who got the first nobel prize in physics", "capital of France?"]] * 3
    completions = ["Wilhelm Conrad Röntgen; Paris", "the Wilhelm Conrad Röntgen; Lyon", "Berlin"]
    # SQuAD normalisation drops the article: 1 + 1, 1 + 0, 0 + missing -> 1.0, 0.5, 0.0
    assert reward(completions, answers=answers, questions=questions) == [1.0, 0.5, 0.0]
    single = reward(["paris"], answers=[["Paris"]], prompts=["capital of France?"])
    assert single == [1.0]


def test_script_writes_a_loadable_dataset(tmp_path):
    from memtrain.data.searchqa import main
    from memtrain.train import load_training_dataset

    out = main(
        ["--questions", str(FIXTURES / "search" / "nq_test_17.jsonl"), str(FIXTURES / "longqa" / "hotpotqa_train_12.json"),
         "--num_rows", "4", "--output_dir", str(tmp_path / "searchqa")]
    )  # fmt: skip
    dataset = load_training_dataset(str(out), task="search")
    assert len(dataset) == 4 and dataset[0]["context"] == "" and len(dataset[0]["questions"]) == 2
