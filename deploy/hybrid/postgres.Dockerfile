# PostgreSQL from the distribution's packages on the Python base image (Debian): for
# machines that cannot pull the official image. HOSTGPU_POSTGRES_IMAGE=postgres:16 uses the
# official image instead; both read POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB and keep
# their data in /var/lib/postgresql/data. Switching between them on one volume works only
# when both have the same major version (`hostgpu stack down --volumes` starts afresh).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
# No "main" cluster from the package's postinst: the entrypoint creates the one it serves.
RUN mkdir -p /etc/postgresql-common/createcluster.d \
 && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/hostgpu.conf \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
 && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql \
 && chmod 700 /var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
ENV PGDATA=/var/lib/postgresql/data
USER postgres
EXPOSE 5432
STOPSIGNAL SIGINT
CMD ["sh", "/usr/local/bin/postgres-entrypoint"]
