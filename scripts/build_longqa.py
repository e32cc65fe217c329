"""Build long-text QA data (RULER-HotpotQA): `python scripts/build_longqa.py recipes/data/longqa-hotpotqa-cpu.yaml`.

The recipe (positional or `--config`) sets every knob; `--key value` overrides it, e.g. `--test_buckets 50 100
--num_test_questions 8 --output_dir outputs/data/try`. See memtrain.data.longqa.LongQABuildArguments.
"""

import sys

from memtrain.cli import run_script
from memtrain.data.longqa import main  # noqa: F401  (the entry point, importable from the script)


if __name__ == "__main__":
    sys.exit(run_script("build-longqa"))
