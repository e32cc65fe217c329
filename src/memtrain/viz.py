"""A self-contained HTML view of memory-agent trajectories: what each chunk did to the memory, and the answer.

Reading a rollout as JSON hides the one thing worth seeing: how the memory changes. Each step shows the chunk
beside the memory it produced, with the words added (green) and dropped (red, struck) against the previous memory.
The page has inline CSS only (no scripts, no CDN), so it opens offline and can be attached to a Hub repo or a run.
"""

from __future__ import annotations

import difflib
import html
from collections.abc import Iterable
from pathlib import Path

from memtrain.agent.trajectory import ModelCall, Trajectory


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #1d1d1f; background: #fafafa; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.15rem; margin-top: 2rem; border-top: 2px solid #ccc; padding-top: 1rem; }
.meta { color: #555; font-size: 0.9rem; }
.problem, .answer { background: #fff; border: 1px solid #ddd; padding: 0.6rem; white-space: pre-wrap; }
.answer { border-color: #6a6; }
table.steps { border-collapse: collapse; width: 100%; table-layout: fixed; margin-top: 0.8rem; }
table.steps th, table.steps td { border: 1px solid #ddd; padding: 0.5rem; vertical-align: top; text-align: left; }
table.steps th { background: #eee; }
td.step { width: 5rem; font-weight: bold; }
.text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.82rem; max-height: 28rem;
        overflow: auto; }
ins { background: #d4f7d4; text-decoration: none; }
del { background: #f9d0d0; color: #833; }
.stats { color: #555; font-size: 0.8rem; margin-top: 0.4rem; }
"""


def memory_diff(previous: str, current: str) -> list[tuple[str, str]]:
    """Word-level diff as ``(op, text)`` pieces, ``op`` in ``kept`` / ``added`` / ``dropped``, in reading order."""
    old, new = previous.split(), current.split()
    pieces: list[tuple[str, str]] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes():
        if tag == "equal":
            pieces.append(("kept", " ".join(new[j1:j2])))
            continue
        if i2 > i1:
            pieces.append(("dropped", " ".join(old[i1:i2])))
        if j2 > j1:
            pieces.append(("added", " ".join(new[j1:j2])))
    return pieces


def _diff_html(previous: str, current: str) -> tuple[str, int, int]:
    parts, added, dropped = [], 0, 0
    for op, text in memory_diff(previous, current):
        escaped = html.escape(text)
        if op == "added":
            added += len(text.split())
            parts.append(f"<ins>{escaped}</ins>")
        elif op == "dropped":
            dropped += len(text.split())
            parts.append(f"<del>{escaped}</del>")
        else:
            parts.append(escaped)
    return " ".join(parts), added, dropped


def _call_stats(call: ModelCall | None) -> str:
    if call is None:
        return ""
    state = "ended with EOS" if call.finished else "hit the token budget"
    return f"{len(call.prompt_ids)} prompt tokens, {len(call.completion_ids)} generated, {state}"


def _scored_html(metadata: dict) -> str:
    """What the evaluation scored for this trajectory: the reply it scored, the gold answers and the scores."""
    e = html.escape
    parts = []
    if metadata.get("scored_reply") is not None:
        parts.append(f'<h3>Scored reply</h3><div class="answer">{e(str(metadata["scored_reply"]))}</div>')
    answers = metadata.get("answers")
    if answers:
        items = "".join(f"<li>{e(str(answer))}</li>" for answer in answers)
        parts.append(f"<h3>Gold answers</h3><ul>{items}</ul>")
    scores = metadata.get("scores")
    if isinstance(scores, dict) and scores:
        cells = "".join(
            f'<tr><td class="step">{e(str(name))}</td><td>'
            f"{e(f'{value:.4f}' if isinstance(value, float) else str(value))}</td></tr>"
            for name, value in scores.items()
        )
        parts.append(f'<h3>Scores</h3><table class="steps">{cells}</table>')
    return "".join(parts)


def _section(trajectory: Trajectory, index: int) -> str:
    e = html.escape
    updates = {call.step: call for call in trajectory.calls if call.kind == "update"}
    finals = [call for call in trajectory.calls if call.kind == "final"]
    others = [call for call in trajectory.calls if call.kind not in ("update", "final")]
    meta = (
        f"group {trajectory.group} &middot; {trajectory.num_chunks} chunks &middot; "
        f"{trajectory.truncated_tokens} context tokens centre-truncated &middot; {len(trajectory.calls)} model calls"
    )
    rows = []
    for step in range(1, trajectory.num_chunks + 1):
        previous = trajectory.memories[step - 1] if step - 1 < len(trajectory.memories) else ""
        current = trajectory.memories[step] if step < len(trajectory.memories) else ""
        diff, added, dropped = _diff_html(previous, current)
        stats = f"+{added} words, &minus;{dropped} words; {e(_call_stats(updates.get(step)))}"
        rows.append(
            f'<tr><td class="step">{step}</td><td><div class="text">{e(trajectory.chunks[step - 1])}</div></td>'
            f'<td><div class="text">{diff}</div><div class="stats">{stats}</div></td></tr>'
        )
    final_stats = e(_call_stats(finals[-1])) if finals else "no final call recorded"
    answer = e(trajectory.answer)
    if not trajectory.answer.strip() and finals and finals[-1].text.strip():
        # the final call generated text but no answer was parsed from it (e.g. no <answer> tag): show what it said
        answer = f"<em>no answer parsed from the final call, which generated:</em><br>{e(finals[-1].text)}"
    extra = ""
    if others:
        items = "".join(
            f'<tr><td class="step">{e(call.kind)} {call.step}</td><td colspan="2"><div class="text">'
            f"{e(call.text)}</div><div class='stats'>{e(_call_stats(call))}</div></td></tr>"
            for call in others
        )
        extra = f'<table class="steps"><tr><th>call</th><th colspan="2">other calls</th></tr>{items}</table>'
    return (
        f'<section id="trajectory-{index}"><h2>Document {e(trajectory.doc_id)} (rollout {index})</h2>'
        f'<p class="meta">{meta}</p><h3>Problem</h3><div class="problem">{e(trajectory.problem)}</div>'
        f'<h3>Initial memory</h3><div class="problem">{e(trajectory.memories[0] if trajectory.memories else "")}'
        f'</div><table class="steps"><tr><th style="width:5rem">step</th><th>chunk read</th>'
        f"<th>memory written (<ins>added</ins> / <del>dropped</del> vs the previous memory)</th></tr>"
        f'{"".join(rows)}</table>{extra}<h3>Final answer</h3><div class="answer">{answer}</div>'
        f'<p class="stats">{final_stats}</p>{_scored_html(trajectory.metadata)}</section>'
    )


def _page(trajectories: list[Trajectory], title: str) -> str:
    body = "".join(_section(trajectory, index) for index, trajectory in enumerate(trajectories))
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f'<p class="meta">{len(trajectories)} trajectories</p>{body}</body></html>\n'
    )


def render_trajectory_html(trajectory: Trajectory, title: str | None = None) -> str:
    """One trajectory as a complete HTML page."""
    return _page([trajectory], title or f"Memory agent trajectory: {trajectory.doc_id}")


def save_trajectory_html(
    trajectories: Trajectory | Iterable[Trajectory], path: str | Path, title: str | None = None
) -> Path:
    """Write one page holding one or many trajectories; returns the path written."""
    items = [trajectories] if isinstance(trajectories, Trajectory) else list(trajectories)
    for position, item in enumerate(items):
        if not isinstance(item, Trajectory):
            raise TypeError(f"save_trajectory_html: item {position} is a {type(item).__name__}, not a Trajectory.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(items) == 1:
        page = render_trajectory_html(items[0], title)
    else:
        page = _page(items, title or "Memory agent trajectories")
    path.write_text(page, encoding="utf-8")
    return path
