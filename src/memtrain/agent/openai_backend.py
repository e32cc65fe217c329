"""Generation through any OpenAI-compatible ``/v1/completions`` server (``vllm serve``, ``transformers serve``, ...).

Used for evaluation against a served model. Servers differ in what they accept, so the request shape is
negotiated once, on the first call, falling back on HTTP 400/422:

1. token-id prompts plus vLLM's ``return_token_ids`` / ``logprobs`` (exact ids and log-probs back);
2. decoded text prompts with the same extras;
3. decoded text prompts, plain OpenAI fields only (``transformers serve`` ends here).

Completion ids come from the response's token ids when given, else from ``token_id:<id>`` log-prob tokens, else
from re-tokenizing the text (then no EOS is appended: ``finished`` says how it ended). A server that ignores ``n``
is topped up with single-sample requests. Requests run on a thread pool, so one ``generate`` call is one logical
batch. Only the standard library is used (no ``openai`` package).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from memtrain.agent.generation import GenerationOutput, SamplingConfig


# Request shapes, most informative first.
IDS_WITH_EXTRAS = "token-id prompt + vLLM extras"
TEXT_WITH_EXTRAS = "text prompt + vLLM extras"
TEXT = "text prompt"
MODES = (IDS_WITH_EXTRAS, TEXT_WITH_EXTRAS, TEXT)
_EXTRAS = {"return_token_ids": True, "return_tokens_as_token_ids": True, "logprobs": 0}
_TOKEN_ID = re.compile(r"^token_id:(-?\d+)$")


class ServerRequestError(RuntimeError):
    """The server answered with an HTTP error; ``status`` lets the caller tell a rejected shape from a failure."""

    def __init__(self, url: str, status: int, body: str):
        self.url = url
        self.status = status
        self.body = body
        super().__init__(f"POST {url} answered HTTP {status}: {body[:500]}")


class OpenAICompatibleGenerator:
    """A :class:`~memtrain.agent.generation.Generator` over HTTP; ``tokenizer`` must be the served model's."""

    def __init__(
        self,
        base_url: str,
        model: str,
        tokenizer: Any,
        *,
        api_key: str | None = None,
        max_concurrency: int = 16,
        timeout: float = 600.0,
    ) -> None:
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else f"{base}/v1"
        self.url = f"{self.base_url}/completions"
        self.model = model
        self.tokenizer = tokenizer
        self.api_key = api_key
        self.max_concurrency = max(1, int(max_concurrency))
        self.timeout = timeout
        self.mode: str | None = None  # negotiated on the first request
        self.supports_n: bool | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ HTTP

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise ServerRequestError(self.url, error.code, error.read().decode(errors="replace")) from error
        except urllib.error.URLError as error:
            if isinstance(error.reason, (socket.timeout, TimeoutError)):
                raise TimeoutError(f"POST {self.url} timed out after {self.timeout} s") from error
            raise ConnectionError(
                f"could not reach the OpenAI-compatible server at {self.url} ({error.reason}); is it running, "
                "and is base_url right (e.g. http://127.0.0.1:8000/v1)?"
            ) from error
        except TimeoutError as error:
            raise TimeoutError(f"POST {self.url} timed out after {self.timeout} s") from error

    def _body(self, mode: str, prompt: list[int], n: int, sampling: SamplingConfig, seed: int | None) -> dict:
        greedy = not sampling.do_sample or sampling.temperature == 0
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt if mode == IDS_WITH_EXTRAS else self._decode(prompt),
            "max_tokens": int(sampling.max_new_tokens),
            "temperature": 0.0 if greedy else float(sampling.temperature),
            "top_p": 1.0 if greedy else float(sampling.top_p),
            "n": n,
        }
        if seed is not None:
            body["seed"] = seed
        if mode != TEXT:
            body.update(_EXTRAS)
            if not greedy and sampling.top_k and sampling.top_k > 0:
                body["top_k"] = int(sampling.top_k)  # not an OpenAI field: only sent with the vLLM extras
        return body

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _request(self, prompt: list[int], n: int, sampling: SamplingConfig, seed: int | None) -> list[dict]:
        """One request, negotiating the request shape on the first call; returns its choices by index."""
        if self.mode is not None:
            return self._choices(self._post(self._body(self.mode, prompt, n, sampling, seed)))
        with self._lock:
            if self.mode is not None:  # another thread negotiated meanwhile
                return self._choices(self._post(self._body(self.mode, prompt, n, sampling, seed)))
            rejected = []
            for mode in MODES:
                try:
                    choices = self._choices(self._post(self._body(mode, prompt, n, sampling, seed)))
                except ServerRequestError as error:
                    if error.status not in (400, 422):
                        raise
                    rejected.append(f"{mode}: HTTP {error.status} {error.body[:200]}")
                    continue
                self.mode = mode
                return choices
            raise RuntimeError(f"{self.url} rejected every request shape tried:\n  " + "\n  ".join(rejected))

    @staticmethod
    def _choices(response: dict[str, Any]) -> list[dict]:
        choices = response.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"the server's completion response has no choices: {str(response)[:300]}")
        return sorted(choices, key=lambda choice: choice.get("index", 0))

    # ------------------------------------------------------------------ parsing

    def _parse(self, choice: dict[str, Any]) -> tuple[list[int], bool, list[float] | None]:
        logprobs = choice.get("logprobs") or {}
        ids = choice.get("token_ids")
        if ids is None:
            tokens = logprobs.get("tokens") or []
            matches = [_TOKEN_ID.match(str(token)) for token in tokens]
            if tokens and all(matches):
                ids = [int(match.group(1)) for match in matches]
            else:
                ids = self.tokenizer.encode(choice.get("text") or "", add_special_tokens=False)
        ids = [int(token) for token in ids]
        values = logprobs.get("token_logprobs")
        chosen = None
        if values is not None and len(values) == len(ids):
            chosen = [float("nan") if value is None else float(value) for value in values]
        return ids, choice.get("finish_reason") == "stop", chosen

    # ------------------------------------------------------------------ Generator protocol

    def generate(
        self, prompt_ids: list[list[int]], n: int = 1, sampling: SamplingConfig | None = None
    ) -> GenerationOutput:
        """All prompts' requests run concurrently; results come back prompt-major (n samples per prompt)."""
        sampling = sampling or SamplingConfig()
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if not prompt_ids:
            return GenerationOutput(completion_ids=[], finished=[], logprobs=[])
        base_seed = sampling.seed

        def seed_for(prompt_index: int, sample: int) -> int | None:
            # distinct per (prompt, sample) so identical prompts of a group never share a seed
            return None if base_seed is None else base_seed + prompt_index * n + sample

        def one_prompt(index: int) -> list[dict]:
            prompt = list(prompt_ids[index])
            if self.supports_n is False:
                return [self._request(prompt, 1, sampling, seed_for(index, k))[0] for k in range(n)]
            choices = self._request(prompt, n, sampling, seed_for(index, 0))
            if len(choices) < n:  # the server ignores `n`: top up one sample at a time
                self.supports_n = False
                for sample in range(len(choices), n):
                    choices.append(self._request(prompt, 1, sampling, seed_for(index, sample))[0])
            elif n > 1:
                self.supports_n = True
            return choices[:n]

        indices = list(range(len(prompt_ids)))
        if self.mode is None or (n > 1 and self.supports_n is None):
            first = [one_prompt(0)]  # settle the request shape (and `n` support) before fanning out
            indices = indices[1:]
        else:
            first = []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, max(1, len(indices)))) as pool:
            per_prompt = first + list(pool.map(one_prompt, indices))

        completion_ids, finished, logprobs = [], [], []
        for choices in per_prompt:
            for choice in choices:
                ids, done, values = self._parse(choice)
                completion_ids.append(ids)
                finished.append(done)
                logprobs.append(values)
        all_logprobs = None if any(values is None for values in logprobs) else logprobs
        return GenerationOutput(completion_ids=completion_ids, finished=finished, logprobs=all_logprobs)
