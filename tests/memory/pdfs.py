"""PDFs with real text, written with pypdf's own writer (there is no PDF generator with
text here: no reportlab, no LibreOffice): a blank page, the standard Helvetica font, and
a content stream that shows each line (`Tj`, then `T*` to the next line)."""

from __future__ import annotations

import io

import pypdf
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

HELVETICA = DictionaryObject(
    {
        NameObject("/Type"): NameObject("/Font"),
        NameObject("/Subtype"): NameObject("/Type1"),
        NameObject("/BaseFont"): NameObject("/Helvetica"),
    }
)


def _literal(line: str) -> str:
    return "(" + line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def make_pdf(pages: list[list[str]], *, user_password: str | None = None) -> bytes:
    """One PDF page per item of `pages`, each line of it a line of text."""
    writer = pypdf.PdfWriter()
    for lines in pages:
        page = writer.add_blank_page(width=612, height=792)
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): HELVETICA})}
        )
        ops = ["BT", "/F1 12 Tf", "14 TL", "72 720 Td"]
        ops += [f"{_literal(line)} Tj T*" for line in lines]
        ops.append("ET")
        stream = DecodedStreamObject()
        stream.set_data("\n".join(ops).encode("latin-1"))
        page.replace_contents(stream)
    if user_password is not None:
        writer.encrypt(
            user_password=user_password,
            owner_password="owner-" + user_password,
            algorithm="AES-128",
        )
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
