"""Cutting a long text into the fixed-size token chunks the memory agent reads (PAPER.md section 1).

The paper reads at most 8 chunks of 5,000 tokens; a longer text is centre-truncated (head and tail kept) before
chunking, because the start and the end of a document are the parts a reader can least afford to lose.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ChunkedContext:
    """A context cut into chunks, with what was dropped to fit the chunk budget."""

    chunks: list[str]
    chunk_token_ids: list[list[int]]
    total_tokens: int
    truncated_tokens: int

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of plain text: no BOS/EOS, so chunks concatenate back into the original ids."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def centre_truncate(token_ids: list[int], max_tokens: int) -> list[int]:
    """Keep the first ``ceil(max_tokens / 2)`` and the last ``floor(max_tokens / 2)`` tokens."""
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}.")
    if len(token_ids) <= max_tokens:
        return list(token_ids)
    head = (max_tokens + 1) // 2
    tail = max_tokens - head
    return list(token_ids[:head]) + (list(token_ids[-tail:]) if tail else [])


def chunk_context(tokenizer, context: str, chunk_size: int, max_chunks: int) -> ChunkedContext:
    """Tokenize ``context``, centre-truncate it to ``chunk_size * max_chunks`` tokens and cut it into chunks.

    Every chunk but the last holds exactly ``chunk_size`` tokens. An empty or whitespace-only context gives zero
    chunks (the agent then answers from the initial memory). Chunks are decoded one by one, so a character split
    across a chunk boundary may decode as a replacement character, as in MemAgent.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}.")
    if max_chunks <= 0:
        raise ValueError(f"max_chunks must be a positive number of chunks, got {max_chunks}.")
    if context is None or not context.strip():
        return ChunkedContext(chunks=[], chunk_token_ids=[], total_tokens=0, truncated_tokens=0)
    token_ids = _encode(tokenizer, context)
    kept = centre_truncate(token_ids, chunk_size * max_chunks)
    chunk_token_ids = [kept[start : start + chunk_size] for start in range(0, len(kept), chunk_size)]
    chunks = [tokenizer.decode(ids, skip_special_tokens=False) for ids in chunk_token_ids]
    return ChunkedContext(
        chunks=chunks,
        chunk_token_ids=chunk_token_ids,
        total_tokens=len(token_ids),
        truncated_tokens=len(token_ids) - len(kept),
    )


def cap_problem(tokenizer, problem: str, max_tokens: int) -> tuple[str, int]:
    """Cap a problem to ``max_tokens`` tokens, keeping its beginning; returns the text and the tokens dropped.

    A problem within budget is returned unchanged (not re-decoded), so ordinary questions stay byte-identical.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_problem_tokens must be a positive number of tokens, got {max_tokens}.")
    token_ids = _encode(tokenizer, problem)
    if len(token_ids) <= max_tokens:
        return problem, 0
    return tokenizer.decode(token_ids[:max_tokens], skip_special_tokens=False), len(token_ids) - max_tokens


def chunk_char_spans(tokenizer, context: str, chunk_size: int, max_chunks: int) -> list[list[tuple[int, int]]]:
    """The character ranges of ``context`` that each chunk of :func:`chunk_context` holds, in chunk order.

    A chunk is one range, or two where it straddles the centre cut of a truncated context (head and tail). Recall
    probes map entities tagged once on the whole document onto the chunks with these (an entity is a chunk's when its
    span lies inside one range). Fast tokenizers give exact token offsets; other tokenizers are measured by decoding
    prefixes of the token ids at the chunk boundaries (exact for tokenizers whose decode inverts encode).
    """
    if context is None or not context.strip():
        return []
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), [tuple(span) for span in encoded["offset_mapping"]]
    else:
        ids, offsets = _encode(tokenizer, context), None
    kept = centre_truncate(list(range(len(ids))), chunk_size * max_chunks)  # positions of the kept tokens

    def char_at(position: int, end: bool) -> int:
        if offsets is not None:
            return offsets[position][1 if end else 0]
        prefix = ids[: position + 1] if end else ids[:position]
        return len(tokenizer.decode(prefix, skip_special_tokens=False))

    spans = []
    for start in range(0, len(kept), chunk_size):
        positions = kept[start : start + chunk_size]
        cuts = [i for i in range(1, len(positions)) if positions[i] != positions[i - 1] + 1]  # the centre cut
        bounds = zip([0, *cuts], [*cuts, len(positions)])
        runs = [(char_at(positions[a], end=False), char_at(positions[b - 1], end=True)) for a, b in bounds]
        spans.append(runs)
    return spans
