"""MemTrain GRPO: `accelerate launch scripts/run_grpo.py recipes/qwen-7b.yaml [--key value ...]`.

The recipe (positional or `--config`) sets every knob; `--key value` overrides it. See recipes/README.md.
"""

from memtrain.train import main


if __name__ == "__main__":
    main()
