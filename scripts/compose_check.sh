#!/usr/bin/env bash
# make compose-check: the container stack for real. Builds the images of docker-compose.yml (the
# three services, PostgreSQL, the nginx gRPC proxy, Prometheus and the web edge), brings the stack
# up, waits for every healthcheck, runs sample queries with grpcurl through the proxy's port
# published on 127.0.0.1, checks the web edge (page, /predict/image, a JSON search and its photo)
# and that Prometheus has `up` == 1 for every replica, and tears everything down again (also on
# failure).
#
# Works on a normal Docker host and on an offline one like the build machine (the shared parts
# are in scripts/lib/docker_check.sh, also used by scripts/swarm_check.sh):
#  * no Docker daemon running: as root it installs docker.io/docker-compose if missing, starts
#    dockerd in the background (PID and log under build/compose/) and stops it by that PID at the
#    end, removing the docker0 bridge and the iptables rules dockerd added;
#  * base image not pullable: builds marketplace-base:bookworm (debootstrap minbase + Debian's
#    Python 3.11 in a venv, the host's CA bundle) once and reuses it (scripts/compose/);
#  * pip inside the build: wheels are made on the host (`pip wheel`, host pip config, cached in
#    build/compose/wheels) and served to the build over HTTP on the docker0 address, installed
#    with --no-index (the Dockerfiles' PIP_INSTALL_OPTS build arg).
#
# Settings (environment):
#   BASE_IMAGE=...            base of the images (default: python:3.11-slim-bookworm when present
#                             or pullable, else the local marketplace-base:bookworm)
#   COMPOSE_CHECK_WHEELHOUSE=0  let pip inside the build reach PyPI itself (default 1: wheelhouse)
#   ARTIFACT_DIR=...          model artefact (default artifacts/current, else a small test
#                             artefact exported into build/compose/artifact)
#   PREPARED_DIR=...          prepared data (default build/data; `make demo` makes it)
#   WRITE_TOKEN=..., POSTGRES_PASSWORD=...  the stack's write token and database password
#                             (default: random ones for this run; the compose file itself has
#                             none and refuses to start without them)
#   COMPOSE_CHECK_FRESH=1     forget the cached base image, service images and wheelhouse stamp
#                             first: a cold build from scratch (~15 min here instead of ~4)
#   COMPOSE_CHECK_KEEP=1      leave the stack (and dockerd) running for inspection
#   COMPOSE_CHECK_UP_TIMEOUT  seconds to wait for all services to be healthy (default 900)
set -Eeuo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
CHECK=compose-check
WORK="$REPO/build/compose"
START=$(date +%s)
# shellcheck source=scripts/lib/docker_check.sh
source "$REPO/scripts/lib/docker_check.sh"   # from here on, output is also in $LOG

export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-marketplace_check}"
export WRITE_TOKEN="${WRITE_TOKEN:-check-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')}"
export POSTGRES_PASSWORD="${POSTGRES_PASSWORD:-check-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')}"
# free loopback ports rather than 50050, 8000, 9090, which `make up` or a test may be using
export GATEWAY_PUBLISHED_PORT="${GATEWAY_PUBLISHED_PORT:-$(free_port)}"
export WEB_PUBLISHED_PORT="${WEB_PUBLISHED_PORT:-$(free_port)}"
export PROMETHEUS_PORT="${PROMETHEUS_PORT:-$(free_port)}"
GATEWAY="127.0.0.1:$GATEWAY_PUBLISHED_PORT"
STACK_UP=0

cleanup() {
  local rc=$?
  set +e
  if [[ "${COMPOSE_CHECK_KEEP:-0}" == 1 && $rc -eq 0 ]]; then
    echo "COMPOSE_CHECK_KEEP=1: stack left up (project $COMPOSE_PROJECT_NAME, gateway on $GATEWAY, WRITE_TOKEN=$WRITE_TOKEN); dockerd PID ${DOCKERD_PID:-not ours}"
    stop_wheel_server
    return
  fi
  if [[ $rc -ne 0 && $STACK_UP == 1 ]]; then
    step "failure: state and recent logs"
    compose ps
    compose logs --no-color --tail 60
  fi
  if [[ $STACK_UP == 1 ]]; then
    step "tear down: compose down -v"
    compose down -v --remove-orphans
  fi
  stop_wheel_server
  stop_dockerd
  say_outcome "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
step "tools"
ensure_tools

# refuses_without VAR WHAT QUOTED: the compose file must refuse a stack without VAR and say how to
# create WHAT (openssl rand); QUOTED (a grep pattern) picks the refusal's line to show
refuses_without() {
  local out
  if out="$(unset "$1"; compose config -q 2>&1)"; then
    die "docker-compose.yml accepted a stack without $1"
  fi
  grep -q "openssl rand" <<<"$out" || { echo "$out"; die "the refusal does not say how to create a $2"; }
  echo "ok  without $1: $(grep -o "$3" <<<"$out" | head -1 | cut -c1-150)"
}
step "the compose file refuses to start without a write token"
refuses_without WRITE_TOKEN token 'WRITE_TOKEN.*'
step "... nor without a database password"
refuses_without POSTGRES_PASSWORD password 'POSTGRES_PASSWORD is not set.*'
compose config -q

prepare_images

# ---------------------------------------------------------------------------------------------
step "bring the stack up (docker-compose up -d)"
STACK_UP=1
compose down -v --remove-orphans >/dev/null 2>&1 || true   # leftovers of an aborted run
up_start=$(date +%s)
compose up -d --no-build
deadline=$(( $(date +%s) + ${COMPOSE_CHECK_UP_TIMEOUT:-900} ))
while :; do
  states="$(for c in $(compose ps -q); do
    docker inspect -f '{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$c"
  done)"
  # 2 indexers, embedder, postgres, 2 gateways, grpc-proxy, web, prometheus: each with a healthcheck
  if ! grep -qv ' healthy$' <<<"$states" && [[ $(wc -l <<<"$states") -ge 9 ]]; then break; fi
  grep -qE ' (exited|dead) | unhealthy$' <<<"$states" && { echo "$states"; die "a service failed"; }
  (( $(date +%s) < deadline )) || { echo "$states"; die "services not healthy in time"; }
  sleep 5
done
echo "$states"
echo "all healthy $(elapsed "$up_start") after up"
compose ps

# ---------------------------------------------------------------------------------------------
index_in_compose() {  # index_in_compose ARGS...: index_catalogue inside the stack
  if [[ $1 == --artifact ]]; then
    compose run --rm --no-deps -v "$ARTIFACT_DIR:/artifacts:ro" gateway \
      python -m services.gateway.index_catalogue "$@"
  else
    compose exec -T gateway python -m services.gateway.index_catalogue "$@"
  fi
}
run_sample_queries "$GATEWAY" index_in_compose

step "the web edge on 127.0.0.1:$WEB_PUBLISHED_PORT"
check_web_edge "127.0.0.1:$WEB_PUBLISHED_PORT"

# ---------------------------------------------------------------------------------------------
step "metrics: Prometheus scrapes every replica and saw the sample queries"
PROM="http://127.0.0.1:$PROMETHEUS_PORT"
# every replica: 2 gateways, 1 embedder, 2 indexer shards, and Prometheus itself
check_prometheus_up "$PROM" $(( ${GATEWAY_REPLICAS:-2} + 1 + 2 + 1 ))
promql() { curl -sf --get --data-urlencode "query=$1" "$PROM/api/v1/query"; }
deadline=$(( $(date +%s) + 120 ))
while :; do  # first scrapes after start: wait until every target is up
  curl -sf "$PROM/api/v1/targets" >"$Q/targets.json" || true
  if jq -e '(.data.activeTargets | length) >= 5 and all(.data.activeTargets[]; .health == "up")' \
       "$Q/targets.json" >/dev/null 2>&1; then break; fi
  (( $(date +%s) < deadline )) || { jq -c '.data.activeTargets[]? | [.scrapeUrl, .health, .lastError]' "$Q/targets.json"; die "Prometheus targets not all up"; }
  sleep 5
done
jq -r '.data.activeTargets[] | "    \(.labels.job)  \(.scrapeUrl)  \(.health)"' "$Q/targets.json"
sleep 20  # one more scrape (15 s interval) after the queries above
promql 'sum by (grpc_method, grpc_code) (grpc_server_handled_total{job="gateway",grpc_service="marketplace.gateway.v1.Gateway"}) > 0' >"$Q/handled.json"
jq -r '.data.result[] | "    \(.metric.grpc_method) \(.metric.grpc_code): \(.value[1])"' "$Q/handled.json"
jq -e 'any(.data.result[]; .metric.grpc_method == "AddListing" and .metric.grpc_code == "OK" and (.value[1] | tonumber) >= 2)' \
  "$Q/handled.json" >/dev/null || die "Prometheus did not see the AddListing calls"
echo "ok  grpc_server_handled_total of the gateway counts the sample queries"
promql 'sum(embedder_batch_size_sum) / sum(embedder_batch_size_count)' >"$Q/batch.json"
echo "ok  embedder average batch size: $(jq -r '.data.result[0].value[1]' "$Q/batch.json")"
step "compose-check: all checks passed"
