"""Adapter-only vLLM sync: what crosses per sync (the LoRA matrices, in the engine's dtype), the folder it crosses in,
the LoRA rank the engine is built for, and the settings refused before the model loads.

The served-policy checks with a real engine are in tests/vllm_real/test_memtrainer_vllm.py (vLLM's CPU build).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from memtrain.preflight import PreflightError, check_vllm_lora_sync
from memtrain.vllm_lora_sync import VLLM_LORA_RANKS, adapter_rank, adapter_tensors, served_lora_rank


def tiny_lora(r: int = 4, **config) -> PeftModel:
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    )
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "down_proj"], **config))
    for name, param in model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


@pytest.mark.parametrize(("rank", "served"), [(1, 1), (4, 8), (8, 8), (9, 16), (16, 16), (64, 64), (300, 320)])
def test_the_engine_is_built_for_the_smallest_vllm_rank_that_holds_the_adapter(rank, served):
    assert served_lora_rank(rank) == served


def test_a_rank_above_vllms_largest_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"lora_r=1024 is above vLLM's largest LoRA rank \(512\); lower lora_r"):
        served_lora_rank(VLLM_LORA_RANKS[-1] * 2)


def test_the_adapters_rank_counts_per_module_overrides():
    assert adapter_rank(tiny_lora(r=4)) == 4
    assert adapter_rank(tiny_lora(r=4, rank_pattern={"down_proj": 12})) == 12


def test_only_the_lora_matrices_cross_in_the_engines_dtype():
    model = tiny_lora()
    tensors = adapter_tensors(model, torch.bfloat16)
    lora = {name: param for name, param in model.named_parameters() if "lora_" in name}
    assert len(tensors) == len(lora) == 2 * 2 * 2  # A and B, 2 target modules, 2 layers
    assert all(".lora_A." in name or ".lora_B." in name for name in tensors)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in lora.values())
    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"  # PEFT's saved name
    torch.testing.assert_close(tensors[q_a], model.base_model.model.model.layers[0].self_attn.q_proj.lora_A[
        "default"].weight.detach().to(torch.bfloat16))  # fmt: skip
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in tensors.values())
    # new tensors: the trainer's masters are never shared with what is written
    assert all(t.data_ptr() != p.data_ptr() for t, p in zip(adapter_tensors(model, None).values(), lora.values()))


def test_modules_to_save_are_refused():
    with pytest.raises(ValueError, match="vllm_lora_sync cannot serve modules_to_save"):
        adapter_tensors(tiny_lora(modules_to_save=["lm_head"]), torch.float32)


def test_each_sync_writes_a_fresh_adapter_peft_loads_back_and_the_last_is_removed(tmp_path):
    pytest.importorskip("vllm")
    from memtrain.vllm_lora_sync import AdapterPublisher

    model = tiny_lora()
    publisher = AdapterPublisher(root=str(tmp_path))
    first = publisher.publish(model, torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(1.0)
    second = publisher.publish(model, torch.float32)
    assert (first.lora_int_id, second.lora_int_id) == (1, 2) and first.lora_name != second.lora_name
    assert publisher.last_bytes == sum(p.numel() * 4 for n, p in model.named_parameters() if "lora_" in n)
    from pathlib import Path

    assert not Path(first.lora_path).exists() and Path(second.lora_path).is_dir()
    reloaded = PeftModel.from_pretrained(tiny_lora().base_model.model, second.lora_path)
    want = {n: p for n, p in model.named_parameters() if "lora_" in n}
    got = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)
    publisher.close()
    assert not publisher.folder.exists()


def args(**values) -> SimpleNamespace:
    return SimpleNamespace(**{"use_vllm": True, "vllm_mode": "colocate", "vllm_quantization": None, **values})


@pytest.mark.parametrize(
    ("values", "peft", "message"),
    [
        ({"vllm_lora_sync": True}, False, "the policy has none: set use_peft: true, or vllm_lora_sync: false"),
        (
            {"vllm_lora_sync": True, "vllm_mode": "server", "vllm_quantization": "fp8"},
            True,
            "in server mode the server loads the base: start it with `--quantization fp8`",
        ),
        ({"vllm_lora_sync": True, "use_vllm": False}, True, "use_vllm is false; set use_vllm: true"),
        ({"vllm_lora_sync": False, "vllm_quantization": "fp8"}, True, "fp8' needs vllm_lora_sync: true"),
        ({"vllm_lora_sync": True, "vllm_quantization": "awq"}, True, "'awq' is not supported: use fp8"),
    ],
)  # fmt: skip
def test_settings_that_cannot_run_are_refused_before_the_model_loads(values, peft, message):
    with pytest.raises(PreflightError, match=message):
        check_vllm_lora_sync(args(**values), peft=peft)


@pytest.mark.parametrize(
    "values",
    [
        {"vllm_lora_sync": False},
        {"vllm_lora_sync": True, "vllm_quantization": "fp8"},
        {
            "vllm_lora_sync": True,
            "vllm_mode": "server",
        },  # the adapter goes through the server's runtime LoRA endpoints
    ],
)
def test_runnable_settings_pass(values):
    check_vllm_lora_sync(args(**values), peft=True)
    check_vllm_lora_sync(args(**values), peft=None)  # not known yet (a published adapter as the model)
