"""Tiny random models of the recipes' architectures, built offline with a chat-template tokenizer."""

from __future__ import annotations

import pytest
import torch
import yaml

from memtrain.recipe_smoke import shipped_recipes
from memtrain.tiny_models import architecture_of, build_chat_tokenizer, save_tiny_model


@pytest.mark.parametrize(
    "name,architecture",
    [("Qwen/Qwen2.5-7B-Instruct", "qwen2"), ("Qwen/Qwen3-4B-Instruct-2507", "qwen3"), ("smollm2-135m", "llama")],
)
def test_architecture_is_read_from_the_model_name(name, architecture):
    assert architecture_of(name) == architecture


def test_every_shipped_recipes_model_has_a_tiny_architecture():
    for recipe in shipped_recipes():
        architecture_of(yaml.safe_load(recipe.read_text())["model_name_or_path"])


def test_unknown_model_is_refused_naming_where_to_add_it():
    with pytest.raises(ValueError, match=r"meta-llama/Llama-3.1-8B.*ARCHITECTURE_OF_NAME"):
        architecture_of("meta-llama/Llama-3.1-8B")


def test_tiny_qwen3_loads_and_answers_a_chat_prompt(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = build_chat_tokenizer(tmp_path, ["The old port trades spices and cloth."] * 4, vocab_size=400)
    save_tiny_model(tmp_path, tokenizer, "qwen3")
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.model_type == "qwen3" and model.config.head_dim == 32
    ids = loaded.apply_chat_template([{"role": "user", "content": "Où est le port? ✓"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert loaded.decode(ids).endswith("<|im_start|>assistant\n")
    out = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False, pad_token_id=loaded.pad_token_id)
    assert out.shape[1] == len(ids) + 3 or loaded.eos_token_id in out[0].tolist()
