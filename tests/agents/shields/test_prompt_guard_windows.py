"""How prompt_guard splits a long message into classifier windows."""

from __future__ import annotations

import pytest

from corral.agents.shields.prompt_guard import window_size, windows


def spans(count: int) -> list[tuple[int, int]]:
    return [(4 * i, 4 * i + 3) for i in range(count)]  # "abc " per token


def test_windows_cover_the_text_and_overlap() -> None:
    found = windows(spans(25), size=10, overlap=2)
    assert found == [(0, 39), (32, 71), (64, 99)]  # tokens 0-9, 8-17, 16-24
    assert windows(spans(10), size=10, overlap=2) == [(0, 39)]
    assert windows(spans(3), size=10, overlap=2) == [(0, 11)]
    assert windows([], size=10, overlap=2) == []


def test_window_size_leaves_a_margin() -> None:
    assert window_size(512) == (480, 60)
    assert window_size(125) == (118, 14)
    with pytest.raises(ValueError):
        windows(spans(3), size=4, overlap=4)
