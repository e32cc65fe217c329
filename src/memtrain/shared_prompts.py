"""Scoring rows that share a prompt with the prompt encoded once (Prefix Grouper, arXiv 2506.05433).

A MemTrain step trains many rows with one exact prompt: the G2 recall answers of a probe (memory + masked chunk,
~6k tokens each at the paper's settings, answers of 10-30 tokens) and the G1 first-step memory updates of a
document. Row by row, that prompt is encoded once per row. Here each group of rows becomes one sequence: the prompt
(all but its last token) once, then one segment per row: the prompt's last token followed by the row's completion
(all but its last token). A block mask lets the prompt attend causally to itself and each segment attend to the
prompt and causally to itself; position ids restart at the prompt's end in every segment. Every segment token thus
sees exactly what it saw in its own row, so log-probs, the loss and gradients are those of the row-by-row forward,
and the prompt's activations receive the sum of its rows' gradients, as autograd would sum them.

The block mask needs an attention implementation that takes an arbitrary 4D mask (``sdpa``, ``eager``) and no
sliding-window layers; otherwise rows are scored one by one (said once in the log).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from memtrain.grpo import TrainingRow
from memtrain.logprob_head import scored_forward


logger = logging.getLogger(__name__)

MASKABLE_ATTENTION = ("sdpa", "eager")


@dataclass
class ScoringBatch:
    """Model inputs plus, for each scored token, where it is read (``score_rows``/``score_positions``: the position
    whose next-token distribution scores it), its id (``targets``) and where it goes in the (rows, completion)
    output (``row_index``/``token_index``)."""

    inputs: dict[str, torch.Tensor]
    score_rows: torch.Tensor
    score_positions: torch.Tensor
    targets: torch.Tensor
    row_index: torch.Tensor
    token_index: torch.Tensor
    num_rows: int
    completion_width: int

    def to(self, device: torch.device | str) -> ScoringBatch:
        moved = {key: getattr(self, key).to(device) for key in ScoringBatch._tensor_fields}
        inputs = {key: value.to(device) for key, value in self.inputs.items()}
        return ScoringBatch(inputs=inputs, num_rows=self.num_rows, completion_width=self.completion_width, **moved)

    _tensor_fields = ("score_rows", "score_positions", "targets", "row_index", "token_index")


def _completion_width(rows: list[TrainingRow]) -> int:
    return max(max((len(row.completion_ids) for row in rows), default=0), 1)  # as collate_rows pads completions


def row_by_row_batch(rows: list[TrainingRow], pad_token_id: int) -> ScoringBatch:
    """TRL's layout, one row per sequence: prompts left-padded, completions right-padded."""
    prompt_len = max(len(row.prompt_ids) for row in rows)
    width = _completion_width(rows)
    ids = torch.full((len(rows), prompt_len + width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    where: list[tuple[int, int, int, int]] = []
    for i, row in enumerate(rows):
        p, c = len(row.prompt_ids), len(row.completion_ids)
        ids[i, prompt_len - p : prompt_len + c] = torch.tensor(row.prompt_ids + row.completion_ids, dtype=torch.long)
        mask[i, prompt_len - p : prompt_len + c] = 1
        where += [(i, prompt_len - 1 + j, row.completion_ids[j], j) for j in range(c)]
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return _scoring_batch({"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}, where, rows)


def group_by_prompt(rows: list[TrainingRow]) -> list[list[int]]:
    """Indices of ``rows`` grouped by identical prompt, in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(tuple(row.prompt_ids), []).append(i)
    return list(groups.values())


def shared_prompt_batch(rows: list[TrainingRow], pad_token_id: int, attention: str = "sdpa") -> ScoringBatch:
    """One sequence per group of rows with the same prompt (see the module docstring), right-padded."""
    sequences, positions, segments = [], [], []
    where: list[tuple[int, int, int, int]] = []
    for b, members in enumerate(group_by_prompt(rows)):
        prompt = rows[members[0]].prompt_ids
        if not prompt:
            raise ValueError("a training row has an empty prompt: nothing to condition its completion on.")
        ids, pos, seg = list(prompt[:-1]), list(range(len(prompt) - 1)), [0] * (len(prompt) - 1)
        for s, i in enumerate(members, start=1):
            completion = rows[i].completion_ids
            if not completion:
                continue
            start = len(ids)
            ids += [prompt[-1]] + completion[:-1]
            pos += range(len(prompt) - 1, len(prompt) - 1 + len(completion))
            seg += [s] * len(completion)
            where += [(b, start + j, completion[j], j, i) for j in range(len(completion))]
        sequences.append(ids)
        positions.append(pos)
        segments.append(seg)
    length = max(max(len(ids) for ids in sequences), 1)
    n = len(sequences)
    input_ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n, length), dtype=torch.long)
    segment = torch.full((n, length), -1, dtype=torch.long)  # -1: padding
    for b, (ids, pos, seg) in enumerate(zip(sequences, positions, segments)):
        input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        position_ids[b, : len(pos)] = torch.tensor(list(pos), dtype=torch.long)
        segment[b, : len(seg)] = torch.tensor(seg, dtype=torch.long)
    query, key = segment.unsqueeze(2), segment.unsqueeze(1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal & (key >= 0) & (query >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(length, dtype=torch.bool) & (query < 0)  # padding attends to itself: no empty softmax row
    mask = allowed.unsqueeze(1)
    if attention == "eager":  # eager attention adds its mask to the scores
        mask = torch.zeros(mask.shape, dtype=torch.float32).masked_fill(~mask, torch.finfo(torch.float32).min)
    inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}
    return _scoring_batch(inputs, [(b, p, t, j) for b, p, t, j, _ in where], rows, [i for *_, i in where])


def _scoring_batch(inputs, where, rows, row_of: list[int] | None = None) -> ScoringBatch:
    columns = list(zip(*where)) if where else [(), (), (), ()]
    as_long = lambda values: torch.tensor(list(values), dtype=torch.long)  # noqa: E731
    return ScoringBatch(
        inputs=inputs,
        score_rows=as_long(columns[0]),
        score_positions=as_long(columns[1]),
        targets=as_long(columns[2]),
        row_index=as_long(row_of if row_of is not None else columns[0]),
        token_index=as_long(columns[3]),
        num_rows=len(rows),
        completion_width=_completion_width(rows),
    )


def shared_prompt_blocker(config: Any) -> str | None:
    """Why rows cannot share their prompt's forward under this model config, or None when they can."""
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in MASKABLE_ATTENTION:
        return f"attention implementation {attention!r} takes no block mask (use sdpa or eager to share prompts)"
    layer_types = getattr(config, "layer_types", None) or []
    if "sliding_attention" in layer_types or getattr(config, "use_sliding_window", False):
        return "sliding-window attention layers would ignore the block mask"
    return None


_said: set[str] = set()


def score_rows(
    model: torch.nn.Module,
    core_model: Any,
    rows: list[TrainingRow],
    pad_token_id: int,
    temperature: float,
    device: torch.device | str,
    share_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropies) of each row's completion tokens, (rows, longest completion), zero past each end.

    ``core_model`` is the unwrapped model (for its config and head), ``model`` what the forward is called on.
    """
    blocker = shared_prompt_blocker(core_model.config) if share_prompts else "shared prompts are off"
    if blocker is None:
        batch = shared_prompt_batch(rows, pad_token_id, core_model.config._attn_implementation)
    else:
        if share_prompts and blocker not in _said:
            _said.add(blocker)
            logger.warning(f"shared prompts: {blocker}; rows are scored one by one")
        batch = row_by_row_batch(rows, pad_token_id)
    batch = batch.to(device)
    logps, entropies = scored_forward(
        model, core_model, batch.inputs, batch.score_rows, batch.score_positions, batch.targets, temperature
    )
    shape = (batch.num_rows, batch.completion_width)
    out_logps = logps.new_zeros(shape).index_put((batch.row_index, batch.token_index), logps)
    out_entropies = entropies.new_zeros(shape).index_put((batch.row_index, batch.token_index), entropies)
    return out_logps, out_entropies


def shared_prompt_micro_batches(rows: list[TrainingRow], max_tokens: int) -> list[list[TrainingRow]]:
    """Rows in micro-batches whose packed size (sequences x longest sequence) stays within ``max_tokens``.

    A group of rows with one prompt is one sequence of ``prompt + its completions`` tokens; a group too long for the
    budget is split into several sequences (each encodes the prompt once). A single row longer than the budget gets
    a micro-batch of its own, as in :func:`memtrain.grpo.pack_micro_batches`.
    """
    units: list[tuple[int, list[TrainingRow]]] = []
    for members in group_by_prompt(rows):
        prompt_len = len(rows[members[0]].prompt_ids) - 1
        current: list[TrainingRow] = []
        length = prompt_len
        for i in members:
            extra = len(rows[i].completion_ids)
            if current and length + extra > max_tokens:
                units.append((length, current))
                current, length = [], prompt_len
            current.append(rows[i])
            length += extra
        units.append((max(length, 1), current))
    batches: list[list[TrainingRow]] = []
    current, count, longest = [], 0, 0
    for length, members in sorted(units, key=lambda unit: unit[0]):
        new_longest = max(longest, length)
        if current and new_longest * (count + 1) > max_tokens:
            batches.append(current)
            current, count, new_longest = [], 0, length
        current += members
        count += 1
        longest = new_longest
    if current:
        batches.append(current)
    return batches
