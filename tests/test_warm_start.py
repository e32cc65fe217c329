"""The small-model warm start: self-supervised recall and update turns, trained on the replies only."""

from __future__ import annotations

import pytest
import torch

from memtrain.agent.generation import SamplingConfig, TransformersGenerator
from memtrain.agent.memory_agent import AgentConfig, MemoryAgent
from memtrain.agent.prompts import TARGET_TOKEN
from memtrain.agent.recall import default_entity_tools
from memtrain.data.corpus import builtin_corpus_path, load_corpus
from memtrain.warm_start import build_warm_start_examples, warm_start


@pytest.fixture(scope="module")
def contexts() -> list[str]:
    paragraphs = load_corpus(str(builtin_corpus_path("wiki-sample")), limit=60).paragraphs
    return ["\n\n".join(p["text"] for p in paragraphs[i : i + 3]) for i in range(0, 60, 3)]


@pytest.fixture(scope="module")
def entity_tools():
    return default_entity_tools()  # the real spaCy rule


def _agent(tokenizer, model) -> MemoryAgent:
    config = AgentConfig(chunk_size=64, max_chunks=3, max_memory_tokens=24, max_answer_tokens=8)
    return MemoryAgent(tokenizer, TransformersGenerator(model, tokenizer, SamplingConfig()), config)


def _between(text: str, tag: str) -> str:
    return text.split(f"<{tag}>")[1].split(f"</{tag}>")[0]


def test_examples_are_half_recall_half_update_and_need_no_labels(tokenizer, tiny_model, contexts, entity_tools):
    agent = _agent(tokenizer, tiny_model)
    problems = ["Which entity is [MASK]?"] * len(contexts)
    examples = build_warm_start_examples(contexts, problems, agent, *entity_tools, num_examples=10, seed=0)

    recall = [e for e in examples if e.entity]
    update = [e for e in examples if not e.entity]
    assert len(recall) == 5 and len(update) == 5
    for example in recall:
        prompt = tokenizer.decode(example.prompt_ids)
        assert example.prompt_ids == agent.encode_chat(prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0])
        assert tokenizer.decode(example.target_ids) == f"\\boxed{{{example.entity}}}<|im_end|>"
        assert example.entity in _between(prompt, "memory")  # answerable from the memory ...
        section = _between(prompt, "section")
        assert TARGET_TOKEN in section and example.entity.lower() not in section.lower()  # ... and not from the chunk
    for example in update:
        prompt, reply = tokenizer.decode(example.prompt_ids), tokenizer.decode(example.target_ids)
        assert "Updated memory:" in prompt and reply.endswith("<|im_end|>")
        copy = reply.removesuffix("<|im_end|>")
        assert copy and copy in _between(prompt, "section")  # the plain copy of the chunk's head ...
        assert len(tokenizer.encode(copy, add_special_tokens=False)) <= 24 + 1  # ... within the memory budget

    again = build_warm_start_examples(contexts, problems, agent, *entity_tools, num_examples=10, seed=0)
    other = build_warm_start_examples(contexts, problems, agent, *entity_tools, num_examples=10, seed=1)
    assert [e.prompt_ids for e in again] == [e.prompt_ids for e in examples]
    assert [e.prompt_ids for e in other] != [e.prompt_ids for e in examples]
    assert build_warm_start_examples(contexts, problems, agent, *entity_tools, num_examples=0) == []


def test_warm_start_fits_the_replies_and_moves_only_trainable_weights(tokenizer, tiny_model, contexts, entity_tools):
    agent = _agent(tokenizer, tiny_model)
    examples = build_warm_start_examples(contexts, ["p"] * len(contexts), agent, *entity_tools, num_examples=4, seed=0)
    tiny_model.model.layers[1].self_attn.q_proj.weight.requires_grad_(False)
    frozen = tiny_model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    trained = tiny_model.model.layers[0].mlp.up_proj.weight.detach().clone()

    losses = warm_start(tiny_model, examples, learning_rate=1e-2, epochs=25, batch_size=4, seed=0)

    assert len(losses) == 25
    assert losses[-1] < 0.5 * losses[0]
    assert torch.equal(tiny_model.model.layers[1].self_attn.q_proj.weight, frozen)
    assert not torch.equal(tiny_model.model.layers[0].mlp.up_proj.weight, trained)
    assert not tiny_model.training  # the caller's mode is restored
    with pytest.raises(ValueError, match="learning_rate > 0"):
        warm_start(tiny_model, examples, learning_rate=0.0)
    assert warm_start(tiny_model, [], learning_rate=1e-3) == []
