"""The settings that decide an evaluation result (recorded with every run in results.json)."""

from __future__ import annotations

from dataclasses import dataclass

from memtrain.evaluation.scoring import MODES, TASKS


@dataclass
class EvalConfig:
    """Everything that decides a result; recorded with every run in results.json."""

    task: str = "longqa"
    modes: tuple[str, ...] = ("agent",)
    num_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    chunk_size: int = 5000
    max_chunks: int = 8
    max_memory_tokens: int = 1024
    max_answer_tokens: int = 1024
    max_context_tokens: int = 8192
    answer_extraction: str = "lenient"
    bucket_column: str = "num_docs"
    batch_size: int = 8
    limit: int | None = None
    num_trajectory_pages: int = 4
    recall_chunk_policy: str = "any"
    recall_samples: int = 1
    search_max_turns: int = 6
    search_topk: int = 3
    search_max_new_tokens: int = 512

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task {self.task!r} is unknown; use one of {', '.join(TASKS)}.")
        self.modes = tuple(self.modes)
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"--modes {list(self.modes)}: use one or more of {', '.join(MODES)}.")
        if self.task == "search" and "full_context" in self.modes:
            raise ValueError("--task search has no context for --modes full_context; use --modes agent.")
        for name in ("num_samples", "chunk_size", "max_chunks", "max_memory_tokens", "max_answer_tokens",
                     "max_context_tokens", "batch_size", "recall_samples", "search_max_turns", "search_topk",
                     "search_max_new_tokens"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"Need --temperature >= 0 and 0 < --top_p <= 1, got {self.temperature}, {self.top_p}.")
        if self.answer_extraction not in ("strict", "lenient"):
            raise ValueError(f"--answer_extraction must be strict or lenient, got {self.answer_extraction!r}.")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1 rows per bucket, got {self.limit}.")

    def sampling(self, max_new_tokens: int):
        from memtrain.agent.generation import SamplingConfig

        return SamplingConfig(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            do_sample=self.temperature > 0,
            seed=self.seed,
        )

    def agent_config(self):
        from memtrain.agent.memory_agent import AgentConfig

        return AgentConfig(
            chunk_size=self.chunk_size,
            max_chunks=self.max_chunks,
            max_memory_tokens=self.max_memory_tokens,
            max_answer_tokens=self.max_answer_tokens,
        )
