# copyparty upload server from the Python base image, at the copyparty version of the host
# venv (passed by `hostgpu stack up`). The after-upload hook (upload_hook.py) is mounted,
# not baked in, and needs nothing beyond the standard library.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
ARG COPYPARTY_VERSION=1.20.26
RUN pip install --no-cache-dir "copyparty==${COPYPARTY_VERSION}"
EXPOSE 3923
# compose gives the real command line (config file, hook, upload database).
CMD ["python3", "-m", "copyparty", "-i", "0.0.0.0", "-p", "3923"]
