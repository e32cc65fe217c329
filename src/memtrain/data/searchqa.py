"""Search-QA rows for MEM1-style training: questions from several QA sets asked together (PAPER.md section 6).

MEM1 trains on pairs of NQ + HotpotQA questions asked in one episode; each row holds ``questions`` (one per source),
``answers`` (one list of accepted strings per question), ``prompt`` (the numbered questions) and an empty
``context`` (the agent reads through its search tool). Single-question rows (``num_questions: 1``) are evaluation rows.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memtrain.agent.search_agent import format_questions


@dataclass(frozen=True)
class QAPair:
    id: str
    question: str
    answers: tuple[str, ...]
    source: str


def _answers_of(row: Mapping[str, Any], where: str) -> tuple[str, ...]:
    for key in ("golden_answers", "answers", "answer"):
        value = row.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            value = [value]
        if isinstance(value, Mapping):  # e.g. TriviaQA's {"value": ..., "aliases": [...]}
            value = [value.get("value", ""), *value.get("aliases", [])]
        answers = tuple(str(a).strip() for a in value if str(a).strip())
        aliases = row.get("answer_aliases") or []
        answers += tuple(a for a in aliases if a not in answers)
        if answers:
            return answers
    raise ValueError(f"{where} has no answer: expected `golden_answers`, `answers` or `answer` (keys: {sorted(row)}).")


def parse_qa_rows(rows: Iterable[Mapping[str, Any]], source: str) -> list[QAPair]:
    """QA rows in FlashRAG (``question, golden_answers``), HotpotQA/MuSiQue (``question, answer``) or plain layouts."""
    pairs = []
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where} has no `question` text (keys: {sorted(row)}).")
        pairs.append(QAPair(str(row.get("id", row.get("_id", i))), question.strip(), _answers_of(row, where), source))
    return pairs


def load_qa_pairs(path: str | Path, name: str | None = None, limit: int | None = None) -> list[QAPair]:
    """Questions from a local .json (list) or .jsonl file; ``name`` labels their source (default: the file stem)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"QA file {path} does not exist.")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise ValueError(f"{path} must hold a JSON list of question rows (or use .jsonl).")
    return parse_qa_rows(rows[:limit] if limit else rows, name or path.stem)


def build_multi_question_rows(sources: Sequence[Sequence[QAPair]], num_rows: int, seed: int = 0) -> list[dict]:
    """``num_rows`` rows, each asking one question of every source (MEM1: NQ + HotpotQA), drawn without repeats."""
    if not sources or any(not source for source in sources):
        raise ValueError("Every question source must hold at least one question.")
    most = min(len(source) for source in sources)
    if num_rows > most:
        raise ValueError(f"{num_rows} rows need {num_rows} questions per source, but the smallest source has {most}.")
    rng = random.Random(seed)
    picks = [rng.sample(range(len(source)), num_rows) for source in sources]
    rows = []
    for r in range(num_rows):
        pairs = [source[picks[s][r]] for s, source in enumerate(sources)]
        questions = [p.question for p in pairs]
        rows.append(
            {
                "id": "+".join(p.id for p in pairs),
                "prompt": format_questions(questions),
                "questions": questions,
                "answers": [list(p.answers) for p in pairs],
                "context": "",
                "sources": [p.source for p in pairs],
            }
        )
    return rows


def write_rows(rows: list[dict], output_dir: str | Path) -> Path:
    """Save rows as a ``save_to_disk`` folder, atomically (a half-written build never looks complete)."""
    from datasets import Dataset

    from memtrain.data.output import atomic_output_dir

    with atomic_output_dir(output_dir) as staging:
        Dataset.from_list(rows).save_to_disk(str(staging))
    return Path(output_dir)


def main(argv: list[str] | None = None) -> Path:
    """`python scripts/build_searchqa.py --questions nq.jsonl hotpotqa.json --num_rows 512 --output_dir DIR`."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", nargs="+", required=True, help="One QA file per source (json list or jsonl).")
    parser.add_argument("--num_rows", type=int, required=True, help="Rows to build (one question per source each).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    from memtrain.preflight import check_writable

    check_writable(args.output_dir)  # before reading the question files
    sources = [load_qa_pairs(path) for path in args.questions]
    out = write_rows(build_multi_question_rows(sources, args.num_rows, args.seed), args.output_dir)
    print(f"wrote {args.num_rows} search-QA rows to {out}")
    return out
