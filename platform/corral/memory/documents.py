"""A memory bank document's bytes to the text that is chunked and embedded, by mime type:
plain text and markdown as written (newlines normalised), HTML as its visible text
(BeautifulSoup on the standard library's parser), PDF as its pages' text (pypdf).

Offsets of chunks are character offsets in the text returned here, so it must be the
same for the same bytes every time: nothing here depends on the machine or on time.
Every failure is a `DocumentError` (a `ValueError`) with a message a client can act on;
the service maps it to 422 (`DocumentTooLarge` to 413)."""

from __future__ import annotations

import codecs
import io
import re
from collections.abc import Callable

import pypdf
from bs4 import BeautifulSoup
from bs4.dammit import EncodingDetector
from bs4.element import PreformattedString

DEFAULT_MAX_PDF_PAGES = 1000


class DocumentError(ValueError):
    """The document cannot be turned into text: nothing of it is stored."""


class UnsupportedDocument(DocumentError):
    """The mime type is not one this server decodes."""


class DocumentTooLarge(DocumentError):
    """The document (its bytes, its decoded text or its page count) is over a bound."""


def decode_document(
    content: bytes,
    mime_type: str,
    *,
    max_bytes: int,
    max_pdf_pages: int = DEFAULT_MAX_PDF_PAGES,
) -> str:
    """The text of a document. `mime_type` may carry parameters (`text/plain;
    charset=latin-1`); a charset given there wins, else UTF-8 (HTML: its own `<meta
    charset>` first). `max_bytes` bounds both the input and the decoded text
    (`Settings.memory_max_document_bytes`); a PDF has at most `max_pdf_pages` pages."""
    kind, params = parse_mime_type(mime_type)
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise UnsupportedDocument(
            f"mime_type {kind or mime_type!r} is not supported; supported: "
            + ", ".join(sorted(_DECODERS))
        )
    if len(content) > max_bytes:
        raise DocumentTooLarge(f"document is {len(content)} bytes, over the {max_bytes} limit")
    charset = params.get("charset")
    if charset is not None:
        _check_charset(charset)
    text = decoder(content, charset, max_pdf_pages)
    text = normalise_newlines(text)
    if len(text) > max_bytes:
        raise DocumentTooLarge(f"decoded text is {len(text)} characters, over {max_bytes}")
    if not text.strip():
        raise DocumentError(f"document ({kind}) has no text after decoding")
    return text


def parse_mime_type(mime_type: str) -> tuple[str, dict[str, str]]:
    """`"Text/HTML; charset="utf-8""` -> `("text/html", {"charset": "utf-8"})`. A value
    that is not `type/subtype` gives `("", {})` (unsupported)."""
    head, *rest = mime_type.split(";")
    kind = head.strip().lower()
    if not re.fullmatch(r"[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*", kind):
        return "", {}
    params: dict[str, str] = {}
    for part in rest:
        key, sep, value = part.partition("=")
        if sep:
            params[key.strip().lower()] = value.strip().strip('"').strip()
    return kind, params


def normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _check_charset(charset: str) -> None:
    try:
        info = codecs.lookup(charset)
    except LookupError:
        raise DocumentError(f"unknown charset {charset!r}") from None
    # bytes-to-bytes codecs (base64, zlib...) and escape codecs are not charsets
    if not getattr(info, "_is_text_encoding", True) or "escape" in info.name:
        raise DocumentError(f"{charset!r} is not a text charset")


def _decode_bytes(content: bytes, charset: str | None) -> str:
    encoding = charset or "utf-8-sig"  # a UTF-8 byte-order mark is not text
    try:
        return content.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DocumentError(
            f"document is not valid {charset or 'UTF-8'} (byte {exc.start}: "
            f"{content[exc.start : exc.start + 1]!r}); give its charset in mime_type, "
            "e.g. 'text/plain; charset=latin-1'"
        ) from None


def _plain(content: bytes, charset: str | None, _pages: int) -> str:
    return _decode_bytes(content, charset)


# Elements whose text is not shown to a reader.
_HIDDEN = ("script", "style", "noscript", "template")
# Elements that start a new line in the rendered text.
_BLOCKS = frozenset(
    {
        *("address", "article", "aside", "blockquote", "body", "br", "caption", "dd"),
        *("details", "div", "dl", "dt", "fieldset", "figcaption", "figure", "footer"),
        *("form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "html", "li"),
        *("main", "nav", "ol", "p", "pre", "section", "summary", "table", "tbody", "td"),
        *("tfoot", "th", "thead", "title", "tr", "ul"),
    }
)


def _html(content: bytes, charset: str | None, _pages: int) -> str:
    if charset is None:
        declared = EncodingDetector.find_declared_encoding(content, is_html=True)
        if declared is not None:
            try:
                _check_charset(declared)
                charset = declared
            except DocumentError:
                pass  # an unusable <meta charset> falls back to UTF-8
    soup = BeautifulSoup(_decode_bytes(content, charset), "html.parser")
    for hidden in soup.select(", ".join(_HIDDEN)):
        hidden.decompose()
    # comments, <!DOCTYPE>, <?...?> and <![CDATA[...]]> are markup, not text
    for markup in soup.find_all(string=lambda s: isinstance(s, PreformattedString)):
        markup.extract()
    for string in soup.find_all(string=True):
        if string.find_parent(["pre", "textarea"]) is None:
            string.replace_with(re.sub(r"\s+", " ", str(string)))
    for block in soup.find_all(_BLOCKS):
        block.insert_before("\n")
        block.insert_after("\n")
    lines = (line.strip() for line in soup.get_text().split("\n"))
    return "\n".join(line for line in lines if line)


def _pdf(content: bytes, _charset: str | None, max_pages: int) -> str:
    try:
        reader = pypdf.PdfReader(io.BytesIO(content), strict=False)
        if reader.is_encrypted and not reader.decrypt(""):
            # an owner-password-only PDF opens with the empty user password, as in a viewer
            raise DocumentError("PDF is encrypted with a password; upload it decrypted")
        if len(reader.pages) > max_pages:
            raise DocumentTooLarge(
                f"PDF has {len(reader.pages)} pages, over the {max_pages} page limit"
            )
        pages = [normalise_newlines(page.extract_text()).strip() for page in reader.pages]
    except DocumentError:
        raise
    except Exception as exc:  # a parser of untrusted bytes fails in many ways
        raise DocumentError(f"PDF could not be read: {type(exc).__name__}: {exc}") from None
    return "\n\n".join(page for page in pages if page)


_DECODERS: dict[str, Callable[[bytes, str | None, int], str]] = {
    "text/plain": _plain,
    "text/markdown": _plain,
    "text/x-markdown": _plain,
    "text/html": _html,
    "application/xhtml+xml": _html,
    "application/pdf": _pdf,
}
SUPPORTED_MIME_TYPES = frozenset(_DECODERS)
