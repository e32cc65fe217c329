"""Tiny random models of the recipes' architectures with a chat-template tokenizer, built locally (no download).

Smoke runs (``memtrain.gpu_smoke``, ``memtrain.recipe_smoke``) need a model of the same architecture as a recipe's
backbone, small enough to train in seconds and served by vLLM's CPU backend, on machines that cannot reach the Hub.
The tokenizer is a byte-level BPE (any text encodes) with Qwen's ChatML special tokens and chat template; the models
have head size 32 (vLLM's CPU attention supports it) and tied embeddings.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any


CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# config class, model class (transformers names) of each architecture a shipped recipe trains
TINY_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
}
# A model name containing the key (lower case) has that architecture; first match wins (Qwen3 before Qwen2.5).
ARCHITECTURE_OF_NAME: tuple[tuple[str, str], ...] = (("qwen3", "qwen3"), ("qwen2", "qwen2"), ("smollm", "llama"))


def architecture_of(model_name_or_path: str) -> str:
    """The architecture of a recipe's model, read from its name (``Qwen/Qwen2.5-7B-Instruct`` -> ``qwen2``)."""
    name = model_name_or_path.lower()
    for key, architecture in ARCHITECTURE_OF_NAME:
        if key in name:
            return architecture
    known = ", ".join(key for key, _ in ARCHITECTURE_OF_NAME)
    raise ValueError(
        f"No tiny architecture is known for the model {model_name_or_path!r} (names containing: {known}); add it to "
        "memtrain.tiny_models.ARCHITECTURE_OF_NAME and TINY_ARCHITECTURES."
    )


def build_chat_tokenizer(folder: Path, texts: Iterable[str], vocab_size: int = 600) -> Any:
    """A byte-level BPE trained on ``texts`` with ChatML special tokens and chat template, saved to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    fast.save_pretrained(folder)
    return fast


def save_tiny_model(folder: Path, tokenizer: Any, architecture: str = "qwen2", seed: int = 0) -> Path:
    """A random ``architecture`` model (hidden 128, 2 layers, 4 query / 2 KV heads of size 32), saved in fp32."""
    import torch
    import transformers

    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"Unknown tiny architecture {architecture!r}; choose from {sorted(TINY_ARCHITECTURES)}.")
    config_name, model_name = TINY_ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=4096, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    model = getattr(transformers, model_name)(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
