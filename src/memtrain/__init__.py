"""memtrain: self-supervised training of an LLM agent's context memory (MemTrain, arXiv 2606.03197)."""

__version__ = "0.1.0.dev0"
