"""A long evaluation shows its progress and resumes from the rows already scored; other settings never mix."""

from __future__ import annotations

import json

import pytest

from memtrain.evaluation import EvalConfig, evaluate
from memtrain.evaluation.harness import SCORED_ROWS, ResumeError


ROWS = [
    {"id": f"r{i}", "prompt": "Who met Bob?", "context": f"Ann met Bob in Oslo in {1990 + i}. " * 10,
     "answers": ["Ann"], "num_docs": 2}
    for i in range(3)
]  # fmt: skip
CONFIG = EvalConfig(chunk_size=48, max_chunks=2, max_memory_tokens=4, max_answer_tokens=3, batch_size=1,
                    temperature=1.0, seed=5, num_trajectory_pages=0)  # fmt: skip


@pytest.fixture
def generator(tokenizer):
    """The real tiny model; counts the prompts it is sent (a resumed run must not redo scored rows)."""
    from conftest import build_tiny_model

    from memtrain.agent.generation import TransformersGenerator

    class Counting(TransformersGenerator):
        prompts = 0

        def generate(self, prompt_ids, n=1, sampling=None):
            self.prompts += len(prompt_ids)
            return super().generate(prompt_ids, n=n, sampling=sampling)

    return Counting(build_tiny_model(tokenizer, seed=0), tokenizer)


def prepare(rows):
    from memtrain.evaluation.data import prepare_rows

    return prepare_rows(rows, CONFIG)


def replies(results):
    return [p["replies"] for p in results["runs"][0]["predictions"]]


def test_a_killed_evaluation_resumes_from_its_scored_rows(tmp_path, tokenizer, generator, capsys):
    full = evaluate(ROWS, tokenizer, generator, CONFIG, tmp_path / "full", label="tiny")
    err = capsys.readouterr().err
    assert "tiny/agent: 1/3 rows (33%)" in err and "3/3 rows (100%)" in err and "ETA" in err
    # a line before each batch too, so a long first batch is not silent
    assert err.index("tiny/agent: batch 1/3: scoring 1 row(s)...") < err.index("tiny/agent: 1/3 rows (33%)")
    per_row = generator.prompts / 3
    # batch by batch, numbered as one pass over the rows: the same samples as the runner's single pass
    from memtrain.evaluation import Evaluator

    one_pass = Evaluator(tokenizer, generator, CONFIG).run(prepare(ROWS), "agent")
    assert replies(full) == one_pass.replies
    generator.prompts = per_row * 3

    # a kill after the first row, in the middle of writing the second
    lines = (tmp_path / "full" / SCORED_ROWS).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / SCORED_ROWS).write_text(lines[0] + "\n" + lines[1][:40], encoding="utf-8")
    generator.prompts = 0
    resumed = evaluate(ROWS, tokenizer, generator, CONFIG, tmp_path / "killed", label="tiny")
    assert "resuming: 1/3 rows already scored" in capsys.readouterr().err
    assert generator.prompts == 2 * per_row  # only the two rows not scored yet were run
    assert replies(resumed) == replies(full)  # seeded per batch: the same samples as the uninterrupted run
    assert resumed["runs"][0]["metrics"] == full["runs"][0]["metrics"]

    # all scored: a rerun only rewrites the reports
    generator.prompts = 0
    evaluate(ROWS, tokenizer, generator, CONFIG, tmp_path / "killed", label="tiny")
    assert generator.prompts == 0


def test_a_kill_inside_a_batch_reruns_that_batch_and_records_each_row_once(tmp_path, tokenizer, generator, capsys):
    """Batch size 2, killed between the two rows of the first batch: the batch runs again (it is not skipped
    because one of its rows was scored), each row is stored once and the progress never passes the total."""
    config = EvalConfig(**{**CONFIG.__dict__, "batch_size": 2})
    full = evaluate(ROWS, tokenizer, generator, config, tmp_path / "full", label="tiny")
    lines = (tmp_path / "full" / SCORED_ROWS).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["index"] for line in lines] == [0, 1, 2]
    (tmp_path / "killed").mkdir()
    (tmp_path / "killed" / SCORED_ROWS).write_text(lines[0] + "\n", encoding="utf-8")  # row 0 of batch [0, 1]
    capsys.readouterr()
    generator.prompts = 0
    resumed = evaluate(ROWS, tokenizer, generator, config, tmp_path / "killed", label="tiny")
    assert generator.prompts > 0
    assert replies(resumed) == replies(full)
    assert resumed["runs"][0]["metrics"] == full["runs"][0]["metrics"]
    records = [json.loads(line) for line in (tmp_path / "killed" / SCORED_ROWS).read_text().splitlines()]
    assert sorted(r["index"] for r in records) == [0, 1, 2]  # row 0 not written twice
    err = capsys.readouterr().err
    assert "resuming: 1/3 rows already scored" in err
    assert "2/3 rows (67%)" in err and "3/3 rows (100%)" in err and "4/3" not in err
    assert "batch 1/2: scoring 1 row(s)..." in err  # the batch reruns for its one unscored row


def test_other_settings_are_refused_unless_overwrite(tmp_path, tokenizer, generator):
    evaluate(ROWS[:1], tokenizer, generator, CONFIG, tmp_path, label="tiny")
    other = EvalConfig(**{**CONFIG.__dict__, "temperature": 0.5, "modes": ("agent",)})
    with pytest.raises(ResumeError, match=r"scored_rows.jsonl holds 1 rows of 'tiny' .* \(changed: temperature\)"):
        evaluate(ROWS[:1], tokenizer, generator, other, tmp_path, label="tiny")
    # another model into the same folder is not a conflict
    evaluate(ROWS[:1], tokenizer, generator, other, tmp_path, label="other")
    results = evaluate(ROWS[:1], tokenizer, generator, other, tmp_path, label="tiny", overwrite=True)
    assert results["runs"][-1]["settings"]["temperature"] == 0.5
    records = [json.loads(line) for line in (tmp_path / SCORED_ROWS).read_text().splitlines()]
    assert sorted((r["label"], r["settings"]["temperature"]) for r in records) == [("other", 0.5), ("tiny", 0.5)]


def test_the_cli_refuses_mixed_settings_before_loading_the_model(tmp_path, capsys):
    from memtrain.cli import main

    dataset = tmp_path / "rows.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    record = {"label": "/no/model", "mode": "agent", "task": "longqa", "fingerprint": "0", "settings": {"seed": 1},
              "index": 0, "id": "r0", "replies": ["x"], "scores": [{"em": 0.0}], "seconds": 0.1}  # fmt: skip
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / SCORED_ROWS).write_text(json.dumps(record) + "\n", encoding="utf-8")
    argv = ["eval", "--model", "/no/model", "--dataset", str(dataset), "--output_dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "memtrain eval: error: " in err and "scored_rows.jsonl holds 1 rows" in err and "seed" in err
    assert "--overwrite true" in err
    assert len(err.strip().splitlines()) == 1
