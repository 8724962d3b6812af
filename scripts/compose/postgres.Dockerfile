# PostgreSQL for the gateways' shared listing catalogue, from Debian's own package on the same
# base image as the services (so it builds offline like them: scripts/compose_check.sh).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
# No default cluster from the package: the entrypoint makes one in the data volume.
RUN mkdir -p /etc/postgresql-common \
 && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf \
 && apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s /usr/lib/postgresql/*/bin /usr/lib/postgresql/bin \
 && mkdir -p /var/lib/postgresql/data /run/postgresql \
 && chown -R postgres:postgres /var/lib/postgresql /run/postgresql
COPY scripts/compose/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
USER postgres
ENV PGDATA=/var/lib/postgresql/data PATH=/usr/lib/postgresql/bin:$PATH
EXPOSE 5432
HEALTHCHECK --interval=5s --timeout=3s --start-period=30s --retries=10 \
  CMD pg_isready -h 127.0.0.1 -p 5432 -d catalogue -U marketplace
ENTRYPOINT ["bash", "/usr/local/bin/postgres-entrypoint.sh"]
