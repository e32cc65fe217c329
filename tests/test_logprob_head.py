"""The sliced head gives the plain log-softmax's log-probs, entropies and gradients, a slice of logits at a time."""

import pytest
import torch
from conftest import build_tiny_model
from torch import nn

import memtrain.logprob_head as logprob_head
from memtrain.logprob_head import can_slice_head, plain_logprobs, positions_per_slice, sliced_logprobs


def _head_and_inputs(bias: bool, seed: int = 0):
    torch.manual_seed(seed)
    head = nn.Linear(16, 300, bias=bias).double()
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 300, (37,))
    return head, hidden, targets


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sliced_head_equals_the_plain_one(monkeypatch, bias, temperature):
    monkeypatch.setattr(logprob_head, "LOGITS_PER_SLICE", 300 * 5)  # 8 slices of 5 positions, the last one short
    assert positions_per_slice(300) == 5
    head, hidden, targets = _head_and_inputs(bias)
    upstream = torch.randn(37, dtype=torch.float64)

    logps, entropies = sliced_logprobs(hidden, head, targets, temperature)
    (logps * upstream).sum().backward()
    sliced_grads = [hidden.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    hidden.grad = None
    head.zero_grad()
    ref_logps, ref_entropies = plain_logprobs(head(hidden), targets, temperature)
    (ref_logps * upstream).sum().backward()
    plain_grads = [hidden.grad] + [p.grad for p in head.parameters()]

    torch.testing.assert_close(logps, ref_logps, atol=1e-12, rtol=0)
    torch.testing.assert_close(entropies, ref_entropies, atol=1e-12, rtol=0)
    assert not entropies.requires_grad
    for got, want in zip(sliced_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_frozen_head_gets_no_weight_gradient():
    head, hidden, targets = _head_and_inputs(bias=False)
    head.requires_grad_(False)
    sliced_logprobs(hidden, head, targets)[0].sum().backward()
    assert head.weight.grad is None and hidden.grad is not None


def test_heads_that_are_not_plain_linear_layers_are_not_sliced(tokenizer):
    model = build_tiny_model(tokenizer)
    assert can_slice_head(model)
    model.config.final_logit_softcapping = 30.0  # Gemma 2 caps logits after the head
    assert not can_slice_head(model)
    model.config.final_logit_softcapping = None
    model.lm_head = nn.Sequential(model.lm_head)
    assert not can_slice_head(model)
