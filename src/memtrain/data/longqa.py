"""Long-text QA data (MemAgent's RULER-HotpotQA, PAPER.md section 6).

Each multi-hop question keeps its own gold + distractor paragraphs and is padded with random paragraphs of OTHER
questions up to ``N`` documents, shuffled, and rendered as "Document i:" blocks, so the answer is buried at a random
depth of a text of controlled length. One training bucket (N = 200) and test buckets (N = 50 ... 6400) are built
from the same code path; the test buckets share the same questions so accuracy across lengths is comparable.

Inputs are HotpotQA distractor rows in either layout (the original/local files: ``context = [[title, [sentences]]]``;
the Hub's ``hotpot_qa``/``distractor``: ``context = {"title": [...], "sentences": [[...]]}``) and MuSiQue rows
(``paragraphs = [{title, paragraph_text, is_supporting}]``).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)

DEFAULT_TEST_BUCKETS: tuple[int, ...] = (50, 100, 200, 400, 800, 1600, 3200, 6400)
TRAIN_NUM_DOCS = 200


@dataclass(frozen=True)
class Paragraph:
    """One Wikipedia paragraph: the unit that becomes one "Document i:" block."""

    title: str
    text: str


@dataclass
class QAExample:
    """One question with its own paragraphs (gold first is not assumed) and the titles of its gold paragraphs."""

    id: str
    question: str
    answers: list[str]
    paragraphs: list[Paragraph]
    gold_titles: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------------
# Reading question rows
# ---------------------------------------------------------------------------------------------------------------------


def _paragraphs_from_context(context: Any, where: str) -> list[Paragraph]:
    """HotpotQA ``context`` in the list layout (local files) or the column layout (the Hub's datasets)."""
    if isinstance(context, Mapping):
        if "title" not in context or "sentences" not in context:
            raise ValueError(f"{where}: a dict `context` needs keys 'title' and 'sentences' (the Hub's hotpot_qa).")
        pairs = list(zip(context["title"], context["sentences"], strict=True))
    elif isinstance(context, Sequence) and not isinstance(context, str):
        pairs = []
        for item in context:
            if not (isinstance(item, Sequence) and len(item) == 2):
                raise ValueError(f"{where}: each `context` item must be [title, [sentences]], got {str(item)[:80]!r}.")
            pairs.append((item[0], item[1]))
    else:
        raise ValueError(f"{where}: `context` must be [[title, [sentences]]] or {{title: [...], sentences: [...]}}.")
    paragraphs = []
    for title, sentences in pairs:
        text = sentences if isinstance(sentences, str) else "".join(sentences)
        paragraphs.append(Paragraph(str(title).strip(), text.strip()))
    return paragraphs


def _gold_titles_from_supporting_facts(facts: Any, where: str) -> list[str]:
    if isinstance(facts, Mapping):  # Hub layout: {"title": [...], "sent_id": [...]}
        titles = list(facts.get("title", []))
    else:
        titles = [fact[0] for fact in facts]
    return list(dict.fromkeys(str(t).strip() for t in titles))


def _answers(row: Mapping[str, Any], where: str) -> list[str]:
    answer = row.get("answer")
    if answer is None and "answers" in row:
        answers = list(row["answers"])
    elif answer is None:
        raise ValueError(f"{where}: no `answer` (or `answers`) field; the long-text QA builder needs gold answers.")
    else:
        answers = [answer] if isinstance(answer, str) else list(answer)
    for key in ("answer_aliases", "aliases"):
        answers += list(row.get(key) or [])
    answers = [str(a).strip() for a in answers if str(a).strip()]
    if not answers:
        raise ValueError(f"{where}: the answer is empty.")
    return list(dict.fromkeys(answers))


def parse_example(row: Mapping[str, Any], index: int = 0, source: str = "<rows>") -> QAExample:
    """Normalise one HotpotQA (either layout) or MuSiQue row; ``source``/``index`` name the row in errors."""
    where = f"{source} row {index}"
    if "question" not in row:
        raise ValueError(f"{where}: no `question` field (keys: {sorted(row)}). Expected HotpotQA or MuSiQue rows.")
    qid = str(row.get("_id", row.get("id", index)))
    if "context" in row:
        paragraphs = _paragraphs_from_context(row["context"], where)
        if "supporting_facts" not in row:
            raise ValueError(f"{where}: HotpotQA rows need `supporting_facts` to know the gold paragraphs.")
        gold = _gold_titles_from_supporting_facts(row["supporting_facts"], where)
        metadata = {key: row[key] for key in ("type", "level") if key in row}
    elif "paragraphs" in row:  # MuSiQue
        paragraphs, gold = [], []
        for p in row["paragraphs"]:
            paragraphs.append(Paragraph(str(p["title"]).strip(), str(p["paragraph_text"]).strip()))
            if p.get("is_supporting"):
                gold.append(paragraphs[-1].title)
        gold = list(dict.fromkeys(gold))
        metadata = {}
    else:
        raise ValueError(f"{where}: no `context` (HotpotQA) or `paragraphs` (MuSiQue) field.")
    titles = {p.title for p in paragraphs}
    missing = [t for t in gold if t not in titles]
    if missing:
        raise ValueError(f"{where}: gold titles {missing} are not among the row's paragraphs.")
    return QAExample(qid, str(row["question"]).strip(), _answers(row, where), paragraphs, gold, metadata)


def load_examples(
    source: str | Path, split: str = "train", config: str | None = "distractor", limit: int | None = None
) -> list[QAExample]:
    """Questions from a local ``.json``/``.jsonl`` file or a Hub dataset id (``hotpot_qa`` with ``config``)."""
    path = Path(source)
    if path.is_file():
        from memtrain.preflight import read_utf8_text

        text = read_utf8_text(path, "Question file")
        try:
            if path.suffix == ".jsonl":
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                rows = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"Question file {path} is not valid {path.suffix[1:] or 'JSON'} ({error}); give HotpotQA rows as a "
                ".json list or .jsonl lines."
            ) from None
        if path.suffix != ".jsonl":
            if isinstance(rows, Mapping):
                rows = rows.get("data", rows.get(split))
            if not isinstance(rows, list):
                raise ValueError(f"{path}: expected a JSON list of question rows (or jsonl).")
        name = str(path)
    elif path.suffix in {".json", ".jsonl"} or path.is_dir():
        raise FileNotFoundError(f"{path} is not a question file (give a .json/.jsonl file or a Hub dataset id).")
    else:
        import datasets

        try:
            rows = datasets.load_dataset(str(source), config, split=split)
        except (ConnectionError, OSError, ValueError) as error:  # offline, unknown id, config or split
            offline = os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in ("1", "true", "yes")
            raise ValueError(
                f"Could not load the questions {source!r} (config={config!r}, split={split!r}): "
                f"{str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}. Check the id, "
                "config and split"
                + ("; HF_DATASETS_OFFLINE=1 reads only datasets already in the cache" if offline else "")
                + "; or give a local .json/.jsonl file."
            ) from None
        name = f"{source}:{config}:{split}"
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows)))) if hasattr(rows, "select") else rows[:limit]
    return [parse_example(row, i, name) for i, row in enumerate(rows)]


# ---------------------------------------------------------------------------------------------------------------------
# Padding and rendering
# ---------------------------------------------------------------------------------------------------------------------


class ParagraphPool:
    """Every distinct paragraph (by title) of a set of questions: where the padding paragraphs are drawn from."""

    def __init__(self, paragraphs: Iterable[Paragraph]):
        seen: dict[str, Paragraph] = {}
        for paragraph in paragraphs:
            seen.setdefault(paragraph.title, paragraph)
        self.paragraphs = list(seen.values())
        self._position = {p.title: i for i, p in enumerate(self.paragraphs)}

    @classmethod
    def from_examples(cls, examples: Iterable[QAExample]) -> ParagraphPool:
        return cls(p for example in examples for p in example.paragraphs)

    def __len__(self) -> int:
        return len(self.paragraphs)

    def available_for(self, example: QAExample) -> int:
        """How many pool paragraphs may pad ``example`` (its own titles are excluded)."""
        return len(self.paragraphs) - len({p.title for p in example.paragraphs if p.title in self._position})

    def sample(self, count: int, exclude_titles: set[str], rng: random.Random) -> list[Paragraph]:
        """``count`` distinct paragraphs whose titles are not in ``exclude_titles``.

        Draws ``count`` + (excluded titles present) indices and drops the excluded ones: O(count), not O(pool), so
        padding 90k training questions from a 900k-paragraph pool stays fast.
        """
        excluded = {self._position[t] for t in exclude_titles if t in self._position}
        if count > len(self.paragraphs) - len(excluded):
            raise ValueError(
                f"the paragraph pool has {len(self.paragraphs) - len(excluded)} usable paragraphs, {count} requested."
            )
        drawn = rng.sample(range(len(self.paragraphs)), min(len(self.paragraphs), count + len(excluded)))
        return [self.paragraphs[i] for i in drawn if i not in excluded][:count]


def render_documents(paragraphs: Sequence[Paragraph]) -> str:
    """The MemTrain document layout: "Document i:\\n<title>\\n<text>" blocks joined by blank lines (1-based)."""
    return "\n\n".join(f"Document {i}:\n{p.title}\n{p.text}" for i, p in enumerate(paragraphs, start=1))


def build_row(
    example: QAExample, num_docs: int, pool: ParagraphPool, seed: int, strict: bool = True
) -> dict[str, Any]:
    """One long-text QA row: the question's paragraphs + random pool paragraphs = ``num_docs``, shuffled.

    The shuffle and the padding depend only on (seed, question id, num_docs), so a row does not change when other
    questions are added or reordered. With ``strict=False`` a pool too small is a warning and ``num_docs`` is capped.
    """
    own = {p.title for p in example.paragraphs}
    need = num_docs - len(example.paragraphs)
    if need < 0:
        raise ValueError(
            f"question {example.id} already has {len(example.paragraphs)} paragraphs, more than num_docs={num_docs}; "
            "use a larger number of documents."
        )
    available = pool.available_for(example)
    if need > available:
        message = (
            f"question {example.id}: num_docs={num_docs} needs {need} padding paragraphs but the pool has only "
            f"{available} (from {len(pool)} paragraphs); add more question rows (e.g. the full hotpot_qa split) "
            "or lower the bucket size."
        )
        if strict:
            raise ValueError(message)
        logger.warning(message + " Capping the document count.")
        need = available
    rng = random.Random(f"longqa:{seed}:{example.id}:{num_docs}")
    documents = list(example.paragraphs) + pool.sample(need, own, rng)
    rng.shuffle(documents)
    gold = set(example.gold_titles)
    gold_positions = [i for i, p in enumerate(documents, start=1) if p.title in gold]
    return {
        "id": f"{example.id}-n{num_docs}",
        "question_id": example.id,
        "prompt": example.question,
        "context": render_documents(documents),
        "answers": list(example.answers),
        "num_docs": len(documents),
        "gold_titles": list(example.gold_titles),
        "gold_positions": gold_positions,
    }


def build_bucket(
    examples: Sequence[QAExample],
    num_docs: int,
    seed: int = 0,
    pool: ParagraphPool | None = None,
    strict: bool = True,
) -> list[dict[str, Any]]:
    """Rows for every example at one document count; the pool defaults to all the examples' paragraphs."""
    pool = pool if pool is not None else ParagraphPool.from_examples(examples)
    return [build_row(example, num_docs, pool, seed, strict) for example in examples]


def select_questions(examples: Sequence[QAExample], count: int | None, seed: int) -> list[QAExample]:
    """A seeded random subset (order kept) of ``count`` questions; all when ``count`` is None or too large."""
    if count is None or count >= len(examples):
        return list(examples)
    keep = sorted(random.Random(f"longqa-select:{seed}").sample(range(len(examples)), count))
    return [examples[i] for i in keep]


def build_test_buckets(
    examples: Sequence[QAExample],
    buckets: Sequence[int] = DEFAULT_TEST_BUCKETS,
    num_questions: int | None = 128,
    seed: int = 0,
    pool_examples: Sequence[QAExample] | None = None,
    strict: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """``{"test_n50": rows, ...}``: the SAME questions at every length, padded from ``pool_examples`` (default: all)."""
    pool = ParagraphPool.from_examples(pool_examples if pool_examples is not None else examples)
    questions = select_questions(examples, num_questions, seed)
    return {f"test_n{n}": build_bucket(questions, n, seed, pool, strict) for n in buckets}


# ---------------------------------------------------------------------------------------------------------------------
# Closed-book filtering
# ---------------------------------------------------------------------------------------------------------------------


def answered_without_context(completion: str, answers: Sequence[str]) -> bool:
    """Whether a closed-book reply already gives a gold answer (MemAgent's metric: normalised substring match).

    The answer is the last ``\\boxed{}`` when present, else the lenient extraction (an ``<answer>`` tag, an
    "answer:" line, or the first line), so a model that never boxes does not escape the filter by formatting, while
    a short gold such as "no" is not matched against a whole rambling reply.
    """
    from memtrain.metrics import extract_answer, substring_match

    prediction = extract_answer(completion, mode="lenient")
    return bool(substring_match(prediction, list(answers)))


def closed_book_prompt_ids(tokenizer: Any, question: str, templates: Any = None) -> list[int]:
    """The memory agent's final prompt with "No previous memory": exactly what the agent sees with nothing read."""
    from memtrain.agent.prompts import NO_MEMORY, PromptTemplates, encode_chat

    templates = templates if templates is not None else PromptTemplates()
    return encode_chat(tokenizer, templates.render_final(question, NO_MEMORY))


def filter_no_context(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    generator: Any,
    sampling: Any = None,
    batch_size: int = 32,
    templates: Any = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split rows into (kept, dropped): dropped = the model answers correctly without reading the context.

    One generator call per batch of prompts. Each dropped row carries the closed-book reply under
    ``closed_book_completion`` so the decision can be audited.
    """
    from memtrain.agent.generation import SamplingConfig

    sampling = sampling if sampling is not None else SamplingConfig(max_new_tokens=64, do_sample=False)
    kept: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    for start in range(0, len(rows), batch_size):
        batch = [dict(row) for row in rows[start : start + batch_size]]
        prompts = [closed_book_prompt_ids(tokenizer, row["prompt"], templates) for row in batch]
        output = generator.generate(prompts, n=1, sampling=sampling)
        for row, ids in zip(batch, output.completion_ids, strict=True):
            completion = tokenizer.decode(ids, skip_special_tokens=True)
            if answered_without_context(completion, row["answers"]):
                dropped.append({**row, "closed_book_completion": completion})
            else:
                kept.append(row)
    return kept, dropped


def filter_examples_no_context(
    examples: Sequence[QAExample],
    tokenizer: Any,
    generator: Any,
    sampling: Any = None,
    batch_size: int = 32,
    templates: Any = None,
) -> tuple[list[QAExample], list[dict[str, Any]]]:
    """:func:`filter_no_context` on questions before any padding (the closed-book prompt has no context anyway)."""
    rows = [{"id": e.id, "prompt": e.question, "answers": e.answers} for e in examples]
    kept, dropped = filter_no_context(rows, tokenizer, generator, sampling, batch_size, templates)
    kept_ids = {row["id"] for row in kept}
    return [e for e in examples if e.id in kept_ids], dropped


# ---------------------------------------------------------------------------------------------------------------------
# The build entry point (scripts/build_longqa.py)
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LongQABuildArguments:
    """A long-text QA build: where the questions come from, the buckets, the optional closed-book filter, outputs."""

    train_source: str | None = field(
        default=None, metadata={"help": "Training questions: a HotpotQA/MuSiQue .json/.jsonl file or a Hub id."}
    )
    train_split: str = field(default="train", metadata={"help": "Hub split of the training questions."})
    test_source: str | None = field(
        default=None, metadata={"help": "Test questions (file or Hub id); the paper uses HotpotQA validation."}
    )
    test_split: str = field(default="validation", metadata={"help": "Hub split of the test questions."})
    hub_config: str | None = field(default="distractor", metadata={"help": "Hub dataset config (hotpot_qa)."})
    train_num_docs: int = field(default=TRAIN_NUM_DOCS, metadata={"help": "Documents per training row (paper: 200)."})
    max_train_questions: int | None = field(default=None, metadata={"help": "Keep a seeded subset of N questions."})
    test_buckets: list[int] = field(
        default_factory=lambda: list(DEFAULT_TEST_BUCKETS), metadata={"help": "Documents per test row, per bucket."}
    )
    num_test_questions: int | None = field(default=128, metadata={"help": "Questions per test bucket (paper: 128)."})
    strict: bool = field(default=True, metadata={"help": "Fail when the pool is too small (else warn and cap)."})
    seed: int = field(default=0, metadata={"help": "Seeds question selection, padding and shuffling."})
    filter_model: str | None = field(
        default=None, metadata={"help": "Drop questions this model answers closed-book (packaged name, dir, Hub id)."}
    )
    filter_max_new_tokens: int = field(default=64, metadata={"help": "Closed-book answer budget (greedy)."})
    filter_batch_size: int = field(default=16, metadata={"help": "Closed-book prompts per generator call."})
    output_dir: str = field(default="outputs/data/longqa", metadata={"help": "Output folder."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing output folder."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the parquet splits and card to the Hub."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Hub dataset repo, e.g. you/ruler-hotpotqa."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repo as private."})

    def __post_init__(self) -> None:
        if self.train_source is None and self.test_source is None:
            raise ValueError("Give train_source and/or test_source (a HotpotQA file or a Hub id such as hotpot_qa).")
        if self.push_to_hub and not self.hub_dataset_id:
            raise ValueError("push_to_hub needs hub_dataset_id (e.g. --hub_dataset_id you/ruler-hotpotqa).")
        bad = [n for n in self.test_buckets if not isinstance(n, int) or n < 1]
        if bad or self.train_num_docs < 1:
            raise ValueError(f"document counts must be positive integers, got {bad or [self.train_num_docs]}.")
        for name in ("num_test_questions", "max_train_questions", "filter_max_new_tokens", "filter_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}.")


DATASET_CARD = """---
license: cc-by-sa-4.0
task_categories:
- question-answering
configs:
- config_name: default
  data_files:
{data_files}
---

# Long-text QA (RULER-HotpotQA style)

Each row buries a multi-hop question's gold and distractor paragraphs among random paragraphs of other questions,
shuffled and rendered as "Document i:" blocks (MemAgent's RULER-HotpotQA recipe; built with memtrain's
`scripts/build_longqa.py`). Columns: `prompt` (the question), `context`, `answers`, `num_docs`, `gold_titles`,
`gold_positions` (1-based document numbers), `id`, `question_id`.

Sources: {sources}. Splits and rows: {splits}. Seed {seed}. Closed-book filter: {filter}.

Licences follow the sources: HotpotQA (Yang et al., 2018) is CC BY-SA 4.0, MuSiQue (Trivedi et al., 2022) CC BY
4.0; the paragraphs are Wikipedia text (CC BY-SA). The `license` field above assumes HotpotQA.
"""


def run_build_longqa(args: LongQABuildArguments) -> Path:
    """Load, optionally filter, pad and write every split; returns the output folder (written atomically).

    The folder holds ``dataset/`` (``DatasetDict.save_to_disk``: ``load_from_disk`` reads it), ``data/<split>-*.parquet``
    and the card ``README.md`` (what the Hub gets), and ``build_stats.json`` (counts, dropped question ids, arguments).
    """
    from datasets import Dataset, DatasetDict

    from memtrain.data.output import check_before_build, data_files_yaml, write_built_dataset

    # Checked before hours of loading / filtering / padding, not found at the end.
    output_dir = check_before_build(
        args.output_dir, overwrite=args.overwrite_output_dir, push_to_hub=args.push_to_hub,
        hub_dataset_id=args.hub_dataset_id,
    )  # fmt: skip
    sources = {}
    if args.train_source:
        sources["train"] = load_examples(args.train_source, args.train_split, args.hub_config)
    if args.test_source:
        sources["test"] = load_examples(args.test_source, args.test_split, args.hub_config)
    for name, examples in sources.items():  # 0 rows in every split, exit 0, was the result before
        if not examples:
            source = getattr(args, f"{name}_source")
            raise ValueError(f"--{name}_source {source} holds no questions; give a HotpotQA-style file with rows.")
    stats: dict[str, Any] = {"questions": {name: len(examples) for name, examples in sources.items()}}
    if args.filter_model:
        from memtrain.agent.generation import SamplingConfig, TransformersGenerator
        from memtrain.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(args.filter_model)
        generator = TransformersGenerator(model, tokenizer)
        sampling = SamplingConfig(max_new_tokens=args.filter_max_new_tokens, do_sample=False)
        for name, examples in sources.items():
            kept, dropped = filter_examples_no_context(
                examples, tokenizer, generator, sampling, batch_size=args.filter_batch_size
            )
            logger.info("%s: the closed-book filter dropped %d of %d questions", name, len(dropped), len(examples))
            stats.setdefault("closed_book_dropped", {})[name] = [row["id"] for row in dropped]
            sources[name] = kept
    splits: dict[str, list[dict[str, Any]]] = {}
    if "train" in sources:
        train = select_questions(sources["train"], args.max_train_questions, args.seed)
        pool = ParagraphPool.from_examples(sources["train"])
        splits["train"] = build_bucket(train, args.train_num_docs, args.seed, pool, args.strict)
    if "test" in sources:
        splits.update(
            build_test_buckets(
                sources["test"], args.test_buckets, args.num_test_questions, args.seed, None, args.strict
            )
        )
    stats["rows"] = {name: len(rows) for name, rows in splits.items()}
    stats["arguments"] = {key: getattr(args, key) for key in args.__dataclass_fields__}

    card = DATASET_CARD.format(
        data_files=data_files_yaml(splits),
        sources=", ".join(f"{k}: {v}" for k, v in (("train", args.train_source), ("test", args.test_source)) if v),
        splits=", ".join(f"{name} ({len(rows)})" for name, rows in splits.items()),
        seed=args.seed,
        filter=args.filter_model or "none",
    )
    return write_built_dataset(
        DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()}), output_dir, card=card,
        stats=stats, overwrite=args.overwrite_output_dir, push_to=args.hub_dataset_id if args.push_to_hub else None,
        private=args.hub_private, commit_message=f"Long-text QA: {stats['rows']}",
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> Path:
    """``python scripts/build_longqa.py recipes/data/longqa-hotpotqa-cpu.yaml [--key value ...]``."""
    import sys

    from memtrain.configs import parse_recipe_args

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    from memtrain.data.output import release_build_claim

    (args,) = parse_recipe_args(argv, (LongQABuildArguments,))
    try:
        return run_build_longqa(args)
    finally:
        release_build_claim(args.output_dir)  # a failed build gives its folder up at once
