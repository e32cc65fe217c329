"""Search-QA rows for MEM1-style training: questions from several QA sets asked together (PAPER.md section 6).

MEM1 trains on pairs of NQ + HotpotQA questions asked in one episode; each row holds ``questions`` (one per source),
``answers`` (one list of accepted strings per question), ``prompt`` (the numbered questions) and an empty
``context`` (the agent reads through its search tool). Single-question rows (``num_questions: 1``) are evaluation rows.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
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
    from memtrain.preflight import read_utf8_text

    text = read_utf8_text(path, "QA file")
    fix = "give question rows as a .json list or .jsonl lines"
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"QA file {path} line {number} is not valid JSON ({error}); {fix}.") from None
    else:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"QA file {path} is not valid JSON ({error}); {fix}.") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path} must hold a JSON list of question rows (or use .jsonl).")
    if not rows:
        raise ValueError(f"QA file {path} holds no question rows; give a file with rows.")
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


@dataclass
class SearchQABuildArguments:
    """A search-QA build (``python scripts/build_searchqa.py [recipe.yaml] --key value ...``)."""

    questions: list[str] | None = field(
        default=None, metadata={"help": "One QA file per source (.json list or .jsonl), e.g. nq.jsonl hotpotqa.json."}
    )
    num_rows: int | None = field(default=None, metadata={"help": "Rows to build (one question per source each)."})
    seed: int = field(default=0, metadata={"help": "Seeds which questions are drawn and paired."})
    output_dir: str = field(default="outputs/data/searchqa", metadata={"help": "Output folder."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing output folder."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the parquet data and card to the Hub."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Hub dataset repo, e.g. you/searchqa."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})

    def __post_init__(self) -> None:
        if not self.questions:
            raise ValueError("Give the question files: --questions nq.jsonl hotpotqa.json (one file per source).")
        if self.num_rows is None or self.num_rows < 1:
            raise ValueError(f"num_rows must be a positive number of rows, got {self.num_rows}; pass --num_rows N.")
        if self.push_to_hub and not self.hub_dataset_id:
            raise ValueError("push_to_hub needs hub_dataset_id (e.g. --hub_dataset_id you/searchqa).")


DATASET_CARD = """---
license: other
task_categories:
- question-answering
tags:
- memtrain
- search-agent
configs:
- config_name: default
  data_files:
{data_files}
---

# Search-QA rows (MEM1 style)

Each row asks one question of every source together, for a search agent with a constant-size internal state
(MEM1; built with memtrain's `scripts/build_searchqa.py`). Columns: `prompt` (the numbered questions), `questions`,
`answers` (one list of accepted strings per question), `context` (empty: the agent reads through its search tool),
`sources`, `id`.

Sources: {sources}. Rows: {rows}. Seed {seed}.

Licences follow the question sources (e.g. Natural Questions: CC BY-SA 3.0; HotpotQA: CC BY-SA 4.0).
"""


def write_rows(rows: list[dict], args: SearchQABuildArguments) -> Path:
    """Write rows like every builder (``dataset/``, parquet, card, stats; atomically) and push them if asked."""
    from datasets import Dataset

    from memtrain.data.output import data_files_yaml, write_built_dataset

    card = DATASET_CARD.format(
        data_files=data_files_yaml(["train"]), sources=", ".join(args.questions or []), rows=len(rows), seed=args.seed
    )
    stats = {"rows": len(rows), "arguments": asdict(args)}
    return write_built_dataset(
        Dataset.from_list(rows), args.output_dir, card=card, stats=stats, overwrite=args.overwrite_output_dir,
        push_to=args.hub_dataset_id if args.push_to_hub else None, private=args.hub_private,
        commit_message=f"Search-QA: {len(rows)} rows",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> Path:
    """``python scripts/build_searchqa.py --questions nq.jsonl hotpotqa.json --num_rows 512 --output_dir DIR``."""
    import logging
    import sys

    from memtrain.configs import parse_recipe_args
    from memtrain.data.output import check_before_build, release_build_claim

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (args,) = parse_recipe_args(list(sys.argv[1:] if argv is None else argv), (SearchQABuildArguments,))
    check_before_build(
        args.output_dir, overwrite=args.overwrite_output_dir, push_to_hub=args.push_to_hub,
        hub_dataset_id=args.hub_dataset_id,
    )  # fmt: skip  # before reading the question files
    try:
        sources = [load_qa_pairs(path) for path in args.questions]
        out = write_rows(build_multi_question_rows(sources, args.num_rows, args.seed), args)
    finally:
        release_build_claim(args.output_dir)  # a failed build gives its folder up at once
    print(f"wrote {args.num_rows} search-QA rows to {out}")
    return out
