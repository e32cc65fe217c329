"""Generation backends behind one interface: a whole batch of token-id prompts in, completions out.

The memory loop calls :meth:`Generator.generate` ONCE per step for every active trajectory, so a backend must
batch internally (transformers ``generate`` with left padding, vLLM, or concurrent HTTP requests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass
class SamplingConfig:
    """Sampling settings shared by every backend (the paper samples at temperature 1.0, top_p 1.0)."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True
    seed: int | None = None


@dataclass
class GenerationOutput:
    """Completions in prompt-major order: prompt 0's ``n`` samples, then prompt 1's, ...

    ``completion_ids`` exclude the prompt and any padding; a trailing EOS is kept when generation ended on it,
    with ``finished`` true. ``logprobs`` are the sampling-time log-probabilities of each completion token under
    the unmodified model distribution (None when the backend cannot return them).
    """

    completion_ids: list[list[int]]
    finished: list[bool]
    logprobs: list[list[float]] | None = None


@runtime_checkable
class Generator(Protocol):
    def generate(
        self, prompt_ids: list[list[int]], n: int = 1, sampling: SamplingConfig | None = None
    ) -> GenerationOutput: ...
