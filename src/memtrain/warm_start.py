"""A supervised warm start on the recall and memory-update turns, for models too small to answer recall probes.

GRPO learns only from groups whose rewards differ. SmolLM2-135M-Instruct never answers a recall probe right, even
with a perfect memory (0% exact match when sampled, benchmarks/reward_signal.py), so nearly every group is
all-zero and MemTrain has nothing to learn from. The warm start teaches the turn FORMATS from the same
self-supervised signal MemTrain uses, with no labels: a chunk's first ``max_memory_tokens`` tokens stand in for a
perfect memory; a recall turn masks an entity of that memory in the chunk with ``[TARGET]`` and learns the reply
``\\boxed{entity}``; an update turn learns to keep that plain copy as its memory. What a good memory keeps beyond
the copy is left to GRPO.

This is not in the paper, whose 4B/7B models answer recall probes from the start; recipes enable it with
``warm_start_examples`` (0 = off) and record it on the model card like every other key.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from memtrain.agent.memory_agent import MemoryAgent
from memtrain.agent.prompts import TARGET_TOKEN, render_chat
from memtrain.agent.recall import EntityFinder, EntityMasker, touches_chunk_edge


logger = logging.getLogger(__name__)

__all__ = ["WarmStartExample", "build_warm_start_examples", "warm_start"]


@dataclass
class WarmStartExample:
    """One supervised turn: the exact prompt the agent would send and the reply to learn (``entity``: recall only)."""

    prompt_ids: list[int]
    target_ids: list[int]
    entity: str


_SENTINEL = "\u2063memtrain-reply\u2063"


def _turn_end(tokenizer) -> str:
    """What the chat template writes after an assistant reply (e.g. ``<|im_end|>``), found with a sentinel reply."""
    chat = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _SENTINEL}]
    text = render_chat(tokenizer, chat, add_generation_prompt=False)
    if _SENTINEL not in text:
        raise ValueError("The chat template drops the assistant's reply, so replies cannot be trained on.")
    return text.split(_SENTINEL)[-1].rstrip()


def _reply_ids(tokenizer, reply: str, turn_end: str) -> list[int]:
    """The reply's tokens as generated after the generation prompt, closed by the template's end-of-turn marker.

    Tokenised on its own rather than cut out of a rendered chat: a reply that starts with a newline would merge with
    the header's newline into one token, and the prompt would no longer be a prefix of the chat.
    """
    return tokenizer.encode(reply.strip() + turn_end, add_special_tokens=False)


def build_warm_start_examples(
    contexts: Sequence[str],
    problems: Sequence[str],
    agent: MemoryAgent,
    find_entities: EntityFinder,
    mask_entity: EntityMasker,
    num_examples: int,
    seed: int = 0,
) -> list[WarmStartExample]:
    """Up to ``num_examples`` turns, half recall and half memory update, documents in seeded order.

    The update turns are there so the recall format does not leak into memory writing: trained on recall replies
    alone, SmolLM2-135M starts writing ``\\boxed{...}`` as its memory. Their target is the plainest memory, the
    chunk's first ``max_memory_tokens`` tokens, given the previous chunk's as the previous memory.
    """
    if num_examples <= 0:
        return []
    rng = random.Random(seed)
    tokenizer = agent.tokenizer
    turn_end = _turn_end(tokenizer)
    budget = agent.config.max_memory_tokens
    order = list(range(len(contexts)))
    rng.shuffle(order)
    recall: list[WarmStartExample] = []
    update: list[WarmStartExample] = []
    want_recall = (num_examples + 1) // 2
    want_update = num_examples - want_recall
    for start in range(0, len(order), 16):  # NER in batches of 16 documents' chunks
        batch = [(index, agent.chunk(contexts[index]).chunks) for index in order[start : start + 16]]
        chunks = [(index, position, chunk) for index, doc_chunks in batch for position, chunk in enumerate(doc_chunks)]
        copies = [
            tokenizer.decode(tokenizer.encode(chunk, add_special_tokens=False)[:budget], skip_special_tokens=True)
            for _, _, chunk in chunks
        ]
        found = find_entities(copies)
        for k, ((index, position, chunk), memory, entities) in enumerate(zip(chunks, copies, found)):
            if len(update) < want_update and rng.random() < 0.5:
                previous = agent.config.no_memory_text if position == 0 else copies[k - 1]
                user_text = agent.templates.render_update(problems[index], previous, chunk)
                update.append(_example(agent, user_text, memory, "", turn_end))
                continue
            candidates = sorted(e for e in entities if not touches_chunk_edge(memory, e) and e in chunk)
            if len(recall) >= want_recall or not candidates:
                continue
            entity = rng.choice(candidates)
            masked = mask_entity(chunk, entity)
            if TARGET_TOKEN in masked:
                user_text = agent.templates.render_recall(memory, masked)
                recall.append(_example(agent, user_text, f"\\boxed{{{entity}}}", entity, turn_end))
        if len(recall) >= want_recall and len(update) >= want_update:
            break
    examples = [e for pair in zip(recall, update) for e in pair] + recall[len(update) :] + update[len(recall) :]
    if len(examples) < num_examples:
        logger.warning("Warm start: only %d of %d examples could be built.", len(examples), num_examples)
    return examples[:num_examples]


def _example(agent: MemoryAgent, user_text: str, reply: str, entity: str, turn_end: str) -> WarmStartExample:
    return WarmStartExample(agent.encode_chat(user_text), _reply_ids(agent.tokenizer, reply, turn_end), entity)


def warm_start(
    model: torch.nn.Module,
    examples: Sequence[WarmStartExample],
    learning_rate: float,
    epochs: int = 1,
    batch_size: int = 8,
    pad_token_id: int = 0,
    seed: int = 0,
) -> list[float]:
    """Fine-tune on the replies only (prompt tokens are not learned); returns the loss of every batch.

    Only parameters that require gradients move, so on a PEFT model the warm start trains the adapters.
    """
    if not examples:
        return []
    if learning_rate <= 0 or epochs < 1 or batch_size < 1:
        raise ValueError(
            f"Warm start needs learning_rate > 0, epochs >= 1 and batch_size >= 1, got {learning_rate}, {epochs}, "
            f"{batch_size}."
        )
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    rng = random.Random(seed)
    was_training = model.training
    model.train()
    losses: list[float] = []
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start : start + batch_size]]
            width = max(len(e.prompt_ids) + len(e.target_ids) for e in batch)
            input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, example in enumerate(batch):
                ids = example.prompt_ids + example.target_ids
                input_ids[row, : len(ids)] = torch.tensor(ids)
                labels[row, len(example.prompt_ids) : len(ids)] = torch.tensor(example.target_ids)
                attention[row, : len(ids)] = 1
            out = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), labels=labels.to(device))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
    model.train(was_training)
    return losses
