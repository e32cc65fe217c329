"""The MEM1-style search agent (PAPER.md section 6): a constant-size internal state instead of a growing history.

Each turn the model sees ONLY the question(s), its latest internal state and the latest ``<information>`` block,
and writes a new state in ``<think>...</think>`` followed by either ``<search>query</search>`` or
``<answer>...</answer>``. After ``max_turns`` turns without an answer, one forced final turn asks for the answer.

Multi-objective questions (MEM1 trains on k questions asked together): the questions are numbered in the prompt and
the model answers them all in ONE ``<answer>`` block, in order, separated by ``;`` (a numbered list "1. x 2. y" is
accepted too). The score is exact match averaged over the questions.

All active trajectories advance together: one generator call per turn and one retriever call per turn.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from memtrain.agent.generation import GenerationOutput, Generator, SamplingConfig
from memtrain.agent.prompts import encode_chat, require_chat_template
from memtrain.agent.trajectory import ModelCall, Trajectory


if TYPE_CHECKING:
    from memtrain.configs import SearchAgentArguments


INITIAL_STATE = "No internal state yet."
NO_INFORMATION = "No search has been made yet."
INVALID_ACTION = (
    "Your previous turn had no valid action. Write your state in <think> </think>, then either "
    "<search> query </search> or <answer> ... </answer>."
)

TURN_TEMPLATE = """You answer {what} by searching Wikipedia. You do not see your earlier turns: everything you have \
learned so far must be kept in your internal state, which you rewrite every turn.

Each turn, first write your updated internal state inside <think> and </think>: the facts found so far that help \
answer, and what is still missing. Then EITHER search with <search> query </search> (the results come back inside \
<information> and </information>), OR, when you know the answer, give it with <answer> ... </answer>. {answer_format}

<questions>
{questions}
</questions>

<internal_state>
{state}
</internal_state>

<information>
{information}
</information>"""

FINAL_TEMPLATE = """You answer {what} using your internal state and the latest search results. You have no searches \
left: give your final answer now inside <answer> and </answer>. {answer_format}

<questions>
{questions}
</questions>

<internal_state>
{state}
</internal_state>

<information>
{information}
</information>"""

SINGLE_ANSWER_FORMAT = "The answer should be a short phrase, without explanation."
MULTI_ANSWER_FORMAT = (
    "Answer all {k} questions in one <answer> block, in order, separated by semicolons, e.g. "
    "<answer> answer 1 ; answer 2 </answer>."
)


class Retriever(Protocol):
    """Anything with a batched ``search`` returning passages with ``title`` and ``text`` (memtrain.retrieval)."""

    def search(self, queries: list[str], k: int = 3) -> list[list[Any]]: ...


@dataclass
class SearchAgentConfig:
    """MEM1's settings: top-3 passages, at most 6 turns, 1k-token observations."""

    max_turns: int = 6
    topk: int = 3
    observation_max_tokens: int = 1024
    state_max_tokens: int = 512
    max_new_tokens: int = 512
    stop_at_action: bool = True
    turn_template: str = TURN_TEMPLATE
    final_template: str = FINAL_TEMPLATE

    def __post_init__(self) -> None:
        for name in ("max_turns", "topk", "observation_max_tokens", "state_max_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"SearchAgentConfig.{name} must be >= 1, got {getattr(self, name)}.")
        placeholders = ("{what}", "{answer_format}", "{questions}", "{state}", "{information}")
        for name in ("turn_template", "final_template"):
            missing = [p for p in placeholders if p not in getattr(self, name)]
            if missing:
                raise ValueError(f"SearchAgentConfig.{name} is missing {', '.join(missing)}.")

    @classmethod
    def from_arguments(cls, args: SearchAgentArguments) -> SearchAgentConfig:
        """The settings a recipe's (or ``memtrain eval``'s) search-agent keys describe."""
        return cls(
            max_turns=args.search_max_turns,
            topk=args.search_topk,
            observation_max_tokens=args.search_observation_tokens,
            max_new_tokens=args.search_max_new_tokens,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Parsing a turn
# ---------------------------------------------------------------------------------------------------------------------

_ACTION_RE = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)
_OPEN_ACTION_RE = re.compile(r"<(search|answer)>", re.DOTALL)
_THINK_RE = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)


@dataclass
class ParsedTurn:
    """What one reply says: the new state, and the action (``search``/``answer``/None) with its argument."""

    state: str
    action: str | None
    argument: str = ""
    malformed: bool = False


def parse_turn(text: str) -> ParsedTurn:
    """Parse one reply leniently; never raises.

    - The action is the FIRST complete ``<search>..</search>`` or ``<answer>..</answer>``; later text is ignored.
      An unclosed action tag (the reply hit its token limit) still counts, with the rest of the text as argument,
      and is flagged malformed.
    - The state is the ``<think>`` block before the action (unclosed ``<think>`` runs to the action). Without a
      ``<think>`` block, the text before the action is the state, flagged malformed.
    - An empty search query or a reply with no action is malformed; with no tag at all the whole reply is the state.
    """
    malformed = False
    match = _ACTION_RE.search(text)
    if match is not None:
        action, argument, head = match.group(1), match.group(2).strip(), text[: match.start()]
    else:
        open_match = _OPEN_ACTION_RE.search(text)
        if open_match is not None:
            action, argument, head = open_match.group(1), text[open_match.end() :].strip(), text[: open_match.start()]
        else:
            action, argument, head = None, "", text
        malformed = True
    think = _THINK_RE.search(head)
    if think is not None:
        state = think.group(1).strip()
    else:
        state = head.replace("</think>", "").strip()
        malformed = True
    if action == "search" and not argument:
        action, malformed = None, True
    return ParsedTurn(state=state, action=action, argument=argument, malformed=malformed)


_NUMBER_PREFIX_RE = re.compile(r"^\s*(?:\(?\d+[.):]|answer\s*\d+\s*[:.)-]|q\d+\s*[:.)-])\s+", re.IGNORECASE)
_NUMBERED_SPLIT_RE = re.compile(r"(?:^|\s)\(?(\d+)[.)]\s+")


def split_answers(text: str, num_questions: int) -> list[str]:
    """Split one ``<answer>`` block into ``num_questions`` answers (``;``-separated, or a numbered list).

    Missing answers are empty strings; surplus parts are dropped. A single question keeps the whole text (only a
    leading "1." style number is stripped).
    """
    text = text.strip()
    if num_questions == 1:
        return [_NUMBER_PREFIX_RE.sub("", text).strip()]
    parts = [p for p in text.split(";")] if ";" in text else None
    if parts is None:
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) > 1:
            parts = lines
        else:
            starts = [m for m in _NUMBERED_SPLIT_RE.finditer(text)]
            if len(starts) > 1:
                bounds = [m.start() for m in starts] + [len(text)]
                parts = [text[bounds[i] : bounds[i + 1]] for i in range(len(starts))]
            else:
                parts = [text]
    answers = [_NUMBER_PREFIX_RE.sub("", p).strip() for p in parts]
    return (answers + [""] * num_questions)[:num_questions]


def multi_exact_match(predictions: Sequence[str], gold: Sequence[Sequence[str]]) -> float:
    """Exact match (SQuAD normalisation) averaged over the questions; each question may have several golds."""
    from memtrain.metrics import exact_match

    if len(predictions) != len(gold) or not gold:
        raise ValueError(f"{len(predictions)} predictions for {len(gold)} questions; they must match (and be > 0).")
    return sum(float(exact_match(p, list(g))) for p, g in zip(predictions, gold)) / len(gold)


# ---------------------------------------------------------------------------------------------------------------------
# Rows and prompts
# ---------------------------------------------------------------------------------------------------------------------


def row_questions(row: Mapping[str, Any], index: int = 0) -> tuple[list[str], list[list[str]]]:
    """(questions, gold answers per question) of a dataset row.

    A single question: ``prompt`` (str) + ``answers`` (list of str). Several questions asked together:
    ``questions`` (or a list ``prompt``) + ``answers`` as one list of accepted strings per question.
    """
    questions = row.get("questions")
    if questions is None:
        questions = row.get("prompt")
    if questions is None:
        raise ValueError(f"row {index}: no `prompt` or `questions` field (keys: {sorted(row)}).")
    answers = row.get("answers", [])
    if isinstance(questions, str):
        gold = [[answers] if isinstance(answers, str) else list(answers)]
        return [questions], gold
    questions = list(questions)
    if len(answers) != len(questions) or any(isinstance(a, str) for a in answers):
        raise ValueError(
            f"row {index}: {len(questions)} questions need `answers` as one list of accepted answers per question "
            f"(a list of {len(questions)} lists), got {str(answers)[:80]!r}."
        )
    return questions, [list(a) for a in answers]


def format_questions(questions: Sequence[str]) -> str:
    if len(questions) == 1:
        return questions[0]
    return "\n".join(f"{i}. {q}" for i, q in enumerate(questions, start=1))


def format_passages(passages: Sequence[Any]) -> str:
    """Search-R1/MEM1 observation layout: "Doc i(Title: t) text" lines."""
    return "\n".join(f"Doc {i}(Title: {p.title}) {p.text}" for i, p in enumerate(passages, start=1))


def truncate_to_tokens(tokenizer: Any, text: str, max_tokens: int) -> str:
    """The longest prefix of ``text`` whose re-tokenisation has at most ``max_tokens`` tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    cut = max_tokens
    while cut > 0:
        candidate = tokenizer.decode(ids[:cut], skip_special_tokens=True).rstrip("\ufffd")
        if len(tokenizer(candidate, add_special_tokens=False)["input_ids"]) <= max_tokens:
            return candidate
        cut -= 1
    return ""


def action_end(tokenizer: Any, completion_ids: Sequence[int]) -> int | None:
    """Number of leading tokens whose text first contains a closing ``</search>``/``</answer>``, or None.

    Generation cannot stop on strings through the Generator interface, so the recorded call is cut there (as a
    stop string would): the model never trains on text it wrote after its action.
    """

    def has_action(n: int) -> bool:
        return _ACTION_RE.search(tokenizer.decode(completion_ids[:n], skip_special_tokens=True)) is not None

    if not has_action(len(completion_ids)):
        return None
    low, high = 1, len(completion_ids)
    while low < high:
        mid = (low + high) // 2
        if has_action(mid):
            high = mid
        else:
            low = mid + 1
    return low


# ---------------------------------------------------------------------------------------------------------------------
# The agent
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _Rollout:
    trajectory: Trajectory
    questions: list[str]
    gold: list[list[str]]
    state: str = INITIAL_STATE
    information: str = NO_INFORMATION
    done: bool = False
    queries: list[str] = field(default_factory=list)
    malformed: int = 0


class SearchAgent:
    """Runs MEM1-style search rollouts for a batch of rows; see the module docstring for the protocol."""

    def __init__(
        self, tokenizer: Any, generator: Generator, retriever: Retriever, config: SearchAgentConfig | None = None
    ):
        require_chat_template(tokenizer, "search agent")
        self.tokenizer = tokenizer
        self.generator = generator
        self.retriever = retriever
        self.config = config if config is not None else SearchAgentConfig()

    def render_prompt(self, questions: Sequence[str], state: str, information: str, final: bool = False) -> str:
        k = len(questions)
        template = self.config.final_template if final else self.config.turn_template
        return template.format(
            what="the question" if k == 1 else f"{k} questions",
            answer_format=SINGLE_ANSWER_FORMAT if k == 1 else MULTI_ANSWER_FORMAT.format(k=k),
            questions=format_questions(questions),
            state=state,
            information=information,
        )

    def observation(self, query: str, passages: Sequence[Any]) -> str:
        """The information block for one search, cut to the observation budget (tokens of the whole block)."""
        text = format_passages(passages) if passages else f"No results for: {query}"
        return truncate_to_tokens(self.tokenizer, text, self.config.observation_max_tokens)

    def rollout(
        self, rows: Sequence[Mapping[str, Any]], n: int = 1, sampling: SamplingConfig | None = None
    ) -> list[Trajectory]:
        """``n`` rollouts per row, row-major, ``group`` = row index (like :meth:`MemoryAgent.rollout`).

        ``sampling`` defaults to the generator's own ``sampling`` attribute, else ``SamplingConfig()``;
        ``max_new_tokens`` comes from the agent config. A seeded rollout is deterministic: turn ``t`` uses a seed
        derived from ``(seed, t)``. The first turn's prompts are shared by a row's ``n`` rollouts and generated with
        ``n`` samples each; later turns are one sample per active trajectory. Either way one generator call per turn.

        Each :class:`Trajectory` holds one :class:`ModelCall` per turn (kind ``search`` for a turn that did not
        answer, ``final`` for the answering or forced final turn), ``memories`` = the internal states
        (``memories[0]`` the initial one), ``chunks`` = the information blocks received, ``answer`` = the raw
        ``<answer>`` text, and ``metadata``: ``questions``, ``gold_answers``, ``predictions`` (one per question),
        ``em`` (averaged over the questions), ``queries``, ``num_searches``, ``malformed_turns``, ``forced_final``.
        """
        cfg = self.config
        if n < 1:
            raise ValueError(f"n (rollouts per row) must be >= 1, got {n}.")
        sampling = sampling or getattr(self.generator, "sampling", None) or SamplingConfig()
        rollouts: list[_Rollout] = []
        for i, row in enumerate(rows):
            questions, gold = row_questions(row, i)
            for sample in range(n):
                trajectory = Trajectory(
                    doc_id=str(row.get("id", i)),
                    group=i,
                    problem=format_questions(questions),
                    chunks=[],
                    memories=[INITIAL_STATE],
                    metadata={"sample": sample},
                )
                rollouts.append(_Rollout(trajectory, questions, gold))

        for step in range(1, cfg.max_turns + 2):
            active = [r for r in rollouts if not r.done]
            if not active:
                break
            final = step == cfg.max_turns + 1
            samples = n if step == 1 else 1
            prompts = [
                encode_chat(self.tokenizer, self.render_prompt(r.questions, r.state, r.information, final))
                for r in active[::samples]
            ]
            seed = None if sampling.seed is None else (sampling.seed * 1_000_003 + step) % (2**63)
            step_sampling = replace(sampling, max_new_tokens=cfg.max_new_tokens, seed=seed)
            output = self.generator.generate(prompts, n=samples, sampling=step_sampling)
            if len(output.completion_ids) != len(active):
                raise RuntimeError(
                    f"the generator returned {len(output.completion_ids)} completions for {len(prompts)} prompts x "
                    f"n={samples}; a Generator must return n completions per prompt."
                )
            searches: list[tuple[_Rollout, str]] = []
            for j, r in enumerate(active):
                self._record(r, step, final, prompts[j // samples], output, j, searches)
            if searches:
                results = self.retriever.search([q for _, q in searches], k=cfg.topk)
                if len(results) != len(searches):
                    raise RuntimeError(
                        f"the retriever returned {len(results)} result lists for {len(searches)} queries."
                    )
                for (r, query), passages in zip(searches, results):
                    r.queries.append(query)
                    r.information = self.observation(query, passages)
                    r.trajectory.chunks.append(r.information)
        return [r.trajectory for r in rollouts]

    def _record(
        self,
        r: _Rollout,
        step: int,
        final: bool,
        prompt_ids: list[int],
        output: GenerationOutput,
        j: int,
        searches: list[tuple[_Rollout, str]],
    ) -> None:
        """Store completion ``j`` as this trajectory's call, update its state, and queue its search if any."""
        ids = list(output.completion_ids[j])
        logprobs = list(output.logprobs[j]) if output.logprobs is not None else None
        finished = bool(output.finished[j])
        end = action_end(self.tokenizer, ids) if self.config.stop_at_action else None
        if end is not None and end < len(ids):  # what a stop string would have produced
            ids, finished = ids[:end], True
            logprobs = logprobs[:end] if logprobs is not None else None
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        parsed = parse_turn(text)
        r.malformed += int(parsed.malformed)
        r.state = truncate_to_tokens(self.tokenizer, parsed.state, self.config.state_max_tokens) or INITIAL_STATE
        r.trajectory.memories.append(r.state)
        answered = parsed.action == "answer" or final
        kind = "final" if answered else "search"
        r.trajectory.calls.append(ModelCall(kind, step, list(prompt_ids), ids, text, logprobs, finished))
        if answered:
            r.done = True
            self._finish(r, parsed.argument if parsed.action == "answer" else "", forced=final)
        elif parsed.action == "search":
            searches.append((r, parsed.argument))
        else:
            r.information = INVALID_ACTION

    def _finish(self, r: _Rollout, answer: str, forced: bool) -> None:
        predictions = split_answers(answer, len(r.questions))
        r.trajectory.answer = answer
        r.trajectory.metadata.update(
            {
                "questions": r.questions,
                "gold_answers": r.gold,
                "predictions": predictions,
                "em": multi_exact_match(predictions, r.gold),
                "queries": r.queries,
                "num_searches": len(r.queries),
                "malformed_turns": r.malformed,
                "forced_final": forced,
            }
        )
