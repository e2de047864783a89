"""Dataset content from user-supplied URLs: fetched under a safety policy, parsed into rows."""

from corral.content.rows import SUPPORTED_FORMATS, DataFormat, Row, detect_format, parse_rows
from corral.content.urls import ContentFetcher, FetchedContent, FetchPolicy, is_public_address

__all__ = [
    "SUPPORTED_FORMATS",
    "ContentFetcher",
    "DataFormat",
    "FetchPolicy",
    "FetchedContent",
    "Row",
    "detect_format",
    "is_public_address",
    "parse_rows",
]
