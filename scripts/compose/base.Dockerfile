# A python:3.11-slim-like base made offline (scripts/compose_check.sh): Debian bookworm minbase
# (debootstrap + docker import) with Debian's Python 3.11 in a venv that is first on PATH, so
# the services' Dockerfiles run `pip install` / `python` unchanged (no PEP 668 refusal).
ARG ROOTFS_IMAGE=marketplace-base-rootfs:bookworm
FROM ${ROOTFS_IMAGE}
ENV LANG=C.UTF-8 PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN python3 -m venv /opt/venv && ln -s /opt/venv/bin/python3 /usr/local/bin/python \
 && python --version && pip --version
CMD ["python3"]
