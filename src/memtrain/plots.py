"""Every plot memtrain draws (evaluation's accuracy vs context length, the demo's reward curves), in one place.

matplotlib is imported inside each function with the Agg backend, so importing this module needs no display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def save_accuracy_plot(results: Mapping[str, Any], path: str | Path) -> Path:
    """Accuracy (each task's headline metric) against the bucket, one line per model / mode / task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memtrain.evaluation.scoring import PRIMARY_METRIC, _bucket_sort_key

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


def save_reward_curves(history: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """Reward and accuracy per training step (from ``metrics_history.json``) as a PNG; None without logged steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = [k for k in ("reward", "recall_accuracy") if any(k in h for h in history)]
    keys += sorted({k for h in history for k in h if k.startswith("rewards/") and k.endswith("/mean")})
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        points = [(h["step"], float(h[key])) for h in history if key in h and "step" in h]
        if points:
            # accuracies often equal a reward term (binary rewards): dashed on top, so neither line hides the other
            style = {"linestyle": "--", "marker": "x", "zorder": 3} if key.endswith("_accuracy") else {"marker": "o"}
            ax.plot(*zip(*points), label=key, **style)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean over the step's rollouts")
    ax.set_title("MemTrain training rewards")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
