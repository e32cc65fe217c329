"""Search-QA rows for MEM1-style training: `python scripts/build_searchqa.py --questions nq.jsonl hotpot.json ...`.

Settings come as `--key value` or from a YAML file (positional or `--config`; the command line wins); `--help` lists
every key with its default. See memtrain.data.searchqa.SearchQABuildArguments.
"""

import sys

from memtrain.cli import run_script
from memtrain.data.searchqa import main  # noqa: F401  (the entry point, importable from the script)


if __name__ == "__main__":
    sys.exit(run_script("build-searchqa"))
