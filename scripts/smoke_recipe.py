"""Run shipped recipes shrunk, each with the launch command its header documents: one step, then `memtrain eval`.

    python scripts/smoke_recipe.py recipes/qwen-7b.yaml                 # on this machine (CPU or GPU)
    python scripts/smoke_recipe.py recipes/qwen-7b.yaml --no_vllm       # transformers generation instead of vLLM
    python scripts/smoke_recipe.py --all                                # every recipe in recipes/

Prints one JSON line per recipe (command, overrides, seconds, steps, losses, eval metrics). Logic: memtrain.recipe_smoke.
"""

import sys
from pathlib import Path


if __name__ == "__main__":
    try:
        import memtrain  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from memtrain.recipe_smoke import main

    sys.exit(main())
