"""Reward functions: hand-computed rewards for string and chat completions, the registry and its errors."""

from __future__ import annotations

import pickle

import pytest

from memtrain import rewards
from memtrain.rewards import REWARD_FUNCS, get_reward_funcs, recall_em, recall_score, register_reward


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


ENTITY_REPLIES = [
    r"\boxed{Marie Curie}",  # exact
    "It was \\boxed{marie \n curie}.",  # case and whitespace are ignored
    "Marie Curie",  # no box: strict 0, lenient 1
    r"\boxed{Curie}",  # wrong span
]


def test_masked_entity_em_strict_and_lenient_on_strings():
    answers = [["Marie Curie"]] * 4
    assert get_reward_funcs(["masked_entity_em"])[0](ENTITY_REPLIES, answers=answers) == [1.0, 1.0, 0.0, 0.0]
    lenient = REWARD_FUNCS["masked_entity_em_lenient"]
    assert lenient(ENTITY_REPLIES, answers=answers) == [1.0, 1.0, 1.0, 0.0]


def test_chat_completions_score_like_strings():
    answers = [["Marie Curie"]] * 4
    completions = [chat(text) for text in ENTITY_REPLIES]
    assert REWARD_FUNCS["masked_entity_em"](completions, answers=answers) == [1.0, 1.0, 0.0, 0.0]
    # content given as text parts, and a chat list that ends with the assistant's reply
    parts = [
        {
            "role": "assistant",
            "content": [{"type": "text", "text": r"\boxed{Marie"}, {"type": "text", "text": " Curie}"}],
        }
    ]
    history = [{"role": "user", "content": r"\boxed{Curie}"}, {"role": "assistant", "content": r"\boxed{Marie Curie}"}]
    assert REWARD_FUNCS["masked_entity_em"]([parts, history], answers=answers[:2]) == [1.0, 1.0]


def test_squad_rewards_hand_computed():
    # [cat, sat] vs [cat, sat, on]: P = 1, R = 2/3, F1 = 0.8; with no box the strict answer is None -> 0
    completions = [r"\boxed{the cat sat}", "The answer is the cat sat.", chat(r"so \boxed{It is Paris, France}")]
    answers = [["a cat sat on"], ["a cat sat on"], ["Paris France", "Lyon"]]
    assert REWARD_FUNCS["answer_f1"](completions, answers=answers) == pytest.approx([0.8, 0.0, 2 * 0.5 * 1 / 1.5])
    assert REWARD_FUNCS["answer_f1_lenient"](completions, answers=answers) == pytest.approx([0.8, 0.8, 2 / 3])
    assert REWARD_FUNCS["answer_em"](completions, answers=answers) == [0.0, 0.0, 0.0]
    assert REWARD_FUNCS["answer_em"]([r"\boxed{The Cat sat!}"], answers=[["cat sat"]]) == [1.0]
    assert REWARD_FUNCS["answer_sub_em"](completions, answers=answers) == [0.0, 0.0, 1.0]


def test_rows_without_answers_get_no_reward():
    out = REWARD_FUNCS["answer_em"]([r"\boxed{a}", r"\boxed{b}", r"\boxed{c}"], answers=[None, [], "c"])
    assert out == [None, None, 1.0]


def test_functions_are_named_for_trl_logging_and_picklable():
    for name, func in REWARD_FUNCS.items():
        assert func.__name__ == name
        restored = pickle.loads(pickle.dumps(func))
        assert restored.__name__ == name
    expected = {"masked_entity_em", "memory_recall", "answer_em", "answer_sub_em", "answer_f1"}
    assert expected | {f"{n}_lenient" for n in expected - {"memory_recall"}} <= set(REWARD_FUNCS)


def test_answer_rate_is_logged_through_trls_log_metric():
    logged: dict[str, float] = {}
    REWARD_FUNCS["masked_entity_em"](
        ENTITY_REPLIES, answers=[["Marie Curie"]] * 4, log_metric=logged.__setitem__, trainer_state=None
    )
    assert logged == {"rewards/masked_entity_em/answer_rate": 0.75}  # 3 of 4 replies have a box


def test_memory_recall_passes_the_trainers_scores_through():
    assert REWARD_FUNCS["memory_recall"](["x", "y", "z"], recall_rewards=[0.5, None, 1]) == [0.5, None, 1.0]
    with pytest.raises(ValueError, match="MemTrainer"):
        REWARD_FUNCS["memory_recall"](["x"], answers=[["a"]])
    with pytest.raises(ValueError, match="2 completions but 1 recall_rewards"):
        REWARD_FUNCS["memory_recall"](["x", "y"], recall_rewards=[0.5])
    with pytest.raises(TypeError, match=r"recall_rewards\[0\]"):
        REWARD_FUNCS["memory_recall"](["x"], recall_rewards=[True])


def test_recall_em_scores_one_answer():
    assert recall_em(r"\boxed{ london }", "London") == 1.0
    assert recall_em("London", "London") == 0.0
    assert recall_em("London", "London", lenient=True) == 1.0


def test_recall_f1_gives_partial_credit_to_a_sentence_that_contains_the_entity():
    assert recall_score(r"\boxed{Manuel Fontanals}", "Manuel Fontanals", "f1") == 1.0
    # lenient: first line "The sets were designed by Manuel Fontanals" -> 2 of 6 tokens (SQuAD drops "the")
    sentence = "The sets were designed by Manuel Fontanals\nin 1950."
    assert recall_score(sentence, "Manuel Fontanals", "f1", lenient=True) == pytest.approx(2 * (2 / 6) / (2 / 6 + 1))
    assert recall_score(sentence, "Manuel Fontanals", "exact", lenient=True) == 0.0
    assert recall_score(sentence, "Manuel Fontanals", "f1") == 0.0  # strict: no box, no answer
    with pytest.raises(ValueError, match="Unknown recall metric 'bleu'"):
        recall_score("x", "x", "bleu")


def test_bad_batches_are_clear_errors():
    with pytest.raises(ValueError, match="needs the dataset column 'answers'.*'prompt'"):
        REWARD_FUNCS["answer_em"](["x"], prompt=["q"])
    with pytest.raises(ValueError, match="2 completions but 1 rows"):
        REWARD_FUNCS["answer_em"](["x", "y"], answers=[["x"]])
    with pytest.raises(TypeError, match=r"answers\[0\] must be a list of strings"):
        REWARD_FUNCS["answer_em"](["x"], answers=[[1]])
    with pytest.raises(TypeError, match=r"completions\[1\]"):
        REWARD_FUNCS["answer_em"](["x", 42], answers=[["x"], ["x"]])


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="Unknown reward function 'masked_em'. Known: answer_em, answer_em_lenient"):
        get_reward_funcs(["masked_em"])
    with pytest.raises(ValueError, match="listed twice"):
        get_reward_funcs(["answer_em", "answer_em"])
    with pytest.raises(TypeError, match="must be names"):
        get_reward_funcs([1.0])


def test_custom_rewards_by_decorator_and_import_path(monkeypatch, tmp_path):
    monkeypatch.setattr(rewards, "REWARD_FUNCS", dict(REWARD_FUNCS))

    @register_reward("length_penalty")
    def anything(completions, **kwargs):
        return [-len(c) / 100 for c in completions]

    assert anything.__name__ == "length_penalty"
    assert rewards.get_reward_funcs("length_penalty")[0](["abcd"]) == [-0.04]
    with pytest.raises(ValueError, match="already registered"):
        register_reward("length_penalty")(anything)

    (tmp_path / "my_rewards.py").write_text(
        "def shout(completions, **kwargs):\n    return [1.0 for _ in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    (shout,) = rewards.get_reward_funcs(["my_rewards:shout"])
    assert shout(["a", "b"]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="has no callable named 'whisper'"):
        rewards.get_reward_funcs(["my_rewards:whisper"])
    with pytest.raises(ValueError, match="Cannot import"):
        rewards.get_reward_funcs(["no_such_module_xyz:f"])


def test_rewards_plug_into_trls_grpo_trainer(tiny_model, tokenizer, tmp_path):
    """One real trl.GRPOTrainer step: TRL calls the functions with its kwargs and logs them under their names."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    dataset = Dataset.from_dict({"prompt": ["Who discovered polonium?"] * 2, "answers": [["Marie Curie"]] * 2})
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=1,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
    )
    trainer = GRPOTrainer(
        model=tiny_model,
        reward_funcs=get_reward_funcs(["masked_entity_em", "answer_f1_lenient"]),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"rewards/masked_entity_em/mean", "rewards/answer_f1_lenient/mean"} <= logged
    assert "rewards/masked_entity_em/answer_rate" in logged
