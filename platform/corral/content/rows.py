"""Turn fetched dataset content into rows: JSON Lines, JSON arrays, CSV and Parquet."""

from __future__ import annotations

import csv
import io
import json
from pathlib import PurePosixPath
from typing import Any, Literal, get_args

import pyarrow as pa
import pyarrow.parquet as pq

from corral.api.common import MAX_JSON_DEPTH
from corral.content.urls import FetchedContent
from corral.errors import InvalidRequest

Row = dict[str, Any]
DataFormat = Literal["jsonl", "csv", "parquet", "json"]
SUPPORTED_FORMATS: tuple[DataFormat, ...] = get_args(DataFormat)

_DECLARED_ALIASES: dict[str, DataFormat] = {"ndjson": "jsonl", "jsonlines": "jsonl"}
_MEDIA_TYPES: dict[str, DataFormat] = {
    "application/jsonl": "jsonl",
    "application/x-ndjson": "jsonl",
    "application/x-jsonlines": "jsonl",
    "text/csv": "csv",
    "application/vnd.apache.parquet": "parquet",
    "application/x-parquet": "parquet",
    "application/json": "json",
}
_EXTENSIONS: dict[str, DataFormat] = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".json": "json",
}


def _supported() -> str:
    return ", ".join(SUPPORTED_FORMATS)


def _known_format(value: str) -> DataFormat | None:
    value = value.strip().lower()
    for known in SUPPORTED_FORMATS:
        if value == known:
            return known
    return _DECLARED_ALIASES.get(value)


def detect_format(content: FetchedContent, *, declared: str | None = None) -> DataFormat:
    """The format to parse `content` as: declared, else by media type, else by file name."""
    if declared:
        known = _known_format(declared)
        if known is None:
            raise InvalidRequest(
                f"unsupported dataset format {declared[:40]!r}; supported: {_supported()}"
            )
        return known
    if content.media_type is not None and content.media_type.lower() in _MEDIA_TYPES:
        return _MEDIA_TYPES[content.media_type.lower()]
    if content.name:
        suffix = PurePosixPath(content.name).suffix.lower()
        if suffix in _EXTENSIONS:
            return _EXTENSIONS[suffix]
    raise InvalidRequest(
        "cannot tell the dataset format from its media type or file name; "
        f"declare one of: {_supported()}"
    )


def parse_rows(content: FetchedContent, *, declared_format: str | None = None) -> list[Row]:
    """Every row of `content`, each a dict keyed by column name, none nested deeper than
    MAX_JSON_DEPTH (the row itself counts as one level)."""
    fmt = detect_format(content, declared=declared_format)
    if fmt == "parquet":
        rows = _parquet_rows(content.data)
    else:
        text = _decode(content.data, fmt)
        if fmt == "jsonl":
            rows = _jsonl_rows(text)
        elif fmt == "json":
            rows = _json_rows(text)
        else:
            rows = _csv_rows(text)
    for index, row in enumerate(rows):
        if json_depth(row) > MAX_JSON_DEPTH:
            raise InvalidRequest(f"row {index} nests more than {MAX_JSON_DEPTH} levels deep")
    return rows


def json_depth(value: object) -> int:
    """How deeply arrays and objects nest in `value` (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth) for child in children)
    return deepest


def loads_bounded(text: str) -> Any:
    """`json.loads`, but a value nested deeper than MAX_JSON_DEPTH is a ValueError, as is
    one so deep that the parser itself gives up (a RecursionError, a server error if it
    escaped)."""
    try:
        value = json.loads(text)
    except RecursionError:
        value = None
    else:
        if json_depth(value) <= MAX_JSON_DEPTH:
            return value
    raise ValueError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")


def _decode(data: bytes, fmt: DataFormat) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{fmt} content is not valid UTF-8 (at byte {exc.start})") from None


def _kind(value: object) -> str:
    names = {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _jsonl_rows(text: str) -> list[Row]:
    rows: list[Row] = []
    # Split on "\n" only: str.splitlines would also split on U+2028 inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = loads_bounded(line)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"jsonl line {number} is not valid JSON: {exc.msg}") from None
        except ValueError as exc:
            raise InvalidRequest(f"jsonl line {number}: {exc}") from None
        if not isinstance(value, dict):
            raise InvalidRequest(
                f"jsonl line {number} is a JSON {_kind(value)}, expected an object"
            )
        rows.append(value)
    return rows


def _json_rows(text: str) -> list[Row]:
    try:
        value = loads_bounded(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"json content is not valid JSON: {exc.msg} (line {exc.lineno})"
        ) from None
    except ValueError as exc:
        raise InvalidRequest(f"json content: {exc}") from None
    if not isinstance(value, list):
        raise InvalidRequest(f"json content is a JSON {_kind(value)}, expected an array of objects")
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidRequest(
                f"json array item {index} is a JSON {_kind(item)}, expected an object"
            )
    return value


def _csv_rows(text: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey=None, strict=True)
    rows: list[Row] = []
    try:
        header = reader.fieldnames
        if header is None:
            return rows
        if len(set(header)) != len(header):
            raise InvalidRequest("csv header has duplicate column names")
        for row in reader:
            if None in row:
                raise InvalidRequest(f"csv line {reader.line_num} has more fields than the header")
            rows.append(dict(row))
    except csv.Error as exc:
        raise InvalidRequest(f"csv line {reader.line_num} is malformed: {exc}") from None
    return rows


def _parquet_rows(data: bytes) -> list[Row]:
    try:
        table = pq.read_table(pa.BufferReader(data))
        rows: list[Row] = table.to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise InvalidRequest(f"parquet content cannot be read: {exc}") from None
    return rows
