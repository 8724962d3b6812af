#!/usr/bin/env bash
# deploy/swarm/deploy.sh [STACK]: deploy (or update) the marketplace stack on a Docker Swarm.
# Checks first what `docker stack deploy` would only find out half-way: the secrets (write token,
# PostgreSQL password), the node labels that place the indexer replicas, the database, the image
# store and Prometheus, and the two host folders;
# each missing piece is named with the command that creates it. Then runs
#   docker stack deploy --resolve-image never -c deploy/swarm/stack.yml STACK      (STACK: marketplace)
# (--resolve-image never: images built on the hosts are used as they are; with a registry
# (IMAGE_PREFIX=...) pass RESOLVE_IMAGE=always so every node pulls the same digest.)
# SWARM_TLS=1 adds deploy/swarm/tls.yml: TLS and mutual TLS from the marketplace_tls_* secrets.
set -Eeuo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STACK="${1:-marketplace}"
SECRET="${WRITE_TOKEN_SECRET:-marketplace_write_token}"
PG_SECRET="${POSTGRES_PASSWORD_SECRET:-marketplace_postgres_password}"
problems=()

[[ "$(docker info -f '{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}}' 2>/dev/null)" == "active true" ]] \
  || { echo "deploy: this Docker host is not a swarm manager: docker swarm init (or run this on a manager)" >&2; exit 2; }

if ! docker secret inspect "$SECRET" >/dev/null 2>&1; then
  problems+=("no write-token secret '$SECRET': the stack does not start without one. Create it (keep the token for write clients):
      openssl rand -hex 32 | tee write_token.txt | docker secret create $SECRET -")
fi
if ! docker secret inspect "$PG_SECRET" >/dev/null 2>&1; then
  problems+=("no catalogue database password secret '$PG_SECRET': PostgreSQL and the gateways do not start without one. Create it:
      openssl rand -hex 24 | docker secret create $PG_SECRET -")
fi
files=(-c "$HERE/stack.yml")
if [[ "${SWARM_TLS:-0}" == 1 ]]; then
  files+=(-c "$HERE/tls.yml")
  for part in cert key ca flags; do
    docker secret inspect "${TLS_SECRET_PREFIX:-marketplace_tls}_$part" >/dev/null 2>&1 \
      || problems+=("no secret ${TLS_SECRET_PREFIX:-marketplace_tls}_$part: see the commands at the top of deploy/swarm/tls.yml")
  done
fi
labels="$(docker node ls -q | xargs docker node inspect -f '{{range $k, $v := .Spec.Labels}}{{$k}}={{$v}} {{end}}')"
for label in $(sed -n 's/.*node\.labels\.\([a-z0-9.-]*\) == true.*/\1/p' "$HERE/stack.yml" | sort -u); do
  grep -qw "$label=true" <<<"$labels" \
    || problems+=("no node labelled $label=true (where that service and its volume live):
      docker node update --label-add $label=true NODE")
done
for var in ARTIFACT_DIR PREPARED_DIR; do
  value="${!var:-}"
  if [[ -z "$value" || "$value" != /* ]]; then
    problems+=("$var must be the absolute path of the folder on the hosts (now '${value}')")
  fi
done
if ((${#problems[@]})); then
  echo "deploy: the stack '$STACK' cannot start yet:" >&2
  printf '  - %s\n' "${problems[@]}" >&2
  exit 2
fi

exec docker stack deploy --prune --resolve-image "${RESOLVE_IMAGE:-never}" "${files[@]}" "$STACK"
