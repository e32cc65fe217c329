"""Requests and their follow-ups on a generator without streaming: one real ``generate`` call per wave."""

from __future__ import annotations

from memtrain.agent.generation import GenerationOutput, SamplingConfig, TransformersGenerator
from memtrain.agent.request_stream import StreamRequest, cut_to_budget, is_streaming, request_seed, run_requests


class Recording(TransformersGenerator):
    """The real generator, recording each call's prompts, n and budget."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[int, int, int]] = []

    def generate(self, prompt_ids, n=1, sampling=None):
        self.calls.append((len(prompt_ids), n, sampling.max_new_tokens))
        return super().generate(prompt_ids, n=n, sampling=sampling)


def test_follow_ups_run_in_the_next_wave_each_cut_to_its_own_budget(tiny_model, tokenizer):
    generator = Recording(tiny_model, tokenizer, min_new_tokens=6)
    seen: dict[str, GenerationOutput] = {}

    def request(name: str, n: int, budget: int, then: list[StreamRequest] | None = None) -> StreamRequest:
        def on_done(output: GenerationOutput) -> list[StreamRequest]:
            seen[name] = output
            return then or []

        return StreamRequest(tokenizer("a b c")["input_ids"], n, SamplingConfig(max_new_tokens=budget), on_done)

    probe = request("probe", 3, 2)
    waves = run_requests(generator, [request("memory", 1, 4, [request("next", 1, 5), probe]), request("other", 1, 6)])

    assert waves == 2
    # wave 1: two prompts with n = 1 at the larger budget; wave 2: mixed n, one row per sample (1 + 3)
    assert generator.calls == [(2, 1, 6), (4, 1, 5)]
    assert [len(c) for c in seen["memory"].completion_ids] == [4] and not seen["memory"].finished[0]
    assert [len(c) for c in seen["other"].completion_ids] == [6]
    assert [len(c) for c in seen["probe"].completion_ids] == [2, 2, 2]
    assert all(len(lp) == 2 for lp in seen["probe"].logprobs)
    assert not is_streaming(generator)


def test_cut_to_budget_keeps_finished_only_for_completions_that_fit():
    output = GenerationOutput(
        completion_ids=[[1, 2, 9], [3, 9]], finished=[True, True], logprobs=[[0.1] * 3, [0.2] * 2]
    )
    cut = cut_to_budget(output, range(2), 2)
    assert cut.completion_ids == [[1, 2], [3, 9]] and cut.finished == [False, True]
    assert cut.logprobs == [[0.1, 0.1], [0.2, 0.2]]


def test_request_seeds_differ_per_key_and_repeat():
    assert request_seed(None, 3) is None
    assert request_seed(5, 1) != request_seed(5, 2) and request_seed(5, 1) == request_seed(5, 1)
