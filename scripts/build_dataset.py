"""Build MemTrain documents from unlabeled paragraphs: `python scripts/build_dataset.py recipes/data/<recipe>.yaml`.

The recipe (positional or `--config`) sets every knob; `--key value` overrides it, e.g. `--num_documents 20
--output_dir outputs/data/try --push_to_hub true --hub_dataset_id you/memtrain-wiki`. See memtrain.data.build.
"""

import sys

from memtrain.cli import run_script
from memtrain.data.build import main  # noqa: F401  (the entry point, importable from the script)


if __name__ == "__main__":
    sys.exit(run_script("build-data"))
