"""vLLM backends up to the GPU call: the pure conversions, and TRL's real VLLMClient against a loopback stand-in
for the vLLM server (only the HTTP server is faked; there is no GPU here)."""

from __future__ import annotations

import importlib.util
import json
import math
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from memtrain.agent.generation import GenerationOutput, Generator, SamplingConfig
from memtrain.agent.vllm_backend import (
    VLLMGenerator,
    VLLMServerGenerator,
    client_output_to_generation_output,
    request_outputs_to_generation_output,
    stream_to_server,
    vllm_sampling_kwargs,
)


# Small stand-ins with the fields of vllm.outputs.RequestOutput / CompletionOutput and vllm.logprobs.Logprob.
@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


def completion(index, ids, reason, logprobs=True):
    positions = [{token: Logprob(-0.5 * (k + 1), rank=1)} for k, token in enumerate(ids)] if logprobs else None
    return CompletionOutput(index, "", ids, None, positions, finish_reason=reason)


# ---------------------------------------------------------------- SamplingConfig -> SamplingParams kwargs


def test_sampling_kwargs_defaults_follow_the_paper():
    kwargs = vllm_sampling_kwargs(SamplingConfig(max_new_tokens=64), n=8)
    assert kwargs == {
        "n": 8,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "max_tokens": 64,
        "seed": None,
        "logprobs": 0,
    }


def test_sampling_kwargs_greedy_topk_and_per_prompt_seed():
    greedy = vllm_sampling_kwargs(SamplingConfig(do_sample=False, temperature=0.7, top_p=0.9, top_k=5))
    assert (greedy["temperature"], greedy["top_p"], greedy["top_k"]) == (0.0, 1.0, 0)
    sampled = vllm_sampling_kwargs(SamplingConfig(temperature=0.7, top_p=0.9, top_k=5, seed=10), prompt_index=3)
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"], sampled["seed"]) == (0.7, 0.9, 5, 13)
    assert vllm_sampling_kwargs(SamplingConfig(top_k=-1))["top_k"] == 0
    with pytest.raises(ValueError, match="n must be at least 1"):
        vllm_sampling_kwargs(SamplingConfig(), n=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        vllm_sampling_kwargs(SamplingConfig(max_new_tokens=0))


# ---------------------------------------------------------------- RequestOutputs -> GenerationOutput


def test_request_outputs_become_prompt_major_with_chosen_logprobs():
    outputs = [
        RequestOutput("0", [1, 2], [completion(1, [7, 2], "stop"), completion(0, [5, 6, 9], "length")]),
        RequestOutput("1", [3], [completion(0, [4], "stop"), completion(1, [8, 8], "abort")]),
    ]
    result = request_outputs_to_generation_output(outputs, n=2)
    assert isinstance(result, GenerationOutput)
    assert result.completion_ids == [[5, 6, 9], [7, 2], [4], [8, 8]]  # samples ordered by their index
    assert result.finished == [False, True, True, False]
    assert result.logprobs == [[-0.5, -1.0, -1.5], [-0.5, -1.0], [-0.5], [-0.5, -1.0]]


def test_request_outputs_without_logprobs_or_with_wrong_n():
    outputs = [RequestOutput("0", [1], [completion(0, [3], "stop", logprobs=False)])]
    assert request_outputs_to_generation_output(outputs, n=1).logprobs is None
    with pytest.raises(ValueError, match="returned 1 completions for prompt 0, expected n=2"):
        request_outputs_to_generation_output(outputs, n=2)


def test_vllm_generator_needs_one_source_and_names_the_install():
    with pytest.raises(ValueError, match="exactly one"):
        VLLMGenerator()
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ImportError, match=r"pip install memtrain\[vllm\]"):
            VLLMGenerator(model="smollm2-135m")


def test_awake_wakes_and_sleeps_a_sleep_mode_engine_once():
    """The engine is the GPU part, so it is the one thing stood in for here."""

    class Engine:
        def __init__(self):
            self.events = []

        def wake_up(self, tags=None):
            self.events.append("wake")

        def sleep(self, level=1):
            self.events.append(f"sleep{level}")

    engine = Engine()
    generator = VLLMGenerator(llm=engine, enable_sleep_mode=True, sleep_level=2)
    with generator.awake():
        with generator.awake():
            pass
    assert engine.events == ["wake", "sleep2"]
    with VLLMGenerator(llm=engine).awake():  # no sleep mode: untouched
        pass
    assert engine.events == ["wake", "sleep2"]


# ---------------------------------------------------------------- VLLMClient output -> GenerationOutput


def test_client_output_conversion_picks_chosen_logprob_and_infers_finished():
    output = {
        "prompt_ids": [[1], [2]],
        "completion_ids": [[5, 2], [6, 7, 8], [9], [4, 4, 4]],
        "logprobs": [[[-0.1, -2.0], [-0.2]], [[-0.3], [-0.4], [-0.5]], [[-0.6]], [[-1.0], [-1.1], [None]]],
        "logprob_token_ids": [[[3, 5], [2]], [[6], [7], [8]], [[9]], [[4], [4], [4]]],
    }
    result = client_output_to_generation_output(output, n=2, max_tokens=3, eos_token_ids=[2])
    assert result.completion_ids == [[5, 2], [6, 7, 8], [9], [4, 4, 4]]
    assert result.finished == [True, False, True, False]  # EOS / hit max_tokens / stopped early / hit max_tokens
    assert result.logprobs[0] == [-2.0, -0.2]  # token 5 was ranked second
    assert math.isnan(result.logprobs[3][2])
    assert client_output_to_generation_output({"completion_ids": [[1]], "logprobs": None}, 1, 4).logprobs is None
    with pytest.raises(ValueError, match="not a multiple of n=2"):
        client_output_to_generation_output({"completion_ids": [[1]]}, n=2, max_tokens=4)
    bad = {"completion_ids": [[1]], "logprobs": [[[-0.1]]], "logprob_token_ids": [[[3]]]}
    with pytest.raises(ValueError, match="token 1 has no log-prob"):
        client_output_to_generation_output(bad, n=1, max_tokens=4)


# ---------------------------------------------------------------- VLLMServerGenerator over HTTP


EOS = 2


def fake_completion(prompt: list[int], sample: int, seed: int | None, max_tokens: int) -> list[int]:
    """Deterministic in (prompt, sample, seed); even samples stop early on EOS."""
    base = sum(prompt) + 31 * sample + (seed or 0) * 7
    ids = [10 + (base + j) % 50 for j in range(max_tokens)]
    return ids[: max_tokens - 1] + [EOS] if sample % 2 == 0 else ids


class FakeVLLMServer(BaseHTTPRequestHandler):
    """Speaks the slice of `vllm serve`'s API that TRL's VLLMClient uses for generation."""

    requests: list[dict] = []

    def log_message(self, *args):
        pass

    def _send(self, payload: dict, status: int = 200):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            self._send({})
        elif self.path == "/v1/models":
            self._send({"data": [{"id": "tiny"}]})
        else:
            self._send({"error": "not found"}, 404)

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(payload)
        choices = []
        for prompt in payload["prompt"]:
            for sample in range(payload["n"]):
                ids = fake_completion(prompt, sample, payload.get("seed"), payload["max_tokens"])
                tokens = [f"token_id:{token}" for token in ids]
                values = [-0.01 * token for token in ids]
                choices.append(
                    {
                        "prompt_token_ids": prompt,
                        "token_ids": ids,
                        "logprobs": {
                            "tokens": tokens,
                            "token_logprobs": values,
                            "top_logprobs": [{t: v} for t, v in zip(tokens, values)],
                        },
                    }
                )
        self._send({"choices": choices})


@pytest.fixture
def vllm_server(monkeypatch):
    import trl.generation.vllm_client as vllm_client

    monkeypatch.setattr(vllm_client, "is_vllm_available", lambda *args, **kwargs: True)  # no GPU wheel here
    FakeVLLMServer.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLMServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_server_generator_one_request_per_unseeded_batch(vllm_server):
    generator = VLLMServerGenerator(vllm_server, eos_token_ids=[EOS])
    assert isinstance(generator, Generator)
    prompts = [[1, 2, 3], [4, 5]]
    result = generator.generate(prompts, n=2, sampling=SamplingConfig(max_new_tokens=4))
    assert len(FakeVLLMServer.requests) == 1
    request = FakeVLLMServer.requests[0]
    assert request["prompt"] == prompts and request["n"] == 2 and request["return_token_ids"] is True
    assert request["logprobs"] == 0 and "seed" not in request
    expected = [fake_completion(p, s, None, 4) for p in prompts for s in range(2)]
    assert result.completion_ids == expected
    assert result.finished == [True, False, True, False]
    assert result.logprobs == [[-0.01 * t for t in ids] for ids in expected]


def test_server_generator_seeds_each_prompt_so_group_copies_differ(vllm_server):
    generator = VLLMServerGenerator(vllm_server, eos_token_ids=[EOS])
    prompts = [[7, 7], [7, 7], [7, 7]]  # a GRPO group: the same prompt, n=1 each
    sampling = SamplingConfig(max_new_tokens=5, seed=100)
    first = generator.generate(prompts, n=1, sampling=sampling)
    assert sorted(r["seed"] for r in FakeVLLMServer.requests) == [100, 101, 102]
    assert len({tuple(ids) for ids in first.completion_ids}) == 3  # not identical copies
    assert generator.generate(prompts, n=1, sampling=sampling).completion_ids == first.completion_ids  # seeded
    assert generator.generate([], n=1).completion_ids == []


def test_server_generator_streams_the_memory_loop_one_request_per_call(vllm_server):
    """The memory agent over a server: every call is its own request (streamed, no per-step batch), each with its own
    seed, so the G copies of a document still sample differently, reproducibly."""
    from transformers import AutoTokenizer

    from memtrain.agent.memory_agent import AgentConfig, MemoryAgent
    from memtrain.models import resolve_model_path

    generator = VLLMServerGenerator(vllm_server, eos_token_ids=[EOS])
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    config = AgentConfig(chunk_size=40, max_chunks=2, max_problem_tokens=32, max_memory_tokens=6, max_answer_tokens=4)
    context = " ".join(f"The harbour of Quito trades cloth, entry {n}." for n in range(12))

    def run() -> list:
        FakeVLLMServer.requests = []
        agent = MemoryAgent(tokenizer, generator, config)
        return agent.rollout([context], ["Which city?"], n=3, sampling=SamplingConfig(seed=5))

    trajectories = run()
    requests = list(FakeVLLMServer.requests)
    assert all(len(r["prompt"]) == 1 for r in requests), [(len(r["prompt"]), r["n"]) for r in requests]
    # the 3 copies' first update shares one prompt (one request, n = 3); then every call is a request of its own
    assert [r["n"] for r in requests[:1]] == [3] and [r["n"] for r in requests[1:]] == [1] * 6
    assert sum(len(t.calls) for t in trajectories) == 3 * 3  # 2 updates + the answer, x 3
    assert len({r["seed"] for r in requests}) == len(requests)
    assert len({tuple(t.calls[0].completion_ids) for t in trajectories}) == 3  # the copies differ
    assert [t.answer for t in run()] == [t.answer for t in trajectories]  # seeded: the same again


def test_server_generator_unreachable_server_is_a_clear_error(monkeypatch):
    import trl.generation.vllm_client as vllm_client

    monkeypatch.setattr(vllm_client, "is_vllm_available", lambda *args, **kwargs: True)
    with socket_free_port() as port:
        pass
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        VLLMServerGenerator(f"http://127.0.0.1:{port}")


def socket_free_port():
    import contextlib
    import socket

    @contextlib.contextmanager
    def reserve():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            yield sock.getsockname()[1]

    return reserve()


# ---------------------------------------------------------------------------------------------- streamed HTTP requests
def test_stream_to_server_sends_each_follow_up_as_soon_as_its_request_returns():
    """A slow request (a long memory) does not hold back another trajectory's next call; completions return in
    each request's own order; the most sequences in flight are counted with each request's n."""
    from memtrain.agent.request_stream import StreamRequest

    log: list[str] = []
    lock = threading.Lock()

    def send(request: StreamRequest) -> GenerationOutput:
        time.sleep(1.0 if request.key == 0 else 0.05)  # trajectory 0's first call is slow
        with lock:
            log.append(f"done {request.key}")
        ids = [[request.key] * request.sampling.max_new_tokens for _ in range(request.n)]
        return GenerationOutput(completion_ids=ids, finished=[True] * request.n, logprobs=None)

    def chain(key: int, calls: int, n: int = 1) -> StreamRequest:
        def on_done(output: GenerationOutput) -> list[StreamRequest]:
            assert len(output.completion_ids) == n and output.completion_ids[0][0] == key % 10
            return [chain(key + 10, calls - 1)] if calls > 1 else []

        return StreamRequest([1, 2], n, SamplingConfig(max_new_tokens=3), on_done, key=key % 10)

    peak = stream_to_server(send, [chain(0, 1), chain(1, 3, n=2)], max_in_flight=4)
    # trajectory 1 made all 3 of its calls while trajectory 0's first one still ran: no step barrier
    assert log == ["done 1", "done 1", "done 1", "done 0"], log
    assert peak == 3  # 1 + 2 sequences at the start


def test_stream_to_server_bounds_requests_in_flight_and_raises_what_a_request_raised():
    from memtrain.agent.request_stream import StreamRequest

    open_now, most = [0], [0]
    lock = threading.Lock()

    def send(request: StreamRequest) -> GenerationOutput:
        with lock:
            open_now[0] += 1
            most[0] = max(most[0], open_now[0])
        time.sleep(0.05)
        with lock:
            open_now[0] -= 1
        if request.key == 7:
            raise ConnectionError("server went away")
        return GenerationOutput(completion_ids=[[1]], finished=[True], logprobs=None)

    requests = [StreamRequest([1], 1, SamplingConfig(max_new_tokens=1), lambda out: [], key=k) for k in range(6)]
    assert stream_to_server(send, requests, max_in_flight=2) == 2 and most[0] == 2
    failing = [StreamRequest([1], 1, SamplingConfig(max_new_tokens=1), lambda out: [], key=k) for k in (6, 7)]
    with pytest.raises(ConnectionError, match="server went away"):
        stream_to_server(send, failing)
