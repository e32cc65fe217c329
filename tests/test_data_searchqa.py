"""Search-QA rows: real NQ and HotpotQA questions asked together, scored by the search_em reward."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from conftest import refusal

from memtrain.data.searchqa import build_multi_question_rows, load_qa_pairs, parse_qa_rows
from memtrain.preflight import PreflightError
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


def test_build_writes_parquet_and_a_card_that_load_dataset_reads(tmp_path, capsys):
    from datasets import load_dataset

    from memtrain.data.searchqa import main

    out = tmp_path / f"searchqa-{uuid.uuid4().hex[:8]}"  # load_dataset's cache goes by the folder's name
    argv = ["--questions", str(FIXTURES / "search" / "nq_test_17.jsonl"), str(FIXTURES / "longqa" / "hotpotqa_train_12.json"),
            "--num_rows", "5", "--seed", "2", "--output_dir", str(out)]  # fmt: skip
    main(argv)
    assert (out / "data" / "train-00000-of-00001.parquet").is_file() and (out / "build_stats.json").is_file()
    card = (out / "README.md").read_text()
    assert "path: data/train-00000-of-00001.parquet" in card and "Rows: 5. Seed 2." in card
    loaded = load_dataset(str(out), split="train")  # the card's configs point at the parquet, not dataset/
    assert len(loaded) == 5 and loaded[0]["sources"] == ["nq_test_17", "hotpotqa_train_12"]
    with pytest.raises(PreflightError, match="--overwrite_output_dir true"):
        main(argv)
    main([*argv[:-4], "--num_rows", "3", "--output_dir", str(out), "--overwrite_output_dir", "true"])
    # load_dataset caches a rebuilt folder by its name (it would still see 5 rows); training reads dataset/
    from memtrain.train import load_training_dataset

    assert len(load_training_dataset(str(out), task="search")) == 3


def test_settings_come_from_a_yaml_file_and_help_lists_every_key(tmp_path, capsys):
    import yaml

    from memtrain.data.searchqa import main

    recipe = tmp_path / "searchqa.yaml"
    recipe.write_text(yaml.safe_dump({"questions": [str(FIXTURES / "search" / "nq_test_17.jsonl")], "num_rows": 2,
                                      "output_dir": str(tmp_path / "from-yaml")}))  # fmt: skip
    out = main([str(recipe), "--num_rows", "4"])  # the command line wins over the file
    assert json.loads((out / "build_stats.json").read_text())["rows"] == 4
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for key in (
        "questions",
        "num_rows",
        "seed",
        "output_dir",
        "overwrite_output_dir",
        "push_to_hub",
        "hub_dataset_id",
    ):
        assert f"--{key}" in text, key
    assert "(default: outputs/data/searchqa)" in text
    with pytest.raises(ValueError, match="Give the question files"):
        main(["--num_rows", "2", "--output_dir", str(tmp_path / "none")])


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("q.jsonl", b'{"question": "caf\xe9", "answer": "x"}\n', r"QA file .*q.jsonl line 1 is not UTF-8 .*iconv"),
        ("q.csv", b"question,answer\nwho,me\n", r"QA file .*q.csv is not valid JSON \(Expecting value"),
        ("q.jsonl", b'{"question": "who", "answer": "me"}\n{"question"\n', r"QA file .*q.jsonl line 2 is not valid"),
        ("q.jsonl", b"", r"QA file .*q.jsonl holds no question rows"),
        ("missing.jsonl", None, r"QA file .*missing.jsonl does not exist"),
    ],
)
def test_bad_question_files_are_one_line_errors(name, content, pattern, tmp_path, capsys):
    import re

    if content is not None:
        (tmp_path / name).write_bytes(content)
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["build-searchqa", "--questions", str(tmp_path / name), "--num_rows", "2", "--output_dir",
            str(tmp_path / "out")]  # fmt: skip
    line = refusal(argv, capsys)
    assert re.search(pattern, line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written: no folder, staging or lock
