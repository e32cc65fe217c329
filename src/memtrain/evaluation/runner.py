"""Runners: one model over one task's rows as the memory agent, the search agent, or with the whole context."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from memtrain.evaluation.config import EvalConfig
from memtrain.evaluation.scoring import _mean, _search_scores, score_prediction
from memtrain.metrics import masked_entity_match
from memtrain.rewards import recall_score


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

    def _read_units(self, rows: Sequence[Mapping[str, Any]]) -> list[list[int]]:
        """Row indices read together: one read per multi-question document under ``read_once``, else one per row."""
        if self.config.multi_question != "read_once":
            return [[i] for i in range(len(rows))]
        units: list[list[int]] = []
        for i, row in enumerate(rows):
            group = row.get("read_group")
            if group is not None and units and rows[units[-1][0]].get("read_group") == group:
                units[-1].append(i)
            else:
                units.append([i])
        return units

    def run_memory_agent(self, rows: Sequence[Mapping[str, Any]], batch_index: int = 0) -> RunOutput:
        """The memory agent over the rows; the questions of one document (``read_once``) share one read.

        Such a read has every question of the document in its problem (MemTrain's agent reads with the problem in
        its prompt, so the memory keeps what any of them needs); each question is then answered from the final
        memory with its own final-answer prompt, as a single-question read is answered.
        """
        from memtrain.agent.memory_agent import MemoryAgent
        from memtrain.agent.recall import row_document_template

        cfg = self.config
        agent = MemoryAgent(self.tokenizer, self.generator, cfg.agent_config())
        start = time.perf_counter()
        replies: list[list[str] | None] = [None] * len(rows)
        pages: list[list[Any]] = [[] for _ in rows]
        extra: list[list[dict[str, float]] | None] = [None] * len(rows)
        units = self._read_units(rows)
        for index, (_, batch) in enumerate(self._batches(units), start=batch_index):
            firsts = [rows[unit[0]] for unit in batch]
            problems = [
                row["prompt"] if len(unit) == 1 else combined_problem([rows[i]["prompt"] for i in unit])
                for row, unit in zip(firsts, batch)
            ]
            trajectories = agent.rollout(
                [row["context"] for row in firsts],
                problems,
                n=cfg.num_samples,
                doc_ids=[str(row.get("read_group", row.get("id", unit[0]))) for row, unit in zip(firsts, batch)],
                sampling=self._batch_sampling(index, cfg.max_answer_tokens),
            )
            per_question = self._answer_each_question(agent, rows, batch, trajectories, index)
            templates = [row_document_template(row) for row in firsts for _ in range(cfg.num_samples)]
            recall = self._recall_scores(agent, trajectories, index, templates) if cfg.task == "memtrain" else None
            for u, unit in enumerate(batch):
                group = trajectories[u * cfg.num_samples : (u + 1) * cfg.num_samples]
                pages[unit[0]] = group
                for k, i in enumerate(unit):
                    replies[i] = [t.answer for t in group] if len(unit) == 1 else [a[k] for a in per_question[u]]
                    if recall is not None:
                        extra[i] = recall[u * cfg.num_samples : (u + 1) * cfg.num_samples]
        return RunOutput(replies, pages, extra, time.perf_counter() - start)

    def _answer_each_question(
        self,
        agent: Any,
        rows: Sequence[Mapping[str, Any]],
        batch: list[list[int]],
        trajectories: list[Any],
        index: int,
    ) -> list[list[list[str]]]:
        """``[unit][sample][question]`` answers of the multi-question reads of a batch, in ONE generator call."""
        from memtrain.agent.chunking import cap_problem

        cfg = self.config
        prompts, where = [], []
        for u, unit in enumerate(batch):
            if len(unit) == 1:
                continue
            for s in range(cfg.num_samples):
                memory = trajectories[u * cfg.num_samples + s].memories[-1]
                for i in unit:
                    question, _ = cap_problem(self.tokenizer, rows[i]["prompt"], cfg.max_problem_tokens)
                    prompts.append(agent.encode_chat(agent.templates.render_final(question, memory)))
                    where.append((u, s))
        answers: list[list[list[str]]] = [[[] for _ in range(cfg.num_samples)] for _ in batch]
        if not prompts:
            return answers
        output = self.generator.generate(
            prompts, n=1, sampling=self._batch_sampling(20_000 + index, cfg.max_answer_tokens)
        )
        for (u, s), ids in zip(where, output.completion_ids):
            text = self.tokenizer.decode(list(ids)[: cfg.max_answer_tokens], skip_special_tokens=True).strip()
            answers[u][s].append(text)
        for u, unit in enumerate(batch):
            for s in range(cfg.num_samples if len(unit) > 1 else 0):
                trajectories[u * cfg.num_samples + s].metadata["question_answers"] = answers[u][s]
        return answers

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
        from memtrain.agent.prompts import encode_chat

        return encode_chat(
            self.tokenizer, self.config.agent_config().templates().render_final(row["prompt"], row["context"])
        )

    def run_full_context(self, rows: Sequence[Mapping[str, Any]], batch_index: int = 0) -> RunOutput:
        cfg = self.config
        start = time.perf_counter()
        prompts = [self.full_context_prompt(row) for row in rows]
        fits = [i for i, ids in enumerate(prompts) if len(ids) <= cfg.max_context_tokens]
        replies: list[list[str] | None] = [None] * len(rows)
        for index, (_, batch) in enumerate(self._batches(fits), start=batch_index):
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

    def run_search_agent(self, rows: Sequence[Mapping[str, Any]], batch_index: int = 0) -> RunOutput:
        from memtrain.agent.search_agent import SearchAgent, SearchAgentConfig

        if self.retriever is None:
            raise ValueError("--task search needs a retriever: pass --retriever CORPUS (a passages file) or URL.")
        cfg = self.config
        agent = SearchAgent(self.tokenizer, self.generator, self.retriever, SearchAgentConfig.from_arguments(cfg))
        start = time.perf_counter()
        replies, pages, extra = [], [], []
        for index, (_, batch) in enumerate(self._batches(rows), start=batch_index):
            trajectories = agent.rollout(
                batch, n=cfg.num_samples, sampling=self._batch_sampling(index, cfg.search_max_new_tokens)
            )
            for i in range(len(batch)):
                group = trajectories[i * cfg.num_samples : (i + 1) * cfg.num_samples]
                replies.append([t.answer for t in group])
                pages.append(group)
                extra.append([_search_scores(t.metadata) for t in group])
        return RunOutput(replies, pages, extra, time.perf_counter() - start)

    def read_units(self, rows: Sequence[Mapping[str, Any]], mode: str) -> list[list[int]]:
        """Row indices a mode runs together (a batch holds ``batch_size`` of them): documents read once, or rows."""
        if mode == "agent" and self.config.task != "search":
            return self._read_units(rows)
        return [[i] for i in range(len(rows))]

    def run(self, rows: Sequence[Mapping[str, Any]], mode: str, batch_index: int = 0) -> RunOutput:
        """One mode over ``rows``; ``batch_index`` numbers the first batch (seeds), so a resumed run repeats."""
        if mode == "full_context":
            return self.run_full_context(rows, batch_index)
        if self.config.task == "search":
            return self.run_search_agent(rows, batch_index)
        return self.run_memory_agent(rows, batch_index)

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


def combined_problem(questions: Sequence[str]) -> str:
    """The problem a multi-question document is read with: every question, numbered."""
    numbered = "\n".join(f"{k}. {question}" for k, question in enumerate(questions, start=1))
    return f"Several questions about the same text; keep what answers any of them:\n{numbered}"
