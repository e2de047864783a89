"""Token windows with overlap over a decoded document: each window is `size` tokens, the
next starts `size - overlap` tokens later, the last ends at the last token (and may be
shorter). Windows are returned as character ranges, so a chunk's text is
`text[start:end]` and its offsets are what a client cites."""

from __future__ import annotations

from collections.abc import Sequence


def chunk_windows(
    spans: Sequence[tuple[int, int]], *, size: int, overlap: int
) -> list[tuple[int, int]]:
    """`spans` are the tokens' `[start, end)` character spans in text order (the
    embedding model's tokenizer gives them, special tokens left out). No tokens, no
    windows."""
    if size < 1:
        raise ValueError(f"window size must be at least 1 token, not {size}")
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, {size}), not {overlap}")
    previous = (0, 0)
    for span in spans:
        start, end = span
        if not (previous[0] <= start <= end and previous[1] <= end):
            raise ValueError(f"token spans must be in text order: {previous} then {span}")
        previous = span
    step = size - overlap
    windows = []
    for first in range(0, len(spans), step):
        last = min(first + size, len(spans)) - 1
        windows.append((spans[first][0], spans[last][1]))
        if last == len(spans) - 1:
            break
    return windows
