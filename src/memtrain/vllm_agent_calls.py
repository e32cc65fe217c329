"""How MemTrainer's agent calls reach TRL's vLLM engine: a mixin of ``memtrain.vllm_rollouts.MemTrainVLLMGeneration``.

TRL's ``VLLMGeneration.generate`` is one batch per call under one ``SamplingParams``: in server mode it gathers every
process's prompts to the main process and slices the completions back by equal widths, and over a colocated
tensor-parallel group it pads every process to the widest batch. A memory agent makes many calls of different sizes
and budgets per process, so:

- ``stream``: each call is submitted as soon as its input exists, sampled with TRL's settings. Colocated, into the
  in-process engine (:func:`memtrain.agent.vllm_backend.stream_on_engine`; the processes of a tensor-parallel group
  stream together, each its own requests); in server mode as this process's own HTTP requests from its own client
  (:func:`memtrain.agent.vllm_backend.stream_to_server`), the main process alone syncing.
- ``generate``: where a call cannot be streamed (a structured-outputs regex, which TRL builds per call) over a
  tensor-parallel group, one engine call over every process's own prompts at its own budget.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from memtrain.agent.generation import GenerationOutput
    from memtrain.agent.request_stream import StreamRequest
    from memtrain.agent.vllm_backend import EngineGroup


def _has_images(images: Any) -> bool:
    return images is not None and any(image is not None for image in images)


def is_vllm_engine(llm: Any) -> bool:
    """vLLM's own ``LLM`` (the CPU backend's packing concerns only it, not another engine behind the same calls)."""
    return type(llm).__module__.split(".")[0] == "vllm"


class AgentCallsMixin:
    """The agents' calls on TRL's engine: streamed where the engine allows, else rounds at each process's budget.

    Mixed in before TRL's ``VLLMGeneration``, whose attributes it reads (``mode``, ``llm``, ``tp_group``, sampling
    settings, ``vllm_client``, ``accelerator``).
    """

    @property
    def streams(self) -> bool:
        """Whether agent calls can be streamed: always in server mode (each process sends its own requests, which the
        server batches continuously); in colocate mode on a vLLM engine, one per process or one per tensor-parallel
        group (whose processes stream together, see :func:`memtrain.agent.vllm_backend.stream_on_engine`), with no
        structured outputs (TRL builds those per call)."""
        if self.mode == "server":
            return True
        return (
            self.mode == "colocate"
            and is_vllm_engine(getattr(self, "llm", None))
            and getattr(self, "structured_outputs_regex", None) is None
            and "structured_outputs" not in (self.generation_kwargs or {})
        )

    def stream(self, requests: list[StreamRequest]) -> int:
        """Run agent requests and their follow-ups on the colocated engine as they appear, sampled as TRL's
        ``generate`` samples (its temperature, top-p/k, min-p, repetition penalty, generation_kwargs); returns the
        most sequences that ran at once (bounded by the KV cache, see :func:`stream_on_engine`).

        Over a tensor-parallel group every process of the group streams together, each with its own requests (a
        process with none joins with an empty list)."""
        if self.mode == "server":
            return self._stream_to_server(requests)
        from memtrain.agent.vllm_backend import stream_on_engine

        def params_of(request: StreamRequest) -> Any:
            return self._sampling_params(request.n, request.sampling.max_new_tokens)

        lora = self._lora_request if self.lora_sync else None
        return stream_on_engine(self.llm, requests, params_of, lora_request=lora, group=self._engine_group())

    def _engine_group(self) -> EngineGroup | None:
        """The processes that drive this colocated engine together: its tensor-parallel group (None alone)."""
        if int(self.tensor_parallel_size) == 1:
            return None
        import torch.distributed as dist

        from memtrain.agent.vllm_backend import EngineGroup

        size, group = int(self.tensor_parallel_size), self.tp_group

        def share(mine: Any) -> list[Any]:
            everyone: list[Any] = [None] * size
            dist.all_gather_object(everyone, mine, group=group)
            return everyone

        return EngineGroup(rank=dist.get_rank(group=group), share=share)

    def _stream_to_server(self, requests: list[StreamRequest]) -> int:
        """Server mode: this process's requests go out as concurrent HTTP requests from its own client, sampled with
        TRL's settings; no process gathers another's prompts, pads with fillers or waits for another's calls."""
        from memtrain.agent.vllm_backend import client_output_to_generation_output, stream_to_server

        client = self._process_client()

        def send(request: StreamRequest) -> GenerationOutput:
            output = client.generate(
                prompts=[list(request.prompt_ids)], **self._sampling_of(request.n, request.sampling.max_new_tokens),
                structured_outputs_regex=self.structured_outputs_regex, generation_kwargs=self.generation_kwargs,
            )  # fmt: skip
            return client_output_to_generation_output(output, request.n, request.sampling.max_new_tokens)

        return stream_to_server(send, requests)

    def _sampling_of(self, n: int, max_tokens: int) -> dict[str, Any]:
        """Sampling as TRL's ``generate`` samples (its temperature, top-p/k, min-p, repetition penalty, log-probs),
        with a call's own ``n`` and budget: vLLM ``SamplingParams`` keywords, which are also
        ``VLLMClient.generate``'s."""
        return {
            "n": n, "repetition_penalty": self.repetition_penalty, "temperature": self.temperature,
            "top_p": self.top_p, "top_k": self.top_k, "min_p": 0.0 if self.min_p is None else self.min_p,
            "max_tokens": max_tokens, "logprobs": self.logprobs,
        }  # fmt: skip

    def _sampling_params(self, n: int, max_tokens: int) -> Any:
        """vLLM ``SamplingParams`` as TRL's colocated ``generate`` builds them (``generation_kwargs`` on top, and a
        structured-outputs regex), with this call's ``n`` and budget."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        kwargs = {**self._sampling_of(n, max_tokens), **(self.generation_kwargs or {})}
        if self.structured_outputs_regex is not None:
            kwargs["structured_outputs"] = StructuredOutputsParams(regex=self.structured_outputs_regex)
        elif isinstance(kwargs.get("structured_outputs"), dict):
            kwargs["structured_outputs"] = StructuredOutputsParams(**kwargs["structured_outputs"])
        return SamplingParams(**kwargs)

    def generate(self, prompts: list[list[int]], images: Any, num_generations: int, profiler: Any = None) -> tuple:
        """TRL's ``generate``, except for a colocated engine split over a tensor-parallel group: there
        :meth:`_generate_in_group`, where each process's prompts keep their own number and budget."""
        if self.mode == "colocate" and int(self.tensor_parallel_size) > 1 and not _has_images(images):
            return self._generate_in_group(prompts, profiler)
        return super().generate(prompts, images, num_generations, profiler)

    def _generate_in_group(self, prompts: list[list[int]], profiler: Any = None) -> tuple:
        """One ``llm.generate`` over the prompts of every process of this tensor-parallel group, each process's
        sampled to its own budget (``max_completion_length`` as that process set it for this call).

        TRL gathers equally wide batches under one ``SamplingParams``, so a process with fewer prompts pads with
        fillers, and every filler and every short call decodes to the widest budget of the group. Here the group
        gathers each process's prompts and budget as they are; a process with nothing to generate adds no prompt,
        and a group with nothing to generate skips the engine. Every process of the group then holds the same
        inputs, as vLLM's tensor-parallel workers require, and takes back its own slice.
        """
        import torch.distributed as dist
        from accelerate.utils import is_peft_model
        from trl.generation.vllm_generation import extract_logprobs

        group = self._engine_group()
        gathered = group.share((list(prompts), int(self.max_completion_length)))
        everyone = [ids for group_prompts, _ in gathered for ids in group_prompts]
        if not everyone:
            return [], [], [], []
        sampling = [self._sampling_params(1, budget) for group_prompts, budget in gathered for _ in group_prompts]
        if self.enable_sleep_mode:
            self.llm.wake_up(tags=["kv_cache"])
        if is_peft_model(self.model):  # TRL's drain before vLLM's TP collectives (huggingface/trl#3671)
            on_gpu = self.accelerator.device.type == "cuda"
            dist.barrier(device_ids=[self.accelerator.local_process_index] if on_gpu else None)
        with profiler or contextlib.nullcontext():
            outputs = self.llm.generate(
                [{"prompt_token_ids": ids} for ids in everyone], sampling_params=sampling, use_tqdm=False
            )
        if self.enable_sleep_mode:
            self.llm.sleep(level=2)
            self._llm_weights_sleeping = True
        start = sum(len(group_prompts) for group_prompts, _ in gathered[: group.rank])
        mine = slice(start, start + len(prompts))
        logprobs, logprob_token_ids = extract_logprobs(outputs)
        return (
            [list(output.prompt_token_ids) for output in outputs][mine],
            [list(c.token_ids) for output in outputs for c in output.outputs][mine],
            None if logprobs is None else logprobs[mine],
            None if logprob_token_ids is None else logprob_token_ids[mine],
        )

    def _process_client(self) -> Any:
        """This process's HTTP client to the server: TRL's on the main process (it holds the weight-transfer group),
        a plain one on the others, naming the model the main process last made the server serve."""
        client = getattr(self, "vllm_client", None)
        if client is None:
            if self._own_client is None:
                self._own_client = self._http_client()
            client = self._own_client
        if self._served_model is not None:
            client.model = self._served_model
        return client

    def _http_client(self) -> Any:
        """A ``VLLMClient`` to the configured server that opens no weight-transfer group (HTTP only)."""
        from trl.generation.vllm_client import VLLMClient

        base_url = self.server_base_url or f"http://{self.server_host}:{self.server_port}"
        return VLLMClient(base_url=base_url, group_port=self.group_port, connection_timeout=self.server_timeout)

    _own_client: Any = None  # server mode, processes other than the main one: their own HTTP client
    _served_model: str | None = None  # server mode: the model name requests name (the last adapter with lora_sync)

    def _share_served_model(self) -> None:
        """Server mode, after a sync: every process learns what the server now serves, and none sends a request
        before the main process has finished the sync (the broadcast is the barrier)."""
        from accelerate.utils import broadcast_object_list

        if self.accelerator.num_processes == 1:
            return
        name = [self.vllm_client.model if self.accelerator.is_main_process else None]
        broadcast_object_list(name, from_process=0)
        self._served_model = name[0]
