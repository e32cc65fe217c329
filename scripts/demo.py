"""The CPU demo behind `make demo`: build documents, evaluate SmolLM2-135M, train it, evaluate again, write a report.

    python scripts/demo.py [--steps 3] [--held_out 32] [--output_dir outputs/demo]

The report lands in <output_dir>/report/README.md (table, reward curves PNG, trajectory pages). See memtrain.demo.
"""

import logging
import sys

from memtrain.configs import parse_recipe_args
from memtrain.demo import DemoArguments, run_demo


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (demo_args,) = parse_recipe_args(sys.argv[1:], (DemoArguments,))
    run_demo(demo_args)
