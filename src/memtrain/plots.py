"""Training's plot: the reward curves of a run (the demo's report). Evaluation's accuracy-vs-length plot is drawn by
:mod:`memtrain.evaluation.report`, beside the scores it plots.

matplotlib is imported inside each function with the Agg backend, so importing this module needs no display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
