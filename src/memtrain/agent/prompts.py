"""The memory agent's prompt templates (PAPER.md section 1), in one place so recipes can override them.

Each template is a plain ``str.format`` string. Placeholders: ``{problem}``, ``{memory}``, ``{chunk}``.

Also the one way a prompt becomes token ids (``encode_chat``): the memory agent, the search agent, the trainer's
recall probes, the long-text QA closed-book filter, the warm start and evaluation all send the model exactly what
this function makes, so a prompt trained on is the prompt evaluated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any


NO_MEMORY = "No previous memory"

MASK_TOKEN = "[MASK]"
TARGET_TOKEN = "[TARGET]"

MEMTRAIN_PROBLEM = "Based on the entire article, which entity is represented by the [MASK] placeholder?"

UPDATE_TEMPLATE = """You are given a problem, a section of an article that may contain the answer, and a previous memory. \
Read the section and update the memory with new information that helps answer the problem, keeping all relevant \
details of the previous memory.

<problem>
{problem}
</problem>

<memory>
{memory}
</memory>

<section>
{chunk}
</section>

Updated memory:"""

FINAL_TEMPLATE = """You are given a problem and a previous memory. Answer the problem based on the memory and put the \
answer in \\boxed{{}}.

<problem>
{problem}
</problem>

<memory>
{memory}
</memory>

Your answer:"""

RECALL_TEMPLATE = """You are given a memory of previously read sections and a section with a placeholder [TARGET]. \
Using the memory, name the entity marked by [TARGET] and put it in \\boxed{{}}.

<memory>
{memory}
</memory>

<section>
{chunk}
</section>

Your answer:"""


@dataclass
class PromptTemplates:
    """The three turns of the memory agent. Override any of them from a recipe (``update_template: ...``)."""

    update: str = UPDATE_TEMPLATE
    final: str = FINAL_TEMPLATE
    recall: str = RECALL_TEMPLATE

    def __post_init__(self) -> None:
        required = {"update": ("{problem}", "{memory}", "{chunk}"), "final": ("{problem}", "{memory}")}
        required["recall"] = ("{memory}", "{chunk}")
        for name, placeholders in required.items():
            missing = [p for p in placeholders if p not in getattr(self, name)]
            if missing:
                raise ValueError(
                    f"The {name} prompt template is missing {', '.join(missing)}. Every {name} template must contain "
                    f"{', '.join(placeholders)} (literal braces are written {{{{ and }}}})."
                )

    def render_update(self, problem: str, memory: str, chunk: str) -> str:
        return self.update.format(problem=problem, memory=memory, chunk=chunk)

    def render_final(self, problem: str, memory: str) -> str:
        return self.final.format(problem=problem, memory=memory)

    def render_recall(self, memory: str, chunk: str) -> str:
        return self.recall.format(memory=memory, chunk=chunk)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


Messages = str | Sequence[Mapping[str, str]]


def _as_messages(messages: Messages) -> list[Mapping[str, str]]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)


def require_chat_template(tokenizer: Any, who: str) -> None:
    """Refuse a tokenizer without a chat template: the agents talk to the model in chat turns."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"The {who} talks to the model in chat turns, but this tokenizer has no chat template. Use an "
            "instruct model's tokenizer or set tokenizer.chat_template."
        )


def render_chat(tokenizer: Any, messages: Messages, add_generation_prompt: bool = True) -> str:
    """The chat as the tokenizer's template writes it; a plain string is one user turn.

    ``add_generation_prompt`` appends the assistant header, so the model's reply is what comes next.
    """
    return tokenizer.apply_chat_template(
        _as_messages(messages), add_generation_prompt=add_generation_prompt, tokenize=False
    )


def encode_chat(tokenizer: Any, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``render_chat``: the template already writes its special tokens, so none are added again.

    The same ids as ``apply_chat_template(..., tokenize=True)``; rendering first lets callers that need the text
    (the warm start's end-of-turn marker) use the same path.
    """
    text = render_chat(tokenizer, messages, add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
