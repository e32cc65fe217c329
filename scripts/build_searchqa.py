"""Search-QA rows for MEM1-style training: `python scripts/build_searchqa.py --questions nq.jsonl hotpot.json ...`."""

from memtrain.data.searchqa import main


if __name__ == "__main__":
    main()
