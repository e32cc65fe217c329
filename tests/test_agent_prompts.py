"""The one chat-prompt encoder every prompt goes through (real SmolLM2 tokenizer and its chat template)."""

from __future__ import annotations

import pytest

from memtrain.agent.prompts import encode_chat, render_chat, require_chat_template


def test_encode_chat_matches_the_tokenizers_own_chat_tokenisation(tokenizer):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote <b>Hamlet</b>?"}]
    for messages in (chat, "Who wrote Hamlet?"):
        as_list = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
        expected = tokenizer.apply_chat_template(as_list, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert encode_chat(tokenizer, messages) == list(expected["input_ids"])
    ids = encode_chat(tokenizer, "hi")
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_render_chat_without_generation_prompt_ends_with_the_last_turn(tokenizer):
    chat = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "yes"}]
    text = render_chat(tokenizer, chat, add_generation_prompt=False)
    assert text.rstrip().endswith("yes<|im_end|>")
    assert render_chat(tokenizer, "?").endswith("<|im_start|>assistant\n")
    assert (
        encode_chat(tokenizer, chat, add_generation_prompt=False)
        == tokenizer(text, add_special_tokens=False)["input_ids"]
    )


def test_a_tokenizer_without_chat_template_is_refused_in_one_line(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="the reader has no chat template|this tokenizer has no chat template"):
        require_chat_template(tokenizer, "reader")
