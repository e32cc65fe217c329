"""Does MemTrain training improve the memory? Held-out accuracy before and after, MemTrain vs end-to-end reward only.

SmolLM2-135M on CPU with the `smollm2-135m` recipe (a small-model setting, see the recipe's header):

1. the warm start (recipe's ``warm_start_examples``) runs ONCE, on the training documents; that checkpoint is
   "before" and the common starting point of every arm;
2. each arm trains from it for ``--steps`` GRPO steps per seed: ``memtrain`` (the recipe's rewards: final answer +
   0.5 x intermediate memory recall) and ``end_to_end`` (the final-answer reward alone, same budget);
3. every checkpoint is evaluated on the same held-out documents with the same sampling seed (paired), and the gain
   (after - before) per document is averaged over seeds; 95% confidence intervals are percentile bootstraps over
   held-out documents.

    python scripts/build_dataset.py recipes/data/memtrain-wiki-cpu.yaml
    python benchmarks/learning.py                               # 96 documents, 8 steps, seed 0: ~70 min, 2 cores
    python benchmarks/learning.py --seeds 0 1 2                 # tighter intervals, ~3 h
    python benchmarks/learning.py --held-out 48 --recall-samples 4 --steps 6   # a quicker look, ~45 min

Prints a table and writes ``results.json`` under ``--output-dir``; benchmarks/README.md keeps the measured figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path

from memtrain.configs import parse_recipe_args
from memtrain.data.build import ensure_dataset, split_held_out
from memtrain.evaluation.held_out import DEMO_METRICS, HeldOutEval, evaluate_held_out, per_document
from memtrain.train import train_with_recipe, warm_start_checkpoint


OBJECTIVES = {
    "memtrain": None,  # the recipe's own reward_funcs / reward_weights
    # the final-answer reward alone: no recall reward AND no training on recall answers (their own GRPO groups)
    "end_to_end": {"reward_funcs": ["answer_f1_lenient"], "reward_weights": [1.0], "train_recall_answers": False},
}


def bootstrap_ci(values: list[float], samples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile) of the mean of ``values`` under resampling (NaNs dropped)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan, math.nan
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    return sum(values) / n, means[int(0.025 * samples)], means[int(0.975 * samples) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/smollm2-135m.yaml")
    parser.add_argument("--data-recipe", default="recipes/data/memtrain-wiki-cpu.yaml")
    parser.add_argument("--dataset", default="outputs/data/memtrain-wiki-cpu/dataset")
    parser.add_argument(
        "--held-out", type=int, default=96, help="last rows of the dataset, never trained on (nor warm-started on)"
    )
    parser.add_argument("--steps", type=int, default=8, help="GRPO steps per arm and seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--objectives", nargs="+", choices=sorted(OBJECTIVES), default=["memtrain", "end_to_end"])
    parser.add_argument(
        "--recall-samples", type=int, default=16, help="evaluation answers per recall probe (fewer: noisier gains)"
    )
    parser.add_argument("--output-dir", default="outputs/benchmarks/learning")
    parser.add_argument("--warm-start", help="a checkpoint already warm-started by this recipe: skips the warm start")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    out = Path(args.output_dir)
    if args.warm_start and Path(args.warm_start).resolve().is_relative_to(out.resolve()):
        parser.error(
            f"--warm-start {args.warm_start} is inside --output-dir {out}, which is cleared first: pass another"
        )
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    train_rows, held_out = split_held_out(ensure_dataset(args.data_recipe, args.dataset), args.held_out)
    train_rows.save_to_disk(str(out / "train-documents"))
    _, agent_config, training_args, _ = parse_recipe_args([args.recipe])
    settings = HeldOutEval(temperature=training_args.temperature, recall_samples=args.recall_samples)
    timings: dict[str, float] = {}

    # 1. The warm start alone (0 GRPO steps): the common starting point.
    if args.warm_start:
        warm = Path(args.warm_start)
    else:
        start = time.perf_counter()
        warm = warm_start_checkpoint(args.recipe, train_rows, out / "warm-start")
        timings["warm start"] = time.perf_counter() - start
    start = time.perf_counter()
    before = evaluate_held_out(str(warm), held_out, agent_config, settings, out / "eval", "warm start (before)")
    timings["evaluation (each)"] = time.perf_counter() - start

    # 2. Each arm, each seed, from the warm start.
    after: dict[str, list[dict]] = {name: [] for name in args.objectives}
    for seed in args.seeds:
        for name in args.objectives:
            start = time.perf_counter()
            trained = train_with_recipe(
                args.recipe,
                {"model_name_or_path": warm, "dataset_name": out / "train-documents", "output_dir": out / f"{name}-{seed}",
                 "max_steps": args.steps, "seed": seed, "warm_start_examples": 0, "save_strategy": "no",
                 "trajectory_html_steps": 0, **(OBJECTIVES[name] or {})},
            )  # fmt: skip
            timings[f"{name} seed {seed} ({args.steps} steps)"] = time.perf_counter() - start
            after[name].append(
                evaluate_held_out(str(trained), held_out, agent_config, settings, out / "eval", f"{name} seed {seed}")
            )

    # 3. Gains per held-out document, averaged over seeds, with bootstrap intervals.
    report: dict = {"held_out_documents": len(held_out), "steps": args.steps, "seeds": args.seeds, "metrics": {}}
    header = f"{'metric':18s} {'before':>7s} " + " ".join(
        f"{name + ' after':>18s} {'gain [95% CI]':>24s}" for name in args.objectives
    )
    print(
        f"\nSmolLM2-135M, {len(held_out)} held-out documents, {args.steps} GRPO steps x seeds {args.seeds} (percent)"
    )
    print(header)
    for metric, label in DEMO_METRICS:
        base = per_document(before, metric)
        row = {"before": bootstrap_ci(base)}
        cells = []
        gains_by_arm = {}
        for name in args.objectives:
            runs = [per_document(run, metric) for run in after[name]]
            mean_after = [sum(vals) / len(vals) for vals in zip(*runs)]
            gains = [a - b for a, b in zip(mean_after, base)]
            gains_by_arm[name] = gains
            row[name] = {"after": bootstrap_ci(mean_after), "gain": bootstrap_ci(gains)}
            g, lo, hi = row[name]["gain"]
            cells.append(f"{100 * row[name]['after'][0]:18.1f} {100 * g:+8.1f} [{100 * lo:+5.1f}, {100 * hi:+5.1f}]")
        if {"memtrain", "end_to_end"} <= set(gains_by_arm):
            diff = [a - b for a, b in zip(gains_by_arm["memtrain"], gains_by_arm["end_to_end"])]
            row["memtrain_minus_end_to_end"] = bootstrap_ci(diff)
        report["metrics"][metric] = row
        print(f"{label:18s} {100 * row['before'][0]:7.1f} " + " ".join(cells))
    if "memtrain_minus_end_to_end" in report["metrics"][DEMO_METRICS[0][0]]:
        for metric, label in DEMO_METRICS:
            d, lo, hi = report["metrics"][metric]["memtrain_minus_end_to_end"]
            print(f"MemTrain - end-to-end gain, {label}: {100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]")
    report["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    print("timings (s):", json.dumps(report["timings_s"]))
    (out / "results.json").write_text(json.dumps(report, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
