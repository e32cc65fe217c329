"""Model calls submitted as soon as their input exists, instead of one batched call per agent step.

An agent's calls depend on each other only along a trajectory: memory ``t + 1`` needs memory ``t``, a recall probe
needs the memory it reads. Batching them step by step makes every trajectory of a step wait for the slowest one (a
memory that runs to its 1,024-token budget holds back every shorter one) and adds a prefill wave per step.

A :class:`StreamRequest` carries its own continuation (``on_done`` returns the calls its completion makes possible).
:func:`run_requests` executes them:

- on a generator with ``streaming = True`` (an in-process vLLM engine, one per process, or a vLLM server each
  process sends its own concurrent requests to; vLLM schedules requests continuously) each follow-up is submitted
  the moment its predecessor returns, so no trajectory waits for another;
- on any other generator (transformers ``generate``, calls that are collectives across processes) in waves:
  every pending request in ONE ``generate`` call, the follow-ups in the next. For the memory agent a wave is
  exactly one agent step, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from memtrain.agent.generation import GenerationOutput, Generator, SamplingConfig


@dataclass
class StreamRequest:
    """One prompt's ``n`` samples, and what to do with them.

    ``sampling.max_new_tokens`` is this request's own budget; ``sampling.seed`` (None: unseeded) is combined with
    ``key`` when the request runs on its own, so two requests of one seed still sample differently. ``on_done``
    receives the ``n`` completions (truncated to the budget) and returns the requests they make possible.
    """

    prompt_ids: list[int]
    n: int
    sampling: SamplingConfig
    on_done: Callable[[GenerationOutput], list[StreamRequest]]
    key: int = 0


@runtime_checkable
class StreamingGenerator(Protocol):
    """A generator that accepts requests while others run: ``stream`` returns when no request is left."""

    streaming: bool

    def stream(self, requests: list[StreamRequest]) -> None: ...


def request_seed(seed: int | None, key: int) -> int | None:
    """The seed of one request run on its own: distinct per key, reproducible."""
    return None if seed is None else (seed * 1_000_003 + key) % (2**63)


def is_streaming(generator: Generator) -> bool:
    return bool(getattr(generator, "streaming", False)) and callable(getattr(generator, "stream", None))


def run_requests(
    generator: Generator, requests: list[StreamRequest], wave_seed: Callable[[int], int | None] | None = None
) -> int:
    """Run ``requests`` and every follow-up they produce; returns the number of generator calls (0 when streamed).

    ``wave_seed(w)`` is the seed of wave ``w`` (1-based) where the generator has no streaming; by default the
    first request's seed.
    """
    if not requests:
        return 0
    if is_streaming(generator):
        generator.stream(list(requests))
        return 0
    waves = 0
    pending = list(requests)
    while pending:
        waves += 1
        seed = wave_seed(waves) if wave_seed is not None else pending[0].sampling.seed
        pending = _run_wave(generator, pending, seed)
    return waves


def _run_wave(generator: Generator, requests: list[StreamRequest], seed: int | None) -> list[StreamRequest]:
    """One ``generate`` call for every request: the largest budget, each completion cut to its own.

    Sampling is autoregressive, so a completion cut to its budget is distributed exactly as if generated under it.
    Requests of one ``n`` go as prompts with that ``n``; mixed ``n`` go as one row per sample.
    """
    budget = max(request.sampling.max_new_tokens for request in requests)
    uniform_n = len({request.n for request in requests}) == 1
    n = requests[0].n if uniform_n else 1
    prompts = [request.prompt_ids for request in requests for _ in range(1 if uniform_n else request.n)]
    sampling = replace(requests[0].sampling, max_new_tokens=budget, seed=seed)
    output = generator.generate(prompts, n=n, sampling=sampling)
    expected = sum(request.n for request in requests)
    if len(output.completion_ids) != expected:
        raise RuntimeError(
            f"The generator returned {len(output.completion_ids)} completions for {expected} requested samples; a "
            "Generator must return n completions per prompt."
        )
    follow_ups: list[StreamRequest] = []
    start = 0
    for request in requests:
        rows = range(start, start + request.n)
        start += request.n
        follow_ups.extend(request.on_done(cut_to_budget(output, rows, request.sampling.max_new_tokens)))
    return follow_ups


def cut_to_budget(output: GenerationOutput, rows: range, budget: int) -> GenerationOutput:
    """Rows ``rows`` of ``output``, each completion cut to ``budget`` tokens (then not ``finished``)."""
    ids = [list(output.completion_ids[k][:budget]) for k in rows]
    finished = [bool(output.finished[k]) and len(output.completion_ids[k]) <= budget for k in rows]
    logprobs = None if output.logprobs is None else [list(output.logprobs[k][:budget]) for k in rows]
    return GenerationOutput(completion_ids=ids, finished=finished, logprobs=logprobs)
