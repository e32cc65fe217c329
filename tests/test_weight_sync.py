"""iter_vllm_weights on a real NF4 (bitsandbytes CPU backend) tiny Qwen2 with a real PEFT LoRA (non-zero B).

What vLLM must serve is ``dequantize(base) + delta`` under the dense model's names, and computing it must leave the
policy bit-identical; PEFT's merge/unmerge (what TRL's sync does) re-quantizes the base and does not.
"""

from __future__ import annotations

import warnings

import pytest
import torch


bnb = pytest.importorskip("bitsandbytes")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import BitsAndBytesConfig, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from memtrain.weight_sync import iter_vllm_weights  # noqa: E402


TARGETS = ["q_proj", "v_proj", "down_proj"]  # k_proj, o_proj, gate/up_proj stay 4-bit without LoRA


def _tiny_qwen2(tie: bool) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def dense_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2-dense")
    _tiny_qwen2(tie=request.param).save_pretrained(folder)
    return folder


def _load_nf4(folder, compute_dtype=torch.float32) -> Qwen2ForCausalLM:
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    return Qwen2ForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.float32).eval()


def _qlora(folder, modules_to_save=None, compute_dtype=torch.float32):
    model = _load_nf4(folder, compute_dtype)
    torch.manual_seed(1)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, modules_to_save=modules_to_save
    )  # init_lora_weights=False: B is random (non-zero), so the delta is not zero
    return get_peft_model(model, config)


def _lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix("base_model.model."): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }


def _snapshot(peft_model) -> dict[str, torch.Tensor]:
    """Every parameter's storage, plus each 4-bit weight's quant state (absmax, code, nested state)."""
    state = {f"param:{name}": param.data.clone() for name, param in peft_model.named_parameters()}
    for name, module in peft_model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            quant_state = module.weight.quant_state
            state[f"absmax:{name}"] = quant_state.absmax.clone()
            state[f"code:{name}"] = quant_state.code.clone()
            if quant_state.nested:
                state[f"absmax2:{name}"] = quant_state.state2.absmax.clone()
    return state


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    return [key for key in before if not torch.equal(before[key], after[key])]


def test_yielded_weights_are_dequantized_base_plus_delta(dense_dir):
    model = _qlora(dense_dir)
    weights = dict(iter_vllm_weights(model))
    layers = _lora_layers(model)
    assert set(layers) == {
        f"model.layers.{i}.{kind}.{proj}"
        for i in range(2)
        for kind, proj in [("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj")]
    }
    for name, layer in layers.items():
        base = layer.base_layer
        dequantized = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
        delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * (8 / 4)
        assert delta.abs().max() > 1e-3  # a real, non-zero adapter
        torch.testing.assert_close(weights[f"{name}.weight"], dequantized + delta, rtol=0, atol=1e-6)
        if base.bias is not None:
            assert torch.equal(weights[f"{name}.bias"], base.bias)
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit) and ".base_layer" not in name and name not in layers:
            expected = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            assert torch.equal(weights[f"{name}.weight"], expected)  # 4-bit layers without LoRA: dequantized
    norm = model.base_model.model.model.norm.weight
    assert torch.equal(weights["model.norm.weight"], norm)
    assert all(weight.dtype == torch.float32 for weight in weights.values())


def test_names_and_shapes_match_the_dense_model(dense_dir):
    dense = Qwen2ForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    model = _qlora(dense_dir)
    weights = dict(iter_vllm_weights(model))
    expected = {name: param.shape for name, param in dense.named_parameters()}  # tied weights once, as vLLM wants
    assert {name: weight.shape for name, weight in weights.items()} == expected
    if not dense.config.tie_word_embeddings:
        assert set(weights) == set(dense.state_dict())
    # served by a dense model, the weights give the QLoRA policy's logits
    missing, unexpected = dense.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    dense.tie_weights()
    ids = torch.tensor([[1, 5, 9, 33, 200, 7]])
    model.train()  # no dropout anywhere; train mode keeps bitsandbytes off its CPU bf16 inference repacking
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_weights_repacked_by_cpu_inference_are_unpacked(dense_dir):
    """bitsandbytes' CPU eval forward (AVX512-BF16) repacks 4-bit weights in place; the sync reads them right."""
    model = _qlora(dense_dir)
    before = dict(iter_vllm_weights(model))
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    layer = _lora_layers(model)["model.layers.0.self_attn.q_proj"].base_layer
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
    packed = layer.weight.data.clone()
    after = dict(iter_vllm_weights(model))
    assert torch.equal(layer.weight.data, packed) and layer.weight.quant_state.packing_format_for_cpu
    for name, weight in before.items():  # absmax went through bf16 in the repacking: equal to ~0.4%
        torch.testing.assert_close(after[name], weight, rtol=1e-2, atol=1e-3)


def test_compute_dtype_and_explicit_dtype(dense_dir):
    model = _qlora(dense_dir, compute_dtype=torch.bfloat16)
    weights = dict(iter_vllm_weights(model))
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16  # the 4-bit compute dtype
    assert weights["model.layers.0.self_attn.k_proj.weight"].dtype == torch.float32  # dequantized: stored dtype
    assert all(w.dtype == torch.bfloat16 for _, w in iter_vllm_weights(model, dtype=torch.bfloat16))


def test_policy_bit_identical_after_ten_syncs(dense_dir):
    model = _qlora(dense_dir)
    before = _snapshot(model)
    for _ in range(10):
        weights = dict(iter_vllm_weights(model))
    assert _changed(before, _snapshot(model)) == []
    storages = {param.untyped_storage().data_ptr() for param in model.parameters()}
    merged = [weights[f"{name}.weight"] for name in _lora_layers(model)]  # new tensors, not views of the policy
    assert not any(weight.untyped_storage().data_ptr() in storages for weight in merged)


def test_peft_merge_unmerge_requantizes_the_base(dense_dir):
    """The bug the out-of-place merge avoids: TRL's merge_adapter/unmerge_adapter cycle drifts the NF4 base."""
    model = _qlora(dense_dir)
    before = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Merge lora module to 4-bit linear may get different generations"
        for _ in range(10):
            model.merge_adapter()
            model.unmerge_adapter()
    changed = _changed(before, _snapshot(model))
    assert any(key.startswith("param:") and "base_layer.weight" in key for key in changed)
    assert any(key.startswith("absmax:") for key in changed)


def test_disabled_adapter_yields_the_base(dense_dir):
    model = _qlora(dense_dir)
    with model.disable_adapter():
        weights = dict(iter_vllm_weights(model))
    q_proj = _lora_layers(model)["model.layers.0.self_attn.q_proj"].base_layer
    expected = bnb.functional.dequantize_4bit(q_proj.weight.data, q_proj.weight.quant_state)
    assert torch.equal(weights["model.layers.0.self_attn.q_proj.weight"], expected)


def test_modules_to_save_serves_the_trained_copy(dense_dir):
    model = _qlora(dense_dir, modules_to_save=["lm_head"])
    wrapper = model.base_model.model.lm_head
    with torch.no_grad():
        wrapper.modules_to_save["default"].weight.add_(1.0)  # the trained copy differs from the original
    weights = dict(iter_vllm_weights(model))
    assert torch.equal(weights["lm_head.weight"], wrapper.modules_to_save["default"].weight)
    assert not any("original_module" in name or "modules_to_save" in name for name in weights)
    with model.disable_adapter():
        weights = dict(iter_vllm_weights(model))
    served = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])  # tied: yielded once, as embed
    assert torch.equal(served, wrapper.original_module.weight)


def test_plain_models_and_refusals(dense_dir):
    dense = Qwen2ForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    assert [name for name, _ in iter_vllm_weights(dense)] == [name for name, _ in dense.named_parameters()]
    quantized = _load_nf4(dense_dir)
    plain = dict(iter_vllm_weights(quantized))
    assert plain["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)  # dequantized, not packed
    model = _qlora(dense_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
    with pytest.raises(RuntimeError, match="already merged"):
        dict(iter_vllm_weights(model))


def _fsdp2_sync_worker(rank: int, world: int, store: str, tie: bool) -> None:
    """One of 2 gloo processes: a tiny Qwen2 in fp32 masters under FSDP2 (bf16 compute), synced as TRL's FSDP2 path
    calls it, on MemTrainVLLMGeneration with a bf16 engine."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from memtrain.vllm_rollouts import MemTrainVLLMGeneration
    from memtrain.weight_sync import vllm_name

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = _tiny_qwen2(tie=tie)
        want = {vllm_name(name): param.detach().to(torch.bfloat16) for name, param in model.named_parameters()}
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        assert all(param.dtype == torch.float32 for param in model.parameters())  # the masters stay fp32

        generation = object.__new__(MemTrainVLLMGeneration)  # only what the sync's FSDP2 iteration reads
        generation.accelerator = SimpleNamespace(device=torch.device("cpu"))
        generation._sync_dtype = torch.bfloat16
        got = list(generation._iter_fsdp2_params(model))
        names = [name for name, _ in got]
        assert names == list(want), names  # vLLM's names, a tied weight once
        for name, tensor in got:
            assert tensor.dtype == torch.bfloat16 and not hasattr(tensor, "full_tensor"), (name, tensor.dtype)
            assert torch.equal(tensor, want[name]), name
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_fsdp2_sync_gathers_in_the_engines_dtype(tmp_path, tie):
    """Full fine-tuning under FSDP2 (qwen-7b-full): each fp32 shard is cast to the engine's bf16 before its gather,
    half the bytes TRL's fp32 gather moves (30.5 GB -> 15.2 GB per process per sync for the 7B), same values."""
    import torch.multiprocessing as mp

    mp.spawn(_fsdp2_sync_worker, args=(2, str(tmp_path / "store"), tie), nprocs=2, join=True)
