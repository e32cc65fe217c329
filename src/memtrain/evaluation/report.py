"""Reports: results.json (strict JSON), results.md in the paper's layout, and the accuracy-vs-length plot."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from memtrain.evaluation.scoring import ALL_BUCKETS, PRIMARY_METRIC, TASKS, _bucket_sort_key


RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PLOT_PNG = "accuracy_vs_length.png"


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
    return {"json": json_path, "markdown": md_path, "plot": save_accuracy_plot(results, output_dir / PLOT_PNG)}


def merge_runs(previous: Mapping[str, Any] | None, new_runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Keep the runs of other (label, mode, task) from an earlier results.json; replace the re-evaluated ones."""
    keys = {(run["label"], run["mode"], run["task"]) for run in new_runs}
    kept = [run for run in (previous or {}).get("runs", []) if (run["label"], run["mode"], run["task"]) not in keys]
    return {"runs": kept + list(new_runs)}


def save_accuracy_plot(results: Mapping[str, Any], path: str | Path) -> Path:
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
