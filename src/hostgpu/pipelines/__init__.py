"""Built-in pipelines that run on workers.

- :mod:`hostgpu.pipelines.documents`: files (PDF, PNG/JPEG, TXT/MD) → pages, with the limits
  that keep one bad file from taking a worker down.
- :mod:`hostgpu.pipelines.embed`: per-process model cache (models stay warm between jobs),
  text and optional visual embeddings on the job's device.
- :mod:`hostgpu.pipelines.chroma`: ChromaDB client (embedded or server) and the
  all-or-nothing replacement of a file's records.
- :mod:`hostgpu.pipelines.ingest`: one file → pages → embeddings → Chroma (one job per file).
- :mod:`hostgpu.pipelines.search`: query → the best pages.

Heavy libraries (torch, sentence-transformers, chromadb, pypdfium2, Pillow) are imported
inside functions, so importing these modules stays cheap for the CLI and the gateway.
"""
