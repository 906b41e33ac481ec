# ChromaDB server from the Python base image. `hostgpu stack up` passes the chromadb
# version the host venv has (client and server must be one release); the default is the
# one this repository was tested with. HOSTGPU_CHROMA_IMAGE replaces this build with any
# image (e.g. the official chromadb/chroma:1.5.9): the compose health check needs only bash.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG CHROMADB_VERSION=1.5.9
RUN pip install --no-cache-dir "chromadb==${CHROMADB_VERSION}" && mkdir -p /data
# Telemetry off: the containers have no outbound access, and users did not ask for it.
ENV ANONYMIZED_TELEMETRY=False
EXPOSE 8000
CMD ["chroma", "run", "--host", "0.0.0.0", "--port", "8000", "--path", "/data"]
