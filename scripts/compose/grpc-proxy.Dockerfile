# nginx from Debian as the published gRPC address in front of the gateway replicas (grpc_pass),
# on the same base image as the services.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx-light \
 && rm -rf /var/lib/apt/lists/*
COPY scripts/compose/grpc-proxy.conf /etc/nginx/nginx.conf
EXPOSE 50050
CMD ["nginx", "-g", "daemon off;"]
