"""The MEM1-style search agent: parsing, budgets, one generator call per turn, multi-question EM.

Two kinds of real models drive the rollouts, both through the real ``TransformersGenerator``:

- the tiny random Llama (``tiny_model``): it never writes a tag, so it exercises the malformed path and the turn
  budget, whatever it generates;
- a "chain" Llama whose weights are set by hand so that it writes a chosen text (see :func:`build_chain_model`):
  a real forward pass and a real ``generate``, used to walk the search and answer paths deterministically.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from memtrain.agent.generation import GenerationOutput, SamplingConfig, TransformersGenerator
from memtrain.agent.prompts import encode_chat
from memtrain.agent.search_agent import (
    INITIAL_STATE,
    INVALID_ACTION,
    SearchAgent,
    SearchAgentConfig,
    action_end,
    multi_exact_match,
    parse_turn,
    row_questions,
    split_answers,
    truncate_to_tokens,
)
from memtrain.retrieval import Retriever, load_passages


CORPUS = Path(__file__).parent / "fixtures" / "search" / "dpr_passages_200.jsonl"


def build_chain_model(tokenizer, text: str, hidden_size: int = 64):
    """A Llama whose greedy AND sampled output after the chat prompt is ``text`` (then it loops on its tail).

    Its layers are switched off (zero attention/MLP output projections), so the logits at a position depend only on
    that position's token: a bigram table. Each token of ``text`` gets a one-hot embedding and the untied LM head
    maps it to its successor with a logit of 80 (others 0). The assistant header's last token starts the chain.
    A token of ``text`` that must be followed by two different tokens cannot be wired and raises ValueError.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    header = encode_chat(tokenizer, "x")[-1]
    chain = [header] + list(tokenizer(text, add_special_tokens=False)["input_ids"])
    successor: dict[int, int] = {}
    for a, b in zip(chain, chain[1:]):
        if successor.setdefault(a, b) != b:
            raise ValueError(f"token {tokenizer.decode([a])!r} has two successors in {text!r}")
    successor.setdefault(chain[-1], tokenizer.eos_token_id)
    slots = {token: i for i, token in enumerate(dict.fromkeys(chain))}
    if len(slots) > hidden_size:
        raise ValueError(f"{len(slots)} distinct tokens need hidden_size >= {len(slots)}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        for token, slot in slots.items():
            model.model.embed_tokens.weight[token, slot] = 1.0
            model.lm_head.weight[successor[token], slot] = 10.0  # RMSNorm scales the one-hot to sqrt(64) = 8
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


class CountingGenerator:
    """Wraps a real generator and records every call's batch (the agent must make one call per turn)."""

    def __init__(self, inner: TransformersGenerator):
        self.inner = inner
        self.calls: list[tuple[int, int]] = []

    def generate(self, prompt_ids, n=1, sampling=None) -> GenerationOutput:
        self.calls.append((len(prompt_ids), n))
        return self.inner.generate(prompt_ids, n=n, sampling=sampling)


@pytest.fixture(scope="module")
def retriever() -> Retriever:
    return Retriever(load_passages(CORPUS))


ROWS = [
    {"id": "q0", "prompt": "Who was Evan Morris?", "answers": ["Evan Morris"]},
    {"id": "q1", "prompt": "Where is Pavia Cathedral?", "answers": ["Pavia", "Lombardy"]},
    {"id": "q2", "questions": ["Who was Evan Morris?", "Where is Pavia?"], "answers": [["Evan Morris"], ["Italy"]]},
]
GREEDY = SamplingConfig(do_sample=False, max_new_tokens=8)


# ---------------------------------------------------------------------------------------------------------------------
# Parsing and scoring (hand-written strings, hand-computed values)
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "state", "action", "argument", "malformed"),
    [
        ("<think>A is B.</think>\n<search> who is A </search>", "A is B.", "search", "who is A", False),
        ("<think>s</think><answer>Paris</answer> then <search>more</search>", "s", "answer", "Paris", False),
        ("<think>s</think><search>q1</search><search>q2</search>", "s", "search", "q1", False),
        ("just rambling, no tags", "just rambling, no tags", None, "", True),
        ("<think>unclosed state <search>cut off query", "unclosed state", "search", "cut off query", True),
        ("<think>s</think><search>  </search>", "s", None, "", True),
        ("<search>q</search><think>late</think>", "", "search", "q", True),
        ("no think here <answer>42</answer>", "no think here", "answer", "42", True),
        ("<think>only thinking, never acting", "only thinking, never acting", None, "", True),
        ("", "", None, "", True),
        ("</think><answer></answer>", "", "answer", "", True),
    ],
)
def test_parse_turn(text, state, action, argument, malformed):
    parsed = parse_turn(text)
    assert (parsed.state, parsed.action, parsed.argument, parsed.malformed) == (state, action, argument, malformed)


@pytest.mark.parametrize(
    ("text", "k", "expected"),
    [
        ("Paris ; London", 2, ["Paris", "London"]),
        ("1. Paris 2. London", 2, ["Paris", "London"]),
        ("1) Paris\n2) London", 2, ["Paris", "London"]),
        ("Answer 1: Paris; Answer 2: New York City", 2, ["Paris", "New York City"]),
        ("Paris", 2, ["Paris", ""]),
        ("a; b; c", 2, ["a", "b"]),
        ("1. Paris", 1, ["Paris"]),
        ("1984", 1, ["1984"]),
        ("3.14", 1, ["3.14"]),
        ("Tom; Jerry", 1, ["Tom; Jerry"]),
    ],
)
def test_split_answers(text, k, expected):
    assert split_answers(text, k) == expected


def test_multi_exact_match_hand_computed():
    gold = [["Paris"], ["London", "LDN"]]
    assert multi_exact_match(["Paris", "the London."], gold) == 1.0  # SQuAD normalisation: article, punctuation
    assert multi_exact_match(["paris", "Berlin"], gold) == 0.5
    assert multi_exact_match(["", ""], gold) == 0.0
    assert multi_exact_match(["a", "b", ""], [["a"], ["x"], ["y"]]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="2 predictions for 3 questions"):
        multi_exact_match(["a", "b"], [["a"], ["b"], ["c"]])


def test_row_questions_layouts():
    assert row_questions(ROWS[0]) == (["Who was Evan Morris?"], [["Evan Morris"]])
    assert row_questions(ROWS[2]) == (["Who was Evan Morris?", "Where is Pavia?"], [["Evan Morris"], ["Italy"]])
    with pytest.raises(ValueError, match="row 4: 2 questions need `answers` as one list"):
        row_questions({"questions": ["a", "b"], "answers": ["x", "y"]}, 4)
    with pytest.raises(ValueError, match="row 0: no `prompt` or `questions`"):
        row_questions({"answers": ["x"]})


def test_observation_budget_on_real_passages(tokenizer, retriever):
    agent = SearchAgent(tokenizer, None, retriever, SearchAgentConfig(observation_max_tokens=50))
    passages = retriever.search(["Evan Morris lobbyist Genentech"], k=3)[0]
    block = agent.observation("Evan Morris", passages)
    assert block.startswith("Doc 1(Title: Evan Morris) Evan Morris")
    assert 40 <= len(tokenizer(block, add_special_tokens=False)["input_ids"]) <= 50
    assert agent.observation("zzz", []) == "No results for: zzz"
    for budget in (1, 7, 33):  # re-tokenising the cut text never exceeds the budget
        cut = truncate_to_tokens(tokenizer, "naïve café – “quoted” 東京 text " * 20, budget)
        assert len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= budget


def test_action_end_cuts_after_the_first_closing_tag(tokenizer):
    ids = tokenizer(
        "<think>s</think><search>Evan Morris</search>garbage <answer>x</answer>", add_special_tokens=False
    )["input_ids"]
    end = action_end(tokenizer, ids)
    assert tokenizer.decode(ids[:end]) == "<think>s</think><search>Evan Morris</search>"
    assert action_end(tokenizer, tokenizer("no action", add_special_tokens=False)["input_ids"]) is None


def test_config_validation():
    with pytest.raises(ValueError, match="max_turns must be >= 1"):
        SearchAgentConfig(max_turns=0)
    with pytest.raises(ValueError, match="turn_template is missing \\{information\\}"):
        SearchAgentConfig(turn_template="{what} {answer_format} {questions} {state}")


def test_tokenizer_without_chat_template_is_refused(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        SearchAgent(tokenizer, None, None)


# ---------------------------------------------------------------------------------------------------------------------
# Rollouts with real models
# ---------------------------------------------------------------------------------------------------------------------


def test_random_model_respects_turn_budget_one_call_per_turn(tokenizer, tiny_model, retriever):
    generator = CountingGenerator(TransformersGenerator(tiny_model, tokenizer))
    agent = SearchAgent(tokenizer, generator, retriever, SearchAgentConfig(max_turns=3, max_new_tokens=8))
    trajectories = agent.rollout(ROWS, n=2, sampling=SamplingConfig(max_new_tokens=99, seed=0))
    # the random model never writes a tag: 3 turns + 1 forced final turn, one batched call each
    assert generator.calls == [(3, 2), (6, 1), (6, 1), (6, 1)]
    assert [(t.doc_id, t.group, t.metadata["sample"]) for t in trajectories] == [
        ("q0", 0, 0), ("q0", 0, 1), ("q1", 1, 0), ("q1", 1, 1), ("q2", 2, 0), ("q2", 2, 1),
    ]  # fmt: skip
    for t in trajectories:
        assert [(c.kind, c.step) for c in t.calls] == [("search", 1), ("search", 2), ("search", 3), ("final", 4)]
        assert all(1 <= len(c.completion_ids) <= 8 for c in t.calls)  # the agent's token budget, not the caller's
        assert len(t.memories) == 5 and t.memories[0] == INITIAL_STATE
        assert t.metadata["forced_final"] and t.metadata["num_searches"] == 0
        assert t.metadata["malformed_turns"] == 4 and t.metadata["em"] == 0.0
        assert len(t.metadata["predictions"]) == len(t.metadata["questions"])
        # constant memory: turn 2's prompt holds only the questions, turn 1's state and the invalid-action note
        prompt_2 = tokenizer.decode(t.calls[1].prompt_ids)
        assert t.memories[1] in prompt_2 and INVALID_ACTION in prompt_2
        assert t.calls[0].text not in prompt_2 or t.calls[0].text == t.memories[1]
    # the n rollouts of a row share the first prompt; seeded rollouts are deterministic
    assert trajectories[0].calls[0].prompt_ids == trajectories[1].calls[0].prompt_ids
    again = agent.rollout(ROWS, n=2, sampling=SamplingConfig(seed=0))
    assert [[c.completion_ids for c in t.calls] for t in again] == [
        [c.completion_ids for c in t.calls] for t in trajectories
    ]


def test_search_path_with_observation_budget(tokenizer, retriever):
    model = build_chain_model(tokenizer, "<search>Evan Morris</search>")
    generator = CountingGenerator(TransformersGenerator(model, tokenizer))
    config = SearchAgentConfig(max_turns=2, max_new_tokens=20, observation_max_tokens=60)
    agent = SearchAgent(tokenizer, generator, retriever, config)
    trajectories = agent.rollout(ROWS[:2], sampling=SamplingConfig(temperature=1.0, seed=3))
    assert generator.calls == [(2, 1), (2, 1), (2, 1)]
    for t in trajectories:
        searches, final = t.calls[:2], t.calls[2]
        for call in searches:
            # cut where a stop string would cut: the model kept writing, the recorded call ends at </search>
            assert call.kind == "search" and call.text == "<search>Evan Morris</search>" and call.finished
            assert len(call.completion_ids) == len(call.logprobs) == 9
        assert t.metadata["queries"] == ["Evan Morris", "Evan Morris"]
        assert len(t.chunks) == 2 and t.chunks[0].startswith("Doc 1(Title: Evan Morris)")
        for info in t.chunks:
            assert len(tokenizer(info, add_special_tokens=False)["input_ids"]) <= 60
        # the next prompt carries exactly the latest (truncated) information block, not the history
        prompt_2 = tokenizer.decode(t.calls[1].prompt_ids)
        assert f"<information>\n{t.chunks[0]}\n</information>" in prompt_2
        assert prompt_2.count("Doc 1(Title:") == 1
        # the forced final turn: it searched again instead of answering, so the answer is empty and counted
        assert final.kind == "final" and "no searches left" in tokenizer.decode(final.prompt_ids)
        assert t.metadata["forced_final"] and t.answer == "" and t.metadata["em"] == 0.0
        assert t.metadata["malformed_turns"] == 3  # no <think> block in any turn


def test_answer_path_multi_question_em(tokenizer, retriever):
    # a bigram chain cannot write two tags (">" would need two successors), so this model skips <think>
    model = build_chain_model(tokenizer, "<answer>Evan Morris ; Pavia</answer>")
    generator = CountingGenerator(TransformersGenerator(model, tokenizer))
    agent = SearchAgent(tokenizer, generator, retriever, SearchAgentConfig(max_turns=4, max_new_tokens=30))
    rows = [ROWS[2], {"questions": ["q a", "q b"], "answers": [["Evan Morris"], ["Pavia", "Pavia, Italy"]]}, ROWS[0]]
    trajectories = agent.rollout(rows, sampling=GREEDY)
    assert generator.calls == [(3, 1)]  # everyone answered in turn 1: no further call
    em = [t.metadata["em"] for t in trajectories]
    assert em == [0.5, 1.0, 0.0]  # q2: Evan Morris right, Pavia != Italy; row 3: "Evan Morris ; Pavia" as one answer
    t = trajectories[0]
    assert [c.kind for c in t.calls] == ["final"] and not t.metadata["forced_final"]
    assert t.metadata["predictions"] == ["Evan Morris", "Pavia"] and t.memories == [INITIAL_STATE, INITIAL_STATE]
    assert t.metadata["malformed_turns"] == 1 and t.answer == "Evan Morris ; Pavia"
    assert t.calls[0].text == "<answer>Evan Morris ; Pavia</answer>" and t.calls[0].finished
    assert "1. Who was Evan Morris?\n2. Where is Pavia?" in tokenizer.decode(t.calls[0].prompt_ids)


@pytest.mark.slow
def test_real_smollm2_search_rollout(retriever):
    """The real SmolLM2-135M-Instruct through a whole rollout: whatever it writes, budgets and records hold."""
    from memtrain.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2-135m", dtype="float32")
    config = SearchAgentConfig(max_turns=2, max_new_tokens=96, observation_max_tokens=200, state_max_tokens=96)
    generator = CountingGenerator(TransformersGenerator(model, tokenizer))
    agent = SearchAgent(tokenizer, generator, retriever, config)
    rows = [ROWS[0], ROWS[2]]
    trajectories = agent.rollout(rows, sampling=SamplingConfig(do_sample=False))
    assert 1 <= len(generator.calls) <= 3
    empty_prompt = len(encode_chat(tokenizer, agent.render_prompt(["q"] * 2, "", "", final=False)))
    for t in trajectories:
        assert 1 <= len(t.calls) <= 3 and t.calls[-1].kind == "final"
        assert all(c.kind == "search" for c in t.calls[:-1])
        assert len(t.metadata["queries"]) <= 2 and 0.0 <= t.metadata["em"] <= 1.0
        for call in t.calls:
            assert len(call.completion_ids) <= 96
            # constant memory: template + questions + state budget + observation budget (+ slack for the wording)
            question_tokens = len(tokenizer(t.problem)["input_ids"])
            assert len(call.prompt_ids) <= empty_prompt + question_tokens + 96 + 200 + 64
        for info in t.chunks:
            assert len(tokenizer(info, add_special_tokens=False)["input_ids"]) <= 200
