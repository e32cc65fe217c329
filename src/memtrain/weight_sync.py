"""The weights a vLLM engine should serve for a (PEFT) policy, computed without touching the policy.

TRL's vLLM sync merges a PEFT adapter into its base (``merge_adapter``), reads the weights and unmerges it again. On a
4-bit (QLoRA) base each merge/unmerge dequantizes, adds/subtracts the LoRA delta and re-quantizes: the frozen NF4 base
drifts a little every sync (measured on CPU: after 10 cycles with a 0.1% delta, 96% of the base's elements changed and
its mean magnitude grew 1.9%), and with it the KL reference (the base with the adapter off). :func:`iter_vllm_weights`
computes ``W = dequantize(base) + delta`` OUT OF PLACE for every layer, so the policy (quantized bytes, quant states,
LoRA weights) is bit-identical after any number of syncs. vLLM then serves the base unquantized (compute dtype).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn


__all__ = ["is_4bit_param", "iter_fsdp2_weights", "iter_vllm_weights", "vllm_name"]


def is_4bit_param(param: torch.Tensor) -> bool:
    """A bitsandbytes ``Params4bit`` (packed uint8 data + ``quant_state``), detected without importing bitsandbytes."""
    return type(param).__name__ == "Params4bit" and getattr(param, "quant_state", None) is not None


def _dequantize(param: torch.Tensor) -> torch.Tensor:
    """A new dense tensor with the 4-bit weight's values; the packed bytes and quant state are only read."""
    import bitsandbytes.functional as bnb_functional

    data, quant_state = param.data, param.quant_state
    if getattr(quant_state, "packing_format_for_cpu", False):
        # bitsandbytes' CPU inference (eval + no grad, AVX512-BF16) repacks the weight in place into its own layout
        # (absmax as a bf16 [blocks, rows] matrix); undo it on copies: the inverse rewrites the state it is given,
        # would re-quantize a nested absmax and leaves a plain absmax transposed
        quant_state = copy.deepcopy(quant_state)
        quant_state.original_nested = False
        data, quant_state = bnb_functional._convert_weight_packed_for_cpu_inverse(data.clone(), quant_state)
        quant_state.absmax = quant_state.absmax.T.reshape(-1).float()
    return bnb_functional.dequantize_4bit(data, quant_state)


def vllm_name(name: str) -> str:
    """The parameter name vLLM expects: PEFT's wrapper prefix and ``.base_layer`` removed (as TRL's sync does)."""
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    return name.replace("_checkpoint_wrapped_module.", "")


def _dense(param: torch.Tensor) -> torch.Tensor:
    if is_4bit_param(param):
        return _dequantize(param)
    if type(param).__name__ == "Int8Params":
        raise NotImplementedError("8-bit (LLM.int8) weights cannot be synced to vLLM; use load_in_4bit (NF4)")
    return param.detach()


def _merged_linear(layer: nn.Module, adapters: list[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``{"weight": base + sum of deltas, "bias": ...}`` of one LoRA layer, computed into new tensors."""
    from peft.tuners.lora import LoraLayer

    assert isinstance(layer, LoraLayer)
    if layer.merged:
        raise RuntimeError(
            "a LoRA layer is already merged into its base (merge_adapter was called); unmerge it before syncing, "
            "or the delta would be counted twice"
        )
    base = layer.get_base_layer()
    weight = _dense(base.weight)
    target = dtype or weight.dtype
    if dtype is None and is_4bit_param(base.weight):
        target = getattr(base, "compute_dtype", None) or weight.dtype  # what the 4-bit layer computes in
    out_weight = weight.to(torch.float32, copy=True)
    bias = None if getattr(base, "bias", None) is None else base.bias.detach().to(torch.float32, copy=True)
    for adapter in adapters:
        if adapter not in layer.lora_A and adapter not in getattr(layer, "lora_embedding_A", {}):
            continue  # this layer is not targeted by this adapter
        if adapter in getattr(layer, "lora_variant", {}):
            raise NotImplementedError(
                f"LoRA variant {type(layer.lora_variant[adapter]).__name__} (DoRA, aLoRA, Arrow) cannot be merged out "
                "of place; use plain LoRA (use_dora: false) with vLLM"
            )
        with torch.no_grad():
            delta = layer.get_delta_weight(adapter)
        out_weight += delta.to(device=out_weight.device, dtype=torch.float32)
        if layer.lora_bias.get(adapter, False) and bias is not None:
            bias += layer.lora_B[adapter].bias.detach().to(torch.float32)
    merged = {"weight": out_weight.to(target)}
    if bias is not None:
        merged["bias"] = bias.to(dtype or base.bias.dtype)
    return merged


@torch.no_grad()
def iter_vllm_weights(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(vLLM name, dense weight)`` for every weight of ``model``, LoRA deltas merged out of place.

    PEFT models: 4-bit bases are dequantized (``bnb.functional.dequantize_4bit`` with each weight's quant state),
    the active adapters' ``get_delta_weight`` is added in fp32 and the sum cast to ``dtype`` (default: the layer's
    original dtype, i.e. the compute dtype of a 4-bit layer), LoRA parameters and the originals of
    ``modules_to_save`` are skipped. ``merge_adapter`` is never called and no parameter is written. With the
    adapters disabled (``disable_adapter()``) the base weights are yielded. Plain models yield their parameters
    (4-bit ones dequantized). Tied weights are yielded once, as ``named_parameters`` does. Merged and dequantized
    weights are new tensors; the others (norms, embeddings, ...) are the live parameters, as in TRL's sync: the
    consumer copies them (vLLM's ``load_weights`` does) and must not write into them.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    if not isinstance(model, PeftModel):
        for name, param in model.named_parameters():
            weight = _dense(param)
            yield vllm_name(name), weight if dtype is None else weight.to(dtype)
        return

    prefix = model.prefix  # "lora_"
    lora_layers = {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    wrappers = {name: module for name, module in model.named_modules() if isinstance(module, AuxiliaryTrainingWrapper)}
    pending: dict[str, dict[str, torch.Tensor]] = {}  # merged weight/bias of a LoRA layer until both are yielded
    for name, param in model.named_parameters():
        if any(part.startswith(prefix) for part in name.split(".")):
            continue  # lora_A / lora_B / lora_embedding_* / lora_magnitude_vector: not in vLLM, merged below
        name = _served_copy(name, wrappers)
        if name is None:
            continue  # modules_to_save: the copy not in use
        owner, _, leaf = name.rpartition(".")
        layer_name = owner.removesuffix(".base_layer")
        layer = lora_layers.get(layer_name) if owner.endswith(".base_layer") else None
        if layer is not None and leaf in ("weight", "bias"):
            if layer_name not in pending:
                adapters = [] if layer.disable_adapters else list(layer.active_adapters)
                pending[layer_name] = _merged_linear(layer, adapters, dtype)
            merged = pending[layer_name]
            yield vllm_name(name), merged.pop(leaf)
            if not merged:
                del pending[layer_name]
            continue
        weight = _dense(param)
        yield vllm_name(name), weight if dtype is None else weight.to(dtype)


def _served_copy(name: str, wrappers: dict[str, nn.Module]) -> str | None:
    """``name`` without the modules_to_save wrapper's infix when it is the copy forward uses, else None."""
    for wrapper_name, wrapper in wrappers.items():
        head = f"{wrapper_name}."
        if not name.startswith(head):
            continue
        rest = name[len(head) :]
        use_original = wrapper.disable_adapters or not wrapper.active_adapters
        if rest.startswith("original_module."):
            return head + rest.removeprefix("original_module.") if use_original else None
        for adapter in getattr(wrapper, "modules_to_save", {}):
            infix = f"modules_to_save.{adapter}."
            if rest.startswith(infix):
                served = not use_original and adapter == wrapper.active_adapters[0]
                return head + rest.removeprefix(infix) if served else None
        return name
    return name


@torch.no_grad()
def iter_fsdp2_weights(
    model: nn.Module, dtype: torch.dtype | None, device: torch.device
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(vLLM name, whole weight)`` of an FSDP2-sharded model, each shard cast to ``dtype`` BEFORE its gather.

    FSDP2 keeps fp32 masters; gathering them whole and letting vLLM cast to its bf16 moves and materializes twice
    the bytes the engine keeps (a 7B: 30.5 GB per process per sync instead of 15.2). Casting is elementwise, so the
    gathered values equal a gather-then-cast. ``dtype`` None gathers in the parameters' own dtype. Every process must
    iterate (each gather is a collective). A PEFT model's adapter must already be merged (TRL's FSDP path merges it
    first): its LoRA parameters and unused ``modules_to_save`` originals are skipped.
    """
    prefix = getattr(model, "prefix", None)
    for name, param in model.named_parameters():
        if prefix and any(part.startswith(prefix) for part in name.split(".")):
            continue
        if "original_module" in name:
            continue
        shard = param.detach()
        if shard.device.type == "cpu" and device.type != "cpu":  # FSDP2's CPU offload
            shard = shard.to(device)
        if dtype is not None and shard.is_floating_point() and shard.dtype != dtype:
            shard = shard.to(dtype)
        whole = shard.full_tensor() if hasattr(shard, "full_tensor") else shard
        yield vllm_name(name).replace("modules_to_save.default.", ""), whole
