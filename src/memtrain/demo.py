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

from memtrain.data.build import ensure_dataset, split_held_out
from memtrain.evaluation.held_out import DEMO_METRICS, HeldOutEval, evaluate_held_out
from memtrain.plots import save_reward_curves
from memtrain.train import train_with_recipe


logger = logging.getLogger(__name__)

__all__ = ["DemoArguments", "run_demo", "write_demo_report"]


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
