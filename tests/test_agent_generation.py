"""TransformersGenerator on a tiny random Llama over the real SmolLM2 vocabulary."""

from __future__ import annotations

import pytest
import torch

from memtrain.agent.generation import GenerationOutput, Generator, SamplingConfig, TransformersGenerator


GREEDY = SamplingConfig(max_new_tokens=6, do_sample=False)


@pytest.fixture
def prompts(tokenizer) -> list[list[int]]:
    texts = ["Hello", "The river that flows through Lyon is called", "Name one planet."]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def forward_logprobs(model, prompt: list[int], completion: list[int]) -> list[float]:
    """Log-probs of ``completion`` after ``prompt`` from one unpadded forward pass (the trainer's view)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[len(prompt) - 1 + k, token].item() for k, token in enumerate(completion)]


def test_it_is_a_generator(tiny_model, tokenizer):
    assert isinstance(TransformersGenerator(tiny_model, tokenizer), Generator)


@pytest.mark.parametrize("sampling", [GREEDY, SamplingConfig(max_new_tokens=6, temperature=0.7, top_k=5, seed=3)])
def test_logprobs_are_raw_model_logprobs_of_the_chosen_tokens(tiny_model, tokenizer, prompts, sampling):
    output = TransformersGenerator(tiny_model, tokenizer).generate(prompts, n=2, sampling=sampling)
    assert len(output.completion_ids) == len(output.logprobs) == len(output.finished) == 6
    for row, (completion, logprobs) in enumerate(zip(output.completion_ids, output.logprobs)):
        expected = forward_logprobs(tiny_model, prompts[row // 2], completion)
        assert len(logprobs) == len(completion) == 6
        assert logprobs == pytest.approx(expected, abs=1e-4)


def test_left_padded_batch_matches_each_prompt_alone(tiny_model, tokenizer, prompts):
    generator = TransformersGenerator(tiny_model, tokenizer)
    batched = generator.generate(prompts, n=1, sampling=GREEDY)
    alone = [generator.generate([prompt], n=1, sampling=GREEDY).completion_ids[0] for prompt in prompts]
    assert batched.completion_ids == alone


def test_output_is_prompt_major(tiny_model, tokenizer, prompts):
    generator = TransformersGenerator(tiny_model, tokenizer)
    output = generator.generate(prompts, n=3, sampling=GREEDY)
    single = generator.generate(prompts, n=1, sampling=GREEDY).completion_ids
    assert output.completion_ids == [ids for ids in single for _ in range(3)]


def test_seed_makes_sampling_reproducible_and_leaves_global_rng_alone(tiny_model, tokenizer, prompts):
    generator = TransformersGenerator(tiny_model, tokenizer)
    sampling = SamplingConfig(max_new_tokens=8, seed=11)
    torch.manual_seed(0)
    first = generator.generate(prompts, n=2, sampling=sampling)
    after_call = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after_call), "a seeded call must not consume the caller's random stream"
    assert generator.generate(prompts, n=2, sampling=sampling) == first
    other = generator.generate(prompts, n=2, sampling=SamplingConfig(max_new_tokens=8, seed=12))
    assert other.completion_ids != first.completion_ids
    assert first.completion_ids[0] != first.completion_ids[1], "the n samples of one prompt must differ"


def test_top_k_one_sampling_is_greedy(tiny_model, tokenizer, prompts):
    generator = TransformersGenerator(tiny_model, tokenizer)
    sampled = generator.generate(prompts, sampling=SamplingConfig(max_new_tokens=6, top_k=1, seed=5))
    assert sampled.completion_ids == generator.generate(prompts, sampling=GREEDY).completion_ids
    zero_temperature = generator.generate(prompts, sampling=SamplingConfig(max_new_tokens=6, temperature=0.0))
    assert zero_temperature.completion_ids == sampled.completion_ids


def test_model_generation_defaults_do_not_leak_into_sampling(tiny_model, tokenizer, prompts):
    tiny_model.generation_config.top_k = 1  # a checkpoint default that would make sampling greedy
    tiny_model.generation_config.do_sample = False
    generator = TransformersGenerator(tiny_model, tokenizer)
    sampled = generator.generate(prompts, n=2, sampling=SamplingConfig(max_new_tokens=6, seed=5))
    greedy = generator.generate(prompts, n=2, sampling=GREEDY)
    assert sampled.completion_ids != greedy.completion_ids
    assert tiny_model.generation_config.top_k == 1, "the model's generation config must be restored"


def test_eos_is_kept_and_marks_finished_rows(tiny_model, tokenizer, prompts):
    greedy = TransformersGenerator(tiny_model, tokenizer).generate(prompts, sampling=GREEDY).completion_ids
    stop = greedy[1][2]  # make the third greedy token of prompt 1 the end-of-sequence token
    tiny_model.generation_config.eos_token_id = stop
    output = TransformersGenerator(tiny_model, tokenizer).generate(prompts, sampling=GREEDY)
    for completion, finished, reference in zip(output.completion_ids, output.finished, greedy):
        if stop in reference:
            end = reference.index(stop) + 1
            assert completion == reference[:end] and finished
        else:
            assert completion == reference and not finished
    assert output.completion_ids[1][-1] == stop and len(output.completion_ids[1]) <= 3
    assert [len(lp) for lp in output.logprobs] == [len(ids) for ids in output.completion_ids]


def test_min_new_tokens_forbids_early_eos_without_bending_logprobs(tiny_model, tokenizer, prompts):
    greedy = TransformersGenerator(tiny_model, tokenizer).generate(prompts, sampling=GREEDY).completion_ids
    tiny_model.generation_config.eos_token_id = greedy[0][0]
    generator = TransformersGenerator(tiny_model, tokenizer, min_new_tokens=6)
    output = generator.generate(prompts, sampling=SamplingConfig(max_new_tokens=6, seed=2))
    assert [len(ids) for ids in output.completion_ids] == [6, 6, 6]
    for row, completion in enumerate(output.completion_ids):
        assert output.logprobs[row] == pytest.approx(forward_logprobs(tiny_model, prompts[row], completion), abs=1e-4)


def test_max_batch_size_splits_generate_calls_with_identical_results(tiny_model, tokenizer, prompts):
    calls = []
    real_generate = tiny_model.generate

    def counting_generate(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return real_generate(*args, **kwargs)

    tiny_model.generate = counting_generate
    whole = TransformersGenerator(tiny_model, tokenizer).generate(prompts, n=2, sampling=GREEDY)
    split = TransformersGenerator(tiny_model, tokenizer, max_batch_size=4).generate(prompts, n=2, sampling=GREEDY)
    assert calls == [6, 4, 2]
    assert split == whole


def test_training_mode_is_restored_and_no_graph_is_built(tiny_model, tokenizer, prompts):
    tiny_model.train()
    output = TransformersGenerator(tiny_model, tokenizer).generate(prompts, sampling=GREEDY)
    assert tiny_model.training
    assert all(isinstance(value, float) for row in output.logprobs for value in row)


def test_bad_requests_are_rejected_clearly(tiny_model, tokenizer, prompts):
    generator = TransformersGenerator(tiny_model, tokenizer)
    with pytest.raises(ValueError, match="Prompt 1 is empty"):
        generator.generate([prompts[0], []])
    with pytest.raises(ValueError, match="n \\(samples per prompt\\)"):
        generator.generate(prompts, n=0)
    with pytest.raises(ValueError, match="max_batch_size"):
        TransformersGenerator(tiny_model, tokenizer, max_batch_size=0)
    assert generator.generate([]) == GenerationOutput(completion_ids=[], finished=[], logprobs=[])


def test_peft_wrapped_model_samples_by_our_settings_and_restores_its_config(tiny_model, tokenizer, prompts):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_model.get_base_model().generation_config.top_k = 1
    generator = TransformersGenerator(peft_model, tokenizer)
    sampled = generator.generate(prompts, n=2, sampling=SamplingConfig(max_new_tokens=5, seed=5))
    greedy = generator.generate(prompts, n=2, sampling=SamplingConfig(max_new_tokens=5, do_sample=False))
    assert sampled.completion_ids != greedy.completion_ids
    assert peft_model.get_base_model().generation_config.top_k == 1
    for row, completion in enumerate(sampled.completion_ids):
        expected = forward_logprobs(peft_model, prompts[row // 2], completion)
        assert sampled.logprobs[row] == pytest.approx(expected, abs=1e-4)


def test_a_prompt_and_budget_past_the_models_positions_are_refused(tokenizer):
    """SmolLM2 has 8,192 positions: an 8,415-token chunk answered garbage with exit 0; now one clear error."""
    from conftest import build_tiny_model

    model = build_tiny_model(tokenizer)
    model.config.max_position_embeddings = 40
    generator = TransformersGenerator(model, tokenizer, SamplingConfig(max_new_tokens=8, do_sample=False))
    fits, too_long = [[5] * 32], [[5] * 30, [5] * 33]
    assert len(generator.generate(fits).completion_ids[0]) <= 8  # 32 + 8 = 40 positions: exactly fits
    with pytest.raises(ValueError, match=r"a prompt of 33 tokens \+ 8 new tokens exceeds the model's 40 positions"):
        generator.generate(too_long)
    with pytest.raises(ValueError, match=r"a prompt of 32 tokens \+ 9 new tokens exceeds .*lower chunk_size"):
        generator.generate(fits, sampling=SamplingConfig(max_new_tokens=9, do_sample=False))
