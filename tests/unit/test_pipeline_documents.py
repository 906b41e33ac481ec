"""Files → pages: real PDFs (fpdf2), real images (Pillow), and every kind of bad input."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import pytest

pytest.importorskip("pypdfium2")
pytest.importorskip("fpdf")
pytest.importorskip("PIL")

from hostgpu.errors import PipelineError
from hostgpu.pipelines import documents
from hostgpu.pipelines.documents import (
    InputLimits,
    Page,
    chunk_text,
    iter_rendered,
    load_pages,
)

pytestmark = pytest.mark.ml


def make_pdf(path: Path, pages: list[str], *, user_password: str | None = None) -> Path:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=11)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 6, text)
    if user_password is not None:
        pdf.set_encryption(owner_password="owner-secret", user_password=user_password)
    pdf.output(str(path))
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width``x``height``: costs bytes, not gigabytes."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + tag
            + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def test_pdf_text_per_page_without_rendering(tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "a.pdf", ["First page about apples.", "Second page about pears."])
    pages = load_pages(pdf, dpi=72, render=False)
    assert [p.number for p in pages] == [1, 2]
    assert all(p.kind == "pdf" and p.image is None for p in pages)
    assert "apples" in pages[0].text and "pears" in pages[1].text


def test_pdf_rendering_at_dpi(tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "a.pdf", ["Rendered page."])
    (page,) = load_pages(pdf, dpi=72, render=True)
    assert page.image is not None and page.image.mode == "RGB"
    # A4 at 72 DPI is 595x842 points → pixels.
    assert abs(page.image.size[0] - 595) <= 2 and abs(page.image.size[1] - 842) <= 2


def test_render_lowers_dpi_past_the_pixel_limit(tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "a.pdf", ["Big render."])
    (page,) = load_pages(pdf, dpi=600, render=True, limits=InputLimits(max_pixels=100_000))
    assert page.image is not None
    assert page.image.size[0] * page.image.size[1] <= 101_000


def test_iter_rendered_holds_at_most_a_batch(tmp_path: Path) -> None:
    pdf = make_pdf(tmp_path / "a.pdf", [f"page {i}" for i in range(5)])
    batches = list(iter_rendered(pdf, dpi=36, batch=2))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert [n for b in batches for n, _ in b] == [1, 2, 3, 4, 5]


def test_corrupt_pdf(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.pdf"
    bad.write_bytes(b"%PDF-1.4\nthis is not really a pdf\n")
    with pytest.raises(PipelineError, match=r"corrupt\.pdf: not a readable PDF"):
        load_pages(bad, dpi=72, render=False)


def test_truncated_pdf(tmp_path: Path) -> None:
    good = make_pdf(tmp_path / "good.pdf", ["Some text " * 200, "More text " * 200])
    data = good.read_bytes()
    cut = tmp_path / "truncated.pdf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match="corrupt or truncated"):
        load_pages(cut, dpi=72, render=False)


def test_encrypted_pdf(tmp_path: Path) -> None:
    locked = make_pdf(tmp_path / "locked.pdf", ["secret text"], user_password="pw")
    with pytest.raises(PipelineError, match="password-protected"):
        load_pages(locked, dpi=72, render=False)


def test_owner_password_only_pdf_is_readable(tmp_path: Path) -> None:
    # Permissions-only encryption (no user password) opens without a password.
    pdf = make_pdf(tmp_path / "perm.pdf", ["readable text"], user_password="")
    (page,) = load_pages(pdf, dpi=72, render=False)
    assert "readable text" in page.text


def test_zero_byte_file(tmp_path: Path) -> None:
    for name in ("empty.pdf", "empty.png", "empty.txt"):
        path = tmp_path / name
        path.write_bytes(b"")
        with pytest.raises(PipelineError, match="empty file"):
            load_pages(path, dpi=72, render=False)


def test_unsupported_type_lists_supported_ones(tmp_path: Path) -> None:
    doc = tmp_path / "report.docx"
    doc.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(PipelineError) as info:
        load_pages(doc, dpi=72, render=False)
    message = str(info.value)
    assert "unsupported file type .docx" in message
    for suffix in (".pdf", ".png", ".jpg", ".jpeg", ".txt", ".md"):
        assert suffix in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="no such file"):
        load_pages(tmp_path / "nope.pdf", dpi=72, render=False)


def test_two_thousand_page_pdf_is_refused_with_the_limit_and_setting(tmp_path: Path) -> None:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=8)
    for i in range(2000):
        pdf.add_page()
        pdf.text(10, 10, f"page {i + 1}")
    big = tmp_path / "big.pdf"
    pdf.output(str(big))
    started = time.perf_counter()
    with pytest.raises(PipelineError) as info:
        load_pages(big, dpi=72, render=True)
    assert time.perf_counter() - started < 5  # refused up front, nothing rendered
    message = str(info.value)
    assert "2,000 pages" in message and "500" in message and "HOSTGPU_MAX_PAGES" in message

    # With the limit raised, the text of all pages is read (text only: small memory).
    pages = load_pages(big, dpi=72, render=False, limits=InputLimits(max_pages=2000))
    assert len(pages) == 2000
    assert pages[-1].text == "page 2000"


def test_huge_png_is_refused_from_its_header(tmp_path: Path) -> None:
    huge = png_header_only(tmp_path / "huge.png", 20_000, 20_000)
    assert huge.stat().st_size < 1000
    for render in (False, True):
        started = time.perf_counter()
        with pytest.raises(PipelineError) as info:
            load_pages(huge, dpi=72, render=render)
        assert time.perf_counter() - started < 2
        message = str(info.value)
        assert "20,000x20,000" in message and "HOSTGPU_MAX_PIXELS" in message


def test_pillow_limit_is_restored_after_open(tmp_path: Path) -> None:
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(PipelineError):
        load_pages(png_header_only(tmp_path / "huge.png", 20_000, 20_000), dpi=72, render=False)
    assert before == Image.MAX_IMAGE_PIXELS


def test_decompression_bomb_error_becomes_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    def bomb(*args: object, **kwargs: object) -> None:
        raise Image.DecompressionBombError("Image size (400000000 pixels) exceeds limit")

    monkeypatch.setattr(Image, "open", bomb)
    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG not really")
    with pytest.raises(PipelineError, match=r"image too large to decode safely.*HOSTGPU_MAX_PIX"):
        load_pages(path, dpi=72, render=True)


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "photo.jpg"
    Image.new("RGB", (4000, 3000), (120, 30, 200)).save(path, quality=50)
    (page,) = load_pages(path, dpi=72, render=True, limits=InputLimits(max_pixels=1_000_000))
    assert page.image is not None
    width, height = page.image.size
    assert width * height <= 1_000_000
    assert page.notes and "4000x3000" in page.notes[0]


def test_large_png_over_the_limit_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "wide.png"
    Image.new("RGB", (2000, 1000)).save(path)
    with pytest.raises(PipelineError, match="over the limit"):
        load_pages(path, dpi=72, render=True, limits=InputLimits(max_pixels=1_000_000))


def test_image_is_one_page_and_not_decoded_without_rendering(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "small.png"
    Image.new("RGB", (64, 48), "white").save(path)
    (page,) = load_pages(path, dpi=72, render=False)
    assert page == Page(number=1, kind="image", text="", image=None)
    (page,) = load_pages(path, dpi=72, render=True)
    assert page.image is not None and page.image.size == (64, 48)


def test_corrupt_image(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"definitely not a png")
    with pytest.raises(PipelineError, match="not a readable PNG or JPEG"):
        load_pages(path, dpi=72, render=True)


def test_truncated_image_data(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "cut.png"
    Image.effect_noise((256, 256), 50).convert("RGB").save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match="corrupt or truncated"):
        load_pages(path, dpi=72, render=True)


def test_image_with_the_wrong_extension(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "really-a-gif.png"
    Image.new("P", (10, 10)).save(path, format="GIF")
    with pytest.raises(PipelineError, match="GIF image, not PNG or JPEG"):
        load_pages(path, dpi=72, render=False)


def test_non_utf8_text_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes("Café crème, à bientôt".encode("latin-1"))
    with pytest.raises(PipelineError) as info:
        load_pages(path, dpi=72, render=False)
    message = str(info.value)
    assert "not UTF-8" in message and "0xE9" in message and "iconv" in message


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.md"
    path.write_bytes("\ufeff# Title\n\nCafé".encode())
    (page,) = load_pages(path, dpi=72, render=False)
    assert page.text.startswith("# Title") and "Café" in page.text


def test_text_is_chunked_on_paragraphs(tmp_path: Path) -> None:
    paragraphs = [f"Paragraph {i}. " + "word " * 60 for i in range(20)]
    path = tmp_path / "long.txt"
    path.write_text("\n\n".join(paragraphs), encoding="utf-8")
    pages = load_pages(path, dpi=72, render=False)
    assert len(pages) > 3
    assert all(p.kind == "text" and len(p.text) <= documents.CHUNK_CHARS for p in pages)
    joined = " ".join(p.text for p in pages)
    for i in range(20):
        assert f"Paragraph {i}." in joined
    # Paragraphs are never cut in the middle when they fit.
    for page in pages:
        for part in page.text.split("\n\n"):
            assert part.startswith("Paragraph ")


def test_whitespace_only_text(tmp_path: Path) -> None:
    path = tmp_path / "blank.txt"
    path.write_text("   \n\n \t\n", encoding="utf-8")
    with pytest.raises(PipelineError, match="only whitespace"):
        load_pages(path, dpi=72, render=False)


def test_text_over_the_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    path.write_text("x" * 5000, encoding="utf-8")
    with pytest.raises(PipelineError, match="over the limit of 1,000 bytes"):
        load_pages(path, dpi=72, render=False, limits=InputLimits(max_text_bytes=1000))


def test_chunk_text_splits_a_long_paragraph() -> None:
    text = "A sentence that goes on. " * 200
    chunks = chunk_text(text, size=300)
    assert all(len(c) <= 300 for c in chunks)
    assert sum(c.count("A sentence") for c in chunks) == 200
    assert chunk_text("") == []
    assert chunk_text("x" * 2500, size=1000) == ["x" * 1000, "x" * 1000, "x" * 500]
