"""Evaluation harness: run a model as a memory agent (or with the whole context) on QA rows and report the scores.

Tasks (PAPER.md section 6 and the MemTrain ablations):

- ``longqa``: RULER-HotpotQA rows; accuracy = MemAgent's sub-EM (a SQuAD-normalised gold inside the normalised
  answer), plus EM and F1, per length bucket (``num_docs``).
- ``memtrain``: held-out MemTrain documents; masked-entity accuracy of the final answer (strict: last ``\\boxed{}``;
  lenient extraction) and, for the memory agent, recall accuracy of probes on the intermediate memories, scored
  like the trainer's ``memory_recall`` reward.
- ``search``: the MEM1-style search agent over a retriever; EM (averaged over a row's questions) and F1.

Modes: ``agent`` (the memory agent reads chunk by chunk; the search agent for ``search``) and ``full_context``
(the whole context in one final-answer prompt, skipped for rows over ``--max_context_tokens``).

Outputs in ``--output_dir``: ``results.json`` (every run: metrics per bucket + average + settings), ``results.md``
(the paper's layout: rows = model/mode, columns = buckets, Avg), ``accuracy_vs_length.png`` and
``trajectories/*.html`` for the first K examples. Runs of other models already in ``results.json`` are kept, so
evaluating several models into one folder builds one comparison table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from memtrain.metrics import exact_match, extract_answer, f1_score, masked_entity_match, substring_match
from memtrain.rewards import recall_score


TASKS = ("longqa", "memtrain", "search")
MODES = ("agent", "full_context")
ALL_BUCKETS = "all"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT_PNG = "accuracy_vs_length.png"

# The headline metric of each task: the one in the Markdown table and the plot.
PRIMARY_METRIC = {"longqa": "accuracy", "memtrain": "masked_entity_strict", "search": "em"}


# ---------------------------------------------------------------------------------------------------------------------
# Scoring and aggregation (pure functions, unit-tested on hand-written strings)
# ---------------------------------------------------------------------------------------------------------------------


def score_prediction(task: str, text: str, answers: Sequence[str], extraction: str = "lenient") -> dict[str, float]:
    """Scores of one raw reply against a row's accepted answers, by task.

    ``longqa`` extracts the answer (``extraction``: ``strict`` = last ``\\boxed{}``, ``lenient`` = box, answer tag,
    "answer:" line or first line) then applies SQuAD-normalised sub-EM (= accuracy), EM and F1. ``memtrain`` applies
    the paper's masked-entity rule with strict and lenient extraction.
    """
    answers = list(answers)
    if task == "memtrain":
        return {
            "masked_entity_strict": float(masked_entity_match(text, answers)),
            "masked_entity_lenient": float(masked_entity_match(text, answers, lenient=True)),
            "masked_entity_f1": f1_score(extract_answer(text, "lenient"), answers),
        }
    if task in ("longqa", "search"):
        prediction = extract_answer(text, extraction)
        return {
            "accuracy": substring_match(prediction, answers),
            "em": exact_match(prediction, answers),
            "f1": f1_score(prediction, answers),
        }
    raise ValueError(f"Unknown task {task!r}; use one of {', '.join(TASKS)}.")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def aggregate_scores(
    row_scores: Sequence[Sequence[Mapping[str, float]] | None], buckets: Sequence[str]
) -> dict[str, Any]:
    """Per-bucket and average metrics from per-sample scores.

    ``row_scores[i]`` holds the scores of row ``i``'s samples (None: the row was skipped). A row's score is the mean
    over its samples; a bucket's is the mean over its evaluated rows; ``avg`` is the mean over buckets that have any
    evaluated row (the paper averages the bucket columns, so every length weighs the same). Each bucket also reports
    ``n`` (evaluated rows) and ``skipped``.
    """
    if len(row_scores) != len(buckets):
        raise ValueError(f"{len(row_scores)} rows of scores but {len(buckets)} bucket labels; pass one per row.")
    per_bucket: dict[str, list[dict[str, float]]] = {}
    skipped: dict[str, int] = {}
    for scores, bucket in zip(row_scores, buckets):
        per_bucket.setdefault(bucket, [])
        skipped.setdefault(bucket, 0)
        if scores is None:
            skipped[bucket] += 1
            continue
        if not scores:
            raise ValueError(f"A row of bucket {bucket!r} has no samples; each evaluated row needs >= 1 sample.")
        names = sorted({name for sample in scores for name in sample})
        per_bucket[bucket].append({name: _mean([s[name] for s in scores if name in s]) for name in names})

    result: dict[str, Any] = {"buckets": {}, "avg": {}}
    for bucket in sorted(per_bucket, key=_bucket_sort_key):
        rows = per_bucket[bucket]
        names = sorted({name for row in rows for name in row})
        metrics: dict[str, Any] = {name: _mean([row[name] for row in rows if name in row]) for name in names}
        metrics.update(n=len(rows), skipped=skipped[bucket])
        result["buckets"][bucket] = metrics
    evaluated = [m for m in result["buckets"].values() if m["n"] > 0]
    names = sorted({k for m in evaluated for k in m if k not in ("n", "skipped")})
    result["avg"] = {name: _mean([m[name] for m in evaluated if name in m]) for name in names}
    result["avg"].update(
        n=sum(m["n"] for m in result["buckets"].values()),
        skipped=sum(m["skipped"] for m in result["buckets"].values()),
    )
    return result


def _bucket_sort_key(bucket: str) -> tuple[int, float, str]:
    try:
        return (0, float(bucket), bucket)
    except ValueError:
        return (1, 0.0, bucket)


# ---------------------------------------------------------------------------------------------------------------------
# Settings and data
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    """Everything that decides a result; recorded with every run in results.json."""

    task: str = "longqa"
    modes: tuple[str, ...] = ("agent",)
    num_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    chunk_size: int = 5000
    max_chunks: int = 8
    max_memory_tokens: int = 1024
    max_answer_tokens: int = 1024
    max_context_tokens: int = 8192
    answer_extraction: str = "lenient"
    bucket_column: str = "num_docs"
    batch_size: int = 8
    limit: int | None = None
    num_trajectory_pages: int = 4
    recall_chunk_policy: str = "any"
    recall_samples: int = 1
    search_max_turns: int = 6
    search_topk: int = 3
    search_max_new_tokens: int = 512

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task {self.task!r} is unknown; use one of {', '.join(TASKS)}.")
        self.modes = tuple(self.modes)
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"--modes {list(self.modes)}: use one or more of {', '.join(MODES)}.")
        if self.task == "search" and "full_context" in self.modes:
            raise ValueError("--task search has no context for --modes full_context; use --modes agent.")
        for name in ("num_samples", "chunk_size", "max_chunks", "max_memory_tokens", "max_answer_tokens",
                     "max_context_tokens", "batch_size", "recall_samples", "search_max_turns", "search_topk",
                     "search_max_new_tokens"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"Need --temperature >= 0 and 0 < --top_p <= 1, got {self.temperature}, {self.top_p}.")
        if self.answer_extraction not in ("strict", "lenient"):
            raise ValueError(f"--answer_extraction must be strict or lenient, got {self.answer_extraction!r}.")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1 rows per bucket, got {self.limit}.")

    def sampling(self, max_new_tokens: int):
        from memtrain.agent.generation import SamplingConfig

        return SamplingConfig(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            do_sample=self.temperature > 0,
            seed=self.seed,
        )

    def agent_config(self):
        from memtrain.agent.memory_agent import AgentConfig

        return AgentConfig(
            chunk_size=self.chunk_size,
            max_chunks=self.max_chunks,
            max_memory_tokens=self.max_memory_tokens,
            max_answer_tokens=self.max_answer_tokens,
        )


def load_rows(source: str | Path) -> list[dict[str, Any]]:
    """Rows from a ``.json``/``.jsonl``/``.parquet`` file, a ``save_to_disk`` folder (Dataset or DatasetDict: the
    splits other than ``train`` are concatenated, or ``train`` when it is the only one), or a folder written by
    ``scripts/build_dataset.py`` / ``scripts/build_longqa.py`` (its ``dataset/`` subfolder)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--dataset {source}: no such file or folder; give rows as .jsonl/.json/.parquet "
                                "or a dataset folder written by save_to_disk / scripts/build_dataset.py.")  # fmt: skip
    if path.is_dir():
        import datasets

        folder = path / "dataset" if (path / "dataset").is_dir() else path
        try:
            loaded = datasets.load_from_disk(str(folder))
        except FileNotFoundError as error:
            raise FileNotFoundError(f"--dataset {source}: not a save_to_disk folder ({error}).") from None
        if isinstance(loaded, datasets.DatasetDict):
            # A build with held-out splits (long-text QA: train + test_n<N>) is evaluated on the held-out ones only.
            held_out = [name for name in loaded if name != "train"]
            parts = [loaded[name] for name in (held_out or list(loaded))]
        else:
            parts = [loaded]
        return [dict(row) for part in parts for row in part]
    if path.suffix == ".parquet":
        import datasets

        return [dict(row) for row in datasets.Dataset.from_parquet(str(path))]
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"--dataset {source} line {number}: invalid JSON ({error}).") from None
        return rows
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"--dataset {source}: expected a JSON list of rows (or {{'data': [...]}}).")
        return data
    raise ValueError(f"--dataset {source}: unknown file type {path.suffix!r}; use .jsonl, .json or .parquet.")


def check_rows(rows: Sequence[Mapping[str, Any]], task: str, source: str = "<rows>") -> None:
    """Fail early, naming the row and key, on rows the task cannot score."""
    if not rows:
        raise ValueError(f"--dataset {source} has no rows.")
    needed = ("prompt", "answers") if task == "search" else ("prompt", "context", "answers")
    for index, row in enumerate(rows):
        missing = [key for key in needed if key not in row]
        if missing:
            raise ValueError(
                f"--dataset {source} row {index}: missing {', '.join(missing)} (keys: {sorted(row)}). Rows need "
                f"{', '.join(needed)}; build long-text QA rows with memtrain.data.longqa or pass --longqa_num_docs."
            )
        answers = row["answers"]
        if task != "search" and (isinstance(answers, str) or not answers):
            raise ValueError(f"--dataset {source} row {index}: `answers` must be a non-empty list of strings.")
        if task == "search":
            continue
        if not all(isinstance(a, str) and a.strip() for a in answers):
            raise ValueError(
                f"--dataset {source} row {index}: `answers` must be a non-empty list of non-empty strings, got "
                f"{answers!r:.200}."
            )
        if not isinstance(row["context"], str) or not row["context"].strip():
            raise ValueError(
                f"--dataset {source} row {index}: `context` is empty; the memory agent has nothing to read."
            )


def row_bucket(row: Mapping[str, Any], column: str) -> str:
    value = row.get(column)
    return ALL_BUCKETS if value is None else str(value)


def select_rows(rows: Sequence[dict[str, Any]], column: str, limit: int | None) -> list[dict[str, Any]]:
    """The first ``limit`` rows of each bucket (all when None), in the dataset's order."""
    if limit is None:
        return list(rows)
    seen: dict[str, int] = {}
    kept = []
    for row in rows:
        bucket = row_bucket(row, column)
        if seen.get(bucket, 0) < limit:
            seen[bucket] = seen.get(bucket, 0) + 1
            kept.append(row)
    return kept


def build_longqa_rows(source: str | Path, num_docs: Sequence[int], num_questions: int | None, seed: int) -> list[dict]:
    """Long-text QA buckets built on the fly from raw HotpotQA/MuSiQue rows (memtrain.data.longqa)."""
    from memtrain.data.longqa import build_test_buckets, load_examples

    examples = load_examples(str(source))
    buckets = build_test_buckets(examples, tuple(num_docs), num_questions=num_questions, seed=seed)
    return [row for rows in buckets.values() for row in rows]


# ---------------------------------------------------------------------------------------------------------------------
# Runners
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class RunOutput:
    """One (model, mode) pass over the rows: raw replies per row (None = skipped) and the pages' trajectories."""

    replies: list[list[str] | None]
    trajectories: list[list[Any]]
    extra_scores: list[list[dict[str, float]] | None]
    seconds: float


class Evaluator:
    """Runs one model over one task's rows in each mode and scores the replies."""

    def __init__(self, tokenizer: Any, generator: Any, config: EvalConfig, retriever: Any = None) -> None:
        self.tokenizer = tokenizer
        self.generator = generator
        self.config = config
        self.retriever = retriever

    def _batches(self, rows: Sequence[Any]) -> list[tuple[int, list[Any]]]:
        size = self.config.batch_size
        return [(start, list(rows[start : start + size])) for start in range(0, len(rows), size)]

    def _batch_sampling(self, batch_index: int, max_new_tokens: int):
        """The run seed shifted per batch: the same seed and batch size give the same samples."""
        sampling = self.config.sampling(max_new_tokens)
        return replace(sampling, seed=self.config.seed * 1_000_033 + batch_index)

    def run_memory_agent(self, rows: Sequence[Mapping[str, Any]]) -> RunOutput:
        from memtrain.agent.memory_agent import MemoryAgent

        cfg = self.config
        agent = MemoryAgent(self.tokenizer, self.generator, cfg.agent_config())
        start = time.perf_counter()
        replies, pages, extra = [], [], []
        for index, (offset, batch) in enumerate(self._batches(rows)):
            trajectories = agent.rollout(
                [row["context"] for row in batch],
                [row["prompt"] for row in batch],
                n=cfg.num_samples,
                doc_ids=[str(row.get("id", offset + i)) for i, row in enumerate(batch)],
                sampling=self._batch_sampling(index, cfg.max_answer_tokens),
            )
            from memtrain.agent.recall import row_document_template

            templates = [row_document_template(row) for row in batch for _ in range(cfg.num_samples)]
            recall = self._recall_scores(agent, trajectories, index, templates) if cfg.task == "memtrain" else None
            for i in range(len(batch)):
                group = trajectories[i * cfg.num_samples : (i + 1) * cfg.num_samples]
                replies.append([t.answer for t in group])
                pages.append(group)
                extra.append(None if recall is None else recall[i * cfg.num_samples : (i + 1) * cfg.num_samples])
        return RunOutput(replies, pages, extra, time.perf_counter() - start)

    def _recall_scores(
        self, agent: Any, trajectories: list[Any], batch_index: int, templates: list[str]
    ) -> list[dict[str, float]]:
        """Recall accuracy per rollout: one probe on an intermediate memory, ``recall_samples`` answers, mean EM."""
        from memtrain.agent.recall import build_recall_probes, default_entity_tools

        if not hasattr(self, "_entity_tools"):
            self._entity_tools = default_entity_tools()
        cfg = self.config
        probes = build_recall_probes(
            trajectories, *self._entity_tools, cfg.recall_chunk_policy, seed=cfg.seed, template=templates
        )
        live = [p for p in probes if p is not None]
        scores: list[dict[str, float]] = [{} for _ in trajectories]
        if not live:
            return scores
        prompts = [agent.encode_chat(agent.templates.render_recall(p.memory, p.masked_chunk)) for p in live]
        output = self.generator.generate(
            prompts, n=cfg.recall_samples, sampling=self._batch_sampling(10_000 + batch_index, cfg.max_answer_tokens)
        )
        for k, probe in enumerate(live):
            texts = [
                self.tokenizer.decode(ids, skip_special_tokens=True).strip()
                for ids in output.completion_ids[k * cfg.recall_samples : (k + 1) * cfg.recall_samples]
            ]
            trajectories[probe.trajectory_index].metadata["recall"] = {"entity": probe.entity, "answers": texts}
            scores[probe.trajectory_index] = {
                "recall_strict": _mean([float(masked_entity_match(t, probe.entity)) for t in texts]),
                "recall_lenient": _mean([float(masked_entity_match(t, probe.entity, lenient=True)) for t in texts]),
                "recall_f1": _mean([recall_score(t, probe.entity, "f1", lenient=True) for t in texts]),
            }
        return scores

    def full_context_prompt(self, row: Mapping[str, Any]) -> list[int]:
        """The final-answer prompt with the whole context in the memory slot."""
        from memtrain.agent.prompts import PromptTemplates

        text = PromptTemplates().render_final(row["prompt"], row["context"])
        encoded = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"])

    def run_full_context(self, rows: Sequence[Mapping[str, Any]]) -> RunOutput:
        cfg = self.config
        start = time.perf_counter()
        prompts = [self.full_context_prompt(row) for row in rows]
        fits = [i for i, ids in enumerate(prompts) if len(ids) <= cfg.max_context_tokens]
        replies: list[list[str] | None] = [None] * len(rows)
        for index, (_, batch) in enumerate(self._batches(fits)):
            output = self.generator.generate(
                [prompts[i] for i in batch],
                n=cfg.num_samples,
                sampling=self._batch_sampling(index, cfg.max_answer_tokens),
            )
            for j, i in enumerate(batch):
                replies[i] = [
                    self.tokenizer.decode(ids, skip_special_tokens=True).strip()
                    for ids in output.completion_ids[j * cfg.num_samples : (j + 1) * cfg.num_samples]
                ]
        return RunOutput(replies, [[] for _ in rows], [None] * len(rows), time.perf_counter() - start)

    def run_search_agent(self, rows: Sequence[Mapping[str, Any]]) -> RunOutput:
        from memtrain.agent.search_agent import SearchAgent, SearchAgentConfig

        if self.retriever is None:
            raise ValueError("--task search needs a retriever: pass --retriever_corpus FILE or --retriever_url URL.")
        cfg = self.config
        search = SearchAgentConfig(
            max_turns=cfg.search_max_turns, topk=cfg.search_topk, max_new_tokens=cfg.search_max_new_tokens
        )
        agent = SearchAgent(self.tokenizer, self.generator, self.retriever, search)
        start = time.perf_counter()
        replies, pages, extra = [], [], []
        for index, (_, batch) in enumerate(self._batches(rows)):
            trajectories = agent.rollout(
                batch, n=cfg.num_samples, sampling=self._batch_sampling(index, cfg.search_max_new_tokens)
            )
            for i in range(len(batch)):
                group = trajectories[i * cfg.num_samples : (i + 1) * cfg.num_samples]
                replies.append([t.answer for t in group])
                pages.append(group)
                extra.append([_search_scores(t.metadata) for t in group])
        return RunOutput(replies, pages, extra, time.perf_counter() - start)

    def run(self, rows: Sequence[Mapping[str, Any]], mode: str) -> RunOutput:
        if mode == "full_context":
            return self.run_full_context(rows)
        if self.config.task == "search":
            return self.run_search_agent(rows)
        return self.run_memory_agent(rows)

    def score(self, rows: Sequence[Mapping[str, Any]], output: RunOutput) -> list[list[dict[str, float]] | None]:
        """Per-sample scores of a run (None for skipped rows), merging task metrics and recall/search extras."""
        cfg = self.config
        scored: list[list[dict[str, float]] | None] = []
        for row, replies, extra in zip(rows, output.replies, output.extra_scores):
            if replies is None:
                scored.append(None)
                continue
            if cfg.task == "search":
                scored.append(list(extra))
                continue
            samples = [score_prediction(cfg.task, text, row["answers"], cfg.answer_extraction) for text in replies]
            if extra is not None:
                samples = [{**sample, **more} for sample, more in zip(samples, extra)]
            scored.append(samples)
        return scored


def _search_scores(metadata: Mapping[str, Any]) -> dict[str, float]:
    """EM as the search agent scored it (averaged over a row's questions) and F1 the same way."""
    predictions, golds = metadata["predictions"], metadata["gold_answers"]
    f1 = _mean([f1_score(p, list(g)) for p, g in zip(predictions, golds)])
    return {"em": float(metadata["em"]), "f1": f1}


# ---------------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def render_markdown(results: Mapping[str, Any]) -> str:
    """One table per task in the paper's layout: rows = model / mode, columns = buckets then Avg (percent)."""
    lines = ["# Evaluation results", ""]
    runs = results.get("runs", [])
    for task in [t for t in TASKS if any(run["task"] == t for run in runs)]:
        task_runs = [run for run in runs if run["task"] == task]
        metric = PRIMARY_METRIC[task]
        buckets = sorted({b for run in task_runs for b in run["metrics"]["buckets"]}, key=_bucket_sort_key)
        heads = [f"N={b}" if b != ALL_BUCKETS else "all" for b in buckets]
        lines += [f"## {task}: {metric} (%)", ""]
        lines.append("| Model | Mode | " + " | ".join(heads) + " | Avg |")
        lines.append("|---|---|" + "---:|" * (len(buckets) + 1))
        for run in task_runs:
            cells = []
            for bucket in buckets:
                m = run["metrics"]["buckets"].get(bucket)
                cell = "–" if m is None or m["n"] == 0 else _percent(m.get(metric))
                if m is not None and m["skipped"]:
                    cell += f" ({m['skipped']} skipped)"
                cells.append(cell)
            avg = _percent(run["metrics"]["avg"].get(metric))
            lines.append(f"| {run['label']} | {run['mode']} | " + " | ".join(cells) + f" | {avg} |")
        others = sorted({k for run in task_runs for k in run["metrics"]["avg"]} - {metric, "n", "skipped"})
        if others:
            lines += ["", "Other metrics (Avg over buckets, %):", ""]
            lines.append("| Model | Mode | " + " | ".join(others) + " |")
            lines.append("|---|---|" + "---:|" * len(others))
            for run in task_runs:
                values = " | ".join(_percent(run["metrics"]["avg"].get(k)) for k in others)
                lines.append(f"| {run['label']} | {run['mode']} | {values} |")
        settings = task_runs[0]["settings"]
        lines += [
            "",
            f"Samples per question: {settings['num_samples']}; temperature {settings['temperature']}, top-p "
            f"{settings['top_p']}, seed {settings['seed']}; chunk {settings['chunk_size']} tokens x "
            f"{settings['max_chunks']}; full-context budget {settings['max_context_tokens']} tokens.",
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


def save_plot(results: Mapping[str, Any], path: str | Path) -> Path:
    """Accuracy (each task's headline metric) against the bucket, one line per model / mode / task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    numeric = True
    for run in results.get("runs", []):
        metric = PRIMARY_METRIC[run["task"]]
        points = [(b, m[metric]) for b, m in run["metrics"]["buckets"].items() if m["n"] > 0 and metric in m]
        points.sort(key=lambda p: _bucket_sort_key(p[0]))
        if not points:
            continue
        numeric = numeric and all(_bucket_sort_key(b)[0] == 0 for b, _ in points)
        xs = [float(b) if numeric else b for b, _ in points]
        ax.plot(xs, [100 * v for _, v in points], marker="o", label=f"{run['label']} ({run['mode']}, {run['task']})")
    if numeric and ax.lines:
        ax.set_xscale("log")
    ax.set_xlabel("documents per context (N)" if numeric else "bucket")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    ax.set_title("Accuracy vs context length")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)[:80]


def _finite(value: Any) -> Any:
    """NaN (a metric with nothing to average) becomes null, so results.json is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def write_reports(results: dict[str, Any], output_dir: str | Path) -> dict[str, Path]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / RESULTS_JSON
    json_path.write_text(json.dumps(_finite(results), indent=1, ensure_ascii=False, allow_nan=False), encoding="utf-8")
    md_path = output_dir / RESULTS_MD
    md_path.write_text(render_markdown(results), encoding="utf-8")
    return {"json": json_path, "markdown": md_path, "plot": save_plot(results, output_dir / PLOT_PNG)}


def merge_runs(previous: Mapping[str, Any] | None, new_runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Keep the runs of other (label, mode, task) from an earlier results.json; replace the re-evaluated ones."""
    keys = {(run["label"], run["mode"], run["task"]) for run in new_runs}
    kept = [run for run in (previous or {}).get("runs", []) if (run["label"], run["mode"], run["task"]) not in keys]
    return {"runs": kept + list(new_runs)}


# ---------------------------------------------------------------------------------------------------------------------
# The whole evaluation
# ---------------------------------------------------------------------------------------------------------------------


def evaluate(
    rows: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    generator: Any,
    config: EvalConfig,
    output_dir: str | Path,
    label: str = "model",
    retriever: Any = None,
    extra_settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every mode of ``config`` on ``rows``, write the four outputs into ``output_dir``, return results.json."""
    from memtrain.viz import save_trajectory_html

    check_rows(rows, config.task)
    rows = select_rows(rows, config.bucket_column, config.limit)
    buckets = [row_bucket(row, config.bucket_column) for row in rows]
    output_dir = Path(output_dir)
    evaluator = Evaluator(tokenizer, generator, config, retriever)
    runs = []
    for mode in config.modes:
        output = evaluator.run(rows, mode)
        scores = evaluator.score(rows, output)
        pages = []
        shown = [i for i, group in enumerate(output.trajectories) if group][: config.num_trajectory_pages]
        for i in shown:
            row_id = str(rows[i].get("id", i))
            path = output_dir / "trajectories" / f"{_slug(label)}-{mode}-{i:03d}-{_slug(row_id)}.html"
            for trajectory, sample_scores in zip(output.trajectories[i], scores[i] or []):
                trajectory.metadata.update({"answers": list(rows[i]["answers"]), "scores": sample_scores})
            save_trajectory_html(output.trajectories[i], path, title=f"{label} / {mode}: {row_id}")
            pages.append(str(path.relative_to(output_dir)))
        predictions = [
            {"id": str(row.get("id", i)), "bucket": buckets[i], "replies": output.replies[i], "scores": scores[i]}
            for i, row in enumerate(rows)
        ]
        runs.append(
            {
                "label": label,
                "mode": mode,
                "task": config.task,
                "metrics": aggregate_scores(scores, buckets),
                "settings": {**asdict(config), "modes": list(config.modes), **dict(extra_settings or {})},
                "seconds": round(output.seconds, 3),
                "trajectory_pages": pages,
                "predictions": predictions,
            }
        )
    previous = None
    if (output_dir / RESULTS_JSON).is_file():
        previous = json.loads((output_dir / RESULTS_JSON).read_text(encoding="utf-8"))
    results = merge_runs(previous, runs)
    write_reports(results, output_dir)
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Command line (shared by `memtrain eval` and scripts/evaluate.py)
# ---------------------------------------------------------------------------------------------------------------------


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs: Any) -> None:
    """``--some_name`` (the recipe spelling) and ``--some-name`` both work."""
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*names, dest=name, **kwargs)


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    defaults = EvalConfig()
    _flag(parser, "model", help="Packaged name (smollm2-135m), local folder, adapter, .gguf or Hub id. With "
          "--base_url: the tokenizer (and default served model name).")  # fmt: skip
    _flag(parser, "base_url", help="Evaluate a model served by an OpenAI-compatible server (e.g. vLLM) at this URL.")
    _flag(parser, "served_model_name", help="Model name sent to --base_url (default: --model).")
    _flag(parser, "dataset", required=True, help="Rows (.jsonl/.json/.parquet) or a dataset folder.")
    _flag(parser, "output_dir", required=True, type=Path, help="Where results.json/.md, the plot and pages go.")
    _flag(parser, "task", choices=TASKS, default=defaults.task, help="longqa (default), memtrain or search.")
    _flag(parser, "modes", nargs="+", choices=MODES, default=list(defaults.modes), help="agent and/or full_context.")
    _flag(parser, "label", help="Row name in the results table (default: the model).")
    _flag(parser, "num_samples", type=int, default=defaults.num_samples, help="Samples per question (default 1).")
    _flag(parser, "temperature", type=float, default=defaults.temperature, help="0 (default) = greedy.")
    _flag(parser, "top_p", type=float, default=defaults.top_p)
    _flag(parser, "top_k", type=int, default=defaults.top_k)
    _flag(parser, "seed", type=int, default=defaults.seed)
    _flag(parser, "chunk_size", type=int, default=defaults.chunk_size, help="Tokens per chunk (paper: 5000).")
    _flag(parser, "max_chunks", type=int, default=defaults.max_chunks)
    _flag(parser, "max_memory_tokens", type=int, default=defaults.max_memory_tokens)
    _flag(parser, "max_answer_tokens", type=int, default=defaults.max_answer_tokens)
    _flag(parser, "max_context_tokens", type=int, default=defaults.max_context_tokens,
          help="Full-context mode: prompts longer than this are skipped (reported per bucket).")  # fmt: skip
    _flag(parser, "answer_extraction", choices=("strict", "lenient"), default=defaults.answer_extraction,
          help="longqa/search answer: strict = last \\boxed{} only; lenient (default) also takes unboxed replies.")  # fmt: skip
    _flag(parser, "bucket_column", default=defaults.bucket_column, help="Column grouping rows (default num_docs).")
    _flag(parser, "batch_size", type=int, default=defaults.batch_size, help="Rows per batched rollout.")
    _flag(parser, "limit", type=int, help="Evaluate the first LIMIT rows of each bucket.")
    _flag(parser, "num_trajectory_pages", type=int, default=defaults.num_trajectory_pages,
          help="Trajectory HTML pages for the first K examples of each mode (default 4).")  # fmt: skip
    _flag(parser, "recall_samples", type=int, default=defaults.recall_samples, help="memtrain: answers per probe.")
    _flag(parser, "recall_chunk_policy", choices=("any", "latest"), default=defaults.recall_chunk_policy)
    _flag(parser, "longqa_num_docs", type=int, nargs="+",
          help="Build long-text QA buckets with these document counts from raw HotpotQA/MuSiQue rows in --dataset.")  # fmt: skip
    _flag(parser, "longqa_num_questions", type=int, help="Questions per built bucket (default: all).")
    _flag(parser, "retriever_corpus", help="search: passages file for a local BM25 retriever.")
    _flag(parser, "retriever_url", help="search: URL of a running retrieval server.")
    _flag(parser, "search_max_turns", type=int, default=defaults.search_max_turns, help="search: turns (MEM1: 6).")
    _flag(parser, "search_topk", type=int, default=defaults.search_topk, help="search: passages per query.")
    _flag(parser, "search_max_new_tokens", type=int, default=defaults.search_max_new_tokens)
    _flag(parser, "max_batch_size", type=int, help="transformers backend: sequences per generate call.")
    return parser


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    names = EvalConfig.__dataclass_fields__
    return EvalConfig(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def run_eval(args: argparse.Namespace) -> int:
    """The ``memtrain eval`` handler: validate, load data, load or connect to the model, evaluate, report."""
    config = config_from_args(args)  # bad settings fail before any load
    if args.model is None:
        raise ValueError("--model is required (with --base_url it names the tokenizer of the served model).")
    if args.longqa_num_docs:
        rows = build_longqa_rows(args.dataset, args.longqa_num_docs, args.longqa_num_questions, config.seed)
    else:
        rows = load_rows(args.dataset)
    check_rows(rows, config.task, args.dataset)

    retriever = None
    if config.task == "search":
        from memtrain.retrieval import RemoteRetriever, Retriever

        if args.retriever_url:
            retriever = RemoteRetriever(args.retriever_url)
        elif args.retriever_corpus:
            retriever = Retriever.from_corpus(args.retriever_corpus)

    start = time.perf_counter()
    if args.base_url:
        from memtrain.agent.openai_backend import OpenAICompatibleGenerator
        from memtrain.data.documents import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        generator = OpenAICompatibleGenerator(args.base_url, args.served_model_name or args.model, tokenizer)
    else:
        from memtrain.agent.generation import TransformersGenerator
        from memtrain.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(args.model)
        generator = TransformersGenerator(model, tokenizer, max_batch_size=args.max_batch_size)
    loaded = time.perf_counter()
    extra = {"model": args.model, "base_url": args.base_url, "dataset": str(args.dataset)}
    results = evaluate(rows, tokenizer, generator, config, args.output_dir, args.label or args.model, retriever, extra)
    print(
        f"[memtrain eval] model ready in {loaded - start:.1f}s, evaluated in {time.perf_counter() - loaded:.1f}s; "
        f"wrote {args.output_dir / RESULTS_JSON}, {RESULTS_MD}, {PLOT_PNG}",
        file=sys.stderr,
    )
    print(render_markdown({"runs": results["runs"][-len(config.modes) :]}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_eval_arguments(argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    try:
        return run_eval(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"evaluate.py: error: {error}", file=sys.stderr)
        return 2
