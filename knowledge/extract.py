"""Plain text out of uploaded documents: text, Markdown (kept as is: its markup reads as
prose), HTML (Beautiful Soup, scripts and styles dropped) and PDF (pypdf)."""

from __future__ import annotations

import io

SUPPORTED = ("text/plain", "text/markdown", "text/html", "application/pdf")
MAX_BYTES = 20 * 1024 * 1024


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError("the file is not valid UTF-8 text") from None


def _html(data: bytes) -> str:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(data, "html.parser")
    for tag in soup(["script", "style", "noscript", "template", "head"]):
        tag.decompose()
    blocks = ("p", "div", "section", "article", "li", "h1", "h2", "h3", "h4", "h5", "h6",
              "tr", "br", "pre", "blockquote")
    for tag in soup.find_all(blocks):
        tag.insert_after("\n\n")
    lines = [" ".join(line.split()) for line in soup.get_text().split("\n\n")]
    return "\n\n".join(line for line in lines if line)


def _pdf(data: bytes) -> str:
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise ValueError("the PDF is encrypted")
        pages = [page.extract_text() or "" for page in reader.pages]
    except ValueError:
        raise
    except Exception as exc:  # an untrusted file: pypdf fails in many ways
        # PyPdfError (LimitReachedError, ParseError, ...) and the odd KeyError or IndexError a
        # malformed file raises are all "not readable", never a server error.
        raise ValueError(f"the PDF could not be read ({type(exc).__name__})") from None
    return "\n\n".join(p.strip() for p in pages if p.strip())


def extract(data: bytes, media_type: str) -> str:
    """The document's text; ValueError with a reason for a type not supported, a file that
    cannot be read, or one with no text."""
    kind = (media_type or "").split(";", 1)[0].strip().lower()
    if kind not in SUPPORTED:
        raise ValueError(f"unsupported media type {kind or '(none)'!r}; supported: "
                         f"{', '.join(SUPPORTED)}")
    if len(data) > MAX_BYTES:
        raise ValueError(f"the file is larger than {MAX_BYTES // (1024 * 1024)} MB")
    if kind == "application/pdf":
        if not data.startswith(b"%PDF-"):
            raise ValueError("the file is not a PDF")
        text = _pdf(data)
    elif kind == "text/html":
        text = _html(data)
    else:
        text = _decode(data)
    text = text.replace("\x00", "").strip()
    if not text:
        raise ValueError("the document has no text")
    return text
