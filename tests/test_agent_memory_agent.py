"""The batched memory loop on a tiny random Llama (real SmolLM2 tokenizer) through the real TransformersGenerator."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from memtrain.agent.generation import GenerationOutput, SamplingConfig, TransformersGenerator
from memtrain.agent.memory_agent import AgentConfig, MemoryAgent
from memtrain.agent.prompts import NO_MEMORY, PromptTemplates


PROBLEM = "Which river flows through Lyon?"
SMALL = AgentConfig(chunk_size=24, max_chunks=3, max_memory_tokens=5, max_answer_tokens=7)


def text_of_chunks(tokenizer, count: int, chunk_size: int = 24, word: str = "Lyon") -> str:
    """A text of exactly ``count * chunk_size`` tokens (each chunk distinguishable by its index)."""
    ids: list[int] = []
    for index in range(count):
        piece = tokenizer(f" {word} part {index} says the river is here.", add_special_tokens=False)["input_ids"]
        ids += (piece * chunk_size)[:chunk_size]
    return tokenizer.decode(ids)


@dataclass
class CountingGenerator:
    """Wraps the real generator and records what every call received."""

    inner: TransformersGenerator
    calls: list[dict] = field(default_factory=list)

    @property
    def sampling(self) -> SamplingConfig:
        return self.inner.sampling

    def generate(self, prompt_ids, n=1, sampling=None) -> GenerationOutput:
        self.calls.append({"prompt_ids": [list(p) for p in prompt_ids], "n": n, "sampling": sampling})
        return self.inner.generate(prompt_ids, n=n, sampling=sampling)


@pytest.fixture
def counting(tiny_model, tokenizer) -> CountingGenerator:
    return CountingGenerator(TransformersGenerator(tiny_model, tokenizer, SamplingConfig(seed=7)))


@pytest.fixture
def agent(tokenizer, counting) -> MemoryAgent:
    return MemoryAgent(tokenizer, counting, SMALL)


@pytest.fixture
def mixed(tokenizer) -> list[str]:
    """Documents of 3, 1 and 0 chunks in one batch."""
    return [text_of_chunks(tokenizer, 3), text_of_chunks(tokenizer, 1, word="Paris"), "   "]


def test_one_generator_call_per_step_for_the_whole_batch(agent, counting, mixed):
    trajectories = agent.rollout(mixed, [PROBLEM] * 3, n=2)
    assert len(trajectories) == 6
    assert [t.group for t in trajectories] == [0, 0, 1, 1, 2, 2]
    assert [t.num_chunks for t in trajectories] == [3, 3, 1, 1, 0, 0]
    # 3 chunks + 1 final turn for the longest document = 4 calls, whatever the batch size
    assert len(counting.calls) == 4
    first, *later = counting.calls
    assert first["n"] == 2 and len(first["prompt_ids"]) == 3  # unique prompts, n rollouts each
    assert [call["n"] for call in later] == [1, 1, 1]
    # step 2: doc 0 updates (2), doc 1 answers (2); step 3: doc 0 updates; step 4: doc 0 answers
    assert [len(call["prompt_ids"]) for call in later] == [4, 2, 2]
    assert [[c.kind for c in t.calls] for t in trajectories[::2]] == [
        ["update", "update", "update", "final"],
        ["update", "final"],
        ["final"],
    ]


def test_trajectory_prompts_are_exactly_what_the_generator_received(agent, counting, mixed):
    trajectories = agent.rollout(mixed, [PROBLEM] * 3, n=2)
    for index, trajectory in enumerate(trajectories):
        for call in trajectory.calls:
            received = counting.calls[call.step - 1]
            active = [t for t in trajectories if len(t.calls) >= call.step]
            position = active.index(trajectory) // received["n"]
            assert call.prompt_ids == received["prompt_ids"][position], (index, call.step)


def test_memories_replace_each_other_and_respect_their_cap(agent, tokenizer, mixed):
    trajectory = agent.rollout(mixed[:1], [PROBLEM])[0]
    updates = [call for call in trajectory.calls if call.kind == "update"]
    assert trajectory.memories[0] == NO_MEMORY
    assert len(trajectory.memories) == trajectory.num_chunks + 1
    for step, call in enumerate(updates, start=1):
        assert len(call.completion_ids) <= SMALL.max_memory_tokens
        assert len(call.logprobs) == len(call.completion_ids)
        assert trajectory.memories[step] == call.text
        assert call.text == tokenizer.decode(call.completion_ids, skip_special_tokens=True).strip()
    for step, call in enumerate(trajectory.calls[1:], start=1):
        prompt = tokenizer.decode(call.prompt_ids)
        memory_block = prompt.split("<memory>\n", 1)[1].split("\n</memory>", 1)[0]
        assert memory_block == trajectory.memories[step], "the prompt must hold only the latest memory"
    assert len(trajectory.calls[-1].completion_ids) <= SMALL.max_answer_tokens


def test_mixed_steps_truncate_each_completion_to_its_own_budget(agent, counting, mixed, tokenizer):
    trajectories = agent.rollout(mixed[:2], [PROBLEM] * 2)
    assert counting.calls[0]["sampling"].max_new_tokens == SMALL.max_memory_tokens  # updates only
    assert counting.calls[1]["sampling"].max_new_tokens == SMALL.max_answer_tokens  # doc 0 updates, doc 1 answers
    assert counting.calls[3]["sampling"].max_new_tokens == SMALL.max_answer_tokens  # final only
    for trajectory in trajectories:
        for call in trajectory.calls:
            budget = SMALL.max_memory_tokens if call.kind == "update" else SMALL.max_answer_tokens
            assert len(call.completion_ids) <= budget
            assert len(call.logprobs) == len(call.completion_ids)
            if call.finished:
                assert call.completion_ids[-1] == tokenizer.eos_token_id
    # the random model does not stop on its own: a memory cut from 7 to 5 tokens did not finish
    step_two_update = trajectories[0].calls[1]
    assert len(step_two_update.completion_ids) == SMALL.max_memory_tokens and not step_two_update.finished


def test_final_prompt_holds_problem_and_memory_but_no_chunk(agent, tokenizer, mixed):
    trajectory = agent.rollout(mixed[:1], [PROBLEM])[0]
    final = trajectory.calls[-1]
    assert final.kind == "final" and final.step == trajectory.num_chunks + 1
    prompt = tokenizer.decode(final.prompt_ids)
    assert PROBLEM in prompt and trajectory.memories[-1] in prompt
    assert "<section>" not in prompt
    assert all(chunk not in prompt for chunk in trajectory.chunks)
    assert trajectory.answer == final.text
    first = tokenizer.decode(trajectory.calls[0].prompt_ids)
    assert trajectory.chunks[0] in first and NO_MEMORY in first


def test_same_seed_same_rollout_other_seed_other_rollout(agent, mixed):
    sampling = SamplingConfig(seed=123)
    first = agent.rollout(mixed, [PROBLEM] * 3, n=2, sampling=sampling)
    again = agent.rollout(mixed, [PROBLEM] * 3, n=2, sampling=sampling)
    other = agent.rollout(mixed, [PROBLEM] * 3, n=2, sampling=SamplingConfig(seed=124))
    assert [t.to_dict() for t in first] == [t.to_dict() for t in again]
    assert [t.to_dict() for t in first] != [t.to_dict() for t in other]
    # the n rollouts of one document are distinct samples
    assert first[0].memories[1] != first[1].memories[1]


def test_empty_context_answers_from_the_initial_memory(agent, counting, tokenizer):
    trajectory = agent.rollout(["  \n "], [PROBLEM], doc_ids=["empty-doc"])[0]
    assert trajectory.doc_id == "empty-doc" and trajectory.chunks == []
    assert trajectory.memories == [NO_MEMORY]
    assert [(c.kind, c.step) for c in trajectory.calls] == [("final", 1)]
    assert len(counting.calls) == 1
    assert NO_MEMORY in tokenizer.decode(trajectory.calls[0].prompt_ids)


def test_over_long_problem_and_context_are_capped_and_reported(tokenizer, counting):
    config = AgentConfig(chunk_size=16, max_chunks=2, max_problem_tokens=12, max_memory_tokens=3, max_answer_tokens=3)
    agent = MemoryAgent(tokenizer, counting, config)
    long_problem = "Which river " + "really " * 60 + "flows through Lyon?"
    context = text_of_chunks(tokenizer, 5, chunk_size=16)
    trajectory = agent.rollout([context], [long_problem])[0]
    assert len(tokenizer(trajectory.problem, add_special_tokens=False)["input_ids"]) <= 12
    assert trajectory.metadata["problem_truncated_tokens"] > 0
    assert trajectory.num_chunks == 2 and trajectory.truncated_tokens == 5 * 16 - 32
    empty_template = len(agent.encode_chat(agent.templates.render_update("", "", "")))
    assert max(len(call.prompt_ids) for call in trajectory.calls) <= empty_template + 12 + 16 + 3 + 8


def test_encode_chat_is_one_user_turn_with_generation_prompt(agent, tokenizer):
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert agent.encode_chat("hi") == tokenizer(expected, add_special_tokens=False)["input_ids"]


def test_custom_templates_and_bad_configs(tokenizer, counting, mixed):
    config = AgentConfig(
        chunk_size=24, max_chunks=1, max_memory_tokens=2, max_answer_tokens=2,
        update_template="P={problem} M={memory} C={chunk} UPDATE", final_template="P={problem} M={memory} FINAL",
        no_memory_text="(empty)",
    )  # fmt: skip
    assert config.templates() == PromptTemplates(update=config.update_template, final=config.final_template)
    trajectory = MemoryAgent(tokenizer, counting, config).rollout(mixed[:1], [PROBLEM])[0]
    assert "M=(empty) C=" in tokenizer.decode(trajectory.calls[0].prompt_ids)
    assert tokenizer.decode(trajectory.calls[1].prompt_ids).rstrip().endswith("FINAL<|im_end|>\n<|im_start|>assistant")
    with pytest.raises(ValueError, match="missing \\{chunk\\}"):
        AgentConfig(update_template="{problem} {memory}")
    with pytest.raises(ValueError, match="AgentConfig.chunk_size"):
        AgentConfig(chunk_size=0)
    agent = MemoryAgent(tokenizer, counting, SMALL)
    with pytest.raises(ValueError, match="2 contexts but 1 problems"):
        agent.rollout(mixed[:2], [PROBLEM])
    with pytest.raises(ValueError, match="doc_ids"):
        agent.rollout(mixed[:2], [PROBLEM] * 2, doc_ids=["a"])
    assert agent.rollout([], []) == []


def test_answer_conveniences_return_raw_text(agent, mixed):
    answers = agent.answer_batch(mixed, [PROBLEM] * 3)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert agent.answer(mixed[0], PROBLEM) == answers[0]  # same seed, same first document


@pytest.mark.slow
def test_real_smollm2_reads_three_chunks_and_answers():
    from memtrain.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    facts = [
        "The old lighthouse on Kerrow Point was painted red in 1921.",
        "Its keeper, Maren Holt, kept a logbook of every passing ship.",
        "In 1934 the lighthouse was moved to the village of Dunmore.",
    ]
    filler = " The coast road there is narrow and the weather changes quickly."
    # one fact per 96-token chunk, padded with filler to fill the chunk
    ids: list[int] = []
    for fact in facts:
        piece = tokenizer(" " + fact + filler * 12, add_special_tokens=False)["input_ids"]
        ids += piece[:96]
    context = tokenizer.decode(ids)
    config = AgentConfig(chunk_size=96, max_chunks=3, max_memory_tokens=48, max_answer_tokens=32)
    generator = TransformersGenerator(model, tokenizer, SamplingConfig(do_sample=False))
    agent = MemoryAgent(tokenizer, generator, config)
    trajectory = agent.rollout([context], ["What colour was the lighthouse painted?"])[0]
    assert trajectory.num_chunks == 3
    assert [call.kind for call in trajectory.calls] == ["update"] * 3 + ["final"]
    assert all(memory.strip() for memory in trajectory.memories[1:]), "a real model writes a non-empty memory"
    assert all(len(call.completion_ids) <= 48 for call in trajectory.calls[:3])
    # greedy SmolLM2-135M carries the chunk-1 fact through two later overwrites and answers from it
    assert "painted red" in trajectory.memories[-1]
    assert "red" in trajectory.answer.lower()
