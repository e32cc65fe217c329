"""GPU smoke check of memtrain's training paths (tiny local model, no downloads); prints one JSON summary line.

    python scripts/gpu_smoke.py                 # on one CUDA GPU
    python scripts/gpu_smoke.py --device cpu    # the same cases on the CPU

Logic and cases: memtrain.gpu_smoke. Runs from a checkout without `pip install` (src/ is put on the path).
"""

import sys
from pathlib import Path


if __name__ == "__main__":
    try:
        import memtrain  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from memtrain.gpu_smoke import main

    sys.exit(main())
