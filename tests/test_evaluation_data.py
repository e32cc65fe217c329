"""`memtrain eval --dataset`: Hub-style loading (config / split) from a local folder, column mapping, and
multi-question long-document rows read once (or expanded to rows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memtrain.evaluation import EvalConfig, Evaluator, load_rows
from memtrain.evaluation.data import expand_questions, map_columns, prepare_rows, select_rows


CONTEXT = "The Rhone flows through Lyon. Ann met Bob in Oslo in 1990. " * 12


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def hub_folder(tmp_path):
    """A dataset laid out as a Hub repository: two configs declared in the card, a test split each."""
    root = tmp_path / "hub_ds"
    long_rows = [{"question": f"Who met Bob? ({i})", "document": CONTEXT, "gold": ["Ann"], "n": 8} for i in range(3)]
    write_jsonl(root / "long" / "test.jsonl", long_rows)
    write_jsonl(root / "long" / "validation.jsonl", long_rows[:1])
    write_jsonl(root / "short" / "test.jsonl", [{"question": "q", "document": "d", "gold": ["a"], "n": 1}])
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: long\n  data_files:\n  - split: test\n    path: long/test.jsonl\n"
        "  - split: validation\n    path: long/validation.jsonl\n- config_name: short\n  data_files:\n"
        "  - split: test\n    path: short/test.jsonl\n---\n# test dataset\n",
        encoding="utf-8",
    )
    return root


def test_hub_style_folder_with_config_split_and_columns(hub_folder):
    rows = load_rows(hub_folder, "long", "test")
    assert len(rows) == 3 and rows[0]["question"] == "Who met Bob? (0)"
    assert len(load_rows(hub_folder, "long", "validation")) == 1
    assert len(load_rows(hub_folder, "long")) == 4  # no split: every split but train
    assert load_rows(hub_folder, "short", "test")[0]["document"] == "d"
    with pytest.raises(ValueError, match=r"no split 'dev'; pass --dataset_split one of \['test', 'validation'\]"):
        load_rows(hub_folder, "long", "dev")
    mapped = map_columns(rows, "hub_ds", prompt="question", context="document", answers="gold")
    assert mapped[0]["prompt"] == "Who met Bob? (0)" and mapped[0]["context"] == CONTEXT
    assert mapped[0]["answers"] == ["Ann"] and "question" not in mapped[0]
    with pytest.raises(ValueError, match=r"no column 'query' \(--prompt_column\); its columns: \["):
        map_columns(rows, "hub_ds", prompt="query")


def test_a_dataset_that_is_nowhere_is_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_rows(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="loading it as a Hub dataset failed"):
        load_rows("nobody-here/no-such-dataset-xyz")  # HF_HUB_OFFLINE: the Hub is not asked


def test_parquet_and_csv_files_load_through_load_dataset(tmp_path):
    import datasets

    rows = [{"prompt": "q", "context": "c", "answers": ["a"]}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "r.parquet"))
    assert load_rows(tmp_path / "r.parquet") == rows
    (tmp_path / "r.csv").write_text("prompt,context,gold\nq,c,a\n", encoding="utf-8")
    assert load_rows(tmp_path / "r.csv") == [{"prompt": "q", "context": "c", "gold": "a"}]


MULTI = [
    {"id": "doc", "context": CONTEXT, "questions": ["Who met Bob?", "Which river flows through Lyon?"],
     "answers": [["Ann"], ["Rhone", "The Rhone"]], "num_docs": 4},
    {"id": "single", "context": CONTEXT, "questions": "Where did Ann meet Bob?", "answers": ["Oslo"], "num_docs": 4},
]  # fmt: skip


def test_multi_question_rows_become_one_row_per_question():
    rows = map_columns(MULTI, "x", prompt="questions")
    expanded = expand_questions(rows, "longqa")
    assert [(r["id"], r["prompt"], r["answers"]) for r in expanded] == [
        ("doc/q0", "Who met Bob?", ["Ann"]),
        ("doc/q1", "Which river flows through Lyon?", ["Rhone", "The Rhone"]),
        ("single", "Where did Ann meet Bob?", ["Oslo"]),
    ]
    assert [r.get("read_group") for r in expanded] == ["doc", "doc", None]
    # --limit counts documents, so selecting before or after the expansion keeps the same rows
    assert select_rows(expanded, "num_docs", 1) == expanded[:2]
    config = EvalConfig(limit=1)
    assert prepare_rows(rows, config) == prepare_rows(prepare_rows(rows, config), config) == expanded[:2]
    # MEM1's search agent answers a row's questions together: one newline-joined prompt
    (search,) = expand_questions(rows[:1], "search")
    assert search["prompt"] == "Who met Bob?\nWhich river flows through Lyon?" and len(search["answers"]) == 2
    with pytest.raises(ValueError, match=r"row 0: 2 questions need `answers` as one list of accepted answers"):
        expand_questions([{**rows[0], "answers": ["Ann"]}], "longqa")
    with pytest.raises(ValueError, match=r"or one answer string per question, got \[\['Ann'\], 'Rhone'\]"):
        expand_questions([{**rows[0], "answers": [["Ann"], "Rhone"]}], "longqa")


def test_l_eval_layout_one_answer_string_per_question_is_accepted():
    """L-Eval rows: `input` (the document), `instructions` (its questions), `outputs` (one answer string each)."""
    row = {"id": "doc", "input": "Ann met Bob in Oslo. The Rhone flows through Lyon.",
           "instructions": ["Who met Bob?", "Which river flows through Lyon?"], "outputs": ["Ann", "The Rhone"]}  # fmt: skip
    rows = map_columns([row], "leval.jsonl", prompt="instructions", context="input", answers="outputs")
    expanded = expand_questions(rows, "longqa")
    assert [(r["id"], r["prompt"], r["answers"], r["context"]) for r in expanded] == [
        ("doc/q0", "Who met Bob?", ["Ann"], row["input"]),
        ("doc/q1", "Which river flows through Lyon?", ["The Rhone"], row["input"]),
    ]
    (search,) = expand_questions(rows, "search")
    assert search["answers"] == [["Ann"], ["The Rhone"]]


@pytest.fixture
def generator(tokenizer):
    from conftest import build_tiny_model

    from memtrain.agent.generation import TransformersGenerator

    return TransformersGenerator(build_tiny_model(tokenizer, seed=0), tokenizer)


SMALL = dict(chunk_size=64, max_chunks=3, max_memory_tokens=5, max_answer_tokens=4)


def test_read_once_reads_a_document_once_for_all_its_questions(tokenizer, generator):
    rows = prepare_rows(map_columns(MULTI, "x", prompt="questions"), EvalConfig())
    # sampled (temperature 1): a reply taken from the wrong call would differ from the per-question answers
    config = EvalConfig(**SMALL, multi_question="read_once", temperature=1.0, seed=2)
    output = Evaluator(tokenizer, generator, config).run(rows, "agent")
    (read,) = output.trajectories[0]  # one read for both questions of "doc"
    assert output.trajectories[1] == []
    assert "Who met Bob?" in read.problem and "Which river flows through Lyon?" in read.problem
    assert [c.kind for c in read.calls] == ["update"] * 3 + ["final"]
    # each question answered from the read's final memory, with its own final prompt
    assert [output.replies[0][0], output.replies[1][0]] == read.metadata["question_answers"]
    (single,) = output.trajectories[2]
    assert single.problem == "Where did Ann meet Bob?" and output.replies[2] == [single.answer]

    expanded = Evaluator(tokenizer, generator, EvalConfig(**SMALL)).run(rows, "agent")  # the default: expand
    assert [len(group) for group in expanded.trajectories] == [1, 1, 1]
    assert [group[0].problem for group in expanded.trajectories] == [r["prompt"] for r in rows]


def test_eval_cli_on_a_hub_folder_and_on_a_multi_question_file(tmp_path, tokenizer, hub_folder, capsys):
    from conftest import save_tiny_checkpoint

    from memtrain.cli import main

    model = save_tiny_checkpoint(tokenizer, tmp_path / "tiny")
    small = ["--chunk_size", "64", "--max_chunks", "2", "--max_memory_tokens", "4", "--max_answer_tokens", "3",
             "--num_trajectory_pages", "1"]  # fmt: skip
    argv = ["eval", "--model", str(model), "--dataset", str(hub_folder), "--dataset_config", "long", "--dataset_split",
            "test", "--prompt_column", "question", "--context_column", "document", "--answers_column", "gold",
            "--bucket_column", "n", "--output_dir", str(tmp_path / "hub_out"), *small]  # fmt: skip
    assert main(argv) == 0
    (run,) = json.loads((tmp_path / "hub_out" / "results.json").read_text())["runs"]
    assert run["metrics"]["buckets"]["8"]["n"] == 3 and run["settings"]["dataset_config"] == "long"

    path = write_jsonl(tmp_path / "multi.jsonl", MULTI)
    for policy, reads in (("read_once", 2), ("expand", 3)):
        out = tmp_path / f"multi_{policy}"
        argv = ["eval", "--model", str(model), "--dataset", str(path), "--prompt_column", "questions",
                "--multi_question", policy, "--output_dir", str(out), *small, "--num_trajectory_pages", "5"]  # fmt: skip
        assert main(argv) == 0
        (run,) = json.loads((out / "results.json").read_text())["runs"]
        assert [p["id"] for p in run["predictions"]] == ["doc/q0", "doc/q1", "single"]
        assert run["metrics"]["buckets"]["4"]["n"] == 3 and run["settings"]["multi_question"] == policy
        assert len(run["trajectory_pages"]) == reads  # one page per read of a context
    # fewer pages than questions: each goes to another document (all came from document 0 under expand)
    out = tmp_path / "multi_expand_2"
    argv = ["eval", "--model", str(model), "--dataset", str(path), "--prompt_column", "questions",
            "--multi_question", "expand", "--output_dir", str(out), *small, "--num_trajectory_pages", "2"]  # fmt: skip
    assert main(argv) == 0
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert [Path(page).stem.rsplit("-", 1)[-1] for page in run["trajectory_pages"]] == ["doc_q0", "single"]
