"""MemTrain GRPO: `accelerate launch scripts/run_grpo.py recipes/qwen-7b.yaml [--key value ...]`.

The recipe (positional or `--config`) sets every knob; `--key value` overrides it. See recipes/README.md.
"""

import sys

from memtrain.train import cli


if __name__ == "__main__":
    sys.exit(cli())
