"""The OpenAI-compatible backend against a REAL server: `transformers serve` on loopback with a tiny model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, save_tiny_checkpoint

from memtrain.agent.generation import Generator, SamplingConfig
from memtrain.agent.openai_backend import TEXT, OpenAICompatibleGenerator


STARTUP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2_tokenizer_dir):
    """`transformers serve` pinned to a tiny random Llama in a tmp dir, on 127.0.0.1; stopped afterwards."""
    pytest.importorskip("fastapi", reason="transformers serve needs `pip install memtrain[serve]`")
    pytest.importorskip("uvicorn", reason="transformers serve needs `pip install memtrain[serve]`")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    folder = save_tiny_checkpoint(tokenizer, tmp_path_factory.mktemp("served") / "tiny", seed=3)

    cli = Path(sys.executable).parent / "transformers"
    if not cli.exists():
        pytest.skip(f"the `transformers` CLI is not next to {sys.executable}")
    port = free_port()
    log = folder.parent / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    command = [str(cli), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"transformers serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                    if json.loads(response.read()).get("status") == "ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve not up after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"base_url": base_url, "folder": folder, "tokenizer": tokenizer}
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def chat_prompt(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(rendered, add_special_tokens=False)


def test_greedy_matches_local_transformers_generate(served):
    tokenizer = served["tokenizer"]
    generator = OpenAICompatibleGenerator(served["base_url"], str(served["folder"]), tokenizer, max_concurrency=2)
    assert isinstance(generator, Generator)
    prompts = [chat_prompt(tokenizer, "Where is the Eiffel Tower?"), chat_prompt(tokenizer, "Name a river.")]
    sampling = SamplingConfig(max_new_tokens=6, do_sample=False)
    result = generator.generate(prompts, n=1, sampling=sampling)
    assert generator.mode == TEXT  # transformers serve takes text prompts and plain OpenAI fields only

    model = build_tiny_model(tokenizer, seed=3)
    for prompt, completion, finished in zip(prompts, result.completion_ids, result.finished):
        with torch.no_grad():
            expected = model.generate(
                torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )[0, len(prompt) :]
        assert tokenizer.decode(completion) == tokenizer.decode(expected, skip_special_tokens=True)
        assert finished == (len(expected) < 6 or expected[-1].item() == tokenizer.eos_token_id)
    assert result.logprobs is None  # transformers serve returns none


def test_n_samples_are_topped_up_when_the_server_ignores_n(served):
    tokenizer = served["tokenizer"]
    generator = OpenAICompatibleGenerator(served["base_url"], str(served["folder"]), tokenizer, max_concurrency=4)
    prompts = [chat_prompt(tokenizer, "Hello"), chat_prompt(tokenizer, "Goodbye")]
    result = generator.generate(prompts, n=3, sampling=SamplingConfig(max_new_tokens=4, seed=11))
    assert generator.supports_n is False
    assert len(result.completion_ids) == len(result.finished) == 6
    assert all(1 <= len(ids) <= 5 for ids in result.completion_ids)  # re-tokenized text may merge/split a little


def test_http_error_names_the_url_and_the_servers_reason(served):
    generator = OpenAICompatibleGenerator(served["base_url"] + "/v1/", "not-the-served-model", served["tokenizer"])
    with pytest.raises(RuntimeError) as info:
        generator.generate([[1, 2, 3]], sampling=SamplingConfig(max_new_tokens=2))
    message = str(info.value)
    assert f"{served['base_url']}/v1/completions" in message and "pinned" in message


def test_connection_refused_is_a_clear_error(tokenizer):
    port = free_port()  # nothing listens there once the socket is closed
    generator = OpenAICompatibleGenerator(f"http://127.0.0.1:{port}", "m", tokenizer, timeout=5)
    with pytest.raises(ConnectionError, match=rf"127\.0\.0\.1:{port}/v1/completions.*is it running"):
        generator.generate([[1, 2]], sampling=SamplingConfig(max_new_tokens=2))


def test_vllm_style_choice_gives_exact_ids_and_logprobs(tokenizer):
    """The parsing of a vLLM response (token ids + log-probs), as `vllm serve` returns it for the extras."""
    generator = OpenAICompatibleGenerator("http://127.0.0.1:9", "m", tokenizer)
    ids, finished, logprobs = generator._parse(
        {
            "text": "ignored",
            "token_ids": [5, 6, 2],
            "finish_reason": "stop",
            "logprobs": {"token_logprobs": [-1, -2, -3]},
        }
    )
    assert (ids, finished, logprobs) == ([5, 6, 2], True, [-1.0, -2.0, -3.0])
    ids, finished, logprobs = generator._parse(
        {
            "text": "x",
            "finish_reason": "length",
            "logprobs": {"tokens": ["token_id:7", "token_id:8"], "token_logprobs": [-0.5, None]},
        }
    )
    assert ids == [7, 8] and finished is False and logprobs[0] == -0.5
    ids, _, logprobs = generator._parse({"text": " Paris", "finish_reason": "stop"})
    assert ids == tokenizer.encode(" Paris", add_special_tokens=False) and logprobs is None
