"""Files → pages, refusing bad input with a readable :class:`~hostgpu.errors.PipelineError`.

Supported types (by extension): PDF, PNG, JPEG, TXT and Markdown.

Limits and what happens past them (each is a parameter, and ``ingest`` reads the matching
environment variable):

- **PDF pages** (``max_pages``, default 500, ``HOSTGPU_MAX_PAGES``): a longer PDF is refused
  before any page is read, with a message giving the limit and the setting that raises it.
  Refusing keeps a file all-or-nothing and keeps one job bounded in time. Within the limit,
  memory stays bounded: page *text* is kept for every page (small), rendered bitmaps are
  produced ``batch`` pages at a time by :func:`iter_rendered` and dropped after embedding, so
  rendering holds at most ``batch x max_pixels x 3`` bytes of pixels.
- **Image pixels** (``max_pixels``, default 50 million, ``HOSTGPU_MAX_PIXELS``): dimensions are
  read from the file header before anything is decoded. A JPEG over the limit is decoded at a
  reduced scale (JPEG "draft" mode, 1/2 to 1/8, so the full image is never in memory) when
  that brings it under the limit; any other image over the limit is refused. A rendered PDF
  page over the limit is rendered at a lower DPI (and the result says so).
- **Text size** (``max_text_bytes``, default 20 MB): a larger text file is refused.
- **Text encoding**: text files must be UTF-8 (a UTF-8 BOM is accepted). Anything else is
  refused with the ``iconv`` command that converts it: decoding with replacement characters
  would index garbage silently.

PDFium is not thread-safe, even across documents: nothing here uses threads; a worker runs
each job in its own process.
"""

from __future__ import annotations

import contextlib
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from hostgpu.errors import PipelineError

if TYPE_CHECKING:
    from PIL.Image import Image

PDF_SUFFIXES = frozenset({".pdf"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
TEXT_SUFFIXES = frozenset({".txt", ".md", ".markdown"})
SUPPORTED_SUFFIXES = PDF_SUFFIXES | IMAGE_SUFFIXES | TEXT_SUFFIXES

DEFAULT_MAX_PAGES = 500
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_TEXT_BYTES = 20_000_000
CHUNK_CHARS = 1000


@dataclass(frozen=True)
class InputLimits:
    """How much of a document is read: pages of a PDF, pixels of a page or image, bytes of
    a text file (HOSTGPU_MAX_PAGES, HOSTGPU_MAX_PIXELS, HOSTGPU_MAX_TEXT_BYTES)."""

    max_pages: int = DEFAULT_MAX_PAGES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES


PageKind = Literal["pdf", "image", "text"]


@dataclass
class Page:
    """One page of a document.

    ``number`` starts at 1. For a text file a "page" is one chunk of about
    :data:`CHUNK_CHARS` characters cut on paragraph boundaries.
    """

    number: int
    kind: PageKind
    text: str
    image: Image | None = None
    notes: list[str] = field(default_factory=list)


def supported_list() -> str:
    return ", ".join(sorted(SUPPORTED_SUFFIXES))


def kind_of(path: Path) -> PageKind:
    """The document kind for ``path``'s extension, or a PipelineError naming the supported ones."""
    suffix = path.suffix.lower()
    if suffix in PDF_SUFFIXES:
        return "pdf"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in TEXT_SUFFIXES:
        return "text"
    shown = suffix or "(no extension)"
    raise PipelineError(
        f"{path.name}: unsupported file type {shown}; supported types: {supported_list()}"
    )


def check_file(path: Path) -> PageKind:
    """Refuse missing, non-regular, empty and unsupported files; return the kind."""
    kind = kind_of(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such file") from None
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if not path.is_file():
        raise PipelineError(f"{path}: not a regular file")
    if size == 0:
        raise PipelineError(f"{path.name}: empty file (0 bytes): nothing to ingest")
    return kind


def load_pages(
    path: Path,
    *,
    dpi: int,
    render: bool,
    limits: InputLimits = InputLimits(),
) -> list[Page]:
    """Read ``path`` into pages.

    With ``render=False`` (no visual model configured) nothing is rasterised: PDFs give their
    text, images are checked (header and size) but not decoded. With ``render=True`` every
    page carries an RGB image; for PDFs prefer :func:`iter_rendered`, which bounds memory.
    """
    path = Path(path)
    kind = check_file(path)
    if kind == "pdf":
        return _pdf_pages(
            path, dpi=dpi, render=render, max_pages=limits.max_pages, max_pixels=limits.max_pixels
        )
    if kind == "image":
        return [_image_page(path, decode=render, max_pixels=limits.max_pixels)]
    return _text_pages(path, max_text_bytes=limits.max_text_bytes)


# ----------------------------------------------------------------------------- PDF


def open_pdf(path: Path, *, max_pages: int = DEFAULT_MAX_PAGES) -> Any:
    """Open a PDF with pypdfium2, turning its failures into readable PipelineErrors."""
    import pypdfium2 as pdfium

    try:
        doc = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as exc:
        text = str(exc)
        if "password" in text.lower():
            raise PipelineError(
                f"{path.name}: the PDF is password-protected (encrypted); "
                "save an unprotected copy and ingest that"
            ) from None
        if "format" in text.lower() or "file" in text.lower():
            raise PipelineError(
                f"{path.name}: not a readable PDF (corrupt or truncated): {text}"
            ) from None
        raise PipelineError(f"{path.name}: PDFium could not open it: {text}") from None
    count = len(doc)
    if count == 0:
        doc.close()
        raise PipelineError(f"{path.name}: the PDF has no pages")
    if count > max_pages:
        doc.close()
        raise PipelineError(
            f"{path.name}: the PDF has {count:,} pages, over the limit of {max_pages:,} pages "
            "per file; raise HOSTGPU_MAX_PAGES to ingest it, or split it"
        )
    return doc


@contextlib.contextmanager
def _pdf_page(doc: Any, index: int, name: str, doing: str) -> Iterator[Any]:
    """Page ``index`` (0-based) of an open PDF, closed afterwards; PDFium's failures, opening
    it or ``doing`` it (read, rendered), become a PipelineError naming the page."""
    import pypdfium2 as pdfium

    try:
        page = doc[index]
        try:
            yield page
        finally:
            page.close()
    except pdfium.PdfiumError as exc:
        raise PipelineError(
            f"{name}: page {index + 1} cannot be {doing} (corrupt or truncated PDF): {exc}"
        ) from None


def _page_text(doc: Any, index: int, name: str) -> str:
    with _pdf_page(doc, index, name, "read") as page:
        textpage = page.get_textpage()
        try:
            text: str = textpage.get_text_bounded()
        finally:
            textpage.close()
    return normalize_text(text)


def render_page(doc: Any, index: int, *, dpi: int, max_pixels: int, name: str = "") -> Image:
    """Render page ``index`` (0-based) of an open PDF to an RGB image.

    The DPI is lowered when the page at ``dpi`` would exceed ``max_pixels``, so an absurd
    page size cannot allocate an absurd bitmap.
    """
    with _pdf_page(doc, index, name, "rendered") as page:
        width_pt, height_pt = page.get_size()
        scale = dpi / 72.0
        pixels = width_pt * scale * height_pt * scale
        if pixels > max_pixels:
            scale *= (max_pixels / pixels) ** 0.5
        bitmap = page.render(scale=scale)
        image: Image = bitmap.to_pil().convert("RGB")
        bitmap.close()
    return image


def _pdf_pages(
    path: Path, *, dpi: int, render: bool, max_pages: int, max_pixels: int
) -> list[Page]:
    doc = open_pdf(path, max_pages=max_pages)
    try:
        pages: list[Page] = []
        for index in range(len(doc)):
            text = _page_text(doc, index, path.name)
            image = (
                render_page(doc, index, dpi=dpi, max_pixels=max_pixels, name=path.name)
                if render
                else None
            )
            pages.append(Page(number=index + 1, kind="pdf", text=text, image=image))
        return pages
    finally:
        doc.close()


def iter_rendered(
    path: Path,
    *,
    dpi: int,
    batch: int,
    limits: InputLimits = InputLimits(),
) -> Iterator[list[tuple[int, Image]]]:
    """Yield ``(page_number, image)`` lists of at most ``batch`` pages.

    For PDFs only ``batch`` rendered pages exist at a time; for an image file there is one
    page. Memory bound: ``batch x max_pixels x 3`` bytes of pixels.
    """
    max_pages, max_pixels = limits.max_pages, limits.max_pixels
    path = Path(path)
    kind = check_file(path)
    if kind == "image":
        page = _image_page(path, decode=True, max_pixels=max_pixels)
        assert page.image is not None
        yield [(1, page.image)]
        return
    if kind != "pdf":
        return
    doc = open_pdf(path, max_pages=max_pages)
    try:
        current: list[tuple[int, Image]] = []
        for index in range(len(doc)):
            image = render_page(doc, index, dpi=dpi, max_pixels=max_pixels, name=path.name)
            current.append((index + 1, image))
            if len(current) >= max(1, batch):
                yield current
                current = []
        if current:
            yield current
    finally:
        doc.close()


# ----------------------------------------------------------------------------- images


@contextlib.contextmanager
def _own_pixel_limit() -> Iterator[None]:
    """Let our ``max_pixels`` check decide instead of Pillow's global bomb limit.

    ``Image.open`` only parses the header; we check the size ourselves before decoding. The
    global is restored afterwards (a worker runs one job per process, so no race).
    """
    from PIL import Image as PILImage

    saved = PILImage.MAX_IMAGE_PIXELS
    PILImage.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        PILImage.MAX_IMAGE_PIXELS = saved


def _image_page(path: Path, *, decode: bool, max_pixels: int) -> Page:
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    notes: list[str] = []
    try:
        with _own_pixel_limit():
            im = PILImage.open(path)
    except UnidentifiedImageError:
        raise PipelineError(
            f"{path.name}: not a readable PNG or JPEG image (corrupt, truncated or another format)"
        ) from None
    except PILImage.DecompressionBombError as exc:
        raise PipelineError(
            f"{path.name}: image too large to decode safely ({exc}); the limit is "
            f"{max_pixels:,} pixels (HOSTGPU_MAX_PIXELS)"
        ) from None
    except OSError as exc:
        raise PipelineError(f"{path.name}: cannot read the image: {exc}") from None
    try:
        if im.format not in {"PNG", "JPEG", "MPO"}:
            raise PipelineError(
                f"{path.name}: the file is a {im.format} image, not PNG or JPEG; "
                f"supported types: {supported_list()}"
            )
        width, height = im.size
        if width * height > max_pixels:
            if im.format in {"JPEG", "MPO"}:
                # Decode at 1/2, 1/4 or 1/8 scale: the full-size image is never allocated.
                # draft() picks the strongest reduction still at least the requested size,
                # so ask for the exact size at the first power-of-two scale under the limit.
                for denominator in (2, 4, 8):
                    target = (-(-width // denominator), -(-height // denominator))
                    if target[0] * target[1] <= max_pixels:
                        im.draft("RGB", target)
                        break
            if im.size[0] * im.size[1] > max_pixels:
                raise PipelineError(
                    f"{path.name}: image is {width:,}x{height:,} pixels "
                    f"({width * height / 1e6:,.0f} MP), over the limit of "
                    f"{max_pixels / 1e6:,.0f} MP; downscale it first or raise "
                    "HOSTGPU_MAX_PIXELS"
                )
            notes.append(
                f"{path.name}: {width}x{height} image decoded at {im.size[0]}x{im.size[1]} "
                f"(limit {max_pixels:,} pixels)"
            )
        image: Image | None = None
        if decode:
            try:
                im.load()
                image = im.convert("RGB")
            except (OSError, SyntaxError, ValueError) as exc:
                raise PipelineError(
                    f"{path.name}: the image data is corrupt or truncated: {exc}"
                ) from None
        return Page(number=1, kind="image", text="", image=image, notes=notes)
    finally:
        if not decode:
            im.close()


# ----------------------------------------------------------------------------- text


def _text_pages(path: Path, *, max_text_bytes: int) -> list[Page]:
    size = path.stat().st_size
    if size > max_text_bytes:
        raise PipelineError(
            f"{path.name}: text file of {size:,} bytes is over the limit of "
            f"{max_text_bytes:,} bytes; split it"
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PipelineError(
            f"{path.name}: not UTF-8 text (byte 0x{data[exc.start]:02X} at offset {exc.start}); "
            f"convert it with `iconv -f LATIN1 -t UTF-8 {shlex.quote(path.name)} > "
            f"{shlex.quote(f'{path.stem}.utf8{path.suffix}')}` (replace LATIN1 with the "
            "file's real encoding)"
        ) from None
    chunks = chunk_text(normalize_text(text))
    if not chunks:
        raise PipelineError(f"{path.name}: the file holds only whitespace: nothing to ingest")
    return [Page(number=i + 1, kind="text", text=chunk) for i, chunk in enumerate(chunks)]


def normalize_text(text: str) -> str:
    """Unify line endings and drop NULs and trailing spaces."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _split_long(paragraph: str, size: int) -> list[str]:
    """Split one paragraph longer than ``size`` on sentences, then lines, then words."""
    pieces: list[str] = []
    for sep in (_SENTENCE_END, re.compile(r"\n"), re.compile(r"\s+")):
        parts = [p for p in sep.split(paragraph) if p.strip()]
        if len(parts) > 1:
            pieces = parts
            break
    if not pieces:
        return [paragraph[i : i + size] for i in range(0, len(paragraph), size)]
    return _pack(pieces, size, " ")


def _pack(pieces: list[str], size: int, joiner: str) -> list[str]:
    """Pack ``pieces`` greedily into chunks of at most ``size`` characters.

    A piece longer than ``size`` on its own is split further by :func:`_split_long`.
    """
    out: list[str] = []
    current = ""
    for part in pieces:
        if len(part) > size:
            if current:
                out.append(current)
                current = ""
            out.extend(_split_long(part, size))
            continue
        candidate = f"{current}{joiner}{part}" if current else part
        if len(candidate) > size:
            out.append(current)
            current = part
        else:
            current = candidate
    if current:
        out.append(current)
    return out


def chunk_text(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Cut ``text`` into chunks of at most ``size`` characters on paragraph boundaries.

    Paragraphs (separated by blank lines) are packed together while they fit; a paragraph
    longer than ``size`` is split on sentences, then lines, then words.
    """
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return _pack(paragraphs, size, "\n\n")
