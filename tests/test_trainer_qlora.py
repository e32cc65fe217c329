"""QLoRA through MemTrainer on CPU: real bitsandbytes NF4 (its CPU backend), memtrain's own load path, real PEFT.

Two training steps with beta > 0 must move the adapter and nothing else: every Linear4bit's packed bytes and quant
state, and the KL reference (the base with the adapter off) on a fixed input, are bit-identical before and after.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from test_trainer_method import AGENT, G2, ScriptedBackend, hand_made_batch, scripted_entity_tools

from memtrain.configs import MemTrainConfig
from memtrain.models import load_model_and_tokenizer
from memtrain.trainer import MemTrainer


bnb = pytest.importorskip("bitsandbytes")

FIXED_IDS = torch.tensor([[1, 17, 230, 4051, 88, 9, 1200, 61]])


def _base_state(model) -> dict[str, torch.Tensor]:
    """Every Linear4bit's packed bytes and quant state (absmax, nested absmax), and every frozen parameter."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            quant_state = module.weight.quant_state
            state[f"bytes:{name}"] = module.weight.data.clone()
            state[f"absmax:{name}"] = quant_state.absmax.clone()
            if quant_state.nested:
                state[f"absmax2:{name}"] = quant_state.state2.absmax.clone()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            state[f"param:{name}"] = param.data.clone()
    return state


def _reference_logps(model) -> torch.Tensor:
    """Log-probs of the KL reference (adapter off) on a fixed input, computed as the trainer does (train mode)."""
    model.train()  # eval + no_grad on CPU would let bitsandbytes repack the 4-bit weights for inference
    # the inner model: accelerate's bf16 mixed precision wraps the PeftModel's forward in autocast once prepared
    with torch.no_grad(), model.disable_adapter():
        logits = model.get_base_model()(input_ids=FIXED_IDS).logits.float()
    return torch.log_softmax(logits, -1)


def _adapter(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters() if "lora_" in name}


def _qlora_trainer(model, tokenizer, tmp_path, target_modules: list[str], **overrides) -> MemTrainer:
    """MemTrainer over the scripted batch with LoRA on a 4-bit model, beta > 0 (the adapter-off base as reference)."""
    from peft import LoraConfig

    args = MemTrainConfig(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=6, num_generations=2, recall_samples=G2,
        report_to="none", use_cpu=True, bf16=True, seed=0, trajectory_html_steps=0, beta=0.5, warmup_steps=0,
        **overrides,
    )  # fmt: skip
    return MemTrainer(
        model=model,
        args=args,
        agent_config=AGENT,
        train_dataset=Dataset.from_list(hand_made_batch()),
        processing_class=tokenizer,
        entity_tools=scripted_entity_tools(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, lora_dropout=0.0),
    )


def test_two_qlora_steps_move_only_the_adapter(tiny_checkpoint, tokenizer, tmp_path):
    model, tokenizer = load_model_and_tokenizer(str(tiny_checkpoint), load_in_4bit=True, dtype="float32")
    assert getattr(model, "is_loaded_in_4bit", False)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    trainer = _qlora_trainer(
        model, tokenizer, tmp_path, ["q_proj", "v_proj", "down_proj"], max_steps=2, learning_rate=1e-2,
        save_strategy="no", gradient_checkpointing=True, logging_steps=1,
    )  # fmt: skip
    assert trainer.ref_model is None  # the reference is the adapter-off base
    trainer._generate_single_turn = ScriptedBackend(tokenizer, [row["answers"][0] for row in hand_made_batch()])
    policy = trainer.model
    lora = [p for n, p in policy.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    base_before, adapter_before = _base_state(policy), _adapter(policy)
    reference_before = _reference_logps(policy)

    trainer.train()

    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in history)
    assert all(entry["kl"] >= 0 for entry in history if "kl" in entry)
    adapter_after = _adapter(policy)
    moved = [name for name in adapter_before if not torch.equal(adapter_before[name], adapter_after[name])]
    assert any("lora_A" in name for name in moved) and any("lora_B" in name for name in moved)
    base_after = _base_state(policy)
    assert base_after.keys() == base_before.keys()
    assert [key for key in base_before if not torch.equal(base_before[key], base_after[key])] == []
    assert torch.equal(_reference_logps(policy), reference_before)


def test_lora_masters_are_fp32_on_a_quantized_base(tiny_checkpoint, tokenizer, tmp_path):
    model, tokenizer = load_model_and_tokenizer(str(tiny_checkpoint), load_in_4bit=True, dtype="float32")
    trainer = _qlora_trainer(model, tokenizer, tmp_path, ["q_proj", "v_proj"], max_steps=1)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and all(
        p.dtype == torch.float32 for p in trainable
    )  # Adam masters: bf16 rounds lr-1e-5 steps away
