"""Row parsing for every supported format, and the errors for content that is not one."""

from __future__ import annotations

import base64
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corral.content import (
    SUPPORTED_FORMATS,
    ContentFetcher,
    FetchedContent,
    FetchPolicy,
    detect_format,
    parse_rows,
)
from corral.errors import InvalidRequest

ROWS = [
    {"prompt": "hi", "answer": "hello", "score": 1},
    {"prompt": 'line\u2028sep, and "quotes"', "answer": "ünïcode", "score": 2},
]


def content(data: bytes, media_type: str | None = None, name: str | None = None) -> FetchedContent:
    return FetchedContent(data=data, media_type=media_type, name=name)


def parquet_bytes(rows: list[dict[str, object]]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


# -- round trips -----------------------------------------------------------------------


def test_jsonl_round_trip() -> None:
    text = "\r\n".join(json.dumps(row, ensure_ascii=False) for row in ROWS) + "\r\n\n  \n"
    assert parse_rows(content(text.encode(), name="train.jsonl")) == ROWS


def test_json_round_trip() -> None:
    assert parse_rows(content(json.dumps(ROWS).encode(), "application/json")) == ROWS


def test_csv_round_trip_keeps_values_as_text() -> None:
    data = b'prompt,answer\nhi,hello\n"a, b","two\nlines"\n'
    assert parse_rows(content(data, "text/csv")) == [
        {"prompt": "hi", "answer": "hello"},
        {"prompt": "a, b", "answer": "two\nlines"},
    ]


def test_csv_with_a_byte_order_mark() -> None:
    data = "\ufeffprompt,answer\nhi,hello\n".encode()
    assert parse_rows(content(data, name="rows.csv")) == [{"prompt": "hi", "answer": "hello"}]


def test_parquet_round_trip() -> None:
    assert parse_rows(content(parquet_bytes(ROWS), name="part-0.parquet")) == ROWS


@pytest.mark.parametrize(
    ("data", "name"), [(b"", "a.jsonl"), (b"\n\n", "a.jsonl"), (b"[]", "a.json"), (b"", "a.csv")]
)
def test_empty_content_has_no_rows(data: bytes, name: str) -> None:
    assert parse_rows(content(data, name=name)) == []


def test_fetched_data_url_to_rows() -> None:
    fetcher = ContentFetcher(FetchPolicy(allowed_roots=(), max_bytes=10_000, timeout_s=1.0))
    url = "data:application/vnd.apache.parquet;base64," + base64.b64encode(
        parquet_bytes(ROWS)
    ).decode("ascii")
    assert parse_rows(fetcher.fetch(url)) == ROWS


# -- format detection ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("media_type", "name", "declared", "expected"),
    [
        ("application/json", "x.csv", "jsonl", "jsonl"),  # declared wins
        ("text/csv", "x.json", " CSV ", "csv"),
        (None, None, "ndjson", "jsonl"),
        ("application/x-ndjson", "x.json", None, "jsonl"),  # then media type
        ("application/jsonl", None, None, "jsonl"),
        ("application/vnd.apache.parquet", "x", None, "parquet"),
        ("text/plain", "data.NDJSON", None, "jsonl"),  # then file name
        ("application/octet-stream", "train.parquet", None, "parquet"),
        (None, "a.b.json", None, "json"),
        (None, "rows.csv", None, "csv"),
    ],
)
def test_detect_format(
    media_type: str | None, name: str | None, declared: str | None, expected: str
) -> None:
    assert detect_format(content(b"", media_type, name), declared=declared) == expected


@pytest.mark.parametrize(
    ("media_type", "name", "declared"),
    [(None, None, None), ("text/plain", "data.txt", None), ("text/csv", "x.csv", "xlsx")],
)
def test_unknown_format_lists_the_supported_ones(
    media_type: str | None, name: str | None, declared: str | None
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        detect_format(content(b"", media_type, name), declared=declared)
    for fmt in SUPPORTED_FORMATS:
        assert fmt in caught.value.message


# -- malformed content -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fmt", "match"),
    [
        (b'{"a": 1}\n\n{"a": 2\n', "jsonl", "jsonl line 3 is not valid JSON"),
        (b'{"a": 1}\n[1, 2]\n', "jsonl", "jsonl line 2 is a JSON array, expected an object"),
        (b'{"a": 1}\n"text"\n', "jsonl", "line 2 is a JSON string"),
        (b'{"a": 1}', "json", "is a JSON object, expected an array of objects"),
        (b'[{"a": 1}, 3]', "json", "item 1 is a JSON number, expected an object"),
        (b"[{", "json", "not valid JSON"),
        (b"a,b\n1,2\n1,2,3\n", "csv", "csv line 3 has more fields than the header"),
        (b"a,a\n1,2\n", "csv", "duplicate column names"),
        (b'a,b\n"1,2\n', "csv", "csv line .* is malformed"),
        (b"a,b\n\xff\xfe,1\n", "csv", "not valid UTF-8"),
        (b"\xc3(", "jsonl", "not valid UTF-8"),
        (b"PAR1 not really parquet", "parquet", "parquet content cannot be read"),
        (b"", "parquet", "parquet content cannot be read"),
    ],
)
def test_malformed_content_is_an_invalid_request(data: bytes, fmt: str, match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        parse_rows(content(data), declared_format=fmt)


# ---------------------------------------------------------------- nesting depth


def test_json_depth_counts_arrays_and_objects_without_recursion() -> None:
    from corral.content.rows import json_depth

    assert json_depth("x") == 0
    assert json_depth({"a": [1, {"b": []}]}) == 4
    deep: list[object] = []
    for _ in range(100_000):  # far past the interpreter's recursion limit
        deep = [deep]
    assert json_depth(deep) == 100_001


@pytest.mark.parametrize("depth", [65, 300, 100_000])
def test_loads_bounded_refuses_deep_json_with_a_value_error(depth: int) -> None:
    from corral.api.common import MAX_JSON_DEPTH
    from corral.content.rows import loads_bounded

    assert depth > MAX_JSON_DEPTH
    with pytest.raises(ValueError, match="levels deep"):
        loads_bounded("[" * depth + "]" * depth)
    assert loads_bounded("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) is not None


def test_deep_parquet_rows_are_refused() -> None:
    """Parquet bounds nesting itself (a schema depth of 100, a few levels per list): a
    file deeper than that is refused as unreadable, so rows stay within MAX_JSON_DEPTH."""
    value: object = 1
    for _ in range(70):
        value = [value]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{"cell": value}]), buffer)
    with pytest.raises(InvalidRequest, match="too deeply nested"):
        parse_rows(content(buffer.getvalue(), name="deep.parquet"))
