"""Per-token log-probs and entropies of chosen positions, without the (positions x vocab) fp32 logits.

GRPO needs one number per completion token: its log-prob at the sampling temperature (plus the entropy, for the
metric). A plain log-softmax over Qwen's 152,064-token vocabulary holds ``rows x (C + 1) x vocab`` fp32 logits, and
autograd keeps them for the backward: ~9 GB of the 7B recipe's training peak. Here the LM head's weight is applied
to a few hundred positions at a time; the backward recomputes each slice's logits instead of storing them, so the
peak is one slice's logits whatever the batch.

:func:`scored_forward` runs a model with its LM head temporarily replaced by this computation on exactly the
positions to score (a (batch, position) list), so prompt positions never reach the head at all. Heads that are not
a plain ``nn.Linear`` (a LoRA-wrapped or quantized head) or models that transform logits after the head (soft
capping, logit scales) get the same positions through their own head, scored with a plain log-softmax.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


logger = logging.getLogger(__name__)

LOGITS_PER_SLICE = 2**26
"""Logit elements one slice of the head computes at once (256 MB in fp32): 441 positions at Qwen's vocabulary."""

# Config attributes under which a CausalLM rescales or caps the head's output after the head (TRL's fused head reads
# the same list); a head replaced by log-probs would have them applied to the wrong numbers.
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def positions_per_slice(vocab_size: int) -> int:
    return max(1, LOGITS_PER_SLICE // max(vocab_size, 1))


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _slice_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float):
    return _at_least_fp32(nn.functional.linear(hidden.to(weight.dtype), weight, bias)) / temperature


class _SlicedLogProbs(torch.autograd.Function):
    """log p(target | hidden) and the entropy at each position; logits exist one slice at a time, both ways."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, positions: int):
        logps = hidden.new_empty(hidden.size(0), dtype=torch.promote_types(weight.dtype, torch.float32))
        entropies = torch.empty_like(logps)
        for start in range(0, hidden.size(0), positions):
            end = start + positions
            logits = _slice_logits(hidden[start:end], weight, bias, temperature)
            normaliser = torch.logsumexp(logits, dim=-1)
            logps[start:end] = logits.gather(-1, targets[start:end].unsqueeze(-1)).squeeze(-1) - normaliser
            probs = torch.exp(logits - normaliser.unsqueeze(-1))
            entropies[start:end] = normaliser - (probs * logits).sum(-1)
            del logits, probs
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.temperature, ctx.positions = temperature, positions
        ctx.mark_non_differentiable(entropies)
        return logps, entropies

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropies):
        hidden, weight, bias, targets = ctx.saved_tensors
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=accumulate, device=bias.device) if want_bias else None
        for start in range(0, hidden.size(0), ctx.positions):
            end = start + ctx.positions
            logits = _slice_logits(hidden[start:end], weight, bias, ctx.temperature)
            # d log p_y / d logits = onehot(y) - softmax, through the 1/temperature of the logits
            grad_logits = -torch.softmax(logits, dim=-1)
            del logits
            grad_logits.scatter_add_(-1, targets[start:end].unsqueeze(-1), torch.ones_like(grad_logits[:, :1]))
            grad_logits *= grad_logps[start:end].to(grad_logits.dtype).unsqueeze(-1) / ctx.temperature
            if want_hidden:
                grad_hidden[start:end] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if want_weight:
                grad_weight += grad_logits.T @ hidden[start:end].to(accumulate)
            if want_bias:
                grad_bias += grad_logits.sum(0)
            del grad_logits
        grad_weight = grad_weight.to(weight.dtype) if want_weight else None
        grad_bias = grad_bias.to(bias.dtype) if want_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None


def sliced_logprobs(
    hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropies) of ``targets`` under ``head(hidden) / temperature``, one slice of logits at a time."""
    weight, bias = head.weight, head.bias
    if hasattr(weight, "full_tensor"):  # FSDP2 DTensor (a head sharded on its own): the full matrix for the slices
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    return _SlicedLogProbs.apply(hidden, weight, bias, targets, temperature, positions_per_slice(weight.size(0)))


def plain_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """The reference computation: a log-softmax over all logits at once (autograd keeps them all)."""
    log_probs = torch.log_softmax(_at_least_fp32(logits) / temperature, dim=-1)
    logps = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropies = -(log_probs.exp() * log_probs).sum(-1)
    return logps, entropies


def can_slice_head(model: Any) -> bool:
    """Whether the model's head is a plain linear layer whose output the model returns unchanged."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text_config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return False
    return type(model.get_output_embeddings()) is nn.Linear


_warned: set[str] = set()


def _note_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


@contextlib.contextmanager
def _head_replaced(head: nn.Module, compute) -> Iterator[None]:
    original = head.forward
    head.forward = compute
    try:
        yield
    finally:
        head.forward = original
        if head.__dict__.get("forward") is original:
            del head.__dict__["forward"]


def scored_forward(
    model: nn.Module,
    core_model: Any,
    inputs: dict[str, torch.Tensor],
    score_rows: torch.Tensor,
    score_positions: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model(**inputs)`` and return (log-probs, entropies) of ``targets`` at the given (row, position) pairs.

    The logits at position ``p`` predict the token at ``p + 1`` of a contiguous sequence; callers pass the positions
    whose next-token distribution scores each target. ``core_model`` is the unwrapped model (DDP/PEFT/FSDP wrappers
    removed) that owns the head; ``model`` is what the forward is called on, so wrappers keep their hooks.
    """
    head = core_model.get_output_embeddings()
    sliced = can_slice_head(core_model)
    if not sliced:
        _note_once(
            f"log-probs: the model's head ({type(head).__name__}) or a logit transform rules out the sliced head; "
            "the kept positions' full logits are materialised instead"
        )
    original = head.forward

    def compute(hidden_states: torch.Tensor) -> torch.Tensor:
        picked = hidden_states[score_rows, score_positions]
        if sliced:
            logps, entropies = sliced_logprobs(picked, head, targets, temperature)
        else:
            logps, entropies = plain_logprobs(original(picked), targets, temperature)
        # Returned as the model's "logits" so the backward enters through the model's output: FSDP's and DDP's
        # backward hooks sit there.
        return torch.stack([logps, entropies.detach()], dim=-1).unsqueeze(0)

    with _head_replaced(head, compute):
        scores = model(**inputs, logits_to_keep=0).logits[0]
    return scores[:, 0], scores[:, 1].detach()
