"""The memory agent's read-and-overwrite loop (MemAgent's memory, PAPER.md section 1), batched over trajectories.

Step ``t`` shows every still-reading trajectory its problem, its memory and chunk ``t``; the reply replaces the
memory. A trajectory that has read all its chunks answers from the problem and its memory alone in the next step,
while longer documents keep reading. Each step is ONE generator call for all active trajectories, so the cost of a
rollout is ``max_chunks + 1`` batched calls whatever the batch size.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from memtrain.agent.chunking import ChunkedContext, cap_problem, chunk_context
from memtrain.agent.generation import GenerationOutput, Generator, SamplingConfig
from memtrain.agent.prompts import NO_MEMORY, PromptTemplates, encode_chat, require_chat_template
from memtrain.agent.request_stream import StreamRequest, run_requests
from memtrain.agent.trajectory import ModelCall, Trajectory


@dataclass
class AgentConfig:
    """How the memory agent reads: chunk and token budgets, initial memory and prompt templates."""

    chunk_size: int = field(default=5000, metadata={"help": "Tokens per context chunk (paper: 5,000)."})
    max_chunks: int = field(
        default=8,
        metadata={"help": "Chunks read at most; a longer context is centre-truncated to chunk_size * max_chunks."},
    )
    max_problem_tokens: int = field(
        default=1024, metadata={"help": "Token budget of the problem; a longer problem keeps its beginning."}
    )
    max_memory_tokens: int = field(
        default=1024, metadata={"help": "New tokens per memory update; the memory never grows beyond this."}
    )
    max_answer_tokens: int = field(default=1024, metadata={"help": "New tokens of the final answer."})
    no_memory_text: str = field(default=NO_MEMORY, metadata={"help": "The memory shown before any chunk is read."})
    update_template: str | None = field(
        default=None,
        metadata={"help": "Update prompt ({problem}, {memory}, {chunk}); None uses the paper's wording."},
    )
    final_template: str | None = field(
        default=None, metadata={"help": "Final prompt ({problem}, {memory}); None uses the paper's wording."}
    )
    recall_template: str | None = field(
        default=None, metadata={"help": "Recall prompt ({memory}, {chunk}); None uses the paper's wording."}
    )

    def __post_init__(self) -> None:
        for name in ("chunk_size", "max_chunks", "max_problem_tokens", "max_memory_tokens", "max_answer_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"AgentConfig.{name} must be a positive integer, got {value!r}.")
        self.templates()  # fail at configuration time, not mid-rollout, on a template missing a placeholder

    def templates(self) -> PromptTemplates:
        overrides = {"update": self.update_template, "final": self.final_template, "recall": self.recall_template}
        return PromptTemplates(**{name: text for name, text in overrides.items() if text is not None})


@dataclass
class _Request:
    """One trajectory's prompt in one step."""

    trajectory: int
    kind: str
    prompt_ids: list[int]


def _step_seed(seed: int | None, step: int) -> int | None:
    """Step ``t``'s seed, derived from ``(seed, t)``."""
    return None if seed is None else (seed * 1_000_003 + step) % (2**63)


class _StepProgress:
    """Calls ``on_step(step, steps)`` once every trajectory has made its call of that step, steps in order."""

    def __init__(self, trajectories: list[Trajectory], on_step: Callable[[int, int], None] | None) -> None:
        self.on_step = on_step
        self.steps = max((trajectory.num_chunks for trajectory in trajectories), default=0) + 1
        self.expected = Counter(step for t in trajectories for step in range(1, t.num_chunks + 2))
        self.made: Counter[int] = Counter()
        self.reported = 0

    def done(self, step: int) -> None:
        self.made[step] += 1
        while self.reported < self.steps and self.made[self.reported + 1] == self.expected[self.reported + 1]:
            self.reported += 1
            if self.on_step is not None:
                self.on_step(self.reported, self.steps)


class MemoryAgent:
    """Reads long contexts chunk by chunk into a bounded, overwritten memory, then answers from the memory."""

    def __init__(self, tokenizer, generator: Generator, config: AgentConfig | None = None) -> None:
        require_chat_template(tokenizer, "memory agent")
        self.tokenizer = tokenizer
        self.generator = generator
        self.config = config or AgentConfig()
        self.templates = self.config.templates()

    def encode_chat(self, user_text: str) -> list[int]:
        """Token ids of one user turn followed by the assistant header (the trainer builds recall prompts so)."""
        return encode_chat(self.tokenizer, user_text)

    def chunk(self, context: str) -> ChunkedContext:
        return chunk_context(self.tokenizer, context, self.config.chunk_size, self.config.max_chunks)

    def _decode(self, completion_ids: list[int]) -> str:
        """A completion as text: EOS, padding and other special tokens dropped, surrounding whitespace stripped."""
        return self.tokenizer.decode(completion_ids, skip_special_tokens=True).strip()

    def rollout(
        self,
        contexts: list[str],
        problems: list[str],
        n: int = 1,
        doc_ids: list[str] | None = None,
        sampling: SamplingConfig | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[Trajectory]:
        """``n`` rollouts per document, document-major (document 0's ``n`` first), ``group`` = document index.

        ``on_step(step, steps)`` is called after each agent step (a long text is many steps: minutes in all).

        ``sampling`` (default: the generator's own ``sampling`` attribute, else ``SamplingConfig()``) sets
        temperature, top-p/k and the seed; ``max_new_tokens`` comes from the agent config. A seeded rollout is
        deterministic: step ``t`` uses a seed derived from ``(seed, t)``.

        Without a streaming generator, a step that mixes memory updates and final answers makes one call with the
        larger token budget and truncates each completion to its own budget: sampling is autoregressive, so the
        truncated completion is distributed exactly as if it had been generated under its own budget.
        """
        return self.run(self.prepare(contexts, problems, n, doc_ids), n=n, sampling=sampling, on_step=on_step)

    def prepare(
        self, contexts: list[str], problems: list[str], n: int = 1, doc_ids: list[str] | None = None
    ) -> list[Trajectory]:
        """``n`` empty trajectories per document (chunked, problem capped), document-major, not yet generated."""
        if len(contexts) != len(problems):
            raise ValueError(f"rollout got {len(contexts)} contexts but {len(problems)} problems; pass one each.")
        if doc_ids is not None and len(doc_ids) != len(contexts):
            raise ValueError(f"rollout got {len(doc_ids)} doc_ids for {len(contexts)} contexts; pass one each.")
        if n < 1:
            raise ValueError(f"n (rollouts per document) must be >= 1, got {n}.")
        doc_ids = [str(i) for i in range(len(contexts))] if doc_ids is None else [str(d) for d in doc_ids]
        trajectories: list[Trajectory] = []
        for index, (context, problem) in enumerate(zip(contexts, problems)):
            if not isinstance(context, str) or not isinstance(problem, str):
                raise TypeError(
                    f"Document {index} ({doc_ids[index]}): context and problem must be strings, got "
                    f"{type(context).__name__} and {type(problem).__name__}."
                )
            chunked = self.chunk(context)
            capped, dropped = cap_problem(self.tokenizer, problem, self.config.max_problem_tokens)
            for sample in range(n):
                trajectories.append(
                    Trajectory(
                        doc_id=doc_ids[index],
                        group=index,
                        problem=capped,
                        chunks=list(chunked.chunks),
                        memories=[self.config.no_memory_text],
                        truncated_tokens=chunked.truncated_tokens,
                        metadata={
                            "sample": sample,
                            "context_tokens": chunked.total_tokens,
                            "problem_truncated_tokens": dropped,
                        },
                    )
                )
        return trajectories

    def run(
        self,
        trajectories: list[Trajectory],
        n: int = 1,
        sampling: SamplingConfig | None = None,
        on_step: Callable[[int, int], None] | None = None,
        after_update: Callable[[int, Trajectory], list[StreamRequest]] | None = None,
    ) -> list[Trajectory]:
        """Roll out prepared trajectories (``n`` consecutive copies per document share their first prompt).

        Each trajectory's next call is a :class:`StreamRequest` made when its previous one returns: on a streaming
        generator (an in-process vLLM engine) it runs at once, so no trajectory waits for the slowest of its step;
        elsewhere one generator call per step. ``after_update(i, trajectory)`` runs after each memory update and
        returns further requests that need that memory (recall probes), run beside the agent's own.
        """
        sampling = sampling or getattr(self.generator, "sampling", None) or SamplingConfig()
        progress = _StepProgress(trajectories, on_step)
        first = []
        for start in range(0, len(trajectories), n):
            group = list(range(start, min(start + n, len(trajectories))))
            requests = [self._request(i, trajectories[i], 1) for i in group]
            if any(request.prompt_ids != requests[0].prompt_ids for request in requests):
                raise RuntimeError("Rollouts of one document must share their first prompt.")
            first.append(self._stream_request(trajectories, group, requests[0], 1, sampling, progress, after_update))
        run_requests(self.generator, first, lambda wave: _step_seed(sampling.seed, wave))
        return trajectories

    def _stream_request(
        self,
        trajectories: list[Trajectory],
        indices: list[int],
        request: _Request,
        step: int,
        sampling: SamplingConfig,
        progress: _StepProgress,
        after_update: Callable[[int, Trajectory], list[StreamRequest]] | None,
    ) -> StreamRequest:
        """The call of ``request`` (for the trajectories ``indices``: one, or a group's copies at step 1)."""
        budget = self.config.max_memory_tokens if request.kind == "update" else self.config.max_answer_tokens

        def on_done(output: GenerationOutput) -> list[StreamRequest]:
            if len(output.completion_ids) != len(indices):
                raise RuntimeError(
                    f"The generator returned {len(output.completion_ids)} completions for {len(indices)} requested "
                    "samples; a Generator must return n completions per prompt."
                )
            follow_ups: list[StreamRequest] = []
            for k, index in enumerate(indices):
                trajectory = trajectories[index]
                self._record(trajectory, request.kind, step, request.prompt_ids, output, k)
                progress.done(step)
                if request.kind == "final":
                    continue
                if after_update is not None:
                    follow_ups.extend(after_update(index, trajectory))
                following = self._request(index, trajectory, step + 1)
                follow_ups.append(
                    self._stream_request(trajectories, [index], following, step + 1, sampling, progress, after_update)
                )
            return follow_ups

        step_sampling = replace(sampling, max_new_tokens=budget, seed=_step_seed(sampling.seed, step))
        return StreamRequest(request.prompt_ids, len(indices), step_sampling, on_done, key=indices[0])

    def _request(self, index: int, trajectory: Trajectory, step: int) -> _Request:
        memory = trajectory.memories[-1]
        if step <= trajectory.num_chunks:
            text = self.templates.render_update(trajectory.problem, memory, trajectory.chunks[step - 1])
            return _Request(index, "update", self.encode_chat(text))
        return _Request(index, "final", self.encode_chat(self.templates.render_final(trajectory.problem, memory)))

    def _record(
        self, trajectory: Trajectory, kind: str, step: int, prompt_ids: list[int], output: GenerationOutput, k: int
    ) -> None:
        completion = list(output.completion_ids[k])
        logprobs = None if output.logprobs is None else list(output.logprobs[k])
        text = self._decode(completion)
        trajectory.calls.append(
            ModelCall(
                kind=kind,
                step=step,
                prompt_ids=prompt_ids,
                completion_ids=completion,
                text=text,
                logprobs=logprobs,
                finished=bool(output.finished[k]),
            )
        )
        if kind == "update":
            trajectory.memories.append(text)
        else:
            trajectory.answer = text

    def answer(self, context: str, problem: str) -> str:
        """Read one context and answer one problem (raw answer text, ``\\boxed{}`` not extracted)."""
        return self.answer_batch([context], [problem])[0]

    def answer_batch(self, contexts: list[str], problems: list[str]) -> list[str]:
        return [trajectory.answer for trajectory in self.rollout(contexts, problems, n=1)]
