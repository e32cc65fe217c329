"""Generation backends behind one interface: a whole batch of token-id prompts in, completions out.

The memory loop calls :meth:`Generator.generate` ONCE per step for every active trajectory, so a backend must
batch internally (transformers ``generate`` with left padding, vLLM, or concurrent HTTP requests).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList


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

    @classmethod
    def concatenate(cls, parts: list[GenerationOutput]) -> GenerationOutput:
        """The parts' completions in order; log-probs only when every part has them (one per completion or none)."""
        has_logprobs = all(part.logprobs is not None for part in parts)
        return cls(
            completion_ids=[ids for part in parts for ids in part.completion_ids],
            finished=[done for part in parts for done in part.finished],
            logprobs=[lp for part in parts for lp in part.logprobs] if has_logprobs else None,
        )


@runtime_checkable
class Generator(Protocol):
    def generate(
        self, prompt_ids: list[list[int]], n: int = 1, sampling: SamplingConfig | None = None
    ) -> GenerationOutput: ...


class _RawLogprobRecorder(LogitsProcessor):
    """Records, step by step, the log-prob of each chosen token under the model's RAW logits.

    Only one step's ``log_softmax`` is held at a time (a (batch, vocab) tensor), unlike ``output_logits=True``,
    which keeps every step's logits alive until the end. It must see the logits before any other processor: the
    generator runs ``generate`` with a clean generation config so that no default processor precedes it, and it
    enforces ``min_new_tokens`` itself, after recording, so that suppressing EOS does not bend the recorded values.
    """

    def __init__(self, prompt_length: int, eos_token_ids: list[int], min_new_tokens: int = 0) -> None:
        self.prompt_length = prompt_length
        self.eos_token_ids = eos_token_ids
        self.min_new_tokens = min_new_tokens
        self.previous: torch.Tensor | None = None
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self.logprobs.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        if input_ids.shape[1] - self.prompt_length < self.min_new_tokens and self.eos_token_ids:
            scores = scores.clone()
            scores[:, self.eos_token_ids] = -float("inf")
        return scores

    def finish(self, sequences: torch.LongTensor) -> torch.Tensor:
        """(batch, generated) log-probs, closing the last step with the token sampled from it."""
        generated = sequences.shape[1] - self.prompt_length
        if len(self.logprobs) < generated:
            if self.previous is None or len(self.logprobs) != generated - 1:
                raise RuntimeError("The log-prob recorder missed generation steps; was another processor first?")
            position = self.prompt_length + len(self.logprobs)
            self.logprobs.append(self.previous.gather(1, sequences[:, position : position + 1]).squeeze(1))
        if generated == 0:
            return torch.zeros(sequences.shape[0], 0)
        return torch.stack(self.logprobs[:generated], dim=1)


class TransformersGenerator:
    """A :class:`Generator` on transformers ``model.generate``: the whole batch (prompts x n) in one call.

    Prompts are left-padded with an attention mask, each repeated ``n`` times (prompt-major output). Sampling
    follows ``SamplingConfig`` only: the model's own ``generation_config`` sampling defaults (a checkpoint's
    ``top_k=20`` or ``repetition_penalty``) are ignored during the call, because the trainer assumes completions
    were sampled exactly as configured. ``temperature == 0`` or ``do_sample=False`` means greedy decoding.

    ``logprobs`` are ``log_softmax`` of the model's RAW logits (no temperature, top-k or top-p) at each chosen
    token: the trainer compares them with its own forward pass, which also sees raw logits.

    ``max_batch_size`` splits a very large batch into several ``generate`` calls (still one :meth:`generate`
    call from the agent's point of view). ``min_new_tokens`` forbids EOS before that many tokens (benchmarks
    use it to force equal lengths); the recorded log-probs stay those of the raw logits.
    """

    def __init__(
        self,
        model,
        tokenizer,
        sampling: SamplingConfig | None = None,
        max_batch_size: int | None = None,
        min_new_tokens: int = 0,
    ) -> None:
        if max_batch_size is not None and max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be a positive number of sequences or None, got {max_batch_size}.")
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling or SamplingConfig()
        self.max_batch_size = max_batch_size
        self.min_new_tokens = min_new_tokens
        self.eos_token_ids = self._eos_token_ids()
        self.pad_token_id = self._pad_token_id()

    def _eos_token_ids(self) -> list[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError(
                "Neither the model's generation_config nor the tokenizer defines an EOS token; set "
                "model.generation_config.eos_token_id so generation can stop."
            )
        return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]

    def _pad_token_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, getattr(self.model.generation_config, "pad_token_id", None)):
            if candidate is not None:
                return int(candidate)
        return self.eos_token_ids[0]

    def _check_positions(self, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
        """Refuse a call whose prompt + budget exceeds the model's positions: past them it answers garbage, rc 0."""
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        longest = max((len(ids) for ids in prompt_ids), default=0)
        if isinstance(limit, int) and longest + max_new_tokens > limit:
            raise ValueError(
                f"a prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's {limit} positions "
                "(max_position_embeddings); lower chunk_size, max_memory_tokens, max_problem_tokens or the token "
                "budget (or give the full-context mode less text)."
            )

    def _generation_config(self, sampling: SamplingConfig) -> GenerationConfig:
        greedy = not sampling.do_sample or sampling.temperature == 0
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not greedy,
            num_beams=1,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            bos_token_id=getattr(self.model.generation_config, "bos_token_id", None),
            use_cache=True,
        )
        if not greedy:
            config.temperature = sampling.temperature
            config.top_p = sampling.top_p
            config.top_k = sampling.top_k
        return config

    def generate(
        self, prompt_ids: list[list[int]], n: int = 1, sampling: SamplingConfig | None = None
    ) -> GenerationOutput:
        sampling = sampling or self.sampling
        if n < 1:
            raise ValueError(f"n (samples per prompt) must be >= 1, got {n}.")
        if sampling.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {sampling.max_new_tokens}.")
        for index, ids in enumerate(prompt_ids):
            if len(ids) == 0:
                raise ValueError(f"Prompt {index} is empty; every prompt needs at least one token.")
        self._check_positions(prompt_ids, sampling.max_new_tokens)
        rows = [list(ids) for ids in prompt_ids for _ in range(n)]
        if not rows:
            return GenerationOutput(completion_ids=[], finished=[], logprobs=[])
        size = self.max_batch_size or len(rows)
        batches = [rows[start : start + size] for start in range(0, len(rows), size)]

        was_training = self.model.training
        # Only our explicit settings count: the model's defaults would otherwise fill every unset field. A PEFT
        # wrapper delegates generate() to its base model, whose generation_config is the one consulted.
        owner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        model_config = owner.generation_config
        owner.generation_config = GenerationConfig(
            eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id, bos_token_id=model_config.bos_token_id
        )
        self.model.eval()
        output = GenerationOutput(completion_ids=[], finished=[], logprobs=[])
        try:
            with torch.no_grad(), self._seeded(sampling.seed):
                for batch in batches:
                    ids, finished, logprobs = self._generate_batch(batch, sampling)
                    output.completion_ids.extend(ids)
                    output.finished.extend(finished)
                    output.logprobs.extend(logprobs)
        finally:
            owner.generation_config = model_config
            self.model.train(was_training)
        return output

    @contextmanager
    def _seeded(self, seed: int | None) -> Iterator[None]:
        """Seed a forked RNG so a seeded call is reproducible without disturbing the caller's random state."""
        if seed is None:
            yield
            return
        device = self.model.device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
            torch.manual_seed(seed)
            yield

    def _generate_batch(
        self, rows: list[list[int]], sampling: SamplingConfig
    ) -> tuple[list[list[int]], list[bool], list[list[float]]]:
        device = self.model.device
        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, ids in enumerate(rows):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        recorder = _RawLogprobRecorder(width, self.eos_token_ids, min(self.min_new_tokens, sampling.max_new_tokens))
        sequences = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=self._generation_config(sampling),
            logits_processor=LogitsProcessorList([recorder]),
        )
        logprobs = recorder.finish(sequences).cpu()
        generated = sequences[:, width:].cpu()
        eos = set(self.eos_token_ids)
        completions, finished, token_logprobs = [], [], []
        for row in range(len(rows)):
            tokens = generated[row].tolist()
            end = next((i + 1 for i, token in enumerate(tokens) if token in eos), None)
            finished.append(end is not None)
            end = len(tokens) if end is None else end
            completions.append(tokens[:end])
            token_logprobs.append(logprobs[row, :end].tolist())
        return completions, finished, token_logprobs
