"""The whole evaluation: every mode of a config over the rows, scored, with trajectory pages and the reports."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from memtrain.evaluation.config import EvalConfig
from memtrain.evaluation.data import check_rows, row_bucket, select_rows
from memtrain.evaluation.report import RESULTS_JSON, _slug, merge_runs, write_reports
from memtrain.evaluation.runner import Evaluator
from memtrain.evaluation.scoring import aggregate_scores


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
