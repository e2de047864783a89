from __future__ import annotations

import json

import pytest

from corral.api.inference import CompletionResponse
from corral.routes.responses import JSONLinesResponse, empty_ok


def test_jsonl_renders_one_value_per_line_in_order() -> None:
    response = JSONLinesResponse(
        [CompletionResponse(content="a", stop_reason="finished_ok"), {"content": "b"}, [1, 2]]
    )
    assert response.media_type == "application/jsonl"
    lines = response.body.decode().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"content": "a", "stop_reason": "finished_ok"},
        {"content": "b"},
        [1, 2],
    ]
    assert response.body.endswith(b"\n")


def test_jsonl_of_nothing_is_empty() -> None:
    assert JSONLinesResponse([]).body == b""


def test_jsonl_refuses_nan() -> None:
    with pytest.raises(ValueError):
        JSONLinesResponse([{"x": float("nan")}])


def test_empty_ok() -> None:
    response = empty_ok()
    assert response.status_code == 200
    assert response.body == b""
