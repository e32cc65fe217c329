"""The CPU proof of the method: build documents, evaluate, train with a recipe, evaluate again, write a report.

``make demo`` (scripts/demo.py) runs it once with the ``smollm2-135m`` recipe; benchmarks/learning.py reuses the same
steps to compare objectives over seeds. Held-out documents are the LAST ``num_held_out`` rows of the built dataset:
they are never trained on, neither by GRPO nor by the warm start.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from memtrain.agent.memory_agent import AgentConfig
from memtrain.data.build import ensure_dataset, split_held_out
from memtrain.plots import save_reward_curves
from memtrain.train import train_with_recipe


logger = logging.getLogger(__name__)

__all__ = [
    "DEMO_METRICS",
    "HeldOutEval",
    "evaluate_held_out",
    "per_document",
    "save_reward_curves",
    "write_demo_report",
]

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
        task="memtrain",
        temperature=settings.temperature,
        seed=settings.seed,
        chunk_size=agent_config.chunk_size,
        max_chunks=agent_config.max_chunks,
        max_memory_tokens=agent_config.max_memory_tokens,
        max_answer_tokens=agent_config.max_answer_tokens,
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


def _cell(value: float) -> str:
    return "–" if value != value else f"{100 * value:.1f}"


def write_demo_report(
    output_dir: str | Path,
    runs: Sequence[dict[str, Any]],
    training_dir: str | Path,
    timings: dict[str, float],
    notes: Sequence[str] = (),
) -> Path:
    """report/README.md: the before/after table, the reward curves, links to the trajectory pages and timings."""
    output_dir = Path(output_dir)
    training_dir = Path(training_dir)
    history_path = training_dir / "metrics_history.json"
    history = json.loads(history_path.read_text(encoding="utf-8")) if history_path.is_file() else []
    curves = save_reward_curves(history, output_dir / "reward_curves.png")
    lines = ["# memtrain demo report", ""]
    lines += [
        f"Held-out MemTrain documents: {len(runs[0]['predictions'])}, never trained on. Lenient extraction, "
        f"temperature {runs[0]['settings']['temperature']}, {runs[0]['settings']['recall_samples']} recall answers "
        "per probe (the chunk read last), one rollout per document. Percent.",
        "",
        "| Model | " + " | ".join(label for _, label in DEMO_METRICS) + " |",
        "|---|" + "---:|" * len(DEMO_METRICS),
    ]
    for run in runs:
        avg = run["metrics"]["avg"]
        lines.append(
            f"| {run['label']} | " + " | ".join(_cell(avg.get(k, float("nan"))) for k, _ in DEMO_METRICS) + " |"
        )
    lines.append("")
    if curves is not None:
        lines += ["## Training rewards", "", f"![reward curves]({curves.name})", ""]
    lines += ["## Trajectories", ""]
    for run in runs:
        for page in run.get("trajectory_pages", []):
            lines.append(f"- {run['label']}: [{Path(page).name}](eval/{page})")
    for page in sorted(training_dir.glob("**/*.html")):
        lines.append(f"- training: [{page.name}]({os.path.relpath(page, output_dir)})")
    lines += ["", "## Timings", "", "| Stage | Seconds |", "|---|---:|"]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in timings.items()]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    path = output_dir / "README.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class DemoArguments:
    """What ``make demo`` runs; every default is the CPU setting that finishes in about 20 minutes on 2 cores."""

    recipe: str = "recipes/smollm2-135m.yaml"
    data_recipe: str = "recipes/data/memtrain-wiki-cpu.yaml"
    dataset: str = "outputs/data/memtrain-wiki-cpu/dataset"
    output_dir: str = "outputs/demo"
    held_out: int = 32
    steps: int = 3
    recall_samples: int = 4


def run_demo(args: DemoArguments) -> Path:
    """Build -> evaluate the base model -> train with the recipe -> evaluate again -> ``<output_dir>/report``."""
    import shutil

    out = Path(args.output_dir)
    if out.exists():
        shutil.rmtree(out)
    report_dir = out / "report"
    timings: dict[str, float] = {}
    stages = 5

    def stage(number: int, text: str) -> float:
        logger.info("[%d/%d] %s", number, stages, text)
        return time.perf_counter()

    from memtrain.configs import parse_recipe_args

    _, agent_config, training_args, model_args = parse_recipe_args([args.recipe])
    settings = HeldOutEval(temperature=training_args.temperature, recall_samples=args.recall_samples)

    start = stage(1, f"MemTrain documents from the bundled Wikipedia sample ({args.data_recipe})")
    train_rows, held_out = split_held_out(ensure_dataset(args.data_recipe, args.dataset), args.held_out)
    train_rows.save_to_disk(str(out / "train-documents"))
    timings["documents"] = time.perf_counter() - start

    base = model_args.model_name_or_path
    start = stage(2, f"evaluating {base} on {len(held_out)} held-out documents")
    runs = [evaluate_held_out(base, held_out, agent_config, settings, report_dir / "eval", f"{base} (before)")]
    timings["evaluation before"] = time.perf_counter() - start

    start = stage(3, f"training with {args.recipe}: warm start, then {args.steps} GRPO steps")
    trained = train_with_recipe(
        args.recipe,
        {"dataset_name": out / "train-documents", "output_dir": out / "model", "max_steps": args.steps,
         "save_strategy": "no", "trajectory_html_steps": 1},
    )  # fmt: skip
    timings["training"] = time.perf_counter() - start

    start = stage(4, "evaluating the trained model on the same documents")
    runs.append(evaluate_held_out(str(trained), held_out, agent_config, settings, report_dir / "eval", "after"))
    timings["evaluation after"] = time.perf_counter() - start

    stage(5, "writing the report")
    notes = [
        f"`after` = the recipe's warm start ({training_args.warm_start_examples} supervised turns) + {args.steps} "
        "GRPO steps; benchmarks/learning.py separates what GRPO adds to the warm start.",
        "A small-model CPU setting (see the recipe's header), not the paper's.",
    ]
    path = write_demo_report(report_dir, runs, trained, timings, notes)
    logger.info("Report: %s (%.0f s in all)", path, sum(timings.values()))
    print(path.read_text(encoding="utf-8"))
    return path
