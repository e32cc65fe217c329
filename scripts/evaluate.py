"""Evaluate a model as a memory agent: `python scripts/evaluate.py --model smollm2-135m --dataset rows.jsonl
--output_dir eval/ [--modes agent full_context]`. Same arguments as `memtrain eval`; see memtrain.evaluation."""

import sys

from memtrain.evaluation.cli import main


if __name__ == "__main__":
    sys.exit(main())
