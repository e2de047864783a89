"""chunk_windows: properties over any token spans (Hypothesis), and a real text."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.memory.chunking import chunk_windows


@st.composite
def spans_and_window(draw: st.DrawFn) -> tuple[list[tuple[int, int]], int, int]:
    """Ordered token spans with gaps (whitespace) and empty tokens, and a window."""
    spans = []
    position = 0
    for _ in range(draw(st.integers(0, 60))):
        position += draw(st.integers(0, 3))
        length = draw(st.integers(0, 6))
        spans.append((position, position + length))
        position += length
    size = draw(st.integers(1, 12))
    overlap = draw(st.integers(0, size - 1))
    return spans, size, overlap


def tokens_in(window: tuple[int, int], spans: list[tuple[int, int]]) -> list[int]:
    """Indices of the tokens a character window holds (empty tokens at the window's
    edges are ambiguous by characters alone, so the checks below use indices)."""
    return [i for i, (s, e) in enumerate(spans) if window[0] <= s and e <= window[1]]


def token_windows(spans: list[tuple[int, int]], size: int, overlap: int) -> list[range]:
    """Recover each window's token indices: window k starts at token k * step."""
    step = size - overlap
    windows = chunk_windows(spans, size=size, overlap=overlap)
    recovered = []
    for k, (start, end) in enumerate(windows):
        first = k * step
        last = min(first + size, len(spans)) - 1
        assert (spans[first][0], spans[last][1]) == (start, end)
        recovered.append(range(first, last + 1))
    return recovered


@given(spans_and_window())
def test_every_token_is_in_some_window(case: tuple[list[tuple[int, int]], int, int]) -> None:
    spans, size, overlap = case
    covered = set()
    for window in chunk_windows(spans, size=size, overlap=overlap):
        covered.update(tokens_in(window, spans))
    assert covered == set(range(len(spans)))


@given(spans_and_window())
def test_windows_hold_at_most_size_tokens_and_share_exactly_overlap(
    case: tuple[list[tuple[int, int]], int, int],
) -> None:
    spans, size, overlap = case
    windows = token_windows(spans, size, overlap)
    assert all(1 <= len(w) <= size for w in windows)
    assert all(len(w) == size for w in windows[:-1])  # only the last may be short
    for before, after in itertools.pairwise(windows):
        assert len(set(before) & set(after)) == overlap
    if windows:
        assert windows[0].start == 0 and windows[-1].stop == len(spans)
        # the last window adds at least one token the one before it did not have
        assert len(windows) == 1 or windows[-1].stop > windows[-2].stop


@given(st.integers(1, 50), st.data())
def test_no_tokens_no_windows(size: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(0, size - 1))
    assert chunk_windows([], size=size, overlap=overlap) == []


def test_windows_over_a_real_text() -> None:
    text = "The quick  brown fox jumps over the lazy dog."
    spans = [m.span() for m in re.finditer(r"\w+|[^\w\s]", text)]  # 10 tokens
    windows = chunk_windows(spans, size=4, overlap=1)
    assert [text[s:e] for s, e in windows] == [
        "The quick  brown fox",
        "fox jumps over the",
        "the lazy dog.",
    ]
    assert chunk_windows(spans, size=20, overlap=5) == [(0, len(text))]


@pytest.mark.parametrize(
    ("size", "overlap", "message"),
    [(0, 0, "at least 1"), (4, 4, "overlap"), (4, -1, "overlap")],
)
def test_bad_windows_are_refused(size: int, overlap: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        chunk_windows([(0, 1)], size=size, overlap=overlap)


def test_spans_out_of_order_are_refused() -> None:
    with pytest.raises(ValueError, match="text order"):
        chunk_windows([(5, 8), (0, 3)], size=2, overlap=0)
