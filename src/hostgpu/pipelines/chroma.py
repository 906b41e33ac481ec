"""ChromaDB: the client, the collections, and all-or-nothing replacement of a file's records.

Client: an embedded ``PersistentClient`` under ``HOSTGPU_HOME/chroma`` by default, a Chroma
server (``HttpClient``) when ``CHROMA_HOST`` is set (``CHROMA_PORT``, default 8000). Clients
are cached per process and keyed on those settings, so a changed environment gets a fresh one.

Collections (``HOSTGPU_CHROMA_COLLECTION``, default ``hostgpu``):

- ``<name>``: text chunks (cosine space), one record per chunk;
- ``<name>_visual``: page-image embeddings (only with a visual model; a different
  dimension, so a collection of its own);
- ``<name>_files``: the commit manifest, one record per file (see below).

No collection gets an embedding function (``embedding_function=None``): Chroma's default
would try to download a model; hostgpu always passes its own vectors. The model a collection
was built with is kept in its metadata; writing vectors of another model into it is refused
with a message (the vectors would not be comparable).

All or nothing
--------------
Chroma has no multi-record transactions, but a single-record upsert is atomic. So:

1. Every record carries ``file_key`` (which file: a hash of its path) and ``generation`` (a
   hash of the file's content and of everything that shapes its records: models, chunker,
   DPI). Record ids are ``<file_key>:<generation>:<page>:<chunk>:<text|visual>``, so the
   records of a new generation never overwrite the visible ones in place, and re-ingesting
   an unchanged file rewrites identical records under identical ids (idempotent).
2. :func:`replace_file` upserts the new generation's records in batches of
   ``client.get_max_batch_size()``. They are invisible to search so far.
3. It then upserts the file's manifest record (id ``file_key``, metadata ``generation``):
   this single atomic write is the commit point.
4. Last, it deletes the file's records whose generation is not the committed one.

Search (:mod:`hostgpu.pipelines.search`) shows a record only when its generation is the
committed generation of its file. A crash before step 3 leaves invisible new records (the
old file stays fully visible); a crash after it leaves invisible old records (the new file
is fully visible). Either leftover is removed by the next ingest of that file (step 4
deletes every generation but the committed one). A file's pages are therefore visible all
or nothing, and never twice.

One limit: two ingests of the *same path* running at the same time race (the one that
commits first deletes the other's uncommitted records). The job layer must run at most one
ingest per path at a time (e.g. a concurrency or idempotency key derived from the path).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from hostgpu.errors import PipelineError

_clients: dict[tuple[str, ...], Any] = {}

# (collection, ids, embeddings, metadatas) written with a file's main records.
ExtraRecords = tuple[Any, Sequence[str], Sequence[Sequence[float]], Sequence[Mapping[str, Any]]]

MANIFEST_SUFFIX = "_files"
VISUAL_SUFFIX = "_visual"


def _client_key() -> tuple[str, ...]:
    from hostgpu.settings import get_settings

    settings = get_settings()
    if settings.chroma_host:
        return ("http", settings.chroma_host, str(settings.chroma_port))
    return ("embedded", str(settings.home_dir / "chroma"))


def get_client() -> Any:
    """The Chroma client for the current settings (one per process and settings)."""
    key = _client_key()
    client = _clients.get(key)
    if client is not None:
        return client
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    chroma_settings = ChromaSettings(anonymized_telemetry=False)
    try:
        if key[0] == "http":
            client = chromadb.HttpClient(host=key[1], port=int(key[2]), settings=chroma_settings)
        else:
            client = chromadb.PersistentClient(path=key[1], settings=chroma_settings)
    except Exception as exc:  # chromadb raises plain exceptions (ValueError, httpx errors)
        where = f"the Chroma server at {key[1]}:{key[2]}" if key[0] == "http" else key[1]
        raise PipelineError(f"cannot open ChromaDB ({where}): {exc}") from None
    _clients[key] = client
    return client


def reset_clients() -> None:
    """Forget cached clients (tests)."""
    _clients.clear()


def get_collection(name: str, *, model: str | None = None, create: bool = True) -> Any:
    """The collection ``name`` (cosine space, no embedding function).

    ``model`` is the embedding model that writes to it: recorded on creation and checked
    afterwards. ``create=False`` returns None when the collection does not exist.
    """
    client = get_client()
    if not create:
        try:
            return client.get_collection(name, embedding_function=None)
        except Exception:  # NotFoundError / ValueError depending on the client
            return None
    metadata = {"hostgpu_model": model} if model else None
    collection = client.get_or_create_collection(
        name,
        configuration={"hnsw": {"space": "cosine"}},
        metadata=metadata,
        embedding_function=None,
    )
    existing = (collection.metadata or {}).get("hostgpu_model")
    if model and existing and existing != model:
        raise PipelineError(
            f"Chroma collection {name!r} holds embeddings of model {existing!r}, not "
            f"{model!r}: vectors of different models are not comparable; set "
            "HOSTGPU_CHROMA_COLLECTION to another name for this model"
        )
    return collection


def get_manifest() -> Any:
    from hostgpu.settings import get_settings

    return get_collection(get_settings().chroma_collection + MANIFEST_SUFFIX, model="manifest")


def file_key(identity: str) -> str:
    """The stable key of a file: a hash of its path (or the display path given by a caller)."""
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:32]


def generation_of(content_sha256: str, *parts: object) -> str:
    """A generation: the file's content hash and what shapes its records."""
    text = "|".join([content_sha256, *(str(p) for p in parts)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def record_id(key: str, generation: str, page: int, chunk: int, kind: str) -> str:
    return f"{key}:{generation}:{page}:{chunk}:{kind}"


def _batches(n: int, size: int) -> list[tuple[int, int]]:
    size = max(1, size)
    return [(start, min(n, start + size)) for start in range(0, n, size)]


def upsert(
    collection: Any,
    ids: Sequence[str],
    embeddings: Sequence[Sequence[float]],
    documents: Sequence[str] | None,
    metadatas: Sequence[Mapping[str, Any]],
) -> int:
    """Upsert in batches within the client's limit; return the number of batches."""
    limit = get_client().get_max_batch_size()
    spans = _batches(len(ids), limit)
    for start, end in spans:
        collection.upsert(
            ids=list(ids[start:end]),
            embeddings=[list(e) for e in embeddings[start:end]],
            documents=list(documents[start:end]) if documents is not None else None,
            metadatas=[dict(m) for m in metadatas[start:end]],
        )
    return len(spans)


def commit_file(key: str, generation: str, info: Mapping[str, Any]) -> None:
    """The commit point: one atomic upsert of the file's manifest record."""
    get_manifest().upsert(
        ids=[key],
        embeddings=[[1.0]],
        metadatas=[{**info, "file_key": key, "generation": generation}],
    )


def committed_generations(keys: Sequence[str]) -> dict[str, str]:
    """``file_key → committed generation`` for the given keys (absent keys are uncommitted)."""
    if not keys:
        return {}
    result = get_manifest().get(ids=list(dict.fromkeys(keys)), include=["metadatas"])
    out: dict[str, str] = {}
    for rid, meta in zip(result["ids"], result["metadatas"] or [], strict=False):
        if meta and isinstance(meta.get("generation"), str):
            out[rid] = meta["generation"]
    return out


def delete_stale(collection: Any, key: str, generation: str) -> None:
    """Delete the file's records of every generation but ``generation``."""
    collection.delete(where={"$and": [{"file_key": key}, {"generation": {"$ne": generation}}]})


def replace_file(
    collection: Any,
    file_id: str,
    ids: Sequence[str],
    embeddings: Sequence[Sequence[float]],
    documents: Sequence[str] | None,
    metadatas: Sequence[Mapping[str, Any]],
    *,
    generation: str,
    info: Mapping[str, Any] | None = None,
    extra: Sequence[ExtraRecords] = (),
) -> None:
    """Replace the records of file ``file_id`` (a :func:`file_key`) all or nothing.

    Writes ``ids``/``embeddings``/``documents``/``metadatas`` (and, for visual records,
    each ``(collection, ids, embeddings, metadatas)`` of ``extra``) under ``generation``,
    commits the generation in the manifest, then deletes stale generations. See the module
    docstring for why a crash at any point leaves the file whole.
    """
    if not (len(ids) == len(embeddings) == len(metadatas)):
        raise ValueError("ids, embeddings and metadatas must have the same length")
    tagged = [{**m, "file_key": file_id, "generation": generation} for m in metadatas]
    upsert(collection, ids, embeddings, documents, tagged)
    for other, other_ids, other_embeddings, other_metadatas in extra:
        other_tagged = [
            {**m, "file_key": file_id, "generation": generation} for m in other_metadatas
        ]
        upsert(other, other_ids, other_embeddings, None, other_tagged)
    commit_file(file_id, generation, info or {})
    delete_stale(collection, file_id, generation)
    for other, *_ in extra:
        delete_stale(other, file_id, generation)
