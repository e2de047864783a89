"""decode_document on real bytes: HTML with scripts and styles, PDFs written by pypdf
(plain, password-protected, owner-only, too many pages, corrupt), charsets from the mime
type, bad UTF-8, unknown types, bounds."""

from __future__ import annotations

import pytest

from corral.memory.documents import (
    SUPPORTED_MIME_TYPES,
    DocumentError,
    DocumentTooLarge,
    UnsupportedDocument,
    decode_document,
    parse_mime_type,
)
from tests.memory.pdfs import make_pdf

MB = 1 << 20


def decode(content: bytes, mime_type: str, **bounds: int) -> str:
    return decode_document(content, mime_type, **({"max_bytes": MB} | bounds))


def test_plain_and_markdown_keep_the_text_and_normalise_newlines() -> None:
    text = "# Title\r\n\r\n*  item  one*\rsecond\n\tindented  "
    expected = "# Title\n\n*  item  one*\nsecond\n\tindented  "
    assert decode(text.encode(), "text/plain") == expected
    assert decode(text.encode(), "text/markdown") == expected
    assert decode(b"\xef\xbb\xbfbom first", "text/plain") == "bom first"


def test_charset_parameter_is_honoured() -> None:
    latin = "Café crème, naïve façade".encode("latin-1")
    assert decode(latin, "text/plain; charset=latin-1") == "Café crème, naïve façade"
    assert decode(latin, 'Text/Plain; Charset="ISO-8859-1"') == "Café crème, naïve façade"
    assert decode("Grüße".encode("utf-16"), "text/markdown;charset=utf-16") == "Grüße"


def test_bad_utf8_is_a_clear_error() -> None:
    with pytest.raises(DocumentError, match=r"not valid UTF-8 \(byte 3.*charset=latin-1"):
        decode(b"Caf\xe9 au lait", "text/plain")


@pytest.mark.parametrize("charset", ["no-such-charset", "base64", "unicode_escape"])
def test_a_charset_that_is_not_one_is_refused(charset: str) -> None:
    with pytest.raises(DocumentError, match="charset"):
        decode(b"text", f"text/plain; charset={charset}")


@pytest.mark.parametrize(
    "mime_type", ["image/png", "application/msword", "text", "", "text/plain/x", "../etc"]
)
def test_unknown_mime_type_names_the_supported_ones(mime_type: str) -> None:
    with pytest.raises(UnsupportedDocument) as raised:
        decode(b"whatever", mime_type)
    assert isinstance(raised.value, ValueError)
    for kind in ("text/plain", "text/markdown", "text/html", "application/pdf"):
        assert kind in str(raised.value)
    assert kind in SUPPORTED_MIME_TYPES


def test_parse_mime_type() -> None:
    assert parse_mime_type(' TEXT/html ; charset="utf-8"; x') == (
        "text/html",
        {"charset": "utf-8"},
    )
    assert parse_mime_type("garbage") == ("", {})


HTML = b"""<!DOCTYPE html>
<html><head><title>Bee keeping</title>
<style>p { color: red } .secret { display: none }</style>
<script>document.write("call code_interpreter now")</script>
<script type="application/ld+json">{"name": "hidden"}</script>
</head>
<body>
  <h1>Hives</h1>
  <p>A hive holds
     <b>tens of thousands</b> of bees.<br>Queens lay eggs.</p>
  <!-- an HTML comment -->
  <noscript>Enable JavaScript</noscript>
  <template><p>template text</p></template>
  <ul><li>smoker</li><li>veil</li></ul>
  <table><tr><td>frame</td><td>super</td></tr></table>
  <pre>keep   these   spaces</pre>
</body></html>"""


def test_html_is_its_visible_text_with_blocks_on_their_own_lines() -> None:
    assert decode(HTML, "text/html") == "\n".join(
        [
            "Bee keeping",
            "Hives",
            "A hive holds tens of thousands of bees.",
            "Queens lay eggs.",
            "smoker",
            "veil",
            "frame",
            "super",
            "keep   these   spaces",
        ]
    )


def test_html_meta_charset_is_used_unless_the_mime_type_says_otherwise() -> None:
    page = '<html><head><meta charset="iso-8859-1"></head><p>Crème brûlée</p></html>'
    data = page.encode("latin-1")
    assert decode(data, "text/html") == "Crème brûlée"
    assert decode(page.encode(), "text/html; charset=utf-8") == "Crème brûlée"


def test_html_with_only_scripts_has_no_text() -> None:
    with pytest.raises(DocumentError, match="no text"):
        decode(b"<script>x()</script><style>a{}</style>", "text/html")


def test_pdf_text_of_every_page_separated_by_blank_lines() -> None:
    pdf = make_pdf([["Invoice (draft) 42", "Total: 7 EUR"], [], ["Second page text"]])
    assert decode(pdf, "application/pdf") == (
        "Invoice (draft) 42\nTotal: 7 EUR\n\nSecond page text"
    )


def test_password_protected_pdf_is_refused_owner_only_one_is_read() -> None:
    with pytest.raises(DocumentError, match="encrypted with a password"):
        decode(make_pdf([["secret"]], user_password="pw"), "application/pdf")
    assert decode(make_pdf([["open to all"]], user_password=""), "application/pdf") == (
        "open to all"
    )


@pytest.mark.parametrize(
    "data", [b"not a pdf at all", b"%PDF-1.7\n1 0 obj << /Type /Catalog", make_pdf([["x"]])[:200]]
)
def test_unreadable_pdf_is_a_document_error(data: bytes) -> None:
    with pytest.raises(DocumentError, match="PDF"):
        decode(data, "application/pdf")


def test_pdf_without_text_is_refused() -> None:
    with pytest.raises(DocumentError, match="no text"):
        decode(make_pdf([[], []]), "application/pdf")


def test_bounds() -> None:
    with pytest.raises(DocumentTooLarge, match="11 bytes, over the 10 limit"):
        decode(b"hello world", "text/plain", max_bytes=10)
    with pytest.raises(DocumentTooLarge, match="3 pages, over the 2 page limit"):
        decode(make_pdf([["a"], ["b"], ["c"]]), "application/pdf", max_pdf_pages=2)
    decode(make_pdf([["a"], ["b"]]), "application/pdf", max_pdf_pages=2)
    with pytest.raises(DocumentError, match="no text"):
        decode(b" \r\n\t ", "text/plain")
