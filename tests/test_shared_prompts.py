"""Rows that share a prompt, scored in one packed sequence, equal the row-by-row forward (fp64 on CPU)."""

import random

import pytest
import torch
from conftest import build_tiny_model

from memtrain.grpo import TrainingRow, collate_rows
from memtrain.logprob_head import plain_logprobs
from memtrain.shared_prompts import (
    group_by_prompt,
    row_by_row_batch,
    score_rows,
    shared_prompt_batch,
    shared_prompt_blocker,
    shared_prompt_micro_batches,
)


TOLERANCE = 1e-7  # log-probs; see GRAD_TOLERANCE for why not 1e-12
# Gradients sum over many positions of rotary embeddings that transformers computes in fp32 even in a fp64 model;
# vectorised cos/sin differ in the last fp32 bit with a value's place in the array, so the same token at another
# offset can move a gradient by ~1e-8. A mask or position error moves them by >1e-3.
GRAD_TOLERANCE = 1e-6


def _rows(vocab: int, seed: int = 0) -> list[TrainingRow]:
    """Two probes' recall answers (G2 = 3 each, one prompt per probe), and memory updates with prompts of their own
    or shared by two rollouts, in shuffled order: the layout of a MemTrain step, small."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    probe_a, probe_b, first_update = tokens(37), tokens(23), tokens(41)
    rows = [TrainingRow(probe_a, tokens(rng.randint(1, 6)), 0.5, "recall", 10 + k) for k in range(3)]
    rows += [TrainingRow(probe_b, tokens(rng.randint(1, 6)), -0.25, "recall", 20 + k) for k in range(3)]
    rows += [TrainingRow(first_update, tokens(9), 1.0, "memory", k) for k in range(2)]
    rows += [TrainingRow(tokens(30), tokens(7), -1.0, "memory", 3), TrainingRow([5], tokens(4), 0.1, "final", 4)]
    rng.shuffle(rows)
    for row in rows:
        row.weight = 1.0
    return rows


def _reference(model, rows: list[TrainingRow], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The row-by-row computation as the trainer had it: TRL's layout, full logits, one log-softmax."""
    batch = collate_rows(rows, pad)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    keep = batch["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                   logits_to_keep=keep + 1).logits  # fmt: skip
    logps, entropies = plain_logprobs(logits[:, :-1], batch["completion_ids"])
    completion_mask = batch["completion_mask"].to(logps.dtype)
    return logps * completion_mask, entropies * completion_mask


def _loss(logps: torch.Tensor, rows: list[TrainingRow]) -> torch.Tensor:
    advantages = torch.tensor([row.advantage for row in rows], dtype=logps.dtype)
    return -(logps.sum(1) * advantages).sum()


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def fp64_model(tokenizer):
    model = build_tiny_model(tokenizer).double()
    model.config._attn_implementation = "sdpa"
    return model


def test_groups_follow_exact_prompts():
    rows = [TrainingRow([1, 2], [3], 0, "r", 0), TrainingRow([1, 2, 3], [4], 0, "r", 1)]
    rows += [TrainingRow([1, 2], [5], 0, "r", 2)]
    assert group_by_prompt(rows) == [[0, 2], [1]]


def test_a_group_is_one_sequence_with_its_prompt_once(tokenizer):
    rows = [TrainingRow([7, 8, 9], [11, 12], 0, "recall", k) for k in range(3)]
    batch = shared_prompt_batch(rows, tokenizer.pad_token_id)
    # prompt minus its last token once, then per row: the prompt's last token and the completion minus its last
    assert batch.inputs["input_ids"].tolist() == [[7, 8, 9, 11, 9, 11, 9, 11]]
    assert batch.inputs["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 2, 3]]
    mask = batch.inputs["attention_mask"][0, 0]
    assert mask[4].tolist() == [True, True, False, False, True, False, False, False]  # 2nd row's prompt token
    assert mask[5].tolist() == [True, True, False, False, True, True, False, False]
    assert batch.score_positions.tolist() == [2, 3, 4, 5, 6, 7] and batch.targets.tolist() == [11, 12] * 3


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_logps_and_gradients_equal_row_by_row(fp64_model, tokenizer, attention):
    rows, pad = _rows(len(tokenizer)), tokenizer.pad_token_id
    assert len(shared_prompt_batch(rows, pad).inputs["input_ids"]) == 5  # 10 rows, 5 distinct prompts
    # the reference under sdpa: eager attention turns the left-padded rows of a fp64 batch into NaN
    ref_logps, ref_entropies = _reference(fp64_model, rows, pad)
    _loss(ref_logps, rows).backward()
    reference = _grads(fp64_model)
    fp64_model.zero_grad()

    fp64_model.config._attn_implementation = attention
    logps, entropies = score_rows(fp64_model, fp64_model, rows, pad, 1.0, "cpu")
    _loss(logps, rows).backward()
    shared = _grads(fp64_model)

    torch.testing.assert_close(logps, ref_logps, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(entropies, ref_entropies, atol=TOLERANCE, rtol=0)
    assert shared.keys() == reference.keys() and len(shared) > 5
    for name in reference:
        torch.testing.assert_close(shared[name], reference[name], atol=GRAD_TOLERANCE, rtol=GRAD_TOLERANCE, msg=name)


def test_shared_prompts_across_micro_batches_with_lora_and_checkpointing(fp64_model, tokenizer):
    from peft import LoraConfig, get_peft_model

    fp64_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(fp64_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, param in model.named_parameters():  # LoRA B starts at zero; make the adapter do something
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    model.train()
    rows, pad = _rows(len(tokenizer), seed=1), tokenizer.pad_token_id
    micro_batches = shared_prompt_micro_batches(rows, max_tokens=60)
    assert len(micro_batches) > 2 and sorted(map(id, sum(micro_batches, []))) == sorted(map(id, rows))
    # a probe's answers may be split over micro-batches by the budget, and are then encoded once per micro-batch
    for micro in micro_batches:
        logps, _ = score_rows(model, model.get_base_model(), micro, pad, 0.7, "cpu")
        _loss(logps, micro).backward()
    shared = _grads(model)
    model.zero_grad()
    for row in rows:  # one row at a time, the plainest reference
        logps, _ = _reference_at_temperature(model, [row], pad, 0.7)
        _loss(logps, [row]).backward()
    reference = _grads(model)
    assert shared.keys() == reference.keys() and all("lora" in name for name in shared)
    for name in reference:
        torch.testing.assert_close(shared[name], reference[name], atol=GRAD_TOLERANCE, rtol=GRAD_TOLERANCE, msg=name)


def _reference_at_temperature(model, rows, pad, temperature):
    batch = collate_rows(rows, pad)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    keep = batch["completion_ids"].size(1)
    return plain_logprobs(logits[:, -keep - 1 : -1], batch["completion_ids"], temperature)


def test_micro_batches_keep_the_token_budget_and_encode_each_prompt_once(tokenizer):
    rows = _rows(len(tokenizer))
    budget = 120
    for micro in shared_prompt_micro_batches(rows, budget):
        ids = shared_prompt_batch(micro, tokenizer.pad_token_id).inputs["input_ids"]
        assert ids.numel() <= budget or len(micro) == 1
    (whole,) = shared_prompt_micro_batches(rows, 10_000)
    packed = shared_prompt_batch(whole, tokenizer.pad_token_id).inputs["input_ids"]
    real_tokens = int((packed != tokenizer.pad_token_id).sum())  # _rows draws no pad token
    row_by_row = sum(row.num_tokens - 1 for row in rows)
    assert real_tokens == row_by_row - 2 * (37 - 1) - 2 * (23 - 1) - (41 - 1)  # prompts repeated 2, 2 and 1 times


def test_row_by_row_layout_scores_each_completion_after_its_prompt(tokenizer):
    rows = [TrainingRow([4, 5, 6], [7, 8], 0, "memory", 0), TrainingRow([9], [10, 11, 12], 0, "memory", 1)]
    batch = row_by_row_batch(rows, 0)
    assert batch.inputs["input_ids"].tolist() == [[4, 5, 6, 7, 8, 0], [0, 0, 9, 10, 11, 12]]
    assert batch.score_positions.tolist() == [2, 3, 2, 3, 4] and batch.targets.tolist() == [7, 8, 10, 11, 12]


def test_attention_without_block_masks_falls_back_to_rows_and_says_so(fp64_model, tokenizer, caplog):
    fp64_model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in shared_prompt_blocker(fp64_model.config)
    fp64_model.config._attn_implementation = "sdpa"
    fp64_model.config.use_sliding_window = True  # Qwen2's switch; Llama's forward ignores it
    assert "sliding" in shared_prompt_blocker(fp64_model.config)
    rows = _rows(len(tokenizer))
    with caplog.at_level("WARNING"):
        logps, _ = score_rows(fp64_model, fp64_model, rows, tokenizer.pad_token_id, 1.0, "cpu")
        score_rows(fp64_model, fp64_model, rows, tokenizer.pad_token_id, 1.0, "cpu")
    said = [r.message for r in caplog.records if "shared prompts" in r.message]
    assert len(said) == 1 and "one by one" in said[0]
    torch.testing.assert_close(logps, _reference(fp64_model, rows, tokenizer.pad_token_id)[0], atol=TOLERANCE, rtol=0)
