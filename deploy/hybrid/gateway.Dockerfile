# The hostgpu gateway: core package only (no torch, no ML extras: a gateway stores and
# routes jobs, it never runs them). Build context: the repository root, trimmed by the
# root .dockerignore to pyproject.toml, README.md, src/ and this folder's start script.
#   docker build -f deploy/hybrid/gateway.Dockerfile --network host \
#     --build-arg BASE_IMAGE=python:3.11-slim -t hostgpu/gateway:local .
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Dependencies first, from pyproject.toml alone (a stub package stands in for the source):
# a source change then rebuilds only the last, seconds-long layer.
COPY pyproject.toml README.md ./
RUN mkdir -p src/hostgpu && touch src/hostgpu/__init__.py \
 && pip install "setuptools>=77" wheel \
 && pip install . \
 && pip uninstall -y hostgpu \
 && rm -rf src build
COPY src ./src
RUN pip install --no-deps --no-build-isolation . && rm -rf build src/*.egg-info
COPY deploy/hybrid/gateway-start.py /usr/local/bin/hostgpu-gateway-start

# Any uid may own the gateway's files: compose runs it as the host user (so it can read the
# 0600 admin-token file `hostgpu stack up` mounts), and /data is a named volume that starts
# as a copy of this folder, mode included.
RUN mkdir -p /data && chmod 1777 /data
ENV HOSTGPU_HOME=/data \
    HOSTGPU_HOST=0.0.0.0 \
    HOSTGPU_PORT=8000 \
    HOME=/tmp
USER 10001
EXPOSE 8000
CMD ["python", "/usr/local/bin/hostgpu-gateway-start"]
