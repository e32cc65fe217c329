"""Held-out evaluation of a training run's checkpoints with the recipe's own agent: what the demo and the learning
benchmark (benchmarks/learning.py) report, paired across checkpoints by one seed."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from memtrain.agent.memory_agent import AgentConfig


logger = logging.getLogger(__name__)


# (results key, label) of what the demo and the learning benchmark report, exact match first.
DEMO_METRICS = (
    ("recall_lenient", "recall EM"),
    ("recall_f1", "recall F1"),
    ("masked_entity_lenient", "masked-entity EM"),
    ("masked_entity_f1", "masked-entity F1"),
)


@dataclass
class HeldOutEval:
    """How held-out documents are read and scored: the training recipe's agent, sampled, recall on the latest chunk.

    Every model is evaluated with the same seed, so two checkpoints see the same sampling noise (paired).
    """

    temperature: float = 0.7
    recall_samples: int = 4
    recall_chunk_policy: str = "latest"
    seed: int = 1234
    batch_size: int = 16
    num_trajectory_pages: int = 4


def evaluate_held_out(
    model_path: str,
    rows: Dataset,
    agent_config: AgentConfig,
    settings: HeldOutEval,
    output_dir: str | Path,
    label: str,
) -> dict[str, Any]:
    """Evaluate one checkpoint on held-out MemTrain documents; writes results.json/.md and trajectory pages."""
    from memtrain.agent.generation import SamplingConfig, TransformersGenerator
    from memtrain.evaluation import EvalConfig, evaluate
    from memtrain.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_path)
    model.eval()
    generator = TransformersGenerator(model, tokenizer, SamplingConfig(seed=settings.seed))
    config = EvalConfig(
        **dataclasses.asdict(agent_config),  # every agent setting of the recipe: budgets, templates, problem cap
        task="memtrain",
        temperature=settings.temperature,
        seed=settings.seed,
        batch_size=settings.batch_size,
        num_trajectory_pages=settings.num_trajectory_pages,
        recall_chunk_policy=settings.recall_chunk_policy,
        recall_samples=settings.recall_samples,
    )
    start = time.perf_counter()
    results = evaluate(rows.to_list(), tokenizer, generator, config, output_dir, label=label)
    logger.info("Evaluated %s on %d held-out documents in %.0f s", label, len(rows), time.perf_counter() - start)
    return next(run for run in reversed(results["runs"]) if run["label"] == label)


def per_document(run: dict[str, Any], metric: str) -> list[float]:
    """One value per held-out document (the mean over its samples; NaN when it had no score for ``metric``)."""
    values = []
    for prediction in run["predictions"]:
        scores = [s[metric] for s in prediction["scores"] or [] if metric in s]
        values.append(sum(scores) / len(scores) if scores else float("nan"))
    return values
