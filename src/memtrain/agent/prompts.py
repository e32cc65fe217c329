"""The memory agent's prompt templates (PAPER.md section 1), in one place so recipes can override them.

Each template is a plain ``str.format`` string. Placeholders: ``{problem}``, ``{memory}``, ``{chunk}``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


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
