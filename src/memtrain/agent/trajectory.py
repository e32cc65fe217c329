"""What one rollout of an agent did: every model call, exactly as generated, plus the memories and the answer.

The trainer turns each :class:`ModelCall` into one training row (its own prompt + its own completion), so the
prompt ids stored here must be the very ids the generator saw.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal


CallKind = Literal["update", "final", "recall", "search"]


@dataclass
class ModelCall:
    """One generator call of one trajectory."""

    kind: CallKind
    step: int
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str = ""
    logprobs: list[float] | None = None
    finished: bool = True


@dataclass
class Trajectory:
    """One rollout of the memory agent over one document.

    ``memories[0]`` is the initial memory ("No previous memory"); ``memories[t]`` is the memory written after
    reading chunk ``t`` (1-based), so ``memories[t]`` has read chunks ``1..t``.
    """

    doc_id: str
    group: int
    problem: str
    chunks: list[str]
    memories: list[str] = field(default_factory=list)
    calls: list[ModelCall] = field(default_factory=list)
    answer: str = ""
    truncated_tokens: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trajectory:
        data = dict(data)
        data["calls"] = [ModelCall(**call) for call in data.get("calls", [])]
        return cls(**data)

    def save_json(self, path: str | Path) -> None:
        save_trajectories([self], path)


def save_trajectories(trajectories: list[Trajectory], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([t.to_dict() for t in trajectories], ensure_ascii=False, indent=1), encoding="utf-8")


def load_trajectories(path: str | Path) -> list[Trajectory]:
    return [Trajectory.from_dict(item) for item in json.loads(Path(path).read_text(encoding="utf-8"))]
