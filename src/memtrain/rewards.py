"""Reward functions by name, with TRL's reward-function signature, so a recipe can list them with weights.

A recipe writes ``reward_funcs: [masked_entity_em, memory_recall]`` and ``reward_weights: [1.0, 0.5]``;
:func:`get_reward_funcs` turns the names into callables for ``trl.GRPOTrainer`` (``MemTrainer``).

Signature (TRL): ``func(completions, **kwargs) -> list[float | None]``. ``completions`` holds one reply per rollout,
either a string or a chat list (``[{"role": "assistant", "content": ...}]``); ``kwargs`` carry the dataset columns
repeated per rollout (``answers: list[list[str]]``, ``prompt``, ...) and TRL's extras (``trainer_state``,
``completion_ids``, ``log_metric``, ...). None means "no reward for this rollout" (TRL turns it into NaN and skips it).

Strict and lenient extraction: every answer reward is registered twice, ``<name>`` (the answer is the last
``\\boxed{}``, the paper's rule) and ``<name>_lenient`` (:func:`memtrain.metrics.extract_answer`'s lenient rule, for
small models that rarely box; it also reads MEM1-style ``<answer>...</answer>`` replies, so search QA uses
``answer_em_lenient``). Choosing by name keeps recipes declarative and makes TRL log the two under different
names. Caveat: without a box or tag, lenient extraction falls back to a reply's first line, so
``answer_sub_em_lenient`` pays any one-line reply that merely contains the gold; train on it only next to a
stricter reward. Every function's ``__name__`` is its registry name, which is what TRL logs (``rewards/<name>/mean``).

Custom rewards: decorate a function with :func:`register_reward`, or list ``"package.module:function"`` in a recipe.
"""

from __future__ import annotations

import importlib
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from memtrain.metrics import (
    RECALL_METRICS,
    exact_match,
    extract_answer,
    f1_score,
    masked_entity_match,
    substring_match,
)


__all__ = [
    "REWARD_FUNCS",
    "LENIENT_SUFFIX",
    "RewardFunc",
    "register_reward",
    "get_reward_funcs",
    "recall_em",
    "recall_score",
    "RECALL_METRICS",
    "completion_text",
]

RewardFunc = Callable[..., list[float | None]]

REWARD_FUNCS: dict[str, RewardFunc] = {}

LENIENT_SUFFIX = "_lenient"


def register_reward(name: str) -> Callable[[RewardFunc], RewardFunc]:
    """Register ``func`` under ``name`` and set its ``__name__`` to it (TRL logs a reward by its function name)."""

    def decorator(func: RewardFunc) -> RewardFunc:
        if name in REWARD_FUNCS:
            raise ValueError(f"A reward function named {name!r} is already registered; pick another name.")
        func.__name__ = name
        func.__qualname__ = name
        REWARD_FUNCS[name] = func
        return func

    return decorator


def get_reward_funcs(names: Sequence[str] | str) -> list[RewardFunc]:
    """The reward functions for a recipe's ``reward_funcs`` list, in order.

    A name is either registered (see ``REWARD_FUNCS``) or an import path ``"package.module:function"``.
    """
    if isinstance(names, str):
        names = [names]
    funcs: list[RewardFunc] = []
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"reward_funcs entries must be names (strings), got {type(name).__name__}: {name!r}.")
        if name in seen:
            raise ValueError(f"Reward function {name!r} is listed twice in reward_funcs; list each reward once.")
        seen.add(name)
        if name in REWARD_FUNCS:
            funcs.append(REWARD_FUNCS[name])
        elif ":" in name:
            funcs.append(_import_reward(name))
        else:
            raise ValueError(
                f"Unknown reward function {name!r}. Known: {', '.join(sorted(REWARD_FUNCS))}. "
                "A custom reward can be listed as 'package.module:function'."
            )
    return funcs


def _import_reward(path: str) -> RewardFunc:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"Cannot import the module of reward function {path!r}: {err}") from err
    func = getattr(module, attr, None)
    if not callable(func):
        raise ValueError(f"Reward function {path!r}: module {module_name!r} has no callable named {attr!r}.")
    return func


def recall_em(prediction_text: str, gold: str | Sequence[str], lenient: bool = False) -> float:
    """Score one memory-recall answer (the trainer calls this for each of the G2 answers): the paper's boxed EM."""
    return float(masked_entity_match(prediction_text, gold, lenient=lenient))


def recall_score(
    prediction_text: str, gold: str | Sequence[str], metric: str = "exact", lenient: bool = False
) -> float:
    """Score one recall answer: ``exact`` is the paper's masked-entity EM, ``f1`` SQuAD token F1 of the answer.

    ``f1`` is a small-model shaping reward: a sentence that contains the entity earns partial credit (more the
    shorter it is), so a group of a model that answers in sentences still has reward spread for GRPO to learn from.
    """
    if metric == "exact":
        return recall_em(prediction_text, gold, lenient=lenient)
    if metric == "f1":
        return f1_score(extract_answer(prediction_text, "lenient" if lenient else "strict"), gold)
    raise ValueError(f"Unknown recall metric {metric!r}; use one of {', '.join(RECALL_METRICS)}.")


def completion_text(completion: Any, index: int = 0) -> str:
    """The reply text of one TRL completion: a string, or a chat list whose last assistant message is the reply."""
    if isinstance(completion, str):
        return completion
    messages = [completion] if isinstance(completion, dict) else completion
    if isinstance(messages, list):
        replies = [m for m in messages if isinstance(m, dict) and m.get("role", "assistant") == "assistant"]
        if replies:
            content = replies[-1].get("content", "")
            if isinstance(content, str):
                return content
            if isinstance(content, list):  # multimodal-style content parts: keep the text parts
                return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    raise TypeError(
        f"completions[{index}] is neither a string nor a chat list with an assistant message "
        f"([{{'role': 'assistant', 'content': ...}}]): got {completion!r:.200}."
    )


def _golds(answers: Any, index: int, reward: str) -> list[str] | None:
    golds = answers[index]
    if golds is None:
        return None
    if isinstance(golds, str):
        return [golds]
    if not isinstance(golds, (list, tuple)) or not all(isinstance(g, str) for g in golds):
        raise TypeError(f"Reward {reward!r}: answers[{index}] must be a list of strings, got {golds!r:.200}.")
    return list(golds) or None


class AnswerReward:
    """A reward that scores each completion's final answer against the row's ``answers`` column.

    A class rather than a closure so the registered functions stay picklable. A row whose ``answers`` is None or
    empty gets None (no reward) instead of a silent 0.
    """

    def __init__(self, name: str, score: Callable[[str, list[str], bool], float], lenient: bool, doc: str):
        self.__name__ = name
        self.__qualname__ = name
        self.__doc__ = doc
        self.score = score
        self.lenient = lenient

    def __call__(self, completions: list, answers: list | None = None, **kwargs: Any) -> list[float | None]:
        if answers is None:
            raise ValueError(
                f"Reward {self.__name__!r} needs the dataset column 'answers' (a list of accepted strings per row); "
                f"the batch only has {sorted(kwargs)}."
            )
        if len(answers) != len(completions):
            raise ValueError(
                f"Reward {self.__name__!r}: {len(completions)} completions but {len(answers)} rows of 'answers'."
            )
        rewards: list[float | None] = []
        for i, completion in enumerate(completions):
            golds = _golds(answers, i, self.__name__)
            text = completion_text(completion, i)
            rewards.append(None if golds is None else self.score(text, golds, self.lenient))
        log_metric = kwargs.get("log_metric")
        if callable(log_metric) and completions:
            mode = "lenient" if self.lenient else "strict"
            found = sum(extract_answer(completion_text(c, i), mode) is not None for i, c in enumerate(completions))
            log_metric(f"rewards/{self.__name__}/answer_rate", found / len(completions))
        return rewards

    def __repr__(self) -> str:
        return f"<reward {self.__name__}>"


def _masked_entity_score(text: str, golds: list[str], lenient: bool) -> float:
    return float(masked_entity_match(text, golds, lenient=lenient))


def _em_score(text: str, golds: list[str], lenient: bool) -> float:
    return exact_match(extract_answer(text, "lenient" if lenient else "strict"), golds)


def _sub_em_score(text: str, golds: list[str], lenient: bool) -> float:
    return substring_match(extract_answer(text, "lenient" if lenient else "strict"), golds)


def _f1_score(text: str, golds: list[str], lenient: bool) -> float:
    return f1_score(extract_answer(text, "lenient" if lenient else "strict"), golds)


_ANSWER_REWARDS: dict[str, tuple[Callable[[str, list[str], bool], float], str]] = {
    "masked_entity_em": (
        _masked_entity_score,
        "1.0 if the final answer equals a masked entity in `answers` up to case, whitespace and LaTeX escapes (the "
        "paper's reward).",
    ),
    "answer_em": (_em_score, "SQuAD exact match of the final answer against `answers` (search QA)."),
    "answer_sub_em": (_sub_em_score, "MemAgent's sub-EM: a SQuAD-normalised gold inside the final answer."),
    "answer_f1": (_f1_score, "SQuAD token F1 of the final answer, the best over `answers`."),
}

for _name, (_score, _doc) in _ANSWER_REWARDS.items():
    register_reward(_name)(AnswerReward(_name, _score, lenient=False, doc=_doc + " Answer: last \\boxed{}."))
    register_reward(_name + LENIENT_SUFFIX)(
        AnswerReward(_name + LENIENT_SUFFIX, _score, lenient=True, doc=_doc + " Answer: lenient extraction.")
    )


@register_reward("memory_recall")
def memory_recall(completions: list, recall_rewards: list | None = None, **kwargs: Any) -> list[float | None]:
    """The intermediate-memory-recall score of each rollout: the mean recall EM of its probe answers.

    MemTrainer runs the recall probes and passes ``recall_rewards`` (one float per rollout, None when the rollout had
    no probe, e.g. it read a single chunk); this function returns it so the recipe weights it (lambda = 0.5) like
    any other reward: R_i = EM_i + lambda * mean_j recall_ij.
    """
    if recall_rewards is None:
        raise ValueError(
            "Reward 'memory_recall' needs `recall_rewards`, which MemTrainer computes from its recall probes; "
            "it cannot be used with a plain trl.GRPOTrainer."
        )
    if len(recall_rewards) != len(completions):
        raise ValueError(
            f"Reward 'memory_recall': {len(completions)} completions but {len(recall_rewards)} recall_rewards."
        )
    rewards: list[float | None] = []
    for i, value in enumerate(recall_rewards):
        if value is None:
            rewards.append(None)
        elif isinstance(value, numbers.Real) and not isinstance(value, bool):
            rewards.append(float(value))
        else:
            raise TypeError(f"Reward 'memory_recall': recall_rewards[{i}] must be a number or None, got {value!r}.")
    return rewards


@register_reward("search_em")
def search_em(
    completions: list,
    answers: list | None = None,
    questions: list | None = None,
    prompts: list | None = None,
    **kwargs,
) -> list[float | None]:
    """MEM1's search-QA reward: exact match (SQuAD normalisation) of each ``<answer>``, averaged over the questions.

    A row asks one question (``prompt`` + ``answers``: accepted strings) or several together (``questions`` +
    ``answers``: one list of accepted strings per question); the answers are ``;``-separated or numbered.
    """
    from memtrain.agent.search_agent import multi_exact_match, row_questions, split_answers

    if answers is None:
        raise ValueError("Reward 'search_em' needs the dataset column `answers`.")
    rewards: list[float | None] = []
    for i, completion in enumerate(completions):
        row = {"answers": answers[i], "prompt": prompts[i] if prompts is not None else ""}
        if questions is not None and questions[i] is not None:
            row["questions"] = questions[i]
        asked, gold = row_questions(row, i)
        if not any(gold):
            rewards.append(None)
            continue
        predictions = split_answers(completion_text(completion, i), len(asked))
        rewards.append(multi_exact_match(predictions, gold))
    return rewards
